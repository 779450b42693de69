//! A run's calls checked against its caller's daily spend cap (see [`crate::spend`]).
//!
//! Each call holds its worst-case cost on the caller's counter for the UTC day before it
//! is made, and the hold is replaced by what it was charged after.

use crate::budget;
use crate::money::Usd;
use crate::ports::{DailySpend, StoreError};
use crate::spend::DailyCapExceeded;
use chrono::{NaiveDate, Utc};
use std::sync::Arc;
use tracing::warn;

/// One owner's daily spend cap, as a run checks its calls against it.
pub struct OwnerCap {
    pub spend: Arc<dyn DailySpend>,
    pub owner: String,
    pub cap: Usd,
}

/// A call's hold on its owner's day, until settled.
pub struct DayReservation {
    day: NaiveDate,
    amount: Usd,
}

impl OwnerCap {
    /// Holds the call's worst-case cost on today's counter if it fits under the cap.
    pub async fn reserve(&self, attempted: budget::Amount) -> Result<Result<DayReservation, DailyCapExceeded>, StoreError> {
        let day = Utc::now().date_naive();
        Ok(match self.spend.reserve(&self.owner, day, attempted.cost, self.cap).await? {
            Ok(()) => Ok(DayReservation { day, amount: attempted.cost }),
            Err(counter) => Err(DailyCapExceeded { owner: self.owner.clone(), day, cap: self.cap, committed: counter.committed, attempted }),
        })
    }

    /// Replaces the hold by what the call was charged.
    pub async fn settle(&self, reservation: DayReservation, charged: Usd) {
        if let Err(e) = self.spend.settle(&self.owner, reservation.day, reservation.amount, charged).await {
            // The hold stays on the counter until the day ends: the cap errs towards refusing.
            warn!(error = %e, owner = %self.owner, "could not settle a daily spend reservation");
        }
    }
}
