//! The two allocator traits: [`InstanceAllocatorImpl`], what a backend implements, and
//! [`InstanceAllocator`], what a runtime calls.
//!
//! A backend answers for one resource at a time (one memory, one table, the instance count).
//! The order of an instantiation, the vmctx writes and the rollback on partial failure live
//! once, in `InstanceAllocator`'s provided methods, for every backend.

use std::any::Any;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use cranelift_entity::{EntityRef, PrimaryMap};

use crate::index::{
    DefinedGlobalIndex, DefinedMemoryIndex, DefinedTableIndex, FuncIndex, GlobalIndex, MemoryAllocationIndex,
    MemoryIndex, TableAllocationIndex, TableIndex,
};
use crate::instance::{InstanceBlock, InstanceHandle, MemoryMap, TableMap, free_instance};
use crate::limiter::ResourceLimiter;
use crate::memory::Memory;
use crate::module::{Module, ModuleId};
use crate::resolver::FuncResolver;
use crate::table::Table;
use crate::tunables::Tunables;
use crate::types::{GlobalInit, MemoryType, TableType};
use crate::vmcontext::{VMFunctionImport, VMGlobalDefinition, VMGlobalImport, VMMemoryImport, VMTableImport};
use crate::vmoffsets::{HostPtr, VMOffsets};

/// The imports an instance is linked with, written into its vmctx as given.
#[derive(Debug, Default, Clone, Copy)]
pub struct Imports<'a> {
    /// One per imported function, in index order.
    pub functions: &'a [VMFunctionImport],
    /// One per imported table.
    pub tables: &'a [VMTableImport],
    /// One per imported memory.
    pub memories: &'a [VMMemoryImport],
    /// One per imported global.
    pub globals: &'a [VMGlobalImport],
}

/// Everything an allocator needs to make one instance.
pub struct InstanceAllocationRequest<'a> {
    /// The module to instantiate.
    pub module: &'a Arc<Module>,
    /// Its vmctx layout, computed once when the module was loaded.
    pub offsets: &'a VMOffsets<HostPtr>,
    /// The engine's tunables, which every backend must honour.
    pub tunables: &'a Tunables,
    /// What the module imports.
    pub imports: Imports<'a>,
    /// State the embedder keeps with the instance.
    pub host_state: Box<dyn Any + Send + Sync>,
    /// The embedder's limiter, consulted for every memory and table.
    pub limiter: Option<&'a mut dyn ResourceLimiter>,
    /// Turns a function index into a table element word (for `ref.func` and element
    /// segments). Must not return 0 for a function: 0 is null.
    pub func_resolver: &'a dyn FuncResolver,
}

impl std::fmt::Debug for InstanceAllocationRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceAllocationRequest")
            .field("module", &self.module.id())
            .field("imports", &self.imports)
            .field("has_limiter", &self.limiter.is_some())
            .finish_non_exhaustive()
    }
}

/// What a backend reports about itself, for a dashboard: counts of resources now, bytes now,
/// and totals since the backend was built (`*_resets`, `decommit_*`, which only grow). Memories
/// and tables are counted apart. Fields a backend has no notion of stay 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AllocatorStats {
    /// Instances allocated and not yet deallocated.
    pub live_instances: u64,
    /// Memories allocated and not yet deallocated.
    pub live_memories: u64,
    /// Tables allocated and not yet deallocated.
    pub live_tables: u64,
    /// Bytes of address space held for memories and tables, guards included.
    pub reserved_bytes: u64,
    /// Memory slots kept warm (reset, holding what their module's next tenant reuses); for the
    /// on-demand backend, freed reservations kept (address space only).
    pub warm_memory_slots: u64,
    /// Table slots used before and free now (zeroed, possibly resident).
    pub warm_table_slots: u64,
    /// Bytes kept resident in idle memory slots.
    pub idle_memory_resident_bytes: u64,
    /// Bytes kept resident in idle table slots.
    pub idle_table_resident_bytes: u64,
    /// Memory slot resets done, in all.
    pub memory_resets: u64,
    /// Table slot resets done, in all.
    pub table_resets: u64,
    /// System calls that gave pages back to the kernel (`madvise`, or `process_madvise` for
    /// many ranges at once), in all.
    pub decommit_calls: u64,
    /// Address ranges given back by those calls, in all.
    pub decommit_ranges: u64,
}

impl AllocatorStats {
    /// Warm memory and table slots together.
    pub fn warm_slots(&self) -> u64 {
        self.warm_memory_slots + self.warm_table_slots
    }

    /// Bytes kept resident in idle memory and table slots together.
    pub fn idle_resident_bytes(&self) -> u64 {
        self.idle_memory_resident_bytes + self.idle_table_resident_bytes
    }

    /// Memory and table slot resets together.
    pub fn resets(&self) -> u64 {
        self.memory_resets + self.table_resets
    }
}

/// What a backend implements: one resource at a time. **Implement this; do not call it**:
/// runtimes call [`InstanceAllocator`], which every implementor gets for free.
///
/// # Safety
///
/// Implementors promise that every memory and table they return is usable for its type
/// (initial size accessible, zeroed or null), is used by nothing else until handed back to
/// `deallocate_*`, and honours the request's [`Tunables`]; that they accept back exactly what
/// they returned; and that `increment_core_instance_count` / `decrement_core_instance_count`
/// keep an honest count. The provided methods of [`InstanceAllocator`] rely on this to hand
/// memory to compiled code.
///
/// # Example
///
/// A backend that wraps another and counts the memories it hands out (what a backend of
/// one's own looks like; prove one with `berth_testkit::run_all`):
///
/// ```no_run
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use anyhow::Result;
/// use berth_core::*;
///
/// struct Counting<A> { inner: A, memories: AtomicU64 }
///
/// // SAFETY: every resource comes from `inner`, which keeps the contract, and goes back to it.
/// unsafe impl<A: InstanceAllocatorImpl> InstanceAllocatorImpl for Counting<A> {
///     fn validate_module_impl(&self, module: &Module, offsets: &VMOffsets<HostPtr>) -> Result<()> {
///         self.inner.validate_module_impl(module, offsets)
///     }
///     fn increment_core_instance_count(&self) -> Result<()> { self.inner.increment_core_instance_count() }
///     fn decrement_core_instance_count(&self) { self.inner.decrement_core_instance_count() }
///     unsafe fn allocate_memory(
///         &self, request: &mut InstanceAllocationRequest<'_>, ty: &MemoryType, index: DefinedMemoryIndex,
///     ) -> Result<(MemoryAllocationIndex, Memory)> {
///         self.memories.fetch_add(1, Ordering::Relaxed);
///         // SAFETY: the caller's obligations are `inner`'s.
///         unsafe { self.inner.allocate_memory(request, ty, index) }
///     }
///     unsafe fn deallocate_memory(&self, index: DefinedMemoryIndex, slot: MemoryAllocationIndex, memory: Memory) {
///         // SAFETY: `memory` came from `inner` (every memory this backend hands out does).
///         unsafe { self.inner.deallocate_memory(index, slot, memory) }
///     }
///     unsafe fn allocate_table(
///         &self, request: &mut InstanceAllocationRequest<'_>, ty: &TableType, index: DefinedTableIndex,
///     ) -> Result<(TableAllocationIndex, Table)> {
///         // SAFETY: the caller's obligations are `inner`'s.
///         unsafe { self.inner.allocate_table(request, ty, index) }
///     }
///     unsafe fn deallocate_table(&self, index: DefinedTableIndex, slot: TableAllocationIndex, table: Table) {
///         // SAFETY: `table` came from `inner`.
///         unsafe { self.inner.deallocate_table(index, slot, table) }
///     }
///     fn purge_module(&self, module: ModuleId) { self.inner.purge_module(module) }
///     fn stats(&self) -> AllocatorStats { self.inner.stats() }
///     fn release_idle_memory(&self) -> Released { self.inner.release_idle_memory() }
/// }
/// ```
pub unsafe trait InstanceAllocatorImpl: Send + Sync {
    /// Whether this backend can ever instantiate `module` (its limits, its slot sizes). Called
    /// once per module, when it is loaded.
    fn validate_module_impl(&self, module: &Module, offsets: &VMOffsets<HostPtr>) -> Result<()>;

    /// Counts one more instance, or fails with a limit error.
    fn increment_core_instance_count(&self) -> Result<()>;

    /// Counts one instance fewer.
    fn decrement_core_instance_count(&self);

    /// Allocates defined memory `memory_index` of type `ty`.
    ///
    /// # Safety
    ///
    /// The request's module was validated by this allocator's `validate_module`, and `ty` is
    /// its defined memory `memory_index`.
    unsafe fn allocate_memory(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &MemoryType,
        memory_index: DefinedMemoryIndex,
    ) -> Result<(MemoryAllocationIndex, Memory)>;

    /// Takes back a memory.
    ///
    /// # Safety
    ///
    /// `memory` and `allocation_index` were returned by this allocator's `allocate_memory` for
    /// `memory_index`, and the memory has not been deallocated since; no pointer into it is
    /// used again.
    unsafe fn deallocate_memory(
        &self,
        memory_index: DefinedMemoryIndex,
        allocation_index: MemoryAllocationIndex,
        memory: Memory,
    );

    /// Allocates defined table `table_index` of type `ty`.
    ///
    /// # Safety
    ///
    /// The request's module was validated by this allocator's `validate_module`, and `ty` is
    /// its defined table `table_index`.
    unsafe fn allocate_table(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &TableType,
        table_index: DefinedTableIndex,
    ) -> Result<(TableAllocationIndex, Table)>;

    /// Takes back a table.
    ///
    /// # Safety
    ///
    /// `table` and `allocation_index` were returned by this allocator's `allocate_table` for
    /// `table_index`, and the table has not been deallocated since; no pointer into it is used
    /// again.
    unsafe fn deallocate_table(
        &self,
        table_index: DefinedTableIndex,
        allocation_index: TableAllocationIndex,
        table: Table,
    );

    /// Forgets any state kept for `module` (warm slots, images), because the engine that
    /// calls it will not instantiate it again. A backend shared by several engines may still be
    /// asked to instantiate it for another engine, which validated it when it loaded it: the
    /// state it forgot is then state to build again, never a reason to refuse.
    fn purge_module(&self, module: ModuleId);

    /// Current statistics.
    fn stats(&self) -> AllocatorStats;

    /// Gives back, now, what this backend keeps for tenants to come: the resident pages and
    /// images of idle slots, the slots themselves (cold, set up again when next used), kept
    /// reservations, and decommits waiting for a batch, which run now. Live instances keep all
    /// they have. For a host that goes quiet; the next instances pay the set-up again. The
    /// default keeps nothing, so releases nothing.
    fn release_idle_memory(&self) -> Released {
        Released::default()
    }
}

/// What [`InstanceAllocatorImpl::release_idle_memory`] gave back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Released {
    /// Warm slots and kept reservations made cold or unmapped.
    pub slots: u64,
    /// Resident bytes given back to the kernel.
    pub resident_bytes: u64,
}

impl Released {
    /// `slots` slots and `resident_bytes` bytes released.
    pub fn new(slots: u64, resident_bytes: u64) -> Released {
        Released {
            slots,
            resident_bytes,
        }
    }
}

impl std::ops::AddAssign for Released {
    fn add_assign(&mut self, other: Released) {
        self.slots += other.slots;
        self.resident_bytes += other.resident_bytes;
    }
}

/// What a runtime calls to allocate instances. **Call this; never implement it**: it is given
/// to every [`InstanceAllocatorImpl`] (including `dyn InstanceAllocatorImpl`) by a blanket impl.
pub trait InstanceAllocator: InstanceAllocatorImpl {
    /// Validates whether a core module is allocatable with this allocator: `offsets` must be
    /// the module's, every type well-formed, and the backend must accept it.
    fn validate_module(&self, module: &Module, offsets: &VMOffsets<HostPtr>) -> Result<()> {
        let name = module.name().unwrap_or("<unnamed>");
        if offsets.fields() != module.vmctx_fields() {
            bail!("vmctx offsets given for module {name} were computed for another module");
        }
        for (index, ty) in module.defined_memories() {
            if ty.shared {
                bail!(
                    "module {name}: defined memory {} is shared, which Berth does not support yet",
                    index.as_u32()
                );
            }
        }
        self.validate_module_impl(module, offsets)
    }

    /// Allocates a fresh instance: memories in index order, then tables, then the instance
    /// block with its vmctx written (imports, memory and table definitions, globals). Any error
    /// gives back exactly what was allocated, and the instance count is as before.
    ///
    /// # Safety
    ///
    /// The request's module was validated by [`InstanceAllocator::validate_module`] of this
    /// allocator with `request.offsets`; the imports point where compiled code may use them.
    unsafe fn allocate_module(&self, mut request: InstanceAllocationRequest<'_>) -> Result<InstanceHandle> {
        let module = request.module;
        check_request(&request)?;
        self.increment_core_instance_count()?;
        let mut guard = Rollback {
            allocator: self,
            memories: PrimaryMap::new(),
            tables: PrimaryMap::new(),
        };
        // SAFETY: the caller validated the module with this allocator.
        unsafe { self.allocate_memories(&mut request, &mut guard.memories)? };
        // SAFETY: the caller validated the module, its tables included, with this allocator.
        unsafe { self.allocate_tables(&mut request, &mut guard.tables)? };
        let block = InstanceBlock::allocate(request.offsets)?;
        write_vmctx(&block, &request, &guard.memories, &guard.tables)?;
        let (memories, tables) = guard.defuse();
        Ok(block.into_handle(module.clone(), memories, tables, request.host_state))
    }

    /// Deallocates the instance: its memories, then its tables, then the count. Nulls the
    /// handle; a null handle is left alone.
    ///
    /// # Safety
    ///
    /// `handle` was returned by this allocator's [`InstanceAllocator::allocate_module`], and
    /// nothing uses its vmctx, memories or tables again.
    unsafe fn deallocate_module(&self, handle: &mut InstanceHandle) {
        let Some(ptr) = handle.take() else { return };
        // SAFETY: a non-null handle from `allocate_module` owns a live instance.
        let (mut memories, mut tables) = unsafe { (*ptr.as_ptr()).take_resources() };
        // SAFETY: allocated by this allocator in `allocate_module` (caller's contract).
        unsafe { self.deallocate_memories(&mut memories) };
        // SAFETY: allocated by this allocator's `allocate_tables` in `allocate_module` (caller's
        // contract), taken out of the instance just now, so given back once.
        unsafe { self.deallocate_tables(&mut tables) };
        /// Gives the count back last, also if dropping the instance's host state panics.
        struct Count<'a, A: InstanceAllocatorImpl + ?Sized>(&'a A);
        impl<A: InstanceAllocatorImpl + ?Sized> Drop for Count<'_, A> {
            fn drop(&mut self) {
                self.0.decrement_core_instance_count();
            }
        }
        let _count = Count(self);
        // SAFETY: the pointer came out of the handle; nothing uses it again.
        unsafe { free_instance(ptr) };
    }

    /// Allocates the request's defined memories in index order, pushing each into `memories`.
    /// On error, those already pushed stay in `memories` for the caller to deallocate.
    ///
    /// # Safety
    ///
    /// The request's module was validated by this allocator's `validate_module`.
    unsafe fn allocate_memories(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        memories: &mut PrimaryMap<DefinedMemoryIndex, (MemoryAllocationIndex, Memory)>,
    ) -> Result<()> {
        let module = request.module;
        for (index, ty) in module.defined_memories().skip(memories.len()) {
            // SAFETY: validated module (caller's contract); `ty` is its memory `index`.
            let allocated = unsafe { self.allocate_memory(request, ty, index)? };
            memories.push(allocated);
        }
        Ok(())
    }

    /// Deallocates every memory in `memories`, leaving it empty.
    ///
    /// # Safety
    ///
    /// Every entry was allocated by this allocator's `allocate_memories` (or `allocate_memory`
    /// for that index) and is not used again.
    unsafe fn deallocate_memories(
        &self,
        memories: &mut PrimaryMap<DefinedMemoryIndex, (MemoryAllocationIndex, Memory)>,
    ) {
        for (index, (allocation_index, memory)) in std::mem::take(memories) {
            // SAFETY: allocated by us for `index` (caller's contract).
            unsafe { self.deallocate_memory(index, allocation_index, memory) };
        }
    }

    /// Allocates the request's defined tables in index order, pushing each into `tables`.
    /// On error, those already pushed stay in `tables` for the caller to deallocate.
    ///
    /// # Safety
    ///
    /// The request's module was validated by this allocator's `validate_module`.
    unsafe fn allocate_tables(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        tables: &mut PrimaryMap<DefinedTableIndex, (TableAllocationIndex, Table)>,
    ) -> Result<()> {
        let module = request.module;
        for (index, ty) in module.defined_tables().skip(tables.len()) {
            // SAFETY: validated module (caller's contract); `ty` is its table `index`.
            let allocated = unsafe { self.allocate_table(request, ty, index)? };
            tables.push(allocated);
        }
        Ok(())
    }

    /// Deallocates every table in `tables`, leaving it empty.
    ///
    /// # Safety
    ///
    /// Every entry was allocated by this allocator's `allocate_tables` (or `allocate_table`
    /// for that index) and is not used again.
    unsafe fn deallocate_tables(
        &self,
        tables: &mut PrimaryMap<DefinedTableIndex, (TableAllocationIndex, Table)>,
    ) {
        for (index, (allocation_index, table)) in std::mem::take(tables) {
            // SAFETY: allocated by us for `index` (caller's contract).
            unsafe { self.deallocate_table(index, allocation_index, table) };
        }
    }
}

impl<T: InstanceAllocatorImpl + ?Sized> InstanceAllocator for T {}

/// Gives back what a failed `allocate_module` had allocated: memories, then tables, then the
/// instance count (armed right after the count was incremented).
struct Rollback<'a, A: InstanceAllocator + ?Sized> {
    allocator: &'a A,
    memories: MemoryMap,
    tables: TableMap,
}

impl<A: InstanceAllocator + ?Sized> Rollback<'_, A> {
    fn defuse(self) -> (MemoryMap, TableMap) {
        let mut this = std::mem::ManuallyDrop::new(self);
        (
            std::mem::take(&mut this.memories),
            std::mem::take(&mut this.tables),
        )
    }
}

impl<A: InstanceAllocator + ?Sized> Drop for Rollback<'_, A> {
    fn drop(&mut self) {
        // SAFETY: everything here was allocated by `allocator` during this `allocate_module`
        // and never reached the caller.
        unsafe {
            self.allocator.deallocate_memories(&mut self.memories);
            self.allocator.deallocate_tables(&mut self.tables);
        }
        self.allocator.decrement_core_instance_count();
    }
}

/// Checks the request against its module before anything is allocated.
fn check_request(request: &InstanceAllocationRequest<'_>) -> Result<()> {
    let module = request.module;
    let name = module.name().unwrap_or("<unnamed>");
    if request.offsets.fields() != module.vmctx_fields() {
        bail!("vmctx offsets in the request for module {name} were computed for another module");
    }
    let imports = &request.imports;
    for ((one, many), given, expected) in [
        (
            ("function", "functions"),
            imports.functions.len(),
            module.num_imported_funcs(),
        ),
        (
            ("table", "tables"),
            imports.tables.len(),
            module.num_imported_tables(),
        ),
        (
            ("memory", "memories"),
            imports.memories.len(),
            module.num_imported_memories(),
        ),
        (
            ("global", "globals"),
            imports.globals.len(),
            module.num_imported_globals(),
        ),
    ] {
        if given != expected as usize {
            let what = if expected == 1 { one } else { many };
            let were = if given == 1 { "was" } else { "were" };
            bail!("module {name} imports {expected} {what} but {given} {were} given");
        }
    }
    Ok(())
}

/// Writes a fresh vmctx: imports, defined tables, memory pointers and definitions, globals.
fn write_vmctx(
    block: &InstanceBlock,
    request: &InstanceAllocationRequest<'_>,
    memories: &MemoryMap,
    tables: &TableMap,
) -> Result<()> {
    let offsets = request.offsets;
    let module = request.module;
    /// Writes `value` at vmctx `offset`.
    fn put<T>(block: &InstanceBlock, offset: u32, value: T) {
        let field = block.vmctx_field::<T>(offset);
        // SAFETY: `vmctx_field` checked that the field lies inside the block's vmctx and is
        // aligned for `T`; the block is not shared yet.
        unsafe { field.as_ptr().write(value) }
    }
    let imports = &request.imports;
    for (i, import) in imports.functions.iter().enumerate() {
        put(block, offsets.vmctx_vmfunction_import(FuncIndex::new(i)), *import);
    }
    for (i, import) in imports.tables.iter().enumerate() {
        put(block, offsets.vmctx_vmtable_import(TableIndex::new(i)), *import);
    }
    for (i, import) in imports.memories.iter().enumerate() {
        put(block, offsets.vmctx_vmmemory_import(MemoryIndex::new(i)), *import);
    }
    for (i, import) in imports.globals.iter().enumerate() {
        put(block, offsets.vmctx_vmglobal_import(GlobalIndex::new(i)), *import);
    }
    // The definitions go where `InstanceBlock::new`'s location lists say.
    for (index, (_, table)) in tables.iter() {
        let location = block.table_definition_location(index);
        // SAFETY: the location lies inside the block's vmctx, aligned (`vmctx_field`'s checks);
        // the block is not shared yet.
        unsafe { location.as_ptr().write(table.vmtable()) };
    }
    for (index, (_, memory)) in memories.iter() {
        if let Some(owned) = module.owned_memory_index(index) {
            let location = block.memory_definition_location(owned);
            // SAFETY: `memory_definition_location` checked the location lies inside the block's
            // vmctx and is aligned for a `VMMemoryDefinition`; the block is not shared yet.
            unsafe { location.as_ptr().write(memory.vmmemory()) };
            put(block, offsets.vmctx_vmmemory_pointer(index), location.as_ptr());
        }
    }
    for (index, ty, init) in module.defined_globals() {
        let bits: u128 = match *init {
            GlobalInit::GetGlobal(g) => match g.as_u32().checked_sub(module.num_imported_globals()) {
                // A defined global before this one (the module checks the order): written
                // above, in index order.
                Some(defined) => {
                    let field = block.vmctx_field::<VMGlobalDefinition>(
                        offsets.vmctx_vmglobal_definition(DefinedGlobalIndex::from_u32(defined)),
                    );
                    // SAFETY: `vmctx_field` checked that the field lies inside the vmctx and is
                    // aligned; it was written earlier in this loop, and the block is not shared.
                    u128::from_le_bytes(unsafe { field.as_ptr().read() }.storage)
                }
                None => {
                    let import = imports.globals.get(g.as_u32() as usize).copied();
                    let from = import.map(|i| i.from).filter(|p| !p.is_null());
                    let from =
                        from.ok_or_else(|| anyhow!("imported global {} is missing or null", g.as_u32()))?;
                    // SAFETY: `allocate_module`'s caller promises the imports point at live
                    // definitions; this one is non-null (checked).
                    u128::from_le_bytes(unsafe { from.read() }.storage)
                }
            },
            GlobalInit::I32(v) => u128::from(u32::from_ne_bytes(v.to_ne_bytes())),
            GlobalInit::I64(v) => u128::from(u64::from_ne_bytes(v.to_ne_bytes())),
            GlobalInit::F32(v) => u128::from(v),
            GlobalInit::F64(v) => u128::from(v),
            GlobalInit::V128(v) => v,
            GlobalInit::RefNull => 0,
            GlobalInit::RefFunc(f) => request.func_resolver.resolve(f) as u128,
        };
        // A copied global brings its value, not what an embedder left in the bytes past it.
        let bits = bits & (u128::MAX >> (128 - 8 * ty.content.bytes()));
        let global = VMGlobalDefinition {
            storage: bits.to_le_bytes(),
        };
        put(block, offsets.vmctx_vmglobal_definition(index), global);
    }
    Ok(())
}
