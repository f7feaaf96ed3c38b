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

use crate::kept::BLIND_RUNS;

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

/// The most batches a queue holds while other threads are decommitting: past that, a thread
/// waits for its turn rather than hold more slots back.
const DEFERRED: usize = 4;

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
        berth_core::sync::lock_spinning(&self.queue)
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

    /// Puts back a batch [`push`](Self::push) returned, which could not run now (another
    /// thread was decommitting), ahead of what was queued since; `requeued` is called under the
    /// lock once it is back (so a count of slots in flight never misses one). Returns it
    /// instead if the queue would then hold more than [`DEFERRED`] batches: it must run now.
    pub fn requeue(&self, batch: Vec<Pending<T>>, requeued: impl FnOnce()) -> Result<(), Vec<Pending<T>>> {
        let mut queue = self.lock();
        let ranges: usize = batch.iter().map(|p| p.1.as_slice().len()).sum();
        if queue.ranges + ranges > self.batch * DEFERRED {
            return Err(batch);
        }
        queue.ranges += ranges;
        let later = std::mem::replace(&mut queue.pending, batch);
        queue.pending.extend(later);
        requeued();
        Ok(())
    }

    /// The first `Some` that `look` finds among the queued slots.
    pub fn find<R>(&self, look: impl Fn(&T) -> Option<R>) -> Option<R> {
        self.lock().pending.iter().find_map(|(slot, _)| look(slot))
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

/// [`run`], unless another thread of the process is decommitting now: then nothing runs and
/// the batch comes back.
///
/// # Safety
///
/// Every range came from [`SlotBytes::address_range`](crate::slot_bytes::SlotBytes) of a slot
/// the caller holds (no tenant, no other thread touches it) until `finish` is called for it.
pub(crate) unsafe fn try_run<T>(
    batch: Vec<Pending<T>>,
    finish: impl FnMut(T, bool),
) -> Result<u64, Vec<Pending<T>>> {
    let all = ranges_of(&batch);
    // SAFETY: per the caller, every range is a held slot's, inside the pool's private mapping,
    // with nothing referring into it.
    match unsafe { sys::try_decommit_all(&all) } {
        Ok(false) => Err(batch),
        // SAFETY: the caller's obligations are `settle`'s.
        done => Ok(unsafe { settle(batch, done.is_ok(), all.len(), finish) }),
    }
}

/// [`run_one`], unless another thread of the process is decommitting now: then nothing runs
/// and the slot comes back.
///
/// # Safety
///
/// Every range of `pending` came from [`SlotBytes::address_range`](crate::slot_bytes::SlotBytes)
/// of a slot the caller holds (no tenant, no other thread touches it) until `finish` is called
/// for it.
#[expect(
    clippy::result_large_err,
    reason = "the slot comes back by value, as it went in: boxing it would allocate per release"
)]
pub(crate) unsafe fn try_run_one<T>(
    pending: Pending<T>,
    finish: impl FnOnce(T, bool),
) -> Result<u64, Pending<T>> {
    let calls = pending.1.as_slice().len() as u64;
    // SAFETY: per the caller, every range is a held slot's, inside the pool's private mapping,
    // with nothing referring into it.
    match unsafe { sys::try_decommit_all(pending.1.as_slice()) } {
        Ok(false) => Err(pending),
        done => {
            finish(pending.0, done.is_ok());
            Ok(calls)
        }
    }
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
pub(crate) unsafe fn run<T>(batch: Vec<Pending<T>>, finish: impl FnMut(T, bool)) -> u64 {
    let all = ranges_of(&batch);
    // SAFETY: per the caller, every range is a held slot's, inside the pool's private mapping,
    // with nothing referring into it.
    let done = all.is_empty() || unsafe { sys::decommit_all(&all) }.is_ok();
    // SAFETY: the caller's obligations are `settle`'s.
    unsafe { settle(batch, done, all.len(), finish) }
}

/// Every range of a batch, in order.
fn ranges_of<T>(batch: &[Pending<T>]) -> Vec<Range<usize>> {
    batch
        .iter()
        .flat_map(|(_, decommits)| decommits.as_slice().iter().cloned())
        .collect()
}

/// Finishes the slots of a batch whose `calls` ranges were given to the kernel in one call:
/// all decommitted if `done`, else each slot's ranges are tried on their own. Returns how many
/// ranges were given to the kernel in all.
///
/// # Safety
///
/// Every range came from [`SlotBytes::address_range`](crate::slot_bytes::SlotBytes) of a slot
/// the caller holds (no tenant, no other thread touches it) until `finish` is called for it.
unsafe fn settle<T>(
    batch: Vec<Pending<T>>,
    done: bool,
    calls: usize,
    mut finish: impl FnMut(T, bool),
) -> u64 {
    let mut calls = calls as u64;
    for (slot, decommits) in batch {
        let ranges = decommits.as_slice();
        let ok = done || ranges.is_empty() || {
            calls += ranges.len() as u64;
            // SAFETY: per the caller, this slot's ranges are its own, inside the pool's
            // private mapping, with nothing referring into them.
            unsafe { sys::decommit_all(ranges) }.is_ok()
        };
        finish(slot, ok);
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(range: Range<usize>) -> Decommits {
        let mut decommits = Decommits::blind();
        decommits.push(range);
        decommits
    }

    #[test]
    fn a_batch_that_could_not_run_goes_back_ahead_of_later_slots_until_the_queue_is_long() {
        let queue = DecommitQueue::new(2);
        assert!(queue.push((1, one(0..1)), |_| {}).is_none());
        let batch = queue
            .push((2, one(1..2)), |n| assert_eq!(n, 2))
            .expect("a full batch");
        assert!(queue.push((3, one(2..3)), |_| {}).is_none());
        let mut requeued = false;
        assert!(queue.requeue(batch, || requeued = true).is_ok());
        assert!(requeued, "slots back in the queue stop counting in flight");
        let all: Vec<usize> = queue.take_all(|_| {}).into_iter().map(|p| p.0).collect();
        assert_eq!(
            all,
            [1, 2, 3],
            "the batch runs first, then what was queued after it"
        );
        // Up to `DEFERRED` batches wait; past that, a batch must run now.
        let waiting: Vec<_> = (0..2 * DEFERRED).map(|slot| (slot, one(0..1))).collect();
        assert!(queue.requeue(waiting, || {}).is_ok());
        let late = vec![(99, one(0..1))];
        assert!(queue.requeue(late, || panic!("not requeued")).is_err());
    }
}
