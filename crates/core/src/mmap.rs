//! An owned, page-aligned virtual-memory reservation.

use crate::units::{exact_bytes, human_bytes};
use std::ops::Range;
use std::ptr::NonNull;

use anyhow::{Context, Result, bail};

use crate::sys;

/// An owned reservation of address space, `PROT_NONE` until parts are made accessible.
/// Unmapped on drop.
///
/// Invariant: `ptr..ptr + len` is a mapping this value made with [`sys::reserve`] and no one
/// else unmaps; `len` is a multiple of the page size (0 for an empty `Mmap`, which maps
/// nothing).
#[derive(Debug)]
pub struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an `Mmap` is plain address space; it has no thread affinity and `&Mmap` gives no
// access to its bytes.
unsafe impl Send for Mmap {}
// SAFETY: `&Mmap` gives no access to the bytes and every method that changes the mapping
// takes `&mut self`, so shared references cannot race.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// An empty reservation (no system call).
    pub fn empty() -> Mmap {
        Mmap {
            ptr: NonNull::dangling(),
            len: 0,
        }
    }

    /// Reserves `len` bytes of `PROT_NONE` address space; `len` must be a multiple of the
    /// page size.
    pub fn reserve(len: usize) -> Result<Mmap> {
        if len == 0 {
            return Ok(Mmap::empty());
        }
        let page = sys::page_size();
        if !len.is_multiple_of(page) {
            bail!(
                "cannot reserve {}: not a multiple of the page size ({})",
                human_bytes(len as u64),
                human_bytes(page as u64)
            );
        }
        let ptr = sys::reserve(len)
            .with_context(|| format!("failed to reserve {} of address space", human_bytes(len as u64)))?;
        Ok(Mmap { ptr, len })
    }

    /// Reserves `len` bytes and makes the first `accessible` of them readable and writable.
    pub fn with_accessible(accessible: usize, len: usize) -> Result<Mmap> {
        let mut mmap = Mmap::reserve(len)?;
        mmap.make_accessible(0, accessible)?;
        Ok(mmap)
    }

    /// The first byte of the reservation.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The first byte of the reservation, for writing.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The reservation's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the reservation is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The part `offset..offset + len`, checked to be page-aligned and inside.
    fn range(&self, offset: usize, len: usize) -> Result<Option<NonNull<u8>>> {
        let page = sys::page_size();
        let end = offset.checked_add(len);
        match end {
            Some(end) if end <= self.len && offset.is_multiple_of(page) && len.is_multiple_of(page) => {}
            _ => bail!(
                "range of {} at offset {offset} is not page-aligned inside a reservation of {}",
                exact_bytes(len as u64),
                exact_bytes(self.len as u64)
            ),
        }
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: `offset + len <= self.len`, so the result stays inside the mapping.
        Ok(Some(unsafe { self.ptr.add(offset) }))
    }

    /// Makes `offset..offset + len` readable and writable; on failure it is left inaccessible.
    pub fn make_accessible(&mut self, offset: usize, len: usize) -> Result<()> {
        if let Some(ptr) = self.range(offset, len)? {
            // SAFETY: the range is inside our own mapping (checked above), and `&mut self`
            // means no reference into it is live.
            unsafe { sys::make_accessible(ptr, len) }.with_context(|| {
                format!(
                    "failed to make {} accessible at offset {offset}",
                    exact_bytes(len as u64)
                )
            })?;
        }
        Ok(())
    }

    /// Makes `offset..offset + len` inaccessible again.
    pub fn make_inaccessible(&mut self, offset: usize, len: usize) -> Result<()> {
        if let Some(ptr) = self.range(offset, len)? {
            // SAFETY: our own mapping; `&mut self` means no reference into it is live.
            unsafe { sys::make_inaccessible(ptr, len) }.with_context(|| {
                format!("failed to protect {} at offset {offset}", exact_bytes(len as u64))
            })?;
        }
        Ok(())
    }

    /// Discards the contents of `offset..offset + len`: they read as zeros afterwards.
    pub fn decommit(&mut self, offset: usize, len: usize) -> Result<()> {
        if let Some(ptr) = self.range(offset, len)? {
            // SAFETY: our own private anonymous mapping; `&mut self` means no reference into
            // it is live.
            unsafe { sys::decommit(ptr, len) }.with_context(|| {
                format!(
                    "failed to decommit {} at offset {offset}",
                    exact_bytes(len as u64)
                )
            })?;
        }
        Ok(())
    }

    /// The byte range `range` as a slice.
    ///
    /// # Safety
    ///
    /// Every byte of `range` is accessible (made so by [`Mmap::make_accessible`]) and not
    /// being written through a pointer for as long as the slice lives.
    pub unsafe fn slice(&self, range: Range<usize>) -> &[u8] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "range out of bounds"
        );
        // SAFETY: in bounds (asserted); accessible and not concurrently written per the
        // caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(range.start), range.len()) }
    }

    /// The byte range `range` as a mutable slice.
    ///
    /// # Safety
    ///
    /// Every byte of `range` is accessible and not accessed through any pointer for as long
    /// as the slice lives.
    pub unsafe fn slice_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "range out of bounds"
        );
        // SAFETY: in bounds (asserted); accessible and exclusive per the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(range.start), range.len()) }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: we made this mapping and own it; dropping means no one uses it any more.
        // A failure here cannot be reported and leaves only address space behind.
        let _ = unsafe { sys::unmap(self.ptr, self.len) };
    }
}
