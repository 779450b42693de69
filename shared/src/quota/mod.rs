//! Fair limits per tenant: the pure rules (windows, `Retry-After`, shards, the token
//! reservation's arithmetic). The counters live behind the [`crate::ports::TenantQuota`]
//! port; [`gate`] walks a counter's shards over it, and the API and the engine act on what
//! it answers.
//!
//! A **tenant** is whose limits a run counts against: its caller's own user, or the shared
//! `PUBLIC` tenant for anonymous callers ([`crate::ids::UserId::tenant`]). Per tenant:
//!
//! - **starts per minute**: a counter per fixed UTC minute, `ADD 1` if it stays within the
//!   limit. A start refused answers `429` with `Retry-After` = the seconds left in the
//!   minute. Fixed windows allow up to twice the limit across a window boundary (the end
//!   of one minute and the start of the next); that is the price of one write per start.
//! - **concurrent runs**: a set of the run ids that have started and not ended. `ADD` and
//!   `DELETE` of a set member are idempotent, so a retried start or a repeated end never
//!   counts twice. A run waiting for a person (review, input, pause, budget) holds its slot:
//!   it has not ended, and a resume must never be refused for a limit.
//! - **tokens per minute, per model**: before each model call the engine reserves the
//!   call's worst case (the prompt's estimate plus `max_tokens`, as the budget reserves it)
//!   in the tenant's counter for that model's current minute, admitted only if the minute's
//!   reservations stay within the allowance; after the call the unused part is given back
//!   to the same minute. Reservations only grow under the allowance and settlements only
//!   shrink them, so what is reserved in a minute never exceeds the allowance — and what a
//!   minute's calls use never exceeds what they reserved. A call that does not fit waits
//!   for the next minute instead of failing.
//!
//! **Shards.** DynamoDB serves about 1,000 writes per second per partition key. A user's
//! own counters see that user's requests only, and their limits bound them well below it.
//! The `PUBLIC` tenant's counters see every anonymous caller at once, refusals included (a
//! refused conditional write is still a write): its start counter and its slot set are
//! split into [`TenantLimits::public_shards`] keys, each holding a [`share`] of the limit,
//! the shares summing exactly to the limit, so the tenant as a whole never exceeds it. A
//! check tries at most [`TRIES`] shards (a random one for starts, the run id's hash for
//! slots, then the next), so a flood of refused requests costs at most two writes each
//! and spreads over every shard: `S` shards take about `S × 1,000` writes per second. A
//! token counter is not sharded: it takes two writes per admitted call (reserve and give
//! back), and its allowance bounds admitted calls far below 500 a second (an allowance of
//! A tokens a minute admits at most A / 60 / tokens-per-call calls a second), and each
//! waiter retries once per minute.

pub mod config;
pub mod gate;
pub mod memory;

pub use config::TenantLimits;

use crate::ids::{ModelId, Principal, RunId};
use chrono::{DateTime, Utc};

/// How long one window of a per-minute counter lasts.
pub const WINDOW_SECS: i64 = 60;

/// How many shards a check tries before it refuses (see the module docs).
pub const TRIES: u16 = 2;

/// One fixed window of a per-minute counter: the UTC minute `index` (minutes since the
/// epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Window {
    pub index: i64,
}

impl Window {
    pub fn containing(at: DateTime<Utc>) -> Self {
        Self { index: at.timestamp().div_euclid(WINDOW_SECS) }
    }

    pub fn start(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(self.index * WINDOW_SECS, 0).unwrap_or_default()
    }

    pub fn end(&self) -> DateTime<Utc> {
        self.next().start()
    }

    pub fn next(&self) -> Self {
        Self { index: self.index + 1 }
    }

    /// The whole seconds until this window ends, as `Retry-After` says them: rounded up, and
    /// at least 1 (a client told 0 would retry into the same window).
    pub fn retry_after_secs(&self, now: DateTime<Utc>) -> u64 {
        let millis = (self.end() - now).num_milliseconds().max(0);
        u64::try_from((millis + 999) / 1000).unwrap_or(0).max(1)
    }

    /// When a counter item of this window may be deleted (DynamoDB TTL, epoch seconds): a
    /// window later, so a late settlement still finds it.
    pub fn expires_at(&self) -> i64 {
        self.next().end().timestamp() + WINDOW_SECS
    }
}

/// What a counter counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Measure {
    /// Runs started.
    Starts,
    /// Model tokens reserved for calls to one model.
    Tokens(ModelId),
}

/// One shard of one tenant's counter in one window.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Counter {
    pub tenant: Principal,
    pub measure: Measure,
    pub window: Window,
    pub shard: u16,
}

/// One shard of one tenant's set of running runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Slots {
    pub tenant: Principal,
    pub shard: u16,
}

/// What a set of slots answers to a run that asks for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Occupied {
    /// The run holds a slot (it did already, for a retried start).
    Admitted,
    /// The set is full: these runs hold it.
    Full(Vec<RunId>),
}

/// Shard `i`'s share of `limit` over `shards` shards: the shares sum to `limit` exactly
/// (the first `limit % shards` shards take one more), so a tenant whose every shard is
/// within its share is within its limit.
pub fn share(limit: u64, shards: u16, i: u16) -> u64 {
    let shards = u64::from(shards.max(1));
    let i = u64::from(i);
    limit / shards + u64::from(i < limit % shards)
}

/// The shards a check tries, in order: `first`, then the next ones, at most [`TRIES`].
pub fn tried(first: u16, shards: u16) -> impl Iterator<Item = u16> {
    let shards = shards.max(1);
    (0..TRIES.min(shards)).map(move |k| (first % shards + k) % shards)
}

/// The shard a run's slot is looked for first: a stable hash of its id, so whoever ends the
/// run finds it where the start put it without storing the shard anywhere.
pub fn slot_shard(run: &RunId, shards: u16) -> u16 {
    // FNV-1a: stable across processes and versions, unlike `DefaultHasher`.
    let hash = run.as_str().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    u16::try_from(hash % u64::from(shards.max(1))).unwrap_or(0)
}

/// Whether giving back a reservation's unused part still matters: only while its window
/// lasts (a later window has its own counter, and an expired item must not be recreated).
pub fn worth_giving_back(window: Window, now: DateTime<Utc>) -> bool {
    Window::containing(now) <= window
}

/// What a model call reserved in its tenant's token counter, and what settling it gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHold {
    pub counter: Counter,
    pub reserved: u64,
}

impl TokenHold {
    /// The unused part of the reservation: what the call did not use. A call can use no more
    /// than its worst case, but if a model ever reported more, nothing beyond the
    /// reservation is taken back (the counter never goes below what others hold).
    pub fn unused(&self, used: u64) -> u64 {
        self.reserved.saturating_sub(used)
    }
}

/// A model call that can never fit its tenant's allowance for a minute, however long it
/// waits. Terminal for the step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the model call could need up to {tokens} tokens, more than {tenant}'s allowance of {allowance} tokens a minute for {model}: it can never be admitted (lower max_tokens or shorten the prompt)"
)]
pub struct NeverFits {
    pub tenant: String,
    pub model: String,
    pub tokens: u64,
    pub allowance: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64, millis: u32) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, millis * 1_000_000).unwrap()
    }

    #[test]
    fn windows_are_utc_minutes_and_retry_after_rounds_up_to_at_least_a_second() {
        let w = Window::containing(at(1_800_000_030, 0));
        assert_eq!(w.start(), at(1_800_000_000, 0));
        assert_eq!(w.end(), at(1_800_000_060, 0));
        assert_eq!(Window::containing(at(1_800_000_059, 999)), w);
        assert_eq!(Window::containing(at(1_800_000_060, 0)), w.next());
        assert_eq!(w.retry_after_secs(at(1_800_000_030, 0)), 30);
        assert_eq!(w.retry_after_secs(at(1_800_000_030, 1)), 30, "29.999 s rounds up");
        assert_eq!(w.retry_after_secs(at(1_800_000_059, 999)), 1);
        assert_eq!(w.retry_after_secs(at(1_800_000_075, 0)), 1, "a window already over still says 1");
        assert!(w.expires_at() > w.end().timestamp());
    }

    #[test]
    fn shares_sum_to_the_limit_exactly() {
        for limit in [0u64, 1, 3, 7, 8, 9, 100, 1001] {
            for shards in [1u16, 2, 3, 8, 16] {
                let shares: Vec<u64> = (0..shards).map(|i| share(limit, shards, i)).collect();
                assert_eq!(shares.iter().sum::<u64>(), limit, "limit {limit} over {shards}");
                assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
            }
        }
    }

    #[test]
    fn a_check_tries_at_most_two_shards_wrapping_around() {
        assert_eq!(tried(7, 8).collect::<Vec<_>>(), vec![7, 0]);
        assert_eq!(tried(3, 8).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(tried(0, 1).collect::<Vec<_>>(), vec![0]);
        assert_eq!(tried(9, 8).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn a_runs_slot_shard_is_stable_and_spread() {
        let runs: Vec<RunId> = (0..800).map(|_| RunId::new()).collect();
        let mut counts = [0u32; 8];
        for run in &runs {
            let shard = slot_shard(run, 8);
            assert_eq!(shard, slot_shard(run, 8));
            counts[shard as usize] += 1;
        }
        // 800 ids over 8 shards: each gets some (a shard with none is a 2^-150 event).
        assert!(counts.iter().all(|&c| c > 40), "{counts:?}");
        assert_eq!(slot_shard(&runs[0], 1), 0);
    }

    #[test]
    fn unused_tokens_go_back_only_while_their_window_lasts() {
        let w = Window::containing(at(1_800_000_030, 0));
        assert!(worth_giving_back(w, at(1_800_000_059, 0)));
        assert!(!worth_giving_back(w, at(1_800_000_060, 0)));
        let hold = TokenHold { counter: Counter { tenant: Principal::Public, measure: Measure::Starts, window: w, shard: 0 }, reserved: 500 };
        assert_eq!(hold.unused(120), 380);
        assert_eq!(hold.unused(900), 0, "never more than was reserved");
    }
}
