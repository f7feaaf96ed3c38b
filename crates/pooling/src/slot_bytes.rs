//! Every raw operation on a slot's address range, in one place.
//!
//! A pool's slots are ranges of one mapping ([`Region`]). While a slot is handed to a tenant its
//! bytes are the tenant's; while the pool holds it (being set up, reset, or idle under the
//! pool's lock) they are the pool's alone, and the pool reaches them only through a
//! [`SlotBytes`], which is made under exactly that obligation. Its methods check that what
//! they touch lies inside the slot and, for reads and writes, inside its accessible bytes; so
//! every `unsafe` block below rests on the same two facts, named the same way:
//!
//! - *held*: the caller of [`Region::bytes`] holds the slot, so no tenant and no other thread
//!   reads or writes its bytes while the `SlotBytes` lives;
//! - *inside*: the range was checked to lie inside the slot (and inside its accessible bytes
//!   for a read or a write), which lies inside the region's mapping, which outlives every
//!   `SlotBytes`.

use std::io;
use std::ops::Range;
use std::ptr::NonNull;

use berth_core::sys::{self, PageMap};

use crate::decommit::Decommitted;

/// The slots of one pool: `count` slots `stride` bytes apart from `base`, inside a mapping
/// that outlives this value.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Region {
    base: NonNull<u8>,
    stride: usize,
    count: u32,
}

// SAFETY: a `Region` is an address range description; the bytes behind it are reached only
// through `SlotBytes`, whose constructor carries the obligation of exclusive use.
unsafe impl Send for Region {}
// SAFETY: `&Region` only computes addresses; the bytes are reached only through `SlotBytes`,
// whose constructor carries the obligation of exclusive use.
unsafe impl Sync for Region {}

impl Region {
    /// `count` slots of `stride` bytes from `base`.
    ///
    /// # Safety
    ///
    /// `base..base + count * stride` lies inside one mapping that outlives this value and every
    /// `SlotBytes` made from it, and `base` and `stride` are multiples of the page size.
    pub unsafe fn new(base: NonNull<u8>, stride: usize, count: u32) -> Region {
        Region { base, stride, count }
    }

    /// The first byte of `slot`.
    ///
    /// # Panics
    ///
    /// If `slot` is not one of the region's: a pool bug, never bad input.
    pub fn base(&self, slot: u32) -> NonNull<u8> {
        assert!(slot < self.count, "slot {slot} of a region of {}", self.count);
        // SAFETY: *inside*: `slot < count`, so the offset stays inside the region's mapping.
        unsafe { self.base.add(slot as usize * self.stride) }
    }

    /// The bytes of `slot`: `len` bytes from its start, the first `accessible` of them
    /// readable and writable.
    ///
    /// # Safety
    ///
    /// The caller holds `slot` (it is not handed to a tenant, and no other thread touches it
    /// until the returned value is dropped); `len` is at most the stride; the first
    /// `accessible` bytes of the slot are readable and writable.
    pub unsafe fn bytes(&self, slot: u32, len: usize, accessible: usize) -> SlotBytes {
        debug_assert!(len <= self.stride && accessible <= len);
        SlotBytes {
            base: self.base(slot),
            len,
            accessible,
        }
    }
}

/// Exclusive use of one slot's bytes, for setting it up or resetting it (see the module docs
/// for the two facts every operation rests on).
///
/// Invariant: `base..base + len` is the slot, page-aligned, and its first `accessible` bytes
/// are readable and writable.
#[derive(Debug)]
pub(crate) struct SlotBytes {
    base: NonNull<u8>,
    len: usize,
    accessible: usize,
}

impl SlotBytes {
    /// The slot's bytes that are readable and writable now.
    pub fn accessible(&self) -> usize {
        self.accessible
    }

    fn check(&self, range: &Range<usize>, limit: usize) {
        assert!(
            range.start <= range.end && range.end <= limit,
            "range {range:?} outside {limit} bytes of a slot"
        );
    }

    /// Zeroes `range` (offsets from the slot's start) with `memset`.
    pub fn zero(&mut self, range: Range<usize>) {
        self.check(&range, self.accessible);
        // SAFETY: *held* and *inside* (accessible, checked above).
        unsafe { self.base.add(range.start).as_ptr().write_bytes(0, range.len()) };
    }

    /// Copies `src` into `range` (offsets from the slot's start; the same length).
    pub fn copy_in(&mut self, range: Range<usize>, src: &[u8]) {
        self.check(&range, self.accessible);
        assert_eq!(
            range.len(),
            src.len(),
            "copy of {} bytes into {range:x?}",
            src.len()
        );
        // SAFETY: *held* and *inside* (accessible, checked above); `src` is not in the slot (a
        // slice the caller holds while the slot is held by this value cannot point into it).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(range.start).as_ptr(), src.len());
        }
    }

    /// The bytes of `range`.
    pub fn read(&self, range: Range<usize>) -> &[u8] {
        self.check(&range, self.accessible);
        // SAFETY: *held* and *inside* (accessible, checked above); `&self` means no write runs
        // while the slice lives.
        unsafe { std::slice::from_raw_parts(self.base.add(range.start).as_ptr(), range.len()) }
    }

    /// Whether every byte of `range` is zero. Reads whole 256-byte blocks without an early exit
    /// inside them, so the compiler can vectorize the check; stops at the first non-zero block.
    /// (Measured here: a quarter faster than a `memset` of the same bytes from 64 KiB up, where
    /// 64-byte blocks were as slow as the `memset`.)
    pub fn is_zero(&self, range: Range<usize>) -> bool {
        let (blocks, rest) = self.read(range).as_chunks::<256>();
        blocks.iter().all(|block| {
            block
                .as_chunks::<16>()
                .0
                .iter()
                .fold(0, |acc, w| acc | u128::from_ne_bytes(*w))
                == 0
        }) && rest.iter().all(|&b| b == 0)
    }

    /// Appends to `out` the runs of pages of `range` that the kernel does not prove clean (see
    /// [`PageMap::written`]), as offsets from `range.start`.
    pub fn written(&self, map: &PageMap, range: Range<usize>, out: &mut Vec<Range<usize>>) -> io::Result<()> {
        self.check(&range, self.accessible);
        if range.is_empty() {
            return Ok(());
        }
        // SAFETY: *inside*; the scan reads page tables only, never the bytes.
        let start = unsafe { self.base.add(range.start) };
        map.written(start, range.len(), out)
    }

    /// Makes `from..` the accessible end inaccessible again (`PROT_NONE`), so bytes past
    /// `from` fault; the bytes keep whatever they hold (the caller resets them first).
    pub fn protect_from(&mut self, from: usize) -> io::Result<()> {
        if from >= self.accessible {
            return Ok(());
        }
        // SAFETY: *held* and *inside* (`from < accessible <= len`); page-aligned, since resets
        // pass page-rounded sizes.
        unsafe { sys::make_inaccessible(self.base.add(from), self.accessible - from) }?;
        self.accessible = from;
        Ok(())
    }

    /// The addresses of `range` (offsets from the slot's start), for a decommit that runs
    /// later, in a batch ([`decommit`](crate::decommit)); the caller keeps holding the slot
    /// until it has run.
    pub fn address_range(&self, range: Range<usize>) -> Range<usize> {
        self.check(&range, self.len);
        let start = self.base.as_ptr().addr();
        start + range.start..start + range.end
    }

    /// Gives `ranges` back to the kernel now (they read as zeros again, or as the image), and
    /// says what that took.
    pub fn decommit(&mut self, ranges: &[Range<usize>]) -> io::Result<Decommitted> {
        let ranges: Vec<Range<usize>> = ranges
            .iter()
            .map(|r| self.address_range(r.clone()))
            .filter(|r| !r.is_empty())
            .collect();
        if ranges.is_empty() {
            return Ok(Decommitted::default());
        }
        // SAFETY: *held* and *inside*; the slot is in the pool's private mapping (anonymous, or
        // an image's private file mapping), as `decommit_all` requires. It takes its turn with
        // the process's other decommits.
        let calls = unsafe { sys::decommit_all(&ranges) }?;
        Ok(Decommitted {
            calls,
            ranges: ranges.len() as u64,
        })
    }

    /// Replaces `range` (inside the accessible bytes) with fresh anonymous zero pages, readable
    /// and writable: whatever was mapped there (an image) is gone.
    pub fn replace_with_zeros(&mut self, range: Range<usize>) -> io::Result<()> {
        self.check(&range, self.accessible);
        if range.is_empty() {
            return Ok(());
        }
        // SAFETY: *held* and *inside* (accessible, checked above); page-aligned (an image's
        // range); no reference into it is live.
        unsafe { sys::replace_with_zeros(self.base.add(range.start), range.len()) }
    }

    /// Replaces the whole slot with a fresh `PROT_NONE` anonymous mapping: nothing of what it
    /// held (bytes, protections, an image) survives.
    pub fn remap(&mut self) -> io::Result<()> {
        // SAFETY: *held* and *inside* (the whole slot); no reference into it is live.
        unsafe { sys::reset_to_reserved(self.base, self.len) }?;
        self.accessible = 0;
        Ok(())
    }
}
