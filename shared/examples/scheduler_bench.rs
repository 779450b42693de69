//! Scheduler benchmark (`make bench`).
//!
//! (a) Seeded random DAGs of 20 to 200 steps with scripted per-step latencies, run once by
//!     chainrun's engine (dataflow: a step starts when its last dependency settles) and once
//!     by a wave scheduler written here (all steps of a level start together; the next level
//!     starts when the slowest of the level ends). Both call the same in-process model with
//!     the same latencies, in real time. Each reports makespan / critical path.
//! (b) Engine overhead per step: a 10,000-step DAG against a model that answers at once,
//!     through the whole engine (scheduling, template rendering, output parsing, costing,
//!     checkpoints and events in the in-memory adapters), divided by the number of steps.
//!     Validating the definition is a separate, once-per-invocation cost: it is printed on
//!     its own line and is not part of `overhead_us_per_step`. Part (a)'s makespans
//!     include it.
//!
//! The last line is: `scheduler: dataflow/critical=X waves/critical=Y overhead_us_per_step=Z`.

use async_trait::async_trait;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::graph::Limits;
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryProgress, MemoryStore};
use chainrun_core::ports::{Claim, Lease, ModelClient, ModelError, ModelErrorKind, ModelReply, ModelRequest, RunStore};
use chainrun_core::pricing::{ModelRegistry, Usage};
use chainrun_core::run::{RunRecord, RunStatus};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A model whose latency per step is scripted: the prompt is `S<index>`.
struct LatencyModel {
    latencies: Vec<Duration>,
}

impl LatencyModel {
    fn latency(&self, prompt: &str) -> Result<Duration, ModelError> {
        prompt
            .strip_prefix('S')
            .and_then(|n| n.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|i| self.latencies.get(i).copied())
            .ok_or_else(|| ModelError::new(ModelErrorKind::Invalid, "Bench", format!("unexpected prompt {prompt:?}")))
    }
}

#[async_trait]
impl ModelClient for LatencyModel {
    async fn converse(&self, request: &ModelRequest) -> Result<ModelReply, ModelError> {
        let latency = self.latency(&request.prompt)?;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        Ok(ModelReply {
            text: "ok".into(),
            usage: Usage { input_tokens: 10, output_tokens: 2, ..Usage::default() },
            stop_reason: "end_turn".into(),
            service_tier: None,
        })
    }

    async fn converse_stream(&self, request: &ModelRequest, _deltas: mpsc::Sender<String>) -> Result<ModelReply, ModelError> {
        self.converse(request).await
    }
}

struct Dag {
    deps: Vec<Vec<usize>>,
    latencies: Vec<Duration>,
}

/// Each step depends on 1–3 of the 12 steps before it (the first three are roots), so the
/// graphs are deep enough for scheduling to matter and narrow enough that the engine's
/// concurrency limit never binds.
fn random_dag(seed: u64, n: usize, latency_ms: std::ops::RangeInclusive<u64>) -> Dag {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut deps = Vec::with_capacity(n);
    for i in 0..n {
        let mut d: Vec<usize> = Vec::new();
        if i >= 3 {
            let window = i.saturating_sub(12)..i;
            for _ in 0..rng.random_range(1..=3) {
                let pick = rng.random_range(window.clone());
                if !d.contains(&pick) {
                    d.push(pick);
                }
            }
        }
        deps.push(d);
    }
    let latencies = (0..n).map(|_| Duration::from_millis(rng.random_range(latency_ms.clone()))).collect();
    Dag { deps, latencies }
}

fn critical_path(dag: &Dag) -> Duration {
    let mut finish = vec![Duration::ZERO; dag.deps.len()];
    for i in 0..dag.deps.len() {
        let start = dag.deps[i].iter().map(|&d| finish[d]).max().unwrap_or_default();
        finish[i] = start + dag.latencies[i];
    }
    finish.into_iter().max().unwrap_or_default()
}

fn definition(dag: &Dag) -> Value {
    let steps: Vec<Value> = dag
        .deps
        .iter()
        .enumerate()
        .map(|(i, deps)| {
            // Dependencies come from what the prompt reads, as in real workflows, so template
            // parsing and rendering are part of what is measured.
            let reads: Vec<String> = deps.iter().map(|d| format!("{{{{ steps.s{d}.text }}}}")).collect();
            json!({ "id": format!("s{i}"), "type": "llm", "prompt": format!("S{i} {}", reads.join(" ")), "max_tokens": 16 })
        })
        .collect();
    json!({ "name": "bench", "defaults": { "model": "amazon.nova-micro-v1:0" }, "max_concurrency": 100, "steps": steps })
}

/// What one engine run cost, in wall time.
struct Timing {
    /// Parsing and validating the run's definition snapshot (once per runner invocation).
    validation: Duration,
    /// Scheduling and executing every step: templates, model calls, checkpoints, events.
    execution: Duration,
}

/// Runs the DAG through the engine: validation of the snapshot, then execution, each timed.
async fn run_engine(dag: &Dag) -> Timing {
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let model = Arc::new(LatencyModel { latencies: dag.latencies.clone() });
    let limits = Limits { max_steps: 20_000 };
    let registry = Arc::new(ModelRegistry::builtin());
    let engine = Engine::new(model, store.clone(), progress, registry.clone(), EngineConfig { limits, ..EngineConfig::default() });
    let run = RunRecord::new(
        "bench".parse().expect("a valid name"),
        definition(dag),
        json!({}),
        "bench".parse().expect("a valid user id"),
        vec![Principal::User("bench".into())],
        chrono::Utc::now(),
    );
    store.create_run(&run).await.expect("create");
    let lease = Lease { holder: "bench".into(), expires_at: chrono::Utc::now() + chrono::Duration::hours(1) };
    let Ok(Claim::Acquired(run)) = store.claim(&run.id, &lease, chrono::Utc::now()).await else { panic!("claim") };
    let started = Instant::now();
    let graph = Arc::new(chainrun_core::graph::validate_json_with(&run.definition, &registry, limits).expect("valid"));
    let validation = started.elapsed();
    let started = Instant::now();
    let outcome = engine.execute_validated(*run, graph, lease, None).await.expect("engine");
    let execution = started.elapsed();
    assert_eq!(outcome, chainrun_core::engine::Outcome::Finished(RunStatus::Completed));
    Timing { validation, execution }
}

/// The comparison: a superstep scheduler. Levels are longest-path depths; a level starts
/// when every step of the previous level has finished.
async fn run_waves(dag: &Dag) -> Duration {
    let model = Arc::new(LatencyModel { latencies: dag.latencies.clone() });
    let mut level = vec![0usize; dag.deps.len()];
    for i in 0..dag.deps.len() {
        level[i] = dag.deps[i].iter().map(|&d| level[d] + 1).max().unwrap_or(0);
    }
    let levels = level.iter().max().map_or(0, |m| m + 1);
    let started = Instant::now();
    for l in 0..levels {
        let mut wave = tokio::task::JoinSet::new();
        for i in (0..dag.deps.len()).filter(|&i| level[i] == l) {
            let model = model.clone();
            wave.spawn(async move {
                let request = ModelRequest {
                    model: "m".parse().expect("a model id"),
                    system: None,
                    prompt: format!("S{i}"),
                    temperature: None,
                    max_tokens: 16,
                    stop_sequences: vec![],
                    cache_points: Default::default(),
                    service_tier: Default::default(),
                    metadata: Default::default(),
                    output_schema: None,
                };
                model.converse(&request).await.expect("model")
            });
        }
        while wave.join_next().await.is_some() {}
    }
    started.elapsed()
}

// The runner's runtime flavour (see functions/runner/src/main.rs).
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let sizes: Vec<usize> = if std::env::var_os("BENCH_SKIP_DAGS").is_some() { vec![20] } else { vec![20, 45, 70, 95, 120, 145, 170, 200] };
    let (mut dataflow, mut waves) = (Vec::new(), Vec::new());
    println!("(a) random DAGs, latencies 40-200 ms per step, real time");
    println!("{:>5} {:>6} {:>10} {:>10} {:>10} {:>9} {:>9}", "seed", "steps", "critical", "dataflow", "waves", "df/crit", "wv/crit");
    for (seed, &n) in sizes.iter().enumerate() {
        let dag = random_dag(seed as u64 + 1, n, 40..=200);
        let critical = critical_path(&dag);
        // Makespan: what a user waits for, validation included.
        let df = run_engine(&dag).await;
        let df = df.validation + df.execution;
        let wv = run_waves(&dag).await;
        let (x, y) = (df.as_secs_f64() / critical.as_secs_f64(), wv.as_secs_f64() / critical.as_secs_f64());
        println!("{:>5} {:>6} {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>9.3} {:>9.3}", seed + 1, n, ms(critical), ms(df), ms(wv), x, y);
        dataflow.push(x);
        waves.push(y);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;

    println!("(b) engine overhead: 10,000-step DAG, zero-latency model");
    run_engine(&random_dag(98, 500, 0..=0)).await; // warm-up: allocator, lazy statics
    let big = random_dag(99, 10_000, 0..=0);
    let timing = run_engine(&big).await;
    let per_step = |d: Duration| d.as_secs_f64() * 1e6 / 10_000.0;
    println!("  validation (once per invocation): {:.0} ms = {:.1} us/step", ms(timing.validation), per_step(timing.validation));
    println!("  execution (scheduling, templates, checkpoints, events): {:.0} ms = {:.1} us/step", ms(timing.execution), per_step(timing.execution));
    println!(
        "scheduler: dataflow/critical={:.3} waves/critical={:.3} overhead_us_per_step={:.1}",
        mean(&dataflow),
        mean(&waves),
        per_step(timing.execution)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
