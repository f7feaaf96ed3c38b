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

    /// Whether every byte of `range` is zero (see [`all_zero`]).
    pub fn is_zero(&self, range: Range<usize>) -> bool {
        all_zero(self.read(range))
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

/// Whether every byte of `bytes` is zero. Reads whole 256-byte blocks without an early exit
/// inside them, so the compiler vectorizes the check (64-byte blocks were as slow as a
/// `memset`), and stops at the first block that is not zero. On x86-64 it runs with 32-byte
/// AVX2 loads where the processor has them, the baseline's being 16 bytes: measured here, a
/// 4 KiB page is read in half the time, and 64 to 800 KiB a fifth to a third faster.
fn all_zero(bytes: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the processor has AVX2 (detected just above), the one feature
        // `all_zero_avx2` is compiled for beyond the baseline.
        return unsafe { all_zero_avx2(bytes) };
    }
    all_zero_blocks(bytes)
}

/// [`all_zero_blocks`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn all_zero_avx2(bytes: &[u8]) -> bool {
    all_zero_blocks(bytes)
}

/// The check itself, inlined into each caller so that it is compiled for the caller's
/// features (plain loops: an iterator adapter left out of line would not be).
#[inline(always)]
fn all_zero_blocks(bytes: &[u8]) -> bool {
    let (blocks, rest) = bytes.as_chunks::<256>();
    for block in blocks {
        let mut acc = [0u64; 4];
        for lanes in block.as_chunks::<32>().0 {
            for (acc, lane) in acc.iter_mut().zip(lanes.as_chunks::<8>().0) {
                *acc |= u64::from_ne_bytes(*lane);
            }
        }
        if acc != [0; 4] {
            return false;
        }
    }
    rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length around the 256-byte blocks, one non-zero byte at each place that matters:
    /// both the dispatching check and the baseline one see it, and see zeros as zeros.
    #[test]
    fn one_non_zero_byte_anywhere_is_seen() {
        let mut bytes = vec![0u8; 4096 + 300];
        for len in [0, 1, 31, 32, 255, 256, 257, 511, 512, 4096, 4096 + 300] {
            let slice = &mut bytes[..len];
            assert!(all_zero(slice) && all_zero_blocks(slice), "{len} zeros");
            let places = [0, 1, 31, 32, 200, 255, 256, 300, 4095, 4096, 4096 + 299];
            for at in places.into_iter().filter(|&at| at < len) {
                for value in [1, 0x80, 0xff] {
                    slice[at] = value;
                    assert!(
                        !all_zero(slice) && !all_zero_blocks(slice),
                        "{value:#x} at {at} of {len}"
                    );
                    slice[at] = 0;
                }
            }
        }
    }
}
