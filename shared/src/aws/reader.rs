//! Reading a DynamoDB item's attributes by hand, naming the table and the item when one is
//! missing or malformed, so a corrupt item is a clear `StoreError::Corrupt`, never a panic
//! or a default. The adapters whose items are not serde shapes (stored workflows, saved
//! templates) read through it.

use super::dynamo::Item;
use super::dynamo_error::corrupt_item;
use crate::ports::StoreError;
use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};

pub(super) struct Reader<'a> {
    pub table: &'a str,
    pub item: &'a Item,
}

impl Reader<'_> {
    pub fn corrupt(&self, problem: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(corrupt_item(self.table, self.item, problem))
    }

    pub fn text(&self, name: &str) -> Result<&str, StoreError> {
        match self.item.get(name) {
            Some(AttributeValue::S(v)) => Ok(v),
            _ => Err(self.corrupt(format!("no {name}"))),
        }
    }

    /// A text attribute that may be absent.
    pub fn optional_text(&self, name: &str) -> Option<&str> {
        match self.item.get(name) {
            Some(AttributeValue::S(v)) => Some(v),
            _ => None,
        }
    }

    /// A version number.
    pub fn number(&self, name: &str) -> Result<u32, StoreError> {
        match self.item.get(name) {
            Some(AttributeValue::N(v)) => v.parse().map_err(|_| self.corrupt(format!("{name} {v:?} is not a version number"))),
            _ => Err(self.corrupt(format!("no {name}"))),
        }
    }

    pub fn time(&self, name: &str) -> Result<DateTime<Utc>, StoreError> {
        let raw = self.text(name)?;
        DateTime::parse_from_rfc3339(raw).map(|t| t.with_timezone(&Utc)).map_err(|e| self.corrupt(format!("{name} {raw:?} is not a time: {e}")))
    }

    pub fn parsed<T>(&self, name: &str, parse: impl Fn(&str) -> Result<T, crate::ids::InvalidId>) -> Result<T, StoreError> {
        parse(self.text(name)?).map_err(|e| self.corrupt(format!("{name}: {e}")))
    }

    /// A JSON document stored as a string (so every number round-trips exactly).
    pub fn json(&self, name: &str) -> Result<serde_json::Value, StoreError> {
        serde_json::from_str(self.text(name)?).map_err(|e| self.corrupt(format!("{name} is not JSON: {e}")))
    }
}
