//! Decommits that wait for a batch.
//!
//! A reset does everything at once but give pages back to the kernel: the ranges to decommit
//! are queued with the slot they belong to, which stays held (handed to no one) until they have
//! run. Once a queue holds the slots of `batch` deallocations (or about [`BOUND_RANGES`]
//! ranges), one system call decommits them all ([`sys::decommit_all`]), and each slot is
//! finished. Why: one `madvise` per reset pays a system call and, with other threads running, a
//! TLB shootdown each; a batch pays both once (see docs/pooling.md). Counting deallocations
//! rather than ranges means a slot that keeps several runs, and so leaves several gaps, waits
//! as long as one that leaves one, and an instance with several memories as long as one with
//! one: one deallocation in `batch` runs the batch, not every other one.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use berth_core::sys;

use crate::kept::BLIND_RUNS;

/// What giving ranges back to the kernel took: system calls and ranges, for the statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Decommitted {
    pub calls: u64,
    pub ranges: u64,
}

impl Decommitted {
    /// The outcome of one `sys::decommit_all` of `ranges` ranges (a failed one counted as one
    /// call).
    fn of(ranges: usize, result: &std::io::Result<u64>) -> Decommitted {
        Decommitted {
            calls: *result.as_ref().unwrap_or(&1),
            ranges: ranges as u64,
        }
    }

    /// Adds these to a pair of counters.
    pub fn count(self, calls: &AtomicU64, ranges: &AtomicU64) {
        calls.fetch_add(self.calls, Ordering::Relaxed);
        ranges.fetch_add(self.ranges, Ordering::Relaxed);
    }
}

impl std::ops::AddAssign for Decommitted {
    fn add_assign(&mut self, other: Decommitted) {
        self.calls += other.calls;
        self.ranges += other.ranges;
    }
}

/// The page-aligned address ranges a reset leaves to decommit: the gaps around a blind slot's
/// kept runs (at most [`BLIND_RUNS`] of them), or everything from where the budget ran out.
///
/// Whether they are expected to hold pages decides who pays: ranges a blind reset gives back
/// are usually empty, and cheap to give back in a batch; ranges a scan found written are not,
/// and the deallocation that leaves them pays for them at once, so that no other deallocation
/// pays for many. The gaps of a slot that keeps many pages go at once as well (see
/// [`Kind::AtOnce`]).
#[derive(Debug)]
pub(crate) struct Decommits {
    ranges: [Range<usize>; BLIND_RUNS + 1],
    len: usize,
    /// The deallocation that leaves them gives them back (see [`Kind::AtOnce`]).
    at_once: bool,
    /// The ranges may lie in populated page tables (around pages the slot keeps, or where a
    /// tenant wrote), which the kernel walks: they count toward a batch's bound on ranges.
    walked: bool,
    /// The slot is the first its instance's deallocation gives back (an instance with several
    /// memories gives back several slots, one after the other): batches count deallocations.
    opens: bool,
}

/// What a slot's decommits are for, which decides who gives them back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Ranges a blind reset gives back (batched), around pages the slot keeps.
    Blind,
    /// What a blind reset gives back of a slot that keeps no page, whose scans found nothing
    /// written: its memory, where no page table is left to walk (the kernel frees a page table
    /// that a decommit empties). Such ranges cost the call about a third of a microsecond each,
    /// and count only toward a batch's [`MAX_RANGES`], not its [`BOUND_RANGES`].
    Idle,
    /// Ranges the deallocation that leaves them gives back, rather than a batch: those a scan
    /// found written (or a churning slot's tenant wrote), which hold pages, and the gaps of a
    /// slot that keeps many pages. Such a slot, finished at once, is the one the module's next
    /// tenant gets, with its pages still in the core's cache; waiting for a batch, it would
    /// leave its module's tenants turning over three slots or more, whose kept pages together
    /// outgrow the cache, and each reset would read its kept pages from further away (see
    /// `reset::CACHED`).
    AtOnce,
}

impl Decommits {
    /// No ranges yet, of `kind`; the slot opens a deallocation unless
    /// [`continues_deallocation`](Self::continues_deallocation) says otherwise.
    pub fn new(kind: Kind) -> Decommits {
        let mut decommits = Decommits {
            ranges: Default::default(),
            len: 0,
            at_once: false,
            walked: true,
            opens: true,
        };
        decommits.restart(kind);
        decommits
    }

    /// Starts over as `kind`, with no range. A reset fills the decommits its caller holds in
    /// place this way, since at 160 bytes each move of them is a call to `memcpy`.
    pub fn restart(&mut self, kind: Kind) {
        self.len = 0;
        self.at_once = kind == Kind::AtOnce;
        self.walked = kind != Kind::Idle;
    }

    /// Marks the slot as one its instance's deallocation gives back after another.
    pub fn continues_deallocation(&mut self) {
        self.opens = false;
    }

    /// The ranges that count toward a batch's bound on ranges.
    fn walked_len(&self) -> usize {
        if self.walked { self.len } else { 0 }
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

    /// How many more ranges it holds.
    pub fn room(&self) -> usize {
        self.ranges.len() - self.len
    }

    pub fn as_slice(&self) -> &[Range<usize>] {
        &self.ranges[..self.len]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether there are ranges, to be given back at once.
    pub fn runs_at_once(&self) -> bool {
        self.at_once && self.len > 0
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
/// Ranges in populated page tables (all but [`Kind::Idle`] slots') that a batch of the slots
/// of [`BOUNDED`] deallocations or more holds at most: each costs the deallocation that runs
/// the batch a microsecond or more here (the gaps around the kept pages of a slot with an
/// image, or of one whose tenants write all over a large memory), where an idle slot's range
/// costs a third of one, so this bounds what that one deallocation pays. A slot whose ranges
/// would carry such a batch past it starts the next one.
const BOUND_RANGES: usize = 8;
/// Deallocations a batch holds the slots of before [`BOUND_RANGES`] applies: with three, at
/// most one deallocation in three pays for a batch, so a module's median deallocation pays
/// nothing, where a batch of two would have every other one pay.
const BOUNDED: usize = 3;
/// Ranges from which a batch runs whatever it holds: the slots of two deallocations that
/// leave 8 or 9 gaps each, or of a few instances with several memories each.
const MAX_RANGES: usize = 2 * BOUND_RANGES;

/// A held slot in a batch (`T` says which, and what it becomes), and how many of the batch's
/// ranges, following those of the slots before it, are its own.
type Queued<T> = (T, usize);

/// Held slots waiting for a batch of decommits, with all their ranges in order.
///
/// A batch leaves the queue whole and its vectors come back empty
/// ([`DecommitQueue::recycle`]), so slots pass through the queue without a heap allocation:
/// with two threads, a vector one allocates and the other frees takes the first one's
/// allocator lock, and the two threads then sleep on it (seen with glibc's `malloc`).
///
/// Invariant: `ranges` is the concatenation of the pending slots' ranges, each slot's count
/// of them beside it, and `walked` and `deallocations` are sums over their [`Decommits`]
/// (kept so that a push needs no walk of the queue); only [`add`](Self::add),
/// [`append`](Self::append) and [`clear`](Self::clear) change these fields. A slot's
/// [`Decommits`] is not kept: its ranges are copied in, and the slot moves in alone (with its
/// decommits it would be over 300 bytes, each move a call to `memcpy`).
#[derive(Debug)]
pub(crate) struct Batch<T> {
    pending: Vec<Queued<T>>,
    ranges: Vec<Range<usize>>,
    /// How many of `ranges` count toward the bound on ranges ([`Kind::Idle`] slots' do not).
    walked: usize,
    /// Deallocations the slots come from (see [`Decommits::continues_deallocation`]).
    deallocations: usize,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch::with_room(0, 0)
    }
}

impl<T> Batch<T> {
    /// Held slots in the batch.
    pub fn slots(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn add(&mut self, slot: T, decommits: &Decommits) {
        self.ranges.extend_from_slice(decommits.as_slice());
        self.walked += decommits.walked_len();
        self.deallocations += usize::from(decommits.opens);
        self.pending.push((slot, decommits.len));
    }

    /// Moves every slot of `later` after this batch's, leaving `later` empty.
    fn append(&mut self, later: &mut Batch<T>) {
        self.pending.append(&mut later.pending);
        self.ranges.append(&mut later.ranges);
        self.walked += std::mem::take(&mut later.walked);
        self.deallocations += std::mem::take(&mut later.deallocations);
    }

    /// Forgets every slot and range, keeping the vectors' room.
    fn clear(&mut self) {
        self.pending.clear();
        self.ranges.clear();
        self.walked = 0;
        self.deallocations = 0;
    }

    /// Room for `slots` slots and `ranges` ranges without reallocating.
    fn with_room(slots: usize, ranges: usize) -> Self {
        Batch {
            pending: Vec::with_capacity(slots),
            ranges: Vec::with_capacity(ranges),
            walked: 0,
            deallocations: 0,
        }
    }
}

/// Held slots waiting for a batch of decommits.
#[derive(Debug)]
pub(crate) struct DecommitQueue<T> {
    batch: usize,
    queue: Mutex<Queue<T>>,
}

#[derive(Debug)]
struct Queue<T> {
    waiting: Batch<T>,
    /// Empty vectors with room for a batch, for `waiting` once it leaves.
    spare: Batch<T>,
}

impl<T> DecommitQueue<T> {
    /// A queue that runs once it holds the slots of `batch` deallocations, or about
    /// [`BOUND_RANGES`] ranges (see [`push`](Self::push)).
    pub fn new(batch: usize) -> Self {
        // Room for a batch (the push that fills it may bring `BLIND_RUNS + 1` ranges), and for
        // what may wait while other threads decommit, so that requeued batches allocate
        // nothing either (vectors that grow past it keep their room when recycled).
        let slots = batch.saturating_mul(DEFERRED).min(64);
        let ranges = (MAX_RANGES + BLIND_RUNS) * DEFERRED;
        DecommitQueue {
            batch,
            queue: Mutex::new(Queue {
                waiting: Batch::with_room(slots, ranges),
                spare: Batch::with_room(slots, ranges),
            }),
        }
    }

    /// Whether decommits wait for a batch at all (with a batch of 1 they run at once).
    pub fn batches(&self) -> bool {
        self.batch > 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<T>> {
        // Nothing can be left half-updated by a panic (a push and a count): carry on.
        berth_core::sync::lock_spinning(&self.queue)
    }

    /// Queues `slot` with its `decommits`. Returns the whole queue, to run now, once it holds
    /// a batch: the slots of `batch` deallocations, or [`BOUND_RANGES`] ranges in populated
    /// page tables from [`BOUNDED`] deallocations or more, or [`MAX_RANGES`] ranges; or,
    /// without `slot` (which then waits alone), when its decommits would carry a queue of
    /// [`BOUNDED`] deallocations or more past [`BOUND_RANGES`]. `queued` is called with how
    /// many slots leave the queue that way, under its lock (so a count of slots in flight
    /// never misses one).
    pub fn push(&self, slot: T, decommits: &Decommits, queued: impl FnOnce(usize)) -> Option<Batch<T>> {
        let mut queue = self.lock();
        let waiting = &queue.waiting;
        if waiting.deallocations >= BOUNDED && waiting.walked + decommits.walked_len() > BOUND_RANGES {
            queued(waiting.slots());
            let full = queue.leave();
            queue.waiting.add(slot, decommits);
            return Some(full);
        }
        queue.waiting.add(slot, decommits);
        let waiting = &queue.waiting;
        let full = waiting.deallocations >= self.batch
            || (waiting.deallocations >= BOUNDED && waiting.walked >= BOUND_RANGES)
            || waiting.ranges.len() >= MAX_RANGES;
        if !full {
            return None;
        }
        queued(waiting.slots());
        Some(queue.leave())
    }

    /// Puts back a batch [`push`](Self::push) returned, which could not run now (another
    /// thread was decommitting), ahead of what was queued since; `requeued` is called under the
    /// lock once it is back (so a count of slots in flight never misses one). Returns it
    /// instead if the queue would then hold more than [`DEFERRED`] batches: it must run now.
    pub fn requeue(&self, mut batch: Batch<T>, requeued: impl FnOnce()) -> Result<(), Batch<T>> {
        let mut queue = self.lock();
        if queue.waiting.slots() + batch.slots() > self.batch.saturating_mul(DEFERRED) {
            return Err(batch);
        }
        batch.append(&mut queue.waiting);
        let emptied = std::mem::replace(&mut queue.waiting, batch);
        queue.keep_spare(emptied);
        requeued();
        Ok(())
    }

    /// The first `Some` that `look` finds among the queued slots.
    pub fn find<R>(&self, look: impl Fn(&T) -> Option<R>) -> Option<R> {
        self.lock()
            .waiting
            .pending
            .iter()
            .find_map(|(slot, _)| look(slot))
    }

    /// Takes everything queued, to run now; `queued` as in [`push`](Self::push) (not called
    /// when nothing is queued).
    pub fn take_all(&self, queued: impl FnOnce(usize)) -> Batch<T> {
        let mut queue = self.lock();
        if queue.waiting.is_empty() {
            return Batch::default();
        }
        queued(queue.waiting.slots());
        queue.leave()
    }

    /// Takes back the vectors of a batch that has run (emptied by [`run`] or [`try_run`]).
    pub fn recycle(&self, batch: Batch<T>) {
        debug_assert!(batch.is_empty(), "only a batch that has run comes back");
        self.lock().keep_spare(batch);
    }
}

impl<T> Queue<T> {
    /// The waiting batch, leaving the spare vectors in its place.
    fn leave(&mut self) -> Batch<T> {
        let spare = std::mem::take(&mut self.spare);
        std::mem::replace(&mut self.waiting, spare)
    }

    /// Keeps an empty batch's vectors as the spare ones, if they have more room.
    fn keep_spare(&mut self, mut emptied: Batch<T>) {
        emptied.clear();
        if emptied.pending.capacity() > self.spare.pending.capacity() {
            self.spare = emptied;
        }
    }
}

/// Decommits the ranges of one held slot (none: no system call) and hands the slot to
/// `finish` with whether that worked.
///
/// # Safety
///
/// As for [`run`].
pub(crate) unsafe fn run_one<T>(slot: T, decommits: &Decommits, finish: impl FnOnce(T, bool)) -> Decommitted {
    let ranges = decommits.as_slice();
    if ranges.is_empty() {
        finish(slot, true);
        return Decommitted::default();
    }
    // SAFETY: per the caller, every range is a held slot's, inside the pool's private mapping.
    let result = unsafe { sys::decommit_all(ranges) };
    finish(slot, result.is_ok());
    Decommitted::of(ranges.len(), &result)
}

/// [`run`], unless another thread of the process is decommitting now: then nothing runs,
/// `batch` is left as it was and `None` comes back.
///
/// # Safety
///
/// Every range came from [`SlotBytes::address_range`](crate::slot_bytes::SlotBytes) of a slot
/// the caller holds (no tenant, no other thread touches it) until `finish` is called for it.
pub(crate) unsafe fn try_run<T>(batch: &mut Batch<T>, finish: impl FnMut(T, bool)) -> Option<Decommitted> {
    // SAFETY: per the caller, every range is a held slot's, inside the pool's private mapping,
    // with nothing referring into it.
    let result = match unsafe { sys::try_decommit_all(&batch.ranges) } {
        Ok(None) => return None,
        Ok(Some(calls)) => Ok(calls),
        Err(error) => Err(error),
    };
    // SAFETY: the caller's obligations are `settle`'s.
    Some(unsafe { settle(batch, &result, finish) })
}

/// [`run_one`], unless another thread of the process is decommitting now: then nothing runs
/// and the slot comes back.
///
/// # Safety
///
/// Every range of `decommits` came from
/// [`SlotBytes::address_range`](crate::slot_bytes::SlotBytes) of a slot the caller holds (no
/// tenant, no other thread touches it) until `finish` is called for it.
pub(crate) unsafe fn try_run_one<T>(
    slot: T,
    decommits: &Decommits,
    finish: impl FnOnce(T, bool),
) -> Result<Decommitted, T> {
    let ranges = decommits.as_slice();
    // SAFETY: per the caller, every range is a held slot's, inside the pool's private mapping,
    // with nothing referring into it.
    let result = match unsafe { sys::try_decommit_all(ranges) } {
        Ok(None) => return Err(slot),
        Ok(Some(calls)) => Ok(calls),
        Err(error) => Err(error),
    };
    finish(slot, result.is_ok());
    Ok(Decommitted::of(ranges.len(), &result))
}

/// Decommits the ranges of `batch` in one system call (per 64 ranges) and hands each slot to
/// `finish` with whether its ranges were decommitted, leaving `batch` empty. If the call
/// fails, each slot's ranges are tried on their own, so one bad range costs only its own slot.
///
/// # Safety
///
/// Every range came from [`SlotBytes::address_range`](crate::slot_bytes::SlotBytes) of a slot
/// the caller holds (no tenant, no other thread touches it) until `finish` is called for it.
pub(crate) unsafe fn run<T>(batch: &mut Batch<T>, finish: impl FnMut(T, bool)) -> Decommitted {
    let result = if batch.ranges.is_empty() {
        Ok(0)
    } else {
        // SAFETY: per the caller, every range is a held slot's, inside the pool's private
        // mapping, with nothing referring into it.
        unsafe { sys::decommit_all(&batch.ranges) }
    };
    // SAFETY: the caller's obligations are `settle`'s.
    unsafe { settle(batch, &result, finish) }
}

/// Finishes the slots of a batch whose ranges were given to the kernel in one call with
/// `result`, leaving it empty: all decommitted if it worked, else each slot's ranges are tried
/// on their own.
///
/// # Safety
///
/// Every range came from [`SlotBytes::address_range`](crate::slot_bytes::SlotBytes) of a slot
/// the caller holds (no tenant, no other thread touches it) until `finish` is called for it.
unsafe fn settle<T>(
    batch: &mut Batch<T>,
    result: &std::io::Result<u64>,
    mut finish: impl FnMut(T, bool),
) -> Decommitted {
    let mut total = if batch.ranges.is_empty() {
        Decommitted::default()
    } else {
        Decommitted::of(batch.ranges.len(), result)
    };
    let mut from = 0;
    for (slot, len) in batch.pending.drain(..) {
        let ranges = &batch.ranges[from..from + len];
        from += len;
        let ok = result.is_ok() || ranges.is_empty() || {
            // SAFETY: per the caller, this slot's ranges are its own, inside the pool's
            // private mapping, with nothing referring into them.
            let alone = unsafe { sys::decommit_all(ranges) };
            total += Decommitted::of(ranges.len(), &alone);
            alone.is_ok()
        };
        finish(slot, ok);
    }
    batch.clear();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(range: Range<usize>) -> Decommits {
        let mut decommits = Decommits::new(Kind::Blind);
        decommits.push(range);
        decommits
    }

    /// What a slot that keeps runs leaves to decommit: the gaps around them.
    fn gaps(n: usize) -> Decommits {
        let mut decommits = Decommits::new(Kind::Blind);
        for i in 0..n {
            decommits.push(2 * i..2 * i + 1);
        }
        decommits
    }

    /// The slots of the batch `push` returned.
    fn slots(batch: &Batch<usize>) -> Vec<usize> {
        batch.pending.iter().map(|p| p.0).collect()
    }

    /// What a slot that keeps nothing leaves: its memory, in no populated page table.
    fn idle(range: Range<usize>) -> Decommits {
        let mut decommits = Decommits::new(Kind::Idle);
        decommits.push(range);
        decommits
    }

    #[test]
    fn a_batch_is_a_count_of_deallocations_up_to_bounds_on_ranges() {
        // Slots that keep nothing (idle tenants): `batch` of them, their ranges unbounded.
        let queue = DecommitQueue::new(12);
        for slot in 0..11 {
            assert!(
                queue.push(slot, &idle(slot..slot + 1), |_| {}).is_none(),
                "slot {slot} of 12 waits"
            );
        }
        let batch = queue
            .push(11, &idle(11..12), |n| assert_eq!(n, 12))
            .expect("the twelfth slot fills the batch");
        assert_eq!(batch.ranges.len(), 12);
        // Slots that leave one range each around kept pages reach the bound on ranges in eight;
        // slots that leave two gaps, in four.
        for (gaps_each, last) in [(1, 7), (2, 3)] {
            for slot in 0..last {
                assert!(queue.push(slot, &gaps(gaps_each), |_| {}).is_none());
            }
            let batch = queue
                .push(last, &gaps(gaps_each), |n| assert_eq!(n, last + 1))
                .unwrap_or_else(|| panic!("{} slots of {gaps_each} gaps reach the bound", last + 1));
            assert_eq!(batch.ranges.len(), BOUND_RANGES);
        }
        // Slots that leave five or seven gaps: never fewer than three slots, so that at most
        // one deallocation in three runs a batch, past the bound if need be.
        for gaps_each in [5, 7] {
            for slot in 0..2 {
                assert!(queue.push(slot, &gaps(gaps_each), |_| {}).is_none());
            }
            let batch = queue
                .push(2, &gaps(gaps_each), |n| assert_eq!(n, 3))
                .expect("the third slot runs the batch");
            assert_eq!(batch.ranges.len(), 3 * gaps_each);
        }
        // Slots that leave nine gaps: two pass the most ranges any batch waits with.
        let queue = DecommitQueue::new(8);
        let per_slot = BLIND_RUNS + 1;
        assert!(queue.push(10, &gaps(per_slot), |_| {}).is_none());
        let batch = queue
            .push(11, &gaps(per_slot), |n| assert_eq!(n, 2))
            .expect("two slots of nine gaps pass the bound on ranges");
        assert!(batch.ranges.len() >= MAX_RANGES && batch.ranges.len() < MAX_RANGES + per_slot);
    }

    #[test]
    fn a_batch_counts_deallocations_not_the_slots_of_each() {
        // Instances of four idle memories: a batch of two deallocations holds eight slots.
        let queue = DecommitQueue::new(2);
        let instance = |queue: &DecommitQueue<usize>, first: usize| {
            let mut full = None;
            for slot in first..first + 4 {
                let mut decommits = idle(slot..slot + 1);
                if slot > first {
                    decommits.continues_deallocation();
                }
                if let Some(batch) = queue.push(slot, &decommits, |_| {}) {
                    assert!(full.is_none(), "one batch a deallocation");
                    full = Some(batch);
                }
            }
            full
        };
        assert!(instance(&queue, 0).is_none());
        // The second deallocation fills the batch with its first slot; its others wait.
        let batch = instance(&queue, 4).expect("two deallocations");
        assert_eq!(slots(&batch), [0, 1, 2, 3, 4]);
        assert_eq!(slots(&queue.take_all(|_| {})), [5, 6, 7]);
        // With a larger batch, the bound on all ranges stops it: four such instances.
        let queue = DecommitQueue::new(8);
        for first in [0, 4, 8] {
            assert!(instance(&queue, first).is_none());
        }
        let batch = instance(&queue, 12).expect("sixteen ranges");
        assert_eq!(batch.ranges.len(), MAX_RANGES);
    }

    #[test]
    fn a_slot_that_would_carry_a_batch_of_three_past_the_bound_starts_the_next_one() {
        let queue = DecommitQueue::new(8);
        for slot in 0..3 {
            assert!(queue.push(slot, &gaps(2), |_| {}).is_none());
        }
        // Six ranges wait; an idle slot's range does not count toward the bound.
        assert!(queue.push(3, &idle(100..101), |_| {}).is_none());
        // A slot of three more would make nine.
        let batch = queue
            .push(4, &gaps(3), |n| assert_eq!(n, 4))
            .expect("the four waiting slots run");
        assert_eq!(slots(&batch), [0, 1, 2, 3]);
        assert_eq!(batch.ranges.len(), 7);
        let rest = queue.take_all(|n| assert_eq!(n, 1));
        assert_eq!(slots(&rest), [4], "the slot waits alone for the next batch");
    }

    #[test]
    fn a_batch_that_could_not_run_goes_back_ahead_of_later_slots_until_the_queue_is_long() {
        let queue = DecommitQueue::new(2);
        assert!(queue.push(1, &one(0..1), |_| {}).is_none());
        let batch = queue
            .push(2, &one(1..2), |n| assert_eq!(n, 2))
            .expect("a full batch");
        assert!(queue.push(3, &one(2..3), |_| {}).is_none());
        let mut requeued = false;
        assert!(queue.requeue(batch, || requeued = true).is_ok());
        assert!(requeued, "slots back in the queue stop counting in flight");
        let all: Vec<usize> = queue.take_all(|_| {}).pending.into_iter().map(|p| p.0).collect();
        assert_eq!(
            all,
            [1, 2, 3],
            "the batch runs first, then what was queued after it"
        );
        // Up to `DEFERRED` batches wait; past that, a batch must run now.
        let mut waiting = Batch::default();
        for slot in 0..2 * DEFERRED {
            waiting.add(slot, &one(0..1));
        }
        assert!(queue.requeue(waiting, || {}).is_ok());
        let mut late = Batch::default();
        late.add(99, &one(0..1));
        assert!(queue.requeue(late, || panic!("not requeued")).is_err());
    }

    /// Counts this thread's heap allocations, for the test below.
    struct Counting;

    thread_local! {
        static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    // SAFETY: every call is forwarded to the system allocator unchanged; the count is a
    // thread-local `Cell` with a constant initializer and no destructor, so counting itself
    // never allocates.
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            // SAFETY: the caller's obligations are `System.alloc`'s.
            unsafe { std::alloc::System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            // SAFETY: `ptr` came from `alloc` above, that is from `System`, with `layout`.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    #[test]
    fn batches_pass_through_the_queue_without_allocating() {
        let queue = DecommitQueue::new(2);
        let cycle = |round: usize| {
            assert!(queue.push(round, &one(0..1), |_| {}).is_none());
            let mut batch = queue
                .push(round, &one(1..2), |n| assert_eq!(n, 2))
                .expect("a full batch");
            assert_eq!(batch.ranges, [0..1, 1..2]);
            // What `run` leaves of a batch.
            batch.pending.clear();
            batch.ranges.clear();
            queue.recycle(batch);
        };
        cycle(0);
        let before = ALLOCATIONS.with(std::cell::Cell::get);
        for round in 1..8 {
            cycle(round);
        }
        let after = ALLOCATIONS.with(std::cell::Cell::get);
        assert_eq!(
            after - before,
            0,
            "batches allocated: a vector freed by another thread takes the allocating thread's lock"
        );
    }
}
