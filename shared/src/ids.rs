//! Identifier newtypes, so a step id can never be passed where a run id belongs.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// A run's id: a ULID, so ids sort by creation time and carry no guessable sequence.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct RunId(Arc<str>);

impl RunId {
    pub fn new() -> Self {
        Self(ulid::Ulid::new().to_string().into())
    }

    /// Parses an id that came from outside (a path segment, an event payload).
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        ulid::Ulid::from_string(raw)
            .map(|u| Self(u.to_string().into()))
            .map_err(|_| InvalidId { kind: "run id", value: raw.chars().take(64).collect() })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stored workflow's id: a ULID, like a run's, so ids sort by creation time and cannot
/// be guessed from one another.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct WorkflowId(Arc<str>);

impl WorkflowId {
    pub fn new() -> Self {
        Self(ulid::Ulid::new().to_string().into())
    }

    /// Parses an id that came from outside (a path segment, a stored item).
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        ulid::Ulid::from_string(raw)
            .map(|u| Self(u.to_string().into()))
            .map_err(|_| InvalidId { kind: "workflow id", value: raw.chars().take(64).collect() })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for WorkflowId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for WorkflowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A step's id inside one workflow: `[A-Za-z][A-Za-z0-9_]*`, so it is addressable
/// as `steps.<id>` in templates and expressions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct StepId(Arc<str>);

impl StepId {
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        let mut chars = raw.chars();
        let valid = raw.len() <= 64 && chars.next().is_some_and(|c| c.is_ascii_alphabetic()) && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if valid { Ok(Self(raw.into())) } else { Err(InvalidId { kind: "step id", value: raw.chars().take(64).collect() }) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// Ids that come from outside (a stored item, an event payload, a request body) are
// parsed on the way in, so a `RunId` or `StepId` value is always well-formed.
macro_rules! parsed_string {
    ($($ty:ident),*) => {$(
        impl TryFrom<String> for $ty {
            type Error = InvalidId;
            fn try_from(raw: String) -> Result<Self, InvalidId> {
                $ty::parse(&raw)
            }
        }

        impl From<$ty> for String {
            fn from(id: $ty) -> String {
                id.0.to_string()
            }
        }

        // Written as the string it is, without a copy.
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
    )*};
}

parsed_string!(RunId, WorkflowId, StepId);

macro_rules! string_schema {
    ($($ty:ident: $pattern:literal, $doc:literal;)*) => {$(
        impl JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "pattern": $pattern, "description": $doc })
            }
        }
    )*};
}

string_schema! {
    RunId: "^[0-9A-HJKMNP-TV-Z]{26}$", "A run id (a ULID).";
    WorkflowId: "^[0-9A-HJKMNP-TV-Z]{26}$", "A stored workflow's id (a ULID).";
    StepId: "^[A-Za-z][A-Za-z0-9_]{0,63}$", "A step id, addressable as `steps.<id>`.";
}

/// Names that come from outside and are shown, stored and used in keys, but carry no
/// syntax of their own: any text of 1 to `max` characters without control characters.
macro_rules! name_newtype {
    ($($(#[$doc:meta])* $ty:ident: $kind:literal, max $max:literal;)*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $ty(Arc<str>);

        impl $ty {
            pub const MAX_CHARS: usize = $max;

            pub fn parse(raw: &str) -> Result<Self, InvalidId> {
                let chars = raw.chars().count();
                if (1..=$max).contains(&chars) && !raw.chars().any(char::is_control) {
                    Ok(Self(raw.into()))
                } else {
                    Err(InvalidId { kind: $kind, value: raw.chars().take(64).collect() })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = InvalidId;
            fn from_str(raw: &str) -> Result<Self, InvalidId> {
                $ty::parse(raw)
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "minLength": 1, "maxLength": $max })
            }
        }

        parsed_string!($ty);
    )*};
}

name_newtype! {
    /// A signed-in caller: the identity provider's subject (`sub`).
    UserId: "user id", max 256;
    /// A workflow's name: names its runs in history, analytics and progress feeds.
    WorkflowName: "workflow name", max 128;
    /// A Bedrock model id or inference profile id (`amazon.nova-micro-v1:0`,
    /// `global.anthropic.claude-haiku-4-5-…`), as a step names it and the registry prices it.
    ModelId: "model id", max 256;
}

impl UserId {
    /// The caller of a request that carries no token (allowed only where a `PUBLIC`
    /// workflow lets anyone in). No token may claim it: a subject starting with `~` is refused.
    pub const ANONYMOUS: &'static str = "~anonymous";

    pub fn anonymous() -> Self {
        Self(Self::ANONYMOUS.into())
    }

    pub fn is_anonymous(&self) -> bool {
        &*self.0 == Self::ANONYMOUS
    }

    /// Whose limits and spend a run of this caller counts against: the user, or the
    /// shared `PUBLIC` tenant for anonymous callers.
    pub fn tenant(&self) -> Principal {
        if self.is_anonymous() { Principal::Public } else { Principal::User(self.0.to_string()) }
    }
}

/// Who may see a run's progress: a user, a group, or one of the shared feeds.
/// Rendered as the progress table's partition key (`USER#alice`, `GROUP#eng`, `ADMIN`, `AUTHED`, `PUBLIC`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Principal {
    User(String),
    Group(String),
    Admin,
    /// Every signed-in caller (runs of `AUTHED` workflows).
    Authed,
    Public,
}

impl Principal {
    pub fn key(&self) -> String {
        match self {
            Principal::User(u) => format!("USER#{u}"),
            Principal::Group(g) => format!("GROUP#{g}"),
            Principal::Admin => "ADMIN".to_owned(),
            Principal::Authed => "AUTHED".to_owned(),
            Principal::Public => "PUBLIC".to_owned(),
        }
    }
}

impl From<Principal> for String {
    fn from(p: Principal) -> String {
        p.key()
    }
}

impl TryFrom<String> for Principal {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        match s.as_str() {
            "ADMIN" => Ok(Principal::Admin),
            "PUBLIC" => Ok(Principal::Public),
            "AUTHED" => Ok(Principal::Authed),
            _ => {
                if let Some(u) = s.strip_prefix("USER#") {
                    Ok(Principal::User(u.to_owned()))
                } else if let Some(g) = s.strip_prefix("GROUP#") {
                    Ok(Principal::Group(g.to_owned()))
                } else {
                    Err(InvalidId { kind: "principal", value: s })
                }
            }
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {value:?}")]
pub struct InvalidId {
    pub kind: &'static str,
    pub value: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_round_trip_and_reject_garbage() {
        let id = RunId::new();
        assert_eq!(RunId::parse(id.as_str()), Ok(id));
        assert!(RunId::parse("not-a-ulid").is_err());
    }

    #[test]
    fn step_ids_must_be_template_addressable() {
        assert!(StepId::parse("extract_2").is_ok());
        for bad in ["", "2fast", "has-dash", "has.dot", "spa ce"] {
            assert!(StepId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ids_from_outside_are_parsed_when_deserialized() {
        let id = RunId::new();
        let back: RunId = serde_json::from_value(serde_json::json!(id.as_str())).unwrap();
        assert_eq!(back, id);
        let err = serde_json::from_value::<RunId>(serde_json::json!("../../etc")).unwrap_err();
        assert!(err.to_string().contains("invalid run id"), "{err}");
        assert!(serde_json::from_value::<StepId>(serde_json::json!("has-dash")).is_err());
        assert!(serde_json::from_value::<crate::run::RunnerEvent>(serde_json::json!({ "run_id": "nope" })).is_err());
        assert!(serde_json::from_value::<UserId>(serde_json::json!("")).is_err());
        assert!(serde_json::from_value::<WorkflowName>(serde_json::json!("tab\there")).is_err());
        assert_eq!(serde_json::to_value(WorkflowName::parse("feedback-triage").unwrap()).unwrap(), serde_json::json!("feedback-triage"));
    }

    #[test]
    fn principals_round_trip_through_their_keys() {
        for p in [Principal::User("a".into()), Principal::Group("g".into()), Principal::Admin, Principal::Authed, Principal::Public] {
            assert_eq!(Principal::try_from(p.key()), Ok(p));
        }
    }
}
