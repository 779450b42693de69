//! Money as an integer count of pico-dollars (10⁻¹² USD).
//!
//! Why not micro-dollars: Bedrock publishes prices per 1K tokens with up to eight
//! decimals (Nova Micro's cache read is $0.00000875 / 1K, i.e. $8.75 × 10⁻⁹ per token).
//! A micro-dollar unit would have to round every call, and per-call rounding errors
//! accumulate across runs and rollups. In pico-dollars every published per-token price
//! is an integer, so a call's cost is `tokens × price` exactly and sums are exact. A u64
//! holds $18 million, far beyond any run, workflow or daily rollup.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Usd(u64);

const PICOS_PER_DOLLAR: u64 = 1_000_000_000_000;

impl Usd {
    pub const ZERO: Usd = Usd(0);

    pub const fn from_pico(pico: u64) -> Self {
        Self(pico)
    }

    pub const fn pico(self) -> u64 {
        self.0
    }

    pub fn checked_add(self, other: Usd) -> Option<Usd> {
        self.0.checked_add(other.0).map(Usd)
    }

    /// Saturating, for totals shown to people: an overflow at $18M is not a real case,
    /// and a total must never wrap around to a small number.
    pub fn saturating_add(self, other: Usd) -> Usd {
        Usd(self.0.saturating_add(other.0))
    }

    /// What is left of `self` after `other`, never below zero.
    pub fn saturating_sub(self, other: Usd) -> Usd {
        Usd(self.0.saturating_sub(other.0))
    }

    pub fn checked_mul(self, n: u64) -> Option<Usd> {
        self.0.checked_mul(n).map(Usd)
    }

    /// Parses a non-negative decimal dollar amount such as `"0.00000875"` exactly.
    /// `scale` multiplies the value first (prices per 1K tokens → per token uses 10⁻³).
    pub fn parse_decimal(raw: &str) -> Result<Usd, MoneyError> {
        let bad = || MoneyError::Invalid(raw.chars().take(40).collect());
        let s = raw.trim();
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        if !whole.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        let frac_trimmed = frac.trim_end_matches('0');
        if frac_trimmed.len() > 12 {
            return Err(MoneyError::TooPrecise(raw.to_owned()));
        }
        let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
        let mut frac_pico: u64 = 0;
        for (i, d) in frac_trimmed.bytes().enumerate() {
            frac_pico += u64::from(d - b'0') * 10u64.pow(11 - i as u32);
        }
        whole.checked_mul(PICOS_PER_DOLLAR).and_then(|w| w.checked_add(frac_pico)).map(Usd).ok_or(MoneyError::Overflow)
    }
}

impl fmt::Display for Usd {
    /// Exact decimal dollars with trailing zeros trimmed: `0.0000091`, `12`, `0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / PICOS_PER_DOLLAR;
        let frac = self.0 % PICOS_PER_DOLLAR;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:012}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("{0:?} is not a non-negative decimal dollar amount")]
    Invalid(String),
    #[error("{0:?} has more than 12 decimal places")]
    TooPrecise(String),
    #[error("amount too large")]
    Overflow,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_published_prices_exactly() {
        assert_eq!(Usd::parse_decimal("0.00000875").unwrap().pico(), 8_750_000);
        assert_eq!(Usd::parse_decimal("0.000035").unwrap().pico(), 35_000_000);
        assert_eq!(Usd::parse_decimal("3").unwrap().pico(), 3 * PICOS_PER_DOLLAR);
        assert_eq!(Usd::parse_decimal(".5").unwrap().pico(), PICOS_PER_DOLLAR / 2);
    }

    #[test]
    fn rejects_what_is_not_a_price() {
        for bad in ["", ".", "-1", "1e-3", "0.1.2", "abc", "0.0000000000001"] {
            assert!(Usd::parse_decimal(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn displays_exact_decimals() {
        assert_eq!(Usd::from_pico(9_100_000).to_string(), "0.0000091");
        assert_eq!(Usd::from_pico(0).to_string(), "0");
        assert_eq!(Usd::from_pico(2 * PICOS_PER_DOLLAR + 1).to_string(), "2.000000000001");
        for s in ["0.00000875", "1.25", "0.000000000001"] {
            assert_eq!(Usd::parse_decimal(s).unwrap().to_string(), s);
        }
    }
}
