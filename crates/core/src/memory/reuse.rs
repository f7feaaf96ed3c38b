//! Reusing the reservation of a memory that owned one.
//!
//! A backend that gives every memory its own reservation pays an `mmap` and a `munmap` of the
//! whole reservation (gigabytes of address space, and the page tables under it) per memory.
//! [`Memory::into_reservation`] takes the reservation back when the memory goes, its contents
//! discarded, and [`Memory::new_dynamic_reusing`] builds a later memory of the same
//! [`ReservationLayout`] in it.

use crate::units::{exact_bytes, human_bytes};
use std::ptr::NonNull;

use anyhow::{Context, Result, anyhow, bail};

use super::{Memory, Storage, initial_size, reserve, round_up, to_usize};
use crate::limiter::ResourceLimiter;
use crate::mmap::Mmap;
use crate::sys;
use crate::tunables::Tunables;
use crate::types::MemoryType;

/// Where a memory's bytes lie in a reservation of its own: `[pre_guard][capacity][guard]`,
/// all in bytes, all multiples of the host page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReservationLayout {
    /// Inaccessible bytes before the memory.
    pub pre_guard: usize,
    /// Bytes the memory may grow to in place.
    pub capacity: usize,
    /// Inaccessible bytes after the capacity.
    pub guard: usize,
}

/// The address space of a memory that owned its reservation, taken back by
/// [`Memory::into_reservation`] for a later memory of the same layout. No byte of it holds
/// anything the memory held. Unmapped on drop.
///
/// Invariant: `mmap` is `layout`'s size; the `accessible` bytes after the pre-guard are readable,
/// writable and read as zero (anonymous memory decommitted or never written), the rest is
/// `PROT_NONE`.
#[derive(Debug)]
pub struct Reservation {
    mmap: Mmap,
    layout: ReservationLayout,
    accessible: usize,
}

impl Reservation {
    /// The layout a memory built in this reservation has.
    pub fn layout(&self) -> ReservationLayout {
        self.layout
    }

    /// Its size in bytes, guards included.
    pub fn len(&self) -> usize {
        self.mmap.len()
    }

    /// Whether it is empty (never: a reservation holds at least its guards' pages).
    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    /// The mapping with exactly `bytes` (rounded up to the host page) accessible after the
    /// pre-guard. The bytes read as zero by the type's invariant.
    fn fit(mut self, bytes: usize) -> Result<Mmap> {
        let needed = round_up(bytes, sys::page_size()).unwrap_or(usize::MAX);
        let pre_guard = self.layout.pre_guard;
        if needed > self.accessible {
            self.mmap
                .make_accessible(pre_guard + self.accessible, needed - self.accessible)?;
        } else if needed < self.accessible {
            self.mmap
                .make_inaccessible(pre_guard + needed, self.accessible - needed)?;
        }
        Ok(self.mmap)
    }
}

impl Memory {
    /// Like [`Memory::new_dynamic`], but first offers `reuse` the layout the memory needs. A
    /// [`Reservation`] of that layout it returns is used instead of fresh address space, its
    /// accessible bytes made the memory's initial size; one of another layout, or one whose
    /// protection cannot be changed, is unmapped and fresh address space reserved.
    pub fn new_dynamic_reusing(
        ty: &MemoryType,
        tunables: &Tunables,
        backend_max: Option<usize>,
        limiter: Option<&mut (dyn ResourceLimiter + '_)>,
        reuse: impl FnOnce(ReservationLayout) -> Option<Reservation>,
    ) -> Result<Memory> {
        ty.validate()?;
        let (byte_size, maximum) = initial_size(ty, backend_max, limiter)?;
        let page = sys::page_size();
        let reservation = to_usize("memory reservation", tunables.memory_reservation)?;
        let growth = to_usize(
            "memory growth reservation",
            tunables.memory_reservation_for_growth,
        )?;
        let guard = to_usize("memory guard", tunables.memory_guard_size)?;
        let pre_guard = to_usize("memory pre-guard", tunables.pre_guard_size())?;
        let capacity = if byte_size <= reservation {
            Some(reservation)
        } else {
            byte_size.checked_add(growth)
        };
        let capacity = capacity.and_then(|c| round_up(c, page)).ok_or_else(|| {
            anyhow!(
                "memory of {} plus {} to grow overflows",
                human_bytes(byte_size as u64),
                human_bytes(growth as u64)
            )
        })?;
        let layout = ReservationLayout {
            pre_guard,
            capacity,
            guard,
        };
        let reused = reuse(layout)
            .filter(|r| r.layout == layout)
            .and_then(|r| r.fit(byte_size).ok());
        let mmap = match reused {
            Some(mmap) => mmap,
            None => reserve(pre_guard, capacity, guard, byte_size)?,
        };
        Ok(Memory {
            ty: *ty,
            storage: Storage::Owned {
                mmap,
                pre_guard,
                capacity,
                guard,
                growth_reserve: growth,
                may_move: tunables.memory_may_move,
            },
            byte_size,
            maximum,
            reservation_counter: None,
            image: None,
        })
    }

    /// Takes back this memory's own reservation for a later memory of the same layout, with
    /// its contents discarded: the accessible bytes are decommitted (`madvise`), or, if a
    /// copy-on-write image is mapped over them, replaced by fresh zero pages (one `mmap`).
    /// `None` for a memory in a backend's slot, or if the reset failed (the reservation is
    /// then unmapped, as on drop). A tracked reservation leaves its counter here.
    pub fn into_reservation(mut self) -> Option<Reservation> {
        let accessible = self.accessible_bytes();
        let had_image = self.image.take().is_some();
        let Storage::Owned {
            mmap,
            pre_guard,
            capacity,
            guard,
            ..
        } = &mut self.storage
        else {
            return None;
        };
        let layout = ReservationLayout {
            pre_guard: *pre_guard,
            capacity: *capacity,
            guard: *guard,
        };
        let reset = if had_image {
            // SAFETY: `pre_guard <= mmap.len()` (the mapping is pre-guard, capacity, guard), so
            // the offset stays within our mapping, whose address is not null.
            let base = unsafe { NonNull::new_unchecked(mmap.as_mut_ptr().add(layout.pre_guard)) };
            // SAFETY: `base..base + accessible` lies inside our own page-aligned mapping (the
            // accessible bytes never pass the capacity), and `self` is consumed, so no reference
            // into it is live.
            unsafe { sys::replace_with_zeros(base, accessible) }.is_ok()
        } else {
            let start = mmap.as_ptr().addr() + layout.pre_guard;
            let range = start..start + accessible;
            // SAFETY: `range` is page-aligned inside our own private anonymous mapping, and
            // `self` is consumed, so no reference into it is live. Through `decommit_all`, this
            // zap takes its turn with the process's others.
            unsafe { sys::decommit_all(std::slice::from_ref(&range)) }.is_ok()
        };
        if !reset {
            return None;
        }
        let mmap = std::mem::replace(mmap, Mmap::empty());
        // Drop now sees an empty reservation and subtracts nothing: take it off here.
        if let Some(counter) = &self.reservation_counter {
            counter.fetch_sub(mmap.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Some(Reservation {
            mmap,
            layout,
            accessible,
        })
    }

    /// Faults in `offset..offset + len` of the memory for writing in one system call, instead
    /// of a page fault per page when code first writes them (`MADV_POPULATE_WRITE`). Contents do
    /// not change. For pages a backend expects the instance to write; a kernel without it makes
    /// this a no-op.
    pub fn prefault(&mut self, offset: usize, len: usize) -> Result<()> {
        let page = sys::page_size();
        let end = offset.checked_add(len);
        if end.is_none_or(|end| end > self.accessible_bytes())
            || !offset.is_multiple_of(page)
            || !len.is_multiple_of(page)
        {
            bail!(
                "cannot prefault {} at offset {offset}: not page-aligned inside {} accessible",
                exact_bytes(len as u64),
                exact_bytes(self.accessible_bytes() as u64)
            );
        }
        let Some(base) = NonNull::new(self.base()) else {
            bail!("memory has a null base");
        };
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the range is page-aligned inside the accessible bytes (checked), which this
        // memory uses exclusively.
        unsafe { sys::prefault(base.add(offset), len) }.with_context(|| {
            format!(
                "failed to prefault {} of a memory at offset {offset}",
                exact_bytes(len as u64)
            )
        })
    }
}
