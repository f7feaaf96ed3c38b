//! A shard's table slots: one read-write slab of equal slots, free slots reused last-in
//! first-out (the most recently reset slot is the most likely to be resident).
//!
//! Reset: what the tenant could have written (its final size) is zeroed in place with `memset`
//! up to `table_keep_resident` bytes and decommitted beyond them (at once); if the decommit
//! fails, zeroed too. Past the first [`ZEROED`] bytes, where the kernel has a page map, only
//! the pages it does not prove clean are touched (a large table is mostly never written:
//! zeroing its untouched pages would make them resident for nothing). A free slot is always
//! entirely zero.

use std::collections::TryReserveError;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::Mutex;

use anyhow::{Result, anyhow};
use berth_core::sys::PageMap;
use berth_core::{Released, human_bytes, sys};

use crate::decommit::{Decommits, Decommitted, Kind};
use crate::layout::PoolLayout;
use crate::reset;
use crate::slot_bytes::{Region, SlotBytes};
use berth_core::cranelift_entity::EntityRef;

use crate::slots::SlotId;

/// One table slot's state.
///
/// Invariant: a `Free` slot is in the free list and every word of it is zero, its first
/// `resident` bytes possibly resident (none past them); a `Held` slot's words are its tenant's;
/// a `Resetting` slot's are the resetting thread's until it is finished. Both carry the
/// `resident` bytes the slot had when taken: a reset leaves earlier tenants' pages below the
/// keep bound resident (zeroed), so it is free again with at least those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TableSlot {
    Free { resident: usize },
    Held { resident: usize },
    Resetting { resident: usize },
}

/// A table slot given back by its tenant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TableReset {
    /// The slot's global number.
    pub slot: u32,
    /// Bytes the tenant could have written (its size at deallocation, in bytes).
    pub dirty: usize,
}

/// A reset table slot waiting for its decommit.
#[derive(Debug)]
pub(crate) struct TableDone {
    slot: u32,
    /// Bytes kept resident (zeroed).
    resident: usize,
    /// Offsets left to decommit, zeroed instead if that fails.
    rest: Range<usize>,
}

/// Bytes of bookkeeping `slots` table slots need (reserved when the pool is built).
pub(crate) fn bookkeeping_bytes(slots: u32) -> u64 {
    u64::from(slots).saturating_mul((size_of::<TableSlot>() + size_of::<SlotId>()) as u64)
}

#[derive(Debug)]
struct State {
    /// Slots `slots.len()..len` were never used: free, zero, nothing resident.
    slots: Vec<TableSlot>,
    len: u32,
    /// Used slots that are free; the last one goes first, then the never-used ones in order.
    free: Vec<SlotId>,
    /// The resident bytes of free slots, summed.
    idle_resident: usize,
}

impl State {
    fn new(len: u32) -> Result<State, TryReserveError> {
        let mut slots = Vec::new();
        slots.try_reserve_exact(len as usize)?;
        let mut free = Vec::new();
        free.try_reserve_exact(len as usize)?;
        Ok(State {
            slots,
            len,
            free,
            idle_resident: 0,
        })
    }

    fn take(&mut self) -> Option<SlotId> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if self.slots.len() < self.len as usize => {
                // Within the capacity reserved in `new`: no allocation.
                self.slots.push(TableSlot::Free { resident: 0 });
                SlotId::from_u32(u32::try_from(self.slots.len() - 1).ok()?)
            }
            None => return None,
        };
        let state = &mut self.slots[slot.index()];
        let TableSlot::Free { resident } = *state else {
            panic!("table slot {slot} taken while {state:?}");
        };
        self.idle_resident -= resident;
        *state = TableSlot::Held { resident };
        Some(slot)
    }

    fn release(&mut self, slot: SlotId) {
        let state = &mut self.slots[slot.index()];
        let TableSlot::Held { resident } = *state else {
            panic!("table slot {slot} given back while {state:?}");
        };
        *state = TableSlot::Resetting { resident };
    }

    /// A slot `held` (else `Resetting`) is free again, its first `resident` bytes resident
    /// besides those it had when taken.
    fn free(&mut self, slot: SlotId, resident: usize, held: bool) {
        let state = &mut self.slots[slot.index()];
        let before = match *state {
            TableSlot::Held { resident } if held => resident,
            TableSlot::Resetting { resident } if !held => resident,
            _ => panic!("table slot {slot} freed while {state:?}"),
        };
        let resident = resident.max(before);
        *state = TableSlot::Free { resident };
        self.idle_resident += resident;
        self.free.push(slot);
    }

    /// The set-up of a `Held` slot was given up before its tenant got it: free again, as it
    /// was taken.
    fn abandon(&mut self, slot: SlotId) {
        self.free(slot, 0, true);
    }
}

/// One shard's table slots.
#[derive(Debug)]
pub(crate) struct TablePool {
    /// Every slot of the slab (this shard's are `first..`).
    region: Region,
    first: u32,
    layout: PoolLayout,
    /// Whether resets may ask the kernel which pages were written (`pagemap_scan`).
    use_page_map: bool,
    state: Mutex<State>,
}

/// Bytes at a table slot's start that a reset zeroes without asking the kernel: a table's first
/// elements are the ones modules fill, and up to this size zeroing all of them costs less than
/// a `PAGEMAP_SCAN` and zeroing the pages it reports (measured on a 10 000-element table whose
/// segment fills 5 000, 80 000 bytes: a cycle of 2.0 to 4.2 µs zeroing them all, 3.6 to 5.6 µs
/// scanning past 16 KiB, in alternating runs on an AMD EPYC).
const ZEROED: usize = 128 << 10;

impl TablePool {
    /// A shard of the slab holding slots `slots` of `region`. Fails if the slots' bookkeeping
    /// cannot be allocated.
    pub fn new(
        layout: &PoolLayout,
        region: Region,
        slots: Range<u32>,
        use_page_map: bool,
    ) -> Result<TablePool> {
        let len = slots.end - slots.start;
        let state = State::new(len).map_err(|_| {
            let bytes = human_bytes(bookkeeping_bytes(len));
            anyhow!("failed to allocate {bytes} of bookkeeping for {len} table slots")
        })?;
        Ok(TablePool {
            region,
            first: slots.start,
            layout: layout.clone(),
            use_page_map,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update under the lock is a field write and a push: carry on after a panic.
        berth_core::sync::lock_spinning(&self.state)
    }

    /// `slot`'s number in this shard.
    fn local(&self, slot: u32) -> SlotId {
        SlotId::from_u32(slot - self.first)
    }

    /// The first word of `slot` (global number).
    pub fn slot_base(&self, slot: u32) -> NonNull<usize> {
        if self.layout.table_stride == 0 {
            // Slots of no elements: nothing is ever read or written through this.
            return NonNull::dangling();
        }
        // Slots are page-aligned, so word-aligned.
        self.region.base(slot).cast()
    }

    /// Elements a slot holds.
    pub fn capacity(&self) -> usize {
        self.layout.table_stride / size_of::<usize>()
    }

    /// Takes a free slot (all zero) for a tenant.
    pub fn take(&self) -> Option<u32> {
        Some(self.first + self.lock().take()?.as_u32())
    }

    /// Setting up a table in `slot` failed or unwound before anything was written: it is free
    /// again, as it was taken.
    pub fn abandon(&self, slot: u32) {
        self.lock().abandon(self.local(slot));
    }

    /// The bytes of `slot`.
    ///
    /// # Safety
    ///
    /// The caller holds `slot`: its tenant is gone (or it was never handed out) and no other
    /// thread touches it until the returned value is dropped.
    unsafe fn bytes(&self, slot: u32) -> SlotBytes {
        let stride = self.layout.table_stride;
        // SAFETY: per the caller, the slot is held; the slab is read-write, so all `stride`
        // bytes are accessible.
        unsafe { self.region.bytes(slot, stride, stride) }
    }

    /// Zeroes what the tenant could have written up to `table_keep_resident` bytes (past
    /// [`ZEROED`], only the pages the page map does not prove clean). If nothing else is left,
    /// the slot is free again at once and this returns `None`; else the slot is `Resetting` and
    /// this returns it, the written pages past the bound (addresses, page-aligned) left in
    /// `decommits`, for [`finish`](Self::finish) once they were given back.
    pub fn reset(&self, job: TableReset, decommits: &mut Decommits) -> Option<TableDone> {
        let stride = self.layout.table_stride;
        let page = self.layout.page_size;
        let dirty = job.dirty.min(stride);
        let keep = self.layout.table_keep_resident;
        // SAFETY: the tenant gave the slot back (`deallocate_table`'s contract): it is `Held`
        // by this call until it is freed or marked `Resetting` below.
        let mut bytes = unsafe { self.bytes(job.slot) };
        let end = dirty.next_multiple_of(page).min(stride);
        let zeroed = ZEROED.min(keep);
        bytes.zero(0..dirty.min(zeroed));
        decommits.restart(Kind::AtOnce);
        let resident = match sys::page_map().filter(|_| self.use_page_map && dirty > zeroed) {
            Some(map) => reset_written(&mut bytes, map, zeroed..end, keep, decommits),
            None => {
                bytes.zero(zeroed.min(dirty)..dirty.min(keep));
                if end > keep {
                    decommits.push(bytes.address_range(keep..end));
                }
                end.min(keep)
            }
        };
        let local = self.local(job.slot);
        if decommits.is_empty() {
            self.lock().free(local, resident, true);
            return None;
        }
        self.lock().release(local);
        Some(TableDone {
            slot: job.slot,
            resident,
            rest: keep.min(end)..end,
        })
    }

    /// Returns a reset slot to the free list; if its decommit failed (`decommitted` false),
    /// the bytes it was to give back are zeroed here instead.
    pub fn finish(&self, done: TableDone, decommitted: bool) {
        if !decommitted {
            // SAFETY: the slot is `Resetting` until it is freed below: ours alone.
            unsafe { self.bytes(done.slot) }.zero(done.rest.clone());
        }
        self.lock().free(self.local(done.slot), done.resident, false);
    }

    /// Gives the resident pages of every free slot back to the kernel (a slot whose decommit
    /// fails keeps them, still zero), and says what that released and took.
    pub fn release_idle(&self) -> (Released, Decommitted) {
        let mut state = self.lock();
        // Every free slot's resident bytes, given back in one call (a system call per 64).
        let resident: Vec<(SlotId, usize)> = state
            .free
            .iter()
            .filter_map(|&local| match state.slots[local.index()] {
                TableSlot::Free { resident } if resident > 0 => Some((local, resident)),
                _ => None,
            })
            .collect();
        let ranges: Vec<Range<usize>> = resident
            .iter()
            .map(|&(local, bytes)| {
                // SAFETY: the slot is free and this pool's lock is held until the ranges have
                // been given back, so no one takes or touches it meanwhile.
                unsafe { self.bytes(self.first + local.as_u32()) }.address_range(0..bytes)
            })
            .collect();
        if ranges.is_empty() {
            return (Released::default(), Decommitted::default());
        }
        // SAFETY: each range is a free slot's first resident bytes, inside the pool's private
        // read-write slab, held (under the lock) with no reference into it.
        let Ok(calls) = (unsafe { berth_core::sys::decommit_all(&ranges) }) else {
            // Nothing is known to be given back: the slots keep their pages, still zero.
            return (Released::default(), Decommitted::default());
        };
        let mut released = Released::default();
        for &(local, bytes) in &resident {
            state.slots[local.index()] = TableSlot::Free { resident: 0 };
            state.idle_resident -= bytes;
            released += Released::new(1, bytes as u64);
        }
        let done = Decommitted {
            calls,
            ranges: ranges.len() as u64,
        };
        (released, done)
    }

    /// Used slots free now (warm), and the resident bytes they keep.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        (state.free.len(), state.idle_resident)
    }
}

/// Resets the pages of `range` (page-aligned, past the first [`ZEROED`] bytes) that `map` does
/// not prove clean: zeroed below `keep`; above it, one range from the first such page to the
/// last is added to `decommits` (the clean pages between cost the decommit nothing, and a
/// slot's decommits hold few ranges). A page the scan cannot classify counts as written: on
/// error, all of `range`. Returns the end of the bytes that may be resident.
fn reset_written(
    bytes: &mut SlotBytes,
    map: &PageMap,
    range: Range<usize>,
    keep: usize,
    decommits: &mut Decommits,
) -> usize {
    let mut written = reset::WRITTEN.take();
    written.clear();
    if bytes.written(map, range.clone(), &mut written).is_err() {
        written.clear();
        written.push(0..range.len());
    }
    let mut resident = range.start;
    let mut over: Option<Range<usize>> = None;
    for run in &written {
        let run = run.start + range.start..run.end + range.start;
        let kept = run.start..run.end.min(keep);
        if !kept.is_empty() {
            bytes.zero(kept.clone());
            resident = kept.end;
        }
        if run.end > keep {
            let start = over.as_ref().map_or(run.start.max(keep), |o| o.start);
            over = Some(start..run.end);
        }
    }
    reset::WRITTEN.set(written);
    if let Some(over) = over {
        decommits.push(bytes.address_range(over));
    }
    resident
}
