//! The memory pool: one reservation cut into slots (see [`crate::layout`] for the diagram),
//! slots chosen by [`SlotAllocator`], reset when given back.
//!
//! Reset policy for a slot whose tenant left `accessible` bytes readable and writable (see
//! `reset_pages` for the details and docs/pooling.md for the reasons):
//!
//! - the slot's resident prefix of kept bytes (pages tenants wrote before, up to
//!   `keep_resident`) is zeroed with `memset`, so the next tenant does not fault them in again;
//! - the rest up to `accessible` is reset where the kernel says it was written
//!   (`PAGEMAP_SCAN`): kept pages are zeroed and join the prefix, others decommitted; once scans
//!   keep finding nothing, it is decommitted without asking (a periodic rescan notices change;
//!   a slot new to the module's memory starts from what its other slots learned);
//! - image pages are decommitted, which brings the image's bytes back from its file;
//! - access above the memory's initial size is removed again (`mprotect`), so a warm slot is
//!   left exactly as the same module will want it: a reuse by that module needs no system call.
//!
//! A reset that fails leaves the slot marked; it is re-mapped (a fresh `PROT_NONE` mapping over
//! its reservation) before its next use, so a failed reset can never leak a byte.

use std::ops::Range;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use berth_core::{DefinedMemoryIndex, MemoryImage, ModuleId, sys};

use crate::layout::PoolLayout;
use crate::shard::Decommits;
use crate::slots::{Choice, FastMap, SlotAllocator, SlotId};
use crate::warm::WarmBudget;

/// Which module's memory last used a slot.
pub(crate) type MemoryKey = (ModuleId, DefinedMemoryIndex);

/// What a memory slot holds while it is not handed out.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotInfo {
    /// What the slot's resets learned (stays with the slot while it is handed out).
    pub history: History,
    /// Bytes from the slot's start that are readable and writable (all reading as zeros, or
    /// as the image where one is mapped).
    pub accessible: usize,
    /// The last reset failed: re-map before use.
    pub needs_remap: bool,
    /// The copy-on-write image mapped in the slot, as its last reset left it.
    pub image: Option<Arc<MemoryImage>>,
}

/// What the resets of one slot have learned about its tenants, kept across tenants.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct History {
    /// Kept bytes `0..resident` are resident and reset by zeroing (written by some tenant).
    pub resident: usize,
    /// Consecutive scans that found nothing written above `resident`.
    clean_scans: u8,
    /// Resets since the last scan while scans are skipped.
    blind_resets: u8,
}

/// Clean scans after which a slot's resets stop scanning (and decommit blindly instead).
const CLEAN_SCANS_BEFORE_BLIND: u8 = 4;
/// While blind, one reset in this many scans again, to notice tenants that start writing;
/// each clean rescan doubles the interval, up to [`RESCAN_EVERY_MAX`].
const RESCAN_EVERY: u8 = 16;
/// The longest interval between rescans of a slot whose rescans keep finding nothing.
const RESCAN_EVERY_MAX: u8 = 128;

impl History {
    /// Whether this reset asks the kernel what was written, rather than decommit blindly.
    fn scans(&self) -> bool {
        let rescans = self.clean_scans.saturating_sub(CLEAN_SCANS_BEFORE_BLIND).min(3);
        let every = (RESCAN_EVERY << rescans).min(RESCAN_EVERY_MAX);
        self.clean_scans < CLEAN_SCANS_BEFORE_BLIND || self.blind_resets >= every
    }
}

/// A slot taken back from a tenant, to be reset.
#[derive(Debug, Clone)]
pub(crate) struct MemoryReset {
    pub slot: SlotId,
    /// The image mapped in the slot, whose bytes the reset brings back.
    pub image: Option<Arc<MemoryImage>>,
    /// Bytes the tenant could write (its size at deallocation, page-rounded).
    pub accessible: usize,
    /// The module's initial size for this memory, page-rounded: what stays accessible.
    pub initial: usize,
}

#[derive(Debug)]
struct State {
    slots: SlotAllocator<MemoryKey>,
    /// What each idle slot holds.
    info: Vec<SlotInfo>,
    /// Who each slot was last handed to.
    owner: Vec<Option<MemoryKey>>,
    /// Slots whose module was purged while they were handed out or queued for reset: they
    /// turn cold, not warm, when they come back.
    orphaned: Vec<bool>,
    /// What each slot's resets learned.
    history: Vec<History>,
    /// Per module memory, how many scans in a row last found nothing its tenants wrote above
    /// the resident prefix: a slot new to the memory starts from there, so a module whose
    /// tenants write nothing does not pay a scan per reset on every slot it moves to.
    clean_streak: FastMap<MemoryKey, u8>,
    idle_resident: usize,
}

/// The memory pool.
///
/// Invariant: a slot's bytes are touched only by its tenant while it is handed out, and only
/// by the thread resetting it between `deallocate` and `finish`; `info` describes every slot
/// that is not handed out.
#[derive(Debug)]
pub(crate) struct MemoryPool {
    /// Slot 0 of the whole pool (this shard's slots are `first..first + len`).
    first_slot: NonNull<u8>,
    first: SlotId,
    len: u32,
    layout: PoolLayout,
    use_page_map: bool,
    /// The pool-wide cap on warm slots, and this shard's number in it.
    budget: Arc<WarmBudget>,
    shard: usize,
    state: Mutex<State>,
}

// SAFETY: `first_slot` points into the allocator's mapping, which outlives every shard; slot
// bytes are reached only under the invariant above.
unsafe impl Send for MemoryPool {}
// SAFETY: as above; shared state is behind a `Mutex`.
unsafe impl Sync for MemoryPool {}

impl MemoryPool {
    /// Shard `shard` of the pool, holding slots `slots` of the reservation whose slot 0 is at
    /// `first_slot`, keeping warm what `budget` allows it.
    pub fn new(
        layout: &PoolLayout,
        first_slot: NonNull<u8>,
        slots: std::ops::Range<SlotId>,
        budget: Arc<WarmBudget>,
        shard: usize,
        use_page_map: bool,
    ) -> MemoryPool {
        let len = slots.end - slots.start;
        MemoryPool {
            first_slot,
            first: slots.start,
            len,
            layout: layout.clone(),
            use_page_map,
            state: Mutex::new(State {
                slots: SlotAllocator::new(len, budget.share(shard)),
                info: vec![SlotInfo::default(); len as usize],
                owner: vec![None; len as usize],
                orphaned: vec![false; len as usize],
                history: vec![History::default(); len as usize],
                clean_streak: FastMap::default(),
                idle_resident: 0,
            }),
            budget,
            shard,
        }
    }

    /// The index of global slot `slot` in this shard's arrays.
    fn local(&self, slot: SlotId) -> usize {
        debug_assert!((self.first..self.first + self.len).contains(&slot));
        (slot - self.first) as usize
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // hands a slot out twice (every update is a few field writes), so carry on.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The first byte of `slot`.
    pub fn slot_base(&self, slot: SlotId) -> NonNull<u8> {
        // SAFETY: `slot < memory_slots`, so the offset is inside the mapping.
        unsafe { self.first_slot.add(slot as usize * self.layout.memory_stride) }
    }

    /// Takes a slot for `key`, with what it holds. Unless `steal`, gives `None` rather than
    /// take another module's warm slot.
    pub fn take(&self, key: MemoryKey, steal: bool) -> Option<(SlotId, SlotInfo)> {
        let mut state = self.lock();
        let warm = state.slots.warm();
        state.slots.set_max_warm(self.budget.allowed(self.shard, warm));
        if !steal && state.slots.would_steal(Some(key)) {
            return None;
        }
        let (local, choice) = state.slots.alloc(Some(key))?;
        if choice != Choice::Cold {
            self.budget.publish(self.shard, state.slots.warm());
        }
        let index = local as usize;
        if choice != Choice::Affine {
            let streak = state.clean_streak.get(&key).copied().unwrap_or(0);
            state.history[index].clean_scans = streak;
            state.history[index].blind_resets = 0;
        }
        let info = std::mem::take(&mut state.info[index]);
        state.idle_resident -= info.history.resident;
        state.owner[index] = Some(key);
        state.orphaned[index] = false;
        Some((self.first + local, info))
    }

    /// Makes a slot marked for re-mapping usable: a fresh `PROT_NONE` reservation.
    pub fn remap(&self, slot: SlotId) -> Result<SlotInfo> {
        let len = self.layout.memory_reservation;
        // SAFETY: the caller holds `slot` (taken, not yet given back); its reservation is
        // inside the pool's mapping and no reference into it is live.
        unsafe { sys::reset_to_reserved(self.slot_base(slot), len) }
            .with_context(|| format!("failed to re-map memory slot {slot} of {len:#x} bytes"))?;
        let index = self.local(slot);
        self.lock().history[index] = History::default();
        Ok(SlotInfo::default())
    }

    /// Resets a slot a tenant gave back, all but the decommits, which it returns (addresses)
    /// for the shard to run, alone or in a batch, before the slot is finished. Touches only
    /// that slot, so it runs without the lock. `fail` injects a failure (for tests).
    pub fn reset(&self, job: &MemoryReset, fail: bool) -> (SlotInfo, Decommits) {
        let failed = (
            SlotInfo {
                needs_remap: true,
                ..SlotInfo::default()
            },
            Decommits::default(),
        );
        if fail {
            return failed;
        }
        let base = self.slot_base(job.slot);
        let accessible = job.accessible;
        let keep = self.layout.memory_keep_resident.min(accessible);
        let image = job.image.as_ref().map_or(0..0, |i| {
            i.offset().min(accessible)..(i.offset() + i.len()).min(accessible)
        });
        let index = self.local(job.slot);
        let mut history = self.lock().history[index];
        let (resident, decommits) = self.reset_pages(base, accessible, keep, &image, &mut history);
        history.resident = resident;
        let initial = job.initial.min(job.accessible);
        if job.accessible > initial {
            // SAFETY: as above; `initial..accessible` is inside the slot's reservation.
            if unsafe { sys::make_inaccessible(base.add(initial), job.accessible - initial) }.is_err() {
                return failed;
            }
        }
        let info = SlotInfo {
            accessible: initial,
            needs_remap: false,
            image: job.image.clone(),
            history,
        };
        (info, decommits)
    }

    /// Brings `accessible` bytes at `base` back to zeros (and the image's bytes): the kept
    /// resident prefix by zeroing, the image by decommitting (its pages come back from the file),
    /// and the rest by what the kernel says was written (`PAGEMAP_SCAN`), or, once scans keep
    /// finding nothing, by decommitting it all without asking (a scan every [`RESCAN_EVERY`]
    /// resets, less often while those find nothing, notices tenants that start writing).
    /// Written kept pages join the resident prefix, so a module whose tenants write them pays a
    /// `memset`, never a page fault. Returns the new resident prefix and what is left to
    /// decommit.
    fn reset_pages(
        &self,
        base: NonNull<u8>,
        accessible: usize,
        keep: usize,
        image: &Range<usize>,
        history: &mut History,
    ) -> (usize, Decommits) {
        let page = self.layout.page_size;
        let mut known = history.resident.min(keep);
        let mut decommit = Covers::default();
        // The resident prefix: zeroed in place, except image pages, which go back to the file.
        for part in split(&(0..known), image) {
            self.zero_or_cover(base, part, image, &mut decommit);
        }
        let unknown = known..accessible;
        let map = sys::page_map().filter(|_| self.use_page_map);
        let scan = map.filter(|_| history.scans());
        let mut written = Vec::new();
        let scanned = !unknown.is_empty()
            && scan.is_some_and(|map| {
                // Reading page tables only; `base + known` is inside the slot.
                let start = NonNull::new(base.as_ptr().wrapping_add(known));
                start.is_some_and(|start| map.written(start, unknown.len(), &mut written).is_ok())
            });
        if scanned {
            history.blind_resets = 0;
            history.clean_scans = if written.is_empty() {
                history.clean_scans.saturating_add(1)
            } else {
                0
            };
            let prefix = known;
            for range in &written {
                let range = range.start + prefix..range.end + prefix;
                for part in split(&range, image) {
                    if part.is_empty() {
                        continue;
                    }
                    if image.contains(&part.start) {
                        decommit.widen_image(part);
                        continue;
                    }
                    if part.start < keep {
                        let kept = part.start..part.end.min(keep);
                        known = known.max(kept.end);
                        self.zero_or_cover(base, kept, image, &mut decommit);
                    }
                    Covers::widen(&mut decommit.above, part.start.max(keep)..part.end);
                }
            }
        } else if !unknown.is_empty() && map.is_some() {
            // Blind: everything not known to be resident goes back to the kernel.
            history.blind_resets = history.blind_resets.saturating_add(1);
            decommit.above = Some(unknown);
        } else if !unknown.is_empty() {
            // No page map: look at each kept page that is not known to be resident, and zero
            // the ones a tenant wrote (they join the prefix); decommit the image and the rest.
            for start in (known..keep).step_by(page) {
                if image.contains(&start) {
                    continue;
                }
                // SAFETY: the slot was given back and is not in the allocator, so this thread
                // alone touches it; the page lies within the accessible bytes.
                let bytes = unsafe { std::slice::from_raw_parts_mut(base.add(start).as_ptr(), page) };
                if !is_zero(bytes) {
                    bytes.fill(0);
                    known = start + page;
                }
            }
            decommit.widen_image(image.clone());
            if keep < accessible {
                decommit.above = Some(keep..accessible);
            }
        }
        let start = base.as_ptr().addr();
        let mut decommits = Decommits::default();
        for range in decommit.ranges() {
            decommits.push(start + range.start..start + range.end);
        }
        (known, decommits)
    }

    /// Zeroes the part of `part` below the image, or adds it to the image's decommit.
    fn zero_or_cover(
        &self,
        base: NonNull<u8>,
        part: Range<usize>,
        image: &Range<usize>,
        decommit: &mut Covers,
    ) {
        if part.is_empty() {
            return;
        }
        if image.contains(&part.start) {
            decommit.widen_image(part);
        } else {
            // SAFETY: the slot was given back and is not in the allocator, so this thread alone
            // touches it; `part` lies within its accessible bytes.
            unsafe { base.add(part.start).as_ptr().write_bytes(0, part.len()) };
        }
    }

    /// Returns a reset slot to the allocator, warm for the key it was handed out for. A slot
    /// pushed out of the warm set gives its pages back to the kernel here.
    pub fn finish(&self, slot: SlotId, info: SlotInfo) {
        let index = self.local(slot);
        let local = slot - self.first;
        let mut state = self.lock();
        let key = state.owner[index].expect("a slot being finished was handed out");
        if info.needs_remap {
            state.info[index] = info;
            state.history[index] = History::default();
            state.slots.free_cold(local);
            return;
        }
        state.idle_resident += info.history.resident;
        let streak = info.history.clean_scans;
        state.history[index] = info.history;
        state.info[index] = info;
        if std::mem::take(&mut state.orphaned[index]) {
            state.slots.free_cold(local);
            self.make_cold(&mut state, slot);
            return;
        }
        // Not for a purged module (above), whose entry would never be removed.
        if state.clean_streak.get(&key) != Some(&streak) {
            state.clean_streak.insert(key, streak);
        }
        let warm = state.slots.warm();
        state.slots.set_max_warm(self.budget.allowed(self.shard, warm));
        if let Some((evicted, _)) = state.slots.free(local, key) {
            self.make_cold(&mut state, self.first + evicted);
        }
        self.budget.publish(self.shard, state.slots.warm());
    }

    /// If this shard keeps more warm slots than its share, turns its least recently used one
    /// cold (for a shard that needs its share back). Returns whether it did.
    pub fn give_back(&self) -> bool {
        let mut state = self.lock();
        if !self.budget.is_borrowing(self.shard) {
            return false;
        }
        let Some((evicted, _)) = state.slots.evict() else {
            return false;
        };
        self.make_cold(&mut state, self.first + evicted);
        self.budget.publish(self.shard, state.slots.warm());
        true
    }

    /// Gives what a slot that just turned cold holds back to the kernel: its resident pages
    /// (one decommit of the kept prefix, none if its tenants wrote nothing), or, if it holds an
    /// image, its whole reservation (one fresh `PROT_NONE` mapping, which also unmaps the image).
    /// The accessible size of a slot without an image stays: it reads as zeros, and the next
    /// tenant, of any module, adjusts it as it would a stolen slot's. Runs under the lock: a
    /// cold slot can be handed out as soon as the lock is released.
    fn make_cold(&self, state: &mut State, slot: SlotId) {
        let index = self.local(slot);
        let info = std::mem::take(&mut state.info[index]);
        state.idle_resident -= info.history.resident;
        state.history[index] = History::default();
        let base = self.slot_base(slot);
        if info.image.is_none() && !info.needs_remap {
            let resident = info.history.resident;
            let start = base.as_ptr().addr();
            let range = start..start + resident;
            let decommitted = resident == 0
                // SAFETY: the slot is idle and the lock is held, so no one else touches it;
                // its resident prefix is page-aligned and inside its reservation, in the
                // pool's private mapping.
                || unsafe { sys::decommit_all(std::slice::from_ref(&range)) }.is_ok();
            if decommitted {
                state.info[index] = SlotInfo {
                    accessible: info.accessible,
                    ..SlotInfo::default()
                };
                return;
            }
        }
        let len = self.layout.memory_reservation;
        // SAFETY: the slot is idle and the lock is held, so no one else touches it; its
        // reservation is inside the pool's mapping.
        let ok = unsafe { sys::reset_to_reserved(base, len) }.is_ok();
        state.info[index] = SlotInfo {
            needs_remap: !ok,
            ..SlotInfo::default()
        };
    }

    /// Forgets the warm slots of `module`.
    pub fn purge(&self, module: ModuleId) {
        let mut state = self.lock();
        let keys: Vec<MemoryKey> = state
            .slots
            .keys()
            .filter(|(m, _)| *m == module)
            .copied()
            .collect();
        state.clean_streak.retain(|(m, _), _| *m != module);
        for key in keys {
            for local in state.slots.purge(key) {
                self.make_cold(&mut state, self.first + local);
            }
        }
        self.budget.publish(self.shard, state.slots.warm());
        // Slots of this module that are not idle (still queued for their reset) go cold when
        // they come back.
        for local in 0..self.len {
            if state.owner[local as usize].is_some_and(|(m, _)| m == module) && state.slots.is_used(local) {
                state.orphaned[local as usize] = true;
            }
        }
    }

    /// Warm slots and resident bytes in idle slots.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        (state.slots.warm(), state.idle_resident)
    }
}

/// Whether every byte of a page is zero. Reads whole 64-byte blocks without an early exit inside
/// them, so the compiler can vectorize the check; stops at the first non-zero block.
fn is_zero(page: &[u8]) -> bool {
    let (blocks, rest) = page.as_chunks::<64>();
    blocks.iter().all(|block| {
        block
            .as_chunks::<8>()
            .0
            .iter()
            .fold(0, |acc, w| acc | u64::from_ne_bytes(*w))
            == 0
    }) && rest.iter().all(|&b| b == 0)
}

/// At most two ranges to decommit: one over the image's pages, one over the rest (clean pages
/// inside either lose nothing).
#[derive(Default)]
struct Covers {
    image: Option<Range<usize>>,
    above: Option<Range<usize>>,
}

impl Covers {
    fn widen(cover: &mut Option<Range<usize>>, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        *cover = Some(match cover.take() {
            Some(c) => c.start.min(range.start)..c.end.max(range.end),
            None => range,
        });
    }

    fn widen_image(&mut self, range: Range<usize>) {
        Self::widen(&mut self.image, range);
    }

    /// The ranges, merged if they overlap or touch.
    fn ranges(self) -> impl Iterator<Item = Range<usize>> {
        let merged = match (&self.image, &self.above) {
            (Some(a), Some(b)) if a.start <= b.end && b.start <= a.end => {
                [Some(a.start.min(b.start)..a.end.max(b.end)), None]
            }
            _ => [self.image, self.above],
        };
        merged.into_iter().flatten()
    }
}

/// `range` cut at the edges of `image`: the parts before, inside and after it.
fn split(range: &Range<usize>, image: &Range<usize>) -> [Range<usize>; 3] {
    let before = range.start..range.end.min(image.start).max(range.start);
    let inside = range.start.max(image.start)..range.end.min(image.end);
    let after = range.start.max(image.end).min(range.end)..range.end;
    // No overlap gives an inverted `inside`: make it empty.
    let inside = if inside.start < inside.end { inside } else { 0..0 };
    [before, inside, after]
}
