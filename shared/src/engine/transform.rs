//! A transform step: a template renders to text, or an expression evaluates to JSON.
//! No model call, so nothing to reserve or retry.

use super::step::{Scope, Work};
use crate::codes::ErrorCode;
use crate::graph::TransformSpec;
use serde_json::Value;

pub fn run(spec: &TransformSpec, scope: &impl Scope) -> Work {
    match spec {
        TransformSpec::Template(source) => match source.render(scope) {
            Ok(text) => Work::done(text.clone(), Value::String(text)),
            Err(e) => Work::failed(ErrorCode::TemplateError, format!("template: {e}")),
        },
        TransformSpec::Expression(expression) => match expression.evaluate(&scope.to_json()) {
            Ok(value) => {
                let text = match &value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Work::done(text, value)
            }
            Err(e) => Work::failed(ErrorCode::ExpressionError, format!("expression: {e}")),
        },
    }
}
