//! What the cost levers save (`make bench`): the same workflow run through the engine
//! with each lever and without, on usage reported the way Bedrock reports it (the scripted
//! model writes a marked prefix to its prompt cache on the first call and reads it on the
//! later ones). Prices come from the registry; every figure is exact.
//!
//! - caching: a 50-item map under a ~6,000-token system prompt on Claude Haiku 4.5
//!   (`global.`), once with `cache` left to `auto` and once with `cache: "off"`;
//! - flex: the same map's items on gpt-oss-120b in the `flex` tier and in `default`;
//! - batch: a 200-item map of short, distinct prompts on Claude Haiku 4.5 (nothing for a
//!   prompt cache to share) with `mode: "batch"` and online, through the in-memory batch
//!   service (the run waits for its job and is taken up again, as on Lambda).
//!
//! The last line is: `levers: cache_saving_pct=X batch_saving_pct=Y flex_saving_pct=Z`.

use chainrun_core::engine::Outcome;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryBatch, MemoryProgress, MemoryStore, Script, ScriptedModel};
use chainrun_core::money::Usd;
use chainrun_core::ports::{Claim, Lease, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{RunRecord, RunStatus};
use serde_json::{Value, json};
use std::sync::Arc;

const ITEMS: usize = 50;

fn map(model: &str, step_extra: Value) -> Value {
    let mut step = json!({
        "type": "llm",
        "system": "Rule: answer in one short line, cite the ticket, never promise refunds. ".repeat(340),
        "prompt": "Ticket: {{ item }}",
    });
    if let (Some(step), Some(extra)) = (step.as_object_mut(), step_extra.as_object()) {
        step.extend(extra.clone());
    }
    json!({
        "name": "levers",
        "defaults": { "model": model, "max_tokens": 50 },
        "steps": [{ "id": "answers", "type": "map", "over": "input.tickets", "max_concurrency": 4, "step": step }]
    })
}

/// The cost of one run of `definition` over 50 tickets.
fn cost(runtime: &tokio::runtime::Runtime, definition: Value) -> Usd {
    cost_of(runtime, definition, ITEMS)
}

/// The cost of one run of `definition` over `items` tickets, invoked until it ends (a batch
/// map's run waits for its job in between).
fn cost_of(runtime: &tokio::runtime::Runtime, definition: Value, items: usize) -> Usd {
    let tickets: Vec<String> = (0..items).map(|i| format!("ticket {i}: my order is late")).collect();
    runtime.block_on(async {
        let model = Arc::new(ScriptedModel::new(vec![Script::reply("", "Sorry for the delay; it ships today (ticket noted).")]));
        let store = Arc::new(MemoryStore::new());
        let batch = Arc::new(MemoryBatch::new(model.clone(), 1, 100));
        let engine = Engine::new(model, store.clone(), Arc::new(MemoryProgress::new()), Arc::new(ModelRegistry::builtin()), EngineConfig::default())
            .with_batch(batch, std::time::Duration::from_millis(1), 24);
        let run = RunRecord::new(
            "levers".parse().expect("a name"),
            definition,
            json!({ "tickets": tickets }),
            "bench".parse().expect("a user id"),
            vec![Principal::User("bench".into())],
            chrono::Utc::now(),
        );
        store.create_run(&run).await.expect("create");
        for n in 0.. {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let lease = Lease { holder: format!("bench-{n}"), expires_at: chrono::Utc::now() + chrono::Duration::hours(1) };
            let Ok(Claim::Acquired(claimed)) = store.claim(&run.id, &lease, chrono::Utc::now()).await else { panic!("claim") };
            if let Outcome::Finished(_) = engine.execute(*claimed, lease, None).await.expect("run") {
                break;
            }
        }
        let done = store.get_run(&run.id).await.expect("read").expect("stored");
        assert_eq!(done.status, RunStatus::Completed, "{:?}", done.error);
        done.totals.cost
    })
}

/// `100 × (1 − with / without)`, to one decimal.
fn saving_pct(with: Usd, without: Usd) -> String {
    let tenths = 1000 - u128::from(with.pico()) * 1000 / u128::from(without.pico().max(1));
    format!("{}.{}", tenths / 10, tenths % 10)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let haiku = "global.anthropic.claude-haiku-4-5-20251001-v1:0";
    let cached = cost(&runtime, map(haiku, json!({})));
    let plain = cost(&runtime, map(haiku, json!({ "cache": "off" })));
    println!("caching: {ITEMS}-item map, Haiku 4.5, ~6,000-token shared system prompt: ${cached} cached vs ${plain} without");
    let gpt = "openai.gpt-oss-120b-1:0";
    let flex = cost(&runtime, map(gpt, json!({ "service_tier": "flex" })));
    let standard = cost(&runtime, map(gpt, json!({})));
    println!("flex: the same map on gpt-oss-120b: ${flex} in the flex tier vs ${standard} in default");
    let short = |mode: &str| {
        json!({ "name": "levers", "defaults": { "model": haiku, "max_tokens": 50 },
                "steps": [{ "id": "answers", "type": "map", "over": "input.tickets", "max_concurrency": 8, "mode": mode,
                            "step": { "type": "llm", "prompt": "Answer this ticket in one line: {{ item }}" } }] })
    };
    let batched = cost_of(&runtime, short("batch"), 200);
    let online = cost_of(&runtime, short("online"), 200);
    println!("batch: a 200-item map of short prompts on Haiku 4.5: ${batched} as one batch job vs ${online} online");
    println!(
        "levers: cache_saving_pct={} batch_saving_pct={} flex_saving_pct={}",
        saving_pct(cached, plain),
        saving_pct(batched, online),
        saving_pct(flex, standard)
    );
}
