//! What the on-demand backend keeps between instances: the address space of freed memories
//! (no memory: their pages are given back first), and, per module memory, which pages its
//! instances wrote, so that the next one gets them in one system call instead of a page fault
//! each.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use berth_core::{
    DefinedMemoryIndex, Memory, MemoryAllocationIndex, ModuleId, Reservation, ReservationLayout,
};

/// Freed reservations an allocator keeps by default.
pub const DEFAULT_CACHED_RESERVATIONS: usize = 16;

/// After the first instance of a module memory, one in this many is scanned (`PAGEMAP_SCAN`)
/// at deallocation, and not prefaulted, so that the scan sees what its tenant wrote, not what
/// was faulted in ahead.
const SCAN_EVERY: u8 = 16;
/// At most this many runs of written pages, and bytes in all, are prefaulted.
const MAX_RUNS: usize = 8;
const MAX_PREFAULT_BYTES: usize = 4 << 20;
/// The bit of a [`MemoryAllocationIndex`] that asks for a scan at deallocation; the bits
/// below it name the module memory's [`Habit`].
const SCAN_BIT: u32 = 1 << 31;

/// Freed reservations, their contents discarded, waiting for a memory of the same layout.
#[derive(Debug, Default)]
pub(crate) struct Reservations {
    capacity: usize,
    free: Mutex<Vec<Reservation>>,
}

impl Reservations {
    pub(crate) fn new(capacity: usize) -> Self {
        Reservations {
            capacity,
            ..Self::default()
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The most recently freed reservation of `layout`, if one is kept.
    pub(crate) fn take(&self, layout: ReservationLayout) -> Option<Reservation> {
        if self.capacity == 0 {
            return None;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let at = free.iter().rposition(|r| r.layout() == layout)?;
        Some(free.swap_remove(at))
    }

    /// Keeps `memory`'s reservation, its contents discarded; when full, the oldest kept one
    /// makes room (so reservations of a layout no longer asked for, such as a moved memory's,
    /// age out). Unmapping happens outside the lock.
    pub(crate) fn give_back(&self, memory: Memory) {
        if self.capacity == 0 {
            return;
        }
        let Some(reservation) = memory.into_reservation() else {
            return;
        };
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let evicted = (free.len() >= self.capacity).then(|| free.remove(0));
        free.push(reservation);
        drop(free);
        drop(evicted);
    }

    /// Unmaps every kept reservation (outside the lock) and says how many there were.
    pub(crate) fn release_all(&self) -> u64 {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let released = std::mem::take(&mut *free);
        drop(free);
        released.len() as u64
    }

    /// How many are kept, and their bytes.
    pub(crate) fn kept(&self) -> (u64, u64) {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = free.iter().map(|r| r.len() as u64).sum();
        (free.len() as u64, bytes)
    }
}

/// What the instances of one module memory wrote, as learned from scans at deallocation.
#[derive(Debug, Default)]
struct Habit {
    /// Runs of pages the last scanned instance wrote, as byte offsets from the memory's base.
    written: Vec<Range<usize>>,
    /// Whether a scan has reported yet.
    learned: bool,
    /// Instances since the last one chosen for a scan.
    unscanned: u8,
}

#[derive(Debug, Default)]
struct HabitTable {
    by_key: HashMap<(ModuleId, DefinedMemoryIndex), u32>,
    habits: Vec<Habit>,
    unused: Vec<u32>,
}

/// Per module memory, the pages to prefault for its next instance.
#[derive(Debug, Default)]
pub(crate) struct Habits {
    table: Mutex<HabitTable>,
}

impl Habits {
    /// Prefaults in `memory` what the last scanned instance of `key` wrote, or chooses it for a
    /// scan; returns the allocation index to hand out with it: the habit's number, and whether
    /// the deallocation should scan. Without `PAGEMAP_SCAN` nothing is learned or kept.
    pub(crate) fn start(
        &self,
        key: (ModuleId, DefinedMemoryIndex),
        memory: &mut Memory,
    ) -> MemoryAllocationIndex {
        if berth_core::sys::page_map().is_none() {
            return MemoryAllocationIndex::default();
        }
        let mut runs = [(0usize, 0usize); MAX_RUNS];
        let (number, scan, count) = {
            let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            let table = &mut *table;
            let number = match table.by_key.get(&key) {
                Some(&n) => n,
                None => {
                    let n = match table.unused.pop() {
                        Some(n) => n,
                        None => match u32::try_from(table.habits.len()) {
                            Ok(n) if n < SCAN_BIT => {
                                table.habits.push(Habit::default());
                                n
                            }
                            _ => return MemoryAllocationIndex::default(),
                        },
                    };
                    table.habits[n as usize] = Habit::default();
                    table.by_key.insert(key, n);
                    n
                }
            };
            let habit = &mut table.habits[number as usize];
            let scan = !habit.learned || habit.unscanned + 1 >= SCAN_EVERY;
            habit.unscanned = if scan { 0 } else { habit.unscanned + 1 };
            let count = if scan { 0 } else { habit.written.len() };
            for (slot, run) in runs.iter_mut().zip(&habit.written[..count]) {
                *slot = (run.start, run.end);
            }
            (number, scan, count)
        };
        let accessible = memory.accessible_bytes();
        for &(start, end) in &runs[..count] {
            let end = end.min(accessible);
            if start < end {
                // A hint: if the kernel cannot, the pages fault in when written, as without it.
                let _ = memory.prefault(start, end - start);
            }
        }
        MemoryAllocationIndex::from_u32(number | if scan { SCAN_BIT } else { 0 })
    }

    /// Learns what the instance holding `memory` wrote, if its allocation index asks for it.
    pub(crate) fn finish(&self, index: MemoryAllocationIndex, memory: &Memory) {
        let index = index.as_u32();
        if index & SCAN_BIT == 0 {
            return;
        }
        let (Some(map), Some(base)) = (berth_core::sys::page_map(), std::ptr::NonNull::new(memory.base()))
        else {
            return;
        };
        let mut written = Vec::new();
        if map
            .written(base, memory.accessible_bytes(), &mut written)
            .is_err()
        {
            return;
        }
        let mut budget = MAX_PREFAULT_BYTES;
        written.truncate(MAX_RUNS);
        for run in &mut written {
            run.end = run.start + run.len().min(budget);
            budget -= run.len();
        }
        written.retain(|run| !run.is_empty());
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Some(habit) = table.habits.get_mut((index & !SCAN_BIT) as usize) else {
            return;
        };
        habit.learned = true;
        habit.written = written;
    }

    /// Forgets what `module`'s memories wrote.
    pub(crate) fn purge(&self, module: ModuleId) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let table = &mut *table;
        table.by_key.retain(|&(m, _), &mut n| {
            if m != module {
                return true;
            }
            table.habits[n as usize] = Habit::default();
            table.unused.push(n);
            false
        });
    }
}
