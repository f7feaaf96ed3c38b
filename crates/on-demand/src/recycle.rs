//! What the on-demand backend keeps between instances: the address space of freed memories
//! (no memory: their pages are given back first), and, per module memory, which pages its
//! instances wrote, so that the next one gets them in one system call instead of a page fault
//! each.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use slab::Slab;

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
/// The allocation index of a memory that holds no ticket (no `PAGEMAP_SCAN` here, or 2^32 - 1
/// memories live).
const NO_TICKET: u32 = u32::MAX;

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

/// What a live memory's allocation index stands for: whose memory it is, and whether its
/// deallocation scans what it wrote.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    key: (ModuleId, DefinedMemoryIndex),
    scan: bool,
}

/// Invariant: `tickets` holds one entry per live memory that got one, under the allocation
/// index handed out with it; `habits` one per module memory not purged. A ticket names its
/// habit by key (module ids are never reused), so a deallocation after a purge finds no
/// habit and teaches nothing to another module's.
#[derive(Debug, Default)]
struct HabitTable {
    habits: HashMap<(ModuleId, DefinedMemoryIndex), Habit>,
    tickets: Slab<Ticket>,
}

/// Per module memory, the pages to prefault for its next instance.
#[derive(Debug, Default)]
pub(crate) struct Habits {
    table: Mutex<HabitTable>,
}

impl Habits {
    fn lock(&self) -> std::sync::MutexGuard<'_, HabitTable> {
        // Every update is a few field writes: carry on after a panic elsewhere.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Prefaults in `memory` what the last scanned instance of `key` wrote, or chooses it for a
    /// scan; returns the allocation index to hand out with it, its ticket. Without
    /// `PAGEMAP_SCAN` nothing is learned or kept.
    pub(crate) fn start(
        &self,
        key: (ModuleId, DefinedMemoryIndex),
        memory: &mut Memory,
    ) -> MemoryAllocationIndex {
        if berth_core::sys::page_map().is_none() {
            return MemoryAllocationIndex::from_u32(NO_TICKET);
        }
        let mut runs = [(0usize, 0usize); MAX_RUNS];
        let (ticket, count) = {
            let mut table = self.lock();
            let table = &mut *table;
            let habit = table.habits.entry(key).or_default();
            let scan = !habit.learned || habit.unscanned + 1 >= SCAN_EVERY;
            habit.unscanned = if scan { 0 } else { habit.unscanned + 1 };
            let count = if scan { 0 } else { habit.written.len() };
            for (slot, run) in runs.iter_mut().zip(&habit.written[..count]) {
                *slot = (run.start, run.end);
            }
            let ticket = match u32::try_from(table.tickets.vacant_key()) {
                Ok(n) if n != NO_TICKET => {
                    table.tickets.insert(Ticket { key, scan });
                    n
                }
                _ => NO_TICKET,
            };
            (ticket, count)
        };
        let accessible = memory.accessible_bytes();
        for &(start, end) in &runs[..count] {
            let end = end.min(accessible);
            if start < end {
                // A hint: if the kernel cannot, the pages fault in when written, as without it.
                let _ = memory.prefault(start, end - start);
            }
        }
        MemoryAllocationIndex::from_u32(ticket)
    }

    /// Gives back the ticket of the memory handed out with `index`, and learns what its
    /// instance wrote if the ticket asks for a scan and its module was not purged since.
    pub(crate) fn finish(&self, index: MemoryAllocationIndex, memory: &Memory) {
        if index.as_u32() == NO_TICKET {
            return;
        }
        let Some(ticket) = self.lock().tickets.try_remove(index.as_u32() as usize) else {
            return;
        };
        if !ticket.scan {
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
        if let Some(habit) = self.lock().habits.get_mut(&ticket.key) {
            habit.learned = true;
            habit.written = written;
        }
    }

    /// Forgets what `module`'s memories wrote.
    pub(crate) fn purge(&self, module: ModuleId) {
        self.lock().habits.retain(|&(m, _), _| m != module);
    }
}
