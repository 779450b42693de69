//! Per-owner daily spend caps: a limit on what all of one user's runs may be charged in a
//! UTC day, checked the way a run's budget is (see [`crate::budget`]).
//!
//! Before every model call the engine reserves the call's worst-case cost against the
//! caller's counter for the day, which every runner shares through the [`DailySpend`]
//! port: the counter holds `committed` = charged + held by calls in flight, and a
//! reservation is admitted only if `committed + worst ≤ cap`, in one conditional write. If
//! it does not fit, the call is never made and the step fails `BUDGET_EXCEEDED`, naming the
//! cap. After the call the reservation is replaced by the reported cost (a call that failed
//! without usage is replaced by zero). So an owner's charged spend for a day never exceeds
//! the cap, across any number of concurrent runs and runners — under the same bounds on
//! input and output the run budget rests on.
//!
//! Each reservation is a durable, named record, a [`DayHold`], written in the same atomic
//! write as the counter, and settling deletes it in the same atomic write that moves the
//! counter. So a hold is settled at most once, whoever settles it. A runner that crashes
//! between reserving and settling leaves its hold until the run is taken over or ended
//! (when its lease expires): the runner (or dead-letter consumer) that takes the run then
//! lists the run's holds and settles each by the run's checkpoints. A call the checkpoint
//! shows in flight may have been made and billed: it stays counted at its worst case, as
//! [`Settlement::Lost`]. A call the checkpoint does not show was never made: its hold is
//! released. A dead runner that wakes up and settles late finds its hold gone and changes
//! nothing. Either way the cap errs towards refusing, never towards overspending.
//!
//! The day is the UTC day the reservation is made; its settlement goes to the same day.

use crate::budget::Amount;
use crate::ids::{RunId, StepId};
use crate::money::Usd;
use chrono::NaiveDate;
use serde_json::Value;
use std::collections::BTreeMap;

/// The caps a deployment sets: one for every owner, and overrides for some.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DailyCaps {
    default: Option<Usd>,
    owners: BTreeMap<String, Usd>,
}

impl DailyCaps {
    /// No cap for anyone.
    pub const NONE: DailyCaps = DailyCaps { default: None, owners: BTreeMap::new() };

    /// `default`: a decimal dollar amount (`"5"`, `"0.25"`) for every owner; `overrides`: a
    /// JSON object from user id to such an amount. Either may be absent or blank.
    pub fn parse(default: Option<&str>, overrides: Option<&str>) -> Result<Self, String> {
        let default = match default.map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(raw) => Some(Usd::parse_decimal(raw).map_err(|e| format!("{raw:?}: {e}"))?),
        };
        let mut owners = BTreeMap::new();
        if let Some(raw) = overrides.map(str::trim).filter(|s| !s.is_empty()) {
            let map: BTreeMap<String, Value> = serde_json::from_str(raw).map_err(|e| format!("must be a JSON object of user id to dollars: {e}"))?;
            for (owner, value) in map {
                let Value::String(amount) = &value else { return Err(format!("{owner}: must be a decimal string such as \"5.00\", not {value}")) };
                let cap = Usd::parse_decimal(amount).map_err(|e| format!("{owner}: {amount:?}: {e}"))?;
                owners.insert(owner, cap);
            }
        }
        Ok(Self { default, owners })
    }

    /// The cap for `owner`, if any.
    pub fn cap_for(&self, owner: &str) -> Option<Usd> {
        self.owners.get(owner).copied().or(self.default)
    }

    pub fn is_none(&self) -> bool {
        self.default.is_none() && self.owners.is_empty()
    }
}

/// One owner's counter for one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DaySpend {
    /// What the day's calls were charged.
    pub charged: Usd,
    /// Charged, plus what calls in flight hold, plus what lost calls count.
    pub committed: Usd,
    /// Calls whose runner died while they may have been in flight, at their worst case:
    /// what they were billed is unknown, so they stay counted (see [`Settlement::Lost`]).
    pub lost: Usd,
}

impl DaySpend {
    /// What calls in flight hold now.
    pub fn held(&self) -> Usd {
        Usd::from_pico(self.committed.pico().saturating_sub(self.charged.pico()).saturating_sub(self.lost.pico()))
    }
}

/// One model call's hold on its owner's day: what a reservation records, and what settles
/// it. `(run, step, item, attempt, holder)` names the call: `attempt` restarts at 1 in each
/// runner that takes a step on, and `holder` (the lease holder) tells those runners apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayHold {
    pub run: RunId,
    pub step: StepId,
    /// The map item the call is for, if any.
    pub item: Option<usize>,
    pub attempt: u32,
    pub holder: String,
    pub owner: String,
    pub day: NaiveDate,
    /// The call's worst-case cost, held until it is settled.
    pub amount: Usd,
}

/// What replaces a hold when it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The call returned and was charged this (zero for one that failed without usage, or
    /// that was never made).
    Charged(Usd),
    /// The call may have been made, but its runner died before it returned: it stays
    /// counted at its worst case, moved from held to lost (committed is unchanged).
    Lost,
}

impl Settlement {
    /// For logs.
    pub fn name(&self) -> &'static str {
        match self {
            Settlement::Charged(c) if *c == Usd::ZERO => "released",
            Settlement::Charged(_) => "charged",
            Settlement::Lost => "lost",
        }
    }
}

/// A call refused because it does not fit its owner's daily cap. Terminal for the step:
/// the counter only falls when calls in flight settle, and a run must not wait on others.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the model call could need up to ${attempted}, which does not fit {owner}'s daily spend cap (${cap} for {day} UTC): ${committed} already charged or held today",
    attempted = attempted.cost
)]
pub struct DailyCapExceeded {
    pub owner: String,
    pub day: NaiveDate,
    pub cap: Usd,
    pub committed: Usd,
    pub attempted: Amount,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_parse_exactly_with_overrides_taking_precedence() {
        let caps = DailyCaps::parse(Some(" 5 "), Some(r#"{"alice": "0.25", "bob": "100"}"#)).unwrap();
        assert_eq!(caps.cap_for("alice"), Some(Usd::parse_decimal("0.25").unwrap()));
        assert_eq!(caps.cap_for("bob"), Some(Usd::parse_decimal("100").unwrap()));
        assert_eq!(caps.cap_for("carol"), Some(Usd::parse_decimal("5").unwrap()));
        let only = DailyCaps::parse(None, Some(r#"{"alice": "1"}"#)).unwrap();
        assert_eq!((only.cap_for("alice").is_some(), only.cap_for("bob")), (true, None));
        assert!(DailyCaps::parse(Some(""), Some("  ")).unwrap().is_none());
    }

    #[test]
    fn a_malformed_cap_is_named() {
        for (default, overrides, needle) in [
            (Some("five"), None, "\"five\""),
            (Some("-1"), None, "\"-1\""),
            (None, Some("[1]"), "JSON object"),
            (None, Some(r#"{"alice": 5}"#), "alice: must be a decimal string"),
            (None, Some(r#"{"bob": "x"}"#), "bob: \"x\""),
        ] {
            let err = DailyCaps::parse(default, overrides).unwrap_err();
            assert!(err.contains(needle), "{err} should name {needle}");
        }
    }

    #[test]
    fn a_refusal_names_the_owner_the_day_and_the_numbers() {
        let refusal = DailyCapExceeded {
            owner: "alice".into(),
            day: NaiveDate::from_ymd_opt(2026, 11, 23).unwrap(),
            cap: Usd::parse_decimal("0.01").unwrap(),
            committed: Usd::parse_decimal("0.009").unwrap(),
            attempted: Amount { tokens: 100, cost: Usd::parse_decimal("0.002").unwrap() },
        };
        let message = refusal.to_string();
        assert!(
            message.contains("$0.002") && message.contains("alice's daily spend cap ($0.01 for 2026-11-23 UTC)") && message.contains("$0.009"),
            "{message}"
        );
    }
}
