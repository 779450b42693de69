//! The limits' checks over the [`TenantQuota`] port: which shards to try, with what share,
//! and what a refusal says. Like the engine, this knows only the port; the API (starts,
//! slots), the runner and the dead-letter consumer (slots) and the engine (tokens) act on
//! the answers.

use super::{Counter, Measure, Occupied, Slots, TenantLimits, TokenHold, Window, share, slot_shard, tried, worth_giving_back};
use crate::ids::{ModelId, Principal, RunId};
use crate::ports::{StoreError, TenantQuota};
use chrono::{DateTime, Utc};
use rand::Rng;

/// Counts one start of `tenant` in the minute of `now`. `Err(seconds)`: the minute's starts
/// are used up; retry after that many seconds. Nothing is counted then.
pub async fn take_start(
    quota: &dyn TenantQuota,
    limits: &TenantLimits,
    tenant: &Principal,
    now: DateTime<Utc>,
) -> Result<Result<(), u64>, StoreError> {
    let Some(limit) = limits.starts_per_minute else { return Ok(Ok(())) };
    let window = Window::containing(now);
    let shards = limits.shards(tenant);
    // A random first shard spreads concurrent starts (and refusals) over every shard.
    let first = rand::rng().random_range(0..shards.max(1));
    for shard in tried(first, shards) {
        let share = share(limit, shards, shard);
        if share == 0 {
            continue;
        }
        let counter = Counter { tenant: tenant.clone(), measure: Measure::Starts, window, shard };
        if quota.take(&counter, 1, share).await? {
            return Ok(Ok(()));
        }
    }
    Ok(Err(window.retry_after_secs(now)))
}

/// Gives `tenant` a slot for `run`. `Err(holders)`: the shards tried are full, held by these
/// runs (some may have ended without their slot being given back: see the API's reclaim).
pub async fn occupy_slot(
    quota: &dyn TenantQuota,
    limits: &TenantLimits,
    tenant: &Principal,
    run: &RunId,
) -> Result<Result<(), Vec<RunId>>, StoreError> {
    let Some(limit) = limits.concurrent_runs else { return Ok(Ok(())) };
    let shards = limits.shards(tenant);
    let mut holders = Vec::new();
    for shard in tried(slot_shard(run, shards), shards) {
        let capacity = share(limit, shards, shard);
        let slots = Slots { tenant: tenant.clone(), shard };
        match quota.occupy(&slots, run, capacity).await? {
            Occupied::Admitted => return Ok(Ok(())),
            Occupied::Full(runs) => holders.extend(runs),
        }
    }
    Ok(Err(holders))
}

/// Gives back `run`'s slot, wherever [`occupy_slot`] put it. Idempotent: `false` if it held
/// none (already given back, or it started while slots were off).
pub async fn vacate_slot(quota: &dyn TenantQuota, limits: &TenantLimits, tenant: &Principal, run: &RunId) -> Result<bool, StoreError> {
    let shards = limits.shards(tenant);
    for shard in tried(slot_shard(run, shards), shards) {
        if quota.vacate(&Slots { tenant: tenant.clone(), shard }, run).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Reserves `tokens` for a call to `model` in `tenant`'s counter for the minute of `now`.
/// `Err(window)`: the minute's allowance is taken; the call may try again when `window`
/// ends. The caller has checked that `tokens` fits an empty minute ([`super::NeverFits`]).
pub async fn reserve_tokens(
    quota: &dyn TenantQuota,
    tenant: &Principal,
    model: &ModelId,
    tokens: u64,
    allowance: u64,
    now: DateTime<Utc>,
) -> Result<Result<TokenHold, Window>, StoreError> {
    let window = Window::containing(now);
    let counter = Counter { tenant: tenant.clone(), measure: Measure::Tokens(model.clone()), window, shard: 0 };
    Ok(if quota.take(&counter, tokens, allowance).await? { Ok(TokenHold { counter, reserved: tokens }) } else { Err(window) })
}

/// Gives back what a call did not use of its reservation, while its window lasts.
pub async fn settle_tokens(quota: &dyn TenantQuota, hold: &TokenHold, used: u64, now: DateTime<Utc>) -> Result<(), StoreError> {
    let unused = hold.unused(used);
    if unused == 0 || !worth_giving_back(hold.counter.window, now) {
        return Ok(());
    }
    quota.give_back(&hold.counter, unused).await
}
