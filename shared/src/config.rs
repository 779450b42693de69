//! Configuration read once, at cold start, from the environment into typed values.
//! A missing or malformed variable fails the start with a message naming it.

use crate::durability::Durability;
use crate::pricing::{ModelRegistry, PricingError};
use crate::spend::DailyCaps;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is not set")]
    Missing(&'static str),
    #[error("environment variable {name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// Where values come from: the process environment in functions, a map in tests.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;

    fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.get(name).filter(|v| !v.trim().is_empty()).ok_or(ConfigError::Missing(name))
    }

    fn parsed<T: std::str::FromStr>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name).filter(|v| !v.trim().is_empty()) {
            None => Ok(default),
            Some(raw) => raw.trim().parse().map_err(|e: T::Err| ConfigError::Invalid { name, reason: e.to_string() }),
        }
    }
}

/// The process environment.
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    pub runs: String,
    pub events: String,
    pub progress: String,
    pub workflows: String,
    /// Per-owner, per-workflow, per-day cost rollups (TTL `expires_at`).
    pub rollups: String,
}

/// What both functions need.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub tables: Tables,
    /// How long events and progress rows live (DynamoDB TTL).
    pub retention_days: u32,
    pub models: ModelRegistry,
    /// Per-caller daily spend caps: `CHAINRUN_OWNER_DAILY_CAP_USD` for every caller,
    /// `CHAINRUN_OWNER_DAILY_CAPS` (JSON, user id → dollars) for some. Neither: no cap.
    /// The runner enforces them; the API reports them.
    pub daily_caps: DailyCaps,
    /// Leases, the queued grace and the takeover bound (see [`crate::durability`]).
    pub durability: Durability,
    /// The S3 bucket (`CHAINRUN_OUTPUTS_BUCKET`) for outputs too large for one DynamoDB item.
    pub outputs_bucket: String,
    /// Fair limits per tenant: starts, concurrent runs, tokens per minute, sizes (see
    /// [`crate::quota`]). The API and the runner enforce them; the dead-letter consumer
    /// gives back the slot of a run it ends.
    pub limits: crate::quota::TenantLimits,
}

impl CoreConfig {
    pub fn from_source(env: &impl Source) -> Result<Self, ConfigError> {
        let tables = Tables {
            runs: env.required("CHAINRUN_RUNS_TABLE")?,
            events: env.required("CHAINRUN_EVENTS_TABLE")?,
            progress: env.required("CHAINRUN_PROGRESS_TABLE")?,
            workflows: env.required("CHAINRUN_WORKFLOWS_TABLE")?,
            rollups: env.required("CHAINRUN_ROLLUPS_TABLE")?,
        };
        let retention_days = env.parsed("CHAINRUN_RETENTION_DAYS", 30u32)?;
        if retention_days == 0 {
            return Err(ConfigError::Invalid { name: "CHAINRUN_RETENTION_DAYS", reason: "must be at least 1".into() });
        }
        let models = ModelRegistry::load(env.get("CHAINRUN_MODEL_PRICES").as_deref())
            .map_err(|e: PricingError| ConfigError::Invalid { name: "CHAINRUN_MODEL_PRICES", reason: e.to_string() })?;
        let default = env.get("CHAINRUN_OWNER_DAILY_CAP_USD");
        DailyCaps::parse(default.as_deref(), None).map_err(|reason| ConfigError::Invalid { name: "CHAINRUN_OWNER_DAILY_CAP_USD", reason })?;
        let daily_caps = DailyCaps::parse(default.as_deref(), env.get("CHAINRUN_OWNER_DAILY_CAPS").as_deref())
            .map_err(|reason| ConfigError::Invalid { name: "CHAINRUN_OWNER_DAILY_CAPS", reason })?;
        let durability = Durability::from_source(env)?;
        let outputs_bucket = env.required("CHAINRUN_OUTPUTS_BUCKET")?.trim().to_owned();
        let limits = crate::quota::TenantLimits::from_source(env)?;
        Ok(Self { tables, retention_days, models, daily_caps, durability, outputs_bucket, limits })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const TABLES: [(&str, &str); 6] = [
        ("CHAINRUN_RUNS_TABLE", "r"),
        ("CHAINRUN_EVENTS_TABLE", "e"),
        ("CHAINRUN_PROGRESS_TABLE", "p"),
        ("CHAINRUN_WORKFLOWS_TABLE", "w"),
        ("CHAINRUN_ROLLUPS_TABLE", "u"),
        ("CHAINRUN_OUTPUTS_BUCKET", "o"),
    ];

    #[test]
    fn names_the_missing_variable() {
        let err = CoreConfig::from_source(&env(&TABLES[..2])).unwrap_err();
        assert_eq!(err, ConfigError::Missing("CHAINRUN_PROGRESS_TABLE"));
        let err = CoreConfig::from_source(&env(&TABLES[..4])).unwrap_err();
        assert_eq!(err, ConfigError::Missing("CHAINRUN_ROLLUPS_TABLE"));
        let err = CoreConfig::from_source(&env(&TABLES[..5])).unwrap_err();
        assert_eq!(err, ConfigError::Missing("CHAINRUN_OUTPUTS_BUCKET"));
    }

    #[test]
    fn names_the_malformed_variable() {
        let mut pairs = TABLES.to_vec();
        pairs.push(("CHAINRUN_RETENTION_DAYS", "soon"));
        let err = CoreConfig::from_source(&env(&pairs)).unwrap_err().to_string();
        assert!(err.contains("CHAINRUN_RETENTION_DAYS"), "{err}");
        let mut pairs = TABLES.to_vec();
        pairs.push(("CHAINRUN_MODEL_PRICES", "{not json"));
        let err = CoreConfig::from_source(&env(&pairs)).unwrap_err().to_string();
        assert!(err.contains("CHAINRUN_MODEL_PRICES"), "{err}");
    }

    #[test]
    fn daily_caps_are_read_once_and_a_malformed_one_names_its_variable() {
        assert!(CoreConfig::from_source(&env(&TABLES)).unwrap().daily_caps.is_none());
        let mut pairs = TABLES.to_vec();
        pairs.extend([("CHAINRUN_OWNER_DAILY_CAP_USD", "5"), ("CHAINRUN_OWNER_DAILY_CAPS", r#"{"alice": "0.5"}"#)]);
        let caps = CoreConfig::from_source(&env(&pairs)).unwrap().daily_caps;
        assert_eq!(caps.cap_for("alice"), Some(crate::money::Usd::parse_decimal("0.5").unwrap()));
        assert_eq!(caps.cap_for("bob"), Some(crate::money::Usd::parse_decimal("5").unwrap()));
        for (name, value) in [("CHAINRUN_OWNER_DAILY_CAP_USD", "lots"), ("CHAINRUN_OWNER_DAILY_CAPS", r#"{"alice": 1}"#)] {
            let mut pairs = TABLES.to_vec();
            pairs.push((name, value));
            let err = CoreConfig::from_source(&env(&pairs)).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn reads_a_complete_environment() {
        let c = CoreConfig::from_source(&env(&TABLES)).unwrap();
        assert_eq!(c.tables.events, "e");
        assert_eq!(c.tables.rollups, "u");
        assert_eq!(c.outputs_bucket, "o");
        assert_eq!(c.retention_days, 30);
    }
}
