//! Locks held for a few microseconds at most, taken by spinning before sleeping.
//!
//! A thread that sleeps on a lock held by another core is woken by that core when the lock is
//! released: on a virtual machine the wake-up crosses the hypervisor (an inter-processor
//! interrupt to an idle virtual core) and costs tens of microseconds, far more than the pool's
//! critical sections (a few list updates) or a decommit (one system call). So the pool's locks
//! are first tried for a few microseconds, and only then waited for the usual way.

use std::hint::spin_loop;
use std::sync::{Mutex, MutexGuard, TryLockError};

/// Tries before sleeping: each try is followed by [`PAUSES`] spin-loop hints, together a few
/// microseconds.
const TRIES: usize = 64;
/// Spin-loop hints between two tries.
const PAUSES: usize = 32;

/// Locks `mutex`, spinning for a few microseconds before sleeping on it. A poisoned lock is
/// taken as it is: every caller's critical section leaves its data consistent at every step
/// (a panic in one cannot hand a slot out twice), so carrying on is safe.
pub fn lock_spinning<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    for _ in 0..TRIES {
        match mutex.try_lock() {
            Ok(guard) => return guard,
            Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                for _ in 0..PAUSES {
                    spin_loop();
                }
            }
        }
    }
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
