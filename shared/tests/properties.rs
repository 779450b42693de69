//! Property tests: the engine on random valid graphs, and validation on random bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::graph::validate_json;
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryProgress, MemoryStore, Script, ScriptedModel};
use chainrun_core::ports::{Claim, Lease, ModelError, ModelErrorKind, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{EventType, RunRecord, RunStatus, StepStatus};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

mod support;
use support::{pick_deps, routed_targets, router_json, wire};

#[derive(Debug, Clone)]
enum Kind {
    Llm {
        fails: bool,
        latency_ms: u64,
    },
    Transform,
    /// Routes to a subset of later steps (which then depend on it).
    Router {
        choose_first: bool,
    },
}

#[derive(Debug, Clone)]
struct GenStep {
    kind: Kind,
    deps: Vec<usize>,
    required: bool,
    join_any: bool,
}

fn arb_graph() -> impl Strategy<Value = Vec<GenStep>> {
    (1usize..30).prop_flat_map(|n| {
        proptest::collection::vec(
            (
                prop_oneof![
                    6 => (any::<bool>(), 0u64..50).prop_map(|(f, l)| Kind::Llm { fails: f && l % 3 == 0, latency_ms: l }),
                    2 => Just(Kind::Transform),
                    1 => any::<bool>().prop_map(|c| Kind::Router { choose_first: c }),
                ],
                proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
                prop::bool::weighted(0.8),
                prop::bool::weighted(0.2),
            ),
            n,
        )
        .prop_map(|raw| {
            raw.into_iter()
                .enumerate()
                .map(|(i, (kind, picks, required, join_any))| {
                    let deps = pick_deps(i, &picks);
                    GenStep { kind, deps, required, join_any }
                })
                .collect()
        })
    })
}

/// Builds the JSON definition; each router routes to the later steps that depend on it.
fn definition(steps: &[GenStep]) -> Value {
    let deps: Vec<Vec<usize>> = steps.iter().map(|s| s.deps.clone()).collect();
    let routed = routed_targets(&deps, |d| matches!(steps[d].kind, Kind::Router { .. }));
    let json_steps: Vec<Value> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let step = match &s.kind {
                Kind::Llm { .. } => json!({ "type": "llm", "prompt": format!("P{i}.") }),
                Kind::Transform => json!({ "type": "transform", "expression": format!("{i} + 1") }),
                Kind::Router { choose_first } => router_json(routed.get(&i).map_or(&[][..], Vec::as_slice), *choose_first),
            };
            wire(step, i, &s.deps, s.required, s.join_any)
        })
        .collect();
    json!({ "name": "prop", "defaults": { "model": "amazon.nova-micro-v1:0", "retry": { "max_attempts": 2, "initial_backoff_ms": 10 } }, "max_concurrency": 4, "steps": json_steps })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_valid_graphs_settle_every_step_exactly_once(steps in arb_graph()) {
        let def = definition(&steps);
        validate_json(&def, &ModelRegistry::builtin()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let scripts: Vec<Script> = steps.iter().enumerate().filter_map(|(i, s)| match s.kind {
            Kind::Llm { fails: true, .. } => Some(Script::failing_first(&format!("P{i}."), ModelError::new(ModelErrorKind::Invalid, "ValidationException", "no"), 99, "x")),
            Kind::Llm { latency_ms, .. } => Some(Script::reply(&format!("P{i}."), "ok").with_latency(Duration::from_millis(latency_ms))),
            _ => None,
        }).collect();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        let (run, records, events) = runtime.block_on(async {
            let store = Arc::new(MemoryStore::new());
            let progress = Arc::new(MemoryProgress::new());
            let engine = Engine::new(Arc::new(ScriptedModel::new(scripts)), store.clone(), progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
            let run = RunRecord::new("prop".parse().unwrap(), def, json!({}), "u".parse().unwrap(), vec![Principal::User("u".into())], chrono::Utc::now());
            store.create_run(&run).await.unwrap();
            let lease = Lease { holder: "r".into(), expires_at: chrono::Utc::now() + chrono::Duration::hours(1) };
            let Claim::Acquired(claimed) = store.claim(&run.id, &lease, chrono::Utc::now()).await.unwrap() else { panic!() };
            engine.execute(*claimed, lease, None).await.unwrap();
            (store.get_run(&run.id).await.unwrap().unwrap(), store.get_steps(&run.id).await.unwrap(), progress.events(&run.id))
        });

        // Every step has exactly one settled checkpoint, and at most one terminal event.
        prop_assert_eq!(records.len(), steps.len());
        prop_assert!(records.iter().all(|r| r.status.is_settled()), "{:?}", records);
        let mut terminal: BTreeMap<String, usize> = BTreeMap::new();
        for e in &events {
            if matches!(e.kind, EventType::StepCompleted | EventType::StepFailed | EventType::StepSkipped) {
                *terminal.entry(e.step_id.as_ref().unwrap().to_string()).or_default() += 1;
            }
        }
        prop_assert!(terminal.values().all(|&n| n == 1), "{:?}", terminal);
        // seq is gap-free and the log ends with the run's outcome.
        for (i, e) in events.iter().enumerate() {
            prop_assert_eq!(e.seq, i as u64 + 1);
        }
        let status = |i: usize| records.iter().find(|r| r.step_id.as_str() == format!("s{i}")).unwrap().status;
        let required_failed = (0..steps.len()).any(|i| steps[i].required && status(i) == StepStatus::Failed);
        prop_assert_eq!(run.status, if required_failed { RunStatus::Failed } else { RunStatus::Completed });
        prop_assert_eq!(events.last().unwrap().kind, if required_failed { EventType::RunFailed } else { EventType::RunCompleted });
        // Steps are cancelled only when the run failed; a completed step had its dependencies met.
        for (i, s) in steps.iter().enumerate() {
            if status(i) == StepStatus::Cancelled {
                prop_assert!(required_failed);
            }
            if status(i) == StepStatus::Completed && !s.deps.is_empty() {
                let done = s.deps.iter().filter(|&&d| status(d) == StepStatus::Completed).count();
                prop_assert!(if s.join_any { done >= 1 } else { done == s.deps.len() }, "s{} ran with deps {:?}", i, s.deps);
            }
        }
    }

    #[test]
    fn arbitrary_json_never_panics_validation(value in arb_json()) {
        let _ = validate_json(&value, &ModelRegistry::builtin());
        let _ = validate_json(&json!({ "name": "x", "steps": [value] }), &ModelRegistry::builtin());
    }

    #[test]
    fn broken_definitions_are_always_rejected(mutation in 0usize..9, noise in "[ -~]{0,40}") {
        let mut def = json!({ "name": "ok", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": [
            { "id": "a", "type": "llm", "prompt": "{{ input.x }}" },
            { "id": "b", "type": "transform", "expression": "steps.a.text + '!'" },
            { "id": "r", "type": "router", "routes": [{ "when": "true", "to": ["c"] }] },
            { "id": "c", "type": "llm", "depends_on": ["r"], "prompt": "{{ steps.b.output }}" }
        ]});
        match mutation {
            0 => def["steps"][0]["prompt"] = json!(format!("{{{{ {noise}")),
            1 => def["steps"][1]["expression"] = json!(format!("steps.a.text + {noise} (")),
            2 => def["steps"][0]["depends_on"] = json!(["c"]),
            3 => def["steps"][3]["id"] = json!("a"),
            4 => def["steps"][2]["routes"][0]["to"] = json!(["b"]),
            5 => def["steps"][0]["type"] = json!(format!("x{noise}")),
            6 => def["steps"][3]["model"] = json!(format!("nope.{noise}")),
            7 => def["steps"][1]["unexpected"] = json!(noise),
            _ => def["steps"][3]["prompt"] = json!(format!("{{{{ steps.zz{} }}}}", noise.len())),
        }
        prop_assert!(validate_json(&def, &ModelRegistry::builtin()).is_err(), "mutation {} accepted: {}", mutation, def);
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[ -~]{0,20}".prop_map(Value::String),
        prop::sample::select(vec!["llm", "map", "router", "transform", "{{", "{%", "steps.a", "(((", "id", "type"]).prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop::sample::select(vec![
                    "name",
                    "steps",
                    "id",
                    "type",
                    "prompt",
                    "over",
                    "step",
                    "routes",
                    "when",
                    "to",
                    "expression",
                    "template",
                    "depends_on",
                    "join",
                    "x"
                ])
                .prop_map(str::to_owned),
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
