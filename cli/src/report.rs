//! A run as people read it once it has ended or waits (`run`, `watch`, `show`): a table of
//! its steps, its totals, its output or error, and when it waits, what it asks and the
//! command that answers it (or, waiting for its maps' batch jobs, which jobs: nobody
//! needs to act). The exit status follows from its status.

use crate::exit::Exit;
use crate::format::{count, latency, short, usd};
use crate::live::{Asked, batch_share};
use crate::term::{alarm, bold, table};
use crate::wire::{BATCH_WAIT, BatchJob, Run, Step};
use comfy_table::{Cell, Table};
use serde_json::Value;

/// 0 completed, 1 failed or cancelled, 3 waits for a person. A run waiting for its batch
/// jobs is followed on (`commands::run`), and never ends a command that follows it.
pub fn exit_of(run: &Run) -> Exit {
    match run.status.as_str() {
        "COMPLETED" => Exit::Success,
        "AWAITING_INPUT" => Exit::Waiting,
        _ => Exit::RunFailed,
    }
}

/// Everything below the live lines: the table, then the output, error or what it waits for.
/// `batches`: the maps' batch jobs as their events said them (else their checkpoints say).
pub fn print(run: &Run, asked: &[Asked], batches: &[(String, BatchJob)], api_url: &str) {
    println!();
    println!("{}", steps_table(run));
    if let Some(error) = &run.error {
        println!("{} {error}", alarm("error:"));
    }
    match (&run.output, &run.output_ref) {
        (_, Some(link)) => println!("{} {} bytes, at {api_url}{}", bold("output:"), link.bytes, link.href),
        (Some(Value::String(text)), _) => println!("{}\n{text}", bold("output:")),
        (Some(Value::Null) | None, _) => {}
        (Some(value), _) => println!("{}\n{}", bold("output:"), serde_json::to_string_pretty(value).unwrap_or_default()),
    }
    if run.status == "AWAITING_INPUT" {
        waiting(run, asked, batches).iter().for_each(|line| println!("{line}"));
    }
}

/// One row per step, then the run's totals.
pub fn steps_table(run: &Run) -> Table {
    let mut table = table(&["step", "status", "attempts", "tokens in", "tokens out", "cost", "latency", "note"], &[2, 3, 4, 5, 6]);
    for step in &run.steps {
        let pending = step.status == "PENDING";
        table.add_row([
            Cell::new(&step.id),
            Cell::new(&step.status),
            Cell::new(step.attempts),
            Cell::new(if pending { "-".to_owned() } else { step.input_tokens.to_string() }),
            Cell::new(if pending { "-".to_owned() } else { step.output_tokens.to_string() }),
            Cell::new(usd(step.cost_usd.as_deref())),
            Cell::new(step.latency_ms.filter(|_| !pending).map_or("-".to_owned(), latency)),
            Cell::new(note(step)),
        ]);
    }
    let t = &run.totals;
    table.add_row([
        Cell::new("total"),
        Cell::new(&run.status),
        Cell::new(count(t.model_calls, "call")),
        Cell::new(t.input_tokens),
        Cell::new(t.output_tokens),
        Cell::new(usd(t.cost_usd.as_deref())),
        Cell::new(latency(t.step_latency_ms)),
        Cell::new("latency: sum over steps"),
    ]);
    table
}

/// A step's error, or what its kind reports (a map's items, a router's choice).
fn note(step: &Step) -> String {
    if let Some(error) = &step.error {
        return short(&error.to_string(), 60);
    }
    let Some(detail) = step.detail.as_ref() else { return String::new() };
    if let Some(items) = detail.get("items").and_then(Value::as_u64) {
        let failed = detail.get("failed").and_then(Value::as_array).map_or(0, Vec::len) as u64;
        return format!("items {}/{items}{}", items.saturating_sub(failed), batch_share(detail));
    }
    if let Some(when) = detail.get("when").and_then(Value::as_str) {
        return short(&format!("route: {when}"), 60);
    }
    if let Some(decision) = detail.get("decision").and_then(Value::as_str) {
        return format!("{decision} by {}", detail.get("by").and_then(Value::as_str).unwrap_or("?"));
    }
    String::new()
}

/// What the run waits for, each asking step with the command that answers it.
pub fn waiting(run: &Run, asked: &[Asked], batches: &[(String, BatchJob)]) -> Vec<String> {
    let Some(waiting) = &run.waiting else { return vec![format!("run {} waits for input", run.run_id)] };
    let id = &run.run_id;
    if waiting.kind == BATCH_WAIT {
        return batch_waiting(run, batches);
    }
    let mut lines = vec![String::new(), bold(&format!("run {id} waits for input ({})", waiting.kind))];
    if let Some(by) = &waiting.by {
        lines.push(format!("  by: {by}"));
    }
    if let Some(reason) = &waiting.reason {
        lines.push(format!("  reason: {reason}"));
    }
    if let Some(deadline) = &waiting.deadline {
        lines.push(format!("  deadline: {deadline}"));
    }
    match waiting.kind.as_str() {
        "paused" => lines.push(format!("  continue it:  chainrun resume {id}")),
        "budget" => lines.push(format!("  raise its budget:  chainrun resume {id} --max-cost-usd <USD> [--max-total-tokens <N>]")),
        _ => {
            for step in &waiting.steps {
                let found = asked.iter().find(|a| &a.step == step).cloned().or_else(|| asked_of(run, step));
                let Some(a) = found else { continue };
                lines.push(format!("  {step}: {}", a.summary()));
                if let Some(show) = a.show.as_ref().filter(|s| s.contains('\n') || s.chars().count() > 72) {
                    show.lines().for_each(|l| lines.push(format!("    │ {l}")));
                }
                lines.push(match a.kind.as_str() {
                    "input" => format!("    answer:  chainrun resume {id} --step {step} --values '{{…}}'   (or --text '…')"),
                    _ => format!("    decide:  chainrun resume {id} --step {step} --decision approve|reject|edit [--output JSON] [--comment …]"),
                });
            }
        }
    }
    lines
}

/// Which batch jobs the run waits for, and when it asks them again: no command to give.
fn batch_waiting(run: &Run, batches: &[(String, BatchJob)]) -> Vec<String> {
    let id = &run.run_id;
    let steps = run.waiting.as_ref().map(|w| w.steps.clone()).unwrap_or_default();
    let mut lines = vec![String::new(), bold(&format!("run {id} waits for the batch job of {}; nobody needs to act", steps.join(", ")))];
    for step in &steps {
        let job = batches.iter().find(|(s, _)| s == step).map(|(_, job)| job.clone()).or_else(|| job_of(run, step));
        lines.push(match job {
            Some(job) => {
                let message = job.message.as_ref().map(|m| format!(" · {}", short(m, 100))).unwrap_or_default();
                format!("  {step}: batch job {} {} · {}{message}", job.job, job.status, count(job.records, "record"))
            }
            None => format!("  {step}: its batch job"),
        });
    }
    if let Some(deadline) = run.waiting.as_ref().and_then(|w| w.deadline.as_ref()) {
        lines.push(format!("  next poll: {deadline} (a runner takes the run back then, by itself)"));
    }
    lines.push(format!("  follow it:  chainrun watch {id}"));
    lines
}

/// A map's batch job as its checkpoint records it.
fn job_of(run: &Run, step_id: &str) -> Option<BatchJob> {
    let detail = run.steps.iter().find(|s| s.id == step_id)?.detail.as_ref()?;
    serde_json::from_value(detail.get("batch")?.clone()).ok()
}

/// What a waiting step asks, read from its checkpoint when no event said it (`show`).
fn asked_of(run: &Run, step_id: &str) -> Option<Asked> {
    let step = run.steps.iter().find(|s| s.id == step_id)?;
    let detail = step.detail.clone().unwrap_or(Value::Null);
    let strings = |key: &str| -> Vec<String> {
        detail.get(key).and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect()).unwrap_or_default()
    };
    let input = detail.get("missing").is_some();
    Some(Asked {
        step: step_id.to_owned(),
        kind: if input { "input" } else { "review" }.to_owned(),
        // A waiting review's output is what it shows its reviewers.
        show: if input { None } else { step.output.as_ref().and_then(Value::as_str).map(str::to_owned) },
        reviewers: strings("deciders"),
        missing: strings("missing"),
        attempts_left: detail.get("attempts_left").and_then(Value::as_u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const JOB: &str = "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abc";

    fn parked(detail: Value) -> Run {
        let run = json!({
            "run_id": "01RUN", "workflow": "digest", "status": "AWAITING_INPUT", "totals": {},
            "waiting": {"kind": "batch", "steps": ["summarize"], "deadline": "2025-06-01T12:03:05Z", "since": "2025-06-01T12:00:00Z"},
            "steps": [{"id": "load", "status": "COMPLETED"}, {"id": "summarize", "status": "RUNNING", "detail": detail}],
        });
        serde_json::from_value(run).unwrap_or_else(|e| panic!("{e}"))
    }

    fn job(status: &str) -> BatchJob {
        BatchJob { job: JOB.into(), status: status.into(), records: 200, message: None, next_poll_at: None, answered: None, online: None }
    }

    #[test]
    fn a_run_waiting_for_its_batch_job_waits_for_nobody() {
        let run = parked(Value::Null);
        assert!(!run.waits_for_a_person());
        let review = Run { waiting: serde_json::from_value(json!({"kind": "review", "steps": ["check"]})).ok(), ..run.clone() };
        assert!(review.waits_for_a_person());
        assert_eq!(exit_of(&review), Exit::Waiting);
    }

    #[test]
    fn a_batch_wait_names_the_job_its_status_and_the_next_poll_and_no_command_to_answer_it() {
        let lines = waiting(&parked(Value::Null), &[], &[("summarize".into(), job("InProgress"))]);
        let text = console::strip_ansi_codes(&lines.join("\n")).into_owned();
        assert!(text.contains("run 01RUN waits for the batch job of summarize; nobody needs to act"), "{text}");
        assert!(text.contains(&format!("summarize: batch job {JOB} InProgress · 200 records")), "{text}");
        assert!(text.contains("next poll: 2025-06-01T12:03:05Z"), "{text}");
        assert!(!text.contains("resume"), "{text}");
    }

    #[test]
    fn without_its_events_a_batch_wait_reads_the_job_from_the_maps_checkpoint() {
        let run = parked(json!({"batch": {"job": JOB, "status": "Validating", "records": 200}}));
        let text = console::strip_ansi_codes(&waiting(&run, &[], &[]).join("\n")).into_owned();
        assert!(text.contains(&format!("summarize: batch job {JOB} Validating · 200 records")), "{text}");
    }

    #[test]
    fn a_map_that_ran_in_a_batch_job_notes_how_many_items_it_answered() {
        let step: Step = serde_json::from_value(json!({"id": "summarize", "status": "COMPLETED",
            "detail": {"items": 200, "failed": [], "batch": {"job": JOB, "status": "Completed", "records": 200, "answered": 198, "online": 2}}}))
        .unwrap_or_default();
        assert_eq!(note(&step), "items 200/200 · 198 at the batch price");
    }
}
