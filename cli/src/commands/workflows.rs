//! `workflows push | list | show`: stored, versioned definitions.

use super::{Ctx, id_in, items, next_page_hint, page_query, text};
use crate::args::WorkflowsCommand;
use crate::exit::{CliError, Exit};
use crate::source::read_json;
use crate::term::{bold, dim, table};
use serde_json::{Value, json};
use std::path::Path;

pub fn workflows(ctx: &Ctx, command: WorkflowsCommand) -> Result<Exit, CliError> {
    ctx.api.require_token("chainrun workflows")?;
    match command {
        WorkflowsCommand::Push { file, id, visibility } => push(ctx, &file, id, visibility),
        WorkflowsCommand::List { page } => {
            let page = ctx.api.get("/workflows", &page_query(&page))?;
            if ctx.ui.json {
                ctx.ui.print_json(&page);
                return Ok(Exit::Success);
            }
            let mut rows = table(&["id", "name", "version", "visibility", "owner", "updated"], &[2]);
            for w in items(&page) {
                rows.add_row(vec![
                    text(w, "id"),
                    text(w, "name"),
                    text(w, "version"),
                    text(w, "visibility"),
                    text(w, "owner"),
                    text(w, "updated_at"),
                ]);
            }
            println!("{rows}");
            next_page_hint(&page, "chainrun workflows list");
            Ok(Exit::Success)
        }
        WorkflowsCommand::Show { id, version } => {
            let query: Vec<(&str, String)> = version.map(|v| ("version", v.to_string())).into_iter().collect();
            let stored = ctx.api.get(&format!("/workflows/{id}"), &query)?;
            if ctx.ui.json {
                ctx.ui.print_json(&stored);
                return Ok(Exit::Success);
            }
            println!("{}  {}", bold(&format!("workflow {}", text(&stored, "id"))), text(&stored, "name"));
            println!(
                "{}",
                dim(&format!(
                    "version {} of {} · owner {} · written by {} at {}",
                    text(&stored, "version"),
                    text(&stored, "latest_version"),
                    text(&stored, "owner"),
                    text(&stored, "written_by"),
                    text(&stored, "written_at")
                ))
            );
            println!("{}", serde_json::to_string_pretty(stored.get("workflow").unwrap_or(&Value::Null)).unwrap_or_default());
            Ok(Exit::Success)
        }
    }
}

/// A new workflow (`POST /workflows`), or with `id` its next version (`PUT` over the
/// latest version, read first: the API refuses a write that does not say what it replaces).
fn push(ctx: &Ctx, file: &Path, id: Option<String>, visibility: Option<String>) -> Result<Exit, CliError> {
    let document = read_json(file)?;
    // A bare definition, or a body that already has `workflow` (and access).
    let mut body = match document.get("steps") {
        Some(_) => json!({ "workflow": document }),
        None if document.get("workflow").is_some() => document,
        None => return Err(CliError::Usage(format!("{}: neither a definition (`steps`) nor a body with `workflow`", file.display()))),
    };
    let stored = match id {
        Some(id) => {
            let latest = ctx.api.get(&format!("/workflows/{id}"), &[])?;
            let version = latest.get("version").cloned().unwrap_or(Value::Null);
            let update = json!({ "workflow": body["workflow"].take(), "version": version });
            ctx.api.put(&format!("/workflows/{id}"), &update, &[])?
        }
        None => {
            if let Some(visibility) = visibility {
                body["visibility"] = json!(visibility);
            }
            ctx.api.post("/workflows", &body)?
        }
    };
    let id = id_in(&stored, "id", "POST /workflows")?;
    match ctx.ui.json {
        true => ctx.ui.print_json(&stored),
        false => {
            println!("{}  {} version {}", bold(&format!("workflow {id}")), text(&stored, "name"), text(&stored, "version"));
            println!("{}", dim(&format!("run it: chainrun run --workflow {id} --input '{{…}}'")));
        }
    }
    Ok(Exit::Success)
}
