//! What a composed backend remembers of each resource it handed out, under the allocation
//! index it handed out: the inner backend's own index travels inside the entry, so an inner
//! backend may use its index space as it likes.

use std::sync::Mutex;

use anyhow::anyhow;
use slab::Slab;

/// Entries of live resources, keyed by the allocation index handed out.
///
/// Invariant: a key is in the slab exactly while the resource it was handed out with is live
/// (between its allocation and its deallocation).
#[derive(Debug)]
pub(crate) struct Ledger<E> {
    entries: Mutex<Slab<E>>,
}

impl<E> Default for Ledger<E> {
    fn default() -> Self {
        Ledger {
            entries: Mutex::new(Slab::new()),
        }
    }
}

impl<E> Ledger<E> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slab<E>> {
        // Every update is one insert or remove: carry on after a panic elsewhere.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `entry` and returns its key; with 2^32 resources live, gives it back with the
    /// error.
    pub fn insert(&self, entry: E) -> Result<u32, (anyhow::Error, E)> {
        let mut entries = self.lock();
        let Ok(key) = u32::try_from(entries.vacant_key()) else {
            return Err((
                anyhow!("more than 4294967295 resources live in one composed backend"),
                entry,
            ));
        };
        entries.insert(entry);
        Ok(key)
    }

    /// Forgets `key`'s entry and returns it.
    ///
    /// # Panics
    ///
    /// If no live resource was handed out with `key` (the caller broke the deallocation
    /// contract).
    pub fn remove(&self, key: u32) -> E {
        self.lock()
            .try_remove(key as usize)
            .unwrap_or_else(|| panic!("allocation index {key} was not handed out by this backend"))
    }
}
