//! Berth's pooling backend, for thousands of short-lived instances a second.
//!
//! Everything is reserved once, when the allocator is built: one `PROT_NONE` reservation cut
//! into memory slots with guards between them, one slab of table slots. Instantiation takes a
//! slot in O(1), preferring the slot the same module used last (already in the right state:
//! no system call), and deallocation resets what the tenant could have written before any
//! other instance can see it. See [`PoolingConfig`] for the knobs and [`PoolLayout`] for what a
//! configuration costs, and the module docs in the source: `layout` for the slot layout, `slots`
//! for a slot's states, `reset` for the reset policy, `decommit` for batched decommits.
//!
//! What it will not do: move a memory (a pooled memory grows in its slot up to
//! `max_memory_size`, then `memory.grow` returns -1), or grow the pools.

#![deny(missing_docs)]

mod check;
mod config;
mod decommit;
mod history;
mod kept;
mod layout;
mod memory_pool;
mod preflight;
mod reset;
mod shard;
mod slot_bytes;
mod slots;
mod table_pool;
#[cfg(test)]
mod tests;
mod warm;

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use berth_core::{
    AllocatorStats, DefinedMemoryIndex, DefinedTableIndex, HostPtr, InstanceAllocationRequest,
    InstanceAllocatorImpl, LimitExceeded, Memory, MemoryAllocationIndex, MemoryType, Mmap, Module, ModuleId,
    Released, Table, TableAllocationIndex, TableType, Tunables, VMOffsets, human_bytes, sys,
};

pub use check::{check_module, pool_misfits};
pub use config::PoolingConfig;
pub use layout::PoolLayout;
pub use preflight::{Machine, MachineLimit, Preflight, preflight};

use memory_pool::{Choose, Keeps, Lease, MemoryKey, MemoryPool, Wanted};
use reset::MemoryReset;
use shard::{Release, Shard};
use slot_bytes::Region;
use table_pool::{TablePool, TableReset};
use warm::WarmBudget;

/// The pooling backend. Build one per engine; share it with an `Arc`.
#[derive(Debug)]
pub struct PoolingInstanceAllocator {
    config: PoolingConfig,
    tunables: Tunables,
    layout: PoolLayout,
    /// Dropped before the mappings their slots live in.
    shards: Box<[Shard]>,
    /// The cap on warm memory slots, shared by the shards.
    warm: Arc<WarmBudget>,
    memory_chunk: u32,
    table_chunk: u32,
    _memory_mapping: Mmap,
    _table_mapping: Mmap,
}

/// How many times a thread yields, at most, waiting for a slot of its module memory that is
/// being reset, before it sets up another one.
const RESET_WAIT: usize = 64;

impl PoolingInstanceAllocator {
    /// Reserves the pools for `config` under the engine's `tunables`.
    pub fn new(config: &PoolingConfig, tunables: &Tunables) -> Result<Self> {
        tunables.validate(sys::page_size())?;
        // What this process can have, measured before anything is reserved: a pool that cannot
        // be built here fails with the knob and the figures (a `MachineLimit`), not `ENOMEM`.
        let layout = PoolLayout::new(config, tunables)?;
        if let Some(fatal) = preflight::fatal(config, &layout) {
            return Err(anyhow::Error::new(fatal));
        }
        let space = |bytes: usize| human_bytes(bytes as u64);
        let mut memory_mapping = Mmap::reserve(layout.memory_pool_bytes).with_context(|| {
            format!(
                "failed to reserve {} of address space for {} memory slots of {} (total_memories)",
                space(layout.memory_pool_bytes),
                layout.memory_slots,
                space(layout.memory_stride)
            )
        })?;
        let table_bytes = layout.table_pool_bytes;
        let mut table_mapping = Mmap::with_accessible(table_bytes, table_bytes).with_context(|| {
            format!(
                "failed to reserve {} for {} table slots of {} (total_tables)",
                space(table_bytes),
                layout.table_slots,
                space(layout.table_stride)
            )
        })?;
        let memory_base = NonNull::new(memory_mapping.as_mut_ptr().wrapping_add(layout.pre_guard))
            .ok_or_else(|| anyhow::anyhow!("memory pool mapped at null"))?;
        let table_base = NonNull::new(table_mapping.as_mut_ptr())
            .ok_or_else(|| anyhow::anyhow!("table pool mapped at null"))?;
        // SAFETY: `memory_slots` strides after the pre-guard are the memory mapping (its size is
        // computed from exactly that), which the allocator keeps until its shards are dropped;
        // the pre-guard and the stride are page multiples (`PoolLayout`), as is the mapping.
        let memories = unsafe { Region::new(memory_base, layout.memory_stride, layout.memory_slots) };
        // SAFETY: `table_slots` strides are the table mapping (its size is computed from exactly
        // that), kept until the shards are dropped; the stride is a page multiple.
        let tables = unsafe { Region::new(table_base, layout.table_stride, layout.table_slots) };
        // One shard per core that can instantiate at once (at most 16).
        let shards = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 16);
        let count = u32::try_from(shards).unwrap_or(1);
        let memory_chunk = shard::chunk(config.total_memories, shards);
        let table_chunk = shard::chunk(config.total_tables, shards);
        let warm = Arc::new(WarmBudget::new(
            config.max_unused_warm_slots as usize,
            config.max_unused_warm_bytes,
            shards,
        ));
        let needs = |knob: &str, slots: u32, bytes: u64| {
            format!("{knob} of {slots} needs {} of bookkeeping", human_bytes(bytes))
        };
        let shards = (0..shards)
            .map(|i| {
                let i32 = u32::try_from(i).unwrap_or(u32::MAX);
                let range = |chunk: u32, total: u32| {
                    let start = chunk.saturating_mul(i32).min(total);
                    start..chunk.saturating_mul(i32 + 1).min(total)
                };
                let share = |total: u32| total / count + u32::from(i32 < total % count);
                let memory_pool = MemoryPool::new(
                    &layout,
                    memories,
                    range(memory_chunk, config.total_memories),
                    warm.clone(),
                    i,
                    config.pagemap_scan,
                );
                let memory_pool = memory_pool.with_context(|| {
                    needs(
                        "total_memories",
                        config.total_memories,
                        memory_pool::bookkeeping_bytes(config.total_memories),
                    )
                })?;
                let table_pool = TablePool::new(
                    &layout,
                    tables,
                    range(table_chunk, config.total_tables),
                    config.pagemap_scan,
                );
                let table_pool = table_pool.with_context(|| {
                    needs(
                        "total_tables",
                        config.total_tables,
                        table_pool::bookkeeping_bytes(config.total_tables),
                    )
                })?;
                Ok(Shard::new(
                    memory_pool,
                    table_pool,
                    config.decommit_batch_size,
                    i64::from(share(config.total_core_instances)),
                ))
            })
            .collect::<Result<Box<[Shard]>>>()?;
        Ok(PoolingInstanceAllocator {
            config: config.clone(),
            tunables: *tunables,
            layout,
            shards,
            warm,
            memory_chunk,
            table_chunk,
            _memory_mapping: memory_mapping,
            _table_mapping: table_mapping,
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

    /// Makes the next `n` memory slot resets of each shard fail, as if the kernel had refused
    /// them.
    #[cfg(test)]
    fn fail_next_resets(&self, n: u32) {
        for shard in &*self.shards {
            shard.memories.fail_resets.store(n, Ordering::SeqCst);
        }
    }

    /// Makes the next `n` decommits of each shard fail, as if the kernel had refused them (they
    /// are not run at all, so what they were to give back stays for the failure path to reset).
    #[cfg(test)]
    fn fail_next_decommits(&self, n: u32) {
        for shard in &*self.shards {
            shard.fail_decommits.store(n, Ordering::SeqCst);
        }
    }

    /// Gives back, now, what the pool keeps for tenants to come: queued decommits run, every
    /// warm memory slot is pushed out (its kept pages and image given back; cold until used
    /// again) and the resident pages of free table slots are decommitted. Live instances keep
    /// all they have; the address space stays reserved. For a host that goes quiet.
    pub fn release_idle_memory(&self) -> Released {
        self.flush_decommits();
        let mut released = Released::default();
        for shard in &*self.shards {
            released += shard.memories.release_idle();
            let (tables, done) = shard.tables.release_idle();
            released += tables;
            done.count(&shard.decommit_calls, &shard.decommit_ranges);
        }
        released
    }

    /// Runs every queued reset now and returns the slots to their pools. Returns whether
    /// anything was queued.
    pub fn flush_decommits(&self) -> bool {
        let mut any = false;
        for shard in &*self.shards {
            any |= shard.flush();
        }
        self.rebalance_warm();
        any
    }

    /// Resets a slot a tenant gave back, in the shard it belongs to (`opens`: the first its
    /// instance's deallocation gives back, memory or table 0). The reset (or a batch of
    /// decommits it completes) may add warm slots to a shard that is not borrowing while another
    /// is, so the warm set is brought back under its caps before this returns, whether a memory
    /// or a table was released.
    fn release(&self, shard: &Shard, release: Release, opens: bool) {
        shard.release(release, opens);
        self.rebalance_warm();
    }

    /// While the shards keep more warm slots than the cap (one kept more than its share), has
    /// the shard holding the pool's least recently used warm slot push it out; while their warm
    /// slots keep more resident bytes than the byte cap, has the shard keeping the most push out
    /// its least recently used slot that keeps some.
    fn rebalance_warm(&self) {
        loop {
            let gave = if self.warm.over() {
                self.warm
                    .oldest()
                    .is_some_and(|oldest| self.shards[oldest].memories.give_back(false))
            } else if self.warm.over_bytes() {
                self.warm
                    .fullest()
                    .is_some_and(|fullest| self.shards[fullest].memories.give_back(true))
            } else {
                return;
            };
            if !gave {
                return;
            }
        }
    }

    /// Instances allocated and not yet deallocated.
    fn live_instances(&self) -> u64 {
        let sum: i64 = self
            .shards
            .iter()
            .map(|s| s.instances.load(Ordering::Acquire))
            .sum();
        u64::try_from(sum).unwrap_or(0)
    }

    fn memory_shard(&self, slot: u32) -> &Shard {
        &self.shards[(slot / self.memory_chunk) as usize]
    }

    fn table_shard(&self, slot: u32) -> &Shard {
        &self.shards[(slot / self.table_chunk) as usize]
    }

    /// Runs `take` on this thread's shard, then the others; if all are exhausted, runs the
    /// reset queues (and waits for resets other threads are running) and tries again.
    fn take<T>(&self, take: impl Fn(&Shard) -> Option<T>) -> Option<T> {
        let n = self.shards.len();
        let home = shard::home(n);
        let any = || (0..n).find_map(|i| take(&self.shards[(home + i) % n]));
        loop {
            if let Some(taken) = any() {
                return Some(taken);
            }
            if self.flush_decommits() {
                continue;
            }
            // No reset running and (checked after that, since a running reset may queue its
            // slot before it stops counting) nothing queued: what is idle is all there is.
            let idle = self
                .shards
                .iter()
                .all(|s| s.in_flight.load(Ordering::Acquire) == 0);
            if idle && !self.flush_decommits() {
                return any();
            }
            if !idle {
                std::thread::yield_now();
            }
        }
    }

    /// Takes a memory slot for `key`, ready for `wanted`, in this order: the module memory's
    /// own warm slot in this thread's shard; if its own slot waits in this shard's decommit
    /// queue keeping [`CACHED`](reset::CACHED) bytes or more, that one (the queue runs early;
    /// see [`Keeps::Cached`]); a cold slot there, while the pool keeps fewer than half its cap
    /// warm (two threads instantiating the same modules then each keep their own slots and
    /// share no lock); if its own slot waits in this shard's decommit queue, another one if
    /// that one keeps no page (see [`Shard::take_queued`]), or else that one (the queue runs
    /// early); its own slot in another shard (a module instantiated from several
    /// threads keeps its slots wherever they are); one being reset anywhere, waited for
    /// briefly; a cold slot. Only then does a shard hand out another module's warm slot.
    fn take_memory(&self, key: MemoryKey, wanted: &Wanted<'_>) -> Result<Lease> {
        let n = self.shards.len();
        let home = shard::home(n);
        let own = &self.shards[home];
        let others = || (1..n).map(|i| &self.shards[(home + i) % n]);
        let home_cold = || {
            self.warm
                .under_half()
                .then(|| own.memories.take(key, wanted, Choose::OwnOrCold))
                .flatten()
        };
        let own_anywhere = || {
            own.take_own(key, wanted)
                .or_else(|| others().find_map(|s| s.take_own(key, wanted)))
        };
        // A slot of this memory being reset turns warm in a moment: better than setting up
        // another one, which in a full pool pushes a third out (and its module misses it).
        let reset_soon = || {
            for _ in 0..RESET_WAIT {
                if !self.shards.iter().any(|s| s.memories.resetting(key)) {
                    return None;
                }
                std::thread::yield_now();
                if let Some(taken) = own_anywhere() {
                    return Some(taken);
                }
            }
            None
        };
        let taken = own
            .memories
            .take(key, wanted, Choose::Own)
            .or_else(|| {
                let queued = own.queued(key);
                let waiting = |keeps| {
                    // Another slot than the waiting one: a cold one while the pool is under
                    // its cap; at the cap, the least recently used warm slot, which is due to
                    // go.
                    let another = if self.warm.at_cap() {
                        Choose::Any
                    } else {
                        Choose::OwnOrCold
                    };
                    own.take_queued(key, wanted, keeps, Some(another))
                };
                if queued == Some(Keeps::Cached) {
                    waiting(Keeps::Cached).or_else(home_cold)
                } else {
                    home_cold().or_else(|| queued.and_then(waiting))
                }
            })
            .or_else(|| others().find_map(|s| s.take_own(key, wanted)))
            .or_else(reset_soon)
            .or_else(|| own.memories.take(key, wanted, Choose::OwnOrCold))
            .or_else(|| others().find_map(|s| s.memories.take(key, wanted, Choose::OwnOrCold)));
        if let Some(taken) = taken {
            return taken;
        }
        // Its own slots, warm or waiting in a queue, were looked for above: another module's
        // warm slot now, the least recently used of the first shard that has one (when none
        // has, `take` runs every queue and tries again).
        let take = |shard: &Shard| shard.memories.take(key, wanted, Choose::Any);
        self.take(take).unwrap_or_else(|| {
            let n = u64::from(self.config.total_memories);
            Err(LimitExceeded::error("total_memories", n, n + 1))
        })
    }

    fn take_table(&self) -> Result<u32> {
        self.take(|shard| shard.tables.take()).ok_or_else(|| {
            let n = u64::from(self.config.total_tables);
            LimitExceeded::error("total_tables", n, n + 1)
        })
    }
}

/// A slot taken for a memory or table not made yet. Dropped before [`settle`](Self::settle),
/// it is given up: an error or a panic (the embedder's limiter runs in between) leaves no slot
/// held for a tenant that never came.
struct Claim<'a, P> {
    pool: &'a P,
    slot: u32,
    give_up: fn(&P, u32),
}

impl<'a, P> Claim<'a, P> {
    fn new(pool: &'a P, slot: u32, give_up: fn(&P, u32)) -> Self {
        Claim { pool, slot, give_up }
    }

    /// The slot is its tenant's now.
    fn settle(self) {
        std::mem::forget(self);
    }
}

impl<P> Drop for Claim<'_, P> {
    fn drop(&mut self) {
        (self.give_up)(self.pool, self.slot);
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
        // Each shard holds a share of the limit: this thread's shard first, then the others,
        // so the limit is exact and two threads rarely touch the same counter.
        let n = self.shards.len();
        let home = shard::home(n);
        for i in 0..n {
            let shard = &self.shards[(home + i) % n];
            let counted = shard
                .instances
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                    (c < shard.instance_share).then_some(c + 1)
                });
            if counted.is_ok() {
                return Ok(());
            }
        }
        let max = u64::from(self.config.total_core_instances);
        // Every share was full when looked at; one may have been freed since.
        let requested = (self.live_instances() + 1).max(max.saturating_add(1));
        Err(LimitExceeded::error("total_core_instances", max, requested))
    }

    fn decrement_core_instance_count(&self) {
        // Whichever shard counted it: only the sum over shards means anything.
        self.shards[shard::home(self.shards.len())]
            .instances
            .fetch_sub(1, Ordering::AcqRel);
    }

    unsafe fn allocate_memory(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &MemoryType,
        memory_index: DefinedMemoryIndex,
    ) -> Result<(MemoryAllocationIndex, Memory)> {
        // Once per instance: its memory 0 comes first (the provided methods allocate in order).
        if memory_index.as_u32() == 0 && *request.tunables != self.tunables {
            anyhow::bail!("the pool was built for other tunables than this request's");
        }
        let key = (request.module.id(), memory_index);
        // An image of a page or less is not mapped: its data segments are written when the
        // instance is initialized, which costs less than the `mmap`s of setting up a slot for it
        // (a slot keeps it resident, reset in place like a tenant's writes).
        let image = if self.tunables.memory_init_cow {
            request
                .module
                .memory_images()?
                .get(memory_index)
                .and_then(Option::as_ref)
                .filter(|image| image.len() > self.layout.page_size)
        } else {
            None
        };
        let initial = ty
            .minimum_bytes()
            .and_then(|b| usize::try_from(b).ok())
            .and_then(|b| b.checked_next_multiple_of(self.layout.page_size))
            .unwrap_or(usize::MAX);
        let wanted = Wanted { image, initial };
        let lease = self.take_memory(key, &wanted)?;
        let pool = &self.memory_shard(lease.slot).memories;
        // Given up unless the memory is made: on an error, and on a panic in the limiter.
        let claim = Claim::new(pool, lease.slot, MemoryPool::abandon);
        // SAFETY: the slot is ours alone until deallocation (`Held`: the pool hands it out
        // once); its reservation is page-aligned inside the pool's mapping, which outlives every
        // memory; `lease.accessible` bytes are readable and writable, reading as zeros or as
        // `lease.image` (which this memory wants), the rest `PROT_NONE` and zero.
        let memory = unsafe {
            Memory::new_static(
                ty,
                pool.slot_base(lease.slot),
                self.layout.memory_capacity,
                lease.accessible,
                request.limiter.as_deref_mut(),
            )
        };
        let memory = memory.and_then(|mut memory| {
            match (lease.image, wanted.image) {
                // SAFETY: the slot kept this very image mapped (`ready_for` checked it is the
                // one wanted), and its reset brought back the image's bytes; it lies within the
                // initial size, now accessible.
                (Some(kept), Some(_)) => unsafe { memory.assume_image(kept) },
                (None, Some(image)) => memory.map_image(image.clone())?,
                _ => {}
            }
            Ok(memory)
        });
        match memory {
            Ok(memory) => {
                claim.settle();
                self.memory_shard(lease.slot)
                    .live_memories
                    .fetch_add(1, Ordering::Relaxed);
                Ok((MemoryAllocationIndex::from_u32(lease.slot), memory))
            }
            Err(error) => {
                drop(claim);
                Err(error.context(format!(
                    "failed to allocate memory {} of {} in pool slot {}",
                    memory_index.as_u32(),
                    ty.minimum_bytes().map_or("16 EiB or more".into(), human_bytes),
                    lease.slot
                )))
            }
        }
    }

    unsafe fn deallocate_memory(
        &self,
        memory_index: DefinedMemoryIndex,
        allocation_index: MemoryAllocationIndex,
        memory: Memory,
    ) {
        let page = self.layout.page_size;
        let initial = memory
            .ty()
            .minimum_bytes()
            .map_or(0, |b| usize::try_from(b).unwrap_or(0));
        let accessible = memory.accessible_bytes();
        let reset = MemoryReset {
            slot: allocation_index.as_u32(),
            // Moved to the slot (no reference count touched).
            image: memory.into_image(),
            accessible,
            initial: initial.next_multiple_of(page),
        };
        let shard = self.memory_shard(reset.slot);
        shard.live_memories.fetch_sub(1, Ordering::Relaxed);
        // The provided `deallocate_memories` gives an instance's memories back in order.
        self.release(shard, Release::Memory(reset), memory_index.as_u32() == 0);
    }

    unsafe fn allocate_table(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &TableType,
        table_index: DefinedTableIndex,
    ) -> Result<(TableAllocationIndex, Table)> {
        let slot = self.take_table()?;
        let claim = Claim::new(&self.table_shard(slot).tables, slot, TablePool::abandon);
        let capacity = self.shards[0].tables.capacity().min(self.config.table_elements);
        // SAFETY: the slot is ours alone until deallocation, zeroed (the pool's invariant),
        // and inside the slab, which outlives every table.
        let table = unsafe {
            Table::new_static(
                ty,
                self.table_shard(slot).tables.slot_base(slot),
                capacity,
                request.limiter.as_deref_mut(),
            )
        };
        match table {
            Ok(table) => {
                claim.settle();
                self.table_shard(slot).live_tables.fetch_add(1, Ordering::Relaxed);
                Ok((TableAllocationIndex::from_u32(slot), table))
            }
            Err(error) => {
                drop(claim);
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
        table_index: DefinedTableIndex,
        allocation_index: TableAllocationIndex,
        table: Table,
    ) {
        let reset = TableReset {
            slot: allocation_index.as_u32(),
            dirty: table.size() * size_of::<usize>(),
        };
        drop(table);
        let shard = self.table_shard(reset.slot);
        shard.live_tables.fetch_sub(1, Ordering::Relaxed);
        self.release(shard, Release::Table(reset), table_index.as_u32() == 0);
    }

    fn purge_module(&self, module: ModuleId) {
        for shard in &*self.shards {
            shard.memories.purge(module);
        }
    }

    fn release_idle_memory(&self) -> Released {
        PoolingInstanceAllocator::release_idle_memory(self)
    }

    fn stats(&self) -> AllocatorStats {
        let mut stats = AllocatorStats::default();
        stats.live_instances = self.live_instances();
        stats.reserved_bytes = self.layout.total_bytes() as u64;
        for shard in &*self.shards {
            let (warm, memory_resident) = shard.memories.counts();
            let (warm_tables, table_resident) = shard.tables.counts();
            let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
            stats.live_memories += load(&shard.live_memories);
            stats.live_tables += load(&shard.live_tables);
            stats.warm_memory_slots += warm as u64;
            stats.warm_table_slots += warm_tables as u64;
            stats.idle_memory_resident_bytes += memory_resident as u64;
            stats.idle_table_resident_bytes += table_resident as u64;
            stats.memory_resets += load(&shard.memory_resets);
            stats.table_resets += load(&shard.table_resets);
            stats.decommit_calls += load(&shard.decommit_calls) + load(&shard.memories.decommit_calls);
            stats.decommit_ranges += load(&shard.decommit_ranges) + load(&shard.memories.decommit_ranges);
        }
        stats
    }
}
