//! How a run survives what Lambda does to its runner: the timings that bound recovery.
//!
//! A runner holds its run under a short lease that it renews while it works (every
//! [`Durability::heartbeat`]); every write is fenced by the lease holder. A runner that
//! dies stops renewing, and its lease expires at most [`Durability::lease`] later. A run
//! whose lease expired, or that is still queued [`Durability::queued_grace`] after it was
//! stored, is *due*: the sweeper (every minute in AWS) hands it to a runner again, which
//! takes it over and resumes from checkpoints. So a crashed run is resumed within
//! `lease + sweep interval` (plus a cold start), and a run whose dispatch was lost within
//! `queued_grace + sweep interval`.
//!
//! A run that keeps killing its runner (a crash at the same instruction) is taken over at
//! most [`Durability::max_takeovers`] times; the next delivery ends it `RUN_FAILED` with
//! `RUNNER_LOST` and the takeover history.

use crate::config::{ConfigError, Source};
use crate::ids::RunId;
use chrono::{DateTime, Utc};
use std::time::Duration;

/// Where lease times come from: the system clock in functions; tests drive a paused one
/// ([`crate::memory::PausedClock`]). Leases are compared across processes, so they are
/// wall-clock times.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    /// How long a lease lasts without renewal.
    pub lease: Duration,
    /// How often a working runner renews its lease: a third of it, so two renewals can
    /// fail (a throttled write, a slow one) before the lease lapses.
    pub heartbeat: Duration,
    /// How long a stored run may stay queued before the sweeper dispatches it (the API
    /// dispatches at once; this only catches a dispatch that was lost).
    pub queued_grace: Duration,
    /// Takeovers a run may have; the next one fails it with `RUNNER_LOST`.
    pub max_takeovers: u32,
}

impl Default for Durability {
    fn default() -> Self {
        Self::with_lease(Duration::from_secs(30))
    }
}

impl Durability {
    /// The defaults with another lease length (tests and the local stack shorten it).
    pub fn with_lease(lease: Duration) -> Self {
        Self { lease, heartbeat: lease / 3, queued_grace: Duration::from_secs(60), max_takeovers: 3 }
    }

    /// `CHAINRUN_LEASE_SECS` (30), `CHAINRUN_QUEUED_GRACE_SECS` (60), `CHAINRUN_MAX_TAKEOVERS` (3).
    pub fn from_source(env: &impl Source) -> Result<Self, ConfigError> {
        let lease = env.parsed("CHAINRUN_LEASE_SECS", 30u64)?;
        if lease < 3 {
            return Err(ConfigError::Invalid { name: "CHAINRUN_LEASE_SECS", reason: format!("{lease} is too short: at least 3 seconds") });
        }
        Ok(Self {
            queued_grace: Duration::from_secs(env.parsed("CHAINRUN_QUEUED_GRACE_SECS", 60u64)?),
            max_takeovers: env.parsed("CHAINRUN_MAX_TAKEOVERS", 3u32)?,
            ..Self::with_lease(Duration::from_secs(lease))
        })
    }
}

/// Due runs are indexed under this many partition keys (`SWEEP#0`…), so the index has no
/// single hot key; the sweeper reads them all.
pub const SWEEP_SHARDS: u32 = 4;

/// The index partition a run's sweep entry lives in.
pub fn sweep_shard(run: &RunId) -> String {
    // The id's last character is random (ULID), so runs spread evenly.
    let last = run.as_str().bytes().last().unwrap_or(0);
    format!("SWEEP#{}", u32::from(last) % SWEEP_SHARDS)
}

/// Every shard key, for the sweeper.
pub fn sweep_shards() -> impl Iterator<Item = String> {
    (0..SWEEP_SHARDS).map(|i| format!("SWEEP#{i}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env<const N: usize>(vars: [(&str, &str); N]) -> HashMap<String, String> {
        vars.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    #[test]
    fn a_lease_is_renewed_three_times_per_length() {
        let d = Durability::from_source(&env([("CHAINRUN_LEASE_SECS", "12"), ("CHAINRUN_MAX_TAKEOVERS", "1")])).unwrap();
        assert_eq!((d.lease, d.heartbeat, d.max_takeovers), (Duration::from_secs(12), Duration::from_secs(4), 1));
        assert_eq!(Durability::from_source(&env([])).unwrap(), Durability::default());
    }

    #[test]
    fn a_lease_too_short_to_renew_is_refused_by_name() {
        let err = Durability::from_source(&env([("CHAINRUN_LEASE_SECS", "1")])).unwrap_err();
        assert!(err.to_string().contains("CHAINRUN_LEASE_SECS"), "{err}");
    }

    #[test]
    fn runs_spread_over_every_shard() {
        let shards: std::collections::BTreeSet<String> = (0..200).map(|_| sweep_shard(&RunId::new())).collect();
        assert_eq!(shards, sweep_shards().collect());
    }
}
