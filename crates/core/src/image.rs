//! Copy-on-write memory images: a module's initial data, written once into a sealed memfd
//! and mapped `MAP_PRIVATE | MAP_FIXED` over the start of each new memory, so instantiation
//! copies no byte and a reset (`madvise(MADV_DONTNEED)`) brings the image back.
//!
//! A memory gets an image only if every active data segment targeting it has a constant
//! offset and ends within the memory's initial size: then applying the image is exactly
//! applying the segments in order. Otherwise (a `global.get` offset, a segment out of bounds,
//! which must fail instantiation) its segments are copied at instantiation, in order. Only the
//! data is written to the file, which stays sparse: data spread thinly over a large memory costs
//! the pages it touches, not the span (the file's holes read as zeros).

use crate::units::human_bytes;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;

use anyhow::{Context, Result};

use crate::sys;

/// One memory's initial data as a sealed in-memory file.
///
/// Invariants: `offset` and `len` are multiples of the host page size; the file holds `len`
/// bytes, the module's data segments for this memory applied in order over zeros; `offset +
/// len` is at most the memory's initial size rounded up to a host page.
#[derive(Debug)]
pub struct MemoryImage {
    fd: OwnedFd,
    offset: usize,
    len: usize,
    /// A read-only view of the file, mapped the first time a backend asks for the bytes (and
    /// tried again next time if that failed).
    view: OnceLock<View>,
    /// The page-aligned ranges of the image (offsets from its start) that hold data; the rest
    /// is zeros (holes in the file). Sorted, disjoint.
    data: Vec<std::ops::Range<usize>>,
}

/// A read-only shared mapping of an image's sealed file.
#[derive(Debug)]
struct View {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the view is read-only and the file sealed against writes: its bytes never change,
// so any thread may read them.
unsafe impl Send for View {}
// SAFETY: `&View` only reads the sealed, read-only file's bytes, which never change.
unsafe impl Sync for View {}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` came from `map_file_readonly`, is owned by this view, and
        // the only references into it (from `MemoryImage::bytes`) borrow the image, which is
        // being dropped.
        let _ = unsafe { sys::unmap(self.ptr, self.len) };
    }
}

impl MemoryImage {
    /// The image of a memory whose data segments, applied in order, put `placed` (offset in the
    /// memory, bytes) over zeros; `None` if they hold no byte. The caller checked that every
    /// segment fits the memory's initial size.
    pub(crate) fn new(mut placed: Vec<(usize, &[u8])>) -> Result<Option<MemoryImage>> {
        placed.retain(|(_, data)| !data.is_empty());
        let (Some(low), Some(high)) = (
            placed.iter().map(|(start, _)| *start).min(),
            placed.iter().map(|(start, data)| start + data.len()).max(),
        ) else {
            return Ok(None);
        };
        let page = sys::page_size();
        let offset = low / page * page;
        let end = high.next_multiple_of(page);
        let relative: Vec<(usize, &[u8])> = placed
            .iter()
            .map(|(start, data)| (start - offset, &data[..]))
            .collect();
        let fd = sys::create_image_file(end - offset, &relative).with_context(|| {
            format!(
                "failed to create a memory image of {}",
                human_bytes((end - offset) as u64)
            )
        })?;
        let mut pages: Vec<std::ops::Range<usize>> = relative
            .iter()
            .map(|(start, data)| start / page * page..(start + data.len()).next_multiple_of(page))
            .collect();
        pages.sort_unstable_by_key(|r| r.start);
        let mut data: Vec<std::ops::Range<usize>> = Vec::new();
        for range in pages {
            match data.last_mut() {
                Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
                _ => data.push(range),
            }
        }
        Ok(Some(MemoryImage {
            fd,
            offset,
            len: end - offset,
            view: OnceLock::new(),
            data,
        }))
    }

    /// Where the image starts in the memory (page-aligned).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Bytes the image covers (page-aligned).
    pub fn len(&self) -> usize {
        self.len
    }

    /// The page-aligned ranges of the image, as offsets from its start, that hold data (sorted,
    /// disjoint); everything else in it reads as zeros.
    pub fn data_pages(&self) -> &[std::ops::Range<usize>] {
        &self.data
    }

    /// The image's bytes (`len` of them, to be placed at `offset` in a memory), through a
    /// read-only view of its file mapped on first use; `None` if that mapping fails. A pool
    /// restores the image pages a tenant wrote by copying from here.
    pub fn bytes(&self) -> Option<&[u8]> {
        let view = match self.view.get() {
            Some(view) => view,
            None => {
                let ptr = sys::map_file_readonly(self.fd.as_fd(), self.len).ok()?;
                // If another thread mapped it first, this view is dropped (unmapped) here.
                let _ = self.view.set(View { ptr, len: self.len });
                self.view.get()?
            }
        };
        // SAFETY: the view maps `len` readable bytes of the sealed file, which never change,
        // and lives as long as the image (the returned slice borrows it).
        Some(unsafe { std::slice::from_raw_parts(view.ptr.as_ptr(), view.len) })
    }

    /// Whether the image is empty (never: empty images are not built).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maps the image over the memory starting at `base`.
    ///
    /// # Safety
    ///
    /// `base + offset .. base + offset + len` lies inside the accessible part of a memory
    /// the caller has exclusive use of, with no Rust reference into it live.
    pub(crate) unsafe fn map_at(&self, base: NonNull<u8>) -> Result<()> {
        // SAFETY: the range is the caller's (contract above); the file holds `len` bytes.
        unsafe { sys::map_image(base.add(self.offset), self.len, self.fd.as_fd()) }
            .with_context(|| format!("failed to map a memory image of {}", human_bytes(self.len as u64)))
    }
}
