//! The response cache: a deterministic step (`cache: "response"`, temperature 0) reuses
//! the reply of an identical earlier call instead of calling the model again, at no cost.
//!
//! Identical means the same request in every part that shapes the reply: model id,
//! system prompt, prompt, temperature, `max_tokens`, stop sequences, output format and
//! schema. The key is a SHA-256 of those parts in a fixed encoding, so a stored entry
//! holds no prompt text in its key. Entries are scoped to the run's tenant (a user, or the
//! public feed for runs started without a token): one tenant never reads another's
//! replies. They live for a TTL (`CHAINRUN_RESPONSE_CACHE_TTL_HOURS`, default 24).
//!
//! A reply is stored only once it was accepted (it parsed, matched the schema, fitted the
//! size limit), under the key of the request as first rendered: a reply that took a
//! corrective retry still answers the original request.

use crate::graph::LlmSpec;
use crate::pricing::Usage;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bumped when what goes into a key changes, so old entries are never read as new ones.
const KEY_VERSION: &str = "chainrun-response-v1";

/// A stored reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedReply {
    pub text: String,
    /// What the call that produced it was charged for (its hits are charged nothing).
    pub usage: Usage,
    pub stored_at: DateTime<Utc>,
}

/// The key of one rendered request of `spec`: lowercase hex SHA-256.
pub fn key(spec: &LlmSpec, system: Option<&str>, prompt: &str) -> String {
    let mut hash = Sha256::new();
    // Each part is length-prefixed, so no two different requests encode alike.
    let mut part = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    };
    part(KEY_VERSION.as_bytes());
    part(spec.model.as_str().as_bytes());
    part(system.map_or(&b"\0none"[..], str::as_bytes));
    part(prompt.as_bytes());
    part(spec.temperature.map_or_else(|| "none".to_owned(), |t| t.to_bits().to_string()).as_bytes());
    part(spec.max_tokens.to_string().as_bytes());
    part(spec.stop_sequences.len().to_string().as_bytes());
    for stop in &spec.stop_sequences {
        part(stop.as_bytes());
    }
    part(format!("{:?}", spec.format).as_bytes());
    part(spec.schema.as_ref().map_or_else(String::new, |s| s.document().to_string()).as_bytes());
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{StepKind, validate_json};
    use crate::pricing::ModelRegistry;
    use serde_json::json;

    fn spec(step: serde_json::Value) -> LlmSpec {
        let mut step = step;
        step["id"] = json!("s");
        step["type"] = json!("llm");
        let graph = validate_json(&json!({ "name": "k", "steps": [step] }), &ModelRegistry::builtin()).unwrap();
        match &graph.steps()[0].kind {
            StepKind::Llm(spec) => spec.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_same_request_has_the_same_key_and_any_part_that_shapes_the_reply_changes_it() {
        let base = json!({ "model": "amazon.nova-micro-v1:0", "temperature": 0.0, "cache": "response", "prompt": "p" });
        let k = key(&spec(base.clone()), Some("sys"), "hello");
        assert_eq!(k, key(&spec(base.clone()), Some("sys"), "hello"));
        assert_eq!(k.len(), 64);
        let mut variants = vec![
            key(&spec(base.clone()), Some("sys"), "hello!"),
            key(&spec(base.clone()), None, "hello"),
            key(&spec(base.clone()), Some(""), "hello"),
            key(&spec(base.clone()), Some("syshello"), ""),
        ];
        for (field, value) in [
            ("model", json!("amazon.nova-lite-v1:0")),
            ("max_tokens", json!(99)),
            ("stop_sequences", json!(["END"])),
            ("output", json!({ "format": "json" })),
            ("output", json!({ "format": "json", "schema": { "type": "object" } })),
        ] {
            let mut changed = base.clone();
            changed[field] = value;
            variants.push(key(&spec(changed), Some("sys"), "hello"));
        }
        for v in &variants {
            assert_ne!(*v, k);
        }
        let distinct: std::collections::BTreeSet<_> = variants.iter().collect();
        assert_eq!(distinct.len(), variants.len(), "no two variants collide");
    }
}
