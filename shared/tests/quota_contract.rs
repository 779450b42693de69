//! The tenant-quota contract, checked against the in-memory adapter and against the
//! DynamoDB adapter on a moto server (opt-in with `CHAINRUN_MOTO=1`, as in
//! `store_contract.rs`).
//!
//! The concurrency proof (many tasks taking from one counter and one slot set at once,
//! never past the limit) runs on both, but it proves something only on the in-memory
//! adapter and on DynamoDB itself: moto checks a condition and then writes without a lock
//! across concurrent requests (and loses concurrent `ADD`s), so on moto it is run and its
//! numbers reported (see `concurrent_takes_on_moto`).
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::aws::DynamoQuota;
use chainrun_core::ids::{ModelId, Principal, RunId};
use chainrun_core::memory::MemoryQuota;
use chainrun_core::ports::TenantQuota;
use chainrun_core::quota::{Counter, Measure, Occupied, Slots, Window};
use std::sync::Arc;

#[path = "support/moto.rs"]
mod moto;

fn counter(tenant: Principal, measure: Measure, window: i64, shard: u16) -> Counter {
    Counter { tenant, measure, window: Window { index: window }, shard }
}

fn alice() -> Principal {
    Principal::User("alice".into())
}

async fn counters_contract(q: Arc<dyn TenantQuota>) {
    let tokens = Measure::Tokens(ModelId::parse("amazon.nova-micro-v1:0").unwrap());
    let c = counter(alice(), tokens.clone(), 29_000_000, 0);
    assert_eq!(q.used(&c).await.unwrap(), 0, "a counter never written holds nothing");
    assert!(q.take(&c, 600, 1000).await.unwrap());
    assert!(q.take(&c, 400, 1000).await.unwrap(), "exactly up to the limit");
    assert!(!q.take(&c, 1, 1000).await.unwrap(), "past it: refused");
    assert_eq!(q.used(&c).await.unwrap(), 1000, "a refusal changes nothing");
    q.give_back(&c, 250).await.unwrap();
    assert_eq!(q.used(&c).await.unwrap(), 750);
    assert!(q.take(&c, 250, 1000).await.unwrap(), "what was given back is room again");
    assert!(!q.take(&counter(alice(), tokens.clone(), 29_000_000, 1), 1001, 1000).await.unwrap(), "more than the limit never fits");

    // Windows, shards, measures and tenants are separate counters.
    for other in [
        counter(alice(), tokens.clone(), 29_000_001, 0),
        counter(alice(), tokens.clone(), 29_000_000, 3),
        counter(alice(), Measure::Starts, 29_000_000, 0),
        counter(Principal::User("bob".into()), tokens.clone(), 29_000_000, 0),
        counter(Principal::Public, tokens.clone(), 29_000_000, 0),
    ] {
        assert!(q.take(&other, 1000, 1000).await.unwrap(), "{other:?}");
    }

    // Giving back to a counter that does not exist (expired) does not create it.
    let gone = counter(alice(), Measure::Starts, 28_000_000, 0);
    q.give_back(&gone, 5).await.unwrap();
    assert_eq!(q.used(&gone).await.unwrap(), 0);
    assert!(q.take(&gone, 1, 1).await.unwrap());
}

async fn slots_contract(q: Arc<dyn TenantQuota>) {
    let slots = Slots { tenant: alice(), shard: 0 };
    let (a, b, c) = (RunId::new(), RunId::new(), RunId::new());
    assert!(!q.vacate(&slots, &a).await.unwrap(), "nothing to give back yet");
    assert_eq!(q.occupy(&slots, &a, 2).await.unwrap(), Occupied::Admitted);
    assert_eq!(q.occupy(&slots, &a, 2).await.unwrap(), Occupied::Admitted, "a retried start is admitted again…");
    assert_eq!(q.occupy(&slots, &b, 2).await.unwrap(), Occupied::Admitted, "…without counting twice");
    let Occupied::Full(mut holders) = q.occupy(&slots, &c, 2).await.unwrap() else { panic!("a full set admitted a third run") };
    holders.sort();
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort();
    assert_eq!(holders, expected, "a full set names its holders");
    assert_eq!(q.occupy(&slots, &a, 2).await.unwrap(), Occupied::Admitted, "a holder is admitted even when the set is full");
    assert!(q.vacate(&slots, &a).await.unwrap());
    assert!(!q.vacate(&slots, &a).await.unwrap(), "a repeated end gives back nothing more");
    assert_eq!(q.occupy(&slots, &c, 2).await.unwrap(), Occupied::Admitted, "the slot came back");
    assert!(matches!(q.occupy(&Slots { tenant: alice(), shard: 1 }, &a, 0).await.unwrap(), Occupied::Full(_)), "a shard with no share");
    assert_eq!(q.occupy(&Slots { tenant: Principal::Public, shard: 0 }, &a, 1).await.unwrap(), Occupied::Admitted, "tenants are apart");
    // Emptying a set and filling it again.
    assert!(q.vacate(&slots, &b).await.unwrap());
    assert!(q.vacate(&slots, &c).await.unwrap());
    assert_eq!(q.occupy(&slots, &b, 1).await.unwrap(), Occupied::Admitted);
}

/// 64 tasks at once each take 100 from a counter limited to 1,000, and 64 runs ask for one
/// of 10 slots: how many were admitted, and what the counter and set hold after.
async fn concurrent(q: Arc<dyn TenantQuota>) -> (usize, u64, usize, usize) {
    let c = counter(Principal::Public, Measure::Starts, 30_000_000, 0);
    let takes: Vec<_> = (0..64)
        .map(|_| {
            let q = q.clone();
            let c = c.clone();
            tokio::spawn(async move { q.take(&c, 100, 1000).await.unwrap() })
        })
        .collect();
    let mut taken = 0;
    for t in takes {
        taken += usize::from(t.await.unwrap());
    }
    let slots = Slots { tenant: Principal::Public, shard: 2 };
    let runs: Vec<RunId> = (0..64).map(|_| RunId::new()).collect();
    let occupies: Vec<_> = runs
        .iter()
        .cloned()
        .map(|run| {
            let q = q.clone();
            let slots = slots.clone();
            tokio::spawn(async move { q.occupy(&slots, &run, 10).await.unwrap() == Occupied::Admitted })
        })
        .collect();
    let mut admitted = 0;
    for o in occupies {
        admitted += usize::from(o.await.unwrap());
    }
    let mut holding = 0;
    for run in &runs {
        holding += usize::from(q.vacate(&slots, run).await.unwrap());
    }
    (taken, q.used(&c).await.unwrap(), admitted, holding)
}

#[tokio::test]
async fn memory_quota_keeps_the_counter_contract() {
    counters_contract(Arc::new(MemoryQuota::new())).await;
}

#[tokio::test]
async fn memory_quota_keeps_the_slots_contract() {
    slots_contract(Arc::new(MemoryQuota::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_quota_never_admits_past_the_limit_under_concurrency() {
    for _ in 0..20 {
        let (taken, used, admitted, holding) = concurrent(Arc::new(MemoryQuota::new())).await;
        assert_eq!((taken, used), (10, 1000));
        assert_eq!((admitted, holding), (10, 10));
    }
}

/// The DynamoDB adapter on a fresh moto server, when the moto half runs (`CHAINRUN_MOTO=1`).
async fn dynamodb(test: &str) -> Option<(moto::Moto, Arc<dyn TenantQuota>)> {
    let (moto, client, tables) = moto::moto_with_tables(test).await?;
    Some((moto, Arc::new(DynamoQuota::new(client, tables))))
}

#[tokio::test]
async fn dynamodb_quota_keeps_the_counter_contract() {
    let Some((_moto, q)) = dynamodb("dynamodb_quota_keeps_the_counter_contract").await else { return };
    counters_contract(q).await;
}

#[tokio::test]
async fn dynamodb_quota_keeps_the_slots_contract() {
    let Some((_moto, q)) = dynamodb("dynamodb_quota_keeps_the_slots_contract").await else { return };
    slots_contract(q).await;
}

/// On moto the concurrency proof is run and its numbers reported, not asserted: moto neither
/// applies a conditional update atomically nor keeps concurrent `ADD`s (measured: 14 of 64
/// takes of 100 admitted under a limit of 1,000, and the counter left at 1,000 — updates
/// over-admitted and lost). Staying within the limit under concurrency is DynamoDB's
/// guarantee for one conditional write, which is all an admission is; the in-memory test
/// proves the adapter's side, and the contracts above check each condition sequentially.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_takes_on_moto() {
    let Some((_moto, q)) = dynamodb("concurrent_takes_on_moto").await else { return };
    let (taken, used, admitted, holding) = concurrent(q).await;
    eprintln!(
        "moto, 64 concurrent takes of 100 under 1000: {taken} admitted, counter {used}; 64 runs for 10 slots: {admitted} admitted, {holding} held"
    );
    assert!(taken >= 10 && admitted >= 10, "moto refused room it had: {taken} takes, {admitted} slots");
}
