//! Berth's on-demand backend: every memory gets its own virtual-memory reservation when it is
//! allocated and gives it back when it is deallocated; tables are `Vec`s.
//!
//! It is the simplest backend and the default one: nothing is reserved up front, so it costs
//! nothing while idle, and every instantiation makes a few system calls (`mmap`, `mprotect`,
//! and `munmap` when it goes). Memories honour the engine's [`Tunables`](berth_core::Tunables)
//! (reservation, guards, growth reserve, whether they may move). Optional
//! [`OnDemandLimits`] cap how many instances, memories and tables may be live and how large
//! a memory or table may get; each cap fails with a [`LimitExceeded`] error naming it.
//!
//! It will not reuse anything between instances: for thousands of short-lived instances a
//! second, use the pooling backend.

#![deny(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use berth_core::{
    AllocatorStats, DefinedMemoryIndex, DefinedTableIndex, HostPtr, InstanceAllocationRequest,
    InstanceAllocatorImpl, LimitExceeded, Memory, MemoryAllocationIndex, MemoryType, Module, ModuleId, Table,
    TableAllocationIndex, TableType, VMOffsets,
};

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
#[derive(Debug, Default)]
pub struct OnDemandInstanceAllocator {
    limits: OnDemandLimits,
    instances: AtomicU64,
    memories: AtomicU64,
    tables: AtomicU64,
    reserved: Arc<AtomicU64>,
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

    /// The limits this allocator enforces.
    pub fn limits(&self) -> &OnDemandLimits {
        &self.limits
    }
}

/// Adds one to `counter` unless that would pass `limit`.
fn acquire(counter: &AtomicU64, limit: Option<u64>, name: &'static str) -> Result<()> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match limit {
            Some(max) if n >= max => None,
            _ => Some(n + 1),
        })
        .map(drop)
        .map_err(|n| LimitExceeded::error(name, limit.unwrap_or(u64::MAX), n + 1))
}

fn release(counter: &AtomicU64) {
    let previous = counter.fetch_sub(1, Ordering::AcqRel);
    debug_assert!(previous > 0, "on-demand allocator count released below zero");
}

// SAFETY: memories are fresh reservations and tables fresh `Vec`s, used by no one else; both
// honour the request's tunables (`Memory::new_dynamic`); counts go up on allocation and down
// on deallocation exactly once.
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
        acquire(&self.memories, self.limits.total_memories, "total_memories")?;
        let memory = Memory::new_dynamic(
            ty,
            request.tunables,
            self.limits.max_memory_size,
            request.limiter.as_deref_mut(),
        )
        .with_context(|| {
            format!(
                "failed to allocate memory {} of {:#x} bytes",
                memory_index.as_u32(),
                ty.minimum_bytes().unwrap_or(u64::MAX)
            )
        });
        match memory {
            Ok(mut memory) => {
                // Counted while the memory lives, current across moves.
                memory.track_reservation(self.reserved.clone());
                if request.tunables.memory_init_cow
                    && let Some(image) = request.module.memory_image(memory_index)
                    && let Err(error) = memory.map_image(image)
                {
                    drop(memory);
                    release(&self.memories);
                    return Err(error.context(format!(
                        "failed to map the image of memory {}",
                        memory_index.as_u32()
                    )));
                }
                Ok((MemoryAllocationIndex::default(), memory))
            }
            Err(error) => {
                release(&self.memories);
                Err(error)
            }
        }
    }

    unsafe fn deallocate_memory(
        &self,
        _memory_index: DefinedMemoryIndex,
        _allocation_index: MemoryAllocationIndex,
        memory: Memory,
    ) {
        drop(memory);
        release(&self.memories);
    }

    unsafe fn allocate_table(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &TableType,
        table_index: DefinedTableIndex,
    ) -> Result<(TableAllocationIndex, Table)> {
        acquire(&self.tables, self.limits.total_tables, "total_tables")?;
        let table = Table::new_dynamic(ty, self.limits.table_elements, request.limiter.as_deref_mut())
            .with_context(|| {
                format!(
                    "failed to allocate table {} of {} elements",
                    table_index.as_u32(),
                    ty.minimum
                )
            });
        match table {
            Ok(table) => Ok((TableAllocationIndex::default(), table)),
            Err(error) => {
                release(&self.tables);
                Err(error)
            }
        }
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

    fn purge_module(&self, _module: ModuleId) {
        // Nothing is kept per module.
    }

    fn stats(&self) -> AllocatorStats {
        let mut stats = AllocatorStats::default();
        stats.live_instances = self.instances.load(Ordering::Acquire);
        stats.live_memories = self.memories.load(Ordering::Acquire);
        stats.live_tables = self.tables.load(Ordering::Acquire);
        stats.reserved_bytes = self.reserved.load(Ordering::Relaxed);
        stats
    }
}
