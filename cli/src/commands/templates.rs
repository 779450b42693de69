//! `templates [ID]`: the built-in and saved templates, or one with its definition.

use super::{Ctx, items, next_page_hint, page_query, text};
use crate::args::PageArgs;
use crate::exit::{CliError, Exit};
use crate::term::{bold, dim, table};
use serde_json::Value;

pub fn templates(ctx: &Ctx, id: Option<String>, page: PageArgs) -> Result<Exit, CliError> {
    ctx.api.require_token("chainrun templates")?;
    let Some(id) = id else {
        let page = ctx.api.get("/templates", &page_query(&page))?;
        if ctx.ui.json {
            ctx.ui.print_json(&page);
            return Ok(Exit::Success);
        }
        let mut rows = table(&["id", "kind", "title", "shows"], &[]);
        for t in items(&page) {
            rows.add_row(vec![text(t, "id"), text(t, "kind"), text(t, "title"), text(t, "shows")]);
        }
        println!("{rows}");
        next_page_hint(&page, "chainrun templates");
        return Ok(Exit::Success);
    };
    let template = ctx.api.get(&format!("/templates/{id}"), &[])?;
    if ctx.ui.json {
        ctx.ui.print_json(&template);
        return Ok(Exit::Success);
    }
    println!("{}  {}", bold(&format!("template {}", text(&template, "id"))), text(&template, "title"));
    println!("{}", text(&template, "description"));
    println!("{}", dim(&format!("{} · shows {}", text(&template, "kind"), text(&template, "shows"))));
    let pretty = |v: Option<&Value>| serde_json::to_string_pretty(v.unwrap_or(&Value::Null)).unwrap_or_default();
    println!("{}\n{}", bold("workflow:"), pretty(template.get("workflow")));
    if let Some(example) = template.get("example_input") {
        println!("{}\n{}", bold("example input:"), pretty(Some(example)));
        println!("{}", dim(&format!("store it: chainrun workflows push FILE, or POST /workflows {{\"template\": \"{id}\"}}")));
    }
    Ok(Exit::Success)
}
