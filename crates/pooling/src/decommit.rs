//! Decommits that wait for a batch.
//!
//! A reset does everything at once but give pages back to the kernel: the ranges to decommit
//! are queued with the slot they belong to, which stays held (handed to no one) until they have
//! run. Once a queue holds `batch` ranges, one system call decommits them all
//! ([`sys::decommit_all`]), and each slot is finished. Why: one `madvise` per reset pays a
//! system call and, with other threads running, a TLB shootdown each; a batch pays both once
//! (see docs/pooling.md).

use std::ops::Range;
use std::sync::Mutex;

use berth_core::sys;

use crate::reset::BLIND_RUNS;

/// The page-aligned address ranges a reset leaves to decommit: the gaps around a blind slot's
/// kept runs (at most [`BLIND_RUNS`] of them), or everything from where the budget ran out.
///
/// Whether they are expected to hold pages decides who pays: ranges a blind reset gives back
/// are usually empty, and cheap to give back in a batch; ranges a scan found written are not,
/// and the deallocation that leaves them pays for them at once, so that no other deallocation
/// pays for many.
#[derive(Debug, Default)]
pub(crate) struct Decommits {
    ranges: [Range<usize>; BLIND_RUNS + 1],
    len: usize,
    /// The ranges hold pages a tenant wrote.
    dirty: bool,
}

impl Decommits {
    /// Ranges a blind reset gives back (batched).
    pub fn blind() -> Decommits {
        Decommits::default()
    }

    /// Ranges a scan found written (given back at once).
    pub fn dirty() -> Decommits {
        Decommits {
            dirty: true,
            ..Decommits::default()
        }
    }

    /// Adds a range (an empty one is ignored).
    ///
    pub fn push(&mut self, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        if self.len == self.ranges.len() {
            // Not reached (resets push no more than it holds); should it be, one range over
            // the last and this one gives back more than asked, which is still a reset.
            debug_assert!(false, "more decommit ranges than a reset leaves");
            let last = &mut self.ranges[self.len - 1];
            *last = last.start.min(range.start)..last.end.max(range.end);
            return;
        }
        self.ranges[self.len] = range;
        self.len += 1;
    }

    pub fn as_slice(&self) -> &[Range<usize>] {
        &self.ranges[..self.len]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the ranges hold pages a tenant wrote, to be given back at once.
    pub fn is_dirty(&self) -> bool {
        self.dirty && self.len > 0
    }

    /// Forgets the ranges (tests inject a failed decommit this way).
    #[cfg(test)]
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// A held slot (`T` says which, and what it becomes) and what must be decommitted before it
/// is finished.
pub(crate) type Pending<T> = (T, Decommits);

/// Held slots waiting for a batch of decommits.
#[derive(Debug)]
pub(crate) struct DecommitQueue<T> {
    batch: usize,
    queue: Mutex<Batch<T>>,
}

#[derive(Debug)]
struct Batch<T> {
    pending: Vec<Pending<T>>,
    ranges: usize,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch {
            pending: Vec::new(),
            ranges: 0,
        }
    }
}

impl<T> DecommitQueue<T> {
    /// A queue that runs once it holds `batch` ranges.
    pub fn new(batch: usize) -> Self {
        DecommitQueue {
            batch,
            queue: Mutex::new(Batch::default()),
        }
    }

    /// Whether decommits wait for a batch at all (with a batch of 1 they run at once).
    pub fn batches(&self) -> bool {
        self.batch > 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Batch<T>> {
        // Nothing can be left half-updated by a panic (a push and a count): carry on.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `pending`. Returns the whole queue, to run now, once it holds a batch; `queued`
    /// is called with how many slots leave the queue that way, under its lock (so a count of
    /// slots in flight never misses one).
    pub fn push(&self, pending: Pending<T>, queued: impl FnOnce(usize)) -> Option<Vec<Pending<T>>> {
        let mut queue = self.lock();
        queue.ranges += pending.1.as_slice().len();
        queue.pending.push(pending);
        if queue.ranges < self.batch {
            return None;
        }
        queued(queue.pending.len());
        let next = Batch {
            pending: Vec::with_capacity(self.batch),
            ranges: 0,
        };
        Some(std::mem::replace(&mut *queue, next).pending)
    }

    /// Takes everything queued, to run now; `queued` as in [`push`](Self::push) (not called
    /// when nothing is queued).
    pub fn take_all(&self, queued: impl FnOnce(usize)) -> Vec<Pending<T>> {
        let mut queue = self.lock();
        if queue.pending.is_empty() {
            return Vec::new();
        }
        queued(queue.pending.len());
        std::mem::take(&mut *queue).pending
    }
}

/// Decommits the ranges of one held slot (none: no system call) and hands the slot to
/// `finish` with whether that worked. Returns how many ranges were given to the kernel.
///
/// # Safety
///
/// As for [`run`].
pub(crate) unsafe fn run_one<T>((slot, decommits): Pending<T>, finish: impl FnOnce(T, bool)) -> u64 {
    let ranges = decommits.as_slice();
    // SAFETY: per the caller, every range is a held slot's, inside the pool's private mapping.
    let done = ranges.is_empty() || unsafe { sys::decommit_all(ranges) }.is_ok();
    finish(slot, done);
    ranges.len() as u64
}

/// Decommits the ranges of `batch` in one system call (per 64 ranges) and hands each slot to
/// `finish` with whether its ranges were decommitted. If the call fails, each slot's ranges are
/// tried on their own, so one bad range costs only its own slot. Returns how many ranges were
/// given to the kernel.
///
/// # Safety
///
/// Every range came from [`SlotBytes::address_range`](crate::slot_bytes::SlotBytes) of a slot
/// the caller holds (no tenant, no other thread touches it) until `finish` is called for it.
pub(crate) unsafe fn run<T>(batch: Vec<Pending<T>>, mut finish: impl FnMut(T, bool)) -> u64 {
    let all: Vec<Range<usize>> = batch
        .iter()
        .flat_map(|(_, decommits)| decommits.as_slice().iter().cloned())
        .collect();
    let mut calls = all.len() as u64;
    // SAFETY: per the caller, every range is a held slot's, inside the pool's private mapping.
    let done = all.is_empty() || unsafe { sys::decommit_all(&all) }.is_ok();
    for (slot, decommits) in batch {
        let ranges = decommits.as_slice();
        let ok = done || {
            calls += ranges.len() as u64;
            // SAFETY: as above, for this slot's ranges alone.
            unsafe { sys::decommit_all(ranges) }.is_ok()
        };
        finish(slot, ok);
    }
    calls
}
