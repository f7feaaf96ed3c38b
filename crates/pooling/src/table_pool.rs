//! The table pool: one read-write slab of equal table slots, free slots reused last-in
//! first-out (the most recently reset slot is the most likely to be resident).
//!
//! Reset: the first `table_keep_resident` bytes by `memset`, the rest of what the tenant could
//! have written by `madvise(MADV_DONTNEED)` (batched by the shard); if that fails, by `memset`
//! too. A table slot is
//! always entirely zero when handed out.

use std::ops::Range;
use std::ptr::NonNull;
use std::sync::Mutex;

use crate::layout::PoolLayout;
use crate::shard::Decommits;
use crate::slots::SlotId;

/// A table slot taken back from a tenant, to be reset.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TableReset {
    pub slot: SlotId,
    /// Bytes the tenant could have written (its size at deallocation, in bytes).
    pub dirty: usize,
}

#[derive(Debug)]
struct State {
    free: Vec<SlotId>,
    resident: Vec<usize>,
    idle_resident: usize,
}

/// The table pool.
///
/// Invariant: every word of a free slot is zero; a slot's words are touched only by its tenant
/// while it is handed out and by the thread resetting it until `finish`.
#[derive(Debug)]
pub(crate) struct TablePool {
    /// Slot 0 of the whole slab (this shard's slots start at `first`).
    first_slot: NonNull<u8>,
    first: SlotId,
    layout: PoolLayout,
    state: Mutex<State>,
}

// SAFETY: `first_slot` points into the allocator's slab, which outlives every shard; slot words
// are reached only under the invariant above.
unsafe impl Send for TablePool {}
// SAFETY: as above; shared state is behind a `Mutex`.
unsafe impl Sync for TablePool {}

impl TablePool {
    /// A shard of the slab holding slots `slots` of the slab whose slot 0 is at `first_slot`.
    pub fn new(layout: &PoolLayout, first_slot: NonNull<u8>, slots: std::ops::Range<SlotId>) -> TablePool {
        let len = slots.end - slots.start;
        TablePool {
            first_slot,
            first: slots.start,
            layout: layout.clone(),
            state: Mutex::new(State {
                free: slots.rev().collect(),
                resident: vec![0; len as usize],
                idle_resident: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The first word of `slot`.
    pub fn slot_base(&self, slot: SlotId) -> NonNull<usize> {
        if self.layout.table_stride == 0 {
            // Slots of no elements: nothing is ever read or written through this.
            return NonNull::dangling();
        }
        // SAFETY: `slot < table_slots`, so the offset is inside the mapping; slots are
        // page-aligned, so word-aligned.
        unsafe {
            self.first_slot
                .add(slot as usize * self.layout.table_stride)
                .cast()
        }
    }

    /// Elements a slot holds.
    pub fn capacity(&self) -> usize {
        self.layout.table_stride / size_of::<usize>()
    }

    pub fn take(&self) -> Option<SlotId> {
        let mut state = self.lock();
        let slot = state.free.pop()?;
        let index = (slot - self.first) as usize;
        state.idle_resident -= state.resident[index];
        state.resident[index] = 0;
        Some(slot)
    }

    /// Zeroes the first `table_keep_resident` bytes the tenant could have written; returns the
    /// resident bytes kept and the rest to decommit (addresses, page-aligned), if any.
    pub fn reset(&self, job: &TableReset) -> (usize, Decommits) {
        let base = self.slot_base(job.slot).cast::<u8>();
        let page = self.layout.page_size;
        let dirty = job.dirty.min(self.layout.table_stride);
        let keep = self.layout.table_keep_resident;
        let zeroed = dirty.min(keep);
        // SAFETY: the slot was given back and is not in the free list, so this thread alone
        // touches it; `zeroed` bytes are inside the read-write slot.
        unsafe { base.as_ptr().write_bytes(0, zeroed) };
        if dirty <= keep {
            return (dirty.next_multiple_of(page).min(keep), Decommits::default());
        }
        // `keep` is a multiple of the page size.
        let end = dirty.next_multiple_of(page).min(self.layout.table_stride);
        let start = base.as_ptr().addr();
        (keep, Decommits::one(start + keep..start + end))
    }

    /// Returns a reset slot to the free list. `failed` is a range its decommit could not give
    /// back: it is zeroed here instead.
    pub fn finish(&self, slot: SlotId, resident: usize, failed: Option<Range<usize>>) {
        if let Some(range) = failed {
            let base = self.slot_base(slot).cast::<u8>();
            let from = range.start - base.as_ptr().addr();
            debug_assert!(from + range.len() <= self.layout.table_stride);
            // SAFETY: the slot is still not in the free list, so this thread alone touches it;
            // `range` came from `reset` for this slot, inside its read-write bytes.
            unsafe { base.add(from).as_ptr().write_bytes(0, range.len()) };
        }
        let mut state = self.lock();
        state.resident[(slot - self.first) as usize] = resident;
        state.idle_resident += resident;
        state.free.push(slot);
    }

    /// Resident bytes in idle slots.
    pub fn idle_resident(&self) -> usize {
        self.lock().idle_resident
    }
}
