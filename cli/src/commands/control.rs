//! Steering a run: `resume` (a pause, a review's decision, an input's answer, a budget
//! raised), `cancel` and `pause`, `retry` and `override` (a new revision). With `--follow`
//! the run is followed from that moment on, and the command exits as `run` does.

use super::Ctx;
use super::run::{follow_and_report, follower};
use crate::args::{BudgetArgs, OverrideArgs, ResumeArgs, RetryArgs};
use crate::exit::{CliError, Exit};
use crate::source::{json_arg, json_object_arg};
use crate::term::bold;
use serde_json::{Map, Value, json};

pub fn resume(ctx: &Ctx, args: ResumeArgs) -> Result<Exit, CliError> {
    ctx.api.require_token("chainrun resume")?;
    let mut body = Map::new();
    if let Some(step) = &args.step {
        body.insert("step".into(), json!(step));
    }
    if let Some(decision) = args.decision {
        body.insert("decision".into(), json!(decision.as_str()));
    }
    if let Some(output) = &args.output {
        body.insert("output".into(), json_arg(output)?);
    }
    if let Some(values) = &args.values {
        body.insert("values".into(), json_object_arg(values, "--values")?);
    }
    if let Some(text) = &args.text {
        body.insert("text".into(), json!(text));
    }
    if let Some(comment) = &args.comment {
        body.insert("comment".into(), json!(comment));
    }
    if let Some(budget) = budget(&args.budget) {
        body.insert("budget".into(), budget);
    }
    if args.step.is_some() && args.decision.is_none() && args.values.is_none() && args.text.is_none() {
        return Err(CliError::Usage("with --step, give --decision (a review), or --values or --text (an input step)".to_owned()));
    }
    steer(ctx, &args.run, &format!("/runs/{}/resume", args.run), Value::Object(body), args.follow.follow, Method::Post)
}

/// `cancel` or `pause`: `what` names the route.
pub fn stop(ctx: &Ctx, run: &str, what: &'static str, reason: Option<String>) -> Result<Exit, CliError> {
    ctx.api.require_token(match what {
        "cancel" => "chainrun cancel",
        _ => "chainrun pause",
    })?;
    let body = reason.map_or_else(|| json!({}), |reason| json!({ "reason": reason }));
    steer(ctx, run, &format!("/runs/{run}/{what}"), body, false, Method::Post)
}

pub fn retry(ctx: &Ctx, args: RetryArgs) -> Result<Exit, CliError> {
    ctx.api.require_token("chainrun retry")?;
    let mut body = Map::new();
    if let Some(comment) = &args.comment {
        body.insert("comment".into(), json!(comment));
    }
    if let Some(revision) = args.revision {
        body.insert("revision".into(), json!(revision));
    }
    if let Some(budget) = budget(&args.budget) {
        body.insert("budget".into(), budget);
    }
    steer(ctx, &args.run, &format!("/runs/{}/steps/{}/retry", args.run, args.step), Value::Object(body), args.follow.follow, Method::Post)
}

pub fn set_output(ctx: &Ctx, args: OverrideArgs) -> Result<Exit, CliError> {
    ctx.api.require_token("chainrun override")?;
    let mut body = Map::new();
    body.insert("output".into(), json_arg(&args.output)?);
    if let Some(text) = &args.text {
        body.insert("text".into(), json!(text));
    }
    if let Some(comment) = &args.comment {
        body.insert("comment".into(), json!(comment));
    }
    if let Some(revision) = args.revision {
        body.insert("revision".into(), json!(revision));
    }
    steer(ctx, &args.run, &format!("/runs/{}/steps/{}/output", args.run, args.step), Value::Object(body), args.follow.follow, Method::Put)
}

enum Method {
    Post,
    Put,
}

/// Sends the steering call; with `follow`, shows what the run does from then on.
fn steer(ctx: &Ctx, run: &str, path: &str, body: Value, follow: bool, method: Method) -> Result<Exit, CliError> {
    // Read up to now first, so that only what the call sets off is shown.
    let mut follower = match follow {
        true => {
            let mut f = follower(ctx, run)?;
            f.skip_to_now()?;
            Some(f)
        }
        false => None,
    };
    let answer = match method {
        Method::Post => ctx.api.post(path, &body)?,
        Method::Put => ctx.api.put(path, &body, &[])?,
    };
    match (&mut follower, ctx.ui.json) {
        // `--json --follow` prints the run as it ends, as `run --json` does.
        (Some(_), true) => {}
        (_, true) => ctx.ui.print_json(&answer),
        (f, false) => {
            let line = accepted_line(run, &answer);
            match f {
                Some(f) => f.line(line),
                None => println!("{line}"),
            }
        }
    }
    match follower {
        Some(mut f) => follow_and_report(ctx, &mut f, run),
        None => Ok(Exit::Success),
    }
}

/// What the API accepted, in a line: its status, decision, revision or state.
fn accepted_line(run: &str, answer: &Value) -> String {
    let field = |key: &str| answer.get(key).and_then(Value::as_str).map(str::to_owned);
    let mut parts = vec![bold(&format!("run {run}"))];
    if let Some(control) = answer.get("control") {
        let kind = control.get("kind").and_then(Value::as_str).unwrap_or("control");
        let by = control.get("by").and_then(Value::as_str).unwrap_or("?");
        parts.push(format!("{kind} requested by {by}"));
    }
    if let (Some(kind), Some(revision)) = (field("kind"), answer.get("revision").and_then(Value::as_u64)) {
        let rerun: Vec<&str> = answer.get("rerun").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        parts.push(format!("{kind} of {} starts revision {revision}; runs again: {}", field("step").unwrap_or_default(), rerun.join(", ")));
    }
    if let Some(decided) = answer.get("decision") {
        let of = |key: &str| decided.get(key).and_then(Value::as_str).unwrap_or("?");
        parts.push(format!("{} by {} recorded on {}", of("decision"), of("by"), field("step").unwrap_or_default()));
    }
    if let Some(state) = field("state") {
        parts.push(format!("answer to {} is {state}", field("step").unwrap_or_default()));
    }
    if let Some(resumed) = answer.get("resumed") {
        parts.push(format!("resumed by {}", resumed.get("by").and_then(Value::as_str).unwrap_or("?")));
    }
    if let Some(status) = field("status") {
        parts.push(format!("status {status}"));
    }
    parts.join("  ")
}

/// A budget raise: `max_cost_usd` is sent as the decimal string given, read exactly.
fn budget(raise: &BudgetArgs) -> Option<Value> {
    let mut budget = Map::new();
    if let Some(usd) = &raise.max_cost_usd {
        budget.insert("max_cost_usd".into(), json!(usd));
    }
    if let Some(tokens) = raise.max_total_tokens {
        budget.insert("max_total_tokens".into(), json!(tokens));
    }
    (!budget.is_empty()).then_some(Value::Object(budget))
}
