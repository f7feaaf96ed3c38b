//! Berth's pooling backend, for thousands of short-lived instances a second.
//!
//! Everything is reserved once, when the allocator is built: one `PROT_NONE` reservation cut
//! into memory slots with guards between them, one slab of table slots. Instantiation takes a
//! slot in O(1), preferring the slot the same module used last (already in the right state:
//! no system call), and deallocation resets what the tenant could have written before any
//! other instance can see it. See [`PoolingConfig`] for the knobs and [`PoolLayout`] for what a
//! configuration costs, and the module docs of `layout`, `memory_pool` and `table_pool` in the
//! source for the slot layout and the reset policy.
//!
//! What it will not do: move a memory (a pooled memory grows in its slot up to
//! `max_memory_size`, then `memory.grow` returns -1), or grow the pools.

#![deny(missing_docs)]

mod check;
mod config;
mod layout;
mod memory_pool;
mod slots;
mod table_pool;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use berth_core::{
    AllocatorStats, DefinedMemoryIndex, DefinedTableIndex, HostPtr, InstanceAllocationRequest,
    InstanceAllocatorImpl, LimitExceeded, Memory, MemoryAllocationIndex, MemoryType, Module, ModuleId, Table,
    TableAllocationIndex, TableType, Tunables, VMOffsets, sys,
};

pub use check::check_module;
pub use config::PoolingConfig;
pub use layout::PoolLayout;

use memory_pool::{MemoryPool, MemoryReset, SlotInfo};
use table_pool::{TablePool, TableReset};

/// A reset waiting in the decommit queue.
#[derive(Debug, Clone)]
enum Reset {
    Memory(MemoryReset),
    Table(TableReset),
}

/// The pooling backend. Build one per engine; share it with an `Arc`.
#[derive(Debug)]
pub struct PoolingInstanceAllocator {
    config: PoolingConfig,
    tunables: Tunables,
    layout: PoolLayout,
    memories: MemoryPool,
    tables: TablePool,
    queue: Mutex<Vec<Reset>>,
    /// Resets taken out of the queue and not yet finished: their slots will come back.
    in_flight: AtomicUsize,
    instances: AtomicU64,
    /// Memories and tables handed to tenants (not counting slots waiting for their reset).
    live_memories: AtomicU64,
    live_tables: AtomicU64,
    resets: AtomicU64,
    decommits: AtomicU64,
    fail_resets: AtomicU32,
}

fn limit(limit: &'static str, value: u64, requested: u64) -> anyhow::Error {
    anyhow::Error::new(LimitExceeded {
        limit,
        value,
        requested,
    })
}

impl PoolingInstanceAllocator {
    /// Reserves the pools for `config` under the engine's `tunables`.
    pub fn new(config: &PoolingConfig, tunables: &Tunables) -> Result<Self> {
        tunables.validate(sys::page_size())?;
        let layout = PoolLayout::new(config, tunables)?;
        Ok(PoolingInstanceAllocator {
            memories: MemoryPool::new(&layout, config.max_unused_warm_slots, config.pagemap_scan)?,
            tables: TablePool::new(&layout)?,
            config: config.clone(),
            tunables: *tunables,
            layout,
            queue: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            instances: AtomicU64::new(0),
            live_memories: AtomicU64::new(0),
            live_tables: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            decommits: AtomicU64::new(0),
            fail_resets: AtomicU32::new(0),
        })
    }

    /// The configuration the pools were built from.
    pub fn config(&self) -> &PoolingConfig {
        &self.config
    }

    /// The pools' layout.
    pub fn layout(&self) -> &PoolLayout {
        &self.layout
    }

    /// Makes the next `n` memory slot resets fail, as if `madvise` had failed, so tests can
    /// check that such a slot is re-mapped before its next use. Not for production use.
    #[doc(hidden)]
    pub fn fail_next_resets(&self, n: u32) {
        self.fail_resets.store(n, Ordering::SeqCst);
    }

    /// Runs every queued reset now and returns the slots to their pools. Returns whether
    /// anything was queued.
    pub fn flush_decommits(&self) -> bool {
        let jobs = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            self.in_flight.fetch_add(queue.len(), Ordering::AcqRel);
            std::mem::take(&mut *queue)
        };
        if jobs.is_empty() {
            return false;
        }
        self.run(&jobs);
        true
    }

    /// Runs resets already counted in `in_flight` and returns their slots to the pools.
    fn run(&self, jobs: &[Reset]) {
        let mut decommits = 0;
        for job in jobs {
            match job {
                Reset::Memory(reset) => {
                    let fail = self.fail_resets.load(Ordering::Relaxed) > 0
                        && self
                            .fail_resets
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                    let info = self.memories.reset(reset, fail, &mut decommits);
                    self.memories.finish(reset.slot, info);
                }
                Reset::Table(reset) => {
                    let resident = self.tables.reset(reset, &mut decommits);
                    self.tables.finish(reset.slot, resident);
                }
            }
        }
        self.resets.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        if decommits > 0 {
            self.decommits.fetch_add(decommits, Ordering::Relaxed);
        }
        self.in_flight.fetch_sub(jobs.len(), Ordering::AcqRel);
    }

    fn enqueue(&self, reset: Reset) {
        if self.config.decommit_batch_size == 1 {
            // No batching: reset at once, without the queue.
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            self.run(std::slice::from_ref(&reset));
            return;
        }
        let batch = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.push(reset);
            if queue.len() < self.config.decommit_batch_size {
                return;
            }
            self.in_flight.fetch_add(queue.len(), Ordering::AcqRel);
            std::mem::take(&mut *queue)
        };
        self.run(&batch);
    }

    /// Takes a memory slot; if the pool is exhausted, runs the decommit queue (and waits for
    /// resets other threads are running) before it gives up.
    fn take_memory(&self, key: memory_pool::MemoryKey) -> Result<(u32, SlotInfo)> {
        self.retry(|| self.memories.take(key)).ok_or_else(|| {
            let n = u64::from(self.config.total_memories);
            limit("total_memories", n, n + 1)
        })
    }

    /// Runs `take`; while it finds nothing and resets are queued or running, runs the queue or
    /// waits for them, and tries again.
    fn retry<T>(&self, mut take: impl FnMut() -> Option<T>) -> Option<T> {
        loop {
            if let Some(taken) = take() {
                return Some(taken);
            }
            if !self.flush_decommits() {
                if self.in_flight.load(Ordering::Acquire) == 0 {
                    return take();
                }
                std::thread::yield_now();
            }
        }
    }

    fn take_table(&self) -> Result<u32> {
        self.retry(|| self.tables.take()).ok_or_else(|| {
            let n = u64::from(self.config.total_tables);
            limit("total_tables", n, n + 1)
        })
    }
}

// SAFETY: every memory is a slot of the pool's own reservation and every table a slot of its
// slab, handed to one tenant at a time (the slot allocators never hand a slot out twice) and
// reset to zeros before reuse; memories honour the tunables the pool was built for (checked
// against every request); counts go up and down exactly once.
unsafe impl InstanceAllocatorImpl for PoolingInstanceAllocator {
    fn validate_module_impl(&self, module: &Module, offsets: &VMOffsets<HostPtr>) -> Result<()> {
        check::check(&self.config, &self.layout, module, offsets)
    }

    fn increment_core_instance_count(&self) -> Result<()> {
        let max = u64::from(self.config.total_core_instances);
        self.instances
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(drop)
            .map_err(|n| limit("total_core_instances", max, n + 1))
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
        if *request.tunables != self.tunables {
            anyhow::bail!("the pool was built for other tunables than this request's");
        }
        let key = (request.module.id(), memory_index);
        let wanted = if self.tunables.memory_init_cow {
            request.module.memory_image(memory_index)
        } else {
            None
        };
        let (slot, mut info) = self.take_memory(key)?;
        // A slot holding another module's image (or one this memory must not see) starts
        // again from a fresh reservation, as does one whose last reset failed.
        let foreign_image = match (&info.image, &wanted) {
            (Some(have), Some(want)) => !Arc::ptr_eq(have, want),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if info.needs_remap || foreign_image {
            match self.memories.remap(slot) {
                Ok(fresh) => info = fresh,
                Err(error) => {
                    self.memories.untake(
                        slot,
                        SlotInfo {
                            needs_remap: true,
                            ..SlotInfo::default()
                        },
                    );
                    return Err(error);
                }
            }
        }
        let base = self.memories.slot_base(slot);
        // SAFETY: the slot is ours alone until deallocation (the slot allocator hands it out
        // once); its reservation is page-aligned inside the pool's mapping, which outlives every
        // memory; `info.accessible` bytes are readable and writable, reading as zeros or as
        // `info.image` (which this memory wants), the rest `PROT_NONE` and zero.
        let memory = unsafe {
            Memory::new_static(
                ty,
                base,
                self.layout.memory_capacity,
                info.accessible,
                request.limiter.as_deref_mut(),
            )
        };
        let memory = memory.and_then(|mut memory| {
            match (info.image, wanted) {
                // SAFETY: the slot kept this very image mapped, and its reset brought back
                // the image's bytes; it lies within the initial size, now accessible.
                (Some(kept), Some(_)) => unsafe { memory.assume_image(kept) },
                (None, Some(image)) => memory.map_image(image)?,
                _ => {}
            }
            Ok(memory)
        });
        match memory {
            Ok(memory) => {
                self.live_memories.fetch_add(1, Ordering::AcqRel);
                Ok((MemoryAllocationIndex::from_u32(slot), memory))
            }
            Err(error) => {
                // Its protection may be half-changed: re-map it before its next use.
                self.memories.untake(
                    slot,
                    SlotInfo {
                        needs_remap: true,
                        ..SlotInfo::default()
                    },
                );
                Err(error.context(format!(
                    "failed to allocate memory {} of {:#x} bytes in pool slot {slot}",
                    memory_index.as_u32(),
                    ty.minimum_bytes().unwrap_or(u64::MAX)
                )))
            }
        }
    }

    unsafe fn deallocate_memory(
        &self,
        _memory_index: DefinedMemoryIndex,
        allocation_index: MemoryAllocationIndex,
        memory: Memory,
    ) {
        let page = self.layout.page_size;
        let initial = memory
            .ty()
            .minimum_bytes()
            .map_or(0, |b| usize::try_from(b).unwrap_or(0));
        let reset = MemoryReset {
            slot: allocation_index.as_u32(),
            image: memory.image().cloned(),
            accessible: memory.accessible_bytes(),
            initial: initial.next_multiple_of(page),
        };
        drop(memory);
        self.live_memories.fetch_sub(1, Ordering::AcqRel);
        self.enqueue(Reset::Memory(reset));
    }

    unsafe fn allocate_table(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &TableType,
        table_index: DefinedTableIndex,
    ) -> Result<(TableAllocationIndex, Table)> {
        let slot = self.take_table()?;
        let capacity = self.tables.capacity().min(self.config.table_elements);
        // SAFETY: the slot is ours alone until deallocation, zeroed (the pool's invariant),
        // and inside the slab, which outlives every table.
        let table = unsafe {
            Table::new_static(
                ty,
                self.tables.slot_base(slot),
                capacity,
                request.limiter.as_deref_mut(),
            )
        };
        match table {
            Ok(table) => {
                self.live_tables.fetch_add(1, Ordering::AcqRel);
                Ok((TableAllocationIndex::from_u32(slot), table))
            }
            Err(error) => {
                self.tables.finish(slot, 0);
                Err(error.context(format!(
                    "failed to allocate table {} of {} elements",
                    table_index.as_u32(),
                    ty.minimum
                )))
            }
        }
    }

    unsafe fn deallocate_table(
        &self,
        _table_index: DefinedTableIndex,
        allocation_index: TableAllocationIndex,
        table: Table,
    ) {
        let reset = TableReset {
            slot: allocation_index.as_u32(),
            dirty: table.size() * size_of::<usize>(),
        };
        drop(table);
        self.live_tables.fetch_sub(1, Ordering::AcqRel);
        self.enqueue(Reset::Table(reset));
    }

    fn purge_module(&self, module: ModuleId) {
        self.memories.purge(module);
    }

    fn stats(&self) -> AllocatorStats {
        let (_, warm, memory_resident) = self.memories.counts();
        let (_, table_resident) = self.tables.counts();
        let mut stats = AllocatorStats::default();
        stats.live_instances = self.instances.load(Ordering::Acquire);
        stats.live_memories = self.live_memories.load(Ordering::Acquire);
        stats.live_tables = self.live_tables.load(Ordering::Acquire);
        stats.reserved_bytes = self.layout.total_bytes() as u64;
        stats.warm_slots = warm as u64;
        stats.idle_resident_bytes = (memory_resident + table_resident) as u64;
        stats.resets = self.resets.load(Ordering::Relaxed);
        stats.decommits = self.decommits.load(Ordering::Relaxed);
        stats
    }
}
