//! `show`: a run's steps, totals and output (and what it waits for); as a Mermaid
//! flowchart (`--mermaid`); or the URL of its view page (`--open`).

use super::Ctx;
use crate::args::ShowArgs;
use crate::exit::{CliError, Exit};
use crate::format::count;
use crate::live::Follower;
use crate::mermaid;
use crate::report;
use crate::term::{bold, dim, status};
use crate::wire::{BATCH_WAIT, BatchJob, Graph, Run};
use serde_json::json;

pub fn show(ctx: &Ctx, args: ShowArgs) -> Result<Exit, CliError> {
    let id = &args.run;
    if args.open {
        return open(ctx, id, args.with_token);
    }
    let query: Vec<(&str, String)> = args.revision.map(|n| ("revision", n.to_string())).into_iter().collect();
    let document = ctx.api.get(&ctx.api.scoped(&format!("/runs/{id}")), &query)?;
    let run: Run =
        serde_json::from_value(document.clone()).map_err(|e| CliError::Unexpected { what: format!("GET /runs/{id}"), message: e.to_string() })?;
    if args.mermaid {
        let graph: Graph = ctx.api.get_as(&ctx.api.scoped(&format!("/runs/{id}/graph")), &[])?;
        let chart = mermaid::flowchart(&graph, &run);
        match ctx.ui.json {
            true => ctx.ui.print_json(&json!({ "run_id": run.run_id, "revision": run.revision, "mermaid": chart })),
            false => print!("{chart}"),
        }
        return Ok(Exit::Success);
    }
    if ctx.ui.json {
        ctx.ui.print_json(&document);
        return Ok(Exit::Success);
    }
    println!("{}  {}  {}", bold(&format!("run {}", run.run_id)), run.workflow, status(&run.status));
    let when: Vec<String> = [("created", &run.created_at), ("started", &run.started_at), ("finished", &run.finished_at)]
        .into_iter()
        .filter_map(|(what, at)| at.as_ref().map(|at| format!("{what} {at}")))
        .collect();
    println!("{}", dim(&format!("by {} · {}", run.caller.as_deref().unwrap_or("?"), when.join(" · "))));
    if !run.revisions.is_empty() {
        println!("revision {} of {}", run.revision, run.revisions.len());
        for r in &run.revisions {
            let comment = r.comment.as_ref().map(|c| format!(" — {c}")).unwrap_or_default();
            println!(
                "  {} {}: {} of {} by {} after {}; ran again: {}{comment}",
                dim("·"),
                r.revision,
                r.kind,
                r.step,
                r.by,
                r.previous_status,
                if r.rerun.is_empty() { "-".to_owned() } else { r.rerun.join(", ") }
            );
        }
    }
    report::print(&run, &[], &batch_jobs(ctx, &run)?, ctx.api.base());
    println!("{}", dim(&format!("{} · {}", count(run.totals.total_tokens, "token"), count(run.totals.model_calls, "model call"))));
    Ok(Exit::Success)
}

/// The batch jobs a run waits for, as its events said them last: a map's checkpoint need
/// not record its job before the job is read. Nothing is read for any other run.
fn batch_jobs(ctx: &Ctx, run: &Run) -> Result<Vec<(String, BatchJob)>, CliError> {
    if run.waiting.as_ref().is_none_or(|w| w.kind != BATCH_WAIT) {
        return Ok(Vec::new());
    }
    let mut events = Follower::new(&ctx.api, ctx.ui, &run.run_id, &[]);
    events.skip_to_now()?;
    Ok(events.batches())
}

/// The view page's URL. The page reads a token from its fragment (never sent to a server,
/// kept out of logs), and asks for one without it: only `--with-token` puts it there.
fn open(ctx: &Ctx, id: &str, with_token: bool) -> Result<Exit, CliError> {
    let mut url = format!("{}/runs/{id}/view", ctx.api.base());
    if with_token {
        ctx.api.require_token("chainrun show --open --with-token")?;
        url.push_str(&format!("#token={}", ctx.api.token().unwrap_or_default()));
    }
    match ctx.ui.json {
        true => ctx.ui.print_json(&json!({ "run_id": id, "url": url })),
        false => println!("{url}"),
    }
    Ok(Exit::Success)
}
