//! Many decommits in one system call: `process_madvise(MADV_DONTNEED)` on this process.
//!
//! One `madvise` per range costs a system call and, when other threads of the process run at
//! the same time, often a TLB shootdown (an interrupt to every core running the process) each.
//! The kernel takes up to [`PER_CALL`] ranges of one process in one `process_madvise` call and
//! flushes the TLB once for all of them. Advising this process with `MADV_DONTNEED` that way
//! needs Linux 6.13, and naming "this process" with `PIDFD_SELF_THREAD_GROUP` Linux 6.15; on
//! older kernels this falls back to one `madvise` per range.
//!
//! Calls run one at a time in the process. A zap that finds another zap of the same process
//! in progress flushes the TLB of every core the process runs on, even when it cleared nothing
//! (it cannot rely on the other's deferred flush), so two threads decommitting at once make
//! each other pay a shootdown; taking turns costs a short wait instead. A thread waits for its
//! turn by spinning for about twice as long as the last call took (see [`turn_spin`]), not by
//! sleeping: on a virtual machine the wake-up of a sleeping thread costs tens of microseconds,
//! more than most calls, and a batch of many ranges in large slots can take longer than the
//! few microseconds the pool's other locks are tried for.

use std::io;
use std::ops::Range;
use std::ptr::{self, NonNull};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::decommit;

/// `PIDFD_SELF_THREAD_GROUP`: the calling process, whichever it is (in a forked child, the
/// child), with no file descriptor to open or to go stale.
const PIDFD_SELF: libc::c_int = -10001;
/// Ranges given to one call (the kernel takes up to 1024; batches are smaller).
const PER_CALL: usize = 64;
/// Set once the kernel refuses `process_madvise` on this process for ranges `madvise`
/// accepts: from then on, one `madvise` per range.
static REFUSED: AtomicBool = AtomicBool::new(false);
/// Held while a thread decommits: one decommit at a time per process.
static TURN: Mutex<()> = Mutex::new(());
/// How long the last call holding [`TURN`] took, in nanoseconds.
static LAST_TURN_NS: AtomicU64 = AtomicU64::new(0);
/// The longest a thread spins for its turn before it sleeps.
const MAX_TURN_SPIN: Duration = Duration::from_micros(100);

/// How long a thread waiting for [`TURN`] spins before sleeping: twice the last call's length
/// (the holder may have just started one like it), at most [`MAX_TURN_SPIN`].
fn turn_spin() -> Duration {
    Duration::from_nanos(LAST_TURN_NS.load(Ordering::Relaxed).saturating_mul(2)).min(MAX_TURN_SPIN)
}

/// Gives every range of `ranges` (addresses) back to the kernel, as [`decommit()`] does for
/// one: their next read sees zeros (or the file's bytes, in a private file mapping). Uses one
/// system call per 64 ranges where the kernel allows it, and returns how many system calls it
/// made. On error, some ranges may have been decommitted and others not. Waits while another
/// thread of the process is decommitting.
///
/// # Safety
///
/// Every range is page-aligned and inside a private mapping made by [`reserve`](super::reserve)
/// or [`map_image`](super::map_image), owned by the caller, with no Rust reference into it live.
pub unsafe fn decommit_all(ranges: &[Range<usize>]) -> io::Result<u64> {
    let _turn = crate::sync::lock_spinning_for(&TURN, turn_spin());
    // SAFETY: every range is page-aligned, inside a `reserve` or `map_image` mapping the caller
    // owns, with no Rust reference into it (this function's contract); `TURN` is held.
    unsafe { decommit_in_turn(ranges) }
}

/// [`decommit_all`] if no other thread of the process is decommitting now (`Ok(Some(calls))`):
/// `Ok(None)`, with nothing decommitted, if one is. For a caller that has something better to do than wait
/// (a pool can keep the ranges for its next batch).
///
/// # Safety
///
/// Every range is page-aligned and inside a private mapping made by [`reserve`](super::reserve)
/// or [`map_image`](super::map_image), owned by the caller, with no Rust reference into it live.
pub unsafe fn try_decommit_all(ranges: &[Range<usize>]) -> io::Result<Option<u64>> {
    let Some(_turn) = crate::sync::try_lock(&TURN) else {
        return Ok(None);
    };
    // SAFETY: every range is page-aligned, inside a `reserve` or `map_image` mapping the caller
    // owns, with no Rust reference into it (this function's contract); `TURN` is held.
    unsafe { decommit_in_turn(ranges) }.map(Some)
}

/// Takes the process's decommit turn, as a thread decommitting holds it, until the guard is
/// dropped: meanwhile [`try_decommit_all`] decommits nothing and [`decommit_all`] waits. For
/// tests of what a caller does while another thread decommits.
pub fn hold_decommit_turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The work of [`decommit_all`], for a caller holding [`TURN`].
///
/// # Safety
///
/// Every range is page-aligned and inside a private mapping made by [`reserve`](super::reserve)
/// or [`map_image`](super::map_image), owned by the caller, with no Rust reference into it live.
unsafe fn decommit_in_turn(ranges: &[Range<usize>]) -> io::Result<u64> {
    let started = Instant::now();
    // SAFETY: every range is page-aligned, inside a `reserve` or `map_image` mapping the caller
    // owns, with no Rust reference into it (this function's contract).
    let result = unsafe { decommit_ranges(ranges) };
    let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    LAST_TURN_NS.store(took, Ordering::Relaxed);
    result
}

/// The system calls of [`decommit_in_turn`].
///
/// # Safety
///
/// Every range is page-aligned and inside a private mapping made by [`reserve`](super::reserve)
/// or [`map_image`](super::map_image), owned by the caller, with no Rust reference into it live.
unsafe fn decommit_ranges(ranges: &[Range<usize>]) -> io::Result<u64> {
    let mut done = 0;
    let mut calls = 0;
    let mut refused = false;
    if ranges.len() > 1 && !REFUSED.load(Ordering::Relaxed) {
        let empty = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        };
        while done < ranges.len() {
            let chunk = &ranges[done..ranges.len().min(done + PER_CALL)];
            let mut iov = [empty; PER_CALL];
            for (v, range) in iov.iter_mut().zip(chunk) {
                // An address for the kernel only: never dereferenced here.
                v.iov_base = ptr::without_provenance_mut(range.start);
                v.iov_len = range.len();
            }
            let wanted: usize = chunk.iter().map(Range::len).sum();
            calls += 1;
            // SAFETY: `iov` holds `chunk.len()` initialized `iovec`s and outlives the call; the
            // caller owns every range, so discarding their contents breaks no reference.
            let advised = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    PIDFD_SELF,
                    iov.as_ptr(),
                    chunk.len(),
                    libc::MADV_DONTNEED,
                    0,
                )
            };
            if usize::try_from(advised).ok() != Some(wanted) {
                // Refused (an old kernel) or stopped part-way: the rest goes one range at a
                // time, which either works or reports the error.
                let errno = io::Error::last_os_error().raw_os_error();
                refused = advised < 0
                    && done == 0
                    && matches!(
                        errno,
                        Some(libc::ENOSYS | libc::EBADF | libc::EINVAL | libc::EPERM)
                    );
                break;
            }
            done += chunk.len();
        }
    }
    for range in &ranges[done..] {
        let Some(start) = NonNull::new(ptr::without_provenance_mut::<u8>(range.start)) else {
            return Err(io::Error::other("decommit of a range at address 0"));
        };
        // SAFETY: the caller owns the page-aligned range, inside a private mapping, and holds
        // no reference into it (`decommit`'s obligations); `start` goes to the kernel only.
        unsafe { decommit(start, range.len()) }?;
        calls += 1;
    }
    if refused {
        // `madvise` took the very ranges `process_madvise` refused: the kernel lacks it.
        REFUSED.store(true, Ordering::Relaxed);
    }
    Ok(calls)
}
