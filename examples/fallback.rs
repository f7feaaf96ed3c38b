//! A backend an embedder could write: serve from a pool while it has room, and from
//! on-demand allocations when it is exhausted (or for modules the pool can never hold).
//!
//! It shows the three things a custom backend needs: forwarding to other backends through
//! [`InstanceAllocatorImpl`], remembering which backend served each resource (here: a pooled
//! memory or table is *static*, an on-demand one is not), and keeping the pool's safety
//! contract (only modules the pool validated reach it).

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use berth_core::{
    AllocatorStats, DefinedMemoryIndex, DefinedTableIndex, HostPtr, InstanceAllocationRequest,
    InstanceAllocatorImpl, LimitExceeded, Memory, MemoryAllocationIndex, MemoryType, Module, ModuleId,
    Released, Table, TableAllocationIndex, TableType, Tunables, VMOffsets,
};
use berth_engine::{OnDemandInstanceAllocator, PoolingConfig, PoolingInstanceAllocator};

/// Pool first, on-demand when the pool is full.
#[derive(Debug)]
pub struct FallbackAllocator {
    pool: PoolingInstanceAllocator,
    on_demand: OnDemandInstanceAllocator,
    /// Modules the pool validated: only these may be allocated from it.
    pooled_modules: Mutex<HashSet<ModuleId>>,
    instances: AtomicU64,
    fallbacks: AtomicU64,
}

impl FallbackAllocator {
    /// A pool of `config` under `tunables`, with on-demand behind it.
    pub fn new(config: &PoolingConfig, tunables: &Tunables) -> Result<Self> {
        Ok(FallbackAllocator {
            pool: PoolingInstanceAllocator::new(config, tunables)?,
            on_demand: OnDemandInstanceAllocator::new(),
            pooled_modules: Mutex::new(HashSet::new()),
            instances: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        })
    }

    /// Memories and tables served on demand because the pool could not serve them.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    fn pooled(&self, module: ModuleId) -> bool {
        self.pooled_modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&module)
    }
}

/// Whether an error is the pool being full (rather than, say, the limiter saying no).
fn exhausted(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.downcast_ref::<LimitExceeded>()
            .is_some_and(|l| l.limit.starts_with("total_"))
    })
}

// SAFETY: every resource comes from one of two backends that keep the contract; each is given
// back to the backend that made it (pooled resources are static, on-demand ones are not); the
// pool only sees modules it validated; the instance count is our own and balanced.
unsafe impl InstanceAllocatorImpl for FallbackAllocator {
    fn validate_module_impl(&self, module: &Module, offsets: &VMOffsets<HostPtr>) -> Result<()> {
        self.on_demand.validate_module_impl(module, offsets)?;
        if self.pool.validate_module_impl(module, offsets).is_ok() {
            self.pooled_modules
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(module.id());
        }
        Ok(())
    }

    fn increment_core_instance_count(&self) -> Result<()> {
        self.instances.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn decrement_core_instance_count(&self) {
        self.instances.fetch_sub(1, Ordering::AcqRel);
    }

    unsafe fn allocate_memory(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &MemoryType,
        memory_index: DefinedMemoryIndex,
    ) -> Result<(MemoryAllocationIndex, Memory)> {
        if self.pooled(request.module.id()) {
            // SAFETY: the pool validated this module (checked above); the caller's contract
            // covers the rest.
            match unsafe { self.pool.allocate_memory(request, ty, memory_index) } {
                Err(error) if exhausted(&error) => {}
                result => return result,
            }
        }
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        // SAFETY: on-demand validated every module we accepted; the caller's contract covers
        // the rest.
        unsafe { self.on_demand.allocate_memory(request, ty, memory_index) }
    }

    unsafe fn deallocate_memory(
        &self,
        index: DefinedMemoryIndex,
        slot: MemoryAllocationIndex,
        memory: Memory,
    ) {
        if memory.is_static() {
            // SAFETY: static memories come from the pool (on-demand ones own their mapping).
            unsafe { self.pool.deallocate_memory(index, slot, memory) }
        } else {
            // SAFETY: a memory that is not static came from on-demand.
            unsafe { self.on_demand.deallocate_memory(index, slot, memory) }
        }
    }

    unsafe fn allocate_table(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &TableType,
        table_index: DefinedTableIndex,
    ) -> Result<(TableAllocationIndex, Table)> {
        if self.pooled(request.module.id()) {
            // SAFETY: as for memories.
            match unsafe { self.pool.allocate_table(request, ty, table_index) } {
                Err(error) if exhausted(&error) => {}
                result => return result,
            }
        }
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for memories.
        unsafe { self.on_demand.allocate_table(request, ty, table_index) }
    }

    unsafe fn deallocate_table(&self, index: DefinedTableIndex, slot: TableAllocationIndex, table: Table) {
        if table.is_static() {
            // SAFETY: static tables come from the pool.
            unsafe { self.pool.deallocate_table(index, slot, table) }
        } else {
            // SAFETY: `Vec` tables come from on-demand.
            unsafe { self.on_demand.deallocate_table(index, slot, table) }
        }
    }

    fn purge_module(&self, module: ModuleId) {
        self.pooled_modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&module);
        self.pool.purge_module(module);
        self.on_demand.purge_module(module);
    }

    fn stats(&self) -> AllocatorStats {
        let (pool, on_demand) = (self.pool.stats(), self.on_demand.stats());
        let mut stats = pool.clone();
        stats.live_instances = self.instances.load(Ordering::Acquire);
        stats.live_memories = pool.live_memories + on_demand.live_memories;
        stats.live_tables = pool.live_tables + on_demand.live_tables;
        stats.reserved_bytes = pool.reserved_bytes + on_demand.reserved_bytes;
        stats.warm_memory_slots = pool.warm_memory_slots + on_demand.warm_memory_slots;
        stats
    }

    fn release_idle_memory(&self) -> Released {
        let mut released = self.pool.release_idle_memory();
        released += self.on_demand.release_idle_memory();
        released
    }
}
