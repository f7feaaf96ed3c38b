//! One shard of a pool: some of its memory and table slots, their decommit queue and counters.
//!
//! Each thread works in its own shard first (threads are spread over shards round-robin), so
//! two threads instantiating at once rarely touch the same lock or counter; a shard that runs
//! out of slots borrows from the others. A slot always belongs to one shard, which resets it.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

use anyhow::Result;

use crate::decommit::{self, Batch, DecommitQueue, Decommits, Decommitted, Kind};
use crate::memory_pool::{self, Choose, Finishing, Keeps, Lease, MemoryKey, MemoryPool, Wanted};
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

/// A reset slot the shard holds until its decommits ran.
#[derive(Debug)]
struct Held {
    done: Done,
    /// Its decommit is made to fail, and not run (tests only).
    #[cfg(test)]
    injected: bool,
}

/// Counts resets in flight until dropped, also when a reset panics, so that a thread waiting
/// for resets to end (an exhausted pool) never waits for one that will not.
struct InFlight<'a> {
    count: &'a AtomicUsize,
    n: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// A shard, on its own cache lines.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Shard {
    pub memories: MemoryPool,
    pub tables: TablePool,
    queue: DecommitQueue<Held>,
    /// Resets running (between deallocation and `finish`, or in a batch being run; not those
    /// waiting in the queue, which a flush runs).
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
    pub memory_resets: AtomicU64,
    pub table_resets: AtomicU64,
    pub decommit_calls: AtomicU64,
    pub decommit_ranges: AtomicU64,
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
            memory_resets: AtomicU64::new(0),
            table_resets: AtomicU64::new(0),
            decommit_calls: AtomicU64::new(0),
            decommit_ranges: AtomicU64::new(0),
            #[cfg(test)]
            fail_decommits: std::sync::atomic::AtomicU32::new(0),
        }
    }

    fn count_in_flight(&self, n: usize) -> InFlight<'_> {
        self.in_flight.fetch_add(n, Ordering::AcqRel);
        InFlight {
            count: &self.in_flight,
            n,
        }
    }

    /// Resets a slot a tenant gave back; `opens` says it is the first its instance's
    /// deallocation gives back (batches count deallocations). What must be given back to the
    /// kernel is decommitted at once when not batching, else queued: the batch runs (one
    /// system call for all its ranges) once it holds enough, and the slots go back to their
    /// pools after it.
    pub fn release(&self, release: Release, opens: bool) {
        let counted = self.count_in_flight(1);
        let resets = match &release {
            Release::Memory(_) => &self.memory_resets,
            Release::Table(_) => &self.table_resets,
        };
        resets.fetch_add(1, Ordering::Relaxed);
        let mut decommits = Decommits::new(Kind::Blind);
        let done = match release {
            Release::Memory(job) => match self.memories.reset(job, &mut decommits) {
                Some(reset) => Done::Memory(reset),
                // The reset failed and already left its slot stale.
                None => return,
            },
            Release::Table(job) => match self.tables.reset(job, &mut decommits) {
                Some(done) => Done::Table(done),
                // Nothing to decommit: already free.
                None => return,
            },
        };
        if !opens {
            decommits.continues_deallocation();
        }
        let mut held = self.hold(done, &mut decommits);
        if decommits.is_empty() || !self.queue.batches() {
            // SAFETY: the ranges came from this slot's reset, through its `SlotBytes`; the
            // slot stays `Resetting` (handed to no one, touched by no one) until `finish`.
            let done = unsafe { decommit::run_one(held, &decommits, |held, ok| self.finish(held, ok)) };
            self.count(done);
            return;
        }
        // What a scan found written, and the gaps of a slot that keeps many pages, are given
        // back now, by the deallocation that left them; only blind decommits of slots that
        // keep little (usually of nothing) wait for a batch. Unless another thread is in the
        // kernel decommitting: then the slot waits in the queue instead of this thread.
        if decommits.runs_at_once() {
            // SAFETY: the ranges came from this slot's reset, through its `SlotBytes`; the
            // slot stays `Resetting` (handed to no one, touched by no one) until `finish`.
            match unsafe { decommit::try_run_one(held, &decommits, |held, ok| self.finish(held, ok)) } {
                Ok(done) => {
                    self.count(done);
                    return;
                }
                Err(back) => held = back,
            }
        }
        // Slots leaving in a full batch stay counted in flight until it has run.
        let mut batch_counted = None;
        let full = self.queue.push(held, &decommits, |n| {
            batch_counted = Some(self.count_in_flight(n));
        });
        drop(counted);
        if let Some(mut batch) = full {
            let mut memories = self.memories.finishing();
            // SAFETY: every range came from the reset of a slot of this shard, through its
            // `SlotBytes`; the slot stays `Resetting` until `finish_in` is called for it.
            let ran =
                unsafe { decommit::try_run(&mut batch, |held, ok| self.finish_in(&mut memories, held, ok)) };
            drop(memories);
            match ran {
                Some(done) => {
                    self.count(done);
                    self.queue.recycle(batch);
                }
                // Another thread is decommitting: the batch waits for the next one, unless the
                // queue is long already.
                None => {
                    if let Err(batch) = self.queue.requeue(batch, || drop(batch_counted.take())) {
                        self.run(batch);
                    }
                }
            }
        }
        drop(batch_counted);
    }

    /// The slot `done` describes, held until its `decommits` ran; in tests, an injected
    /// failure empties them (so nothing is decommitted) and fails the slot's finish.
    #[cfg_attr(not(test), allow(clippy::unused_self))]
    fn hold(&self, done: Done, decommits: &mut Decommits) -> Held {
        #[cfg(test)]
        {
            let injected = !decommits.is_empty()
                && self
                    .fail_decommits
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if injected {
                decommits.clear();
            }
            Held { done, injected }
        }
        #[cfg(not(test))]
        {
            let _ = decommits;
            Held { done }
        }
    }

    /// Returns a held slot to its pool: warm (or free), or, if its decommit failed, stale (a
    /// memory slot) or zeroed (a table slot).
    fn finish(&self, held: Held, decommitted: bool) {
        self.finish_in(&mut self.memories.finishing(), held, decommitted);
    }

    /// [`finish`](Self::finish), a memory slot through `memories` (a batch's slots are
    /// finished under one lock of the memory pool: see [`Finishing`]).
    fn finish_in(&self, memories: &mut Finishing<'_>, held: Held, decommitted: bool) {
        #[cfg(test)]
        let decommitted = decommitted && !held.injected;
        match held.done {
            Done::Memory(reset) => memories.finish(reset, decommitted),
            Done::Table(done) => self.tables.finish(done, decommitted),
        }
    }

    /// Decommits a batch's ranges and finishes its slots (counted in flight by the caller).
    fn run(&self, mut batch: Batch<Held>) {
        let mut memories = self.memories.finishing();
        // SAFETY: every range came from the reset of a slot of this shard, through its
        // `SlotBytes`; the slot stays `Resetting` (handed to no one, touched by no one) until
        // `finish_in` is called for it here.
        let done = unsafe { decommit::run(&mut batch, |held, ok| self.finish_in(&mut memories, held, ok)) };
        drop(memories);
        self.count(done);
        self.queue.recycle(batch);
    }

    /// Counts decommits in the statistics.
    fn count(&self, done: Decommitted) {
        done.count(&self.decommit_calls, &self.decommit_ranges);
    }

    /// Takes a warm slot of `key`'s memory from this shard, ready for `wanted`; if none is warm
    /// but one waits in the decommit queue, runs the queue first: a batch run early costs less
    /// than a slot set up again, and a thread that went to another shard for its slot would
    /// give it back there, sharing that shard's locks from then on.
    pub fn take_own(&self, key: MemoryKey, wanted: &Wanted<'_>) -> Option<Result<Lease>> {
        self.memories.take(key, wanted, Choose::Own).or_else(|| {
            self.queued(key)
                .and_then(|keeps| self.take_queued(key, wanted, keeps, None))
        })
    }

    /// What a slot of `key`'s memory that waits in the decommit queue keeps, if one waits.
    pub fn queued(&self, key: MemoryKey) -> Option<Keeps> {
        self.queue.find(|held| match &held.done {
            Done::Memory(reset) if reset.key() == key => Some(reset.keeps()),
            _ => None,
        })
    }

    /// For a slot of `key`'s memory that waits in the decommit queue and `keeps` what
    /// [`queued`](Self::queued) said: if it keeps no page, another slot of the kind `another`
    /// allows (a module instantiated over and over then gets the slots it needs to wait out a
    /// batch, rather than run the queue at every instantiation); or else the queue runs and a
    /// warm slot of `key` is taken (see [`take_own`](Self::take_own)).
    pub fn take_queued(
        &self,
        key: MemoryKey,
        wanted: &Wanted<'_>,
        keeps: Keeps,
        another: Option<Choose>,
    ) -> Option<Result<Lease>> {
        another
            .filter(|_| keeps == Keeps::Nothing)
            .and_then(|choose| self.memories.take(key, wanted, choose))
            .or_else(|| {
                self.flush()
                    .then(|| self.memories.take(key, wanted, Choose::Own))
                    .flatten()
            })
    }

    /// Runs every queued decommit now. Returns whether anything was queued.
    pub fn flush(&self) -> bool {
        let mut counted = None;
        let batch = self.queue.take_all(|n| counted = Some(self.count_in_flight(n)));
        if batch.is_empty() {
            return false;
        }
        self.run(batch);
        drop(counted);
        true
    }
}

/// This thread's home shard among `shards` (its lane: see [`berth_core::sync::thread_lane`]).
pub(crate) fn home(shards: usize) -> usize {
    berth_core::sync::thread_lane(shards)
}

/// Splits `total` slots into `shards` chunks of (nearly) equal size: shard `i` holds
/// `chunk * i .. min(chunk * (i + 1), total)`.
pub(crate) fn chunk(total: u32, shards: usize) -> u32 {
    let shards = u32::try_from(shards.max(1)).unwrap_or(u32::MAX);
    total.div_ceil(shards).max(1)
}
