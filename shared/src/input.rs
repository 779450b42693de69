//! `input` steps: the fields a step asks for, how an answer is checked against them, and
//! what a run keeps of the answers between turns.
//!
//! Pure: no async, no store. The API checks a `values` answer here before recording it;
//! the engine checks what a model read from a free-text answer the same way, so both kinds
//! of turn keep, reject and complete values by one rule:
//! - each given value is checked against its own property's schema; a valid one is kept,
//!   an invalid or unknown one is named with why;
//! - the step is complete when no given value was refused, every `required` field has a
//!   value, and the values kept together match the whole `fields` schema.

use crate::graph::OnTimeout;
use crate::ids::{ModelId, Principal, UserId};
use crate::output::Schema;
use crate::template::Template;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The most fields one input step asks for.
pub const MAX_FIELDS: usize = 50;
/// The longest field name.
pub const MAX_FIELD_NAME: usize = 64;
/// The most answers (`max_attempts`) an input step may allow.
pub const MAX_ATTEMPTS: u32 = 10;
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// The longest free-text answer, in characters.
pub const MAX_TEXT_CHARS: usize = 4000;
/// The extraction call's output limit when `extract.max_tokens` is not set.
pub const DEFAULT_EXTRACT_TOKENS: u32 = 512;

/// An input step as validation leaves it.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// What is asked, shown with the step's `AWAITING_INPUT`.
    pub ask: Template,
    pub fields: Fields,
    /// Who may answer; empty: the run's starter.
    pub from: Vec<Principal>,
    /// How free text is read, if the step takes it.
    pub extract: Option<Extract>,
    /// Answers (turns) allowed before the step fails.
    pub max_attempts: u32,
    /// How long it may wait for its values, and what its deadline does (never approve).
    pub timeout: Option<(std::time::Duration, OnTimeout)>,
}

/// The model call that reads values out of a free-text answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Extract {
    pub model: ModelId,
    pub max_tokens: u32,
    /// The call as an `llm` step would make it: the prompt template (over
    /// [`EXTRACT_ROOTS`]), JSON output, and one corrective retry.
    pub call: crate::graph::LlmSpec,
}

/// What the extraction prompt reads.
pub const EXTRACT_ROOTS: [&str; 3] = ["fields", "ask", "text"];

/// The extraction prompt. The marker line lets a scripted model (the dev model server,
/// tests) recognise an extraction whatever the step asks.
pub const EXTRACT_PROMPT: &str = "[chainrun:extract]\n\
Read the values of the fields below from the answer. Reply with one JSON object holding only \
the fields the answer gives, each as the schema says; leave out any it does not give. Reply \
with the JSON object only.\n\
Question: {{ ask }}\n\
Fields (JSON Schema): {{ fields }}\n\
Answer: {{ text }}";

impl InputSpec {
    /// Who may answer after `level` escalations of its deadline (`None`: at any level):
    /// `from` (the run's `starter` when it names nobody), and those its deadlines handed it to.
    pub fn answerers(&self, starter: &UserId, level: Option<u32>) -> Vec<Principal> {
        crate::graph::people_asked(&self.from, self.timeout.as_ref().map(|(_, on)| on), starter, level)
    }
}

/// The `fields` of an input step: a JSON Schema object, compiled once as a whole and per
/// property.
#[derive(Debug, Clone, PartialEq)]
pub struct Fields {
    whole: Schema,
    /// In the order the definition lists them.
    properties: Vec<(String, Schema)>,
    required: Vec<String>,
}

/// One field an answer did not satisfy, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// What checking one answer found.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The values kept: those kept before, with the valid ones given now over them.
    pub values: Map<String, Value>,
    /// The fields given now and kept.
    pub accepted: Vec<String>,
    /// Every field given and refused, then every required one still without a value.
    pub errors: Vec<FieldError>,
    pub complete: bool,
}

impl Fields {
    /// Compiles `document`, or names each thing wrong with it (`field` relative to `fields`).
    pub fn compile(document: &Value) -> Result<Fields, Vec<FieldError>> {
        let mut wrong = Vec::new();
        let Some(object) = document.as_object() else {
            return Err(vec![FieldError::new("", "a JSON Schema object: { \"type\": \"object\", \"properties\": { … }, \"required\": [ … ] }")]);
        };
        if object.get("type") != Some(&Value::String("object".into())) {
            wrong.push(FieldError::new("type", "must be \"object\": the step asks for named values"));
        }
        let properties = match object.get("properties") {
            Some(Value::Object(p)) if !p.is_empty() && p.len() <= MAX_FIELDS => p,
            _ => {
                wrong.push(FieldError::new("properties", format!("1 to {MAX_FIELDS} fields, each with its JSON Schema")));
                return Err(wrong);
            }
        };
        // A property may refer to the document's definitions (`#/$defs/…`): each compiled
        // alone keeps them.
        let definitions: Vec<(&str, &Value)> = ["$defs", "definitions"].into_iter().filter_map(|k| object.get(k).map(|v| (k, v))).collect();
        let mut compiled = Vec::with_capacity(properties.len());
        for (name, schema) in properties {
            if name.is_empty() || name.len() > MAX_FIELD_NAME || name.chars().any(|c| c.is_control()) {
                wrong.push(FieldError::new(format!("properties.{name}"), format!("a field name has 1 to {MAX_FIELD_NAME} characters")));
                continue;
            }
            let mut alone = schema.clone();
            if let Value::Object(alone) = &mut alone {
                for (key, defs) in &definitions {
                    alone.entry(key.to_string()).or_insert_with(|| (*defs).clone());
                }
            }
            match Schema::compile(&alone) {
                Ok(schema) => compiled.push((name.clone(), schema)),
                Err(why) => wrong.push(FieldError::new(format!("properties.{name}"), format!("not a usable JSON Schema: {why}"))),
            }
        }
        let mut required = Vec::new();
        match object.get("required") {
            None => {}
            Some(Value::Array(names)) => {
                for (n, name) in names.iter().enumerate() {
                    match name.as_str() {
                        Some(name) if properties.contains_key(name) => required.push(name.to_owned()),
                        _ => wrong.push(FieldError::new(format!("required[{n}]"), format!("{name}: not one of the declared properties"))),
                    }
                }
            }
            Some(_) => wrong.push(FieldError::new("required", "a list of property names")),
        }
        let whole = Schema::compile(document).map_err(|why| FieldError::new("", format!("not a usable JSON Schema: {why}")));
        match whole {
            // A broken property breaks the whole schema too: it is named once, by itself.
            _ if !wrong.is_empty() => Err(wrong),
            Ok(whole) => Ok(Fields { whole, properties: compiled, required }),
            Err(e) => Err(vec![e]),
        }
    }

    /// The schema as written.
    pub fn document(&self) -> &Value {
        self.whole.document()
    }

    /// The field names, in definition order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.properties.iter().map(|(name, _)| name.as_str())
    }

    /// The required fields `values` has no value for.
    pub fn missing(&self, values: &Map<String, Value>) -> Vec<String> {
        self.required.iter().filter(|name| !values.contains_key(name.as_str())).cloned().collect()
    }

    /// Checks `given` over the values `kept` from earlier turns.
    pub fn check(&self, kept: &Map<String, Value>, given: &Map<String, Value>) -> Checked {
        let mut values = kept.clone();
        let (mut accepted, mut errors) = (Vec::new(), Vec::new());
        for (name, value) in given {
            let Some((_, schema)) = self.properties.iter().find(|(n, _)| n == name) else {
                let known: Vec<&str> = self.names().collect();
                errors.push(FieldError::new(name, format!("not a field of this step; it asks for {}", known.join(", "))));
                continue;
            };
            let violations = schema.violations(value);
            if violations.is_empty() {
                values.insert(name.clone(), value.clone());
                accepted.push(name.clone());
            } else {
                errors.push(FieldError::new(name, violations.join("; ")));
            }
        }
        let refused = !errors.is_empty();
        // A required field refused above is named once, with why.
        let unnamed: Vec<String> = self.missing(&values).into_iter().filter(|name| !errors.iter().any(|e| e.field == *name)).collect();
        errors.extend(unnamed.into_iter().map(|name| FieldError::new(name, "required")));
        if errors.is_empty() {
            // Each value is valid alone; the object-level keywords (dependencies, counts) too?
            let value = Value::Object(values.clone());
            errors.extend(self.whole.violations(&value).into_iter().map(|why| FieldError::new("", why)));
        }
        let complete = !refused && errors.is_empty();
        Checked { values, accepted, errors, complete }
    }
}

/// Where an input step stands, kept on the run (`RunRecord::inputs`) so any runner and the
/// API read the same answers. Every write is conditional on `version`: of two answers
/// checked against the same state, only the first is recorded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InputState {
    /// Writes so far (answers recorded, free text read, the deadline applied).
    pub version: u32,
    /// The valid values kept so far.
    #[serde(default)]
    pub values: Map<String, Value>,
    /// Every answer, oldest first; each uses one of the step's attempts.
    #[serde(default)]
    pub turns: Vec<InputTurn>,
    /// How the step ended, once it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<InputEnd>,
}

/// One answer to an input step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InputTurn {
    pub by: UserId,
    pub at: DateTime<Utc>,
    /// Values given as such (`values`)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Map<String, Value>>,
    /// …or free text (`text`), read by the step's `extract` model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// What the model read from the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extracted: Option<Map<String, Value>>,
    /// False only for free text not read yet.
    pub read: bool,
    /// The fields this answer gave that were kept.
    #[serde(default)]
    pub accepted: Vec<String>,
    /// The fields refused, and the required ones still missing after it.
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputEnd {
    /// Every field has a valid value: the values are the step's output.
    Complete,
    /// The answers allowed (`max_attempts`) were used without completing it.
    Exhausted,
    /// Its deadline passed without the values.
    TimedOut,
}

impl InputState {
    /// The free text not read yet, if the last answer is one.
    pub fn unread_text(&self) -> Option<&str> {
        self.turns.last().filter(|t| !t.read).and_then(|t| t.text.as_deref())
    }

    /// This state with `turn` recorded after checking it (`checked`), against `max_attempts`.
    pub fn answered(&self, mut turn: InputTurn, checked: Option<Checked>, max_attempts: u32) -> InputState {
        let mut next = self.clone();
        next.version += 1;
        if let Some(checked) = checked {
            turn.read = true;
            (turn.accepted, turn.errors) = (checked.accepted, checked.errors);
            next.values = checked.values;
            if checked.complete {
                next.end = Some(InputEnd::Complete);
            }
        }
        next.turns.push(turn);
        if next.end.is_none() && next.unread_text().is_none() && next.turns.len() as u32 >= max_attempts {
            next.end = Some(InputEnd::Exhausted);
        }
        next
    }

    /// This state with its unread text read: `read` is what the model gave (an object of
    /// values), or why nothing could be read from it.
    pub fn read(&self, fields: &Fields, read: Result<Map<String, Value>, String>, max_attempts: u32) -> InputState {
        let mut next = self.clone();
        let Some(mut turn) = next.turns.pop().filter(|t| !t.read) else { return self.clone() };
        let checked = match read {
            Ok(extracted) => {
                let checked = fields.check(&self.values, &extracted);
                turn.extracted = Some(extracted);
                checked
            }
            Err(why) => {
                let mut errors = vec![FieldError::new("text", format!("no values could be read from it: {why}"))];
                errors.extend(fields.missing(&self.values).into_iter().map(|name| FieldError::new(name, "required")));
                Checked { values: self.values.clone(), accepted: Vec::new(), errors, complete: false }
            }
        };
        next.answered(turn, Some(checked), max_attempts)
    }

    /// Answers so far.
    pub fn attempts(&self) -> u32 {
        self.turns.len() as u32
    }
}

/// The fields still asked for and the refusals of the last answer, for `AWAITING_INPUT`.
pub fn still_asked(fields: &Fields, state: &InputState) -> (Vec<String>, Vec<FieldError>) {
    let missing = fields.missing(&state.values);
    let refused = state.turns.last().map(|t| t.errors.iter().filter(|e| !missing.contains(&e.field)).cloned().collect()).unwrap_or_default();
    (missing, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn account() -> Fields {
        Fields::compile(&json!({
            "type": "object",
            "properties": {
                "account_id": { "type": "string", "pattern": "^AC-[0-9]{6}$" },
                "plan": { "enum": ["free", "pro"] },
                "seats": { "type": "integer", "minimum": 1, "maximum": 500 }
            },
            "required": ["account_id", "plan"]
        }))
        .unwrap()
    }

    fn object(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn valid_values_are_kept_and_each_refusal_names_its_field_and_why() {
        let checked = account().check(&Map::new(), &object(json!({ "account_id": "AC-12", "seats": 3, "colour": "red" })));
        assert_eq!(checked.accepted, ["seats"]);
        assert_eq!(checked.values, object(json!({ "seats": 3 })));
        let by_field: Vec<(&str, &str)> = checked.errors.iter().map(|e| (e.field.as_str(), e.message.as_str())).collect();
        assert!(by_field[0].0 == "account_id" && by_field[0].1.contains("^AC-[0-9]{6}$"), "{by_field:?}");
        assert!(by_field.iter().any(|(f, m)| *f == "colour" && m.contains("not a field")), "{by_field:?}");
        assert!(by_field.contains(&("plan", "required")), "{by_field:?}");
        assert!(!checked.complete);
    }

    #[test]
    fn values_kept_from_earlier_answers_complete_a_later_one() {
        let fields = account();
        let first = fields.check(&Map::new(), &object(json!({ "plan": "pro" })));
        assert!(!first.complete);
        let second = fields.check(&first.values, &object(json!({ "account_id": "AC-123456" })));
        assert!(second.complete, "{:?}", second.errors);
        assert_eq!(second.values, object(json!({ "plan": "pro", "account_id": "AC-123456" })));
    }

    #[test]
    fn an_answer_with_a_refused_value_does_not_complete_even_when_the_required_are_there() {
        let checked = account().check(&Map::new(), &object(json!({ "plan": "pro", "account_id": "AC-123456", "seats": 0 })));
        assert!(!checked.complete);
        assert_eq!(checked.errors.len(), 1);
        assert_eq!(checked.errors[0].field, "seats");
    }

    #[test]
    fn the_last_allowed_answer_that_does_not_complete_exhausts_the_step() {
        let fields = account();
        let turn = |values: Value| InputTurn {
            by: "alice".parse().unwrap(),
            at: Utc::now(),
            values: Some(object(values)),
            text: None,
            extracted: None,
            read: true,
            accepted: vec![],
            errors: vec![],
        };
        let mut state = InputState::default();
        for n in 1..=2 {
            let given = object(json!({ "plan": "gold" }));
            state = state.answered(turn(json!({ "plan": "gold" })), Some(fields.check(&state.values, &given)), 2);
            assert_eq!((state.version, state.attempts()), (n, n));
        }
        assert_eq!(state.end, Some(InputEnd::Exhausted));
    }

    #[test]
    fn unread_text_waits_to_be_read_and_a_failed_reading_uses_its_attempt() {
        let fields = account();
        let text = InputTurn {
            by: "alice".parse().unwrap(),
            at: Utc::now(),
            values: None,
            text: Some("on the pro plan".into()),
            extracted: None,
            read: false,
            accepted: vec![],
            errors: vec![],
        };
        let pending = InputState::default().answered(text, None, 1);
        assert_eq!((pending.unread_text(), pending.end), (Some("on the pro plan"), None), "not exhausted before it is read");
        let failed = pending.read(&fields, Err("the reply was not JSON".into()), 1);
        assert_eq!(failed.end, Some(InputEnd::Exhausted));
        assert_eq!(failed.turns[0].errors[0].field, "text");
        let read = pending.read(&fields, Ok(object(json!({ "plan": "pro" }))), 2);
        assert_eq!((read.values.get("plan"), read.turns[0].accepted.clone()), (Some(&json!("pro")), vec!["plan".to_owned()]));
        assert_eq!(read.end, None);
    }

    #[test]
    fn fields_must_be_an_object_schema_with_declared_required_properties() {
        let wrong = |v: Value| Fields::compile(&v).unwrap_err().into_iter().map(|e| e.field).collect::<Vec<_>>();
        assert_eq!(wrong(json!("x")), [""]);
        assert!(wrong(json!({ "type": "object" })).contains(&"properties".to_owned()));
        assert!(wrong(json!({ "type": "array", "properties": { "a": {} } })).contains(&"type".to_owned()));
        assert_eq!(wrong(json!({ "type": "object", "properties": { "a": {} }, "required": ["a", "b"] })), ["required[1]"]);
        assert_eq!(wrong(json!({ "type": "object", "properties": { "a": { "type": "nope" } } })), ["properties.a"]);
        let many: Map<String, Value> = (0..=MAX_FIELDS).map(|i| (format!("f{i}"), json!({}))).collect();
        assert_eq!(wrong(json!({ "type": "object", "properties": many })), ["properties"]);
        let remote = json!({ "type": "object", "properties": { "a": { "$ref": "https://example.com/s.json" } } });
        assert!(Fields::compile(&remote).is_err(), "remote references are not fetched");
        let local = json!({ "type": "object", "$defs": { "id": { "type": "string" } }, "properties": { "a": { "$ref": "#/$defs/id" } } });
        let fields = Fields::compile(&local).unwrap();
        assert!(!fields.check(&Map::new(), &object(json!({ "a": 1 }))).complete, "a local reference is followed");
        assert!(fields.check(&Map::new(), &object(json!({ "a": "x" }))).complete);
    }
}
