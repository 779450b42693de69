//! The model registry: what each Bedrock model costs and how much it can take.
//!
//! Prices ship in `shared/models.json` (the published per-1K-token sheet, kept as decimal
//! strings so nothing passes through a float) and may be overridden per deployment with
//! `CHAINRUN_MODEL_PRICES`. Internally a price is pico-dollars per token (see [`crate::money`]),
//! so `cost = Σ tokens × price` is exact integer arithmetic.

use crate::money::{MoneyError, Usd};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

const BUILTIN: &str = include_str!("../models.json");

/// Token counts exactly as the model service reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(default)]
    pub cache_read_tokens: u64,
    #[serde(default)]
    pub cache_write_tokens: u64,
}

impl Usage {
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens + self.cache_read_tokens + self.cache_write_tokens
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub id: String,
    /// Pico-dollars per token.
    pub input: Usd,
    pub output: Usd,
    pub cache_read: Option<Usd>,
    pub cache_write: Option<Usd>,
    pub context_window: u32,
    pub max_output_tokens: u32,
    pub streaming: bool,
}

impl ModelInfo {
    /// The published formula applied to the reported usage. `None` only on overflow,
    /// which a caller treats as a terminal error rather than a wrong number.
    pub fn cost(&self, usage: &Usage) -> Option<Usd> {
        // A model without a separate cache price bills cached tokens as input.
        let cache_read = self.cache_read.unwrap_or(self.input);
        let cache_write = self.cache_write.unwrap_or(self.input);
        self.input
            .checked_mul(usage.input_tokens)?
            .checked_add(self.output.checked_mul(usage.output_tokens)?)?
            .checked_add(cache_read.checked_mul(usage.cache_read_tokens)?)?
            .checked_add(cache_write.checked_mul(usage.cache_write_tokens)?)
    }
}

#[derive(Debug, Clone)]
pub struct ModelRegistry {
    models: BTreeMap<String, ModelInfo>,
    profile_multipliers_pct: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    #[serde(rename = "_doc", default)]
    _doc: Option<String>,
    #[serde(default)]
    models: BTreeMap<String, PriceEntry>,
    #[serde(default)]
    profile_multipliers_pct: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceEntry {
    input_per_1k: String,
    output_per_1k: String,
    cache_read_per_1k: Option<String>,
    cache_write_per_1k: Option<String>,
    context_window: u32,
    max_output_tokens: u32,
    #[serde(default = "yes")]
    streaming: bool,
    #[serde(default)]
    tools: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("model prices are not valid JSON of the expected shape: {0}")]
    Shape(String),
    #[error("model {model:?}, field {field}: {source}")]
    Price { model: String, field: &'static str, source: MoneyError },
    #[error("model {model:?}, field {field}: price has more than 9 decimal places per 1K tokens")]
    SubPicoPrice { model: String, field: &'static str },
}

const PROFILE_PREFIXES: [&str; 4] = ["us", "eu", "apac", "global"];

impl ModelRegistry {
    /// The built-in sheet with `overrides` (JSON, same shape) applied on top.
    pub fn load(overrides: Option<&str>) -> Result<Self, PricingError> {
        let mut registry = Self { models: BTreeMap::new(), profile_multipliers_pct: BTreeMap::new() };
        registry.apply(BUILTIN)?;
        if let Some(json) = overrides.filter(|s| !s.trim().is_empty()) {
            registry.apply(json)?;
        }
        Ok(registry)
    }

    pub fn builtin() -> Self {
        #[allow(clippy::expect_used)] // the built-in sheet is tested below; failing here is a build defect
        Self::load(None).expect("built-in models.json is valid")
    }

    fn apply(&mut self, json: &str) -> Result<(), PricingError> {
        let file: PriceFile = serde_json::from_str(json).map_err(|e| PricingError::Shape(e.to_string()))?;
        for (id, e) in file.models {
            let price = |field: &'static str, raw: &str| -> Result<Usd, PricingError> {
                let per_1k = Usd::parse_decimal(raw).map_err(|source| PricingError::Price { model: id.clone(), field, source })?;
                if per_1k.pico() % 1000 != 0 {
                    return Err(PricingError::SubPicoPrice { model: id.clone(), field });
                }
                Ok(Usd::from_pico(per_1k.pico() / 1000))
            };
            let info = ModelInfo {
                input: price("input_per_1k", &e.input_per_1k)?,
                output: price("output_per_1k", &e.output_per_1k)?,
                cache_read: e.cache_read_per_1k.as_deref().map(|p| price("cache_read_per_1k", p)).transpose()?,
                cache_write: e.cache_write_per_1k.as_deref().map(|p| price("cache_write_per_1k", p)).transpose()?,
                context_window: e.context_window,
                max_output_tokens: e.max_output_tokens,
                streaming: e.streaming,
                id: id.clone(),
            };
            let _ = e.tools;
            self.models.insert(id, info);
        }
        self.profile_multipliers_pct.extend(file.profile_multipliers_pct);
        Ok(())
    }

    /// Looks a model id up, resolving cross-region inference profiles
    /// (`us.anthropic.claude-…` → `anthropic.claude-…`) and applying the profile's
    /// price multiplier.
    pub fn get(&self, model_id: &str) -> Option<Cow<'_, ModelInfo>> {
        if let Some(info) = self.models.get(model_id) {
            return Some(Cow::Borrowed(info));
        }
        let (prefix, base) = model_id.split_once('.')?;
        if !PROFILE_PREFIXES.contains(&prefix) {
            return None;
        }
        let mut info = self.models.get(base)?.clone();
        let pct = self.profile_multipliers_pct.get(prefix).copied().unwrap_or(100);
        if pct != 100 {
            let scale = |p: Usd| Usd::from_pico(p.pico().saturating_mul(pct) / 100);
            info.input = scale(info.input);
            info.output = scale(info.output);
            info.cache_read = info.cache_read.map(scale);
            info.cache_write = info.cache_write.map(scale);
        }
        info.id = model_id.to_owned();
        Some(Cow::Owned(info))
    }

    pub fn model_ids(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sheet_loads() {
        let r = ModelRegistry::builtin();
        assert!(r.model_ids().count() >= 5);
    }

    #[test]
    fn nova_micro_cost_matches_hand_computation() {
        // 1,000 input at $0.000035/1K + 500 output at $0.00014/1K + 2,000 cache read at $0.00000875/1K
        // = 0.000035 + 0.00007 + 0.0000175 = $0.0001225
        let registry = ModelRegistry::builtin();
        let m = registry.get("amazon.nova-micro-v1:0").unwrap();
        let usage = Usage { input_tokens: 1000, output_tokens: 500, cache_read_tokens: 2000, cache_write_tokens: 0 };
        assert_eq!(m.cost(&usage).unwrap().to_string(), "0.0001225");
    }

    #[test]
    fn inference_profiles_resolve_to_their_model() {
        let r = ModelRegistry::builtin();
        let base = r.get("anthropic.claude-3-5-haiku-20241022-v1:0").unwrap();
        let us = r.get("us.anthropic.claude-3-5-haiku-20241022-v1:0").unwrap();
        assert_eq!((us.input, us.output), (base.input, base.output));
        assert!(r.get("xx.anthropic.claude-3-5-haiku-20241022-v1:0").is_none());
        assert!(r.get("made.up-model").is_none());
    }

    #[test]
    fn overrides_replace_and_add_models() {
        let json = r#"{"models":{"custom.model-v1":{"input_per_1k":"0.001","output_per_1k":"0.002","context_window":1000,"max_output_tokens":100}}}"#;
        let r = ModelRegistry::load(Some(json)).unwrap();
        assert_eq!(r.get("custom.model-v1").map(|m| m.input.pico()), Some(1_000_000));
        assert!(r.get("amazon.nova-micro-v1:0").is_some());
    }

    #[test]
    fn bad_overrides_name_the_model_and_field() {
        let json = r#"{"models":{"m":{"input_per_1k":"cheap","output_per_1k":"0.002","context_window":1,"max_output_tokens":1}}}"#;
        let err = ModelRegistry::load(Some(json)).unwrap_err().to_string();
        assert!(err.contains("\"m\"") && err.contains("input_per_1k"), "{err}");
    }
}
