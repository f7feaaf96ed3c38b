//! The pool-wide cap on warm memory slots (`max_unused_warm_slots`), shared by the shards, and
//! which slot goes when the pool is over it: the least recently used of the whole pool.
//!
//! Each shard keeps its warm slots on its own LRU list, and may keep up to the whole cap, so a
//! thread working alone gets the whole cap, however the other shards were used before. A shard
//! that keeps no more than its share (the cap split evenly) never looks at the others: while
//! every shard is within its share, the pool is within its cap. A shard past its share is
//! *borrowing*; while one is, whoever deallocates checks the total, and while it is over the
//! cap has the shard whose least recently used slot is the oldest in the pool give it back.
//! Each shard publishes its warm count and the age of its least recently used slot, on its own
//! cache line, written by that shard alone. Slots being reset count as warm (they turn warm
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
    /// When its least recently used warm slot turned warm (nanoseconds since the budget was
    /// made), `u64::MAX` if it has none.
    oldest: AtomicU64,
}

/// The warm slots each shard keeps, against the pool's cap.
#[derive(Debug)]
pub(crate) struct WarmBudget {
    cap: usize,
    shares: Box<[usize]>,
    shards: Box<[Published]>,
    /// Shards keeping more than their share.
    borrowing: AtomicUsize,
    epoch: Instant,
}

impl WarmBudget {
    /// `cap` warm slots over `shards` shards, shared as evenly as possible.
    pub fn new(cap: usize, shards: usize) -> WarmBudget {
        let shards = shards.max(1);
        WarmBudget {
            cap,
            shares: (0..shards)
                .map(|i| cap / shards + usize::from(i < cap % shards))
                .collect(),
            shards: (0..shards)
                .map(|_| Published {
                    warm: AtomicUsize::new(0),
                    returning: AtomicUsize::new(0),
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

    /// A time stamp for a slot turning warm now.
    pub fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Records that shard `shard` now keeps `warm` warm slots (or slots being reset), the least
    /// recently used of them stamped `oldest` (`None` if it keeps none), and would keep
    /// `returning` once its tenants left. Called by that shard alone, under its lock, after
    /// every change.
    pub fn publish(&self, shard: usize, warm: usize, returning: usize, oldest: Option<u64>) {
        let share = self.shares[shard];
        let published = &self.shards[shard];
        let before = published.warm.load(Ordering::SeqCst);
        if before <= share && warm > share {
            self.borrowing.fetch_add(1, Ordering::SeqCst);
        }
        published.warm.store(warm, Ordering::SeqCst);
        published.returning.store(returning, Ordering::SeqCst);
        published
            .oldest
            .store(oldest.unwrap_or(u64::MAX), Ordering::SeqCst);
        if before > share && warm <= share {
            self.borrowing.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Whether the shards together keep more than the cap (only possible while one borrows).
    pub fn over(&self) -> bool {
        self.borrowing.load(Ordering::SeqCst) > 0 && self.total() > self.cap
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
            .map(|s| s.returning.load(Ordering::SeqCst))
            .sum()
    }

    fn total(&self) -> usize {
        self.shards.iter().map(|s| s.warm.load(Ordering::SeqCst)).sum()
    }

    /// The shard whose least recently used warm slot is the oldest in the pool, if any shard
    /// keeps one.
    pub fn oldest(&self) -> Option<usize> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.oldest.load(Ordering::SeqCst), i))
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
        let budget = WarmBudget::new(10, 2);
        assert_eq!(budget.cap(), 10);
        // Within their shares, the shards cannot put the pool over its cap.
        budget.publish(0, 5, 5, Some(7));
        budget.publish(1, 5, 5, Some(3));
        assert!(!budget.over());
        // Shard 0 borrows: the pool is over, and shard 1's slot is the oldest.
        budget.publish(0, 6, 6, Some(7));
        assert!(budget.over());
        assert_eq!(budget.oldest(), Some(1));
        budget.publish(1, 4, 4, Some(9));
        assert!(!budget.over());
        assert_eq!(budget.oldest(), Some(0));
        budget.publish(0, 5, 5, Some(8));
        assert_eq!(budget.borrowing.load(Ordering::SeqCst), 0);
        budget.publish(0, 0, 0, None);
        budget.publish(1, 0, 0, None);
        assert_eq!(budget.oldest(), None);
    }

    #[test]
    fn an_odd_cap_is_shared_without_losing_a_slot() {
        let budget = WarmBudget::new(7, 3);
        assert_eq!(budget.shares.iter().sum::<usize>(), 7);
        let budget = WarmBudget::new(0, 2);
        budget.publish(0, 1, 1, Some(1));
        assert!(budget.over());
    }
}
