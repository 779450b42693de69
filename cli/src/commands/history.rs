//! `runs`, `costs` and `spend`: what ran, and what it cost.

use super::{Ctx, items, next_page_hint, num, page_query, text};
use crate::args::RunsArgs;
use crate::exit::{CliError, Exit};
use crate::format::{latency, usd};
use crate::term::{bold, dim, table};
use serde_json::Value;

pub fn runs(ctx: &Ctx, args: RunsArgs) -> Result<Exit, CliError> {
    ctx.api.require_token("chainrun runs")?;
    let mut query = page_query(&args.page);
    if let Some(workflow) = &args.workflow {
        query.push(("workflow", workflow.clone()));
    }
    let page = ctx.api.get("/runs", &query)?;
    if ctx.ui.json {
        ctx.ui.print_json(&page);
        return Ok(Exit::Success);
    }
    let mut rows = table(&["run", "workflow", "status", "created", "tokens", "cost", "error"], &[4, 5]);
    for run in items(&page) {
        let totals = run.get("totals").unwrap_or(&Value::Null);
        let error = run.get("error").and_then(|e| e.get("code")).and_then(Value::as_str).unwrap_or_default();
        rows.add_row(vec![
            text(run, "run_id"),
            text(run, "workflow"),
            text(run, "status"),
            text(run, "created_at"),
            totals.get("total_tokens").and_then(Value::as_u64).unwrap_or(0).to_string(),
            usd(totals.get("cost_usd").and_then(Value::as_str)),
            error.to_owned(),
        ]);
    }
    println!("{rows}");
    next_page_hint(&page, "chainrun runs");
    Ok(Exit::Success)
}

pub fn costs(ctx: &Ctx, days: u32, scope: Option<String>) -> Result<Exit, CliError> {
    ctx.api.require_token("chainrun costs")?;
    let mut query = vec![("days", days.to_string())];
    if let Some(scope) = scope {
        query.push(("scope", scope));
    }
    let report = ctx.api.get("/analytics/costs", &query)?;
    if ctx.ui.json {
        ctx.ui.print_json(&report);
        return Ok(Exit::Success);
    }
    println!(
        "{}",
        bold(&format!(
            "costs over {} days, {} to {} (scope {})",
            num(&report, "days"),
            text(&report, "from"),
            text(&report, "to"),
            text(&report, "scope")
        ))
    );
    let mut rows = table(&["workflow / step", "runs", "failures", "failure rate", "total cost", "avg cost", "avg latency"], &[1, 2, 3, 4, 5, 6]);
    let workflows = report.get("workflows").and_then(Value::as_array).cloned().unwrap_or_default();
    for workflow in &workflows {
        rows.add_row(sums(text(workflow, "workflow"), workflow));
        for step in workflow.get("steps").and_then(Value::as_array).into_iter().flatten() {
            rows.add_row(sums(format!("  {}", text(step, "step_id")), step));
        }
    }
    match workflows.is_empty() {
        true => println!("{}", dim("no runs ended in that time")),
        false => println!("{rows}"),
    }
    Ok(Exit::Success)
}

/// A row of counts, sums and averages (`CostSumsView`).
fn sums(name: String, s: &Value) -> Vec<String> {
    vec![
        name,
        num(s, "runs").to_string(),
        num(s, "failures").to_string(),
        text(s, "failure_rate"),
        usd(s.get("total_cost_usd").and_then(Value::as_str)),
        usd(s.get("avg_cost_usd").and_then(Value::as_str)),
        latency(num(s, "avg_latency_ms")),
    ]
}

pub fn spend(ctx: &Ctx) -> Result<Exit, CliError> {
    ctx.api.require_token("chainrun spend")?;
    let spend = ctx.api.get("/analytics/spend", &[])?;
    if ctx.ui.json {
        ctx.ui.print_json(&spend);
        return Ok(Exit::Success);
    }
    println!("{}", bold(&format!("spend of {} on {} (UTC)", text(&spend, "owner"), text(&spend, "day"))));
    for (label, key) in [("charged", "charged_usd"), ("held", "held_usd"), ("lost", "lost_usd"), ("cap", "cap_usd"), ("remaining", "remaining_usd")] {
        let amount = match spend.get(key) {
            Some(Value::String(s)) => usd(Some(s)),
            _ => dim("no cap"),
        };
        println!("  {label:<10} {amount}");
    }
    Ok(Exit::Success)
}
