//! What the runner prints for operators, read back as CloudWatch would: the real JSON log
//! subscriber and the EMF observer write into one captured stdout while a workflow runs
//! through the runner against in-memory ports, in paused time, inside the invocation span
//! the runner's `main` opens. Every line is JSON and carries the run; lines printed inside
//! a step carry it; the metric lines hold exactly the numbers the run's checkpoints and
//! events hold.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::durability::Durability;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::ids::{Principal, RunId};
use chainrun_core::memory::{MemoryAnalytics, MemoryDispatcher, MemoryProgress, MemoryStore, PausedClock, Script, ScriptedModel};
use chainrun_core::ports::{ModelError, ModelErrorKind, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{Cause, EventType, RunRecord, RunStatus, RunnerEvent, StepStatus};
use chainrun_core::telemetry::capture::Capture;
use chainrun_core::telemetry::catalog::Metric;
use chainrun_core::telemetry::logs::{self, LogConfig, LogFormat};
use chainrun_core::telemetry::metrics::Emf;
use chainrun_core::telemetry::spans;
use chainrun_runner::{Handled, Runner};
use chrono::Utc;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

const LEASE: Duration = Duration::from_secs(30);

struct Setup {
    runner: Arc<Runner>,
    store: Arc<MemoryStore>,
    progress: Arc<MemoryProgress>,
    stdout: Capture,
    /// Installed for the test's thread (and the tasks of its current-thread runtime).
    _logs: tracing::subscriber::DefaultGuard,
}

fn setup(scripts: Vec<Script>) -> Setup {
    let stdout = Capture::default();
    // Debug, so the lines a deployment filters out are checked too.
    let config = LogConfig { format: LogFormat::Json, filter: "debug".into() };
    let _logs = tracing::subscriber::set_default(logs::subscriber(&config, stdout.clone()));
    let model = Arc::new(ScriptedModel::new(scripts));
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let engine = Engine::new(model, store.clone(), progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default())
        .with_observer(Arc::new(Emf::new(stdout.clone())));
    let runner = Arc::new(Runner {
        store: store.clone(),
        engine,
        dispatcher: Arc::new(MemoryDispatcher::new()),
        analytics: Arc::new(MemoryAnalytics::new()),
        durability: Durability::with_lease(LEASE),
        clock: Arc::new(PausedClock::default()),
    });
    Setup { runner, store, progress, stdout, _logs }
}

async fn queue(s: &Setup, definition: Value) -> RunRecord {
    let graph = chainrun_core::graph::validate_json(&definition, &ModelRegistry::builtin()).unwrap();
    let mut run =
        RunRecord::new(graph.name().clone(), definition, json!({}), "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
    run.step_order = graph.step_order();
    s.store.create_run(&run).await.unwrap();
    run
}

/// A delivery as the runner's `main` makes it: inside the invocation's span.
fn deliver(s: &Setup, run: &RunId, invocation: &'static str, cause: Cause) -> tokio::task::JoinHandle<Handled> {
    let (runner, run) = (s.runner.clone(), run.clone());
    let deadline = Utc::now() + chrono::Duration::minutes(15);
    let span = spans::invocation(&run, cause);
    tokio::spawn(
        async move { runner.handle(RunnerEvent::new(run, cause), invocation, deadline, Duration::from_secs(90)).await.unwrap() }.instrument(span),
    )
}

/// Every line printed so far, each parsed (a line that is not JSON fails the test).
fn lines(s: &Setup) -> Vec<Value> {
    s.stdout.lines().iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a line that is not JSON ({e}): {l}"))).collect()
}

fn metric_docs(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l.get("_aws").is_some()).collect()
}

/// The metric documents publishing `metric`.
fn publishing(lines: &[Value], metric: Metric) -> Vec<&Value> {
    metric_docs(lines)
        .into_iter()
        .filter(|d| {
            d["_aws"]["CloudWatchMetrics"]
                .as_array()
                .unwrap()
                .iter()
                .any(|directive| directive["Metrics"].as_array().unwrap().iter().any(|m| m["Name"] == metric.name()))
        })
        .collect()
}

fn number(doc: &Value, metric: Metric) -> u64 {
    doc[metric.name()].as_u64().unwrap_or_else(|| panic!("no {} in {doc}", metric.name()))
}

#[tokio::test(start_paused = true)]
async fn every_line_a_run_prints_is_json_carrying_the_run_and_inside_a_step_the_step_and_its_attempt() {
    let s = setup(vec![
        Script::failing_first(
            "EXTRACT",
            ModelError::new(ModelErrorKind::Throttled, "ThrottlingException", "slow down"),
            1,
            r#"{"issues": ["a", "b"]}"#,
        )
        .with_usage(120, 30),
        Script::reply("FIX", "fixed").with_usage(40, 8).with_latency(Duration::from_millis(700)),
    ]);
    let run = queue(
        &s,
        json!({
            "name": "triage", "defaults": { "model": "amazon.nova-micro-v1:0", "retry": { "max_attempts": 3, "initial_backoff_ms": 10 } },
            "steps": [
                { "id": "extract", "type": "llm", "prompt": "EXTRACT", "output": { "format": "json" } },
                { "id": "fixes", "type": "map", "over": "steps.extract.output.issues", "max_concurrency": 2, "step": { "type": "llm", "prompt": "FIX {{ item }}" } },
                { "id": "report", "type": "transform", "template": "{{ steps.fixes.output }}" }
            ]
        }),
    )
    .await;
    assert_eq!(deliver(&s, &run.id, "inv-1", Cause::Start).await.unwrap(), Handled::Finished(RunStatus::Completed));

    let lines = lines(&s);
    let logs: Vec<&Value> = lines.iter().filter(|l| l.get("_aws").is_none()).collect();
    assert!(logs.len() > 10, "{} log lines", logs.len());
    for line in &logs {
        assert_eq!(line["run_id"].as_str(), Some(run.id.as_str()), "a line without its run: {line}");
        assert!(line["level"].is_string() && line["timestamp"].is_string() && line["spans"].is_array(), "{line}");
        let spans: Vec<&str> = line["spans"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
        if spans.contains(&"run") {
            assert_eq!((line["workflow"].as_str(), line["revision"].as_u64()), (Some("triage"), Some(0)), "{line}");
        }
        if spans.contains(&"step") {
            assert!(line["step_id"].is_string(), "a line inside a step without it: {line}");
        }
    }
    // Each model call's lines carry their attempt: the retried extraction's second one, each
    // map item its own.
    let calls: Vec<&&Value> = logs.iter().filter(|l| l["message"] == "model call finished").collect();
    assert_eq!(calls.len(), 3);
    let extract = calls.iter().find(|l| l["step_id"] == "extract").unwrap();
    assert_eq!(extract["attempt"], 2, "{extract}");
    let retried = logs.iter().find(|l| l["message"] == "attempt failed; retrying").unwrap();
    assert_eq!((retried["step_id"].as_str(), retried["attempt"].as_u64()), (Some("extract"), Some(1)), "{retried}");
    let mut items: Vec<u64> = calls.iter().filter(|l| l["step_id"] == "fixes").map(|l| l["item"].as_u64().unwrap()).collect();
    items.sort();
    assert_eq!(items, [0, 1], "each map item's call carries its index");
    assert!(calls.iter().all(|l| l["attempt"].as_u64().is_some()), "{calls:?}");
    // A line that names no attempt itself gets it from the step's span.
    let announced = logs.iter().find(|l| l["message"] == "event published" && l["event"] == "StepCompleted" && l["step_id"] == "extract").unwrap();
    assert_eq!(announced["attempt"], 2, "{announced}");
    for line in logs.iter().filter(|l| l["spans"].as_array().unwrap().contains(&json!("item"))) {
        assert!(line["item"].is_u64() && line["attempt"].is_u64() && line["step_id"] == "fixes", "{line}");
    }

    // One metric document per settled step, holding its checkpoint's numbers.
    let steps = s.store.get_steps(&run.id).await.unwrap();
    let step_docs = publishing(&lines, Metric::StepLatency);
    assert_eq!(step_docs.len(), steps.len());
    for record in &steps {
        let doc = step_docs.iter().find(|d| d["Step"] == record.step_id.as_str()).unwrap_or_else(|| panic!("no metrics for {}", record.step_id));
        let published = [Metric::StepLatency, Metric::StepInputTokens, Metric::StepOutputTokens, Metric::StepCostPicoUsd, Metric::StepAttempts]
            .map(|m| number(doc, m));
        let checkpointed = [record.latency_ms, record.usage.input_tokens, record.usage.output_tokens, record.cost.pico(), u64::from(record.attempts)];
        assert_eq!(published, checkpointed, "{}", record.step_id);
        assert_eq!((doc["Workflow"].as_str(), doc["run_id"].as_str()), (Some("triage"), Some(run.id.as_str())));
        assert_eq!(number(doc, Metric::StepFailures), u64::from(record.status == StepStatus::Failed));
    }
    let fixes = steps.iter().find(|r| r.step_id.as_str() == "fixes").unwrap();
    assert_eq!((fixes.usage.input_tokens, fixes.latency_ms), (80, 700), "the map's two items, at once");
    assert_eq!(steps.iter().find(|r| r.step_id.as_str() == "extract").unwrap().attempts, 2);

    // One for the run's end: its stored totals, its status, and its latency to the end event.
    let ended = s.store.get_run(&run.id).await.unwrap().unwrap();
    let [end] = publishing(&lines, Metric::Runs)[..] else { panic!("not one run document") };
    let totals = [Metric::RunInputTokens, Metric::RunOutputTokens, Metric::RunCostPicoUsd, Metric::RunModelCalls].map(|m| number(end, m));
    assert_eq!(totals, [ended.totals.input_tokens, ended.totals.output_tokens, ended.totals.cost.pico(), ended.totals.model_calls]);
    assert_eq!(totals[..2], [200, 46], "what the model reported");
    assert_eq!((number(end, Metric::Runs), number(end, Metric::RunSteps), number(end, Metric::RunTakeovers)), (1, 3, 0));
    assert_eq!(end["Status"], "COMPLETED");
    let completed = s.progress.events(&run.id).into_iter().find(|e| e.kind == EventType::RunCompleted).unwrap();
    assert_eq!(number(end, Metric::RunLatency), (completed.at - run.created_at).num_milliseconds() as u64);
    assert_eq!(end["_aws"]["Timestamp"], completed.at.timestamp_millis());
}

#[tokio::test(start_paused = true)]
async fn a_call_the_budget_refuses_is_counted_with_its_step_and_limit() {
    let s = setup(vec![Script::reply("FIRST", "one").with_usage(40, 400)]);
    let run = queue(
        &s,
        json!({
            "name": "tight", "defaults": { "model": "amazon.nova-micro-v1:0", "max_tokens": 400 },
            "budget": { "max_total_tokens": 600 },
            "steps": [{ "id": "first", "type": "llm", "prompt": "FIRST" }, { "id": "second", "type": "llm", "prompt": "SECOND {{ steps.first.text }}" }]
        }),
    )
    .await;
    assert_eq!(deliver(&s, &run.id, "inv-1", Cause::Start).await.unwrap(), Handled::Finished(RunStatus::Failed));

    let lines = lines(&s);
    let [refusal] = publishing(&lines, Metric::BudgetRefusals)[..] else { panic!("not one refusal") };
    assert_eq!(
        (refusal["step_id"].as_str(), refusal["limit"].as_str(), refusal["Workflow"].as_str()),
        (Some("second"), Some("max_total_tokens"), Some("tight"))
    );
    assert_eq!(number(refusal, Metric::BudgetRefusals), 1);
    let second = publishing(&lines, Metric::StepFailures).into_iter().find(|d| d["Step"] == "second").unwrap();
    assert_eq!((number(second, Metric::StepFailures), second["error_code"].as_str()), (1, Some("BUDGET_EXCEEDED")));
    let [end] = publishing(&lines, Metric::Runs)[..] else { panic!("not one run document") };
    assert_eq!(end["Status"], "FAILED");
    // The refusal's warning is a log line of the step that was refused.
    let warning = lines.iter().find(|l| l["message"] == "budget exceeded: the model call is not made").unwrap();
    assert_eq!(
        (warning["step_id"].as_str(), warning["level"].as_str(), warning["run_id"].as_str()),
        (Some("second"), Some("WARN"), Some(run.id.as_str()))
    );
}

#[tokio::test(start_paused = true)]
async fn a_takeover_is_counted_when_it_happens_and_in_the_runs_totals() {
    let s = setup(vec![Script::reply("FIRST", "1"), Script::reply("SLOW", "2").with_latency(Duration::from_secs(60))]);
    let run = queue(
        &s,
        json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" },
                "steps": [{ "id": "a", "type": "llm", "prompt": "FIRST" }, { "id": "b", "type": "llm", "prompt": "SLOW {{ steps.a.text }}" }] }),
    )
    .await;
    let crashed = deliver(&s, &run.id, "inv-1", Cause::Start);
    tokio::time::sleep(Duration::from_secs(10)).await;
    crashed.abort(); // `a` is settled, `b` in flight
    assert!(crashed.await.unwrap_err().is_cancelled());
    tokio::time::sleep(LEASE).await;
    assert_eq!(deliver(&s, &run.id, "inv-2", Cause::Sweep).await.unwrap(), Handled::Finished(RunStatus::Completed));

    let lines = lines(&s);
    let [takeover] = publishing(&lines, Metric::Takeovers)[..] else { panic!("not one takeover") };
    assert_eq!((number(takeover, Metric::Takeovers), takeover["run_id"].as_str()), (1, Some(run.id.as_str())));
    let [end] = publishing(&lines, Metric::Runs)[..] else { panic!("not one run document") };
    assert_eq!(number(end, Metric::RunTakeovers), 1);
    // `b` settled once, in the second invocation; `a` once, in the first.
    let settled: Vec<&str> = publishing(&lines, Metric::StepLatency).iter().map(|d| d["Step"].as_str().unwrap()).collect();
    assert_eq!(settled, ["a", "b"]);
    let resumed = lines.iter().find(|l| l["message"] == "resuming run").unwrap();
    assert_eq!(
        (resumed["takeover"].as_bool(), resumed["run_id"].as_str(), resumed["cause"].as_str()),
        (Some(true), Some(run.id.as_str()), Some("Sweep"))
    );
}
