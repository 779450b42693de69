//! Spreading a hot partition key over shards.
//!
//! DynamoDB serves at most about 1,000 writes per second per partition key. A shared
//! progress feed (`ADMIN`, `AUTHED`, `PUBLIC`, a group) gets a write for every event of
//! every run it shows; at 10,000 concurrent runs that is far more than one key takes (the
//! arithmetic is in the README, "Feeds at scale"). So those feeds are written under
//! [`FEED_SHARDS`] keys, `ADMIN#07`, chosen by the run: one run's row always lands in the
//! same shard (it is updated in place, event after event), and reads query every shard
//! and merge. A user's own feed stays one key: the per-tenant limits bound how many runs
//! one user has going, so it never gets near the limit.

use crate::ids::{Principal, RunId};

/// Shards of each shared feed: 16 × 1,000 writes/s covers 10,000 runs writing an event
/// each second with room to spare, and a read of a feed is 16 parallel queries.
pub const FEED_SHARDS: u32 = 16;

/// Whether `principal`'s feed is spread over shards.
pub fn is_sharded(principal: &Principal) -> bool {
    !matches!(principal, Principal::User(_))
}

/// The shard of `run` among `shards`: FNV-1a of its id, stable across processes and
/// releases (unlike std's randomly seeded hasher), so a row never moves.
pub fn shard_of(run: &RunId, shards: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in run.as_str().bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % shards.max(1)
}

/// The partition key `run`'s row has in `principal`'s feed.
pub fn feed_key(principal: &Principal, run: &RunId) -> String {
    if is_sharded(principal) { format!("{}#{:02}", principal.key(), shard_of(run, FEED_SHARDS)) } else { principal.key() }
}

/// Every partition key of `principal`'s feed, for a read that merges them.
pub fn feed_keys(principal: &Principal) -> Vec<String> {
    if is_sharded(principal) { (0..FEED_SHARDS).map(|i| format!("{}#{i:02}", principal.key())).collect() } else { vec![principal.key()] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_row_always_lands_in_one_of_the_keys_a_read_queries() {
        for _ in 0..200 {
            let run = RunId::new();
            for p in [Principal::Admin, Principal::Public, Principal::Authed, Principal::Group("support".into()), Principal::User("a".into())] {
                let key = feed_key(&p, &run);
                assert_eq!(key, feed_key(&p, &run));
                assert!(feed_keys(&p).contains(&key), "{key} not read for {p}");
            }
        }
        assert_eq!(feed_keys(&Principal::User("a".into())), ["USER#a"]);
    }

    #[test]
    fn runs_spread_over_every_shard() {
        let mut counts = vec![0u32; FEED_SHARDS as usize];
        for _ in 0..16_000 {
            counts[shard_of(&RunId::new(), FEED_SHARDS) as usize] += 1;
        }
        // 1,000 expected per shard; a shard off by half would make one key twice as hot.
        assert!(counts.iter().all(|c| (500..1500).contains(c)), "{counts:?}");
    }
}
