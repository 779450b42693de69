//! What a run's events mean for the screen, as a pure fold: each event in, the notes to
//! show out (a spinner to start, a line to print, streamed text). No I/O, so every rule
//! is unit-tested; `screen.rs` draws the notes, `mod.rs` feeds the events.

use crate::format::{count, latency, short, usd};
use crate::term::{dim, status_padded};
use crate::wire::{BATCH_WAIT, BatchJob, Event};
use serde_json::Value;
use std::collections::BTreeMap;

/// How wide the status column is: the longest step status, `COMPLETED`.
const STATUS_WIDTH: usize = 9;
/// How much of a review's `show` a waiting line quotes.
const SHOWN_CHARS: usize = 72;

/// Something to show.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// A step started: a spinner appears (a plain line without a terminal).
    Started { step: String, line: String },
    /// What a running step is doing now (retrying, the tail of its streamed text).
    Activity { step: String, message: String },
    /// How far a map is: items settled (failed among them) of all.
    Items { step: String, done: u64, failed: u64, total: u64 },
    /// Whole lines a streamed step wrote, as they arrive.
    Streamed { step: String, lines: Vec<String> },
    /// A step settled, or waits for a person: its spinner goes, its line stays.
    Settled { step: String, line: String },
    /// About the run as a whole.
    Run { line: String },
}

/// How the run stands after the events so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Going,
    /// It ended with `RUN_COMPLETED`, `RUN_FAILED` or `RUN_CANCELLED`.
    Ended,
    /// A run-level `AWAITING_INPUT`: it waits for a person, holding no runner.
    Waiting,
    /// A run-level `AWAITING_INPUT` of kind `batch`: its maps wait for their batch jobs,
    /// holding no runner. Nobody needs to act: a runner takes it back at the deadline.
    Parked,
}

/// What a waiting step asked (the data of its last `AWAITING_INPUT`).
#[derive(Debug, Clone, PartialEq)]
pub struct Asked {
    pub step: String,
    /// `review` or `input`.
    pub kind: String,
    pub show: Option<String>,
    pub reviewers: Vec<String>,
    pub missing: Vec<String>,
    pub attempts_left: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Follow {
    /// Width of the step column: the longest step id.
    width: usize,
    /// Streamed text of each step's current attempt not yet shown as whole lines.
    partial: BTreeMap<String, String>,
    /// Steps that wait for a person, by id.
    asked: BTreeMap<String, Asked>,
    /// Each map's batch job as its last `BATCH_JOB` said it, by step id.
    batches: BTreeMap<String, BatchJob>,
    standing: Option<Standing>,
}

impl Follow {
    /// `step_ids`: the run's steps, to line their columns up.
    pub fn new<'a>(step_ids: impl IntoIterator<Item = &'a str>) -> Self {
        let width = step_ids.into_iter().map(|s| s.chars().count()).max().unwrap_or(0);
        Self { width, ..Self::default() }
    }

    pub fn standing(&self) -> Standing {
        self.standing.unwrap_or(Standing::Going)
    }

    /// Forgets how the run stood: only events still to come may say it ended or waits
    /// (the events read so far said so of the revision or the wait a steering call ends).
    pub fn forget_standing(&mut self) {
        self.standing = None;
    }

    /// The steps that wait for a person now.
    pub fn asked(&self) -> impl Iterator<Item = &Asked> {
        self.asked.values()
    }

    /// The maps' batch jobs, as last reported.
    pub fn batches(&self) -> impl Iterator<Item = (&String, &BatchJob)> {
        self.batches.iter()
    }

    pub fn apply(&mut self, event: &Event) -> Vec<Note> {
        let data = &event.data;
        let step = event.step_id.clone().unwrap_or_default();
        match (event.kind.as_str(), event.step_id.is_some()) {
            ("RUN_STARTED", _) => {
                self.standing = Some(Standing::Going);
                vec![Note::Run { line: format!("▶ run started: {} ({})", text(data, "workflow"), count(num(data, "steps"), "step")) }]
            }
            // Handed back to a runner to ask the batch jobs again: a wait that may repeat
            // every few minutes for hours, not worth a line each time.
            ("RUN_RESUMED", _) if self.standing == Some(Standing::Parked) => {
                self.standing = Some(Standing::Going);
                self.batch_activity(|job| format!("asking its batch job how it stands ({})", job.status))
            }
            ("RUN_RESUMED", _) => {
                self.standing = Some(Standing::Going);
                let mut line = format!("▶ run resumed ({}", text(data, "cause"));
                if let Some(by) = data.get("by").and_then(Value::as_str) {
                    line.push_str(&format!(" by {by}"));
                }
                if let Some(what) = data.get("what").and_then(Value::as_str) {
                    line.push_str(&format!(": {what}"));
                }
                line.push_str(&format!("; {} already settled)", count(num(data, "settled_steps"), "step")));
                vec![Note::Run { line }]
            }
            ("RUN_SUSPENDED", _) => vec![Note::Run {
                line: dim(&format!(
                    "… invocation deadline near: {}/{} steps settled, continuing in a fresh invocation",
                    num(data, "settled_steps"),
                    num(data, "steps")
                )),
            }],
            ("STEP_STARTED", true) => {
                self.partial.remove(&step);
                self.asked.remove(&step);
                let model = data.get("model").and_then(Value::as_str).map(|m| format!("  {}", dim(m))).unwrap_or_default();
                // A map taken up again while its batch job runs: its spinner says so at once.
                let waiting =
                    self.batches.get(&step).filter(|job| !job.is_read()).map(|job| Note::Activity { step: step.clone(), message: job_waits(job) });
                let started = Note::Started { line: format!("· {}  {}{model}", self.pad(&step), status_padded("RUNNING", STATUS_WIDTH)), step };
                std::iter::once(started).chain(waiting).collect()
            }
            ("BATCH_JOB", true) => {
                let Ok(job) = serde_json::from_value::<BatchJob>(data.clone()) else {
                    return vec![Note::Run { line: dim(&format!("BATCH_JOB {step}: {data}")) }];
                };
                let notes = match job.is_read() {
                    true => {
                        let line = format!(
                            "  {}  batch job {} · {} answered at the batch price, {} run online",
                            self.pad(&step),
                            job.status,
                            job.answered.unwrap_or(0),
                            job.online.unwrap_or(0)
                        );
                        let message = format!("batch job read: {} answered, {} run online", job.answered.unwrap_or(0), job.online.unwrap_or(0));
                        vec![Note::Run { line }, Note::Activity { step: step.clone(), message }]
                    }
                    false => {
                        let mut line = format!("⧗ {}  batch job {} · {}", self.pad(&step), job.status, count(job.records, "record"));
                        if let Some(at) = &job.next_poll_at {
                            line.push_str(&format!(" · next poll {}", clock(at)));
                        }
                        if let Some(message) = &job.message {
                            line.push_str(&format!(" · {}", short(message, 120)));
                        }
                        vec![Note::Run { line }, Note::Activity { step: step.clone(), message: job_waits(&job) }]
                    }
                };
                self.batches.insert(step, job);
                notes
            }
            ("STREAMING", true) => self.streamed(&step, data.get("delta").and_then(Value::as_str).unwrap_or_default()),
            ("MAP_PROGRESS", true) => vec![Note::Items { step, done: num(data, "done"), failed: num(data, "failed"), total: num(data, "total") }],
            ("STEP_RETRYING", true) => {
                // The failed attempt's text is not part of the step's: start afresh.
                self.partial.remove(&step);
                // Inside a map, the item that failed (the only item-level events there are).
                let item = data.get("item").and_then(Value::as_u64).map(|i| format!("item {i} ")).unwrap_or_default();
                // The event belongs to the attempt to come; the one before it failed.
                let next = event.attempt.unwrap_or(2);
                let message = format!(
                    "{item}attempt {} failed ({}: {}); attempt {next} in {}",
                    next.saturating_sub(1),
                    text(data, "reason"),
                    short(&text(data, "message"), 80),
                    latency(num(data, "delay_ms"))
                );
                vec![
                    Note::Activity { step: step.clone(), message: message.clone() },
                    Note::Run { line: format!("↻ {}  {}  {message}", self.pad(&step), status_padded("RETRYING", STATUS_WIDTH)) },
                ]
            }
            ("STEP_COMPLETED", true) => {
                let mut notes = self.flush(&step);
                let mut line = format!(
                    "✓ {}  {}  {}  {}  {}  {}",
                    self.pad(&step),
                    status_padded("COMPLETED", STATUS_WIDTH),
                    count(num(data, "attempts"), "attempt"),
                    tokens(data),
                    usd(data.get("cost_usd").and_then(Value::as_str)),
                    latency(num(data, "latency_ms")),
                );
                line.push_str(&detail(data.get("detail")));
                notes.push(Note::Settled { step, line });
                notes
            }
            ("STEP_FAILED", true) => {
                let mut notes = self.flush(&step);
                let line = format!(
                    "✗ {}  {}  {}  {}  {}",
                    self.pad(&step),
                    status_padded("FAILED", STATUS_WIDTH),
                    count(num(data, "attempts"), "attempt"),
                    usd(data.get("cost_usd").and_then(Value::as_str)),
                    error(data),
                );
                notes.push(Note::Settled { step, line });
                notes
            }
            ("STEP_SKIPPED", true) => {
                let line = format!("- {}  {}  {}", self.pad(&step), status_padded("SKIPPED", STATUS_WIDTH), dim(&text(data, "reason")));
                vec![Note::Settled { step, line }]
            }
            ("STEP_CANCELLED", true) => {
                let mut notes = self.flush(&step);
                let line = format!("✗ {}  {}  {}", self.pad(&step), status_padded("CANCELLED", STATUS_WIDTH), text(data, "reason"));
                notes.push(Note::Settled { step, line });
                notes
            }
            ("AWAITING_INPUT", true) => {
                let asked = Asked {
                    step: step.clone(),
                    kind: text(data, "kind"),
                    show: data.get("show").and_then(Value::as_str).map(str::to_owned),
                    reviewers: strings(data.get("reviewers")),
                    missing: strings(data.get("missing")),
                    attempts_left: data.get("attempts_left").and_then(Value::as_u64),
                };
                let line = format!("? {}  {}  {}", self.pad(&step), status_padded("WAITING", STATUS_WIDTH), asked.summary());
                self.asked.insert(step.clone(), asked);
                vec![Note::Settled { step, line }]
            }
            // Nobody is asked anything: the spinners say what the maps wait for.
            ("AWAITING_INPUT", false) if data.get("kind").and_then(Value::as_str) == Some(BATCH_WAIT) => {
                self.standing = Some(Standing::Parked);
                let next = data.get("deadline").and_then(Value::as_str).map(|at| format!(" · next poll {}", clock(at))).unwrap_or_default();
                strings(data.get("steps"))
                    .into_iter()
                    .map(|step| {
                        let status = self.batches.get(&step).map_or_else(|| "?".to_owned(), |job| job.status.clone());
                        Note::Activity { message: format!("waits for its batch job ({status}){next}"), step }
                    })
                    .collect()
            }
            ("AWAITING_INPUT", false) => {
                self.standing = Some(Standing::Waiting);
                let steps = strings(data.get("steps"));
                let on = if steps.is_empty() { String::new() } else { format!(": {}", steps.join(", ")) };
                let reason = data.get("reason").and_then(Value::as_str).map(|r| format!(" ({})", short(r, 100))).unwrap_or_default();
                vec![Note::Run { line: format!("⏸ run waits for input ({}){on}{reason}", text(data, "kind")) }]
            }
            ("REVISION_STARTED", _) => {
                self.standing = Some(Standing::Going);
                self.asked.clear();
                let rerun = strings(data.get("rerun"));
                for step in &rerun {
                    self.batches.remove(step);
                }
                vec![Note::Run {
                    line: format!(
                        "▶ revision {} started: {} of {} by {}; runs again: {}",
                        num(data, "revision"),
                        text(data, "kind"),
                        text(data, "step"),
                        text(data, "by"),
                        if rerun.is_empty() { "-".to_owned() } else { rerun.join(", ") }
                    ),
                }]
            }
            ("STEP_OVERRIDDEN", true) => {
                let line = format!("✎ {}  output set by hand by {}", self.pad(&step), text(data, "by"));
                vec![Note::Settled { step, line }]
            }
            ("RUN_COMPLETED" | "RUN_FAILED" | "RUN_CANCELLED", _) => {
                self.standing = Some(Standing::Ended);
                let word = &event.kind["RUN_".len()..];
                let totals = data.get("totals").unwrap_or(&Value::Null);
                let mut line = format!(
                    "■ run {}  {}  {}",
                    status_padded(word, STATUS_WIDTH),
                    count(num(totals, "total_tokens"), "token"),
                    usd(totals.get("cost_usd").and_then(Value::as_str))
                );
                match event.kind.as_str() {
                    "RUN_FAILED" => line.push_str(&format!("  {}", error(data))),
                    "RUN_CANCELLED" => {
                        if let Some(by) = data.get("by").and_then(Value::as_str) {
                            line.push_str(&format!("  by {by}"));
                        }
                        if let Some(reason) = data.get("reason").and_then(Value::as_str) {
                            line.push_str(&format!(": {reason}"));
                        }
                    }
                    _ => {}
                }
                vec![Note::Run { line }]
            }
            // A kind this CLI does not know yet: shown, not dropped.
            (kind, _) => vec![Note::Run { line: dim(&format!("{kind} {step}")) }],
        }
    }

    fn pad(&self, step: &str) -> String {
        format!("{step:<width$}", width = self.width)
    }

    /// A spinner message for each map whose batch job is still out.
    fn batch_activity(&self, message: impl Fn(&BatchJob) -> String) -> Vec<Note> {
        self.batches
            .iter()
            .filter(|(_, job)| !job.is_read())
            .map(|(step, job)| Note::Activity { step: step.clone(), message: message(job) })
            .collect()
    }

    /// Adds a streamed delta: whole lines are shown now, the rest when more arrives.
    fn streamed(&mut self, step: &str, delta: &str) -> Vec<Note> {
        let buffer = self.partial.entry(step.to_owned()).or_default();
        buffer.push_str(delta);
        let mut notes = Vec::new();
        if let Some(end) = buffer.rfind('\n') {
            let lines = buffer[..end].split('\n').map(str::to_owned).collect();
            buffer.replace_range(..=end, "");
            notes.push(Note::Streamed { step: step.to_owned(), lines });
        }
        let tail: String = buffer.chars().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
        notes.push(Note::Activity { step: step.to_owned(), message: format!("streaming: {tail}") });
        notes
    }

    /// The streamed text still held back, as a last line, when its step settles.
    fn flush(&mut self, step: &str) -> Vec<Note> {
        match self.partial.remove(step) {
            Some(rest) if !rest.is_empty() => vec![Note::Streamed { step: step.to_owned(), lines: vec![rest] }],
            _ => Vec::new(),
        }
    }
}

impl Asked {
    /// One line: what is asked, of whom.
    pub fn summary(&self) -> String {
        let mut parts = vec![self.kind.clone()];
        if let Some(show) = &self.show {
            parts.push(format!("“{}”", short(show, SHOWN_CHARS)));
        }
        if !self.missing.is_empty() {
            parts.push(format!("missing {}", self.missing.join(", ")));
        }
        if let Some(n) = self.attempts_left {
            parts.push(format!("{} left", count(n, "answer")));
        }
        if !self.reviewers.is_empty() {
            parts.push(format!("from {}", self.reviewers.join(", ")));
        }
        parts.join("  ")
    }
}

/// What a map waiting for its batch job is doing, for its spinner.
fn job_waits(job: &BatchJob) -> String {
    let next = job.next_poll_at.as_deref().map(|at| format!(" · next poll {}", clock(at))).unwrap_or_default();
    format!("waits for its batch job ({}, {}){next}", job.status, count(job.records, "record"))
}

/// `2025-06-01T12:03:05.120Z` → `12:03:05 UTC`: when, today, as the API says it (in UTC);
/// anything else as it came.
fn clock(at: &str) -> String {
    let time = at.split_once('T').map(|(_, t)| t.get(..8).unwrap_or(t)).filter(|t| t.len() == 8 && t.as_bytes()[2] == b':');
    match time {
        Some(t) if at.ends_with('Z') || at.ends_with("+00:00") => format!("{t} UTC"),
        _ => at.to_owned(),
    }
}

/// `78→27 tokens`: input and output tokens.
fn tokens(data: &Value) -> String {
    format!("{}→{} tokens", num(data, "input_tokens"), num(data, "output_tokens"))
}

/// What only some kinds report: a map's items, a router's choice, a review's decision.
fn detail(detail: Option<&Value>) -> String {
    let Some(detail) = detail.filter(|d| d.is_object()) else { return String::new() };
    if let Some(items) = detail.get("items").and_then(Value::as_u64) {
        let failed = detail.get("failed").and_then(Value::as_array).map_or(0, Vec::len) as u64;
        let note = if failed > 0 { format!(", {failed} failed") } else { String::new() };
        let batch = batch_share(detail);
        return format!("  items {}/{items}{note}{batch}", items.saturating_sub(failed));
    }
    if let Some(when) = detail.get("when").and_then(Value::as_str) {
        return format!("  route {}: {when}", num(detail, "route"));
    }
    if let Some(decision) = detail.get("decision").and_then(Value::as_str) {
        return format!("  {decision} by {}", text(detail, "by"));
    }
    String::new()
}

/// ` · 198 at the batch price`: how many of a map's items its batch job answered.
pub fn batch_share(detail: &Value) -> String {
    match detail.get("batch").and_then(|b| b.get("answered")).and_then(Value::as_u64) {
        Some(n) => format!(" · {n} at the batch price"),
        None => String::new(),
    }
}

fn error(data: &Value) -> String {
    match data.get("error") {
        Some(e) if e.is_object() => format!("{}: {}", text(e, "code"), short(&text(e, "message"), 120)),
        _ => String::new(),
    }
}

fn text(data: &Value, key: &str) -> String {
    match data.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "?".to_owned(),
        Some(other) => other.to_string(),
    }
}

fn num(data: &Value, key: &str) -> u64 {
    data.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value.and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(kind: &str, step: Option<&str>, data: Value) -> Event {
        Event { kind: kind.to_owned(), step_id: step.map(str::to_owned), attempt: Some(1), data }
    }

    fn lines(notes: &[Note]) -> Vec<String> {
        notes
            .iter()
            .filter_map(|n| match n {
                Note::Settled { line, .. } | Note::Run { line } | Note::Started { line, .. } => Some(line.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_completed_step_is_one_line_with_attempts_tokens_cost_and_latency() {
        let mut follow = Follow::new(["extract", "reply"]);
        let notes = follow.apply(&event(
            "STEP_COMPLETED",
            Some("reply"),
            json!({"attempts": 2, "input_tokens": 88, "output_tokens": 97, "cost_usd": "0.0000166", "latency_ms": 1210}),
        ));
        assert_eq!(lines(&notes), ["✓ reply    COMPLETED  2 attempts  88→97 tokens  $0.0000166  1.2 s"]);
    }

    #[test]
    fn streamed_text_is_shown_line_by_line_and_the_rest_when_the_step_settles() {
        let mut follow = Follow::new(["draft"]);
        let first = follow.apply(&event("STREAMING", Some("draft"), json!({"delta": "Dear cust", "chars": 9})));
        assert!(!first.iter().any(|n| matches!(n, Note::Streamed { .. })), "no whole line yet");
        assert_eq!(first, [Note::Activity { step: "draft".into(), message: "streaming: Dear cust".into() }]);
        let second = follow.apply(&event("STREAMING", Some("draft"), json!({"delta": "omer,\nthank you\nfor", "chars": 30})));
        assert_eq!(second[0], Note::Streamed { step: "draft".into(), lines: vec!["Dear customer,".into(), "thank you".into()] });
        let done = follow.apply(&event("STEP_COMPLETED", Some("draft"), json!({"attempts": 1})));
        assert_eq!(done[0], Note::Streamed { step: "draft".into(), lines: vec!["for".into()] });
        assert!(matches!(done[1], Note::Settled { .. }));
    }

    #[test]
    fn a_retry_drops_the_failed_attempts_streamed_text() {
        let mut follow = Follow::new(["draft"]);
        follow.apply(&event("STREAMING", Some("draft"), json!({"delta": "half a rep"})));
        let mut retrying = event("STEP_RETRYING", Some("draft"), json!({"reason": "THROTTLED", "message": "slow down", "delay_ms": 200}));
        retrying.attempt = Some(2);
        let retry = follow.apply(&retrying);
        assert_eq!(lines(&retry), ["↻ draft  RETRYING   attempt 1 failed (THROTTLED: slow down); attempt 2 in 200 ms"]);
        let done = follow.apply(&event("STEP_COMPLETED", Some("draft"), json!({"attempts": 2})));
        assert!(!done.iter().any(|n| matches!(n, Note::Streamed { .. })), "{done:?}");
    }

    #[test]
    fn a_map_says_how_many_of_its_items_completed() {
        let mut follow = Follow::new(["fixes"]);
        let notes = follow.apply(&event(
            "STEP_COMPLETED",
            Some("fixes"),
            json!({"attempts": 1, "detail": {"items": 3, "failed": [{"index": 1, "error": {"code": "X", "message": "m"}}]}}),
        ));
        assert!(lines(&notes)[0].ends_with("items 2/3, 1 failed"), "{:?}", lines(&notes));
    }

    #[test]
    fn a_maps_progress_is_items_settled_of_all() {
        let mut follow = Follow::new(["fixes"]);
        let notes = follow.apply(&event("MAP_PROGRESS", Some("fixes"), json!({"done": 4, "failed": 1, "total": 10})));
        assert_eq!(notes, [Note::Items { step: "fixes".into(), done: 4, failed: 1, total: 10 }]);
    }

    #[test]
    fn a_waiting_step_records_what_it_asks_and_the_run_waits_only_on_the_run_level_event() {
        let mut follow = Follow::new(["account"]);
        let notes = follow.apply(&event(
            "AWAITING_INPUT",
            Some("account"),
            json!({"kind": "input", "show": "Which account?", "missing": ["account_id", "plan"], "attempts_left": 3, "reviewers": ["user:alice"]}),
        ));
        assert_eq!(lines(&notes), ["? account  WAITING    input  “Which account?”  missing account_id, plan  3 answers left  from user:alice"]);
        assert_eq!(follow.standing(), Standing::Going, "other branches may still run");
        follow.apply(&event("AWAITING_INPUT", None, json!({"kind": "input", "steps": ["account"]})));
        assert_eq!(follow.standing(), Standing::Waiting);
        assert_eq!(follow.asked().map(|a| a.step.as_str()).collect::<Vec<_>>(), ["account"]);
        follow.apply(&event("RUN_RESUMED", None, json!({"cause": "resume", "settled_steps": 0})));
        assert_eq!(follow.standing(), Standing::Going);
    }

    #[test]
    fn the_run_ends_on_its_terminal_event_and_a_new_revision_goes_on() {
        let mut follow = Follow::new(["a"]);
        let notes = follow.apply(&event(
            "RUN_FAILED",
            None,
            json!({"error": {"code": "STEP_FAILED", "message": "step a failed"}, "totals": {"total_tokens": 12, "cost_usd": "0.1"}}),
        ));
        assert_eq!(lines(&notes), ["■ run FAILED     12 tokens  $0.1  STEP_FAILED: step a failed"]);
        assert_eq!(follow.standing(), Standing::Ended);
        follow.apply(&event("REVISION_STARTED", None, json!({"revision": 1, "kind": "retry", "step": "a", "by": "bob", "rerun": ["a"]})));
        assert_eq!(follow.standing(), Standing::Going);
    }

    const JOB: &str = "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abc";

    fn batch_job(status: &str, more: Value) -> Event {
        let mut data = json!({"job": JOB, "status": status, "records": 200});
        if let (Some(data), Some(more)) = (data.as_object_mut(), more.as_object()) {
            data.extend(more.clone());
        }
        event("BATCH_JOB", Some("summarize"), data)
    }

    #[test]
    fn each_batch_job_report_is_a_line_and_the_last_says_how_many_items_ran_at_the_batch_price() {
        let mut follow = Follow::new(["summarize", "load"]);
        let submitted = follow.apply(&batch_job("Submitted", json!({"next_poll_at": "2025-06-01T12:03:05.120Z"})));
        assert_eq!(lines(&submitted), ["⧗ summarize  batch job Submitted · 200 records · next poll 12:03:05 UTC"]);
        assert!(submitted.contains(&Note::Activity {
            step: "summarize".into(),
            message: "waits for its batch job (Submitted, 200 records) · next poll 12:03:05 UTC".into()
        }));
        let read = follow.apply(&batch_job("Completed", json!({"answered": 198, "online": 2})));
        assert_eq!(lines(&read), ["  summarize  batch job Completed · 198 answered at the batch price, 2 run online"]);
        assert_eq!(follow.batches().map(|(s, j)| (s.as_str(), j.answered)).collect::<Vec<_>>(), [("summarize", Some(198))]);
    }

    #[test]
    fn a_failed_batch_job_says_why() {
        let mut follow = Follow::new(["summarize"]);
        let notes = follow.apply(&batch_job("Failed", json!({"message": "the input file is malformed"})));
        assert_eq!(lines(&notes), ["⧗ summarize  batch job Failed · 200 records · the input file is malformed"]);
    }

    #[test]
    fn a_run_waiting_for_its_batch_job_is_parked_not_waiting_and_each_poll_adds_no_line() {
        let mut follow = Follow::new(["summarize"]);
        follow.apply(&event("STEP_STARTED", Some("summarize"), json!({})));
        follow.apply(&batch_job("InProgress", json!({"next_poll_at": "2025-06-01T12:03:05Z"})));
        let parked =
            follow.apply(&event("AWAITING_INPUT", None, json!({"kind": "batch", "steps": ["summarize"], "deadline": "2025-06-01T12:03:05Z"})));
        assert_eq!(follow.standing(), Standing::Parked, "nobody is asked anything");
        assert_eq!(
            parked,
            [Note::Activity { step: "summarize".into(), message: "waits for its batch job (InProgress) · next poll 12:03:05 UTC".into() }]
        );
        assert_eq!(follow.asked().count(), 0);
        let resumed = follow.apply(&event("RUN_RESUMED", None, json!({"cause": "sweep", "settled_steps": 0})));
        assert_eq!(follow.standing(), Standing::Going);
        assert!(lines(&resumed).is_empty(), "{resumed:?}");
        assert_eq!(resumed, [Note::Activity { step: "summarize".into(), message: "asking its batch job how it stands (InProgress)".into() }]);
        // The runner takes the map up again: its new spinner says what it waits for at once.
        let again = follow.apply(&event("STEP_STARTED", Some("summarize"), json!({})));
        assert!(
            matches!(&again[..], [Note::Started { .. }, Note::Activity { message, .. }] if message.starts_with("waits for its batch job (InProgress"))
        );
        follow.apply(&event("AWAITING_INPUT", None, json!({"kind": "batch", "steps": ["summarize"]})));
        assert_eq!(follow.standing(), Standing::Parked);
        follow.apply(&event("RUN_RESUMED", None, json!({"cause": "sweep", "settled_steps": 0})));
        follow.apply(&batch_job("Completed", json!({"answered": 198, "online": 2})));
        let progress = follow.apply(&event("MAP_PROGRESS", Some("summarize"), json!({"done": 199, "failed": 0, "total": 200})));
        assert_eq!(progress, [Note::Items { step: "summarize".into(), done: 199, failed: 0, total: 200 }]);
        let done = follow.apply(&event(
            "STEP_COMPLETED",
            Some("summarize"),
            json!({"attempts": 1, "detail": {"items": 200, "failed": [], "batch": {"job": JOB, "status": "Completed", "records": 200, "answered": 198, "online": 2}}}),
        ));
        assert!(lines(&done)[0].ends_with("items 200/200 · 198 at the batch price"), "{:?}", lines(&done));
        // A person's wait is no batch wait: it stops the follow, and its resume has a line.
        follow.apply(&event("AWAITING_INPUT", None, json!({"kind": "review", "steps": ["check"]})));
        assert_eq!(follow.standing(), Standing::Waiting);
        let resumed = follow.apply(&event("RUN_RESUMED", None, json!({"cause": "resume", "by": "alice", "settled_steps": 1})));
        assert_eq!(lines(&resumed), ["▶ run resumed (resume by alice; 1 step already settled)"]);
    }

    #[test]
    fn a_new_revision_forgets_the_batch_job_of_a_map_it_runs_again() {
        let mut follow = Follow::new(["summarize"]);
        follow.apply(&batch_job("Completed", json!({"answered": 200, "online": 0})));
        follow.apply(&event(
            "REVISION_STARTED",
            None,
            json!({"revision": 1, "kind": "retry", "step": "summarize", "by": "bob", "rerun": ["summarize"]}),
        ));
        assert_eq!(follow.batches().count(), 0);
    }

    #[test]
    fn a_time_reads_as_its_clock_in_utc_and_anything_else_as_it_came() {
        assert_eq!(clock("2025-06-01T12:03:05.120Z"), "12:03:05 UTC");
        assert_eq!(clock("2025-06-01T12:03:05+00:00"), "12:03:05 UTC");
        assert_eq!(clock("2025-06-01T12:03:05+02:00"), "2025-06-01T12:03:05+02:00");
        assert_eq!(clock("soon"), "soon");
    }
}
