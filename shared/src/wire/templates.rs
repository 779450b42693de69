//! What the template routes answer: a built-in or saved template, in one shape, as lists
//! show it and, with its definition, read whole.

use crate::ids::UserId;
use crate::stored::Pinned;
use crate::templates::{Builtin, SavedTemplate};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TemplateKind {
    /// Shipped with chainrun; everyone sees it.
    Builtin,
    /// Saved from a stored workflow by its `owner`.
    Saved,
}

/// Where to read a template, and where to create a workflow from it (`POST` with
/// `{ "template": <id> }`).
#[derive(Debug, Serialize, JsonSchema)]
pub struct TemplateLinks {
    #[serde(rename = "self")]
    pub this: String,
    pub create_workflow: &'static str,
}

/// A template. Every field is always present (`null` where it does not apply), so
/// clients read one shape for both kinds; `workflow` and `example_input` only when the
/// template is read whole (`GET /templates/{id}`, and what a save answers).
#[derive(Debug, Serialize, JsonSchema)]
pub struct TemplateView<'a> {
    pub id: &'a str,
    pub kind: TemplateKind,
    pub title: &'a str,
    pub description: Option<&'a str>,
    /// The definition's workflow name.
    pub name: &'a str,
    /// The workflow-language features a built-in shows (empty for saved ones).
    pub shows: &'a [&'static str],
    /// Who saved it (`null` for built-ins).
    pub owner: Option<&'a UserId>,
    /// The stored workflow and version it was saved from (`null` for built-ins).
    pub source: Option<&'a Pinned>,
    pub created_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<crate::workflow::WorkflowDef>")]
    pub workflow: Option<&'a Value>,
    /// An input a built-in's definition accepts (`null` for saved ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub example_input: Option<Option<&'a Value>>,
    pub links: TemplateLinks,
}

fn links(id: &str) -> TemplateLinks {
    TemplateLinks { this: format!("/templates/{id}"), create_workflow: "/workflows" }
}

impl<'a> TemplateView<'a> {
    pub fn builtin(b: &'static Builtin) -> Self {
        Self {
            id: b.id,
            kind: TemplateKind::Builtin,
            title: b.title,
            description: Some(b.description),
            name: b.definition().get("name").and_then(Value::as_str).unwrap_or(b.id),
            shows: b.shows,
            owner: None,
            source: None,
            created_at: None,
            workflow: None,
            example_input: None,
            links: links(b.id),
        }
    }

    pub fn saved(t: &'a SavedTemplate) -> Self {
        Self {
            id: t.id.as_str(),
            kind: TemplateKind::Saved,
            title: &t.title,
            description: t.description.as_deref(),
            name: t.name.as_str(),
            shows: &[],
            owner: Some(&t.owner),
            source: Some(&t.source),
            created_at: Some(t.created_at),
            workflow: None,
            example_input: None,
            links: links(t.id.as_str()),
        }
    }

    /// The built-in read whole: with its definition and example input.
    pub fn builtin_whole(b: &'static Builtin) -> Self {
        Self { workflow: Some(b.definition()), example_input: Some(Some(b.example_input())), ..Self::builtin(b) }
    }

    /// The saved template read whole: with its definition.
    pub fn saved_whole(t: &'a SavedTemplate) -> Self {
        Self { workflow: Some(&t.definition), example_input: Some(None), ..Self::saved(t) }
    }
}
