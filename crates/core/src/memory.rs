//! Linear memories.
//!
//! A memory's accessible bytes start its reservation; above them the reservation is
//! `PROT_NONE`, and a guard region follows (a pre-guard may stand before):
//!
//! ```text
//!   [pre-guard][accessible ........][PROT_NONE rest of reservation][guard]
//!              ^ base              ^ base + byte_size               ^ base + capacity
//! ```
//!
//! Growing inside the reservation is one `mprotect`. A memory that owns its reservation
//! ([`Memory::new_dynamic`]) and may move is re-reserved and copied when it grows past it; a
//! memory in a backend's slot ([`Memory::new_static`]) never moves. A grow that cannot be
//! done returns `Ok(None)` (the spec's -1) and changes nothing.
//!
//! Memories with one-byte pages (custom-page-sizes) have an exact `current_length`, but the
//! host page holding their last byte is accessible up to its end: code for them needs explicit
//! bounds checks. Growth zeroes those bytes before they become part of the memory.

use crate::units::{exact_bytes, human_bytes};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};

use crate::error::OutOfBounds;
use crate::image::MemoryImage;
use crate::limiter::{Resource, ResourceLimiter, admit_initial};
use crate::mmap::Mmap;
use crate::sys;
use crate::tunables::Tunables;
use crate::types::MemoryType;
use crate::vmcontext::VMMemoryDefinition;

mod reuse;

pub use reuse::{Reservation, ReservationLayout};

/// A linear memory.
///
/// Invariants: `byte_size` is a whole number of the type's pages and never above
/// `maximum` nor `capacity`; the host pages covering `0..byte_size` from `base` are
/// readable and writable, the rest of `capacity` is `PROT_NONE`.
#[derive(Debug)]
pub struct Memory {
    ty: MemoryType,
    storage: Storage,
    byte_size: usize,
    maximum: Option<usize>,
    /// A backend's count of reserved bytes, kept current across moves and on drop.
    reservation_counter: Option<Arc<AtomicU64>>,
    /// The copy-on-write image mapped over the start of the memory, if any.
    image: Option<Arc<MemoryImage>>,
}

#[derive(Debug)]
enum Storage {
    /// An owned reservation `[pre_guard][capacity][guard]`.
    Owned {
        mmap: Mmap,
        pre_guard: usize,
        capacity: usize,
        guard: usize,
        growth_reserve: usize,
        may_move: bool,
    },
    /// `capacity` bytes at `base`, inside a mapping a backend owns.
    Static { base: NonNull<u8>, capacity: usize },
}

// SAFETY: a `Memory` owns its bytes (`Owned`) or has exclusive use of them by
// `new_static`'s contract (`Static`); nothing in it is tied to a thread.
unsafe impl Send for Memory {}
// SAFETY: `&Memory` only reads; every mutation takes `&mut self`.
unsafe impl Sync for Memory {}

fn round_up(n: usize, to: usize) -> Option<usize> {
    n.checked_next_multiple_of(to)
}

fn to_usize(what: &str, bytes: u64) -> Result<usize> {
    usize::try_from(bytes).map_err(|_| {
        anyhow!(
            "{what} of {} does not fit the host's address space",
            human_bytes(bytes)
        )
    })
}

/// The initial size in bytes and the effective maximum, after the type, the backend's
/// limit and the limiter have had their say.
fn initial_size(
    ty: &MemoryType,
    backend_max: Option<usize>,
    limiter: Option<&mut (dyn ResourceLimiter + '_)>,
) -> Result<(usize, Option<usize>)> {
    let minimum = ty
        .minimum_bytes()
        .ok_or_else(|| anyhow!("memory minimum of {} pages overflows a 64-bit size", ty.minimum))?;
    let minimum = to_usize("memory minimum", minimum)?;
    let type_max = ty.maximum_bytes().and_then(|m| usize::try_from(m).ok());
    let maximum = admit_initial(Resource::Memory, minimum, type_max, backend_max, limiter)?;
    Ok((minimum, maximum))
}

impl Memory {
    /// A memory in its own reservation, sized by `tunables`: `memory_reservation` bytes if
    /// the minimum fits there, else the minimum plus `memory_reservation_for_growth`; then
    /// a guard (and a pre-guard if asked). `backend_max` caps its size in bytes.
    ///
    /// ```
    /// use berth_core::{Memory, MemoryType, Tunables};
    ///
    /// let mut tunables = Tunables::default();
    /// tunables.memory_reservation = 1 << 20; // 1 MiB, grown in place
    /// let mut memory = Memory::new_dynamic(&MemoryType::new(1, Some(4)), &tunables, None, None)?;
    /// assert_eq!(memory.byte_size(), 65536);
    /// assert!(memory.as_slice().iter().all(|&b| b == 0));
    /// assert_eq!(memory.grow(3, None)?, Some(1)); // the old size in pages
    /// assert_eq!(memory.grow(1, None)?, None); // past the maximum: the spec's -1
    /// assert_eq!(memory.vmmemory().current_length, 4 * 65536);
    /// # anyhow::Ok(())
    /// ```
    pub fn new_dynamic(
        ty: &MemoryType,
        tunables: &Tunables,
        backend_max: Option<usize>,
        limiter: Option<&mut (dyn ResourceLimiter + '_)>,
    ) -> Result<Memory> {
        Memory::new_dynamic_reusing(ty, tunables, backend_max, limiter, |_| None)
    }

    /// A memory in `capacity` bytes at `base`, inside a mapping the caller owns (a pool
    /// slot). `capacity` is also its maximum size; it never moves. The first `accessible`
    /// bytes are already readable and writable (a slot reused as it was left); the memory
    /// makes exactly the pages of its initial size accessible, adding or removing access as
    /// needed, so that the bytes past its size fault.
    ///
    /// # Safety
    ///
    /// `base..base + capacity` is page-aligned, inside a mapping made by [`sys::reserve`]
    /// (or remapped by [`sys::reset_to_reserved`]) and used by nothing else until this
    /// `Memory` is handed back to the caller, who resets it before any other use. Its first
    /// `accessible` bytes are readable and writable; the rest is `PROT_NONE`; and every byte of
    /// `base..base + capacity` reads as zero once accessible (so a byte made `PROT_NONE`
    /// without being zeroed or decommitted does not qualify). The caller keeps the mapping
    /// alive as long as the `Memory` lives.
    pub unsafe fn new_static(
        ty: &MemoryType,
        base: NonNull<u8>,
        capacity: usize,
        accessible: usize,
        limiter: Option<&mut (dyn ResourceLimiter + '_)>,
    ) -> Result<Memory> {
        ty.validate()?;
        let page = sys::page_size();
        if !capacity.is_multiple_of(page)
            || !accessible.is_multiple_of(page)
            || accessible > capacity
            || !base.as_ptr().addr().is_multiple_of(page)
        {
            bail!(
                "static memory of {} ({} accessible) at {base:p} is not page-aligned",
                exact_bytes(capacity as u64),
                exact_bytes(accessible as u64)
            );
        }
        let (byte_size, maximum) = initial_size(ty, Some(capacity), limiter)?;
        let needed = round_up(byte_size, page).unwrap_or(usize::MAX);
        if needed > accessible {
            // SAFETY: `accessible..needed` is inside the caller's `base..base + capacity`
            // (`byte_size <= capacity`, checked by `initial_size`, and `capacity` is
            // page-aligned), which the caller lets us use exclusively; it is past the
            // accessible bytes, so no reference into it exists.
            unsafe { sys::make_accessible(base.add(accessible), needed - accessible) }.with_context(
                || {
                    format!(
                        "failed to make {} of a memory slot accessible",
                        exact_bytes((needed - accessible) as u64)
                    )
                },
            )?;
        } else if needed < accessible {
            // SAFETY: `needed..accessible` is inside the caller's range, and no reference into
            // it exists (the memory is not handed out yet).
            unsafe { sys::make_inaccessible(base.add(needed), accessible - needed) }.with_context(|| {
                format!(
                    "failed to protect {} of a memory slot",
                    exact_bytes((accessible - needed) as u64)
                )
            })?;
        }
        Ok(Memory {
            ty: *ty,
            storage: Storage::Static { base, capacity },
            byte_size,
            maximum,
            reservation_counter: None,
            image: None,
        })
    }

    /// Bytes from the base that are readable and writable: the size rounded up to the host
    /// page. A backend resets this much when it takes a static memory back.
    pub fn accessible_bytes(&self) -> usize {
        round_up(self.byte_size, sys::page_size()).unwrap_or(self.byte_size)
    }

    /// The memory's type.
    pub fn ty(&self) -> &MemoryType {
        &self.ty
    }

    /// Accessible size in bytes.
    pub fn byte_size(&self) -> usize {
        self.byte_size
    }

    /// Accessible size in pages.
    pub fn pages(&self) -> u64 {
        self.byte_size as u64 / self.ty.page_size()
    }

    /// The largest size in bytes this memory may reach, if it is bounded below the address
    /// space.
    pub fn maximum_byte_size(&self) -> Option<usize> {
        self.maximum
    }

    /// Bytes it can grow to without moving.
    pub fn byte_capacity(&self) -> usize {
        match &self.storage {
            Storage::Owned { capacity, .. } | Storage::Static { capacity, .. } => *capacity,
        }
    }

    /// Address space this memory holds itself (reservation and guards); 0 for a memory in a
    /// backend's slot, whose address space the backend counts.
    pub fn reserved_bytes(&self) -> usize {
        match &self.storage {
            Storage::Owned { mmap, .. } => mmap.len(),
            Storage::Static { .. } => 0,
        }
    }

    /// Adds this memory's reservation to `counter` and keeps it there, current across moves,
    /// until the memory is dropped: a backend's exact "address space reserved" statistic.
    pub fn track_reservation(&mut self, counter: Arc<AtomicU64>) {
        counter.fetch_add(self.reserved_bytes() as u64, Ordering::Relaxed);
        if let Some(previous) = self.reservation_counter.replace(counter) {
            previous.fetch_sub(self.reserved_bytes() as u64, Ordering::Relaxed);
        }
    }

    /// The copy-on-write image mapped over this memory, if any: its data segments need not
    /// be copied.
    pub fn image(&self) -> Option<&Arc<MemoryImage>> {
        self.image.as_ref()
    }

    /// Drops this memory and hands back its image, if any (for a pool whose slot keeps the
    /// image mapped for the next memory, without touching its reference count).
    pub fn into_image(mut self) -> Option<Arc<MemoryImage>> {
        self.image.take()
    }

    /// Maps `image` over the start of this memory (one `mmap`), so its initial data is in place
    /// without a copy. The image must lie within the accessible bytes.
    pub fn map_image(&mut self, image: Arc<MemoryImage>) -> Result<()> {
        let end = image.offset().checked_add(image.len());
        if end.is_none_or(|end| end > self.accessible_bytes()) {
            bail!(
                "memory image of {} at offset {} does not fit {} accessible",
                exact_bytes(image.len() as u64),
                image.offset(),
                exact_bytes(self.accessible_bytes() as u64)
            );
        }
        let base = NonNull::new(self.base()).ok_or_else(|| anyhow!("memory has a null base"))?;
        // SAFETY: the image lies within our accessible bytes (checked), which this memory uses
        // exclusively; `&mut self` means no reference into them is live.
        unsafe { image.map_at(base)? };
        self.image = Some(image);
        Ok(())
    }

    /// Records that `image` is already mapped over this memory (a pool slot that kept it).
    ///
    /// # Safety
    ///
    /// `image` is mapped at this memory's base plus its offset, unmodified since its last reset,
    /// and lies within the accessible bytes.
    pub unsafe fn assume_image(&mut self, image: Arc<MemoryImage>) {
        self.image = Some(image);
    }

    /// Whether the memory lives in a backend's slot (and so never moves).
    pub fn is_static(&self) -> bool {
        matches!(self.storage, Storage::Static { .. })
    }

    /// The first byte of the memory.
    pub fn base(&self) -> *mut u8 {
        match &self.storage {
            Storage::Owned { mmap, pre_guard, .. } => mmap.as_ptr().wrapping_add(*pre_guard).cast_mut(),
            Storage::Static { base, .. } => base.as_ptr(),
        }
    }

    /// The definition compiled code reads.
    pub fn vmmemory(&self) -> VMMemoryDefinition {
        VMMemoryDefinition {
            base: self.base(),
            current_length: self.byte_size,
        }
    }

    /// The accessible bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `0..byte_size` is accessible (type invariant) and this memory has
        // exclusive use of it; `&self` means no `&mut` slice is live.
        unsafe { std::slice::from_raw_parts(self.base(), self.byte_size) }
    }

    /// The accessible bytes, for writing.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the slice exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.base(), self.byte_size) }
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`; an [`OutOfBounds`] error if they
    /// are not all inside the memory.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let range = self.bounds(offset, buf.len())?;
        buf.copy_from_slice(&self.as_slice()[range]);
        Ok(())
    }

    /// Copies `data` to `offset`; an [`OutOfBounds`] error if it does not fit.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let range = self.bounds(offset, data.len())?;
        self.as_mut_slice()[range].copy_from_slice(data);
        Ok(())
    }

    fn bounds(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok();
        match start.and_then(|s| Some((s, s.checked_add(len)?))) {
            Some((start, end)) if end <= self.byte_size => Ok(start..end),
            _ => Err(anyhow::Error::new(OutOfBounds {
                resource: "memory".into(),
                offset,
                len: len as u64,
                size: self.byte_size as u64,
            })),
        }
    }

    /// Grows by `delta` pages: `Ok(Some(old_pages))`, or `Ok(None)` (the spec's -1) if the
    /// maximum, the backend's limit, the limiter or the system says no, with the memory
    /// unchanged. An error from the limiter is passed on, also with the memory unchanged.
    ///
    /// Growth may move an owned memory if its tunables allowed it: callers must re-read
    /// [`Memory::vmmemory`] afterwards.
    pub fn grow(
        &mut self,
        delta: u64,
        limiter: Option<&mut (dyn ResourceLimiter + '_)>,
    ) -> Result<Option<u64>> {
        let old_pages = self.pages();
        if delta == 0 {
            return Ok(Some(old_pages));
        }
        let max_pages = self.ty.maximum.unwrap_or_else(|| self.ty.absolute_max_pages());
        let new_bytes = old_pages
            .checked_add(delta)
            .filter(|&pages| pages <= max_pages)
            .and_then(|pages| pages.checked_mul(self.ty.page_size()))
            .and_then(|bytes| usize::try_from(bytes).ok())
            .filter(|&bytes| self.maximum.is_none_or(|max| bytes <= max));
        let Some(new_bytes) = new_bytes else {
            return Ok(None);
        };
        if let Some(limiter) = limiter
            && !limiter.memory_growing(self.byte_size, new_bytes, self.maximum)?
        {
            return Ok(None);
        }
        let grown = match &mut self.storage {
            Storage::Static { base, capacity } => {
                new_bytes <= *capacity && grow_in_place(*base, self.byte_size, new_bytes)
            }
            Storage::Owned {
                mmap,
                pre_guard,
                capacity,
                ..
            } if new_bytes <= *capacity => {
                // SAFETY: `pre_guard` is inside our own mapping (it is where the memory starts).
                let base = unsafe { NonNull::new_unchecked(mmap.as_mut_ptr().add(*pre_guard)) };
                grow_in_place(base, self.byte_size, new_bytes)
            }
            Storage::Owned { may_move: false, .. } => false,
            Storage::Owned {
                mmap,
                pre_guard,
                capacity,
                guard,
                growth_reserve,
                ..
            } => {
                let image = self
                    .image
                    .as_ref()
                    .map_or(0..0, |image| image.offset()..image.offset() + image.len());
                match move_to_new_reservation(
                    mmap,
                    *pre_guard,
                    *guard,
                    *growth_reserve,
                    self.byte_size,
                    new_bytes,
                    image,
                ) {
                    Some((new_mmap, new_capacity)) => {
                        // The contents were copied; the image mapping stayed behind.
                        self.image = None;
                        if let Some(counter) = &self.reservation_counter {
                            counter.fetch_add(new_mmap.len() as u64, Ordering::Relaxed);
                            counter.fetch_sub(mmap.len() as u64, Ordering::Relaxed);
                        }
                        *mmap = new_mmap;
                        *capacity = new_capacity;
                        true
                    }
                    None => false,
                }
            }
        };
        if !grown {
            return Ok(None);
        }
        // With one-byte pages the host page holding the last byte is accessible past the
        // size; code may have written there, so the newly valid bytes are zeroed.
        let tail_end = round_up(self.byte_size, sys::page_size())
            .unwrap_or(new_bytes)
            .min(new_bytes);
        if tail_end > self.byte_size {
            let old = self.byte_size;
            self.byte_size = tail_end;
            self.as_mut_slice()[old..].fill(0);
        }
        self.byte_size = new_bytes;
        Ok(Some(old_pages))
    }
}

/// Reserves `[pre_guard][capacity][guard]` with the first `accessible` bytes after the
/// pre-guard made accessible.
fn reserve(pre_guard: usize, capacity: usize, guard: usize, accessible: usize) -> Result<Mmap> {
    let page = sys::page_size();
    let total = pre_guard
        .checked_add(capacity)
        .and_then(|n| n.checked_add(guard))
        .ok_or_else(|| {
            anyhow!(
                "memory reservation of {} plus guards overflows",
                human_bytes(capacity as u64)
            )
        })?;
    let mut mmap = Mmap::reserve(total)
        .with_context(|| format!("failed to reserve {} for a memory", human_bytes(total as u64)))?;
    let accessible = round_up(accessible, page).unwrap_or(usize::MAX);
    mmap.make_accessible(pre_guard, accessible)
        .with_context(|| format!("failed to commit {} of a memory", human_bytes(accessible as u64)))?;
    Ok(mmap)
}

/// Makes the host pages between `old` and `new` bytes accessible; false on failure.
fn grow_in_place(base: NonNull<u8>, old: usize, new: usize) -> bool {
    let page = sys::page_size();
    let (Some(from), Some(to)) = (round_up(old, page), round_up(new, page)) else {
        return false;
    };
    if to == from {
        return true;
    }
    // SAFETY: the caller checked `new <= capacity`, so `from..to` lies inside the memory's
    // page-aligned reservation, which the memory uses exclusively; the bytes were
    // `PROT_NONE` so no reference into them exists.
    unsafe { sys::make_accessible(base.add(from), to - from) }.is_ok()
}

/// Moves a memory of `old` bytes to a fresh reservation able to hold `new` bytes plus the
/// growth reserve, copying its contents. `None` if that cannot be reserved.
///
/// Only what may differ from zero is copied: with a page map, the pages the kernel does not
/// prove clean and the copy-on-write image's range (`image`, its pages read as the file's
/// bytes); the fresh reservation reads as zeros elsewhere. Copying every byte would make every
/// page of the new reservation resident, however little of the memory was ever written.
fn move_to_new_reservation(
    old_mmap: &Mmap,
    pre_guard: usize,
    guard: usize,
    growth_reserve: usize,
    old: usize,
    new: usize,
    image: std::ops::Range<usize>,
) -> Option<(Mmap, usize)> {
    let capacity = new
        .checked_add(growth_reserve)
        .and_then(|c| round_up(c, sys::page_size()))?;
    let mut mmap = reserve(pre_guard, capacity, guard, new).ok()?;
    let mut runs = Vec::new();
    let scanned = sys::page_map()
        .zip(NonNull::new(old_mmap.as_ptr().cast_mut()))
        .is_some_and(|(map, base)| {
            // SAFETY: `pre_guard` is inside the old mapping (where the memory starts).
            let start = unsafe { base.add(pre_guard) };
            let pages = round_up(old, sys::page_size()).unwrap_or(old);
            map.written(start, pages, &mut runs).is_ok()
        });
    if !scanned {
        runs.clear();
        runs.push(0..old);
    } else if !image.is_empty() {
        runs.push(image);
    }
    for run in runs {
        let run = run.start.min(old)..run.end.min(old);
        // SAFETY: `run` lies within the `old` bytes after the old pre-guard, accessible in the
        // old mapping, and within the `new >= old` bytes after the new pre-guard, accessible in
        // the new one; the two mappings are distinct, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                old_mmap.as_ptr().add(pre_guard + run.start),
                mmap.as_mut_ptr().add(pre_guard + run.start),
                run.len(),
            );
        }
    }
    Some((mmap, capacity))
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Some(counter) = &self.reservation_counter {
            counter.fetch_sub(self.reserved_bytes() as u64, Ordering::Relaxed);
        }
    }
}
