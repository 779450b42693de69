//! The sweeper tells stuck runs (past the bound recovery promises: a lease expired, a
//! dispatch lost) from runs that are merely due (a waiting run whose deadline came), names
//! each stuck run in a log line of its own, and reports their count every sweep — 0 too, so
//! the alarm on it always has data. In-memory ports, paused time, the real JSON subscriber.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::durability::Clock;
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryDispatcher, MemoryStore, PausedClock};
use chainrun_core::ports::{Answered, Lease, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{RunRecord, WaitKind, Waiting};
use chainrun_core::telemetry::capture::Capture;
use chainrun_core::telemetry::logs::{self, LogConfig, LogFormat};
use chainrun_core::telemetry::metrics::{Emf, sweep_document};
use chainrun_recovery::Sweeper;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const GRACE: Duration = Duration::from_secs(60);

async fn stored_run(store: &MemoryStore, clock: &PausedClock) -> RunRecord {
    let def = json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": [{ "id": "a", "type": "llm", "prompt": "HELLO" }] });
    let mut run =
        RunRecord::new("t".parse().unwrap(), def.clone(), json!({}), "alice".parse().unwrap(), vec![Principal::User("alice".into())], clock.now());
    run.step_order = chainrun_core::graph::validate_json(&def, &ModelRegistry::builtin()).unwrap().step_order();
    store.create_run(&run).await.unwrap();
    run
}

fn json_lines(stdout: &Capture) -> Vec<Value> {
    stdout.lines().iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

#[tokio::test(start_paused = true)]
async fn a_sweep_counts_runs_past_their_bound_but_not_waiting_runs_whose_deadline_came() {
    let stdout = Capture::default();
    let config = LogConfig { format: LogFormat::Json, filter: "info".into() };
    let _logs = tracing::subscriber::set_default(logs::subscriber(&config, stdout.clone()));
    let store = Arc::new(MemoryStore::with_queued_grace(GRACE));
    let clock = Arc::new(PausedClock::default());
    let dispatcher = Arc::new(MemoryDispatcher::new());
    let sweeper = Sweeper { store: store.clone(), dispatcher: dispatcher.clone(), clock: clock.clone(), limit: 100 };
    let metrics = Emf::new(stdout.clone());

    let lost = stored_run(&store, &clock).await; // its dispatch never arrived
    let crashed = stored_run(&store, &clock).await;
    store
        .claim(&crashed.id, &Lease { holder: "crashed".into(), expires_at: clock.now() + chrono::Duration::seconds(30) }, clock.now())
        .await
        .unwrap();
    let waiting = stored_run(&store, &clock).await;
    let holder = Lease { holder: "parked".into(), expires_at: clock.now() + chrono::Duration::seconds(30) };
    let claimed = match store.claim(&waiting.id, &holder, clock.now()).await.unwrap() {
        chainrun_core::ports::Claim::Acquired(run) => run,
        other => panic!("{other:?}"),
    };
    let wait = Waiting {
        kind: WaitKind::Review,
        by: None,
        since: clock.now(),
        reason: None,
        steps: Vec::new(),
        deadline: Some(clock.now() + chrono::Duration::seconds(10)),
    };
    assert!(store.park(&waiting.id, &holder, &wait, Answered::of(&claimed)).await.unwrap());

    // Nothing is due yet: the sweep still reports, with zero.
    let early = sweeper.sweep().await.unwrap();
    assert!(early.stuck.is_empty() && early.dispatched.is_empty(), "{early:?}");
    metrics.print(&sweep_document(&early.stuck, early.dispatched.len(), early.failed.len(), clock.now()));

    tokio::time::sleep(GRACE).await;
    let swept = sweeper.sweep().await.unwrap();
    let mut stuck = swept.stuck.clone();
    stuck.sort();
    let mut expected = vec![lost.id.clone(), crashed.id.clone()];
    expected.sort();
    assert_eq!(stuck, expected, "the lost dispatch and the expired lease; not the run whose deadline came");
    assert_eq!(swept.dispatched.len(), 3, "every due run is handed over, the waiting one too");
    metrics.print(&sweep_document(&swept.stuck, swept.dispatched.len(), swept.failed.len(), clock.now()));

    let lines = json_lines(&stdout);
    let past: Vec<&Value> = lines.iter().filter(|l| l["message"] == "run past its bound").collect();
    let named: Vec<(&str, &str)> = past.iter().map(|l| (l["run_id"].as_str().unwrap(), l["why"].as_str().unwrap())).collect();
    assert_eq!(named.len(), 2, "{named:?}");
    assert!(named.contains(&(lost.id.as_str(), "queued past the grace: its dispatch was lost")), "{named:?}");
    assert!(named.contains(&(crashed.id.as_str(), "its lease expired: the runner holding it stopped")), "{named:?}");
    // Each hand-over's line carries its run, the waiting run's too.
    let handed: Vec<&str> =
        lines.iter().filter(|l| l["message"] == "swept: handed to the runner again").map(|l| l["run_id"].as_str().unwrap()).collect();
    assert_eq!(handed.len(), 3);
    assert!(handed.contains(&waiting.id.as_str()));

    let reports: Vec<&Value> = lines.iter().filter(|l| l.get("_aws").is_some()).collect();
    let counts: Vec<(u64, u64)> = reports.iter().map(|r| (r["StuckRuns"].as_u64().unwrap(), r["SweptRuns"].as_u64().unwrap())).collect();
    assert_eq!(counts, [(0, 0), (2, 3)]);
    let ids: Vec<&str> = reports[1]["stuck_run_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(ids.contains(&lost.id.as_str()) && ids.contains(&crashed.id.as_str()) && !ids.contains(&waiting.id.as_str()), "{ids:?}");
    assert!(swept.failed.is_empty(), "the dispatcher is up");
}
