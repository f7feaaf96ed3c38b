//! [`Fallback`]: one backend first, another when the first is full.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use berth_core::{
    AllocatorStats, DefinedMemoryIndex, DefinedTableIndex, HostPtr, InstanceAllocationRequest,
    InstanceAllocatorImpl, LimitExceeded, LimiterDenied, Memory, MemoryAllocationIndex, MemoryType, Module,
    ModuleId, Released, Table, TableAllocationIndex, TableType, VMOffsets,
};

use crate::ledger::Ledger;

/// Which backend made a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Primary,
    Secondary,
}

/// Which backends validated a module.
#[derive(Debug, Clone, Copy, Default)]
struct Accepts {
    primary: bool,
    secondary: bool,
}

/// Serves every memory and table from `primary` while it can, and from `secondary` when the
/// primary is full (its error holds a [`LimitExceeded`]: a pool with no free slot) or can never
/// hold the module (it failed the primary's validation). A pool in front of on-demand
/// allocation is the usual pair: pool speed while the pool has room, and no instantiation
/// refused for lack of slots.
///
/// Other errors of the primary (a limiter's refusal or error, even one holding a
/// `LimitExceeded`; the system's) are the instantiation's.
/// A module either backend validated may be instantiated; one neither did fails to load with
/// both reasons. Each resource goes back to the backend that made it.
///
/// A fallback shared by several engines may be told by one that a module is purged while
/// another still instantiates it: it validates the module again at its next allocation.
///
/// The instance count is the fallback's own: the inner backends' instance limits do not apply
/// (their memory and table limits do). [`stats`](InstanceAllocatorImpl::stats) adds up both
/// backends'; [`fallbacks`](Self::fallbacks) counts resources the secondary served.
#[derive(Debug)]
pub struct Fallback<P, S> {
    primary: P,
    secondary: S,
    modules: Mutex<HashMap<ModuleId, Accepts>>,
    memories: Ledger<(Side, MemoryAllocationIndex)>,
    tables: Ledger<(Side, TableAllocationIndex)>,
    instances: AtomicU64,
    fallbacks: AtomicU64,
}

impl<P: InstanceAllocatorImpl, S: InstanceAllocatorImpl> Fallback<P, S> {
    /// `primary` first, `secondary` behind it.
    pub fn new(primary: P, secondary: S) -> Self {
        Fallback {
            primary,
            secondary,
            modules: Mutex::new(HashMap::new()),
            memories: Ledger::default(),
            tables: Ledger::default(),
            instances: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }

    /// The primary backend.
    pub fn primary(&self) -> &P {
        &self.primary
    }

    /// The secondary backend.
    pub fn secondary(&self) -> &S {
        &self.secondary
    }

    /// Memories and tables the secondary served, in all.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Which sides validated the request's module. A module purged since it was validated (a
    /// backend shared by several engines hears one engine drop a module another still
    /// instantiates) is validated again, as at load, rather than sent to a side that may never
    /// have accepted it.
    fn accepts(&self, request: &InstanceAllocationRequest<'_>) -> Result<Accepts> {
        let id = request.module.id();
        if let Some(accepts) = self.lock_modules().get(&id).copied() {
            return Ok(accepts);
        }
        self.validate(request.module, request.offsets)
    }

    /// Validates `module` with both sides and records which accept it; an error if neither
    /// does.
    fn validate(&self, module: &Module, offsets: &VMOffsets<HostPtr>) -> Result<Accepts> {
        let primary = self.primary.validate_module_impl(module, offsets);
        let secondary = self.secondary.validate_module_impl(module, offsets);
        let accepts = Accepts {
            primary: primary.is_ok(),
            secondary: secondary.is_ok(),
        };
        if let (Err(first), Err(second)) = (primary, secondary) {
            return Err(second).with_context(|| format!("and the primary backend refused it too: {first:#}"));
        }
        self.lock_modules().insert(module.id(), accepts);
        Ok(accepts)
    }

    fn lock_modules(&self) -> std::sync::MutexGuard<'_, HashMap<ModuleId, Accepts>> {
        // Every update is one insertion or removal: carry on after a panic elsewhere.
        self.modules.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether the primary's error is its being full, which the secondary may make up for: a
/// [`LimitExceeded`] of the backend's own, not one the embedder's limiter returned (that one is
/// under a [`LimiterDenied`], and final: asking the secondary would consult the limiter again).
fn full(error: &anyhow::Error) -> bool {
    !error.is::<LimiterDenied>() && error.chain().any(|e| e.is::<LimitExceeded>())
}

// SAFETY: every memory and table comes from one of two backends that keep the contract, only
// for modules that backend validated (recorded in `modules`), and goes back to the backend that
// made it with that backend's own index (recorded in the ledgers under the index handed out);
// the instance count is the fallback's own and balanced by the provided methods.
unsafe impl<P: InstanceAllocatorImpl, S: InstanceAllocatorImpl> InstanceAllocatorImpl for Fallback<P, S> {
    fn validate_module_impl(&self, module: &Module, offsets: &VMOffsets<HostPtr>) -> Result<()> {
        self.validate(module, offsets).map(|_| ())
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
        let accepts = self.accepts(request)?;
        let mut result = None;
        if accepts.primary {
            // SAFETY: the primary validated this module; the caller's contract covers the rest.
            match unsafe { self.primary.allocate_memory(request, ty, memory_index) } {
                Err(error) if accepts.secondary && full(&error) => {}
                other => result = Some(other.map(|(index, memory)| (Side::Primary, index, memory))),
            }
        }
        let (side, index, memory) = match result {
            Some(result) => result?,
            None => {
                // SAFETY: the secondary validated this module (the primary did not, or it is
                // full and the secondary accepts); the caller's contract covers the rest.
                let (index, memory) = unsafe { self.secondary.allocate_memory(request, ty, memory_index) }?;
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                (Side::Secondary, index, memory)
            }
        };
        match self.memories.insert((side, index)) {
            Ok(key) => Ok((MemoryAllocationIndex::from_u32(key), memory)),
            Err((error, _)) => {
                // SAFETY: just allocated by that side, handed to no one.
                unsafe { self.give_back_memory(side, memory_index, index, memory) };
                Err(error)
            }
        }
    }

    unsafe fn deallocate_memory(
        &self,
        index: DefinedMemoryIndex,
        slot: MemoryAllocationIndex,
        memory: Memory,
    ) {
        let (side, inner) = self.memories.remove(slot.as_u32());
        // SAFETY: the ledger says which side made this memory and under which index; the
        // caller gives it back once.
        unsafe { self.give_back_memory(side, index, inner, memory) }
    }

    unsafe fn allocate_table(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &TableType,
        table_index: DefinedTableIndex,
    ) -> Result<(TableAllocationIndex, Table)> {
        let accepts = self.accepts(request)?;
        let mut result = None;
        if accepts.primary {
            // SAFETY: the primary validated this module; the caller's contract covers the rest.
            match unsafe { self.primary.allocate_table(request, ty, table_index) } {
                Err(error) if accepts.secondary && full(&error) => {}
                other => result = Some(other.map(|(index, table)| (Side::Primary, index, table))),
            }
        }
        let (side, index, table) = match result {
            Some(result) => result?,
            None => {
                // SAFETY: the secondary validated this module (the primary did not, or it is
                // full and the secondary accepts); the caller's contract covers the rest.
                let (index, table) = unsafe { self.secondary.allocate_table(request, ty, table_index) }?;
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                (Side::Secondary, index, table)
            }
        };
        match self.tables.insert((side, index)) {
            Ok(key) => Ok((TableAllocationIndex::from_u32(key), table)),
            Err((error, _)) => {
                // SAFETY: just allocated by that side, handed to no one.
                unsafe { self.give_back_table(side, table_index, index, table) };
                Err(error)
            }
        }
    }

    unsafe fn deallocate_table(&self, index: DefinedTableIndex, slot: TableAllocationIndex, table: Table) {
        let (side, inner) = self.tables.remove(slot.as_u32());
        // SAFETY: the ledger says which side made this table and under which index.
        unsafe { self.give_back_table(side, index, inner, table) }
    }

    fn purge_module(&self, module: ModuleId) {
        self.lock_modules().remove(&module);
        self.primary.purge_module(module);
        self.secondary.purge_module(module);
    }

    fn stats(&self) -> AllocatorStats {
        let mut stats = crate::sum(&self.primary.stats(), &self.secondary.stats());
        stats.live_instances = self.instances.load(Ordering::Acquire);
        stats
    }

    fn release_idle_memory(&self) -> Released {
        let mut released = self.primary.release_idle_memory();
        released += self.secondary.release_idle_memory();
        released
    }
}

impl<P: InstanceAllocatorImpl, S: InstanceAllocatorImpl> Fallback<P, S> {
    /// # Safety
    ///
    /// `side` made `memory` for `index` and handed it out with `inner`; it is given back once.
    unsafe fn give_back_memory(
        &self,
        side: Side,
        index: DefinedMemoryIndex,
        inner: MemoryAllocationIndex,
        memory: Memory,
    ) {
        match side {
            // SAFETY: per this function's contract.
            Side::Primary => unsafe { self.primary.deallocate_memory(index, inner, memory) },
            // SAFETY: per this function's contract.
            Side::Secondary => unsafe { self.secondary.deallocate_memory(index, inner, memory) },
        }
    }

    /// # Safety
    ///
    /// `side` made `table` for `index` and handed it out with `inner`; it is given back once.
    unsafe fn give_back_table(
        &self,
        side: Side,
        index: DefinedTableIndex,
        inner: TableAllocationIndex,
        table: Table,
    ) {
        match side {
            // SAFETY: per this function's contract.
            Side::Primary => unsafe { self.primary.deallocate_table(index, inner, table) },
            // SAFETY: per this function's contract.
            Side::Secondary => unsafe { self.secondary.deallocate_table(index, inner, table) },
        }
    }
}
