//! The one way money goes on the wire: an exact decimal string and the integer it is.
//!
//! `{NAME}_usd: "0.000125"` for people and JSON parsers that read numbers as floats, and
//! `{NAME}_pico_usd: 125000000` for programs that add amounts up. Never a float. Each
//! field's `NAME` is a type ([`Name`]), so a shape and its published schema cannot
//! disagree about a key.

use crate::money::Usd;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::ser::{Serialize, SerializeMap, Serializer};
use std::borrow::Cow;
use std::marker::PhantomData;

/// The stem of a money pair's two keys.
pub trait Name {
    const NAME: &'static str;
}

/// An amount as the pair `{NAME}_usd` / `{NAME}_pico_usd`; embed it with
/// `#[serde(flatten)]`.
pub struct Money<N: Name> {
    amount: Usd,
    name: PhantomData<N>,
}

impl<N: Name> Money<N> {
    pub fn new(amount: Usd) -> Self {
        Self { amount, name: PhantomData }
    }
}

impl<N: Name> Clone for Money<N> {
    fn clone(&self) -> Self {
        Self::new(self.amount)
    }
}

impl<N: Name> From<Usd> for Money<N> {
    fn from(amount: Usd) -> Self {
        Self::new(amount)
    }
}

impl<N: Name> std::fmt::Debug for Money<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}_usd={}", N::NAME, self.amount)
    }
}

impl<N: Name> Serialize for Money<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry(&format!("{}_usd", N::NAME), &self.amount.to_string())?;
        map.serialize_entry(&format!("{}_pico_usd", N::NAME), &self.amount.pico())?;
        map.end()
    }
}

impl<N: Name> JsonSchema for Money<N> {
    fn schema_name() -> Cow<'static, str> {
        format!("Money_{}", N::NAME).into()
    }

    fn inline_schema() -> bool {
        // Flattened into its parent: its two properties become the parent's.
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let usd = format!("{}_usd", N::NAME);
        let pico = format!("{}_pico_usd", N::NAME);
        let mut properties = serde_json::Map::new();
        properties.insert(
            usd.clone(),
            serde_json::json!({ "type": "string", "pattern": "^[0-9]+(\\.[0-9]{1,12})?$", "description": "US dollars, exact decimal" }),
        );
        properties.insert(
            pico.clone(),
            serde_json::json!({ "type": "integer", "minimum": 0, "description": "the same amount in pico-dollars (10^-12 USD)" }),
        );
        json_schema!({ "type": "object", "properties": properties, "required": [usd, pico] })
    }
}

macro_rules! names {
    ($($(#[$doc:meta])* $ty:ident = $name:literal;)*) => {
        $( $(#[$doc])* pub struct $ty; impl Name for $ty { const NAME: &'static str = $name; } )*
    };
}

names! {
    /// `cost_usd` / `cost_pico_usd`: what something cost.
    Cost = "cost";
    /// `total_cost_usd`: a sum over runs.
    TotalCost = "total_cost";
    /// `avg_cost_usd`: a sum over runs divided by their number, rounded down.
    AvgCost = "avg_cost";
    /// `max_cost_usd`: a run budget's money limit.
    MaxCost = "max_cost";
    /// `owner_daily_cost_usd`: a caller's daily cap.
    OwnerDailyCost = "owner_daily_cost";
    /// `committed_today_usd`: what a caller has charged and holds today.
    CommittedToday = "committed_today";
    /// `cap_usd`: a caller's daily cap, in their own spend report.
    Cap = "cap";
    /// `charged_usd`: what a caller's calls were charged today.
    Charged = "charged";
    /// `held_usd`: what a caller's calls in flight hold today.
    Held = "held";
    /// `lost_usd`: what calls of a caller's dead runners count today, at their worst case.
    Lost = "lost";
    /// `remaining_usd`: what is left of a caller's cap today.
    Remaining = "remaining";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use serde_json::json;

    #[derive(Serialize)]
    struct Shape {
        tokens: u64,
        #[serde(flatten)]
        cost: Money<Cost>,
    }

    #[test]
    fn money_is_an_exact_string_and_an_integer_under_its_name() {
        let shape = Shape { tokens: 3, cost: Usd::from_pico(125_000_000).into() };
        assert_eq!(serde_json::to_value(&shape).unwrap(), json!({ "tokens": 3, "cost_usd": "0.000125", "cost_pico_usd": 125_000_000u64 }));
        let max: Money<MaxCost> = Usd::from_pico(u64::MAX).into();
        assert_eq!(
            serde_json::to_value(&max).unwrap(),
            json!({ "max_cost_usd": Usd::from_pico(u64::MAX).to_string(), "max_cost_pico_usd": u64::MAX })
        );
    }
}
