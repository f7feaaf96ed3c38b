//! One shard of a pool: some of its memory and table slots, their decommit queue and counters.
//!
//! Each thread works in its own shard first (threads are spread over shards round-robin), so
//! two threads instantiating at once rarely touch the same lock or counter; a shard that runs
//! out of slots borrows from the others. A slot always belongs to one shard, which resets it.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

use crate::decommit::{self, DecommitQueue, Pending};
use crate::memory_pool::{self, MemoryPool};
use crate::reset::MemoryReset;
use crate::table_pool::{TableDone, TablePool, TableReset};

/// A slot given back by a tenant, to be reset.
#[derive(Debug)]
pub(crate) enum Release {
    Memory(MemoryReset),
    Table(TableReset),
}

/// A reset slot waiting for its decommits.
#[derive(Debug)]
enum Done {
    Memory(memory_pool::Reset),
    Table(TableDone),
}

/// A shard, on its own cache lines.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Shard {
    pub memories: MemoryPool,
    pub tables: TablePool,
    queue: DecommitQueue<Done>,
    /// Resets running (between deallocation and `finish`, or in the queue).
    pub in_flight: AtomicUsize,
    /// Instances counted against this shard's share of `total_core_instances` (the sum over
    /// shards is exact; one shard's count may go below zero when its instances are dropped
    /// by threads homed elsewhere).
    pub instances: AtomicI64,
    /// This shard's share of `total_core_instances`.
    pub instance_share: i64,
    /// Memories and tables of this shard handed to tenants.
    pub live_memories: AtomicU64,
    pub live_tables: AtomicU64,
    pub resets: AtomicU64,
    pub decommits: AtomicU64,
    /// Decommits to fail, as if the kernel had refused them (tests only).
    #[cfg(test)]
    pub fail_decommits: std::sync::atomic::AtomicU32,
}

impl Shard {
    pub fn new(memories: MemoryPool, tables: TablePool, batch: usize, instance_share: i64) -> Shard {
        Shard {
            memories,
            tables,
            queue: DecommitQueue::new(batch),
            in_flight: AtomicUsize::new(0),
            instances: AtomicI64::new(0),
            instance_share,
            live_memories: AtomicU64::new(0),
            live_tables: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            decommits: AtomicU64::new(0),
            #[cfg(test)]
            fail_decommits: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// Resets a slot a tenant gave back. What must be given back to the kernel is decommitted
    /// at once when not batching, else queued: the batch runs (one system call for all its
    /// ranges) once it holds enough ranges, and the slots go back to their pools after it.
    pub fn release(&self, release: Release) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.resets.fetch_add(1, Ordering::Relaxed);
        let pending = match release {
            Release::Memory(job) => self
                .memories
                .reset(job)
                .map(|(reset, decommits)| (Done::Memory(reset), decommits)),
            Release::Table(job) => {
                let (done, decommits) = self.tables.reset(job);
                Some((Done::Table(done), decommits))
            }
        };
        let Some(pending) = pending else {
            // The reset failed and already left its slot stale.
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        if pending.1.is_empty() || !self.queue.batches() {
            self.run(vec![pending], 0);
            return;
        }
        // Slots leaving in a full batch stay counted in flight until it has run.
        let full = self.queue.push(pending, |n| {
            self.in_flight.fetch_add(n, Ordering::AcqRel);
        });
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some(batch) = full {
            let n = batch.len();
            self.run(batch, n);
        }
    }

    /// Decommits what `batch` leaves to decommit and finishes its slots; `counted` of them
    /// were counted in flight for the batch (a single release counts itself).
    fn run(&self, batch: Vec<Pending<Done>>, counted: usize) {
        // Each slot with whether its decommit is made to fail (tests only).
        let batch = batch.into_iter().map(|(done, decommits)| {
            #[cfg(test)]
            let fail = !decommits.is_empty()
                && self
                    .fail_decommits
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            #[cfg(not(test))]
            let fail = false;
            ((done, fail), decommits)
        });
        let finish = |(done, fail): (Done, bool), decommitted: bool| match done {
            Done::Memory(reset) => self.memories.finish(reset, decommitted && !fail),
            Done::Table(done) => self.tables.finish(done, decommitted && !fail),
        };
        // SAFETY: every range came from the reset of a slot of this shard, through its
        // `SlotBytes`; the slot stays `Resetting` (handed to no one, touched by no one) until
        // `finish` is called for it here.
        let calls = unsafe { decommit::run(batch.collect(), finish) };
        self.decommits.fetch_add(calls, Ordering::Relaxed);
        self.in_flight.fetch_sub(counted.max(1), Ordering::AcqRel);
    }

    /// Runs every queued decommit now. Returns whether anything was queued.
    pub fn flush(&self) -> bool {
        let batch = self.queue.take_all(|n| {
            self.in_flight.fetch_add(n, Ordering::AcqRel);
        });
        if batch.is_empty() {
            return false;
        }
        let n = batch.len();
        self.run(batch, n);
        true
    }
}

/// This thread's home shard among `shards`.
pub(crate) fn home(shards: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static HOME: Cell<usize> = const { Cell::new(usize::MAX) });
    HOME.with(|home| {
        if home.get() == usize::MAX {
            home.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        home.get() % shards.max(1)
    })
}

/// Splits `total` slots into `shards` chunks of (nearly) equal size: shard `i` holds
/// `chunk * i .. min(chunk * (i + 1), total)`.
pub(crate) fn chunk(total: u32, shards: usize) -> u32 {
    let shards = u32::try_from(shards.max(1)).unwrap_or(u32::MAX);
    total.div_ceil(shards).max(1)
}
