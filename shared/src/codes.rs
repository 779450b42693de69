//! The stable codes a failed step or run carries in its [`ErrorInfo`](crate::run::ErrorInfo).
//!
//! Clients branch on these (`BUDGET_EXCEEDED` is a different conversation from
//! `ThrottlingException`), so they are one enum rather than literals scattered through
//! the engine. A model service's own error names pass through as [`ErrorCode::Model`]:
//! Bedrock adds names over time, and each must reach the client as Bedrock spelled it.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::fmt;

macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident = $code:literal,)*) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
            /// The model service's error name (`ThrottlingException`, `ValidationException`).
            Model(String),
        }

        impl ErrorCode {
            /// Every code chainrun itself assigns.
            pub const OWN: &'static [&'static str] = &[$($code),*];

            pub fn as_str(&self) -> &str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                    ErrorCode::Model(name) => name,
                }
            }

            /// Reads a stored or reported code; anything not ours is a model service's.
            pub fn parse(code: &str) -> Self {
                match code {
                    $($code => ErrorCode::$variant,)*
                    other => ErrorCode::Model(other.to_owned()),
                }
            }
        }
    };
}

codes! {
    /// The stored definition no longer validates (the price registry changed since it started).
    InvalidWorkflow = "INVALID_WORKFLOW",
    /// A defect in chainrun (a step task panicked).
    Internal = "INTERNAL",
    /// A required step failed without an error of its own.
    StepFailed = "STEP_FAILED",
    /// The workflow's `output` template failed.
    OutputTemplate = "OUTPUT_TEMPLATE",
    /// A step names a model without a price.
    UnknownModel = "UNKNOWN_MODEL",
    /// A prompt, system or transform template failed to render.
    TemplateError = "TEMPLATE_ERROR",
    /// `retry.max_attempts` is 0: the step could not try.
    NoAttempts = "NO_ATTEMPTS",
    /// A model call did not fit the run's budget or its caller's daily cap, or is larger than
    /// its tenant's whole token allowance for a minute; it was not made.
    BudgetExceeded = "BUDGET_EXCEEDED",
    /// A reply was not the JSON its step asked for (retried with a corrective hint).
    InvalidOutput = "INVALID_OUTPUT",
    /// A reply or output is larger than its step may produce.
    OutputTooLarge = "OUTPUT_TOO_LARGE",
    /// A map's `over` did not give a list.
    MapOver = "MAP_OVER",
    /// A map's list is longer than a map may fan out over.
    MapTooLarge = "MAP_TOO_LARGE",
    /// A reviewer rejected a review step.
    ReviewRejected = "REVIEW_REJECTED",
    /// A transform expression failed to evaluate.
    ExpressionError = "EXPRESSION_ERROR",
    /// A router condition failed or was not a bool.
    ConditionError = "CONDITION_ERROR",
    /// The run's runners kept stopping without finishing it (crashes, timeouts): it was
    /// taken over more often than allowed.
    RunnerLost = "RUNNER_LOST",
    /// The store refused or could not read the run's data (not a passing outage).
    StoreError = "STORE_ERROR",
    /// Lambda gave up delivering the run (its retries and event age ran out).
    DeliveryFailed = "DELIVERY_FAILED",
    /// An input step used every answer it allows (`max_attempts`) without getting its values.
    InputIncomplete = "INPUT_INCOMPLETE",
    /// An input step's deadline passed without its values.
    InputTimedOut = "INPUT_TIMED_OUT",
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for ErrorCode {
    fn from(code: &str) -> Self {
        ErrorCode::parse(code)
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = Cow::<str>::deserialize(deserializer)?;
        Ok(ErrorCode::parse(&code))
    }
}

impl JsonSchema for ErrorCode {
    fn schema_name() -> Cow<'static, str> {
        "ErrorCode".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": format!("One of chainrun's codes ({}) or the model service's own error name.", ErrorCode::OWN.join(", ")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_names_are_the_model_services() {
        for code in ErrorCode::OWN {
            let parsed = ErrorCode::parse(code);
            assert!(!matches!(parsed, ErrorCode::Model(_)), "{code}");
            assert_eq!(serde_json::to_value(&parsed).unwrap(), serde_json::json!(code));
        }
        let throttled: ErrorCode = serde_json::from_value(serde_json::json!("ThrottlingException")).unwrap();
        assert_eq!(throttled, ErrorCode::Model("ThrottlingException".into()));
        assert_eq!(throttled, "ThrottlingException");
    }
}
