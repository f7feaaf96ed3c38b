//! The table pool: one read-write slab of equal table slots, free slots reused last-in
//! first-out (the most recently reset slot is the most likely to be resident).
//!
//! Reset: the first `table_keep_resident` bytes by `memset`, the rest of what the tenant could
//! have written by `madvise(MADV_DONTNEED)`; if that fails, by `memset` too. A table slot is
//! always entirely zero when handed out.

use std::ptr::NonNull;
use std::sync::Mutex;

use berth_core::sys;

use crate::layout::PoolLayout;
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

    /// Zeroes what the tenant could have written; returns the resident bytes kept.
    pub fn reset(&self, job: &TableReset, decommits: &mut u64) -> usize {
        let base = self.slot_base(job.slot).cast::<u8>();
        let page = self.layout.page_size;
        let dirty = job.dirty.min(self.layout.table_stride);
        let keep = self.layout.table_keep_resident;
        if dirty <= keep {
            // SAFETY: the slot was given back and is not in the free list, so this thread
            // alone touches it; `dirty` bytes are inside the read-write slot.
            unsafe { base.as_ptr().write_bytes(0, dirty) };
            return dirty.next_multiple_of(page).min(keep);
        }
        // SAFETY: as above; `keep < dirty` bytes are inside the slot.
        unsafe { base.as_ptr().write_bytes(0, keep) };
        let end = dirty.next_multiple_of(page).min(self.layout.table_stride);
        *decommits += 1;
        // SAFETY: as above; `keep..end` is page-aligned (`keep` is a multiple of the page
        // size) and inside the slot.
        if unsafe { sys::decommit(base.add(keep), end - keep) }.is_err() {
            // SAFETY: as above.
            unsafe { base.add(keep).as_ptr().write_bytes(0, dirty - keep) };
        }
        keep
    }

    pub fn finish(&self, slot: SlotId, resident: usize) {
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
