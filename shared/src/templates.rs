//! Workflow templates: complete workflows to start from.
//!
//! Two kinds share one list (`GET /templates`):
//! - **built-ins** ([`Builtin`]), the chains our users kept writing by hand — feedback
//!   analysis, code review, sentiment routing, a content pipeline with a review gate,
//!   support intake with slot collection. Each is a definition file in
//!   `shared/templates/`, compiled in with `include_str!`, so a deployed function can never
//!   list a template whose file it lacks; a test validates each against the default model
//!   registry and runs it to completion.
//! - **saved** templates ([`SavedTemplate`]): a snapshot of one version of a stored
//!   workflow, kept under its own id. A snapshot, not a reference, because a template is
//!   something other workflows are created from: editing or deleting the workflow it came
//!   from must not change what a template creates (it records where it came from in
//!   `source`).
//!
//! Ids cannot collide: a built-in's id is a slug with a hyphen (`code-review`), a saved
//! template's a ULID, which has none.
//!
//! Access: for now a saved template is seen by its owner only; built-ins by everyone. The
//! API keeps that rule in one function, to widen when workflows get visibility.

use crate::ids::{InvalidId, UserId, WorkflowName};
use crate::stored::Pinned;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::fmt;
use std::sync::{Arc, OnceLock};

/// A built-in template: what it is for, and its definition.
#[derive(Debug)]
pub struct Builtin {
    pub id: &'static str,
    pub title: &'static str,
    pub description: &'static str,
    /// The workflow-language features it shows, so a reader can pick the one to copy.
    pub shows: &'static [&'static str],
    source: &'static str,
    example_input: &'static str,
}

impl Builtin {
    /// The definition, parsed once per process.
    pub fn definition(&self) -> &'static Value {
        &self.parsed().0
    }

    /// An input the definition accepts: what a first run can be started with.
    pub fn example_input(&self) -> &'static Value {
        &self.parsed().1
    }

    fn parsed(&self) -> &'static (Value, Value) {
        static PARSED: OnceLock<Vec<(Value, Value)>> = OnceLock::new();
        // The files are compiled in and a unit test parses every one: a failure here is a
        // defect of the build, not of a request.
        let parse =
            |id: &str, raw: &str| -> Value { serde_json::from_str(raw).unwrap_or_else(|e| panic!("built-in template {id} is not valid JSON: {e}")) };
        let all = PARSED.get_or_init(|| BUILTINS.iter().map(|b| (parse(b.id, b.source), parse(b.id, b.example_input))).collect());
        let index = BUILTINS.iter().position(|b| b.id == self.id).unwrap_or_default();
        &all[index]
    }
}

/// The built-ins, in the order `GET /templates` lists them.
pub static BUILTINS: [Builtin; 5] = [
    Builtin {
        id: "feedback-analysis",
        title: "Feedback analysis",
        description: "Extracts the issues in a customer's feedback, classifies its sentiment and summarises it in parallel, \
                      suggests one fix per issue, and drafts a reply.",
        shows: &["parallel steps", "json output with a schema", "map over a list", "output template", "budget", "input_schema"],
        source: include_str!("../templates/feedback-analysis.json"),
        example_input: r#"{ "feedback": "The app logs me out every time I switch networks, and the CSV export drops the last row. Support took four days to answer." }"#,
    },
    Builtin {
        id: "code-review",
        title: "Code review",
        description: "Reviews a diff with three independent checks run in parallel (correctness, security, style), counts the \
                      blocking findings, and summarises the checks into one review with a verdict.",
        shows: &["parallel checks joined by a summary", "json output with a schema", "CEL transform", "per-step model", "budget"],
        source: include_str!("../templates/code-review.json"),
        example_input: r#"{ "language": "Python", "diff": "-    rows = db.query(\"SELECT * FROM users WHERE id = %s\", user_id)\n+    rows = db.query(f\"SELECT * FROM users WHERE id = {user_id}\")" }"#,
    },
    Builtin {
        id: "sentiment-routing",
        title: "Sentiment routing",
        description: "Classifies a customer message; a router sends negative or urgent ones to a human agent with a hand-off \
                      note and answers the rest automatically.",
        shows: &["router", "skipped branches", "join: any", "json output with a schema", "budget"],
        source: include_str!("../templates/sentiment-routing.json"),
        example_input: r#"{ "message": "This is the third time my order arrived broken. I want a refund today." }"#,
    },
    Builtin {
        id: "content-pipeline",
        title: "Content pipeline with a review gate",
        description: "Outlines and drafts a post, holds the draft for an editor (approve, edit or reject; rejected after 7 days \
                      unanswered), then writes a headline and social posts from the approved text in parallel.",
        shows: &["review step (human gate)", "review deadline", "edited output flows downstream", "json output with a schema"],
        source: include_str!("../templates/content-pipeline.json"),
        example_input: r#"{ "topic": "Running LLM workflows on AWS Lambda", "audience": "backend engineers" }"#,
    },
    Builtin {
        id: "support-intake",
        title: "Support intake with slot collection",
        description: "Rates a support request's urgency while asking the customer for what a ticket needs (order number, kind \
                      of problem, email) over as many answers as it takes, in their own words or as values; then files the \
                      ticket and acknowledges it.",
        shows: &["input step (multi-turn slot collection)", "values read from free text", "input deadline", "json output with a schema"],
        source: include_str!("../templates/support-intake.json"),
        example_input: r#"{ "message": "My package never arrived.", "customer_name": "Ada" }"#,
    },
];

/// The built-in with this id, if any.
pub fn builtin(id: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.id == id)
}

/// A saved template's id: a ULID (see the module docs for why it cannot be a built-in's).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TemplateId(Arc<str>);

impl TemplateId {
    pub fn new() -> Self {
        Self(ulid::Ulid::new().to_string().into())
    }

    /// Parses an id that came from outside (a path segment, a stored item).
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        ulid::Ulid::from_string(raw)
            .map(|u| Self(u.to_string().into()))
            .map_err(|_| InvalidId { kind: "template id", value: raw.chars().take(64).collect() })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TemplateId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TemplateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A template saved from one version of a stored workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedTemplate {
    pub id: TemplateId,
    /// Who saved it; the only one who may see it (for now).
    pub owner: UserId,
    pub title: String,
    pub description: Option<String>,
    /// The definition's `name`.
    pub name: WorkflowName,
    /// The stored workflow and version it was saved from.
    pub source: Pinned,
    /// The definition as it was in that version (validated when that version was written).
    pub definition: Value,
    pub created_at: DateTime<Utc>,
}

/// The longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 128;
/// The longest description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 2000;

/// Why a title or description was refused: the field and what is wrong, for a `400`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    pub field: &'static str,
    pub message: String,
}

/// A template's title: 1 to [`MAX_TITLE_CHARS`] characters, not blank; surrounding space
/// trimmed.
pub fn title(raw: &str) -> Result<String, InvalidField> {
    let trimmed = raw.trim();
    let chars = trimmed.chars().count();
    if chars == 0 {
        return Err(InvalidField { field: "title", message: "must not be empty".into() });
    }
    if chars > MAX_TITLE_CHARS {
        return Err(InvalidField { field: "title", message: format!("at most {MAX_TITLE_CHARS} characters; got {chars}") });
    }
    Ok(trimmed.to_owned())
}

/// A template's description: at most [`MAX_DESCRIPTION_CHARS`] characters; blank is none.
pub fn description(raw: &str) -> Result<Option<String>, InvalidField> {
    let trimmed = raw.trim();
    let chars = trimmed.chars().count();
    if chars > MAX_DESCRIPTION_CHARS {
        return Err(InvalidField { field: "description", message: format!("at most {MAX_DESCRIPTION_CHARS} characters; got {chars}") });
    }
    Ok((!trimmed.is_empty()).then(|| trimmed.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::validate_json;
    use crate::pricing::ModelRegistry;

    #[test]
    fn every_builtin_validates_against_the_default_model_registry_and_accepts_its_example_input() {
        let models = ModelRegistry::builtin();
        for b in &BUILTINS {
            let graph = validate_json(b.definition(), &models).unwrap_or_else(|e| panic!("{}: {e}", b.id));
            assert_eq!(graph.name().as_str(), b.id, "a built-in's workflow is named as its id");
            graph.check_input(b.example_input()).unwrap_or_else(|e| panic!("{}: example input refused: {e:?}", b.id));
            assert!(b.definition().get("budget").is_some(), "{}: every built-in carries a budget", b.id);
        }
    }

    #[test]
    fn builtin_ids_are_unique_slugs_no_saved_id_can_take() {
        let mut ids: Vec<&str> = BUILTINS.iter().map(|b| b.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), BUILTINS.len());
        for id in ids {
            assert!(id.contains('-') && id.chars().all(|c| c.is_ascii_lowercase() || c == '-'), "{id}");
            assert!(TemplateId::parse(id).is_err(), "{id} parses as a saved template's id");
            assert_eq!(builtin(id).map(|b| b.id), Some(id));
        }
        assert!(builtin("nope").is_none());
    }

    #[test]
    fn titles_and_descriptions_are_trimmed_bounded_and_name_their_field() {
        assert_eq!(title("  Review  ").unwrap(), "Review");
        assert_eq!(title("   ").unwrap_err().field, "title");
        assert!(title(&"x".repeat(MAX_TITLE_CHARS)).is_ok());
        assert!(title(&"x".repeat(MAX_TITLE_CHARS + 1)).unwrap_err().message.contains("at most 128"));
        assert_eq!(description("  ").unwrap(), None);
        assert_eq!(description(" why ").unwrap().as_deref(), Some("why"));
        assert_eq!(description(&"é".repeat(MAX_DESCRIPTION_CHARS + 1)).unwrap_err().field, "description");
    }

    #[test]
    fn template_ids_round_trip_and_garbage_is_refused() {
        let id = TemplateId::new();
        assert_eq!(TemplateId::parse(id.as_str()).unwrap(), id);
        assert!(TemplateId::parse("not-an-id").is_err());
    }
}
