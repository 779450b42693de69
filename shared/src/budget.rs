//! Run budgets: the limits a definition sets, the worst case of one model call, and the
//! ledger that admits calls against the limits.
//!
//! A definition may cap a run with `budget.max_cost_usd` and `budget.max_total_tokens`;
//! every `llm` step caps its reply with `max_tokens`. Before each model call (every
//! attempt, every map item) the engine asks the run's [`Ledger`] to [`Ledger::reserve`] the
//! call's worst case: [`estimate_input_tokens`] of the request as it will be sent plus
//! `max_tokens` of output, priced by [`worst_case`] with the [`ModelInfo`] the call runs
//! under (so inference-profile prices apply). The reservation must fit beside what the run
//! has already spent — a resumed run starts its ledger from its checkpoints' totals — and
//! what its other calls in flight hold. If it does not fit, the call is never made and the
//! step fails with [`BudgetExceeded`]. When the call returns, [`Ledger::settle`] charges the
//! usage Bedrock reported and frees the rest of the reservation; a call that failed without
//! reporting usage is [`Ledger::release`]d and costs nothing.
//!
//! The invariant this buys: every admitted call satisfied `spent + reserved + worst ≤ limit`,
//! and settling replaces the call's `worst` by its actual usage, which is no larger as long
//! as the input stays within the estimate (the bound is argued on [`estimate_input_tokens`])
//! and the output within `max_tokens` (Bedrock stops generating there). So a run's charged
//! tokens and cost never exceed its limits. Usage above a reservation is still charged —
//! what Bedrock reports is what the run spent — and the engine logs it as an overrun.
//!
//! Refusing is deliberate even when the call would fit once the calls in flight settle
//! (they usually spend far less than they reserve): waiting would hold a step hostage to
//! others' latencies, and the issue asks the runner to fail closed.
//!
//! Pure: integers only, no clock, no async. Money is [`Usd`] (pico-dollars); every sum is
//! checked or saturating, and saturation only ever errs towards refusing a call.

use crate::money::Usd;
use crate::pricing::{ModelInfo, Usage};
use crate::run::Totals;
use crate::workflow::Budget;
use serde_json::{Number, Value};
use std::fmt;

/// Input tokens allowed per message for what a chat template wraps around its text: role
/// markers, end-of-turn tokens, a SentencePiece dummy prefix. The engine sends a system
/// block (when the step has one) and one user message.
pub const TOKENS_PER_MESSAGE: u64 = 32;

/// Input tokens allowed once per request for what surrounds the conversation: a
/// begin-of-text token and the assistant header the reply continues from.
pub const TOKENS_PER_REQUEST: u64 = 64;

/// An upper bound on the input tokens Bedrock will report for a request with this system
/// prompt and user prompt (both as rendered and sent, corrective hints included):
///
/// `UTF-8 bytes of every text + TOKENS_PER_MESSAGE per text + TOKENS_PER_REQUEST`.
///
/// Why bytes bound the text's tokens. A tokenizer splits the text into pieces, and every
/// piece covers at least one byte of it:
/// - byte-level BPE (Claude, Llama 3, DeepSeek, gpt-oss, Cohere, Mistral's Tekken) works on
///   the UTF-8 bytes, and each token is a non-empty run of them, so tokens ≤ bytes;
/// - SentencePiece with byte fallback (Llama 2, Mistral 7B / Mixtral) emits pieces of one or
///   more characters, or one token per UTF-8 byte of a character outside its vocabulary;
///   a character is at least one byte, so tokens ≤ bytes again, plus the one dummy-prefix
///   `▁` it puts before the text, which the per-message allowance covers;
/// - Amazon's Nova and Titan do not publish their tokenizers; the bound assumes of them
///   what holds for every subword tokenizer above: no token stands for less than one
///   byte of the text.
///
/// The one way a text could gain tokens is a normalizer that expands it first (NFKC turns
/// U+FDFA, 3 bytes, into 18 characters); the tokenizers above normalize with identity, or
/// not at all. The tokens that are not in the text are the chat template's: Llama 3's, the
/// longest of the published templates of Bedrock's models, costs 1 + 5 per message + 4 for
/// the assistant header,
/// plus about 20 when Llama 3.1 writes its knowledge-cutoff line into the system header —
/// well under the 128 allowed for a system prompt and a user prompt. A model whose
/// provider billed a longer hidden prompt as input would exceed the bound; the engine
/// charges what Bedrock reports anyway and logs the overrun.
///
/// The overestimate is small: 128 tokens cost $0.0000045 on Nova Micro and $0.0004 on
/// Claude Sonnet 4.5, and English text runs about 4 bytes per token.
pub fn estimate_input_tokens(system: Option<&str>, prompt: &str) -> u64 {
    [system, Some(prompt)]
        .into_iter()
        .flatten()
        .fold(TOKENS_PER_REQUEST, |tokens, text| tokens.saturating_add(text.len() as u64).saturating_add(TOKENS_PER_MESSAGE))
}

/// The most one call can spend: `input_tokens` (an estimate from [`estimate_input_tokens`])
/// at the input price plus `max_tokens` at the output price.
///
/// Input is capped at the model's context window: Bedrock rejects a request whose prompt
/// does not fit the window (`ValidationException`, nothing billed), so no charged call
/// reports more input than that, however long its prompt is in bytes. This is what bounds
/// a call whose prompt cannot be bounded before the run (see [`crate::estimate`]); it
/// rests on the registry's `context_window` being the window Bedrock enforces.
///
/// Cache tokens: a call without cache points writes no prompt cache (a write can cost more
/// than input: Claude's is 125%). A cache read, if a model reported one, replaces input
/// tokens of the same prompt, so the input tokens, cache reads and cache writes of a call
/// together stay within the estimate; a cache read is priced at the higher of the two
/// prices here in case a price override lists it above input. A call with cache points is
/// reserved by [`worst_case_caching`], which prices its input at the cache-write price.
///
/// Saturating: an amount too large for a u64 is refused by any limit, never wrapped.
pub fn worst_case(model: &ModelInfo, input_tokens: u64, max_tokens: u32) -> Amount {
    worst_at(model, model.cache_read.map_or(model.input, |read| read.max(model.input)), input_tokens, max_tokens)
}

/// [`worst_case`] for a call that carries cache points: any of its input tokens may be a
/// cache write, so input is priced at the highest of the input, cache-read and cache-write
/// prices (a write costs 1.25× input on Claude; a model without a write price bills writes
/// as input).
pub fn worst_case_caching(model: &ModelInfo, input_tokens: u64, max_tokens: u32) -> Amount {
    let write = model.cache_write.unwrap_or(model.input);
    worst_at(model, model.cache_read.map_or(model.input, |read| read.max(model.input)).max(write), input_tokens, max_tokens)
}

fn worst_at(model: &ModelInfo, input_price: Usd, input_tokens: u64, max_tokens: u32) -> Amount {
    let output_tokens = u64::from(max_tokens);
    let input_tokens = input_tokens.min(u64::from(model.context_window));
    Amount {
        tokens: input_tokens.saturating_add(output_tokens),
        cost: Usd::from_pico(input_price.pico().saturating_mul(input_tokens).saturating_add(model.output.pico().saturating_mul(output_tokens))),
    }
}

/// Tokens and money together: a reservation, a sum of them, or what a run spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    /// Input, output and cache tokens alike: `max_total_tokens` caps their sum.
    pub tokens: u64,
    pub cost: Usd,
}

impl Amount {
    pub const ZERO: Amount = Amount { tokens: 0, cost: Usd::ZERO };

    /// What a call with this reported usage and cost spent.
    pub fn charged(usage: &Usage, cost: Usd) -> Self {
        Self { tokens: usage.total_tokens(), cost }
    }

    /// Whether this amount is within `other` in both tokens and money.
    pub fn within(self, other: Amount) -> bool {
        self.tokens <= other.tokens && self.cost <= other.cost
    }

    pub fn saturating_add(self, other: Amount) -> Amount {
        Amount { tokens: self.tokens.saturating_add(other.tokens), cost: self.cost.saturating_add(other.cost) }
    }

    fn saturating_sub(self, other: Amount) -> Amount {
        Amount { tokens: self.tokens.saturating_sub(other.tokens), cost: Usd::from_pico(self.cost.pico().saturating_sub(other.cost.pico())) }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${} / {} tokens", self.cost, self.tokens)
    }
}

/// A run's limits, parsed exactly from the definition's `budget`. `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetLimits {
    pub max_cost: Option<Usd>,
    pub max_total_tokens: Option<u64>,
}

/// One thing wrong with a `budget`, named by its field (`budget.max_cost_usd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetProblem {
    pub field: &'static str,
    pub message: String,
}

impl BudgetLimits {
    /// No limits: every reservation fits.
    pub const UNLIMITED: BudgetLimits = BudgetLimits { max_cost: None, max_total_tokens: None };

    /// Parses the definition's `budget`. `max_cost_usd` is a decimal string (`"0.02"`, read
    /// exactly) or a JSON number (read as the shortest decimal that round-trips, which is
    /// what was written for up to 15 significant digits); `max_total_tokens` a whole number.
    /// Zero is a limit like any other: it refuses every model call.
    pub fn from_def(budget: Option<&Budget>) -> Result<Self, Vec<BudgetProblem>> {
        let Some(budget) = budget else { return Ok(Self::UNLIMITED) };
        let mut problems = Vec::new();
        let max_cost = budget.max_cost_usd.as_ref().and_then(|raw| match parse_dollars(raw) {
            Ok(limit) => limit,
            Err(message) => {
                problems.push(BudgetProblem { field: "budget.max_cost_usd", message });
                None
            }
        });
        let max_total_tokens = budget.max_total_tokens.as_ref().and_then(|raw| match parse_tokens(raw) {
            Ok(limit) => limit,
            Err(message) => {
                problems.push(BudgetProblem { field: "budget.max_total_tokens", message });
                None
            }
        });
        if problems.is_empty() { Ok(Self { max_cost, max_total_tokens }) } else { Err(problems) }
    }

    pub fn is_unlimited(&self) -> bool {
        *self == Self::UNLIMITED
    }

    /// The first limit (money before tokens) that `spent + reserved + want` would break.
    pub fn exceeded_by(&self, spent: Amount, reserved: Amount, want: Amount) -> Option<Limit> {
        let over = |parts: [u64; 3], max: u64| parts.into_iter().try_fold(0u64, u64::checked_add).is_none_or(|total| total > max);
        if let Some(max) = self.max_cost
            && over([spent.cost.pico(), reserved.cost.pico(), want.cost.pico()], max.pico())
        {
            return Some(Limit::MaxCost(max));
        }
        if let Some(max) = self.max_total_tokens
            && over([spent.tokens, reserved.tokens, want.tokens], max)
        {
            return Some(Limit::MaxTotalTokens(max));
        }
        None
    }
}

fn parse_dollars(raw: &Value) -> Result<Option<Usd>, String> {
    let text = match raw {
        Value::Null => return Ok(None),
        Value::String(s) => s.clone(),
        Value::Number(n) => positional(n).ok_or_else(|| format!("{n} is not a dollar amount this precise or this large"))?,
        other => return Err(format!("must be a dollar amount as a decimal string (\"0.02\") or a number, not {}", json_kind(other))),
    };
    Usd::parse_decimal(&text).map(Some).map_err(|e| e.to_string())
}

fn parse_tokens(raw: &Value) -> Result<Option<u64>, String> {
    match raw {
        Value::Null => Ok(None),
        Value::Number(n) => n.as_u64().map(Some).ok_or_else(|| format!("{n} is not a whole number of tokens (0 or more)")),
        other => Err(format!("must be a whole number of tokens, not {}", json_kind(other))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON number as a plain decimal (`1e-5` → `0.00001`), sign kept so that parsing
/// rejects negatives. `None` for exponents no dollar amount needs.
fn positional(n: &Number) -> Option<String> {
    let text = n.to_string();
    let Some((mantissa, exp)) = text.split_once(['e', 'E']) else { return Some(text) };
    let exp: i32 = exp.parse().ok().filter(|e: &i32| e.unsigned_abs() <= 40)?;
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let (whole, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{whole}{frac}");
    let point = whole.len() as i32 + exp;
    let plain = if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}", "0".repeat(point as usize - digits.len()))
    } else {
        format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
    };
    Some(format!("{sign}{plain}"))
}

/// Which limit a reservation broke, with its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    MaxCost(Usd),
    MaxTotalTokens(u64),
}

impl Limit {
    /// The field of the definition's `budget` that set it.
    pub fn name(self) -> &'static str {
        match self {
            Limit::MaxCost(_) => "max_cost_usd",
            Limit::MaxTotalTokens(_) => "max_total_tokens",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::MaxCost(max) => write!(f, "max_cost_usd ${max}"),
            Limit::MaxTotalTokens(max) => write!(f, "max_total_tokens {max}"),
        }
    }
}

/// A call refused before it was made: its worst case does not fit the run's budget.
/// Terminal: a retry would reserve at least as much against at least as much spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the model call could need up to {attempted}, which does not fit the run's budget ({limit}): {spent} already spent and {reserved_by_others} reserved by calls in flight"
)]
pub struct BudgetExceeded {
    pub limit: Limit,
    pub spent: Amount,
    pub reserved_by_others: Amount,
    pub attempted: Amount,
}

/// Budget held for one call in flight; give it back with [`Ledger::settle`] or
/// [`Ledger::release`]. Not `Clone`, so it is returned once. One that is dropped instead
/// stays reserved, which only makes the ledger stricter.
#[must_use = "a reservation holds budget until it is settled or released"]
#[derive(Debug, PartialEq, Eq)]
pub struct Reservation {
    amount: Amount,
}

impl Reservation {
    pub fn amount(&self) -> Amount {
        self.amount
    }
}

/// One run's spending: what its model calls were charged, and what calls in flight hold.
/// The engine keeps it behind a lock shared by the run's steps, so reservations by
/// concurrent steps and map items are admitted one at a time against the same sums.
#[derive(Debug, Clone)]
pub struct Ledger {
    limits: BudgetLimits,
    /// Charged usage, which is the run's totals (latency aside: the ledger carries the
    /// value it started with and never changes it).
    spent: Totals,
    reserved: Amount,
    open: usize,
}

impl Ledger {
    /// A ledger for a run that has already spent `spent` (zero for a new run; the sum of
    /// its checkpoints for a resumed one).
    pub fn new(limits: BudgetLimits, spent: Totals) -> Self {
        Self { limits, spent, reserved: Amount::ZERO, open: 0 }
    }

    /// Holds `want` for one call if it fits beside what is spent and reserved.
    pub fn reserve(&mut self, want: Amount) -> Result<Reservation, BudgetExceeded> {
        let spent = self.spent_amount();
        if let Some(limit) = self.limits.exceeded_by(spent, self.reserved, want) {
            return Err(BudgetExceeded { limit, spent, reserved_by_others: self.reserved, attempted: want });
        }
        self.reserved = self.reserved.saturating_add(want);
        self.open += 1;
        Ok(Reservation { amount: want })
    }

    /// Charges a finished call's reported usage and frees its reservation, in one step so
    /// no concurrent reservation sees the money neither spent nor held.
    pub fn settle(&mut self, reservation: Reservation, usage: &Usage, cost: Usd) {
        self.spent.add_call(usage, cost);
        self.release(reservation);
    }

    /// Holds `amount` again without checking it against the limits: a batch job's
    /// reservation, admitted when the job was submitted, in the invocation that reads the
    /// job's answers (see the engine's `batch`).
    pub fn hold_again(&mut self, amount: Amount) -> Reservation {
        self.reserved = self.reserved.saturating_add(amount);
        self.open += 1;
        Reservation { amount }
    }

    /// [`Ledger::settle`] for a batch job: `calls` records charged `usage` and `cost` in all.
    pub fn settle_calls(&mut self, reservation: Reservation, usage: &Usage, cost: Usd, calls: u64) {
        self.spent.add_usage(usage, cost);
        self.spent.model_calls += calls;
        self.release(reservation);
    }

    /// Frees a reservation whose call was not made, or failed without reporting usage.
    pub fn release(&mut self, reservation: Reservation) {
        self.reserved = self.reserved.saturating_sub(reservation.amount);
        self.open = self.open.saturating_sub(1);
    }

    pub fn limits(&self) -> BudgetLimits {
        self.limits
    }

    /// Everything charged so far: the run's totals.
    pub fn spent(&self) -> &Totals {
        &self.spent
    }

    /// Charged, plus the worst case of calls lost to dead runners: a budget holds across
    /// crashes only if those count.
    pub fn spent_amount(&self) -> Amount {
        let lost = self.spent.lost;
        Amount { tokens: self.spent.total_tokens().saturating_add(lost.tokens), cost: self.spent.cost.saturating_add(lost.cost) }
    }

    /// Held by calls in flight.
    pub fn reserved(&self) -> Amount {
        self.reserved
    }

    /// How many reservations are held.
    pub fn open_reservations(&self) -> usize {
        self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::ModelRegistry;
    use serde_json::json;

    fn budget(cost: Option<Value>, tokens: Option<Value>) -> Budget {
        Budget { max_cost_usd: cost, max_total_tokens: tokens, on_exceeded: None }
    }

    fn limits(cost: Option<Value>, tokens: Option<Value>) -> Result<BudgetLimits, Vec<BudgetProblem>> {
        BudgetLimits::from_def(Some(&budget(cost, tokens)))
    }

    fn usage(input_tokens: u64, output_tokens: u64) -> Usage {
        Usage { input_tokens, output_tokens, ..Usage::default() }
    }

    fn amount(tokens: u64, pico: u64) -> Amount {
        Amount { tokens, cost: Usd::from_pico(pico) }
    }

    #[test]
    fn dollar_limits_parse_exactly_from_strings_and_numbers() {
        let cost = |v: Value| limits(Some(v), None).unwrap().max_cost.unwrap().pico();
        assert_eq!(cost(json!("0.02")), 20_000_000_000);
        assert_eq!(cost(json!(0.02)), 20_000_000_000, "0.02 is not exact in binary; the shortest decimal is");
        assert_eq!(cost(json!(0.1)), 100_000_000_000);
        assert_eq!(cost(json!(1e-5)), 10_000_000);
        assert_eq!(cost(json!(1.5e-7)), 150_000);
        assert_eq!(cost(json!(3)), 3_000_000_000_000);
        assert_eq!(cost(json!(2.5e3)), 2_500_000_000_000_000);
        assert_eq!(cost(json!("0.000000000001")), 1);
        assert_eq!(cost(json!(" 5 ")), 5_000_000_000_000);
        assert_eq!(cost(json!(0)), 0, "zero is a limit: nothing may be spent");
    }

    #[test]
    fn bad_limits_are_reported_by_field() {
        for bad in [
            json!("-1"),
            json!(-0.5),
            json!(-3),
            json!("abc"),
            json!(true),
            json!({}),
            json!([1]),
            json!("1e-3"),
            json!("0.0000000000001"),
            json!(1e-13),
        ] {
            let problems = limits(Some(bad.clone()), Some(json!(100))).unwrap_err();
            assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
            assert_eq!(problems[0].field, "budget.max_cost_usd", "{bad}");
        }
        for bad in [json!(-5), json!(1.5), json!("100"), json!(false)] {
            let problems = limits(Some(json!("1")), Some(bad.clone())).unwrap_err();
            assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
            assert_eq!(problems[0].field, "budget.max_total_tokens", "{bad}");
        }
        let both = limits(Some(json!("x")), Some(json!(-1))).unwrap_err();
        assert_eq!(both.iter().map(|p| p.field).collect::<Vec<_>>(), ["budget.max_cost_usd", "budget.max_total_tokens"]);
        assert!(both[0].message.contains("\"x\""), "{}", both[0].message);
    }

    #[test]
    fn absent_and_null_limits_are_no_limit() {
        assert!(BudgetLimits::from_def(None).unwrap().is_unlimited());
        assert!(limits(None, None).unwrap().is_unlimited());
        assert!(limits(Some(Value::Null), Some(Value::Null)).unwrap().is_unlimited());
        assert_eq!(limits(None, Some(json!(40_000))).unwrap(), BudgetLimits { max_cost: None, max_total_tokens: Some(40_000) });
    }

    #[test]
    fn the_estimate_is_bytes_plus_the_template_allowance() {
        assert_eq!(estimate_input_tokens(None, ""), TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE);
        assert_eq!(estimate_input_tokens(None, "abc"), 3 + TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE);
        assert_eq!(estimate_input_tokens(Some("be brief"), "abc"), 8 + 3 + TOKENS_PER_REQUEST + 2 * TOKENS_PER_MESSAGE);
        // Bytes, not characters: "é" is two bytes, "語" three, "🦀" four.
        assert_eq!(estimate_input_tokens(None, "é語🦀"), 9 + TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE);
    }

    #[test]
    fn the_estimate_is_never_below_the_byte_count_of_any_text() {
        // Each byte can be at most one token of a byte-level BPE; with the template
        // allowance on top, the estimate always clears the text alone.
        for text in ["", "x", &"word ".repeat(1000), &"\u{10FFFF}".repeat(50), "\0\n\t"] {
            assert!(estimate_input_tokens(None, text) > text.len() as u64);
            assert!(estimate_input_tokens(Some(text), text) > 2 * text.len() as u64);
        }
    }

    #[test]
    fn the_worst_case_prices_the_estimate_as_input_and_max_tokens_as_output() {
        let registry = ModelRegistry::builtin();
        // Nova Micro: $0.000035 and $0.00014 per 1K = 35,000 and 140,000 pico-dollars a token.
        let micro = registry.get("amazon.nova-micro-v1:0").unwrap();
        assert_eq!(worst_case(&micro, 97, 100), amount(197, 97 * 35_000 + 100 * 140_000));
        // A geographic profile of Sonnet 4.5 costs 10% more, and the reservation follows.
        let sonnet = "anthropic.claude-sonnet-4-5-20250929-v1:0";
        let global = worst_case(&registry.get(&format!("global.{sonnet}")).unwrap(), 1000, 1000);
        let us = worst_case(&registry.get(&format!("us.{sonnet}")).unwrap(), 1000, 1000);
        assert_eq!(global.cost.to_string(), "0.018");
        assert_eq!(us.cost.to_string(), "0.0198");
        let mut priceless = micro.clone().into_owned();
        priceless.input = Usd::from_pico(u64::MAX);
        assert_eq!(worst_case(&priceless, 2, 1).cost, Usd::from_pico(u64::MAX), "saturates, never wraps");
    }

    #[test]
    fn input_beyond_the_context_window_is_reserved_as_the_window_because_bedrock_rejects_more() {
        let registry = ModelRegistry::builtin();
        let micro = registry.get("amazon.nova-micro-v1:0").unwrap();
        assert_eq!(micro.context_window, 128_000);
        let window = worst_case(&micro, 128_000, 10);
        assert_eq!(worst_case(&micro, 128_001, 10), window);
        assert_eq!(worst_case(&micro, u64::MAX, 10), amount(128_010, 128_000 * 35_000 + 10 * 140_000));
        assert!(worst_case(&micro, 127_999, 10).cost < window.cost);
    }

    #[test]
    fn a_reservation_that_does_not_fit_is_refused_with_what_was_spent_and_held() {
        let limits = BudgetLimits { max_cost: Some(Usd::from_pico(1_000)), max_total_tokens: None };
        let mut ledger = Ledger::new(limits, Totals { cost: Usd::from_pico(300), input_tokens: 7, ..Totals::default() });
        let first = ledger.reserve(amount(10, 400)).unwrap();
        assert_eq!(ledger.reserved(), amount(10, 400));
        let refused = ledger.reserve(amount(10, 301)).unwrap_err();
        assert_eq!(
            refused,
            BudgetExceeded {
                limit: Limit::MaxCost(Usd::from_pico(1_000)),
                spent: amount(7, 300),
                reserved_by_others: amount(10, 400),
                attempted: amount(10, 301)
            }
        );
        // Exactly at the limit fits.
        let second = ledger.reserve(amount(10, 300)).unwrap();
        assert_eq!(ledger.open_reservations(), 2);
        ledger.release(first);
        ledger.release(second);
        assert_eq!((ledger.reserved(), ledger.open_reservations()), (Amount::ZERO, 0));
    }

    #[test]
    fn settling_charges_the_reported_usage_and_frees_the_rest() {
        let limits = BudgetLimits { max_cost: None, max_total_tokens: Some(1_000) };
        let mut ledger = Ledger::new(limits, Totals::default());
        let held = ledger.reserve(amount(600, 0)).unwrap();
        assert!(ledger.reserve(amount(401, 0)).is_err());
        ledger.settle(held, &usage(100, 50), Usd::from_pico(9));
        assert_eq!(ledger.spent_amount(), amount(150, 9));
        assert_eq!(ledger.spent().model_calls, 1);
        assert_eq!(ledger.reserved(), Amount::ZERO);
        let refused = ledger.reserve(amount(851, 0)).unwrap_err();
        assert_eq!(refused.limit, Limit::MaxTotalTokens(1_000));
        assert!(ledger.reserve(amount(850, 0)).is_ok(), "150 spent + 850 is exactly the limit");
    }

    #[test]
    fn money_is_checked_before_tokens_and_overflow_is_refused() {
        let limits = BudgetLimits { max_cost: Some(Usd::from_pico(10)), max_total_tokens: Some(10) };
        let mut ledger = Ledger::new(limits, Totals::default());
        assert_eq!(ledger.reserve(amount(11, 11)).unwrap_err().limit, Limit::MaxCost(Usd::from_pico(10)));
        assert_eq!(ledger.reserve(amount(11, 10)).unwrap_err().limit, Limit::MaxTotalTokens(10));
        let limits = BudgetLimits { max_cost: Some(Usd::from_pico(u64::MAX)), max_total_tokens: None };
        let mut ledger = Ledger::new(limits, Totals { cost: Usd::from_pico(2), ..Totals::default() });
        assert!(ledger.reserve(amount(0, u64::MAX - 1)).is_err(), "2 + (2^64 - 2) overflows: refused, not wrapped");
    }

    #[test]
    fn without_limits_everything_fits_and_is_still_counted() {
        let mut ledger = Ledger::new(BudgetLimits::UNLIMITED, Totals::default());
        let a = ledger.reserve(amount(u64::MAX, u64::MAX)).unwrap();
        let b = ledger.reserve(amount(5, 5)).unwrap();
        ledger.settle(a, &usage(3, 4), Usd::from_pico(70));
        ledger.release(b);
        assert_eq!(ledger.spent_amount(), amount(7, 70));
        assert_eq!(ledger.reserved(), Amount::ZERO);
    }

    #[test]
    fn a_refusal_names_the_limit_and_the_exact_amounts() {
        let refused = BudgetExceeded {
            limit: Limit::MaxCost(Usd::from_pico(25_000_000)),
            spent: amount(150, 15_750_000),
            reserved_by_others: Amount::ZERO,
            attempted: amount(197, 17_395_000),
        };
        let message = refused.to_string();
        for part in ["$0.000017395", "max_cost_usd $0.000025", "$0.00001575 / 150 tokens already spent"] {
            assert!(message.contains(part), "{message}");
        }
    }
}
