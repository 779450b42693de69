//! Test support shared by the engine, budget and property tests: an engine over the
//! in-memory ports, and the wiring of randomly generated graphs into definitions.
#![allow(dead_code)] // each test crate uses its own subset

use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::memory::{MemoryProgress, MemoryStore, Script, ScriptedModel};
use chainrun_core::ports::Lease;
use chainrun_core::pricing::ModelRegistry;
use chrono::Utc;
use proptest::sample::Index;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// An engine over in-memory ports with a scripted model, and handles to inspect them.
pub struct Harness {
    pub model: Arc<ScriptedModel>,
    pub store: Arc<MemoryStore>,
    pub progress: Arc<MemoryProgress>,
    pub engine: Engine,
}

pub fn harness_with(scripts: Vec<Script>, registry: Arc<ModelRegistry>, config: EngineConfig) -> Harness {
    let model = Arc::new(ScriptedModel::new(scripts));
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let engine = Engine::new(model.clone(), store.clone(), progress.clone(), registry, config);
    Harness { model, store, progress, engine }
}

pub fn lease(holder: &str) -> Lease {
    Lease { holder: holder.into(), expires_at: Utc::now() + chrono::Duration::minutes(15) }
}

/// Step `i`'s dependencies: earlier steps picked by `picks`, so the graph is acyclic.
pub fn pick_deps(i: usize, picks: &[Index]) -> Vec<usize> {
    let mut deps: Vec<usize> = if i == 0 { vec![] } else { picks.iter().map(|p| p.index(i)).collect() };
    deps.sort_unstable();
    deps.dedup();
    deps
}

/// For each router, the ids of the later steps that depend on it (the only steps it may
/// route to).
pub fn routed_targets(deps: &[Vec<usize>], is_router: impl Fn(usize) -> bool) -> BTreeMap<usize, Vec<String>> {
    let mut routed: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds.iter().filter(|&&d| is_router(d)) {
            routed.entry(d).or_default().push(format!("s{i}"));
        }
    }
    routed
}

/// A router whose one route (to the first target) is taken when `choose_first`, the
/// default going to the rest.
pub fn router_json(targets: &[String], choose_first: bool) -> Value {
    let (first, rest) = targets.split_at(targets.len().min(1));
    json!({ "type": "router", "routes": [{ "when": choose_first.to_string(), "to": first }], "default": rest })
}

/// Gives a generated step its id `s<i>` and its wiring.
pub fn wire(mut step: Value, i: usize, deps: &[usize], required: bool, join_any: bool) -> Value {
    step["id"] = json!(format!("s{i}"));
    step["depends_on"] = json!(deps.iter().map(|d| format!("s{d}")).collect::<Vec<_>>());
    step["required"] = json!(required);
    step["join"] = json!(if join_any { "any" } else { "all" });
    step
}
