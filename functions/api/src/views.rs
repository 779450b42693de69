//! JSON shapes clients see. Money is shown as an exact decimal string (`cost_usd`) and
//! as the integer it is (`cost_pico_usd`), never as a float.

use chainrun_core::analytics::{CostSums, WorkflowCosts};
use chainrun_core::engine::totals_json;
use chainrun_core::graph::validate_json;
use chainrun_core::ports::RunSummary;
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{ProgressRow, RunRecord, StepRecord};
use serde_json::{Value, json};

fn step(r: &StepRecord) -> Value {
    json!({
        "id": r.step_id,
        "status": r.status,
        "attempts": r.attempts,
        "model": r.model,
        "input_tokens": r.usage.input_tokens,
        "output_tokens": r.usage.output_tokens,
        "cache_read_tokens": r.usage.cache_read_tokens,
        "cache_write_tokens": r.usage.cache_write_tokens,
        "cost_usd": r.cost.to_string(),
        "cost_pico_usd": r.cost.pico(),
        "latency_ms": r.latency_ms,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "output": r.output,
        "text": r.text,
        "error": r.error,
    })
}

/// The run snapshot, steps in the definition's (topological) order; steps without a
/// checkpoint yet are `PENDING`.
pub fn run(run: &RunRecord, records: &[StepRecord], models: &ModelRegistry) -> Value {
    let order: Vec<String> = match validate_json(&run.definition, models) {
        Ok(graph) => graph.steps.iter().map(|s| s.id.to_string()).collect(),
        Err(_) => records.iter().map(|r| r.step_id.to_string()).collect(),
    };
    let steps: Vec<Value> = order
        .iter()
        .map(|id| match records.iter().find(|r| r.step_id.as_str() == id) {
            Some(r) => step(r),
            None => json!({ "id": id, "status": "PENDING", "attempts": 0 }),
        })
        .collect();
    let mut totals = totals_json(&run.totals);
    if !run.status.is_terminal() {
        // Totals are final only at the end; meanwhile show what the checkpoints add up to.
        let mut live = chainrun_core::run::Totals::default();
        for r in records.iter().filter(|r| r.status.is_settled() && r.attempts > 0) {
            live.add_call(&r.usage, r.cost);
            live.step_latency_ms += r.latency_ms;
        }
        totals = totals_json(&live);
    }
    json!({
        "run_id": run.id,
        "workflow": run.workflow,
        "status": run.status,
        "caller": run.caller,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "input": run.input,
        "output": run.output,
        "error": run.error,
        "totals": totals,
        "steps": steps,
    })
}

pub fn progress_row(r: &ProgressRow) -> Value {
    json!({
        "run_id": r.run_id,
        "workflow": r.workflow,
        "status": r.status,
        "current_step": r.current_step,
        "totals": totals_json(&r.totals),
        "last_seq": r.last_seq,
        "updated_at": r.updated_at,
    })
}

/// A run in a history list: no input, output or steps (`GET /runs/{id}` has those).
pub fn run_summary(r: &RunSummary) -> Value {
    json!({
        "run_id": r.id,
        "workflow": r.workflow,
        "status": r.status,
        "caller": r.caller,
        "created_at": r.created_at,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "error": r.error,
        "totals": totals_json(&r.totals),
    })
}

/// Counts, sums and averages; averages round down, and the sums are there to check them.
fn cost_sums(s: &CostSums) -> serde_json::Map<String, Value> {
    let value = json!({
        "runs": s.runs,
        "failures": s.failures,
        "failure_rate": s.failure_rate(),
        "total_cost_usd": s.cost.to_string(),
        "total_cost_pico_usd": s.cost.pico(),
        "avg_cost_usd": s.avg_cost().to_string(),
        "avg_cost_pico_usd": s.avg_cost().pico(),
        "total_latency_ms": s.latency_ms,
        "avg_latency_ms": s.avg_latency_ms(),
    });
    value.as_object().cloned().unwrap_or_default()
}

/// One workflow's costs, its steps most expensive on average first.
pub fn workflow_costs(w: &WorkflowCosts) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("workflow".into(), json!(w.workflow));
    out.extend(cost_sums(&w.totals));
    let steps: Vec<Value> = w
        .steps_by_avg_cost()
        .into_iter()
        .map(|(id, sums)| {
            let mut step = serde_json::Map::new();
            step.insert("step_id".into(), json!(id));
            step.extend(cost_sums(sums));
            Value::Object(step)
        })
        .collect();
    out.insert("steps".into(), Value::Array(steps));
    Value::Object(out)
}
