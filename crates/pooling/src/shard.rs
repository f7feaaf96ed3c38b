//! One shard of a pool: some of its memory and table slots, their reset queue and counters.
//!
//! Each thread works in its own shard first (threads are spread over shards round-robin), so
//! two threads instantiating at once rarely touch the same lock or counter; a shard that runs
//! out of slots borrows from the others. A slot always belongs to one shard, which resets it.

use std::cell::Cell;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use berth_core::sys;

use crate::memory_pool::{MemoryPool, MemoryReset, SlotInfo};
use crate::slots::SlotId;
use crate::table_pool::{TablePool, TableReset};

/// A slot given back by a tenant, to be reset.
#[derive(Debug)]
pub(crate) enum Reset {
    Memory(MemoryReset),
    Table(TableReset),
}

/// Up to two page-aligned address ranges a reset leaves to decommit.
#[derive(Debug, Default)]
pub(crate) struct Decommits {
    ranges: [Range<usize>; 2],
    len: usize,
}

impl Decommits {
    pub fn one(range: Range<usize>) -> Decommits {
        let mut decommits = Decommits::default();
        decommits.push(range);
        decommits
    }

    /// Adds a range (an empty one is ignored).
    pub fn push(&mut self, range: Range<usize>) {
        if !range.is_empty() {
            self.ranges[self.len] = range;
            self.len += 1;
        }
    }

    pub fn as_slice(&self) -> &[Range<usize>] {
        &self.ranges[..self.len]
    }
}

/// A reset slot whose decommits have not run yet: it is not handed out until they have.
#[derive(Debug)]
struct Held {
    slot: HeldSlot,
    decommits: Decommits,
}

#[derive(Debug)]
enum HeldSlot {
    Memory(SlotId, SlotInfo),
    /// A table slot and the resident bytes its reset kept.
    Table(SlotId, usize),
}

/// Reset slots waiting for a batch of decommits.
#[derive(Debug, Default)]
struct Queue {
    held: Vec<Held>,
    ranges: usize,
}

/// A shard, on its own cache lines.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Shard {
    pub memories: MemoryPool,
    pub tables: TablePool,
    batch: usize,
    queue: Mutex<Queue>,
    /// Resets running (between deallocation and `finish` or the queue).
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
}

impl Shard {
    pub fn new(memories: MemoryPool, tables: TablePool, batch: usize, instance_share: i64) -> Shard {
        Shard {
            memories,
            tables,
            batch,
            queue: Mutex::new(Queue::default()),
            in_flight: AtomicUsize::new(0),
            instances: AtomicI64::new(0),
            instance_share,
            live_memories: AtomicU64::new(0),
            live_tables: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            decommits: AtomicU64::new(0),
        }
    }

    /// Resets a slot a tenant gave back. What must be given back to the kernel is decommitted
    /// at once when not batching, else queued: the batch runs (one system call for all its
    /// ranges) once it holds `batch` ranges, and the slots go back to their pools after it.
    /// `fail` counts down injected reset failures (tests).
    pub fn release(&self, reset: Reset, fail: &AtomicU32) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let held = match reset {
            Reset::Memory(reset) => {
                let fail = fail.load(Ordering::Relaxed) > 0
                    && fail
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                let (info, decommits) = self.memories.reset(&reset, fail);
                Held {
                    slot: HeldSlot::Memory(reset.slot, info),
                    decommits,
                }
            }
            Reset::Table(reset) => {
                let (resident, decommits) = self.tables.reset(&reset);
                Held {
                    slot: HeldSlot::Table(reset.slot, resident),
                    decommits,
                }
            }
        };
        self.resets.fetch_add(1, Ordering::Relaxed);
        let ranges = held.decommits.as_slice().len();
        if ranges == 0 || self.batch <= 1 {
            self.run_one(held);
            return;
        }
        let full = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.held.push(held);
            queue.ranges += ranges;
            if queue.ranges < self.batch {
                None
            } else {
                // Still in flight: counted once more for the batch, once less below.
                self.in_flight.fetch_add(queue.held.len(), Ordering::AcqRel);
                let next = Queue {
                    held: Vec::with_capacity(self.batch),
                    ranges: 0,
                };
                Some(std::mem::replace(&mut *queue, next))
            }
        };
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some(queue) = full {
            self.run_batch(queue);
        }
    }

    /// Decommits the ranges of one held slot (already counted in `in_flight`) and returns the
    /// slot to its pool.
    fn run_one(&self, held: Held) {
        let decommitted = self.decommit(held.decommits.as_slice());
        self.finish(held, decommitted);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Decommits the ranges of a batch (its slots already counted in `in_flight`) in one
    /// system call and returns the slots to their pools. If the call fails, each slot's ranges
    /// are tried again on their own, so one bad range costs only its own slot.
    fn run_batch(&self, queue: Queue) {
        let all: Vec<Range<usize>> = queue
            .held
            .iter()
            .flat_map(|held| held.decommits.as_slice().iter().cloned())
            .collect();
        let decommitted = self.decommit(&all);
        let count = queue.held.len();
        for held in queue.held {
            let decommitted = decommitted || self.decommit(held.decommits.as_slice());
            self.finish(held, decommitted);
        }
        self.in_flight.fetch_sub(count, Ordering::AcqRel);
    }

    /// Gives `ranges` back to the kernel; whether that worked.
    fn decommit(&self, ranges: &[Range<usize>]) -> bool {
        if ranges.is_empty() {
            return true;
        }
        self.decommits.fetch_add(ranges.len() as u64, Ordering::Relaxed);
        // SAFETY: every range came from the reset of a slot of this shard that is held (in no
        // free list, handed to no tenant), so this thread alone owns its bytes; resets return
        // page-aligned ranges inside the slot's private mappings.
        unsafe { sys::decommit_all(ranges) }.is_ok()
    }

    /// Returns a held slot to its pool: a memory slot whose decommit failed is re-mapped
    /// before its next use, a table slot's bytes are zeroed instead.
    fn finish(&self, held: Held, decommitted: bool) {
        match held.slot {
            HeldSlot::Memory(slot, info) => {
                let info = if decommitted {
                    info
                } else {
                    SlotInfo {
                        needs_remap: true,
                        ..SlotInfo::default()
                    }
                };
                self.memories.finish(slot, info);
            }
            HeldSlot::Table(slot, resident) => {
                let failed = if decommitted {
                    None
                } else {
                    held.decommits.as_slice().first().cloned()
                };
                self.tables.finish(slot, resident, failed);
            }
        }
    }

    /// Runs every queued batch now. Returns whether anything was queued.
    pub fn flush(&self) -> bool {
        let queue = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            self.in_flight.fetch_add(queue.held.len(), Ordering::AcqRel);
            std::mem::take(&mut *queue)
        };
        if queue.held.is_empty() {
            return false;
        }
        self.run_batch(queue);
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
