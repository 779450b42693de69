//! The limits a deployment sets per tenant, read once from the environment (SAM parameters
//! in `template.yaml` pass them to every function). `0` switches a limit off.

use crate::config::{ConfigError, Source};
use crate::ids::Principal;
use std::collections::BTreeMap;

/// The largest request body the API takes at all: a run record, with its definition and
/// input, must fit one DynamoDB item (400 KB).
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantLimits {
    /// Runs a tenant may start per UTC minute (`CHAINRUN_TENANT_STARTS_PER_MINUTE`, default 300).
    pub starts_per_minute: Option<u64>,
    /// Runs a tenant may have started and not ended (`CHAINRUN_TENANT_CONCURRENT_RUNS`,
    /// default 100). Waiting runs count.
    pub concurrent_runs: Option<u64>,
    /// Model tokens a tenant's calls may reserve per UTC minute and model
    /// (`CHAINRUN_TENANT_TOKENS_PER_MINUTE`, default 0: off), overridden per model by
    /// `CHAINRUN_TENANT_TOKENS_PER_MINUTE_BY_MODEL` (JSON, model id → tokens; 0 is off).
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_minute_by_model: BTreeMap<String, u64>,
    /// Request bodies larger than this are refused with `413`
    /// (`CHAINRUN_MAX_REQUEST_BYTES`, default and at most [`MAX_REQUEST_BYTES`]).
    pub max_request_bytes: usize,
    /// Workflow definitions larger than this (as compact JSON) are refused with `413`
    /// (`CHAINRUN_MAX_DEFINITION_BYTES`, default 128 KiB, at most the request limit).
    pub max_definition_bytes: usize,
    /// Keys the shared `PUBLIC` tenant's counters are spread over
    /// (`CHAINRUN_PUBLIC_SHARDS`, 1–64, default 8). See [`super`].
    pub public_shards: u16,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            starts_per_minute: Some(300),
            concurrent_runs: Some(100),
            tokens_per_minute: None,
            tokens_per_minute_by_model: BTreeMap::new(),
            max_request_bytes: MAX_REQUEST_BYTES,
            max_definition_bytes: 128 * 1024,
            public_shards: 8,
        }
    }
}

/// `0` reads as no limit.
fn limit(n: u64) -> Option<u64> {
    (n > 0).then_some(n)
}

impl TenantLimits {
    /// No limit at all, the sizes at their maximum (tests that are not about limits).
    pub fn unlimited() -> Self {
        Self { starts_per_minute: None, concurrent_runs: None, ..Self::default() }
    }

    pub fn from_source(env: &impl Source) -> Result<Self, ConfigError> {
        let d = Self::default();
        let starts_per_minute = limit(env.parsed("CHAINRUN_TENANT_STARTS_PER_MINUTE", d.starts_per_minute.unwrap_or(0))?);
        let concurrent_runs = limit(env.parsed("CHAINRUN_TENANT_CONCURRENT_RUNS", d.concurrent_runs.unwrap_or(0))?);
        let tokens_per_minute = limit(env.parsed("CHAINRUN_TENANT_TOKENS_PER_MINUTE", 0u64)?);
        let name = "CHAINRUN_TENANT_TOKENS_PER_MINUTE_BY_MODEL";
        let tokens_per_minute_by_model = match env.get(name).filter(|v| !v.trim().is_empty()) {
            None => BTreeMap::new(),
            Some(raw) => serde_json::from_str(&raw)
                .map_err(|e| ConfigError::Invalid { name, reason: format!("must be a JSON object of model id to tokens per minute: {e}") })?,
        };
        let max_request_bytes = env.parsed("CHAINRUN_MAX_REQUEST_BYTES", d.max_request_bytes)?;
        if !(1024..=MAX_REQUEST_BYTES).contains(&max_request_bytes) {
            return Err(ConfigError::Invalid {
                name: "CHAINRUN_MAX_REQUEST_BYTES",
                reason: format!("must be 1024 to {MAX_REQUEST_BYTES} (a run must fit one DynamoDB item)"),
            });
        }
        let max_definition_bytes = env.parsed("CHAINRUN_MAX_DEFINITION_BYTES", d.max_definition_bytes.min(max_request_bytes))?;
        if !(256..=max_request_bytes).contains(&max_definition_bytes) {
            return Err(ConfigError::Invalid {
                name: "CHAINRUN_MAX_DEFINITION_BYTES",
                reason: format!("must be 256 to CHAINRUN_MAX_REQUEST_BYTES ({max_request_bytes})"),
            });
        }
        let public_shards = env.parsed("CHAINRUN_PUBLIC_SHARDS", d.public_shards)?;
        if !(1..=64).contains(&public_shards) {
            return Err(ConfigError::Invalid { name: "CHAINRUN_PUBLIC_SHARDS", reason: "must be 1 to 64".into() });
        }
        Ok(Self {
            starts_per_minute,
            concurrent_runs,
            tokens_per_minute,
            tokens_per_minute_by_model,
            max_request_bytes,
            max_definition_bytes,
            public_shards,
        })
    }

    /// How many keys `tenant`'s start counter and slot set are spread over.
    pub fn shards(&self, tenant: &Principal) -> u16 {
        if *tenant == Principal::Public { self.public_shards } else { 1 }
    }

    /// A tenant's token allowance per minute for calls to `model`, if it has one.
    pub fn tokens_for(&self, model: &str) -> Option<u64> {
        match self.tokens_per_minute_by_model.get(model) {
            Some(&n) => limit(n),
            None => self.tokens_per_minute,
        }
    }

    /// Whether any token allowance applies (the engine reserves tokens only then).
    pub fn throttles_tokens(&self) -> bool {
        self.tokens_per_minute.is_some() || self.tokens_per_minute_by_model.values().any(|&n| n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_apply_and_zero_switches_a_limit_off() {
        let d = TenantLimits::from_source(&env(&[])).unwrap();
        assert_eq!(d, TenantLimits::default());
        assert!(!d.throttles_tokens());
        let off = TenantLimits::from_source(&env(&[("CHAINRUN_TENANT_STARTS_PER_MINUTE", "0"), ("CHAINRUN_TENANT_CONCURRENT_RUNS", "0")])).unwrap();
        assert_eq!((off.starts_per_minute, off.concurrent_runs), (None, None));
    }

    #[test]
    fn token_allowances_are_per_model_with_a_default() {
        let l = TenantLimits::from_source(&env(&[
            ("CHAINRUN_TENANT_TOKENS_PER_MINUTE", "1000"),
            ("CHAINRUN_TENANT_TOKENS_PER_MINUTE_BY_MODEL", r#"{"big": 50000, "free": 0}"#),
        ]))
        .unwrap();
        assert_eq!((l.tokens_for("big"), l.tokens_for("free"), l.tokens_for("other")), (Some(50000), None, Some(1000)));
        assert!(l.throttles_tokens());
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (name, value) in [
            ("CHAINRUN_TENANT_STARTS_PER_MINUTE", "many"),
            ("CHAINRUN_TENANT_TOKENS_PER_MINUTE_BY_MODEL", "[1]"),
            ("CHAINRUN_MAX_REQUEST_BYTES", "999999999"),
            ("CHAINRUN_MAX_DEFINITION_BYTES", "10"),
            ("CHAINRUN_PUBLIC_SHARDS", "0"),
        ] {
            let err = TenantLimits::from_source(&env(&[(name, value)])).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn only_the_public_tenant_is_sharded() {
        let l = TenantLimits::default();
        assert_eq!(l.shards(&Principal::Public), 8);
        assert_eq!(l.shards(&Principal::User("alice".into())), 1);
    }
}
