//! `PAGEMAP_SCAN`: asking the kernel which pages of a range this process wrote.

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

const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
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
        // SAFETY: a fresh mapping of one page, ours.
        unsafe { make_accessible(page, page_size()) }.ok()?;
        // SAFETY: as above; wiping it in a child is the point.
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
    map.scan(marker.addr(), marker.addr() + page_size(), &mut probe)
        .ok()?;
    // SAFETY: the marker page is ours and writable.
    unsafe { marker.write_volatile(1) };
    Some(map)
}

impl PageMap {
    fn scan(&self, start: usize, end: usize, out: &mut Vec<std::ops::Range<usize>>) -> io::Result<()> {
        let mut regions = [PageRegion::default(); 32];
        let mut from = start;
        while from < end {
            let mut arg = PmScanArg {
                size: size_of::<PmScanArg>() as u64,
                start: from as u64,
                end: end as u64,
                vec: regions.as_mut_ptr().addr() as u64,
                vec_len: regions.len() as u64,
                // Present pages this process wrote: not the shared zero page, not a file page
                // still as the file has it.
                category_inverted: PAGE_IS_PFNZERO | PAGE_IS_FILE,
                category_mask: PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_PFNZERO | PAGE_IS_FILE,
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

    /// Appends to `out` the runs of pages of `ptr..ptr + len` that hold data this process wrote
    /// (present, private, not the shared zero page), as offsets from `ptr`. Pages it does not
    /// report read as the mapping's initial contents (zeros, or the file's bytes).
    pub fn written(
        &self,
        ptr: NonNull<u8>,
        len: usize,
        out: &mut Vec<std::ops::Range<usize>>,
    ) -> io::Result<()> {
        let start = ptr.as_ptr().addr();
        let first = out.len();
        self.scan(start, start + len, out)?;
        for range in &mut out[first..] {
            *range = range.start - start..range.end - start;
        }
        Ok(())
    }
}
