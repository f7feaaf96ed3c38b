//! The pool-wide cap on warm memory slots (`max_unused_warm_slots`), shared by the shards.
//!
//! Each shard is entitled to a share of the cap and keeps up to its share without looking at
//! the others, so threads working in their own shards never touch a common counter. A shard
//! may keep more while the others leave their shares unused (one thread instantiating many
//! modules gets the whole cap, not its shard's part of it): it then counts what the others
//! keep before each warm slot it adds. When a shard below its share grows while another holds
//! more than its own, the total can pass the cap for a moment; whoever deallocates next sees
//! it ([`WarmBudget::over`]) and has the borrowing shards give slots back until it holds again.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A shard's warm-slot count, on its own cache line (written by that shard only).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Count(AtomicUsize);

/// The warm slots each shard keeps, against the pool's cap.
#[derive(Debug)]
pub(crate) struct WarmBudget {
    cap: usize,
    shares: Box<[usize]>,
    counts: Box<[Count]>,
    /// Shards keeping more than their share.
    borrowing: AtomicUsize,
}

impl WarmBudget {
    /// `cap` warm slots over `shards` shards, split as evenly as possible.
    pub fn new(cap: usize, shards: usize) -> WarmBudget {
        let shards = shards.max(1);
        WarmBudget {
            cap,
            shares: (0..shards)
                .map(|i| cap / shards + usize::from(i < cap % shards))
                .collect(),
            counts: (0..shards).map(|_| Count::default()).collect(),
            borrowing: AtomicUsize::new(0),
        }
    }

    /// Shard `shard`'s share of the cap.
    pub fn share(&self, shard: usize) -> usize {
        self.shares[shard]
    }

    /// How many warm slots shard `shard`, holding `warm` now, may keep: its share, or, when it
    /// would go past its share, whatever the other shards leave of the cap (at least its share).
    pub fn allowed(&self, shard: usize, warm: usize) -> usize {
        let share = self.shares[shard];
        if warm < share {
            return share;
        }
        let others: usize = self
            .counts
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != shard)
            .map(|(_, c)| c.0.load(Ordering::SeqCst))
            .sum();
        share.max(self.cap.saturating_sub(others))
    }

    /// Records that shard `shard` now keeps `warm` warm slots. Called by that shard alone,
    /// under its lock, after every change.
    pub fn publish(&self, shard: usize, warm: usize) {
        let share = self.shares[shard];
        let before = self.counts[shard].0.load(Ordering::SeqCst);
        if before <= share && warm > share {
            self.borrowing.fetch_add(1, Ordering::SeqCst);
        }
        self.counts[shard].0.store(warm, Ordering::SeqCst);
        if before > share && warm <= share {
            self.borrowing.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Whether the shards together keep more than the cap (only possible while one borrows).
    pub fn over(&self) -> bool {
        self.borrowing.load(Ordering::SeqCst) > 0 && self.total() > self.cap
    }

    fn total(&self) -> usize {
        self.counts.iter().map(|c| c.0.load(Ordering::SeqCst)).sum()
    }

    /// Whether shard `shard` keeps more than its share.
    pub fn is_borrowing(&self, shard: usize) -> bool {
        self.counts[shard].0.load(Ordering::SeqCst) > self.shares[shard]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_borrows_what_the_others_leave_and_gives_it_back_when_they_need_it() {
        let budget = WarmBudget::new(10, 2);
        assert_eq!((budget.share(0), budget.share(1)), (5, 5));
        // Below its share a shard looks at no one.
        assert_eq!(budget.allowed(0, 3), 5);
        // Past it, it may take what shard 1 leaves unused.
        assert_eq!(budget.allowed(0, 5), 10);
        budget.publish(0, 9);
        assert!(budget.is_borrowing(0));
        assert!(!budget.over());
        // Shard 1 keeps its share anyway: the total passes the cap, and shard 0 must shrink.
        assert_eq!(budget.allowed(1, 4), 5);
        budget.publish(1, 3);
        assert!(budget.over());
        assert_eq!(budget.allowed(0, 9), 7);
        budget.publish(0, 7);
        assert!(!budget.over());
        budget.publish(0, 5);
        assert!(!budget.is_borrowing(0));
        assert_eq!(budget.borrowing.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_odd_cap_is_split_without_losing_a_slot() {
        let budget = WarmBudget::new(7, 3);
        assert_eq!((0..3).map(|i| budget.share(i)).sum::<usize>(), 7);
        let budget = WarmBudget::new(0, 2);
        assert_eq!(budget.allowed(0, 0), 0);
    }
}
