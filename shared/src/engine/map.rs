//! A map step: its sub-step fanned out over a list, `max_concurrency` items at a time;
//! results keep the list's order.

use super::EngineError;
use super::step::{Inputs, Scope, StepContext, Work, short};
use super::transform;
use crate::codes::ErrorCode;
use crate::graph::{ItemStep, MapSpec};
use crate::ids::StepId;
use crate::limits::MAX_MAP_ITEMS;
use crate::run::ErrorInfo;
use crate::wire::{ItemFailed, MapDetail, StepDetail};
use crate::workflow::ItemFailure;
use futures::StreamExt;
use serde_json::Value;

impl StepContext {
    pub async fn run_map(&self, id: &StepId, spec: &MapSpec, inputs: &Inputs) -> Result<Work, EngineError> {
        let items = match spec.over.evaluate(&inputs.to_json()) {
            Ok(Value::Array(items)) => items,
            Ok(other) => return Ok(Work::failed(ErrorCode::MapOver, format!("`over` must give a list, got {}", short(&other)))),
            Err(e) => return Ok(Work::failed(ErrorCode::MapOver, format!("`over`: {e}"))),
        };
        if items.len() > MAX_MAP_ITEMS {
            return Ok(Work::failed(ErrorCode::MapTooLarge, format!("{} items; a map takes at most {MAX_MAP_ITEMS}", items.len())));
        }
        let total = items.len();
        let results: Vec<(usize, Work)> = futures::stream::iter(items.into_iter().enumerate())
            .map(|(index, item)| async move {
                let scope = inputs.with_item(&item, index);
                let work = match &spec.step {
                    ItemStep::Llm(llm) => self.run_llm(id, llm, &scope, Some(index), None).await,
                    ItemStep::Transform(t) => Ok(transform::run(t, &scope)),
                };
                work.map(|w| (index, w))
            })
            .buffer_unordered(spec.max_concurrency as usize)
            .collect::<Vec<Result<(usize, Work), EngineError>>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let mut ordered: Vec<Option<Work>> = (0..total).map(|_| None).collect();
        for (index, work) in results {
            ordered[index] = Some(work);
        }
        let mut map = Work::done(String::new(), Value::Null);
        map.attempts = 0;
        let mut outputs = Vec::with_capacity(total);
        let mut failed = Vec::new();
        for (index, work) in ordered.into_iter().enumerate() {
            let Some(work) = work else { continue };
            map.add_spend(work.usage, work.cost, work.calls);
            map.attempts = map.attempts.max(work.attempts);
            match work.output {
                Ok((_, value)) => outputs.push(value),
                Err(error) => {
                    outputs.push(Value::Null);
                    // A budget refusal's numbers travel with the item.
                    let detail = match work.detail {
                        Some(StepDetail::Refused(refused)) => Some(refused),
                        _ => None,
                    };
                    failed.push(ItemFailed { index, error, detail });
                }
            }
        }
        let first = failed.first().map(|f| (f.index, f.error.clone()));
        let count = failed.len();
        map.detail = Some(StepDetail::Map(MapDetail { items: total, failed }));
        if let Some((index, error)) = first
            && spec.on_item_failure == ItemFailure::Fail
        {
            map.output = Err(ErrorInfo::terminal(error.code, format!("{count} of {total} items failed; item {index}: {}", error.message)));
            return Ok(map);
        }
        let value = Value::Array(outputs);
        map.output = Ok((value.to_string(), value));
        Ok(map)
    }
}
