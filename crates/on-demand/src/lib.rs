//! Berth's on-demand backend: every memory gets its own virtual-memory reservation when it is
//! allocated and gives it back when it is deallocated; tables are `Vec`s.
//!
//! It is the simplest backend and the default one: nothing is reserved up front, and memory
//! goes back to the kernel when an instance goes. Memories honour the engine's
//! [`Tunables`](berth_core::Tunables) (reservation, guards, growth reserve, whether they may
//! move). Optional [`OnDemandLimits`] cap how many instances, memories and tables may be live
//! and how large a memory or table may get; each cap fails with a [`LimitExceeded`] error
//! naming it.
//!
//! Two things are kept between instances, neither of them memory:
//!
//! - **Freed reservations.** A memory's reservation is gigabytes of address space; mapping and
//!   unmapping it (and the page tables under it) cost more than a small instance's whole
//!   cycle. When a memory goes, its pages are given back (`madvise`, or a fresh mapping over a
//!   copy-on-write image) and its address space is kept, up to
//!   [`DEFAULT_CACHED_RESERVATIONS`] of them ([`OnDemandInstanceAllocator::with_cached_reservations`]),
//!   for the next memory of the same layout. No byte of the old tenant survives: the next
//!   memory reads zeros, as from a fresh `mmap`.
//! - **Which pages a module's instances write.** Where the kernel has `PAGEMAP_SCAN`, the
//!   deallocation of a module memory's first instance, and then of one in sixteen, asks which
//!   pages were written; the instances in between get those pages (up to 8 runs, 4 MiB) in
//!   one `MADV_POPULATE_WRITE` instead of a page fault each (about 1.5 us apiece in a virtual
//!   machine). The scanned instances are not prefaulted, so what is learned is what tenants
//!   write, and a module that stops writing stops being prefaulted.
//!
//! For thousands of short-lived instances a second, whose written pages should stay resident
//! between tenants, use the pooling backend.

#![deny(missing_docs)]

mod recycle;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use berth_core::{
    AllocatorStats, DefinedMemoryIndex, DefinedTableIndex, HostPtr, InstanceAllocationRequest,
    InstanceAllocatorImpl, LimitExceeded, Memory, MemoryAllocationIndex, MemoryType, Module, ModuleId,
    Released, Table, TableAllocationIndex, TableType, VMOffsets,
};
pub use recycle::DEFAULT_CACHED_RESERVATIONS;
use recycle::{Habits, Reservations};

/// Optional caps for the on-demand backend. `None` means unlimited. The names are the
/// pooling backend's, so an error reads the same whichever backend produced it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OnDemandLimits {
    /// Live instances at most (`total_core_instances`).
    pub total_core_instances: Option<u64>,
    /// Live memories at most (`total_memories`).
    pub total_memories: Option<u64>,
    /// Live tables at most (`total_tables`).
    pub total_tables: Option<u64>,
    /// Bytes one memory may reach at most (`max_memory_size`).
    pub max_memory_size: Option<usize>,
    /// Elements one table may reach at most (`table_elements`).
    pub table_elements: Option<usize>,
}

/// The on-demand backend. Cheap to create; share it with an `Arc`.
#[derive(Debug)]
pub struct OnDemandInstanceAllocator {
    limits: OnDemandLimits,
    instances: AtomicU64,
    memories: AtomicU64,
    tables: AtomicU64,
    /// Address space of live memories (cached reservations are counted by `reservations`).
    reserved: Arc<AtomicU64>,
    reservations: Reservations,
    habits: Habits,
}

impl Default for OnDemandInstanceAllocator {
    fn default() -> Self {
        OnDemandInstanceAllocator {
            limits: OnDemandLimits::default(),
            instances: AtomicU64::new(0),
            memories: AtomicU64::new(0),
            tables: AtomicU64::new(0),
            reserved: Arc::default(),
            reservations: Reservations::new(DEFAULT_CACHED_RESERVATIONS),
            habits: Habits::default(),
        }
    }
}

impl OnDemandInstanceAllocator {
    /// An allocator with no limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// An allocator with `limits`.
    pub fn with_limits(limits: OnDemandLimits) -> Self {
        OnDemandInstanceAllocator {
            limits,
            ..Self::default()
        }
    }

    /// Keeps the address space of at most `count` freed memories for later ones (their pages
    /// are given back either way); 0 unmaps every reservation when its memory goes.
    /// [`DEFAULT_CACHED_RESERVATIONS`] by default. Under an address-space limit
    /// (`RLIMIT_AS`), cached reservations count against it.
    pub fn with_cached_reservations(mut self, count: usize) -> Self {
        self.reservations = Reservations::new(count);
        self
    }

    /// How many freed reservations this allocator keeps at most.
    pub fn cached_reservations(&self) -> usize {
        self.reservations.capacity()
    }

    /// The limits this allocator enforces.
    pub fn limits(&self) -> &OnDemandLimits {
        &self.limits
    }
}

/// One unit of a count, taken back when dropped before [`keep`](Unit::keep): an allocation
/// that fails, or unwinds (the embedder's limiter runs in it), leaves the count as it was.
struct Unit<'a>(&'a AtomicU64);

impl Unit<'_> {
    /// The unit stays counted, until [`release`] takes it back.
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Unit<'_> {
    fn drop(&mut self) {
        release(self.0);
    }
}

/// Adds one to `counter` unless that would pass `limit`.
fn acquire<'a>(counter: &'a AtomicU64, limit: Option<u64>, name: &'static str) -> Result<Unit<'a>> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match limit {
            Some(max) if n >= max => None,
            _ => Some(n + 1),
        })
        .map(|_| Unit(counter))
        .map_err(|n| LimitExceeded::error(name, limit.unwrap_or(u64::MAX), n + 1))
}

fn release(counter: &AtomicU64) {
    let previous = counter.fetch_sub(1, Ordering::AcqRel);
    debug_assert!(previous > 0, "on-demand allocator count released below zero");
}

// SAFETY: memories are fresh reservations, or reservations of freed memories whose contents
// were discarded (`Memory::into_reservation`), and tables fresh `Vec`s, used by no one else;
// both honour the request's tunables (`Memory::new_dynamic_reusing` sizes by them and reuses
// only a reservation of the same layout); counts go up on allocation and down on deallocation
// exactly once.
unsafe impl InstanceAllocatorImpl for OnDemandInstanceAllocator {
    fn validate_module_impl(&self, module: &Module, _offsets: &VMOffsets<HostPtr>) -> Result<()> {
        let name = module.name().unwrap_or("<unnamed>");
        let limit = |limit, value: u64, requested: u64| LimitExceeded {
            limit,
            value,
            requested,
        };
        if let Some(max) = self.limits.total_memories
            && u64::from(module.num_defined_memories()) > max
        {
            return Err(limit("total_memories", max, module.num_defined_memories().into()))
                .with_context(|| format!("module {name} can never be instantiated"));
        }
        if let Some(max) = self.limits.total_tables
            && u64::from(module.num_defined_tables()) > max
        {
            return Err(limit("total_tables", max, module.num_defined_tables().into()))
                .with_context(|| format!("module {name} can never be instantiated"));
        }
        for (index, ty) in module.defined_memories() {
            let minimum = ty.minimum_bytes().unwrap_or(u64::MAX);
            if let Some(max) = self.limits.max_memory_size
                && minimum > max as u64
            {
                return Err(limit("max_memory_size", max as u64, minimum))
                    .with_context(|| format!("module {name}: memory {} starts too large", index.as_u32()));
            }
        }
        for (index, ty) in module.defined_tables() {
            if let Some(max) = self.limits.table_elements
                && ty.minimum > max as u64
            {
                return Err(limit("table_elements", max as u64, ty.minimum))
                    .with_context(|| format!("module {name}: table {} starts too large", index.as_u32()));
            }
        }
        Ok(())
    }

    fn increment_core_instance_count(&self) -> Result<()> {
        acquire(
            &self.instances,
            self.limits.total_core_instances,
            "total_core_instances",
        )
        .map(Unit::keep)
    }

    fn decrement_core_instance_count(&self) {
        release(&self.instances);
    }

    unsafe fn allocate_memory(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &MemoryType,
        memory_index: DefinedMemoryIndex,
    ) -> Result<(MemoryAllocationIndex, Memory)> {
        let unit = acquire(&self.memories, self.limits.total_memories, "total_memories")?;
        let memory = Memory::new_dynamic_reusing(
            ty,
            request.tunables,
            self.limits.max_memory_size,
            request.limiter.as_deref_mut(),
            |layout| self.reservations.take(layout),
        )
        .with_context(|| {
            format!(
                "failed to allocate memory {} of {}",
                memory_index.as_u32(),
                ty.minimum_bytes()
                    .map_or("16 EiB or more".to_owned(), berth_core::exact_bytes)
            )
        });
        let mut memory = memory?;
        // Counted while the memory lives, current across moves.
        memory.track_reservation(self.reserved.clone());
        let image = if request.tunables.memory_init_cow {
            request.module.memory_image(memory_index)
        } else {
            Ok(None)
        };
        image
            .and_then(|image| image.map_or(Ok(()), |image| memory.map_image(image)))
            .with_context(|| format!("failed to map the image of memory {}", memory_index.as_u32()))?;
        let index = self
            .habits
            .start((request.module.id(), memory_index), &mut memory);
        unit.keep();
        Ok((index, memory))
    }

    unsafe fn deallocate_memory(
        &self,
        _memory_index: DefinedMemoryIndex,
        allocation_index: MemoryAllocationIndex,
        memory: Memory,
    ) {
        self.habits.finish(allocation_index, &memory);
        self.reservations.give_back(memory);
        release(&self.memories);
    }

    unsafe fn allocate_table(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &TableType,
        table_index: DefinedTableIndex,
    ) -> Result<(TableAllocationIndex, Table)> {
        let unit = acquire(&self.tables, self.limits.total_tables, "total_tables")?;
        let table = Table::new_dynamic(ty, self.limits.table_elements, request.limiter.as_deref_mut())
            .with_context(|| {
                format!(
                    "failed to allocate table {} of {} elements",
                    table_index.as_u32(),
                    ty.minimum
                )
            });
        let table = table?;
        unit.keep();
        Ok((TableAllocationIndex::default(), table))
    }

    unsafe fn deallocate_table(
        &self,
        _table_index: DefinedTableIndex,
        _allocation_index: TableAllocationIndex,
        table: Table,
    ) {
        drop(table);
        release(&self.tables);
    }

    fn purge_module(&self, module: ModuleId) {
        self.habits.purge(module);
    }

    /// Unmaps the freed reservations kept for reuse (their pages were given back when they
    /// were freed, so no resident byte comes back with them).
    fn release_idle_memory(&self) -> Released {
        Released::new(self.reservations.release_all(), 0)
    }

    fn stats(&self) -> AllocatorStats {
        let mut stats = AllocatorStats::default();
        stats.live_instances = self.instances.load(Ordering::Acquire);
        stats.live_memories = self.memories.load(Ordering::Acquire);
        stats.live_tables = self.tables.load(Ordering::Acquire);
        let (kept, kept_bytes) = self.reservations.kept();
        stats.reserved_bytes = self.reserved.load(Ordering::Relaxed) + kept_bytes;
        stats.warm_memory_slots = kept;
        stats
    }
}
