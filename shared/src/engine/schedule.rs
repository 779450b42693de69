//! What runs next: the pure decision logic of dataflow scheduling, with no async and no I/O.
//!
//! A step becomes a *candidate* the moment its last dependency settles (in-degree
//! counting, so a 10,000-step graph costs O(steps + edges), never waves). A candidate is
//! then *decided*: it runs, or it is skipped because its join cannot be met or a router
//! did not choose it. Skips settle at once, so they cascade through the candidates in
//! the same pass. The engine drives this machine: it asks for decisions, starts what is
//! ready, and settles what finished; everything here is unit-tested without a runtime.

use crate::graph::{StepKind, ValidatedGraph};
use crate::ids::StepId;
use crate::run::{StepRecord, StepStatus};
use crate::workflow::Join;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Run,
    /// Why the step will not run.
    Skip(String),
}

/// Why a step with `enabled: false` is skipped.
pub const SWITCHED_OFF: &str = "switched off (enabled: false)";

/// One run's scheduling state: each step's record once settled, and the queues.
pub struct Schedule {
    graph: Arc<ValidatedGraph>,
    /// Shared, so a step's inputs can hold its dependencies' records without copying them.
    records: Vec<Option<Arc<StepRecord>>>,
    /// Unsettled dependencies per step.
    waiting: Vec<usize>,
    /// Steps whose dependencies have all settled, not yet decided.
    candidates: VecDeque<usize>,
    /// Steps decided to run, not yet started.
    ready: VecDeque<usize>,
}

impl Schedule {
    /// Starts from the records already settled (a resumed run's checkpoints).
    pub fn new(graph: Arc<ValidatedGraph>, records: Vec<Option<StepRecord>>) -> Self {
        let records: Vec<Option<Arc<StepRecord>>> = records.into_iter().map(|r| r.map(Arc::new)).collect();
        let waiting: Vec<usize> = graph.steps().iter().map(|s| s.deps.iter().filter(|&&d| records[d].is_none()).count()).collect();
        let candidates = (0..graph.steps().len()).filter(|&i| records[i].is_none() && waiting[i] == 0).collect();
        Self { graph, records, waiting, candidates, ready: VecDeque::new() }
    }

    /// Decides the next candidate. A step to run is queued for [`Schedule::next_ready`];
    /// a step to skip must be settled by the caller (it checkpoints the skip first).
    pub fn decide_next(&mut self) -> Option<(usize, Decision)> {
        let i = self.candidates.pop_front()?;
        let decision = decide(&self.graph, i, &self.records);
        if decision == Decision::Run {
            self.ready.push_back(i);
        }
        Some((i, decision))
    }

    /// The next step decided to run, in the order decided.
    pub fn next_ready(&mut self) -> Option<usize> {
        self.ready.pop_front()
    }

    /// Records step `i`'s result; dependents whose last dependency this was become candidates.
    pub fn settle(&mut self, i: usize, record: StepRecord) {
        self.records[i] = Some(Arc::new(record));
        for &d in self.graph.dependents(i) {
            self.waiting[d] -= 1;
            if self.waiting[d] == 0 && self.records[d].is_none() {
                self.candidates.push_back(d);
            }
        }
    }

    pub fn records(&self) -> &[Option<Arc<StepRecord>>] {
        &self.records
    }

    pub fn into_records(self) -> Vec<Option<Arc<StepRecord>>> {
        self.records
    }
}

/// Whether a step whose dependencies have all settled runs or is skipped.
fn decide(graph: &ValidatedGraph, i: usize, records: &[Option<Arc<StepRecord>>]) -> Decision {
    let step = &graph.steps()[i];
    // Switched off in the definition: skipped as an unchosen route is, whatever the join.
    if !step.enabled {
        return Decision::Skip(SWITCHED_OFF.into());
    }
    let settled = |d: usize| records[d].as_ref().map(|r| r.status);
    // A router that did not choose this step switches it off, whatever the join.
    for &d in &step.deps {
        if let StepKind::Router(router) = &graph.steps()[d].kind
            && router.targets().any(|t| t == &step.id)
            && settled(d) == Some(StepStatus::Completed)
            && !router_chose(records[d].as_deref(), &step.id)
        {
            return Decision::Skip(format!("not chosen by router {}", graph.steps()[d].id));
        }
    }
    let completed = step.deps.iter().filter(|&&d| settled(d) == Some(StepStatus::Completed)).count();
    match step.join {
        Join::All if completed == step.deps.len() => Decision::Run,
        Join::All => {
            let blocker = step.deps.iter().find_map(|&d| records[d].as_ref().filter(|r| r.status != StepStatus::Completed));
            Decision::Skip(blocker.map(|r| format!("dependency {} is {:?}", r.step_id, r.status).to_lowercase()).unwrap_or_default())
        }
        Join::Any if completed > 0 || step.deps.is_empty() => Decision::Run,
        Join::Any => Decision::Skip("no dependency completed".into()),
    }
}

/// A router's output names the steps it chose (`{"selected": [...]}`).
fn router_chose(record: Option<&StepRecord>, step: &StepId) -> bool {
    record
        .and_then(|r| r.output.as_ref())
        .and_then(|o| o.get("selected"))
        .and_then(Value::as_array)
        .is_some_and(|selected| selected.iter().any(|s| s.as_str() == Some(step.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::ModelRegistry;
    use chrono::Utc;
    use serde_json::json;

    fn graph(steps: Value) -> Arc<ValidatedGraph> {
        let def = json!({ "name": "t", "steps": steps });
        Arc::new(crate::graph::validate_json(&def, &ModelRegistry::builtin()).unwrap())
    }

    fn record(id: &str, status: StepStatus, output: Option<Value>) -> StepRecord {
        let mut r = StepRecord::settled(StepId::parse(id).unwrap(), status, None, Utc::now());
        r.output = output;
        r
    }

    fn t(id: &str, deps: &[&str]) -> Value {
        json!({ "id": id, "type": "transform", "template": "x", "depends_on": deps })
    }

    fn index(g: &ValidatedGraph, id: &str) -> usize {
        g.index_of(id).unwrap()
    }

    /// Decides everything decidable; returns (ran in order, skipped with reasons).
    fn drain(s: &mut Schedule) -> (Vec<usize>, Vec<(usize, String)>) {
        let (mut ran, mut skipped) = (vec![], vec![]);
        while let Some((i, d)) = s.decide_next() {
            match d {
                Decision::Run => {}
                Decision::Skip(reason) => {
                    let id = s.graph.steps()[i].id.to_string();
                    s.settle(i, record(&id, StepStatus::Skipped, None));
                    skipped.push((i, reason));
                }
            }
        }
        while let Some(i) = s.next_ready() {
            ran.push(i);
        }
        (ran, skipped)
    }

    #[test]
    fn independent_steps_are_ready_together_and_a_join_waits_for_its_last_dependency() {
        let g = graph(json!([t("a", &[]), t("b", &[]), t("c", &["a", "b"])]));
        let mut s = Schedule::new(g.clone(), vec![None; 3]);
        let (ran, skipped) = drain(&mut s);
        assert_eq!((ran, skipped.len()), (vec![index(&g, "a"), index(&g, "b")], 0));
        s.settle(index(&g, "a"), record("a", StepStatus::Completed, None));
        assert_eq!(drain(&mut s).0, Vec::<usize>::new(), "c still waits for b");
        s.settle(index(&g, "b"), record("b", StepStatus::Completed, None));
        assert_eq!(drain(&mut s).0, vec![index(&g, "c")]);
    }

    #[test]
    fn a_failed_dependency_skips_its_dependents_transitively() {
        let g = graph(json!([t("a", &[]), t("b", &["a"]), t("c", &["b"])]));
        let mut s = Schedule::new(g.clone(), vec![None; 3]);
        drain(&mut s);
        s.settle(index(&g, "a"), record("a", StepStatus::Failed, None));
        let (ran, skipped) = drain(&mut s);
        assert!(ran.is_empty());
        assert_eq!(skipped, vec![(index(&g, "b"), "dependency a is failed".into()), (index(&g, "c"), "dependency b is skipped".into())]);
    }

    #[test]
    fn join_any_runs_when_one_dependency_completed_and_the_rest_did_not() {
        let mut steps = vec![t("a", &[]), t("b", &[])];
        steps.push(json!({ "id": "c", "type": "transform", "template": "x", "depends_on": ["a", "b"], "join": "any" }));
        let g = graph(json!(steps));
        let mut s = Schedule::new(g.clone(), vec![None; 3]);
        drain(&mut s);
        s.settle(index(&g, "a"), record("a", StepStatus::Failed, None));
        s.settle(index(&g, "b"), record("b", StepStatus::Completed, None));
        assert_eq!(drain(&mut s).0, vec![index(&g, "c")]);

        let mut s = Schedule::new(g.clone(), vec![None; 3]);
        drain(&mut s);
        s.settle(index(&g, "a"), record("a", StepStatus::Failed, None));
        s.settle(index(&g, "b"), record("b", StepStatus::Skipped, None));
        assert_eq!(drain(&mut s).1, vec![(index(&g, "c"), "no dependency completed".into())]);
    }

    #[test]
    fn a_router_switches_off_the_targets_it_did_not_choose_whatever_their_join() {
        let g = graph(json!([
            { "id": "r", "type": "router", "routes": [{ "when": "true", "to": ["yes"] }], "default": ["no"] },
            { "id": "yes", "type": "transform", "template": "x", "depends_on": ["r"] },
            { "id": "no", "type": "transform", "template": "x", "depends_on": ["r"], "join": "any" }
        ]));
        let mut s = Schedule::new(g.clone(), vec![None; 3]);
        assert_eq!(drain(&mut s).0, vec![index(&g, "r")]);
        s.settle(index(&g, "r"), record("r", StepStatus::Completed, Some(json!({ "route": 0, "selected": ["yes"] }))));
        let (ran, skipped) = drain(&mut s);
        assert_eq!(ran, vec![index(&g, "yes")]);
        assert_eq!(skipped, vec![(index(&g, "no"), "not chosen by router r".into())]);
    }

    #[test]
    fn a_switched_off_step_is_skipped_like_an_unchosen_route_and_so_is_what_needs_it() {
        let g = graph(json!([
            { "id": "a", "type": "transform", "template": "x", "enabled": false },
            t("b", &[]),
            t("needs_a", &["a"]),
            { "id": "either", "type": "transform", "template": "x", "depends_on": ["a", "b"], "join": "any" }
        ]));
        let mut s = Schedule::new(g.clone(), vec![None; 4]);
        let (ran, skipped) = drain(&mut s);
        assert_eq!(ran, vec![index(&g, "b")]);
        assert_eq!(skipped, vec![(index(&g, "a"), SWITCHED_OFF.into()), (index(&g, "needs_a"), "dependency a is skipped".into())]);
        s.settle(index(&g, "b"), record("b", StepStatus::Completed, None));
        assert_eq!(drain(&mut s).0, vec![index(&g, "either")], "join any runs on what did complete");
    }

    #[test]
    fn a_resumed_run_decides_only_what_its_checkpoints_leave_open() {
        let g = graph(json!([t("a", &[]), t("b", &["a"]), t("c", &[])]));
        let mut records = vec![None; 3];
        records[index(&g, "a")] = Some(record("a", StepStatus::Completed, None));
        let mut s = Schedule::new(g.clone(), records);
        let mut ran = drain(&mut s).0;
        ran.sort_unstable();
        let mut want = vec![index(&g, "b"), index(&g, "c")];
        want.sort_unstable();
        assert_eq!(ran, want, "a is never decided again");
    }
}
