//! `PAGEMAP_SCAN`: asking the kernel which pages of a range may hold what this process wrote.
//!
//! A reset may skip a page only where the kernel proves it clean. The kernel holds a page of a
//! private mapping in one of these states, and [`PageMap::written`] reports every one that is
//! not proved clean:
//!
//! | state | what the page table holds | reported |
//! | --- | --- | --- |
//! | never touched, or decommitted | nothing (no entry, or no page table) | no: reads as zeros, or as the file |
//! | read, never written (anonymous) | the shared zero page | no: reads as zeros |
//! | read, never written (file) | the file's own page | no: reads as the file (images are sealed) |
//! | written (a private page, or a private copy of a file page) | a present page | yes |
//! | written, then pushed to swap by reclaim | a swap entry | yes |
//! | written, being migrated (compaction, NUMA) | a migration entry | yes |
//! | written, in a transparent huge page | a present huge entry | yes, all of it |
//! | anything else the kernel may add (markers, device entries) | a non-present entry | yes |
//!
//! So the question asked is "present or swapped (which covers every non-present entry), and
//! neither the zero page nor a file's page", not "written": whether the kernel calls a page
//! written is a property of present pages, and asking for it alone missed swapped ones.

use std::io;
use std::os::fd::OwnedFd;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use rustix::fs;
use rustix::mm::{self, Advice};

use super::{make_accessible, page_size, reserve};

/// One region `PAGEMAP_SCAN` reports (`struct page_region`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg` of `PAGEMAP_SCAN`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Any non-present, non-empty entry: swapped, under migration, a marker, a device entry.
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
const PAGE_IS_HUGE: u64 = 1 << 6;
const PAGEMAP_SCAN: rustix::ioctl::Opcode = rustix::ioctl::opcode::read_write::<PmScanArg>(b'f', 16);

/// This process's page map, for asking the kernel which pages were written
/// (`ioctl(PAGEMAP_SCAN)`, Linux 6.7 and later).
#[derive(Debug)]
pub struct PageMap {
    file: OwnedFd,
}

/// The page map of the process that opened it (leaked: one per process, replaced after a fork).
static CURRENT: AtomicPtr<PageMap> = AtomicPtr::new(ptr::null_mut());
/// A page the kernel zeroes in a forked child (`MADV_WIPEONFORK`): its first byte is 1 only in
/// the process that opened `CURRENT`, so a fork is noticed with one load, no system call.
static MARKER: AtomicPtr<u8> = AtomicPtr::new(ptr::null_mut());
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
static OPENING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The page map of this process, or `None` if the kernel has no `PAGEMAP_SCAN` (callers then
/// reset everything a tenant could have written). After a `fork`, the child opens its own: it
/// must never read its parent's page tables.
pub fn page_map() -> Option<&'static PageMap> {
    if let Some(map) = current_page_map() {
        return Some(map);
    }
    if UNSUPPORTED.load(Ordering::Acquire) {
        return None;
    }
    let _opening = OPENING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(map) = current_page_map() {
        return Some(map);
    }
    let opened = open_page_map();
    match opened {
        Some(map) => {
            let map: &'static PageMap = Box::leak(Box::new(map));
            CURRENT.store(ptr::from_ref(map).cast_mut(), Ordering::Release);
            Some(map)
        }
        None => {
            UNSUPPORTED.store(true, Ordering::Release);
            None
        }
    }
}

/// `CURRENT`, if it belongs to this process.
fn current_page_map() -> Option<&'static PageMap> {
    let map = CURRENT.load(Ordering::Acquire);
    let marker = MARKER.load(Ordering::Acquire);
    if map.is_null() || marker.is_null() {
        return None;
    }
    // SAFETY: `MARKER` is a leaked, readable page; a forked child reads it as zeroed.
    let ours = unsafe { marker.read_volatile() } == 1;
    // SAFETY: `CURRENT` points at a leaked `PageMap`, never freed.
    ours.then(|| unsafe { &*map })
}

/// Opens the page map (and marks this process as its owner), or `None` if unsupported.
fn open_page_map() -> Option<PageMap> {
    let mut marker = MARKER.load(Ordering::Acquire);
    if marker.is_null() {
        let page = reserve(page_size()).ok()?;
        // SAFETY: a fresh mapping of one page, ours, with no reference into it.
        unsafe { make_accessible(page, page_size()) }.ok()?;
        // SAFETY: the fresh one-page mapping is ours and nothing refers into it; wiping it in a
        // forked child is the point.
        unsafe { mm::madvise(page.as_ptr().cast(), page_size(), Advice::LinuxWipeOnFork) }.ok()?;
        marker = page.as_ptr();
        MARKER.store(marker, Ordering::Release);
    }
    let file = fs::open(
        "/proc/self/pagemap",
        fs::OFlags::RDONLY | fs::OFlags::CLOEXEC,
        fs::Mode::empty(),
    )
    .ok()?;
    let map = PageMap { file };
    // Probe: a scan of the marker page must work.
    let mut probe = Vec::new();
    map.scan(
        marker.addr(),
        marker.addr() + page_size(),
        NOT_PROVED_CLEAN,
        &mut probe,
    )
    .ok()?;
    // SAFETY: the marker page is ours and writable.
    unsafe { marker.write_volatile(1) };
    Some(map)
}

/// Which pages a scan reports, in `PAGEMAP_SCAN`'s terms: a page is reported when, after
/// flipping the `inverted` categories, it has every category of `all` and, if `any` is not
/// empty, one of `any`.
#[derive(Clone, Copy)]
struct Filter {
    inverted: u64,
    all: u64,
    any: u64,
}

/// Pages that may hold what this process wrote: present or swapped (every non-present entry),
/// and neither the shared zero page nor a file's own page.
const NOT_PROVED_CLEAN: Filter = Filter {
    inverted: PAGE_IS_PFNZERO | PAGE_IS_FILE,
    all: PAGE_IS_PFNZERO | PAGE_IS_FILE,
    any: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
};

/// A state the kernel can hold a page in, for [`PageMap::count`] (tests use it to check that a
/// change they asked the kernel for took place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Present in memory.
    Present,
    /// Not present, but not empty either: in swap, or under migration.
    Swapped,
    /// Part of a transparent huge page.
    Huge,
}

impl PageMap {
    fn scan(
        &self,
        start: usize,
        end: usize,
        filter: Filter,
        out: &mut Vec<std::ops::Range<usize>>,
    ) -> io::Result<()> {
        let mut regions = [PageRegion::default(); 32];
        let mut from = start;
        while from < end {
            let mut arg = PmScanArg {
                size: size_of::<PmScanArg>() as u64,
                start: from as u64,
                end: end as u64,
                vec: regions.as_mut_ptr().addr() as u64,
                vec_len: regions.len() as u64,
                category_inverted: filter.inverted,
                category_mask: filter.all,
                category_anyof_mask: filter.any,
                ..PmScanArg::default()
            };
            // SAFETY: `PAGEMAP_SCAN` takes a `pm_scan_arg`, which `PmScanArg` mirrors; the kernel
            // writes at most `vec_len` regions into `regions`, which outlives the call, and only
            // reads page tables of this process.
            let found = unsafe {
                rustix::ioctl::ioctl(
                    &self.file,
                    rustix::ioctl::Updater::<PAGEMAP_SCAN, PmScanArg>::new(&mut arg),
                )
            };
            found?;
            // Filled regions come first; the rest stay zeroed.
            for region in regions.iter().take_while(|r| r.end > r.start) {
                let (Ok(start), Ok(end)) = (usize::try_from(region.start), usize::try_from(region.end))
                else {
                    return Err(io::Error::other(
                        "PAGEMAP_SCAN reported an address beyond the host's",
                    ));
                };
                out.push(start..end);
            }
            let walked = usize::try_from(arg.walk_end).unwrap_or(end);
            if walked <= from {
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            from = walked;
            regions = [PageRegion::default(); 32];
        }
        Ok(())
    }

    /// Appends to `out` the runs of pages of `ptr..ptr + len` that may hold data this process
    /// wrote, as offsets from `ptr`: every page the kernel does not prove clean (see the module
    /// docs), whether present, swapped out, under migration or in a huge page. Pages it does
    /// not report read as the mapping's initial contents (zeros, or the file's bytes).
    pub fn written(
        &self,
        ptr: NonNull<u8>,
        len: usize,
        out: &mut Vec<std::ops::Range<usize>>,
    ) -> io::Result<()> {
        let start = ptr.as_ptr().addr();
        let first = out.len();
        self.scan(start, start + len, NOT_PROVED_CLEAN, out)?;
        for range in &mut out[first..] {
            *range = range.start - start..range.end - start;
        }
        Ok(())
    }
}

impl PageMap {
    /// How many pages of `ptr..ptr + len` the kernel holds in `state` now.
    pub fn count(&self, ptr: NonNull<u8>, len: usize, state: PageState) -> io::Result<usize> {
        let category = match state {
            PageState::Present => PAGE_IS_PRESENT,
            PageState::Swapped => PAGE_IS_SWAPPED,
            PageState::Huge => PAGE_IS_HUGE,
        };
        let filter = Filter {
            inverted: 0,
            all: category,
            any: 0,
        };
        let start = ptr.as_ptr().addr();
        let mut runs = Vec::new();
        self.scan(start, start + len, filter, &mut runs)?;
        Ok(runs.iter().map(|r| r.len()).sum::<usize>() / page_size())
    }
}
