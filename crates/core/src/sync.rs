//! Locks held for a few microseconds at most, taken by spinning before sleeping; and each
//! thread's lane, for state a backend or an engine splits per thread.
//!
//! A thread that sleeps on a lock held by another core is woken by that core when the lock is
//! released: on a virtual machine the wake-up crosses the hypervisor (an inter-processor
//! interrupt to an idle virtual core) and costs tens of microseconds, far more than the pool's
//! critical sections (a few list updates) or a decommit (one system call). So the pool's locks
//! are first tried for a few microseconds, and only then waited for the usual way.

use std::cell::Cell;
use std::hint::spin_loop;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

/// How long a thread tries before it sleeps: about a decommit's worth, well under a wake-up.
const SPIN: Duration = Duration::from_micros(4);
/// Spin-loop hints between two tries (a hint takes 10 to 40 ns, depending on the processor).
const PAUSES: usize = 8;

/// Locks `mutex`, spinning for a few microseconds before sleeping on it. A poisoned lock is
/// taken as it is: every caller's critical section leaves its data consistent at every step
/// (a panic in one cannot hand a slot out twice), so carrying on is safe.
pub fn lock_spinning<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    lock_spinning_for(mutex, SPIN)
}

/// [`lock_spinning`], trying for `spin` before sleeping: for a lock held across a system call
/// whose usual length the caller knows (at least the few microseconds `lock_spinning` tries).
pub fn lock_spinning_for<T>(mutex: &Mutex<T>, spin: Duration) -> MutexGuard<'_, T> {
    let spin = spin.max(SPIN);
    let mut started = None;
    loop {
        if let Some(guard) = try_lock(mutex) {
            return guard;
        }
        // The clock is read only once the lock was found taken.
        let since = *started.get_or_insert_with(Instant::now);
        if since.elapsed() >= spin {
            return mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        for _ in 0..PAUSES {
            spin_loop();
        }
    }
}

/// Locks `mutex` if no other thread holds it now, taking a poisoned lock as it is (as
/// [`lock_spinning`] does).
pub fn try_lock<T>(mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match mutex.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// This thread's lane among `lanes`: threads take lanes in turn the first time they ask, so
/// that threads running at once land on different lanes (as many as there are lanes). State
/// split by lane (a pool's shards, per-lane reference counts) is then touched by one thread
/// each, and its cache lines stay on that thread's core.
pub fn thread_lane(lanes: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static LANE: Cell<usize> = const { Cell::new(usize::MAX) });
    LANE.with(|lane| {
        if lane.get() == usize::MAX {
            lane.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        lane.get() % lanes.max(1)
    })
}
