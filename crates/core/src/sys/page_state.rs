//! Changing the kernel's view of pages the way it changes on its own: reclaim pushing them to
//! swap or onto the inactive list, khugepaged collapsing them into a transparent huge page, a
//! fork sharing them copy-on-write with a child. None of it changes a byte a program reads; it
//! exists so that tests can check that resets cover a tenant's pages in every state the kernel
//! may hold them in (see [`PageMap::count`](super::PageMap::count) to check that it happened).

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};

use rustix::mm::{self, Advice};

use super::page_size;

/// `MADV_COLLAPSE` (Linux 6.1), which rustix does not name.
const MADV_COLLAPSE: libc::c_int = 25;
/// The size of a transparent huge page on the hosts Berth runs on (x86-64, AArch64 with 4 KiB
/// pages).
const HUGE_PAGE: usize = 2 << 20;

/// A change to pages the kernel may make on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageEvent {
    /// Reclaim: present pages are written to swap and unmapped (`MADV_PAGEOUT`). Without swap,
    /// anonymous pages stay where they are.
    SwapOut,
    /// Aging: pages are moved to the inactive list, first in line for reclaim (`MADV_COLD`).
    Deactivate,
    /// khugepaged: every whole, aligned 2 MiB block of the range becomes one transparent huge
    /// page where the kernel allows it (`MADV_HUGEPAGE`, then `MADV_COLLAPSE`). A range without
    /// such a block is left as it is.
    HugePage,
}

/// Asks the kernel for `event` on the pages of `ptr..ptr + len` (rounded out to whole pages).
/// The contents of every page stay as they are, which is why this is safe to call on any
/// mapped range; the kernel reports an error for a range that is not mapped, and may refuse a
/// huge page (no memory to compact, transparent huge pages off), which is an error too.
///
/// For tests: `HugePage` also marks the range fit for huge pages for good (`MADV_HUGEPAGE` is
/// a flag of the mapping, which the kernel may split in two or three to set it, each piece
/// counting against `vm.max_map_count`).
pub fn provoke(ptr: *const u8, len: usize, event: PageEvent) -> io::Result<()> {
    let page = page_size();
    let (start, end) = match event {
        PageEvent::HugePage => (
            ptr.addr().next_multiple_of(HUGE_PAGE),
            (ptr.addr() + len) / HUGE_PAGE * HUGE_PAGE,
        ),
        _ => (
            ptr.addr() / page * page,
            (ptr.addr() + len).next_multiple_of(page),
        ),
    };
    if end <= start {
        return Ok(());
    }
    // An address for the kernel only: nothing is read or written through it here.
    let at = ptr.with_addr(start).cast_mut().cast();
    let len = end - start;
    match event {
        // SAFETY: reclaim advice keeps every page's contents (a swapped page reads back the
        // same), so no Rust value in the range can observe it.
        PageEvent::SwapOut => unsafe { mm::madvise(at, len, Advice::LinuxPageOut)? },
        // SAFETY: moving pages to the inactive list changes no page's contents, so no Rust value
        // in the range can observe it.
        PageEvent::Deactivate => unsafe { mm::madvise(at, len, Advice::LinuxCold)? },
        PageEvent::HugePage => {
            // SAFETY: marking a range as fit for huge pages changes no byte.
            unsafe { mm::madvise(at, len, Advice::LinuxHugepage)? };
            // SAFETY: a collapse copies every small page into the huge one: no byte changes.
            // The range is page-aligned and the call only reads `at` and `len`.
            if unsafe { libc::madvise(at, len, MADV_COLLAPSE) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// A forked copy of this process running a closure; reaped on drop if not waited for.
#[derive(Debug)]
pub struct Forked {
    pid: libc::pid_t,
    reaped: bool,
}

/// Forks this process. The child runs `child` and exits at once through `_exit` (no
/// destructors, no `atexit` handlers, no flush of output buffered before the fork): with status
/// 0 if `child` returned `true`, 1 if it returned `false` or panicked (with `panic = "abort"`, a
/// panic kills it with `SIGABRT`, which also reads as failure). The parent gets the child to
/// wait for. Every private page is then shared copy-on-write by the two processes until one of
/// them writes it.
///
/// # Safety
///
/// The child is a copy of the calling thread alone, so:
///
/// - no other thread of this process may hold, at the call, a lock that `child` will take,
///   the allocator's included: such a lock stays held in the child forever. Call it from a
///   process whose other threads are idle (blocked waiting for this one), such as a test re-run
///   in a child process with one test thread;
/// - `child` must not leave through `std::process::exit` or anything else that runs the
///   parent's `atexit` handlers or flushes buffers the parent also holds.
pub unsafe fn fork(child: impl FnOnce() -> bool) -> io::Result<Forked> {
    // SAFETY: the caller promises no lock the child needs is held by another thread; the
    // child leaves only through `_exit`, so it never returns into the parent's stack frames.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let ok = catch_unwind(AssertUnwindSafe(child)).unwrap_or(false);
        // SAFETY: `_exit` ends the child without running anything of the parent's.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    Ok(Forked { pid, reaped: false })
}

impl Forked {
    /// Waits for the child to end: whether its closure returned `true`.
    pub fn wait(mut self) -> io::Result<bool> {
        self.reap()
    }

    fn reap(&mut self) -> io::Result<bool> {
        let mut status = 0;
        loop {
            // SAFETY: `pid` is our own child, not yet reaped; `status` outlives the call.
            let waited = unsafe { libc::waitpid(self.pid, &raw mut status, 0) };
            if waited == self.pid {
                break;
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
        self.reaped = true;
        Ok(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0)
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.reap();
        }
    }
}
