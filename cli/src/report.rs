//! A run as people read it once it has ended or waits (`run`, `watch`, `show`): a table of
//! its steps, its totals, its output or error, and when it waits, what it asks and the
//! command that answers it. The exit status follows from its status.

use crate::exit::Exit;
use crate::format::{count, latency, short, usd};
use crate::live::Asked;
use crate::term::{alarm, bold, table};
use crate::wire::{Run, Step};
use comfy_table::{Cell, Table};
use serde_json::Value;

/// 0 completed, 1 failed or cancelled, 3 waits for a person.
pub fn exit_of(run: &Run) -> Exit {
    match run.status.as_str() {
        "COMPLETED" => Exit::Success,
        "AWAITING_INPUT" => Exit::Waiting,
        _ => Exit::RunFailed,
    }
}

/// Everything below the live lines: the table, then the output, error or what it waits for.
pub fn print(run: &Run, asked: &[Asked], api_url: &str) {
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
        waiting(run, asked).iter().for_each(|line| println!("{line}"));
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
        return format!("items {}/{items}", items.saturating_sub(failed));
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
pub fn waiting(run: &Run, asked: &[Asked]) -> Vec<String> {
    let Some(waiting) = &run.waiting else { return vec![format!("run {} waits for input", run.run_id)] };
    let id = &run.run_id;
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
