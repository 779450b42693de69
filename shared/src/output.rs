//! Turning a model's raw text into a step's output value.

use crate::workflow::OutputFormat;
use serde_json::Value;
use std::sync::Arc;

/// Why a reply could not be used. Always retryable: a model asked again, with the
/// problem named in a corrective hint, usually complies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOutput(pub String);

/// Parses `text` per `format`; for JSON, validates against `schema` when given.
pub fn parse(text: &str, format: OutputFormat, schema: Option<&Schema>) -> Result<Value, InvalidOutput> {
    match format {
        OutputFormat::Text | OutputFormat::Markdown => Ok(Value::String(text.to_owned())),
        OutputFormat::Json => {
            let value = extract_json(text)?;
            if let Some(schema) = schema {
                let errors = schema.violations(&value);
                if !errors.is_empty() {
                    return Err(InvalidOutput(format!("the JSON does not match the schema: {}", errors.join("; "))));
                }
            }
            Ok(value)
        }
    }
}

/// A JSON Schema compiled once (when its definition is validated) and kept with its
/// document, which estimates and messages read.
#[derive(Clone)]
pub struct Schema {
    document: Value,
    validator: Arc<jsonschema::Validator>,
}

impl Schema {
    /// Compiles `document`; the error says why it is not a usable JSON Schema.
    pub fn compile(document: &Value) -> Result<Schema, String> {
        let validator = jsonschema::validator_for(document).map_err(|e| e.to_string())?;
        Ok(Schema { document: document.clone(), validator: Arc::new(validator) })
    }

    /// The schema as written.
    pub fn document(&self) -> &Value {
        &self.document
    }

    /// The first few ways `value` breaks the schema, each with the path where it does;
    /// empty when it matches.
    pub fn violations(&self, value: &Value) -> Vec<String> {
        self.validator
            .iter_errors(value)
            .take(5)
            .map(|e| {
                let path = e.instance_path().to_string();
                if path.is_empty() { e.to_string() } else { format!("at {path}: {e}") }
            })
            .collect()
    }
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Schema").field(&self.document).finish()
    }
}

/// Two schemas are the same when written the same.
impl PartialEq for Schema {
    fn eq(&self, other: &Self) -> bool {
        self.document == other.document
    }
}

/// Finds the JSON value in a reply: the whole text, a fenced ```json block, or the first
/// object/array in the prose around it (models like to add a sentence before or after).
pub fn extract_json(text: &str) -> Result<Value, InvalidOutput> {
    let trimmed = text.trim();
    if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
        return Ok(v);
    }
    if let Some(fenced) = fenced_block(trimmed)
        && let Ok(v) = serde_json::from_str::<Value>(fenced.trim())
    {
        return Ok(v);
    }
    if let Some(start) = trimmed.find(['{', '[']) {
        let mut values = serde_json::Deserializer::from_str(&trimmed[start..]).into_iter::<Value>();
        if let Some(Ok(v)) = values.next() {
            return Ok(v);
        }
    }
    Err(InvalidOutput("the reply is not valid JSON".into()))
}

fn fenced_block(text: &str) -> Option<&str> {
    let start = text.find("```")?;
    let after = &text[start + 3..];
    let body_start = after.find('\n')? + 1;
    let body = &after[body_start..];
    let end = body.find("```")?;
    Some(&body[..end])
}

/// The length of `value` as JSON, without writing it out.
pub fn json_len(value: &(impl serde::Serialize + ?Sized)) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing JSON values to a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extracts_json_from_fences_and_prose() {
        assert_eq!(extract_json("{\"a\":1}").unwrap(), json!({"a":1}));
        assert_eq!(extract_json("Here you go:\n```json\n{\"a\": [1]}\n```\nThanks").unwrap(), json!({"a":[1]}));
        assert_eq!(extract_json("Sure! {\"a\": 2} hope that helps").unwrap(), json!({"a":2}));
        assert!(extract_json("no json here").is_err());
    }

    #[test]
    fn schema_violations_name_the_problem() {
        let schema = Schema::compile(&json!({"type":"object","required":["label"],"properties":{"label":{"enum":["positive","negative"]}}})).unwrap();
        assert!(parse("{\"label\":\"negative\"}", OutputFormat::Json, Some(&schema)).is_ok());
        let err = parse("{\"label\":\"meh\"}", OutputFormat::Json, Some(&schema)).unwrap_err();
        assert!(err.0.contains("/label"), "{err}");
        let err = parse("{}", OutputFormat::Json, Some(&schema)).unwrap_err();
        assert!(err.0.contains("label"), "{err}");
    }

    #[test]
    fn text_output_is_the_text() {
        assert_eq!(parse(" hi ", OutputFormat::Text, None).unwrap(), json!(" hi "));
    }

    #[test]
    fn a_schema_is_compiled_once_and_keeps_its_document() {
        let document = json!({ "type": "object", "required": ["a"] });
        let schema = Schema::compile(&document).unwrap();
        assert_eq!(schema.document(), &document);
        assert!(schema.violations(&json!({ "a": 1 })).is_empty());
        assert_eq!(schema.violations(&json!({})).len(), 1);
        assert!(Schema::compile(&json!({ "type": "no-such-type" })).is_err());
    }
}
