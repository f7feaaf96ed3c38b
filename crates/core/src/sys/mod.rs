//! The only place Berth makes system calls: through rustix, and through libc for what rustix
//! does not wrap (`process_madvise` in `decommit`; `MADV_COLLAPSE` and `fork` in `page_state`,
//! which only tests use).
//!
//! Everything else uses [`Mmap`](crate::Mmap) or these few functions. The unsafe ones take a
//! range the caller must own: changing the protection or contents of memory someone else
//! uses (a Rust allocation, another instance's slot) is undefined behaviour.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr::{self, NonNull};

use rustix::fs;
use rustix::mm::{self, Advice, MapFlags, MprotectFlags, ProtFlags};

/// The host page size in bytes.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// Bytes of physical memory this machine has (`sysinfo`).
pub fn physical_memory() -> u64 {
    let info = rustix::system::sysinfo();
    info.totalram.saturating_mul(u64::from(info.mem_unit.max(1)))
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
/// `ptr..ptr + len` was returned by [`reserve`] or [`map_file_readonly`] (or is part of such a
/// range), is owned by the caller, and nothing will access it again.
pub unsafe fn unmap(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range and promises it is no longer used.
    unsafe {
        mm::munmap(ptr.as_ptr().cast(), len)?;
    }
    Ok(())
}

/// Makes `len` bytes at `ptr` readable and writable. Untouched pages read as zero until
/// written, unless they held data that was not [`decommit()`]ed.
///
/// On failure the range is left inaccessible (`PROT_NONE`): the kernel changes a range one
/// mapping at a time and may fail part-way (`ENOMEM` past `vm.max_map_count`), and a page left
/// writable past a memory's size would take a store that should fault.
///
/// # Safety
///
/// `ptr..ptr + len` is page-aligned, inside a mapping made by [`reserve`], owned by the
/// caller, and no Rust reference into it is live.
pub unsafe fn make_accessible(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the page-aligned range; adding access breaks no reference.
    let made = unsafe {
        mm::mprotect(
            ptr.as_ptr().cast(),
            len,
            MprotectFlags::READ | MprotectFlags::WRITE,
        )
    };
    if let Err(error) = made {
        // SAFETY: no reference into the range is live (the caller's contract), so taking
        // access away breaks none.
        let _ = unsafe { mm::mprotect(ptr.as_ptr().cast(), len, MprotectFlags::empty()) };
        return Err(error.into());
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

/// Gives `len` bytes at `ptr` back to the kernel: their next read sees zeros (in a private
/// file mapping made by [`map_image`], the file's bytes again).
///
/// This is `madvise(MADV_DONTNEED)` (`Advice::LinuxDontNeed`), which on a private mapping
/// discards the pages at once; POSIX `Advice::DontNeed` is a no-op on Linux and would leave
/// the previous contents in place.
///
/// # Safety
///
/// `ptr..ptr + len` is page-aligned, inside a private mapping made by [`reserve`] or
/// [`map_image`], owned by the caller, and no Rust reference into it is live.
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

/// Replaces `len` bytes at `ptr` with a fresh readable and writable anonymous mapping: every
/// byte reads as zero afterwards, whatever was mapped there (a copy-on-write image included).
///
/// # Safety
///
/// `ptr..ptr + len` is page-aligned, inside a mapping made by [`reserve`], owned by the
/// caller, and no Rust reference into it is live.
pub unsafe fn replace_with_zeros(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: `MAP_FIXED` replaces only the caller's own range, which nothing references.
    let new = unsafe {
        mm::mmap_anonymous(
            ptr.as_ptr().cast(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED,
        )?
    };
    if new.cast::<u8>() != ptr.as_ptr() {
        return Err(io::Error::other("MAP_FIXED mapped somewhere else"));
    }
    Ok(())
}

/// Faults in the `len` accessible bytes at `ptr` for writing, in one system call
/// (`MADV_POPULATE_WRITE`, Linux 5.14 and later) instead of one page fault per page as they are
/// first written. Contents do not change: pages not yet present are zero (or, in a private file
/// mapping, the file's bytes). Errors (an older kernel, no memory) change nothing: the pages are
/// faulted in when first written, as without this call.
///
/// # Safety
///
/// `ptr..ptr + len` is page-aligned, readable and writable, and owned by the caller.
pub unsafe fn prefault(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range; populating changes no byte of it.
    unsafe {
        mm::madvise(ptr.as_ptr().cast(), len, Advice::LinuxPopulateWrite)?;
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

/// Maps the first `len` bytes of `fd` read-only and shared, at an address the kernel chooses:
/// a view of the file's own pages, which costs no memory of its own. Unmap it with [`unmap`].
pub fn map_file_readonly(fd: BorrowedFd<'_>, len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh mapping at an address the kernel chooses aliases nothing Rust knows
    // about; it is read-only, and the callers map sealed files, whose bytes never change.
    let ptr = unsafe { mm::mmap(ptr::null_mut(), len, ProtFlags::READ, MapFlags::SHARED, fd, 0)? };
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
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

mod decommit;
mod machine;
mod page_map;
mod page_state;

pub use decommit::{decommit_all, hold_decommit_turn, try_decommit_all};
pub use machine::{
    Overcommit, address_space_limit, can_reserve, commit_available, largest_reservation, mappings_in_use,
    max_map_count, overcommit,
};
pub use page_map::{PageMap, PageState, page_map};
pub use page_state::{Forked, PageEvent, fork, provoke};
