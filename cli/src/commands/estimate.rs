//! `estimate`: per step and in total, the least, expected and most a run may cost, before
//! running it (`POST /workflows/estimate`, or a stored workflow's).

use super::{Ctx, text};
use crate::args::EstimateArgs;
use crate::exit::{CliError, Exit};
use crate::format::usd;
use crate::source::Source;
use crate::term::{dim, table};
use serde_json::{Value, json};

pub fn estimate(ctx: &Ctx, args: EstimateArgs) -> Result<Exit, CliError> {
    let (path, body) = match Source::of(&args.source)? {
        Source::Stored { id, body } => (ctx.api.scoped(&format!("/workflows/{id}/estimate")), body),
        Source::File(request) => {
            ctx.api.require_token("chainrun estimate FILE")?;
            ("/workflows/estimate".to_owned(), json!({ "workflow": request.workflow, "input": request.input }))
        }
    };
    let estimate = ctx.api.post(&path, &body)?;
    if ctx.ui.json {
        ctx.ui.print_json(&estimate);
        return Ok(Exit::Success);
    }
    let mut rows = table(&["step", "min", "expected", "max", "max bounded by"], &[1, 2, 3]);
    for step in estimate.get("steps").and_then(Value::as_array).into_iter().flatten() {
        let basis = match step.get("max_items").and_then(Value::as_u64) {
            Some(items) => format!("{} × {items} items", text(step, "max_basis")),
            None => text(step, "max_basis"),
        };
        rows.add_row(vec![text(step, "step_id"), bound(step, "min"), bound(step, "expected"), bound(step, "max"), basis]);
    }
    let total = estimate.get("total").unwrap_or(&Value::Null);
    rows.add_row(vec!["total".to_owned(), bound(total, "min"), bound(total, "expected"), bound(total, "max"), String::new()]);
    println!("{rows}");
    let runs = estimate.get("history_runs").and_then(Value::as_u64).unwrap_or(0);
    let basis = match text(&estimate, "basis").as_str() {
        "history" => format!("expected: from {runs} earlier runs of this workflow"),
        _ => "expected: a heuristic (one attempt, half of max_tokens out); no earlier runs".to_owned(),
    };
    println!("{}", dim(&basis));
    for line in crate::api::warnings(&estimate) {
        eprintln!("{line}");
    }
    Ok(Exit::Success)
}

/// `$0.00005383 (638 tokens)`.
fn bound(v: &Value, key: &str) -> String {
    let Some(b) = v.get(key) else { return "-".to_owned() };
    format!("{} ({} tokens)", usd(b.get("cost_usd").and_then(Value::as_str)), b.get("tokens").and_then(Value::as_u64).unwrap_or(0))
}
