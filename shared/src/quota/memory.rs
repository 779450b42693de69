//! The in-memory [`TenantQuota`], for hermetic tests. One lock serialises every call, so it
//! is exact: what the DynamoDB adapter promises with conditional writes, this keeps by
//! never letting two calls interleave. Re-exported as `crate::memory::MemoryQuota`.

use super::{Counter, Occupied, Slots};
use crate::ids::RunId;
use crate::ports::{StoreError, TenantQuota};
use async_trait::async_trait;
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

#[derive(Default)]
pub struct MemoryQuota {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    counters: HashMap<Counter, u64>,
    slots: HashMap<Slots, BTreeSet<RunId>>,
}

impl MemoryQuota {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every run holding a slot of `slots` (tests look).
    pub fn holders(&self, slots: &Slots) -> Vec<RunId> {
        self.state().slots.get(slots).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }
}

#[async_trait]
impl TenantQuota for MemoryQuota {
    async fn take(&self, counter: &Counter, amount: u64, limit: u64) -> Result<bool, StoreError> {
        let mut state = self.state();
        let used = state.counters.entry(counter.clone()).or_default();
        match used.checked_add(amount) {
            Some(next) if next <= limit => {
                *used = next;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn give_back(&self, counter: &Counter, amount: u64) -> Result<(), StoreError> {
        if let Some(used) = self.state().counters.get_mut(counter) {
            *used = used.saturating_sub(amount);
        }
        Ok(())
    }

    async fn used(&self, counter: &Counter) -> Result<u64, StoreError> {
        Ok(self.state().counters.get(counter).copied().unwrap_or(0))
    }

    async fn occupy(&self, slots: &Slots, run: &RunId, capacity: u64) -> Result<Occupied, StoreError> {
        let mut state = self.state();
        let set = state.slots.entry(slots.clone()).or_default();
        if set.contains(run) || (set.len() as u64) < capacity {
            set.insert(run.clone());
            Ok(Occupied::Admitted)
        } else {
            Ok(Occupied::Full(set.iter().cloned().collect()))
        }
    }

    async fn vacate(&self, slots: &Slots, run: &RunId) -> Result<bool, StoreError> {
        Ok(self.state().slots.get_mut(slots).is_some_and(|set| set.remove(run)))
    }
}
