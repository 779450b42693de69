//! One file per group of commands. Each takes its arguments and a [`Ctx`], and returns the
//! exit status; what it prints depends on `ctx.ui` (human or `--json`).

mod control;
mod estimate;
mod history;
mod run;
mod show;
mod templates;
mod workflows;

use crate::api::Api;
use crate::args::{Cli, Command};
use crate::exit::{CliError, Exit};
use crate::term::Ui;

pub struct Ctx {
    pub api: Api,
    pub ui: Ui,
}

pub fn dispatch(cli: Cli, ui: Ui) -> Result<Exit, CliError> {
    let connection = crate::connect::resolve(&cli.global)?;
    let ctx = Ctx { api: Api::new(&connection.api_url, connection.token), ui };
    match cli.command {
        Command::Run(args) => run::run(&ctx, args),
        Command::Watch { run } => run::watch(&ctx, &run),
        Command::Show(args) => show::show(&ctx, args),
        Command::Runs(args) => history::runs(&ctx, args),
        Command::Estimate(args) => estimate::estimate(&ctx, args),
        Command::Costs { days, scope } => history::costs(&ctx, days, scope),
        Command::Spend => history::spend(&ctx),
        Command::Resume(args) => control::resume(&ctx, args),
        Command::Cancel { run, reason } => control::stop(&ctx, &run, "cancel", reason),
        Command::Pause { run, reason } => control::stop(&ctx, &run, "pause", reason),
        Command::Retry(args) => control::retry(&ctx, args),
        Command::Override(args) => control::set_output(&ctx, args),
        Command::Workflows(command) => workflows::workflows(&ctx, command),
        Command::Templates { id, page } => templates::templates(&ctx, id, page),
    }
}

/// The id in an answer that must have one (`run_id`, `id`).
pub fn id_in(answer: &serde_json::Value, key: &str, what: &str) -> Result<String, CliError> {
    answer
        .get(key)
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| CliError::Unexpected { what: what.to_owned(), message: format!("no `{key}` in the answer") })
}

/// `limit` and `next` as query pairs.
pub fn page_query(page: &crate::args::PageArgs) -> Vec<(&'static str, String)> {
    let mut query = Vec::new();
    if let Some(limit) = page.limit {
        query.push(("limit", limit.to_string()));
    }
    if let Some(next) = &page.next {
        query.push(("next", next.clone()));
    }
    query
}

/// Where the next page is, for a human reading a list.
pub fn next_page_hint(page: &serde_json::Value, command: &str) {
    if let Some(next) = page.get("next").and_then(serde_json::Value::as_str) {
        println!("{}", crate::term::dim(&format!("more: {command} --next {next}")));
    }
}

/// The items of a list page.
pub fn items(page: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    page.get("items").and_then(serde_json::Value::as_array).into_iter().flatten()
}

/// A field shown as text: a string as it is, anything else as JSON, `-` when absent.
pub fn text(v: &serde_json::Value, key: &str) -> String {
    match v.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        None | Some(serde_json::Value::Null) => "-".to_owned(),
        Some(other) => other.to_string(),
    }
}

pub fn num(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0)
}
