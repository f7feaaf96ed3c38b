//! A shard's memory slots: chosen by [`MemorySlots`], set up for their tenant, reset when given
//! back (see [`crate::reset`]), pushed out of the warm set with their pages given back.
//!
//! Where a slot's bytes are touched, by whom: its tenant while it is `Held`; the thread
//! resetting it while it is `Resetting`; the thread that took it while setting it up; and a
//! thread holding this pool's lock while it is idle (pushing it out). Every such touch goes
//! through [`SlotBytes`](crate::slot_bytes::SlotBytes).

use std::ops::Range;
use std::sync::atomic::AtomicU64;
#[cfg(test)]
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow};
use berth_core::{DefinedMemoryIndex, MemoryImage, ModuleId, Released, human_bytes, sys};

use crate::decommit::Decommits;
use crate::history::{History, Learned};
use crate::layout::PoolLayout;
use crate::reset::{self, MemoryReset, Policy};
use crate::slot_bytes::Region;
use crate::slots::{FastMap, Idle, MemorySlots, SlotId, Warm};
use crate::warm::WarmBudget;

/// Which module's memory a slot serves.
pub(crate) type MemoryKey = (ModuleId, DefinedMemoryIndex);

/// Which slots [`MemoryPool::take`] may hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choose {
    /// Only one warm for the same module memory.
    Own,
    /// That, or a cold one while the pool keeps fewer warm slots than its cap.
    OwnOrCold,
    /// Anything: also another module memory's least recently used warm slot.
    Any,
}

/// A slot taken for a memory, ready to build it on.
#[derive(Debug)]
pub(crate) struct Lease {
    /// The slot's global number.
    pub slot: u32,
    /// Bytes from its start that are readable and writable, reading as zeros, or as `image`.
    pub accessible: usize,
    /// The image the memory wants, already mapped (its bytes as the image has them).
    pub image: Option<Arc<MemoryImage>>,
}

/// What a memory wants of its slot. The image is borrowed from the module: an instance
/// takes a reference to it only where its slot does not hold one already (a warm slot keeps
/// its own), so that threads instantiating one module do not share a reference count.
#[derive(Debug)]
pub(crate) struct Wanted<'a> {
    /// The image to find mapped (or to map).
    pub image: Option<&'a Arc<MemoryImage>>,
    /// Its initial size in bytes, page-rounded.
    pub initial: usize,
}

/// A reset slot waiting for its decommits: what it becomes once they ran (a [`Warm`] slot,
/// without its places in the lists and its time stamp, which it gets then; under 128 bytes, it
/// moves through the decommit queue without a call to `memcpy`).
#[derive(Debug)]
pub(crate) struct Reset {
    slot: u32,
    key: MemoryKey,
    accessible: usize,
    image: Option<Arc<MemoryImage>>,
    history: History,
}

impl Reset {
    /// The module memory the slot is reset for.
    pub fn key(&self) -> MemoryKey {
        self.key
    }

    /// What the slot keeps resident.
    pub fn keeps(&self) -> Keeps {
        match self.history.kept.bytes() {
            0 => Keeps::Nothing,
            bytes if bytes >= reset::CACHED => Keeps::Cached,
            _ => Keeps::Some,
        }
    }
}

/// What a slot waiting in a decommit queue keeps resident, which decides whether its module's
/// next tenant waits for it (see `take_memory` in `lib.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keeps {
    /// No page: another slot serves as well.
    Nothing,
    /// Pages its module's tenants write, fewer than [`reset::CACHED`] bytes.
    Some,
    /// [`reset::CACHED`] bytes or more, which its deallocation decommits around at once (it
    /// waits in the queue only because another thread was decommitting): a slot set up
    /// instead would keep as many again, and the two would take turns out of the cache.
    Cached,
}

/// Reset slots being returned to the idle set one after the other: the pool's lock is taken
/// at the first and held until this is dropped, the warm slots'
/// time stamp is taken once, and what the shard keeps is published once, at the drop. A batch
/// of decommits finishes its slots this way: finishing each on its own took a tenth of a
/// microsecond or more (the lock, the clock and the published counters), paid eight times by
/// the deallocation that runs a batch of idle slots. The lock stays held between slots, also
/// while a batch whose system call failed gives each slot's ranges back on its own (rare), and
/// while table slots of the batch go back to their pool (whose lock never waits for this one).
pub(crate) struct Finishing<'a> {
    pool: &'a MemoryPool,
    state: Option<std::sync::MutexGuard<'a, State>>,
    stamp: Option<u64>,
}

impl Finishing<'_> {
    /// Returns a reset slot to the idle set, warm for the module memory it was reset for (or
    /// stale if its decommits failed: `decommitted` false). A slot pushed out of the warm set
    /// gives its pages back here.
    pub fn finish(&mut self, reset: Reset, decommitted: bool) {
        let pool = self.pool;
        let stamp = decommitted.then(|| *self.stamp.get_or_insert_with(|| pool.budget.now()));
        let state = self.state.get_or_insert_with(|| pool.lock());
        let State { slots, learned } = &mut **state;
        let Some(stamp) = stamp else {
            slots.finish(pool.local(reset.slot), None);
            return;
        };
        let Reset {
            slot,
            key,
            accessible,
            image,
            history,
        } = reset;
        let lesson = history.learned();
        let mut warm = Warm::new(key, accessible, image, history);
        warm.stamp = stamp;
        // The pool's caps are enforced pool-wide (`rebalance_warm`); a shard alone never keeps
        // more than all of one.
        slots.set_max_warm(pool.budget.cap());
        let finished = slots.finish(pool.local(slot), Some(warm));
        // Not for a purged module, whose entry would never be removed.
        if !finished.purged && learned.get(&key) != Some(&lesson) {
            learned.insert(key, lesson);
        }
        if let Some((local, warm)) = finished.out {
            pool.cool(slots, local, warm);
        }
        while slots.warm_resident() > pool.budget.bytes() {
            let Some((local, warm)) = slots.evict_keeping() else {
                break;
            };
            pool.cool(slots, local, warm);
        }
    }
}

impl Drop for Finishing<'_> {
    fn drop(&mut self) {
        if let Some(state) = &self.state {
            self.pool.publish(&state.slots);
        }
    }
}

/// How an idle slot is made ready for a memory.
enum Setup {
    /// It is ready as it is: `accessible` bytes readable and writable (zeros or `image`).
    Ready {
        accessible: usize,
        image: Option<Arc<MemoryImage>>,
    },
    /// It maps an image the memory must not see: replace `range` (that image, inside the
    /// `accessible` bytes) with fresh zero pages, and it is ready with no image.
    Unmap { accessible: usize, range: Range<usize> },
    /// Its state is unknown: re-map the whole slot.
    Remap,
}

impl Idle<MemoryKey> {
    /// What it takes to make this idle slot ready for a memory that wants `wanted` mapped.
    /// This is the one place that decides what a slot's mapping needs.
    fn setup_for(self, wanted: Option<&Arc<MemoryImage>>) -> Setup {
        match self {
            Idle::Cold { accessible } => Setup::Ready {
                accessible,
                image: None,
            },
            Idle::Stale => Setup::Remap,
            Idle::Warm(warm) => match (warm.image, wanted) {
                (None, _) => Setup::Ready {
                    accessible: warm.accessible,
                    image: None,
                },
                (Some(have), Some(want)) if Arc::ptr_eq(&have, want) => Setup::Ready {
                    accessible: warm.accessible,
                    image: Some(have),
                },
                // The wanted image will be mapped over the whole of the one there (the caller
                // maps it whenever a lease holds no image and the memory wants one): nothing of
                // the old one survives, and the rest of the slot reads as zeros.
                (Some(have), Some(want))
                    if want.offset() <= have.offset()
                        && have.offset() + have.len() <= want.offset() + want.len() =>
                {
                    Setup::Ready {
                        accessible: warm.accessible,
                        image: None,
                    }
                }
                (Some(have), _) => Setup::Unmap {
                    accessible: warm.accessible,
                    range: have.offset()..have.offset() + have.len(),
                },
            },
        }
    }
}

/// Bytes of bookkeeping `slots` memory slots need (reserved when the pool is built).
pub(crate) fn bookkeeping_bytes(slots: u32) -> u64 {
    u64::from(slots).saturating_mul(MemorySlots::<MemoryKey>::SLOT_BYTES as u64)
}

#[derive(Debug)]
struct State {
    slots: MemorySlots<MemoryKey>,
    /// Per module memory, what its slots' last resets learned: a slot new to the memory starts
    /// from there, so a module whose tenants write nothing does not pay a scan per reset on
    /// every slot it moves to (and one whose tenants write does not go blind before its new
    /// slot has learned their pages).
    learned: FastMap<MemoryKey, Learned>,
}

/// One shard's memory slots.
#[derive(Debug)]
pub(crate) struct MemoryPool {
    /// Every slot of the pool (this shard's are `first..first + len`).
    region: Region,
    first: u32,
    layout: PoolLayout,
    use_page_map: bool,
    /// The pool-wide cap on warm slots, and this shard's number in it.
    budget: Arc<WarmBudget>,
    shard: usize,
    state: Mutex<State>,
    /// Resets to fail, as if the kernel had refused them (tests only).
    #[cfg(test)]
    pub fail_resets: AtomicU32,
    /// Decommits made while setting slots up or pushing them out (not by resets), in all.
    pub decommit_calls: AtomicU64,
    /// The ranges those decommits gave back, in all.
    pub decommit_ranges: AtomicU64,
}

impl MemoryPool {
    /// Shard `shard` of the pool, holding slots `slots` of `region`, keeping warm what `budget`
    /// allows it. Fails if the slots' bookkeeping cannot be allocated.
    pub fn new(
        layout: &PoolLayout,
        region: Region,
        slots: std::ops::Range<u32>,
        budget: Arc<WarmBudget>,
        shard: usize,
        use_page_map: bool,
    ) -> Result<MemoryPool> {
        let len = slots.end - slots.start;
        let memory_slots = MemorySlots::new(len, budget.cap()).map_err(|_| {
            let bytes = human_bytes(bookkeeping_bytes(len));
            anyhow!("failed to allocate {bytes} of bookkeeping for {len} memory slots")
        })?;
        Ok(MemoryPool {
            region,
            first: slots.start,
            layout: layout.clone(),
            use_page_map,
            state: Mutex::new(State {
                slots: memory_slots,
                learned: FastMap::default(),
            }),
            budget,
            shard,
            #[cfg(test)]
            fail_resets: AtomicU32::new(0),
            decommit_calls: AtomicU64::new(0),
            decommit_ranges: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update under the lock is a few field writes that a panic cannot leave half
        // done in a way that hands a slot out twice: carry on.
        berth_core::sync::lock_spinning(&self.state)
    }

    /// Tells the pool's warm budget what this shard keeps now (after every change, under the
    /// lock).
    fn publish(&self, slots: &MemorySlots<MemoryKey>) {
        self.budget.publish(
            self.shard,
            slots.warm_or_resetting(),
            slots.returning(),
            slots.warm_resident(),
            slots.oldest_stamp(),
        );
    }

    fn local(&self, slot: u32) -> SlotId {
        SlotId::from_u32(slot - self.first)
    }

    /// The first byte of `slot` (global number).
    pub fn slot_base(&self, slot: u32) -> std::ptr::NonNull<u8> {
        self.region.base(slot)
    }

    /// Takes a slot for `key`'s memory, which wants what `wanted` says, and makes it ready:
    /// `None` if no slot of the kind `choose` allows is free. A slot that is not ready for the
    /// memory as it is gets its mapping fixed.
    pub fn take(&self, key: MemoryKey, wanted: &Wanted<'_>, choose: Choose) -> Option<Result<Lease>> {
        let mut idle = Idle::Stale;
        let local = {
            let mut state = self.lock();
            let State { slots, learned } = &mut *state;
            // A cold slot only while the pool keeps fewer warm slots than its cap: at the cap,
            // reusing a warm slot here costs less than taking a cold one and pushing the
            // pool's oldest warm slot out.
            let grow = if choose == Choose::Own || !self.budget.at_cap() {
                self.budget.cap()
            } else {
                slots.warm()
            };
            slots.set_max_warm(grow);
            let refused = match choose {
                Choose::Own => !slots.has_warm(key),
                Choose::OwnOrCold => slots.would_steal(key),
                Choose::Any => false,
            };
            if refused {
                return None;
            }
            let (local, _) = slots.take(key, || learned.get(&key).copied().unwrap_or_default(), &mut idle)?;
            self.publish(slots);
            local
        };
        let slot = self.first + local.as_u32();
        let len = self.layout.memory_reservation;
        let image = wanted.image;
        let setup = match idle {
            // Taken from another module memory. The pages it kept for that one read as zeros
            // (their reset left them so), or as that one's image, which the set-up below
            // replaces: those the new memory can reach stay, resident, no longer kept (its
            // tenant's reset finds them with a scan, or decommits them as gaps); those past its
            // initial size, which no reset would look at, go back now, and so does everything
            // when resets cannot scan (a zero page they read would stay resident, unseen).
            Idle::Warm(warm) if warm.key != key && warm.history.kept.bytes() > 0 => {
                let scans = self.use_page_map && sys::page_map().is_some();
                let reach = if scans {
                    wanted.initial.min(warm.accessible)
                } else {
                    0
                };
                // The kept runs with the watch pages beside them (see `left_resident`).
                let beyond: Vec<Range<usize>> =
                    crate::reset::left_resident(&warm.history.kept, len, self.layout.page_size, 0)
                        .into_iter()
                        .filter(|run| run.end > reach)
                        .map(|run| run.start.max(reach)..run.end)
                        .collect();
                // SAFETY: the slot is `Held` by this call (taken above, not yet leased), so no
                // one else touches it; a warm slot's first `accessible` bytes are readable and
                // writable.
                let mut bytes = unsafe { self.region.bytes(slot, len, warm.accessible) };
                match bytes.decommit(&beyond) {
                    Ok(done) => {
                        done.count(&self.decommit_calls, &self.decommit_ranges);
                        Idle::Warm(warm).setup_for(image)
                    }
                    Err(_) => Setup::Remap,
                }
            }
            idle => idle.setup_for(image),
        };
        let done = match setup {
            Setup::Ready { accessible, image } => {
                return Some(Ok(Lease {
                    slot,
                    accessible,
                    image,
                }));
            }
            Setup::Unmap { accessible, range } => {
                // SAFETY: the slot is `Held` by this call (taken above, not yet leased), so no
                // one else touches it; a warm slot's first `accessible` bytes are readable and
                // writable.
                let mut bytes = unsafe { self.region.bytes(slot, len, accessible) };
                bytes
                    .replace_with_zeros(range)
                    .map(|()| accessible)
                    .with_context(|| format!("failed to unmap an image from memory slot {slot}"))
            }
            Setup::Remap => {
                // SAFETY: the slot is `Held` by this call (taken above, not yet leased), so no
                // one else touches it; nothing of it is known to be accessible.
                let mut bytes = unsafe { self.region.bytes(slot, len, 0) };
                let remapped = bytes.remap().map(|()| 0);
                if remapped.is_ok() {
                    // Nothing of what the slot kept resident survives a re-map.
                    self.lock().slots.remapped(local);
                }
                remapped.with_context(|| {
                    format!(
                        "failed to re-map memory slot {slot} of {}",
                        human_bytes(len as u64)
                    )
                })
            }
        };
        Some(match done {
            Ok(accessible) => Ok(Lease {
                slot,
                accessible,
                image: None,
            }),
            Err(error) => {
                self.lock().slots.abandon(local);
                Err(error)
            }
        })
    }

    /// Whether a slot of `key`'s memory is being reset here (it turns warm soon).
    pub fn resetting(&self, key: MemoryKey) -> bool {
        self.lock().slots.resetting(key)
    }

    /// Setting up the memory in a leased slot failed or unwound part-way (its protection may be
    /// half-changed): the slot is re-mapped now, so the pages earlier tenants left in it go
    /// back to the kernel rather than stay resident, counted nowhere, until its next use. It is
    /// cold then, or stale (re-mapped before its next use) if the re-map fails.
    pub fn abandon(&self, slot: u32) {
        let local = self.local(slot);
        // SAFETY: the slot is `Held` by the failed set-up that gives it up here: no tenant has
        // it and no reference into it is live.
        let mut bytes = unsafe { self.region.bytes(slot, self.layout.memory_reservation, 0) };
        let remapped = bytes.remap().is_ok();
        let mut state = self.lock();
        state.slots.abandon(local);
        if remapped {
            state.slots.cooled(local, 0);
        }
        self.publish(&state.slots);
    }

    /// Resets a slot its tenant gave back, all but the decommits, which it leaves in
    /// `decommits` for the caller to run (alone or in a batch) before [`Finishing::finish`],
    /// and returns the slot. Only that slot is touched, so this runs without the lock. A reset
    /// that fails leaves the slot stale (finished here: it is re-mapped before its next use),
    /// and returns `None`.
    pub fn reset(&self, job: MemoryReset, decommits: &mut Decommits) -> Option<Reset> {
        let local = self.local(job.slot);
        let (key, mut history) = {
            let mut state = self.lock();
            let released = state.slots.release(local);
            // Being reset, it counts as warm from now on (it turns warm in a moment).
            self.publish(&state.slots);
            released
        };
        let policy = Policy {
            keep: self.layout.memory_keep_resident,
            map: sys::page_map().filter(|_| self.use_page_map),
            page: self.layout.page_size,
        };
        #[cfg(test)]
        let injected = self
            .fail_resets
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        #[cfg(not(test))]
        let injected = false;
        // SAFETY: the slot is `Resetting` (released above): its tenant is gone and no other
        // thread touches it until `finish`; its first `job.accessible` bytes are the tenant's
        // accessible ones, readable and writable; its reservation is `memory_reservation` bytes.
        let mut bytes = unsafe {
            self.region
                .bytes(job.slot, self.layout.memory_reservation, job.accessible)
        };
        let done = if injected {
            Err(std::io::Error::other("injected reset failure"))
        } else {
            reset::reset(&mut bytes, &job, &mut history, policy, decommits)
        };
        match done {
            Ok(()) => Some(Reset {
                slot: job.slot,
                key,
                accessible: job.initial.min(job.accessible),
                image: job.image,
                history,
            }),
            Err(_) => {
                self.finish_stale(job.slot);
                None
            }
        }
    }

    /// What returns reset slots to the idle set (one, or a batch's under one lock): see
    /// [`Finishing`].
    pub fn finishing(&self) -> Finishing<'_> {
        Finishing {
            pool: self,
            state: None,
            stamp: None,
        }
    }

    fn finish_stale(&self, slot: u32) {
        self.lock().slots.finish(self.local(slot), None);
    }

    /// Pushes this shard's least recently used warm slot out (the pool is over its cap, and
    /// this slot is the oldest in it), or, for `bytes`, its least recently used one that keeps
    /// resident pages (the pool is over its byte cap, and this shard keeps the most). Returns
    /// whether there was one.
    pub fn give_back(&self, bytes: bool) -> bool {
        let mut state = self.lock();
        let evicted = if bytes {
            state.slots.evict_keeping()
        } else {
            state.slots.evict()
        };
        let Some((local, warm)) = evicted else {
            return false;
        };
        self.cool(&mut state.slots, local, warm);
        self.publish(&state.slots);
        true
    }

    /// Gives what a slot pushed out of the warm set holds back to the kernel: its kept pages
    /// and whatever else its resets may have left resident (one decommit, see
    /// [`left_resident`](crate::reset::left_resident)) and its image (replaced with fresh
    /// zero pages). It is then cold, keeping its accessible size, which reads as zeros. If that
    /// fails it stays stale, and is re-mapped before its next use. Runs under the lock, since a cold slot
    /// can be taken as soon as the lock is released.
    fn cool(&self, slots: &mut MemorySlots<MemoryKey>, local: SlotId, warm: Warm<MemoryKey>) {
        let slot = self.first + local.as_u32();
        // SAFETY: the slot is idle (`Stale`, just pushed out) and this pool's lock is held, so
        // no one else touches it; its first `warm.accessible` bytes are readable and writable
        // (a warm slot's invariant); its reservation is `memory_reservation` bytes.
        let mut bytes = unsafe {
            self.region
                .bytes(slot, self.layout.memory_reservation, warm.accessible)
        };
        // Its image (replaced with zero pages) and every page its resets may have left resident,
        // those above the accessible size too.
        let unmapped = warm.image.as_ref().is_none_or(|image| {
            bytes
                .replace_with_zeros(image.offset()..image.offset() + image.len())
                .is_ok()
        });
        let without_map = !self.use_page_map || sys::page_map().is_none();
        let resident = crate::reset::left_resident(
            &warm.history.kept,
            self.layout.memory_reservation,
            self.layout.page_size,
            crate::reset::read_window(self.layout.memory_keep_resident, without_map),
        );
        let cooled = unmapped
            && bytes
                .decommit(&resident)
                .map(|done| done.count(&self.decommit_calls, &self.decommit_ranges))
                .is_ok();
        if cooled {
            slots.cooled(local, bytes.accessible());
        }
    }

    /// Pushes every warm slot out (its kept pages and image given back, cold from now on) and
    /// returns how many and the resident bytes they kept. Slots held or being reset stay.
    pub fn release_idle(&self) -> Released {
        let mut state = self.lock();
        let mut released = Released::default();
        while let Some((local, warm)) = state.slots.evict() {
            released += Released::new(1, warm.history.kept.bytes() as u64);
            self.cool(&mut state.slots, local, warm);
        }
        self.publish(&state.slots);
        released
    }

    /// Forgets the warm slots of `module`; its slots not idle go cold when they come back.
    pub fn purge(&self, module: ModuleId) {
        let mut state = self.lock();
        let State { slots, learned } = &mut *state;
        learned.retain(|(m, _), _| *m != module);
        for (local, warm) in slots.purge(|(m, _)| *m == module) {
            self.cool(slots, local, warm);
        }
        self.publish(slots);
    }

    /// Warm slots, and the resident bytes they keep.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        (state.slots.warm(), state.slots.warm_resident())
    }
}
