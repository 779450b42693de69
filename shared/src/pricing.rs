//! The model registry: what each Bedrock model costs and how much it can take.
//!
//! Prices ship in `shared/models.json` (the published per-1K-token sheet, kept as decimal
//! strings so nothing passes through a float) and may be overridden per deployment with
//! `CHAINRUN_MODEL_PRICES`. Internally a price is pico-dollars per token (see [`crate::money`]),
//! so `cost = Σ tokens × price` is exact integer arithmetic.
//!
//! Where a call runs can change its price. Bedrock routes a bare model id in the caller's
//! Region, a geographic inference profile (`us.`, `eu.`, …) within one geography, and a
//! `global.` profile anywhere. For most models all three cost the same; for Anthropic's 4.5
//! generation AWS lists the global profile at the base price and the other two 10% higher.
//! The sheet therefore lists one price per model plus an optional percentage per scope, and
//! a percentage that would leave a fraction of a pico-dollar is refused when the sheet is
//! loaded, so every price the registry hands out is exact.

use crate::money::{MoneyError, Usd};
use chrono::NaiveDate;
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

    /// Both usages together.
    pub fn plus(&self, other: &Usage) -> Usage {
        Usage {
            input_tokens: self.input_tokens + other.input_tokens,
            output_tokens: self.output_tokens + other.output_tokens,
            cache_read_tokens: self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens: self.cache_write_tokens + other.cache_write_tokens,
        }
    }
}

/// One model as called through one id: the prices already account for where the call runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The id it was looked up by, profile prefix included.
    pub id: String,
    /// Pico-dollars per token.
    pub input: Usd,
    pub output: Usd,
    pub cache_read: Option<Usd>,
    /// The 5-minute cache write.
    pub cache_write: Option<Usd>,
    pub context_window: u32,
    pub max_output_tokens: u32,
    pub streaming: bool,
    /// Whether the Converse API accepts tool definitions for this model.
    pub tools: bool,
    /// Explicit prompt caching (Converse `cachePoint`), where the model offers it.
    pub cache: Option<CacheRules>,
    /// The service tiers beyond `default` the model offers, as a percent of these prices.
    pub tiers: BTreeMap<ServiceTier, u64>,
    /// Batch inference, where the model offers it.
    pub batch: Option<BatchRules>,
    /// Whether Converse accepts `outputConfig.textFormat` (a JSON Schema) for this model.
    pub structured_output: bool,
    pub lifecycle: Lifecycle,
}

/// What a Converse `cachePoint` needs on this model. Bedrock counts a checkpoint's prefix
/// from the start of the request and ignores (without an error) one placed before the
/// prefix reaches the minimum: the n-th checkpoint needs `n × min_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRules {
    pub min_tokens: u32,
    pub max_points: u8,
}

/// Batch inference: a model invocation job over a JSONL file, at `pct` percent of the
/// on-demand price, refused by Bedrock below `min_records` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRules {
    pub pct: u64,
    pub min_records: u32,
}

/// Bedrock's on-demand service tiers (`reserved` needs a reservation and is not offered).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServiceTier {
    #[default]
    Default,
    Flex,
    Priority,
}

impl ServiceTier {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceTier::Default => "default",
            ServiceTier::Flex => "flex",
            ServiceTier::Priority => "priority",
        }
    }
}

/// Where a model stands in Bedrock's lifecycle (Active, Legacy, End-of-Life), by date.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifecycle {
    /// The day AWS listed the model as Legacy.
    pub deprecated_after: Option<NaiveDate>,
    /// The first day Bedrock no longer serves it.
    pub end_of_life: Option<NaiveDate>,
}

/// How far ahead of its end of life a model is warned about when nothing else says so.
pub const END_OF_LIFE_NOTICE_DAYS: i64 = 90;

/// What validation says about a model's lifecycle on a given day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleStatus {
    Active,
    /// Still served; the message says why a workflow should move off it.
    Warn(String),
    /// No longer served: a call would fail.
    Retired(String),
}

impl Lifecycle {
    pub fn status(&self, model: &str, today: NaiveDate) -> LifecycleStatus {
        if let Some(eol) = self.end_of_life {
            if today >= eol {
                return LifecycleStatus::Retired(format!("{model} reached its end of life on Bedrock on {eol} and is no longer served"));
            }
            let left = (eol - today).num_days();
            if left <= END_OF_LIFE_NOTICE_DAYS || self.deprecated_after.is_some_and(|d| today >= d) {
                return LifecycleStatus::Warn(format!("{model} is a legacy model: Bedrock stops serving it on {eol} ({left} days from now)"));
            }
        }
        match self.deprecated_after {
            Some(since) if today >= since => LifecycleStatus::Warn(format!(
                "{model} is a legacy model on Bedrock since {since}: move to a current model before its end of life is announced"
            )),
            _ => LifecycleStatus::Active,
        }
    }
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

    /// The same model at `pct` percent of these prices; `None` if a price would not stay a
    /// whole pico-dollar (loading rejects such percentages, so lookups never see it).
    fn at_pct(&self, pct: u64) -> Option<ModelInfo> {
        let scale = |p: Usd| -> Option<Usd> {
            let scaled = p.pico().checked_mul(pct)?;
            (scaled % 100 == 0).then(|| Usd::from_pico(scaled / 100))
        };
        Some(ModelInfo {
            input: scale(self.input)?,
            output: scale(self.output)?,
            cache_read: match self.cache_read {
                Some(p) => Some(scale(p)?),
                None => None,
            },
            cache_write: match self.cache_write {
                Some(p) => Some(scale(p)?),
                None => None,
            },
            ..self.clone()
        })
    }

    /// This model called in `tier`; `None` when the model does not offer it.
    pub fn in_tier(&self, tier: ServiceTier) -> Option<Cow<'_, ModelInfo>> {
        match tier {
            ServiceTier::Default => Some(Cow::Borrowed(self)),
            other => self.at_pct(*self.tiers.get(&other)?).map(Cow::Owned),
        }
    }

    /// This model run as a batch inference job; `None` when the model does not offer it.
    pub fn batched(&self) -> Option<ModelInfo> {
        self.at_pct(self.batch?.pct)
    }

    fn prices(&self) -> [(&'static str, Option<Usd>); 4] {
        [
            ("input_per_1k", Some(self.input)),
            ("output_per_1k", Some(self.output)),
            ("cache_read_per_1k", self.cache_read),
            ("cache_write_per_1k", self.cache_write),
        ]
    }
}

/// Where Bedrock runs a call, which is what the price sheet distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The bare model id, served in the caller's Region.
    InRegion,
    /// A geographic cross-Region inference profile.
    Geo,
    /// The `global.` cross-Region inference profile.
    Global,
}

impl Scope {
    const ALL: [Scope; 3] = [Scope::InRegion, Scope::Geo, Scope::Global];

    fn name(self) -> &'static str {
        match self {
            Scope::InRegion => "in_region",
            Scope::Geo => "geo",
            Scope::Global => "global",
        }
    }
}

/// Inference profile prefixes Bedrock defines, and the scope each one runs in.
const PROFILE_PREFIXES: [(&str, Scope); 7] = [
    ("global", Scope::Global),
    ("us", Scope::Geo),
    ("us-gov", Scope::Geo),
    ("eu", Scope::Geo),
    ("apac", Scope::Geo),
    ("jp", Scope::Geo),
    ("au", Scope::Geo),
];

/// A percentage far outside any published premium is a typo, and capping it keeps
/// `price × pct` well inside a u64.
const MAX_PCT: u64 = 1000;

/// Percent of the listed price by scope, as the sheet's `price_pct`; a missing scope is 100.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopePct {
    global: Option<u64>,
    geo: Option<u64>,
    in_region: Option<u64>,
}

impl ScopePct {
    fn get(&self, scope: Scope) -> u64 {
        let pct = match scope {
            Scope::InRegion => self.in_region,
            Scope::Geo => self.geo,
            Scope::Global => self.global,
        };
        pct.unwrap_or(100)
    }
}

#[derive(Debug, Clone)]
struct Entry {
    /// Listed prices, `id` being the bare model id.
    info: ModelInfo,
    scope_pct: Option<ScopePct>,
}

#[derive(Debug, Clone)]
pub struct ModelRegistry {
    models: BTreeMap<String, Entry>,
    /// Deployment-wide percentage per profile prefix, for models without their own `price_pct`.
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
    price_pct: Option<ScopePct>,
    cache: Option<CacheRules>,
    #[serde(default)]
    tiers: BTreeMap<ServiceTier, u64>,
    batch: Option<BatchRules>,
    #[serde(default)]
    structured_output: bool,
    deprecated_after: Option<String>,
    end_of_life: Option<String>,
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
    #[error("model {model:?}: max_output_tokens is {max_output_tokens} but must be between 1 and context_window ({context_window})")]
    OutputLimit { model: String, max_output_tokens: u32, context_window: u32 },
    #[error("model {model:?}, {scope} price: {pct}% is outside 1..={MAX_PCT}")]
    PctOutOfRange { model: String, scope: String, pct: u64 },
    #[error(
        "model {model:?}, {scope} price: {pct}% of {field} is not a whole, representable number of pico-dollars per token; pick a percentage that keeps it exact or list that price as its own model"
    )]
    InexactPct { model: String, scope: String, field: &'static str, pct: u64 },
}

impl ModelRegistry {
    /// The built-in sheet with `overrides` (JSON, same shape) applied on top.
    pub fn load(overrides: Option<&str>) -> Result<Self, PricingError> {
        let mut registry = Self { models: BTreeMap::new(), profile_multipliers_pct: BTreeMap::new() };
        registry.apply(BUILTIN)?;
        if let Some(json) = overrides.filter(|s| !s.trim().is_empty()) {
            registry.apply(json)?;
        }
        registry.check_percentages()?;
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
            if e.max_output_tokens == 0 || e.max_output_tokens > e.context_window {
                return Err(PricingError::OutputLimit { model: id, max_output_tokens: e.max_output_tokens, context_window: e.context_window });
            }
            let date = |field: &'static str, raw: Option<&str>| -> Result<Option<NaiveDate>, PricingError> {
                raw.map(|d| {
                    NaiveDate::parse_from_str(d, "%Y-%m-%d")
                        .map_err(|_| PricingError::Shape(format!("model {id:?}, field {field}: {d:?} is not a date (YYYY-MM-DD)")))
                })
                .transpose()
            };
            let lifecycle = Lifecycle {
                deprecated_after: date("deprecated_after", e.deprecated_after.as_deref())?,
                end_of_life: date("end_of_life", e.end_of_life.as_deref())?,
            };
            let info = ModelInfo {
                input: price("input_per_1k", &e.input_per_1k)?,
                output: price("output_per_1k", &e.output_per_1k)?,
                cache_read: e.cache_read_per_1k.as_deref().map(|p| price("cache_read_per_1k", p)).transpose()?,
                cache_write: e.cache_write_per_1k.as_deref().map(|p| price("cache_write_per_1k", p)).transpose()?,
                context_window: e.context_window,
                max_output_tokens: e.max_output_tokens,
                streaming: e.streaming,
                tools: e.tools,
                cache: e.cache,
                tiers: e.tiers,
                batch: e.batch,
                structured_output: e.structured_output,
                lifecycle,
                id: id.clone(),
            };
            if info.tiers.contains_key(&ServiceTier::Default) {
                return Err(PricingError::Shape(format!("model {id:?}: tiers lists only flex and priority; default is always the listed price")));
            }
            if let Some(rules) = info.cache
                && (rules.min_tokens == 0 || rules.max_points == 0)
            {
                return Err(PricingError::Shape(format!("model {id:?}: cache.min_tokens and cache.max_points must be at least 1")));
            }
            if let (Some(from), Some(eol)) = (lifecycle.deprecated_after, lifecycle.end_of_life)
                && from > eol
            {
                return Err(PricingError::Shape(format!("model {id:?}: deprecated_after ({from}) is after end_of_life ({eol})")));
            }
            self.models.insert(id, Entry { info, scope_pct: e.price_pct });
        }
        self.profile_multipliers_pct.extend(file.profile_multipliers_pct);
        Ok(())
    }

    /// Every percentage that a lookup can apply, checked against every price it applies to,
    /// so that [`Self::get`] never meets an inexact price.
    fn check_percentages(&self) -> Result<(), PricingError> {
        for (id, entry) in &self.models {
            let applicable: Vec<(String, u64)> = match entry.scope_pct {
                Some(pct) => Scope::ALL.iter().map(|s| (s.name().to_owned(), pct.get(*s))).collect(),
                None => std::iter::once(("listed".to_owned(), 100))
                    .chain(self.profile_multipliers_pct.iter().map(|(prefix, pct)| (format!("{prefix}. profile"), *pct)))
                    .collect(),
            };
            // A tier or batch price applies on top of the scope's: both steps must stay exact.
            let levers: Vec<(String, u64)> = std::iter::once((String::new(), 100))
                .chain(entry.info.tiers.iter().map(|(tier, pct)| (format!(" in the {} tier", tier.as_str()), *pct)))
                .chain(entry.info.batch.map(|b| (" in batch".to_owned(), b.pct)))
                .collect();
            for (scope, pct) in &applicable {
                for (lever, lever_pct) in &levers {
                    let scope = format!("{scope}{lever}");
                    for p in [*pct, *lever_pct] {
                        if !(1..=MAX_PCT).contains(&p) {
                            return Err(PricingError::PctOutOfRange { model: id.clone(), scope, pct: p });
                        }
                    }
                    for (field, price) in entry.info.prices() {
                        let exact = |p: Usd| {
                            p.pico().checked_mul(*pct).is_some_and(|scaled| scaled % 100 == 0)
                                && (p.pico() * pct / 100).checked_mul(*lever_pct).is_some_and(|scaled| scaled % 100 == 0)
                        };
                        if price.is_some_and(|p| !exact(p)) {
                            return Err(PricingError::InexactPct { model: id.clone(), scope, field, pct: pct * lever_pct / 100 });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Looks a model id up, resolving cross-region inference profiles
    /// (`us.anthropic.claude-…` → `anthropic.claude-…`) and pricing the call for where it
    /// runs. `None` for an unknown model or an unknown profile prefix.
    pub fn get(&self, model_id: &str) -> Option<Cow<'_, ModelInfo>> {
        if let Some(entry) = self.models.get(model_id) {
            return self.priced(entry, model_id, None, Scope::InRegion);
        }
        let (prefix, base) = model_id.split_once('.')?;
        let (_, scope) = PROFILE_PREFIXES.iter().find(|(p, _)| *p == prefix)?;
        self.priced(self.models.get(base)?, model_id, Some(prefix), *scope)
    }

    fn priced<'a>(&'a self, entry: &'a Entry, model_id: &str, prefix: Option<&str>, scope: Scope) -> Option<Cow<'a, ModelInfo>> {
        let pct = match entry.scope_pct {
            Some(pct) => pct.get(scope),
            None => prefix.and_then(|p| self.profile_multipliers_pct.get(p)).copied().unwrap_or(100),
        };
        if pct == 100 && entry.info.id == model_id {
            return Some(Cow::Borrowed(&entry.info));
        }
        let mut info = entry.info.at_pct(pct)?;
        info.id = model_id.to_owned();
        Some(Cow::Owned(info))
    }

    /// The bare model ids on the sheet (profile ids are not listed; [`Self::get`] resolves them).
    pub fn model_ids(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input_tokens: u64, output_tokens: u64, cache_read_tokens: u64, cache_write_tokens: u64) -> Usage {
        Usage { input_tokens, output_tokens, cache_read_tokens, cache_write_tokens }
    }

    fn cost(registry: &ModelRegistry, model_id: &str, usage: Usage) -> String {
        let model = registry.get(model_id).unwrap_or_else(|| panic!("{model_id} is not on the sheet"));
        model.cost(&usage).unwrap_or_else(|| panic!("{model_id}: cost overflowed")).to_string()
    }

    const HAIKU_4_5: &str = "anthropic.claude-haiku-4-5-20251001-v1:0";
    const SONNET_4_5: &str = "anthropic.claude-sonnet-4-5-20250929-v1:0";
    const LLAMA_3_3_70B: &str = "meta.llama3-3-70b-instruct-v1:0";

    #[test]
    fn every_builtin_entry_is_a_plausible_price_sheet_row() {
        let r = ModelRegistry::builtin();
        assert!(r.model_ids().count() >= 25);
        for id in r.model_ids() {
            let m = r.get(id).unwrap();
            assert!(m.input > Usd::ZERO && m.output > Usd::ZERO, "{id}: prices must be positive");
            for cached in [m.cache_read, m.cache_write].into_iter().flatten() {
                assert!(cached > Usd::ZERO, "{id}: cache prices must be positive");
            }
            if let Some(read) = m.cache_read {
                assert!(read < m.input, "{id}: a cache read costs less than input");
            }
            assert!(m.max_output_tokens >= 1 && m.max_output_tokens <= m.context_window, "{id}: output limit");
            assert!(m.context_window >= 4096, "{id}: context window");
            assert!(!PROFILE_PREFIXES.iter().any(|(p, _)| id.starts_with(&format!("{p}."))), "{id}: list bare model ids only");
        }
    }

    #[test]
    fn nova_micro_cost_matches_hand_computation() {
        // 1,000 input at $0.000035/1K + 500 output at $0.00014/1K + 2,000 cache read at $0.00000875/1K
        // = 0.000035 + 0.00007 + 0.0000175 = $0.0001225
        let r = ModelRegistry::builtin();
        assert_eq!(cost(&r, "amazon.nova-micro-v1:0", usage(1000, 500, 2000, 0)), "0.0001225");
    }

    #[test]
    fn nova_lite_cost_matches_hand_computation() {
        // 10,000 input at $0.00006/1K = $0.0006
        // 2,000 output at $0.00024/1K = $0.00048
        // 4,000 cache read at $0.000015/1K = $0.00006
        // total $0.00114; the us. profile costs the same.
        let r = ModelRegistry::builtin();
        assert_eq!(cost(&r, "amazon.nova-lite-v1:0", usage(10_000, 2_000, 4_000, 0)), "0.00114");
        assert_eq!(cost(&r, "us.amazon.nova-lite-v1:0", usage(10_000, 2_000, 4_000, 0)), "0.00114");
    }

    #[test]
    fn haiku_4_5_bills_cache_reads_and_writes_at_their_own_prices() {
        // Global (listed) prices per 1K: input 0.001, output 0.005, cache read 0.0001, cache write 0.00125.
        //   2,000 input = 0.002; 500 output = 0.0025; 10,000 cache read = 0.001; 4,000 cache write = 0.005
        //   total $0.0105
        // us. profile, 10% more: 0.0022 + 0.00275 + 0.0011 + 0.0055 = $0.01155
        let r = ModelRegistry::builtin();
        let u = usage(2_000, 500, 10_000, 4_000);
        assert_eq!(cost(&r, &format!("global.{HAIKU_4_5}"), u), "0.0105");
        assert_eq!(cost(&r, &format!("us.{HAIKU_4_5}"), u), "0.01155");
        assert_eq!(cost(&r, &format!("eu.{HAIKU_4_5}"), u), "0.01155");
    }

    #[test]
    fn sonnet_4_5_costs_ten_percent_more_through_a_geographic_profile_than_global() {
        // 1,000,000 input and 100,000 output.
        // global.: 1,000 × $0.003 + 100 × $0.015 = 3 + 1.5 = $4.5
        // us.:     1,000 × $0.0033 + 100 × $0.0165 = 3.3 + 1.65 = $4.95
        // The bare id runs in-region, priced like the geographic profiles.
        let r = ModelRegistry::builtin();
        let u = usage(1_000_000, 100_000, 0, 0);
        assert_eq!(cost(&r, &format!("global.{SONNET_4_5}"), u), "4.5");
        assert_eq!(cost(&r, &format!("us.{SONNET_4_5}"), u), "4.95");
        assert_eq!(cost(&r, &format!("jp.{SONNET_4_5}"), u), "4.95");
        assert_eq!(cost(&r, SONNET_4_5, u), "4.95");
        let us = r.get(&format!("us.{SONNET_4_5}")).unwrap();
        assert_eq!(us.id, format!("us.{SONNET_4_5}"));
        assert_eq!((us.cache_read, us.cache_write), (Some(Usd::from_pico(330_000)), Some(Usd::from_pico(4_125_000))));
    }

    #[test]
    fn models_without_a_premium_cost_the_same_through_every_profile() {
        // Sonnet 4 predates the 4.5 generation's regional premium: $0.003/1K everywhere.
        let r = ModelRegistry::builtin();
        for id in [
            "anthropic.claude-sonnet-4-20250514-v1:0",
            "global.anthropic.claude-sonnet-4-20250514-v1:0",
            "apac.anthropic.claude-sonnet-4-20250514-v1:0",
        ] {
            assert_eq!(r.get(id).unwrap().input, Usd::from_pico(3_000_000), "{id}");
        }
    }

    #[test]
    fn llama_3_3_cost_matches_hand_computation() {
        // $0.00072/1K for input and output, no cache price (cached tokens are billed as input):
        // 3,000 input = 0.00216; 1,000 output = 0.00072; 1,000 cache read = 0.00072; total $0.0036
        let r = ModelRegistry::builtin();
        let u = usage(3_000, 1_000, 1_000, 0);
        assert_eq!(cost(&r, &format!("us.{LLAMA_3_3_70B}"), u), "0.0036");
        assert_eq!(cost(&r, LLAMA_3_3_70B, u), "0.0036");
    }

    #[test]
    fn every_builtin_price_stays_a_whole_pico_dollar_through_every_profile() {
        // A lookup that would leave a fraction of a pico-dollar returns None, so Some everywhere
        // proves exactness. 110% works on this sheet because every per-token price is a multiple
        // of 10 pico-dollars: the smallest, Nova Micro's cache read, is 8,750 → 9,625.
        let r = ModelRegistry::builtin();
        for id in r.model_ids() {
            for (prefix, _) in PROFILE_PREFIXES {
                assert!(r.get(&format!("{prefix}.{id}")).is_some(), "{prefix}.{id}");
            }
            let listed = r.get(id).unwrap();
            for (field, price) in listed.prices() {
                assert!(price.is_none_or(|p| p.pico() % 10 == 0), "{id} {field}: 110% would not be exact");
            }
        }
        assert_eq!(r.get(&format!("us.{HAIKU_4_5}")).unwrap().input, Usd::from_pico(1_100_000));
    }

    #[test]
    fn unknown_prefixes_and_unknown_models_are_not_priced() {
        let r = ModelRegistry::builtin();
        assert!(r.get(&format!("xx.{HAIKU_4_5}")).is_none());
        assert!(r.get("made.up-model").is_none());
        assert!(r.get("us.made.up-model").is_none());
        assert!(r.get("us.").is_none());
        assert!(r.get("").is_none());
        assert!(r.get("anthropic.claude-3-5-haiku-20241022-v1:0").is_some());
    }

    #[test]
    fn overrides_change_one_price_and_add_a_model() {
        let json = r#"{"models":{
            "amazon.nova-lite-v1:0":{"input_per_1k":"0.00007","output_per_1k":"0.00024","context_window":300000,"max_output_tokens":10000,"tools":true},
            "custom.model-v1":{"input_per_1k":"0.001","output_per_1k":"0.002","context_window":1000,"max_output_tokens":100}}}"#;
        let r = ModelRegistry::load(Some(json)).unwrap();
        let builtin = ModelRegistry::builtin();
        assert_eq!(r.get("amazon.nova-lite-v1:0").unwrap().input, Usd::from_pico(70_000));
        assert_eq!(r.get("amazon.nova-lite-v1:0").unwrap().cache_read, None, "an override replaces the whole entry");
        assert_eq!(r.get("custom.model-v1").map(|m| m.input.pico()), Some(1_000_000));
        assert_eq!(r.get("us.custom.model-v1").map(|m| m.output.pico()), Some(2_000_000));
        assert_eq!(r.get("amazon.nova-micro-v1:0"), builtin.get("amazon.nova-micro-v1:0"));
        assert_eq!(r.model_ids().count(), builtin.model_ids().count() + 1);
    }

    #[test]
    fn bad_overrides_name_the_model_and_field() {
        let json = r#"{"models":{"m":{"input_per_1k":"cheap","output_per_1k":"0.002","context_window":1,"max_output_tokens":1}}}"#;
        let err = ModelRegistry::load(Some(json)).unwrap_err().to_string();
        assert!(err.contains("\"m\"") && err.contains("input_per_1k"), "{err}");

        let json =
            r#"{"models":{"m":{"input_per_1k":"0.001","output_per_1k":"0.002","cache_write_per_1k":"-1","context_window":1,"max_output_tokens":1}}}"#;
        let err = ModelRegistry::load(Some(json)).unwrap_err().to_string();
        assert!(err.contains("\"m\"") && err.contains("cache_write_per_1k"), "{err}");
    }

    #[test]
    fn a_price_finer_than_a_pico_dollar_per_token_is_rejected() {
        let json = r#"{"models":{"m":{"input_per_1k":"0.0000000001","output_per_1k":"0.002","context_window":10,"max_output_tokens":1}}}"#;
        let err = ModelRegistry::load(Some(json)).unwrap_err();
        assert_eq!(err, PricingError::SubPicoPrice { model: "m".into(), field: "input_per_1k" });
    }

    #[test]
    fn a_percentage_that_leaves_a_fraction_of_a_pico_dollar_is_rejected() {
        // $0.000000001/1K is 1 pico-dollar per token; 110% of it would be 1.1.
        let json = r#"{"models":{"m":{"input_per_1k":"0.000000001","output_per_1k":"0.002","context_window":10,"max_output_tokens":1,"price_pct":{"geo":110}}}}"#;
        let err = ModelRegistry::load(Some(json)).unwrap_err();
        assert_eq!(err, PricingError::InexactPct { model: "m".into(), scope: "geo".into(), field: "input_per_1k", pct: 110 });
        assert!(err.to_string().contains("\"m\""), "{err}");
    }

    #[test]
    fn a_deployment_wide_profile_percentage_must_be_exact_for_every_model() {
        // Nova Micro's cache read is 8,750 pico-dollars per token; 101% of it is 8,837.5
        // (and Nova 2 Lite's in the priority tier, 75,000 × 101% × 175%, is not whole either).
        let err = ModelRegistry::load(Some(r#"{"profile_multipliers_pct":{"eu":101}}"#)).unwrap_err();
        assert!(matches!(&err, PricingError::InexactPct { scope, .. } if scope.starts_with("eu. profile")), "{err}");
    }

    #[test]
    fn out_of_range_percentages_and_unknown_scopes_are_rejected() {
        let entry = |pct: &str| {
            format!(
                r#"{{"models":{{"m":{{"input_per_1k":"0.001","output_per_1k":"0.002","context_window":10,"max_output_tokens":1,"price_pct":{pct}}}}}}}"#
            )
        };
        assert!(matches!(ModelRegistry::load(Some(&entry(r#"{"global":0}"#))), Err(PricingError::PctOutOfRange { pct: 0, .. })));
        assert!(matches!(ModelRegistry::load(Some(&entry(r#"{"geo":5000}"#))), Err(PricingError::PctOutOfRange { pct: 5000, .. })));
        assert!(matches!(ModelRegistry::load(Some(&entry(r#"{"regional":110}"#))), Err(PricingError::Shape(_))));
    }

    #[test]
    fn an_output_limit_beyond_the_context_window_is_rejected() {
        let json = r#"{"models":{"m":{"input_per_1k":"0.001","output_per_1k":"0.002","context_window":1000,"max_output_tokens":2000}}}"#;
        let err = ModelRegistry::load(Some(json)).unwrap_err();
        assert_eq!(err, PricingError::OutputLimit { model: "m".into(), max_output_tokens: 2000, context_window: 1000 });
    }

    #[test]
    fn a_deployment_wide_profile_percentage_applies_only_to_models_without_their_own() {
        let r = ModelRegistry::load(Some(r#"{"profile_multipliers_pct":{"eu":120}}"#)).unwrap();
        // Nova Pro: $0.0008/1K = 800,000 pico per token; 120% = 960,000.
        assert_eq!(r.get("eu.amazon.nova-pro-v1:0").unwrap().input, Usd::from_pico(960_000));
        assert_eq!(r.get("amazon.nova-pro-v1:0").unwrap().input, Usd::from_pico(800_000));
        // Sonnet 4.5 keeps its own 110%: 3,300,000.
        assert_eq!(r.get(&format!("eu.{SONNET_4_5}")).unwrap().input, Usd::from_pico(3_300_000));
    }

    #[test]
    fn tool_support_is_carried_through_lookups() {
        let r = ModelRegistry::builtin();
        assert!(r.get("us.amazon.nova-pro-v1:0").unwrap().tools);
        assert!(!r.get("mistral.mistral-7b-instruct-v0:2").unwrap().tools);
    }
    #[test]
    fn the_registry_lists_the_current_claude_generation_with_its_cache_rules() {
        let r = ModelRegistry::builtin();
        for (id, min_tokens) in [
            ("anthropic.claude-sonnet-4-6", 1024),
            ("anthropic.claude-opus-4-5-20251101-v1:0", 4096),
            ("anthropic.claude-opus-4-6-v1", 4096),
            ("anthropic.claude-opus-4-7", 4096),
            (HAIKU_4_5, 4096),
        ] {
            let m = r.get(&format!("global.{id}")).unwrap_or_else(|| panic!("{id} is not on the sheet"));
            assert_eq!(m.cache.map(|c| c.min_tokens), Some(min_tokens), "{id}");
            assert!(m.structured_output && m.batch.is_some(), "{id}");
            // Cache writes cost 1.25× input and reads 0.1×, on every Claude of this generation.
            assert_eq!(m.cache_write.map(|w| w.pico() * 4), Some(m.input.pico() * 5), "{id}");
            assert_eq!(m.cache_read.map(|w| w.pico() * 10), Some(m.input.pico()), "{id}");
        }
        // Opus 4.5: $0.005/1K in, 10% more through a geographic profile.
        assert_eq!(r.get("us.anthropic.claude-opus-4-5-20251101-v1:0").unwrap().input, Usd::from_pico(5_500_000));
    }

    #[test]
    fn a_service_tier_is_priced_at_its_percentage_and_only_where_the_model_offers_it() {
        // gpt-oss-120b: $0.00015/1K in, $0.0006/1K out. 10,000 in + 1,000 out:
        //   default  0.0015 + 0.0006 = $0.0021
        //   flex     50%  → $0.00105
        //   priority 175% → $0.003675
        let r = ModelRegistry::builtin();
        let m = r.get("openai.gpt-oss-120b-1:0").unwrap();
        let u = usage(10_000, 1_000, 0, 0);
        let at = |tier| m.in_tier(tier).unwrap().cost(&u).unwrap().to_string();
        assert_eq!(at(ServiceTier::Default), "0.0021");
        assert_eq!(at(ServiceTier::Flex), "0.00105");
        assert_eq!(at(ServiceTier::Priority), "0.003675");
        let haiku = r.get(HAIKU_4_5).unwrap();
        assert!(haiku.in_tier(ServiceTier::Flex).is_none(), "Claude offers no flex tier");
        assert!(haiku.in_tier(ServiceTier::Default).is_some());
    }

    #[test]
    fn batch_inference_costs_half_the_on_demand_price() {
        // Haiku 4.5 through us.: $0.0011/1K in, $0.0055/1K out; 2,000 in + 500 out on demand
        // = 0.0022 + 0.00275 = $0.00495, in batch $0.002475.
        let r = ModelRegistry::builtin();
        let m = r.get(&format!("us.{HAIKU_4_5}")).unwrap();
        let u = usage(2_000, 500, 0, 0);
        assert_eq!(m.cost(&u).unwrap().to_string(), "0.00495");
        assert_eq!(m.batched().unwrap().cost(&u).unwrap().to_string(), "0.002475");
        assert_eq!(m.batch.map(|b| b.min_records), Some(100));
        assert!(r.get("deepseek.v3-v1:0").unwrap().batched().is_none());
    }

    #[test]
    fn lifecycle_warns_for_a_legacy_model_or_one_near_its_end_and_retires_one_past_it() {
        let day = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        let r = ModelRegistry::builtin();
        let sonnet_3_7 = r.get("anthropic.claude-3-7-sonnet-20250219-v1:0").unwrap();
        assert!(matches!(sonnet_3_7.lifecycle.status("m", day("2026-12-06")), LifecycleStatus::Retired(m) if m.contains("2026-04-28")));
        assert!(matches!(sonnet_3_7.lifecycle.status("m", day("2026-04-27")), LifecycleStatus::Warn(m) if m.contains("1 days")));
        assert_eq!(r.get(HAIKU_4_5).unwrap().lifecycle.status("m", day("2026-12-06")), LifecycleStatus::Active);
        let legacy = r.get("anthropic.claude-3-5-haiku-20241022-v1:0").unwrap();
        assert!(matches!(legacy.lifecycle.status("m", day("2026-12-06")), LifecycleStatus::Warn(_)));
        assert_eq!(legacy.lifecycle.status("m", day("2025-10-31")), LifecycleStatus::Active);
        // An end of life 90 days out warns even without a legacy date; 91 days out does not.
        let eol_only = Lifecycle { deprecated_after: None, end_of_life: Some(day("2027-03-06")) };
        assert!(matches!(eol_only.status("m", day("2026-12-06")), LifecycleStatus::Warn(_)));
        assert_eq!(eol_only.status("m", day("2026-12-05")), LifecycleStatus::Active);
    }

    #[test]
    fn bad_lever_entries_are_rejected_with_the_model_named() {
        let entry = |extra: &str| {
            format!(r#"{{"models":{{"m":{{"input_per_1k":"0.001","output_per_1k":"0.002","context_window":10,"max_output_tokens":1,{extra}}}}}}}"#)
        };
        for (extra, says) in [
            (r#""tiers":{"default":90}"#, "default"),
            (r#""tiers":{"turbo":90}"#, "turbo"),
            (r#""cache":{"min_tokens":0,"max_points":4}"#, "min_tokens"),
            (r#""deprecated_after":"2026-05-01","end_of_life":"2026-01-01""#, "deprecated_after"),
            (r#""end_of_life":"someday""#, "end_of_life"),
        ] {
            let err = ModelRegistry::load(Some(&entry(extra))).unwrap_err().to_string();
            assert!(err.contains(says), "{extra}: {err}");
        }
        // $0.000000001/1K is 1 pico-dollar per token: its batch price at 33% would be 0.33.
        let json = r#"{"models":{"m":{"input_per_1k":"0.000000001","output_per_1k":"0.002","context_window":10,"max_output_tokens":1,"batch":{"pct":33,"min_records":100}}}}"#;
        assert!(matches!(ModelRegistry::load(Some(json)), Err(PricingError::InexactPct { ref scope, .. }) if scope.contains("batch")));
    }
}
