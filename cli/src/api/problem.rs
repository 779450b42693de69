//! The API's refusals: `application/problem+json` documents (RFC 9457), read into one type
//! and shown to people as the document says them — title, detail, and each problem with
//! its step, field and message — never as a raw dump.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt::Write;

/// A problem document as `functions/api/src/error.rs` writes it. Fields the CLI does not
/// know are kept (`rest`) and shown too, so a newer API's details are not lost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// `urn:chainrun:problem:<kind>`.
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub detail: String,
    /// An invalid workflow: every problem, each naming its step and field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Located>,
    /// An invalid answer to an input step: each field without a valid value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Located>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts_left: Option<u32>,
    /// Seconds until a `429`'s retry may be admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// One problem: where (step, field, path) and what.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Located {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default)]
    pub message: String,
}

impl Problem {
    /// The problem an answer carries: its document when it is one, otherwise one made from
    /// its status and (the start of) its text.
    pub fn from_answer(status: u16, body: &str) -> Self {
        match serde_json::from_str::<Problem>(body) {
            Ok(problem) if !problem.title.is_empty() || !problem.detail.is_empty() => Problem { status, ..problem },
            _ => Problem {
                kind: format!("urn:chainrun:problem:http-{status}"),
                title: reason(status).to_owned(),
                status,
                detail: body.trim().chars().take(500).collect(),
                ..Problem::default()
            },
        }
    }

    /// The `<kind>` of `urn:chainrun:problem:<kind>`.
    pub fn code(&self) -> &str {
        self.kind.rsplit(':').next().unwrap_or(&self.kind)
    }

    /// For people: a headline, the detail, then one line per problem.
    pub fn render(&self) -> String {
        let mut out = format!("error: {} (HTTP {}", self.title, self.status);
        if !self.code().is_empty() {
            let _ = write!(out, ", {}", self.code());
        }
        out.push(')');
        if !self.detail.is_empty() {
            let _ = write!(out, "\n  {}", self.detail);
        }
        for p in self.problems.iter().chain(&self.errors) {
            let _ = write!(out, "\n  - {}", p.render());
        }
        if let Some(n) = self.attempts_left {
            let _ = write!(out, "\n  {n} answer{} left", if n == 1 { "" } else { "s" });
        }
        if let Some(s) = self.retry_after {
            let _ = write!(out, "\n  retry after {s} s");
        }
        for (key, value) in &self.rest {
            let shown = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = write!(out, "\n  {key}: {shown}");
        }
        out
    }
}

/// The `warnings` an accepted run or an estimate carries (a model that is legacy on
/// Bedrock or near its end of life), one line each, for stderr.
pub fn warnings(document: &Value) -> Vec<String> {
    let listed: Vec<Located> = document.get("warnings").and_then(|w| serde_json::from_value(w.clone()).ok()).unwrap_or_default();
    listed.iter().map(|w| format!("warning: {}", w.render())).collect()
}

impl Located {
    fn render(&self) -> String {
        let place: Vec<String> = [("step", &self.step), ("field", &self.field), ("path", &self.path)]
            .into_iter()
            .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name} {v}")))
            .collect();
        match place.is_empty() {
            true => self.message.clone(),
            false => format!("{}: {}", place.join(", "), self.message),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not found",
        405 => "Method not allowed",
        409 => "Conflict",
        413 => "Request body too large",
        422 => "Unprocessable request",
        429 => "Too many requests",
        500..=599 => "Server error",
        _ => "Refused",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_workflow_lists_each_problem_with_its_step_and_field() {
        let body = r#"{"type":"urn:chainrun:problem:bad-request","title":"Invalid workflow","status":400,
            "detail":"invalid workflow: 2 problems",
            "problems":[{"step":"reply","field":"prompt","message":"references unknown step \"summry\""},
                        {"field":"name","message":"must not be empty"}]}"#;
        let shown = Problem::from_answer(400, body).render();
        assert_eq!(
            shown,
            "error: Invalid workflow (HTTP 400, bad-request)\n  invalid workflow: 2 problems\n  \
             - step reply, field prompt: references unknown step \"summry\"\n  - field name: must not be empty"
        );
    }

    #[test]
    fn an_invalid_answer_names_its_fields_and_the_answers_left() {
        let body = r#"{"type":"urn:chainrun:problem:invalid-answer","title":"Invalid answer","status":422,"detail":"1 field",
            "errors":[{"field":"account_id","message":"does not match"}],"attempts_left":1}"#;
        let shown = Problem::from_answer(422, body).render();
        assert!(shown.contains("- field account_id: does not match"), "{shown}");
        assert!(shown.ends_with("1 answer left"), "{shown}");
    }

    #[test]
    fn fields_it_does_not_know_are_shown_not_dropped() {
        let body = r#"{"type":"urn:chainrun:problem:conflict","title":"Conflict","status":409,"detail":"taken","step":"check"}"#;
        assert!(Problem::from_answer(409, body).render().ends_with("\n  step: check"));
    }

    #[test]
    fn an_answer_that_is_not_a_problem_document_becomes_one_from_its_status() {
        let problem = Problem::from_answer(502, "<html>Bad Gateway</html>\n");
        assert_eq!(problem.title, "Server error");
        assert_eq!(problem.detail, "<html>Bad Gateway</html>");
        assert_eq!(problem.code(), "http-502");
    }

    #[test]
    fn an_accepted_runs_warnings_are_one_line_each_naming_step_and_field() {
        let accepted = serde_json::json!({ "run_id": "01K", "warnings": [
            { "step": "old", "field": "model", "message": "m is a legacy model on Bedrock since 2025-11-01" },
            { "step": "each", "field": "step.model", "message": "n reaches its end of life on 2027-01-01" } ] });
        assert_eq!(
            warnings(&accepted),
            [
                "warning: step old, field model: m is a legacy model on Bedrock since 2025-11-01",
                "warning: step each, field step.model: n reaches its end of life on 2027-01-01",
            ]
        );
        assert!(warnings(&serde_json::json!({ "run_id": "01K" })).is_empty());
    }
}
