//! The pool-wide caps on warm memory slots (`max_unused_warm_slots`) and on the bytes they keep
//! resident (`max_unused_warm_bytes`), shared by the shards, and which slot goes when the pool
//! is over one: the least recently used of the whole pool.
//!
//! Each shard keeps its warm slots on its own LRU list, and may keep up to the whole caps, so a
//! thread working alone gets all of them, however the other shards were used before. A shard
//! that keeps no more than its shares (the caps split evenly) never looks at the others: while
//! every shard is within its shares, the pool is within its caps. A shard past a share is
//! *borrowing*; while one is, whoever deallocates checks the totals, and while they are over a
//! cap has the shard whose least recently used slot is the oldest in the pool give it back.
//! Each shard publishes its warm count, the bytes they keep and the age of its least recently
//! used slot, on its own cache line, written by that shard alone. Slots being reset count as warm (they turn warm
//! in a moment): otherwise threads that take cold slots while theirs are being reset put the
//! pool over its cap a moment later, and each such slot pushes out a warm one (with 150
//! modules on two threads, one cycle in nine did that).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// A shard's published state, on its own cache line.
#[derive(Debug)]
#[repr(align(128))]
struct Published {
    /// Warm slots (and slots being reset).
    warm: AtomicUsize,
    /// Those and the slots handed to tenants.
    returning: AtomicUsize,
    /// Resident bytes its warm slots keep.
    resident: AtomicUsize,
    /// When its least recently used warm slot turned warm (nanoseconds since the budget was
    /// made), `u64::MAX` if it has none.
    oldest: AtomicU64,
}

/// The warm slots each shard keeps, against the pool's cap.
#[derive(Debug)]
pub(crate) struct WarmBudget {
    cap: usize,
    bytes: usize,
    shares: Box<[usize]>,
    byte_shares: Box<[usize]>,
    shards: Box<[Published]>,
    /// Shards keeping more than their share.
    borrowing: AtomicUsize,
    epoch: Instant,
}

impl WarmBudget {
    /// `cap` warm slots keeping `bytes` resident over `shards` shards, shared as evenly as
    /// possible.
    pub fn new(cap: usize, bytes: usize, shards: usize) -> WarmBudget {
        let shards = shards.max(1);
        let split = |total: usize| -> Box<[usize]> {
            (0..shards)
                .map(|i| total / shards + usize::from(i < total % shards))
                .collect()
        };
        WarmBudget {
            cap,
            bytes,
            shares: split(cap),
            byte_shares: split(bytes),
            shards: (0..shards)
                .map(|_| Published {
                    warm: AtomicUsize::new(0),
                    returning: AtomicUsize::new(0),
                    resident: AtomicUsize::new(0),
                    oldest: AtomicU64::new(u64::MAX),
                })
                .collect(),
            borrowing: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    /// The most warm slots any one shard keeps: the whole cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The most resident bytes the warm slots of any one shard keep: the whole byte cap.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A time stamp for a slot turning warm now.
    pub fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Records that shard `shard` now keeps `warm` warm slots (or slots being reset) holding
    /// `resident` bytes, the least recently used of them stamped `oldest` (`None` if it keeps
    /// none), and would keep `returning` once its tenants left. Called by that shard alone,
    /// under its lock, after every change.
    pub fn publish(&self, shard: usize, warm: usize, returning: usize, resident: usize, oldest: Option<u64>) {
        let (share, byte_share) = (self.shares[shard], self.byte_shares[shard]);
        let borrows = |warm: usize, resident: usize| warm > share || resident > byte_share;
        let published = &self.shards[shard];
        let before = borrows(
            published.warm.load(Ordering::Relaxed),
            published.resident.load(Ordering::Relaxed),
        );
        let after = borrows(warm, resident);
        // Counted as borrowing before the totals grow, and no longer only after they shrank:
        // the count is never low while the totals are over a share. A reader takes a snapshot
        // (the count, then the totals) that may miss a change made meanwhile, whatever the
        // ordering; the next check finds it, so release and acquire are enough (a `SeqCst`
        // store is a full barrier on x86: four a publish, two publishes a cycle, cost an idle
        // tenant's cycle about 6%).
        if !before && after {
            self.borrowing.fetch_add(1, Ordering::AcqRel);
        }
        published.warm.store(warm, Ordering::Release);
        published.returning.store(returning, Ordering::Release);
        published.resident.store(resident, Ordering::Release);
        published
            .oldest
            .store(oldest.unwrap_or(u64::MAX), Ordering::Release);
        if before && !after {
            self.borrowing.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether the shards together keep more warm slots than the cap (only possible while one
    /// borrows).
    pub fn over(&self) -> bool {
        self.borrowing.load(Ordering::Acquire) > 0 && self.total() > self.cap
    }

    /// Whether the shards' warm slots together keep more resident bytes than the byte cap (only
    /// possible while one borrows).
    pub fn over_bytes(&self) -> bool {
        self.borrowing.load(Ordering::Acquire) > 0 && self.resident() > self.bytes
    }

    /// Whether the shards would keep as many warm slots as the cap, or more, once their tenants
    /// left: a cold slot taken now would push a warm one out then (with two tenants of 150
    /// modules, one cycle in nine did that while slots held by tenants were not counted).
    pub fn at_cap(&self) -> bool {
        self.returning() >= self.cap
    }

    /// Whether the shards would keep fewer warm slots than half the cap once their tenants left.
    pub fn under_half(&self) -> bool {
        self.returning() * 2 < self.cap
    }

    fn returning(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.returning.load(Ordering::Acquire))
            .sum()
    }

    fn total(&self) -> usize {
        self.shards.iter().map(|s| s.warm.load(Ordering::Acquire)).sum()
    }

    fn resident(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.resident.load(Ordering::Acquire))
            .sum()
    }

    /// The shard whose warm slots keep the most resident bytes, if any keeps some: the one to
    /// give some back when the pool is over its byte cap.
    pub fn fullest(&self) -> Option<usize> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.resident.load(Ordering::Acquire), i))
            .filter(|&(bytes, _)| bytes > 0)
            .max()
            .map(|(_, i)| i)
    }

    /// The shard whose least recently used warm slot is the oldest in the pool, if any shard
    /// keeps one.
    pub fn oldest(&self) -> Option<usize> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.oldest.load(Ordering::Acquire), i))
            .filter(|&(stamp, _)| stamp != u64::MAX)
            .min()
            .map(|(_, i)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_over_its_cap_only_while_a_shard_borrows_and_the_oldest_slot_goes_first() {
        let budget = WarmBudget::new(10, usize::MAX, 2);
        assert_eq!(budget.cap(), 10);
        // Within their shares, the shards cannot put the pool over its cap.
        budget.publish(0, 5, 5, 0, Some(7));
        budget.publish(1, 5, 5, 0, Some(3));
        assert!(!budget.over());
        // Shard 0 borrows: the pool is over, and shard 1's slot is the oldest.
        budget.publish(0, 6, 6, 0, Some(7));
        assert!(budget.over());
        assert_eq!(budget.oldest(), Some(1));
        budget.publish(1, 4, 4, 0, Some(9));
        assert!(!budget.over());
        assert_eq!(budget.oldest(), Some(0));
        budget.publish(0, 5, 5, 0, Some(8));
        assert_eq!(budget.borrowing.load(Ordering::SeqCst), 0);
        budget.publish(0, 0, 0, 0, None);
        budget.publish(1, 0, 0, 0, None);
        assert_eq!(budget.oldest(), None);
    }

    #[test]
    fn an_odd_cap_is_shared_without_losing_a_slot() {
        let budget = WarmBudget::new(7, 7, 3);
        assert_eq!(budget.shares.iter().sum::<usize>(), 7);
        assert_eq!(budget.byte_shares.iter().sum::<usize>(), 7);
        let budget = WarmBudget::new(0, 0, 2);
        budget.publish(0, 1, 1, 0, Some(1));
        assert!(budget.over());
        assert!(!budget.over_bytes(), "a slot that keeps nothing");
        budget.publish(0, 1, 1, 4096, Some(1));
        assert!(budget.over_bytes());
        assert_eq!(budget.fullest(), Some(0));
    }

    #[test]
    fn the_pool_is_over_its_byte_cap_while_its_warm_slots_keep_more_than_it() {
        let budget = WarmBudget::new(100, 1000, 2);
        assert_eq!(budget.bytes(), 1000);
        budget.publish(0, 2, 2, 500, Some(1));
        budget.publish(1, 2, 2, 500, Some(2));
        assert!(!budget.over(), "each shard within its share of bytes");
        // Few slots, but shard 0's keep more than its share of bytes, and the pool more than its cap.
        budget.publish(0, 2, 2, 600, Some(1));
        assert!(budget.over_bytes());
        assert!(!budget.over(), "the slots are within their cap");
        assert_eq!(budget.fullest(), Some(0));
        // Still borrowing, but the pool's total fits.
        budget.publish(1, 1, 1, 300, Some(4));
        assert!(!budget.over_bytes());
        budget.publish(0, 2, 2, 400, Some(1));
        assert_eq!(budget.borrowing.load(Ordering::SeqCst), 0);
    }
}
