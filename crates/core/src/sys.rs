//! The only place Berth makes system calls (through rustix).
//!
//! Everything else uses [`Mmap`](crate::Mmap) or these few functions. The unsafe ones take a
//! range the caller must own: changing the protection or contents of memory someone else
//! uses (a Rust allocation, another instance's slot) is undefined behaviour.

use std::io;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::fs;
use rustix::mm::{self, Advice, MapFlags, MprotectFlags, ProtFlags};

/// The host page size in bytes.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// Reserves `len` bytes of fresh `PROT_NONE` address space (no memory committed).
///
/// `len` must be non-zero and a multiple of the page size.
pub fn reserve(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh anonymous mapping at an address the kernel chooses cannot alias
    // anything Rust knows about.
    let ptr = unsafe {
        mm::mmap_anonymous(
            ptr::null_mut(),
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )?
    };
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
}

/// Unmaps `len` bytes at `ptr`.
///
/// # Safety
///
/// `ptr..ptr + len` was returned by [`reserve`] (or is part of such a range), is owned by
/// the caller, and nothing will access it again.
pub unsafe fn unmap(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range and promises it is no longer used.
    unsafe {
        mm::munmap(ptr.as_ptr().cast(), len)?;
    }
    Ok(())
}

/// Makes `len` bytes at `ptr` readable and writable. Untouched pages read as zero until
/// written, unless they held data that was not [`decommit`]ted.
///
/// # Safety
///
/// `ptr..ptr + len` is page-aligned, inside a mapping made by [`reserve`], and owned by the
/// caller.
pub unsafe fn make_accessible(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the page-aligned range; adding access breaks no reference.
    unsafe {
        mm::mprotect(
            ptr.as_ptr().cast(),
            len,
            MprotectFlags::READ | MprotectFlags::WRITE,
        )?;
    }
    Ok(())
}

/// Makes `len` bytes at `ptr` inaccessible (`PROT_NONE`): any access faults.
///
/// # Safety
///
/// `ptr..ptr + len` is page-aligned, inside a mapping made by [`reserve`], owned by the
/// caller, and no Rust reference into it is live.
pub unsafe fn make_inaccessible(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range and holds no reference into it.
    unsafe {
        mm::mprotect(ptr.as_ptr().cast(), len, MprotectFlags::empty())?;
    }
    Ok(())
}

/// Gives `len` bytes at `ptr` back to the kernel: their next read sees zeros.
///
/// This is `madvise(MADV_DONTNEED)` (`Advice::LinuxDontNeed`), which on a private anonymous
/// mapping discards the pages at once; POSIX `Advice::DontNeed` is a no-op on Linux and
/// would leave the previous contents in place.
///
/// # Safety
///
/// `ptr..ptr + len` is page-aligned, inside a private anonymous mapping made by
/// [`reserve`], owned by the caller, and no Rust reference into it is live.
pub unsafe fn decommit(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range; discarding its contents breaks no reference.
    unsafe {
        mm::madvise(ptr.as_ptr().cast(), len, Advice::LinuxDontNeed)?;
    }
    Ok(())
}

/// Replaces `len` bytes at `ptr` with a fresh `PROT_NONE` anonymous mapping, discarding their
/// contents and protections whatever state they were in. Used to recover a slot whose reset
/// failed.
///
/// # Safety
///
/// `ptr..ptr + len` is page-aligned, inside a mapping made by [`reserve`], owned by the
/// caller, and no Rust reference into it is live.
pub unsafe fn reset_to_reserved(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: `MAP_FIXED` replaces only the caller's own range, which nothing references.
    let new = unsafe {
        mm::mmap_anonymous(
            ptr.as_ptr().cast(),
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED,
        )?
    };
    if new.cast::<u8>() != ptr.as_ptr() {
        return Err(io::Error::other("MAP_FIXED mapped somewhere else"));
    }
    Ok(())
}

/// Creates a sealed in-memory file of `len` bytes holding each `(offset, bytes)` piece at its
/// offset and zeros elsewhere (a copy-on-write memory image). Only the pieces are written, so
/// the file stays sparse; afterwards its size, contents and seals can no longer change.
pub fn create_image_file(len: usize, pieces: &[(usize, &[u8])]) -> io::Result<OwnedFd> {
    let fd = fs::memfd_create(
        "berth-memory-image",
        fs::MemfdFlags::CLOEXEC | fs::MemfdFlags::ALLOW_SEALING,
    )?;
    fs::ftruncate(&fd, len as u64)?;
    for &(offset, bytes) in pieces {
        let mut written = 0;
        while written < bytes.len() {
            let n = rustix::io::pwrite(&fd, &bytes[written..], (offset + written) as u64)?;
            if n == 0 {
                return Err(io::Error::other("short write to a memory image file"));
            }
            written += n;
        }
    }
    fs::fcntl_add_seals(
        &fd,
        fs::SealFlags::SHRINK | fs::SealFlags::GROW | fs::SealFlags::WRITE | fs::SealFlags::SEAL,
    )?;
    Ok(fd)
}

/// Maps `len` bytes of `fd` from its start at `ptr`, private and copy-on-write, readable
/// and writable, replacing whatever was mapped there.
///
/// # Safety
///
/// `ptr..ptr + len` is page-aligned, inside a mapping made by [`reserve`], owned by the
/// caller, and no Rust reference into it is live; `fd` holds at least `len` bytes.
pub unsafe fn map_image(ptr: NonNull<u8>, len: usize, fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `MAP_FIXED` replaces only the caller's own range, which nothing references.
    let mapped = unsafe {
        mm::mmap(
            ptr.as_ptr().cast(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::FIXED,
            fd,
            0,
        )?
    };
    if mapped.cast::<u8>() != ptr.as_ptr() {
        return Err(io::Error::other("MAP_FIXED mapped somewhere else"));
    }
    Ok(())
}

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
