//! The instance block: an [`Instance`] followed by its vmctx, in one allocation.
//!
//! ```text
//!   ┌──────────────────────────────┬───────────────────────────────────────┐
//!   │ Instance (Rust fields)       │ vmctx: VMOffsets::size_of_vmctx bytes │
//!   └──────────────────────────────┴───────────────────────────────────────┘
//!   ^ InstanceBlock::ptr           ^ Instance::vmctx (16-aligned)
//! ```
//!
//! The `Instance` is dynamically sized in effect: its last field is the zero-sized
//! [`VMContext`] and the vmctx bytes extend past the nominal end of the type. So the block is
//! made in two steps: [`InstanceBlock::allocate`] computes the layout from the offsets and
//! allocates it zeroed ([`InstanceBlock::new`] also hands out where the memory and table
//! definitions go); the caller writes the vmctx through [`InstanceBlock::vmctx_field`], then
//! `InstanceBlock::into_handle` (crate-private) moves the `Instance` in. A block dropped before that frees
//! its buffer.

use std::alloc::{self, Layout};
use std::any::Any;
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::Arc;

use anyhow::{Result, anyhow};
use cranelift_entity::PrimaryMap;

use crate::index::{
    DefinedGlobalIndex, DefinedMemoryIndex, DefinedTableIndex, MemoryAllocationIndex, OwnedMemoryIndex,
    TableAllocationIndex,
};
use crate::limiter::ResourceLimiter;
use crate::memory::Memory;
use crate::module::Module;
use crate::table::Table;
use crate::vmcontext::{VMContext, VMGlobalDefinition, VMMemoryDefinition, VMTableDefinition};
use crate::vmoffsets::{HostPtr, VMCTX_ALIGN, VMOffsets};

/// An instance's defined memories, as the allocator traits hand them around.
pub(crate) type MemoryMap = PrimaryMap<DefinedMemoryIndex, (MemoryAllocationIndex, Memory)>;
/// An instance's defined tables, as the allocator traits hand them around.
pub(crate) type TableMap = PrimaryMap<DefinedTableIndex, (TableAllocationIndex, Table)>;

/// An instance's Rust-side state; its vmctx follows it in the same allocation.
///
/// Invariants: `vmctx` points `offsets.size_of_vmctx()` bytes, owned by this instance, right
/// after the struct; every memory and table definition in the vmctx equals the
/// `vmmemory()` / `vmtable()` of the resource here.
#[repr(C)]
#[derive(Debug)]
pub struct Instance {
    module: Arc<Module>,
    offsets: VMOffsets<HostPtr>,
    layout: Layout,
    pub(crate) memories: PrimaryMap<DefinedMemoryIndex, (MemoryAllocationIndex, Memory)>,
    pub(crate) tables: PrimaryMap<DefinedTableIndex, (TableAllocationIndex, Table)>,
    host_state: Box<dyn Any + Send + Sync>,
    /// The vmctx, with the provenance of the whole block (not of a reference to `self`).
    vmctx_ptr: NonNull<VMContext>,
    vmctx: VMContext,
}

/// Asserts that a `T` at vmctx `offset` lies inside a vmctx of `offsets` and is aligned.
fn check_field<T>(offsets: &VMOffsets<HostPtr>, offset: u32) {
    let end = offset as usize + size_of::<T>();
    assert!(
        end <= offsets.size_of_vmctx() as usize,
        "vmctx field at {offset} out of range"
    );
    assert!(
        (offset as usize).is_multiple_of(align_of::<T>()),
        "vmctx field at {offset} misaligned"
    );
}

// SAFETY: every field is `Send`/`Sync` except `vmctx_ptr`, which points into this
// instance's own block and is only written through `&mut self`.
unsafe impl Send for Instance {}
// SAFETY: `vmctx_ptr` is written only through `&mut self`; `&Instance` only reads the vmctx,
// and every other field is `Sync`.
unsafe impl Sync for Instance {}

impl Instance {
    /// The module this is an instance of.
    pub fn module(&self) -> &Arc<Module> {
        &self.module
    }

    /// The vmctx layout.
    pub fn offsets(&self) -> &VMOffsets<HostPtr> {
        &self.offsets
    }

    /// The block's layout (the `Instance` plus its vmctx).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The vmctx pointer compiled code receives.
    pub fn vmctx(&self) -> *mut VMContext {
        self.vmctx_ptr.as_ptr()
    }

    /// The embedder's state given at instantiation.
    pub fn host_state(&self) -> &(dyn Any + Send + Sync) {
        &*self.host_state
    }

    /// The defined memories with what their backend returned for them.
    pub fn memories(&self) -> &PrimaryMap<DefinedMemoryIndex, (MemoryAllocationIndex, Memory)> {
        &self.memories
    }

    /// The defined tables with what their backend returned for them.
    pub fn tables(&self) -> &PrimaryMap<DefinedTableIndex, (TableAllocationIndex, Table)> {
        &self.tables
    }

    /// Defined memory `index`, if it exists.
    pub fn memory(&self, index: DefinedMemoryIndex) -> Option<&Memory> {
        self.memories.get(index).map(|(_, m)| m)
    }

    /// Defined table `index`, if it exists.
    pub fn table(&self, index: DefinedTableIndex) -> Option<&Table> {
        self.tables.get(index).map(|(_, t)| t)
    }

    /// The instance behind the pin, for the methods below, none of which moves it or any of
    /// its fields out.
    fn unpinned(self: Pin<&mut Self>) -> &mut Self {
        // SAFETY: the callers only mutate fields in place; the instance itself never moves
        // (its block is freed only by `free_instance`).
        unsafe { self.get_unchecked_mut() }
    }

    // The module's name is read only for the error, so that the lookup behind every growth
    // and write allocates nothing.
    fn memory_mut(&mut self, index: DefinedMemoryIndex) -> Result<&mut Memory> {
        let module = &self.module;
        self.memories.get_mut(index).map(|(_, m)| m).ok_or_else(|| {
            let name = module.name().unwrap_or("<unnamed>");
            anyhow!("module {name} has no defined memory {}", index.as_u32())
        })
    }

    fn table_mut(&mut self, index: DefinedTableIndex) -> Result<&mut Table> {
        let module = &self.module;
        self.tables.get_mut(index).map(|(_, t)| t).ok_or_else(|| {
            let name = module.name().unwrap_or("<unnamed>");
            anyhow!("module {name} has no defined table {}", index.as_u32())
        })
    }

    /// Reads `buf.len()` bytes of memory `index` at `offset`.
    pub fn memory_read(&self, index: DefinedMemoryIndex, offset: u64, buf: &mut [u8]) -> Result<()> {
        let memory = self
            .memory(index)
            .ok_or_else(|| anyhow!("no defined memory {}", index.as_u32()))?;
        memory.read(offset, buf)
    }

    /// Writes `data` to memory `index` at `offset`.
    pub fn memory_write(
        self: Pin<&mut Self>,
        index: DefinedMemoryIndex,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        self.unpinned().memory_mut(index)?.write(offset, data)
    }

    /// `memory.grow`: grows memory `index` by `delta` pages and keeps the vmctx definition
    /// exact (a moved memory gets its new base). See [`Memory::grow`].
    pub fn memory_grow(
        self: Pin<&mut Self>,
        index: DefinedMemoryIndex,
        delta: u64,
        limiter: Option<&mut (dyn ResourceLimiter + '_)>,
    ) -> Result<Option<u64>> {
        let this = self.unpinned();
        let result = this.memory_mut(index)?.grow(delta, limiter)?;
        if result.is_some() {
            this.sync_memory_definition(index);
        }
        Ok(result)
    }

    /// `table.grow`: grows table `index` by `delta` elements set to `init`, keeping the
    /// vmctx definition exact. See [`Table::grow`].
    pub fn table_grow(
        self: Pin<&mut Self>,
        index: DefinedTableIndex,
        delta: u64,
        init: usize,
        limiter: Option<&mut (dyn ResourceLimiter + '_)>,
    ) -> Result<Option<u64>> {
        let this = self.unpinned();
        let result = this.table_mut(index)?.grow(delta, init, limiter)?;
        if result.is_some() {
            this.sync_table_definition(index);
        }
        Ok(result)
    }

    /// Element `elem` of table `index`, or `None` if either is out of range.
    pub fn table_get(&self, index: DefinedTableIndex, elem: u64) -> Option<usize> {
        self.table(index)?.get(elem)
    }

    /// Sets element `elem` of table `index`.
    pub fn table_set(self: Pin<&mut Self>, index: DefinedTableIndex, elem: u64, value: usize) -> Result<()> {
        self.unpinned().table_mut(index)?.set(elem, value)
    }

    /// Sets `len` elements of table `index` from `elem` to `value`.
    pub fn table_fill(
        self: Pin<&mut Self>,
        index: DefinedTableIndex,
        elem: u64,
        value: usize,
        len: u64,
    ) -> Result<()> {
        self.unpinned().table_mut(index)?.fill(elem, value, len)
    }

    /// The value of defined global `index`.
    pub fn global(&self, index: DefinedGlobalIndex) -> Option<VMGlobalDefinition> {
        if index.as_u32() >= self.offsets.fields().num_defined_globals {
            return None;
        }
        let offset = self.offsets.vmctx_vmglobal_definition(index);
        // SAFETY: the offset is inside the vmctx (checked index) and 16-aligned; the block
        // was zeroed and then initialized, so the bytes are a valid `VMGlobalDefinition`.
        Some(unsafe { self.vmctx_field::<VMGlobalDefinition>(offset).read() })
    }

    /// The vmctx's `VMMemoryDefinition` of defined memory `index`, as compiled code sees it.
    pub fn vmmemory_definition(&self, index: DefinedMemoryIndex) -> Option<VMMemoryDefinition> {
        let owned = self.module.owned_memory_index(index)?;
        let offset = self.offsets.vmctx_vmmemory_definition(owned);
        // SAFETY: an owned memory's definition lies inside the vmctx, aligned, initialized.
        Some(unsafe { self.vmctx_field::<VMMemoryDefinition>(offset).read() })
    }

    /// The vmctx's `VMTableDefinition` of defined table `index`, as compiled code sees it.
    pub fn vmtable_definition(&self, index: DefinedTableIndex) -> Option<VMTableDefinition> {
        self.tables.get(index)?;
        let offset = self.offsets.vmctx_vmtable_definition(index);
        // SAFETY: a defined table's definition lies inside the vmctx, aligned, initialized.
        Some(unsafe { self.vmctx_field::<VMTableDefinition>(offset).read() })
    }

    /// Reads the `T` at vmctx `offset`.
    ///
    /// # Panics
    ///
    /// If the field is not inside the vmctx or misaligned: a caller bug.
    pub(crate) fn read_vmctx<T: Copy>(&self, offset: u32) -> T {
        check_field::<T>(&self.offsets, offset);
        // SAFETY: inside the vmctx and aligned (checked); the block was zeroed and then
        // written with values of the field's type.
        unsafe { self.vmctx_field::<T>(offset).read() }
    }

    /// A pointer to the vmctx field at `offset`.
    ///
    /// # Safety
    ///
    /// `offset + size_of::<T>()` is within the vmctx and `offset` is aligned for `T`.
    unsafe fn vmctx_field<T>(&self, offset: u32) -> *mut T {
        // SAFETY: in bounds per the caller; `vmctx_ptr` has the provenance of the block.
        unsafe {
            self.vmctx_ptr
                .as_ptr()
                .cast::<u8>()
                .add(offset as usize)
                .cast::<T>()
        }
    }

    fn sync_memory_definition(&mut self, index: DefinedMemoryIndex) {
        let Some(owned) = self.module.owned_memory_index(index) else {
            return;
        };
        let definition = self.memories[index].1.vmmemory();
        let offset = self.offsets.vmctx_vmmemory_definition(owned);
        // SAFETY: the owned definition lies inside our vmctx, aligned; `&mut self` means no
        // one else reads it from Rust meanwhile.
        unsafe { self.vmctx_field::<VMMemoryDefinition>(offset).write(definition) }
    }

    fn sync_table_definition(&mut self, index: DefinedTableIndex) {
        let definition = self.tables[index].1.vmtable();
        let offset = self.offsets.vmctx_vmtable_definition(index);
        // SAFETY: the definition lies inside our vmctx, aligned; `&mut self` is exclusive.
        unsafe { self.vmctx_field::<VMTableDefinition>(offset).write(definition) }
    }

    /// Takes the memories and tables out, for deallocation.
    pub(crate) fn take_resources(&mut self) -> (MemoryMap, TableMap) {
        (
            std::mem::take(&mut self.memories),
            std::mem::take(&mut self.tables),
        )
    }
}

/// The allocation of one instance block before the [`Instance`] is moved in: frees the buffer
/// if dropped before `InstanceBlock::into_handle` (crate-private).
///
/// Invariant: `ptr` was allocated zeroed with `layout`, which holds an `Instance` plus
/// `offsets.size_of_vmctx()` bytes of vmctx; `consumed` is true once ownership moved to a
/// handle.
#[derive(Debug)]
pub struct InstanceBlock {
    ptr: NonNull<Instance>,
    layout: Layout,
    offsets: VMOffsets<HostPtr>,
    consumed: bool,
}

impl InstanceBlock {
    /// The layout of an `Instance` whose vmctx has `offsets`' size.
    pub fn layout(offsets: &VMOffsets<HostPtr>) -> Result<Layout> {
        let vmctx = Layout::from_size_align(offsets.size_of_vmctx() as usize, VMCTX_ALIGN as usize)?;
        let (layout, vmctx_offset) = Layout::new::<Instance>().extend(vmctx)?;
        debug_assert_eq!(vmctx_offset, std::mem::offset_of!(Instance, vmctx));
        Ok(layout.pad_to_align())
    }

    /// Allocates a zeroed block for `offsets` and returns it with where the owned memory
    /// definitions and the table definitions go (in owned-memory and defined-table order).
    #[allow(clippy::type_complexity)]
    pub fn new(
        offsets: &VMOffsets<HostPtr>,
    ) -> Result<(
        Self,
        Vec<NonNull<VMMemoryDefinition>>,
        Vec<NonNull<VMTableDefinition>>,
    )> {
        let block = Self::allocate(offsets)?;
        let memories = block.memory_definition_locations();
        let tables = block.table_definition_locations();
        Ok((block, memories, tables))
    }

    /// Allocates a zeroed block for `offsets` (what [`InstanceBlock::new`] does, without the
    /// lists of definition locations: find them with [`InstanceBlock::vmctx_field`]).
    pub fn allocate(offsets: &VMOffsets<HostPtr>) -> Result<Self> {
        let layout = Self::layout(offsets)?;
        // SAFETY: the layout's size is non-zero (it contains `Instance`, which is not a ZST).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw.cast::<Instance>())
            .ok_or_else(|| anyhow!("failed to allocate an instance block of {} bytes", layout.size()))?;
        Ok(InstanceBlock {
            ptr,
            layout,
            offsets: *offsets,
            consumed: false,
        })
    }

    /// The vmctx of this block, for writing its fields before the instance is moved in.
    pub fn vmctx(&self) -> NonNull<VMContext> {
        // SAFETY: the vmctx starts `offset_of!(Instance, vmctx)` bytes into the block, which
        // `layout` covers.
        unsafe {
            self.ptr
                .cast::<u8>()
                .add(std::mem::offset_of!(Instance, vmctx))
                .cast()
        }
    }

    /// A pointer to a `T` at vmctx `offset`, checked to lie inside the vmctx and be aligned.
    ///
    /// # Panics
    ///
    /// If the field is not inside the vmctx or misaligned: a caller bug (offsets come from
    /// `VMOffsets`).
    pub fn vmctx_field<T>(&self, offset: u32) -> NonNull<T> {
        check_field::<T>(&self.offsets, offset);
        // SAFETY: the field is within the vmctx (checked), which is inside the block.
        unsafe { self.vmctx().cast::<u8>().add(offset as usize).cast() }
    }

    /// Where owned memory `index`'s `VMMemoryDefinition` goes: where instantiation writes it.
    ///
    /// # Panics
    ///
    /// If the module has no owned memory `index`.
    pub fn memory_definition_location(&self, index: OwnedMemoryIndex) -> NonNull<VMMemoryDefinition> {
        assert!(index.as_u32() < self.offsets.fields().num_owned_memories);
        self.vmctx_field(self.offsets.vmctx_vmmemory_definition(index))
    }

    /// Where defined table `index`'s `VMTableDefinition` goes: where instantiation writes it.
    ///
    /// # Panics
    ///
    /// If the module has no defined table `index`.
    pub fn table_definition_location(&self, index: DefinedTableIndex) -> NonNull<VMTableDefinition> {
        assert!(index.as_u32() < self.offsets.fields().num_defined_tables);
        self.vmctx_field(self.offsets.vmctx_vmtable_definition(index))
    }

    /// Where each owned memory's `VMMemoryDefinition` goes.
    pub fn memory_definition_locations(&self) -> Vec<NonNull<VMMemoryDefinition>> {
        (0..self.offsets.fields().num_owned_memories)
            .map(|i| self.memory_definition_location(OwnedMemoryIndex::from_u32(i)))
            .collect()
    }

    /// Where each defined table's `VMTableDefinition` goes.
    pub fn table_definition_locations(&self) -> Vec<NonNull<VMTableDefinition>> {
        (0..self.offsets.fields().num_defined_tables)
            .map(|i| self.table_definition_location(DefinedTableIndex::from_u32(i)))
            .collect()
    }

    /// Moves the instance's fields in and hands ownership of the block to a handle.
    pub(crate) fn into_handle(
        mut self,
        module: Arc<Module>,
        memories: PrimaryMap<DefinedMemoryIndex, (MemoryAllocationIndex, Memory)>,
        tables: PrimaryMap<DefinedTableIndex, (TableAllocationIndex, Table)>,
        host_state: Box<dyn Any + Send + Sync>,
    ) -> InstanceHandle {
        let instance = Instance {
            module,
            offsets: self.offsets,
            layout: self.layout,
            memories,
            tables,
            host_state,
            vmctx_ptr: self.vmctx(),
            vmctx: VMContext {
                _pinned: std::marker::PhantomPinned,
            },
        };
        // SAFETY: `ptr` is a live allocation of `layout`, which starts with room for an
        // `Instance` at its alignment; nothing was written there yet (only vmctx bytes).
        unsafe { self.ptr.as_ptr().write(instance) };
        self.consumed = true;
        InstanceHandle {
            instance: Some(self.ptr),
        }
    }
}

impl Drop for InstanceBlock {
    fn drop(&mut self) {
        if !self.consumed {
            // SAFETY: allocated in `new` with this layout and never handed to anyone.
            unsafe { alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) };
        }
    }
}

/// An allocated instance. Give it back to the allocator's `deallocate_module`, which frees
/// it and nulls the handle; dropping a non-null handle leaks the instance and its resources.
#[derive(Debug)]
pub struct InstanceHandle {
    instance: Option<NonNull<Instance>>,
}

// SAFETY: the handle owns its instance, which is `Send`.
unsafe impl Send for InstanceHandle {}
// SAFETY: `&InstanceHandle` only gives `&Instance`, which is `Sync`.
unsafe impl Sync for InstanceHandle {}

impl InstanceHandle {
    /// A handle to no instance.
    pub fn null() -> InstanceHandle {
        InstanceHandle { instance: None }
    }

    /// Whether the handle was deallocated (or never held an instance).
    pub fn is_null(&self) -> bool {
        self.instance.is_none()
    }

    /// The instance.
    ///
    /// # Panics
    ///
    /// If the handle is null (already deallocated): a caller bug.
    pub fn instance(&self) -> &Instance {
        let ptr = self.instance.expect("instance handle used after deallocation");
        // SAFETY: a non-null handle owns a live, initialized instance block.
        unsafe { ptr.as_ref() }
    }

    /// The instance, mutably. It is pinned: an instance lives in its block, with its vmctx
    /// right after it, and must never be moved or swapped with another.
    ///
    /// # Panics
    ///
    /// If the handle is null (already deallocated): a caller bug.
    pub fn instance_mut(&mut self) -> Pin<&mut Instance> {
        let mut ptr = self.instance.expect("instance handle used after deallocation");
        // SAFETY: a non-null handle owns a live, initialized instance block; `&mut self`
        // makes the borrow exclusive; the block never moves until it is freed.
        unsafe { Pin::new_unchecked(ptr.as_mut()) }
    }

    /// Takes the block out, leaving the handle null.
    pub(crate) fn take(&mut self) -> Option<NonNull<Instance>> {
        self.instance.take()
    }
}

/// Drops the instance in `ptr` and frees its block; the block is freed even if dropping
/// the instance (the embedder's host state) panics.
///
/// # Safety
///
/// `ptr` came from `InstanceBlock::into_handle` (crate-private) and was taken out of its handle; nothing
/// uses it afterwards.
pub(crate) unsafe fn free_instance(ptr: NonNull<Instance>) {
    /// Frees the block when dropped, also while unwinding.
    struct FreeBlock(NonNull<Instance>, Layout);
    impl Drop for FreeBlock {
        fn drop(&mut self) {
            // SAFETY: allocated with this layout in `InstanceBlock::new`; the instance in it
            // has been dropped (or its drop is unwinding) and is not used again.
            unsafe { alloc::dealloc(self.0.as_ptr().cast(), self.1) };
        }
    }
    // SAFETY: the block holds an initialized instance (caller's contract).
    let layout = unsafe { ptr.as_ref().layout };
    let _free = FreeBlock(ptr, layout);
    // SAFETY: the block holds an initialized instance (caller's contract), dropped once here;
    // `_free` frees the block afterwards and nothing uses the instance again.
    unsafe { std::ptr::drop_in_place(ptr.as_ptr()) };
}
