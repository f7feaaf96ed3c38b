//! One shard of a pool: some of its memory and table slots, their reset queue and counters.
//!
//! Each thread works in its own shard first (threads are spread over shards round-robin), so
//! two threads instantiating at once rarely touch the same lock or counter; a shard that runs
//! out of slots borrows from the others. A slot always belongs to one shard, which resets it.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::memory_pool::{MemoryPool, MemoryReset};
use crate::table_pool::{TablePool, TableReset};

/// A reset waiting in a shard's queue.
#[derive(Debug, Clone)]
pub(crate) enum Reset {
    Memory(MemoryReset),
    Table(TableReset),
}

/// A shard, on its own cache lines.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Shard {
    pub memories: MemoryPool,
    pub tables: TablePool,
    batch: usize,
    queue: Mutex<Vec<Reset>>,
    /// Resets taken out of the queue (or run at once) and not yet finished.
    pub in_flight: AtomicUsize,
    /// Memories and tables of this shard handed to tenants.
    pub live_memories: AtomicU64,
    pub live_tables: AtomicU64,
    pub resets: AtomicU64,
    pub decommits: AtomicU64,
}

impl Shard {
    pub fn new(memories: MemoryPool, tables: TablePool, batch: usize) -> Shard {
        Shard {
            memories,
            tables,
            batch,
            queue: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            live_memories: AtomicU64::new(0),
            live_tables: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            decommits: AtomicU64::new(0),
        }
    }

    /// Runs resets already counted in `in_flight` and returns their slots to the pools.
    /// `fail` counts down injected reset failures (tests).
    fn run(&self, jobs: &[Reset], fail: &AtomicU32) {
        let mut decommits = 0;
        for job in jobs {
            match job {
                Reset::Memory(reset) => {
                    let fail = fail.load(Ordering::Relaxed) > 0
                        && fail
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                    let info = self.memories.reset(reset, fail, &mut decommits);
                    self.memories.finish(reset.slot, info);
                }
                Reset::Table(reset) => {
                    let resident = self.tables.reset(reset, &mut decommits);
                    self.tables.finish(reset.slot, resident);
                }
            }
        }
        self.resets.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        if decommits > 0 {
            self.decommits.fetch_add(decommits, Ordering::Relaxed);
        }
        self.in_flight.fetch_sub(jobs.len(), Ordering::AcqRel);
    }

    /// Queues a reset, running the batch when it is full (at once when not batching).
    pub fn enqueue(&self, reset: Reset, fail: &AtomicU32) {
        if self.batch == 1 {
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            self.run(std::slice::from_ref(&reset), fail);
            return;
        }
        let batch = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.push(reset);
            if queue.len() < self.batch {
                return;
            }
            self.in_flight.fetch_add(queue.len(), Ordering::AcqRel);
            std::mem::take(&mut *queue)
        };
        self.run(&batch, fail);
    }

    /// Runs every queued reset now. Returns whether anything was queued.
    pub fn flush(&self, fail: &AtomicU32) -> bool {
        let jobs = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            self.in_flight.fetch_add(queue.len(), Ordering::AcqRel);
            std::mem::take(&mut *queue)
        };
        if jobs.is_empty() {
            return false;
        }
        self.run(&jobs, fail);
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
