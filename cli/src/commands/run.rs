//! `run` starts a run and follows it; `watch` follows one that exists. Both end as the run
//! does: the exit status says completed (0), failed or cancelled (1), waits for input (3).
//! A run waiting for its maps' batch jobs waits for nobody: it is followed on.

use super::{Ctx, id_in};
use crate::args::RunArgs;
use crate::exit::{CliError, Exit};
use crate::live::Follower;
use crate::report;
use crate::source::Source;
use crate::term::{bold, dim};
use crate::wire::{Run, is_terminal};
use serde_json::{Value, json};

pub fn run(ctx: &Ctx, args: RunArgs) -> Result<Exit, CliError> {
    let (path, body) = match Source::of(&args.source)? {
        Source::Stored { id, mut body } => {
            if args.auto_approve {
                body["options"] = json!({ "auto_approve": true });
            }
            // Without a token: a PUBLIC workflow may still be run, under /public.
            (ctx.api.scoped(&format!("/workflows/{id}/runs")), body)
        }
        Source::File(request) => {
            // An inline definition has no owner who could have made it public.
            ctx.api.require_token("chainrun run FILE")?;
            let mut body = json!({ "workflow": request.workflow, "input": request.input });
            let mut options = request.options;
            if args.auto_approve {
                options.insert("auto_approve".to_owned(), json!(true));
            }
            if !options.is_empty() {
                body["options"] = Value::Object(options);
            }
            ("/runs".to_owned(), body)
        }
    };
    let accepted = ctx.api.post(&path, &body)?;
    let run_id = id_in(&accepted, "run_id", "POST /runs")?;
    if !ctx.ui.json {
        for line in crate::api::warnings(&accepted) {
            eprintln!("{line}");
        }
    }
    if args.detach {
        match ctx.ui.json {
            true => ctx.ui.print_json(&accepted),
            false => println!("{run_id}"),
        }
        return Ok(Exit::Success);
    }
    watch(ctx, &run_id)
}

pub fn watch(ctx: &Ctx, run_id: &str) -> Result<Exit, CliError> {
    let mut follower = follower(ctx, run_id)?;
    follow_and_report(ctx, &mut follower, run_id)
}

/// A follower for the run, its columns sized by the run's steps; announces the run.
pub fn follower<'a>(ctx: &'a Ctx, run_id: &str) -> Result<Follower<'a>, CliError> {
    let run: Run = ctx.api.get_as(&ctx.api.scoped(&format!("/runs/{run_id}")), &[])?;
    let ids: Vec<String> = run.steps.iter().map(|s| s.id.clone()).collect();
    let mut follower = Follower::new(&ctx.api, ctx.ui, run_id, &ids);
    follower.line(format!("{} {}  {}", bold(&format!("run {run_id}")), run.workflow, dim(&format!("{} steps · {}", ids.len(), ctx.api.base()))));
    Ok(follower)
}

/// Follows the run until it ends or waits, then shows (or with `--json` prints) the run
/// as it stands, and exits as it does.
pub fn follow_and_report(ctx: &Ctx, follower: &mut Follower, run_id: &str) -> Result<Exit, CliError> {
    loop {
        follower.follow()?;
        let document = ctx.api.get(&ctx.api.scoped(&format!("/runs/{run_id}")), &[])?;
        let run: Run = serde_json::from_value(document.clone())
            .map_err(|e| CliError::Unexpected { what: format!("GET /runs/{run_id}"), message: e.to_string() })?;
        // Someone may have resumed a waiting run between the last event and this read; a
        // run waiting for its batch jobs goes on by itself.
        if is_terminal(&run.status) || run.waits_for_a_person() {
            match ctx.ui.json {
                true => ctx.ui.print_json(&document),
                false => report::print(&run, &follower.asked(), &follower.batches(), ctx.api.base()),
            }
            return Ok(report::exit_of(&run));
        }
    }
}
