//! The safe instance handle embedders use.

use std::any::Any;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use berth_core::cranelift_entity::packed_option::PackedOption;
use berth_core::{
    DefinedMemoryIndex, DefinedTableIndex, FuncIndex, FuncResolver, Imports, InstanceAllocationRequest,
    InstanceAllocator, InstanceHandle, MemoryIndex, Module, ResourceLimiter, TableIndex, VMContext,
    VMFunctionImport, VMGlobalDefinition, VMGlobalImport, VMMemoryImport, VMTableImport,
};

use crate::engine::{Engine, Lane, LoadedModule};

/// Imports an instance is linked with, owned. Each list must have exactly as many entries as
/// the module imports of that kind, or instantiation fails with an error naming the kind.
#[derive(Debug, Default, Clone)]
pub struct OwnedImports {
    /// Imported functions, in index order.
    pub functions: Vec<VMFunctionImport>,
    /// Imported tables.
    pub tables: Vec<VMTableImport>,
    /// Imported memories.
    pub memories: Vec<VMMemoryImport>,
    /// Imported globals.
    pub globals: Vec<VMGlobalImport>,
}

type Resolver = Box<dyn FuncResolver + Send>;

/// The resolver without `func_resolver`: a function's word is its index plus one.
struct IndexPlusOne;

impl FuncResolver for IndexPlusOne {
    fn resolve(&self, func: FuncIndex) -> usize {
        func.as_u32() as usize + 1
    }

    /// With 32-byte AVX2 stores where the processor has them (the baseline's are 16 bytes):
    /// a large segment's words are written at the speed of a `memset`.
    fn resolve_funcs(&self, funcs: &[PackedOption<FuncIndex>], out: &mut [usize]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor has AVX2 (detected just above), the one feature
            // `index_plus_one_avx2` is compiled for beyond the baseline.
            return unsafe { index_plus_one_avx2(funcs, out) };
        }
        index_plus_one(funcs, out);
    }
}

/// [`index_plus_one`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn index_plus_one_avx2(funcs: &[PackedOption<FuncIndex>], out: &mut [usize]) {
    index_plus_one(funcs, out);
}

/// Each function's index plus one, inlined into each caller so that it is compiled for the
/// caller's features.
#[inline(always)]
fn index_plus_one(funcs: &[PackedOption<FuncIndex>], out: &mut [usize]) {
    for (func, word) in funcs.iter().zip(out) {
        // Null is the reserved index, `u32::MAX`, which plus one wraps to 0: an add and a
        // widening per element, which the loop vectorizes.
        let raw = func.expand().map_or(u32::MAX, |f| f.as_u32());
        *word = raw.wrapping_add(1) as usize;
    }
}

/// Options for one instantiation; see [`Instance::builder`].
pub struct InstanceBuilder<'m> {
    module: &'m LoadedModule,
    imports: OwnedImports,
    host_state: Box<dyn Any + Send + Sync>,
    limiter: Option<Box<dyn ResourceLimiter>>,
    resolver: Resolver,
}

impl std::fmt::Debug for InstanceBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceBuilder")
            .field("module", &self.module.module().id())
            .field("imports", &self.imports)
            .field("has_limiter", &self.limiter.is_some())
            .finish_non_exhaustive()
    }
}

impl<'m> InstanceBuilder<'m> {
    /// The imports to link with (none by default).
    ///
    /// # Safety
    ///
    /// Every pointer in `imports` points at a live definition of the right type that outlives
    /// the instance: instantiation reads imported globals (for `global.get` initializers and
    /// segment offsets) and writes imported tables and memories (active segments) through them,
    /// and compiled code given the vmctx will use them too.
    pub unsafe fn imports(mut self, imports: OwnedImports) -> Self {
        self.imports = imports;
        self
    }

    /// State kept with the instance, readable with [`Instance::host_state`].
    pub fn host_state(mut self, state: impl Any + Send + Sync) -> Self {
        self.host_state = Box::new(state);
        self
    }

    /// A limiter consulted when memories and tables are created and whenever they grow.
    pub fn limiter(mut self, limiter: impl ResourceLimiter + 'static) -> Self {
        self.limiter = Some(Box::new(limiter));
        self
    }

    /// How a function index becomes a table element word (`ref.func`). Without one, a
    /// function's word is its index plus one, so it is never null.
    pub fn func_resolver(mut self, resolver: impl Fn(FuncIndex) -> usize + Send + Sync + 'static) -> Self {
        self.resolver = Box::new(resolver);
        self
    }

    /// Allocates the instance.
    pub fn instantiate(self) -> Result<Instance> {
        let lane = self.module.lane();
        let inner = &self.module.inner;
        let engine = &inner.engine;
        let mut limiter = self.limiter;
        let resolver = self.resolver;
        let request = InstanceAllocationRequest {
            module: &lane.module,
            offsets: &inner.offsets,
            tunables: engine.tunables(),
            imports: Imports {
                functions: &self.imports.functions,
                tables: &self.imports.tables,
                memories: &self.imports.memories,
                globals: &self.imports.globals,
            },
            host_state: self.host_state,
            limiter: limiter.as_deref_mut().map(|l| l as &mut dyn ResourceLimiter),
            func_resolver: &*resolver,
        };
        let name = inner.module.name().unwrap_or("<unnamed>");
        // SAFETY: the module was validated by this engine's allocator in `Engine::load`, with
        // these offsets; the imports are live (the contract of `InstanceBuilder::imports`, or
        // none at all).
        let handle = unsafe { engine.allocator().allocate_module(request) }
            .with_context(|| format!("failed to instantiate module {name}"))?;
        // From here on the instance gives its resources back when dropped, also if
        // initialization fails.
        let mut instance = Instance {
            handle,
            lane,
            limiter,
        };
        // SAFETY: the imports are live (the contract of `InstanceBuilder::imports`, or there are
        // none), and the instance was allocated for this module's offsets just above.
        unsafe { berth_core::initialize(instance.handle.instance_mut(), &*resolver) }
            .with_context(|| format!("failed to initialize module {name}"))?;
        Ok(instance)
    }
}

/// An instance, owned by the embedder. Dropping it gives its memories, tables and vmctx back
/// to the engine's allocator.
pub struct Instance {
    handle: InstanceHandle,
    /// Keeps the loaded module, and so the engine and its allocator, alive.
    lane: Arc<Lane>,
    limiter: Option<Box<dyn ResourceLimiter>>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("module", &self.module().id())
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Instantiates `module` with no imports, no limiter and the default function resolver.
    pub fn new(module: &LoadedModule) -> Result<Instance> {
        Self::builder(module).instantiate()
    }

    /// Starts an instantiation with options.
    pub fn builder(module: &LoadedModule) -> InstanceBuilder<'_> {
        InstanceBuilder {
            module,
            imports: OwnedImports::default(),
            host_state: Box::new(()),
            limiter: None,
            resolver: Box::new(IndexPlusOne),
        }
    }

    /// The facts of the module this is an instance of.
    pub fn module(&self) -> &Arc<Module> {
        &self.lane.module
    }

    /// The engine this instance was made by.
    pub fn engine(&self) -> &Engine {
        &self.lane.inner.engine
    }

    /// The core instance (read-only): memories, tables, vmctx definitions, offsets.
    pub fn core(&self) -> &berth_core::Instance {
        self.handle.instance()
    }

    /// The vmctx pointer compiled code receives.
    pub fn vmctx(&self) -> *mut VMContext {
        self.core().vmctx()
    }

    /// The state given with [`InstanceBuilder::host_state`] (`()` by default).
    pub fn host_state(&self) -> &(dyn Any + Send + Sync) {
        self.core().host_state()
    }

    fn defined_memory(&self, memory: u32) -> Result<DefinedMemoryIndex> {
        let module = self.module();
        if memory as usize >= module.memories().len() {
            return Err(anyhow!("module has no memory {memory}"));
        }
        let index = MemoryIndex::from_u32(memory);
        module
            .defined_memory_index(index)
            .ok_or_else(|| anyhow!("memory {memory} is imported, not owned by this instance"))
    }

    fn defined_table(&self, table: u32) -> Result<DefinedTableIndex> {
        let module = self.module();
        if table as usize >= module.tables().len() {
            return Err(anyhow!("module has no table {table}"));
        }
        let index = TableIndex::from_u32(table);
        module
            .defined_table_index(index)
            .ok_or_else(|| anyhow!("table {table} is imported, not owned by this instance"))
    }

    /// The size in bytes of memory `memory` (module index space).
    pub fn memory_size(&self, memory: u32) -> Result<usize> {
        let index = self.defined_memory(memory)?;
        Ok(self.core().memory(index).map_or(0, |m| m.byte_size()))
    }

    /// Reads `buf.len()` bytes of memory `memory` at `offset`.
    pub fn memory_read(&self, memory: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let index = self.defined_memory(memory)?;
        self.core()
            .memory_read(index, offset, buf)
            .with_context(|| format!("reading memory {memory}"))
    }

    /// Writes `data` to memory `memory` at `offset`.
    pub fn memory_write(&mut self, memory: u32, offset: u64, data: &[u8]) -> Result<()> {
        let index = self.defined_memory(memory)?;
        self.handle
            .instance_mut()
            .memory_write(index, offset, data)
            .with_context(|| format!("writing memory {memory}"))
    }

    /// `memory.grow`: `Some(old size in pages)`, or `None` (-1) with the memory unchanged.
    pub fn memory_grow(&mut self, memory: u32, delta_pages: u64) -> Result<Option<u64>> {
        let index = self.defined_memory(memory)?;
        let limiter = self.limiter.as_deref_mut().map(|l| l as &mut dyn ResourceLimiter);
        self.handle
            .instance_mut()
            .memory_grow(index, delta_pages, limiter)
    }

    /// The number of elements of table `table`.
    pub fn table_size(&self, table: u32) -> Result<usize> {
        let index = self.defined_table(table)?;
        Ok(self.core().table(index).map_or(0, |t| t.size()))
    }

    /// Element `elem` of table `table`; an error if either is out of range.
    pub fn table_get(&self, table: u32, elem: u64) -> Result<usize> {
        let index = self.defined_table(table)?;
        let size = self.table_size(table)?;
        self.core()
            .table_get(index, elem)
            .ok_or_else(|| anyhow!("table {table} has {size} elements: index {elem} is out of bounds"))
    }

    /// Sets element `elem` of table `table`.
    pub fn table_set(&mut self, table: u32, elem: u64, value: usize) -> Result<()> {
        let index = self.defined_table(table)?;
        self.handle
            .instance_mut()
            .table_set(index, elem, value)
            .with_context(|| format!("table {table}"))
    }

    /// `table.grow`: `Some(old size)`, or `None` (-1) with the table unchanged.
    pub fn table_grow(&mut self, table: u32, delta: u64, init: usize) -> Result<Option<u64>> {
        let index = self.defined_table(table)?;
        let limiter = self.limiter.as_deref_mut().map(|l| l as &mut dyn ResourceLimiter);
        self.handle.instance_mut().table_grow(index, delta, init, limiter)
    }

    /// The value of global `global` (module index space) if the instance defines it.
    pub fn global(&self, global: u32) -> Option<VMGlobalDefinition> {
        let module = self.module();
        if global as usize >= module.globals().len() {
            return None;
        }
        let defined = global.checked_sub(module.num_imported_globals())?;
        self.core()
            .global(berth_core::DefinedGlobalIndex::from_u32(defined))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: the handle came from this engine's allocator in `instantiate` and is dropped
        // with the instance, so nothing uses its resources again.
        unsafe {
            self.lane
                .inner
                .engine
                .allocator()
                .deallocate_module(&mut self.handle)
        };
    }
}
