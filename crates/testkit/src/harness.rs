//! A small runtime over a bare `InstanceAllocatorImpl`: loads modules, makes requests, and
//! deallocates instances on drop, the way a runtime drives a backend.

use std::sync::Arc;

use anyhow::Result;
use berth_core::{
    DefinedMemoryIndex, DefinedTableIndex, HostPtr, Imports, InstanceAllocationRequest, InstanceAllocator,
    InstanceAllocatorImpl, InstanceHandle, Module, ResourceLimiter, Tunables, VMOffsets,
};

/// A module validated by the allocator under test.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The facts.
    pub module: Arc<Module>,
    /// Its vmctx layout.
    pub offsets: VMOffsets<HostPtr>,
}

/// An allocator under test with the tunables it was built for.
#[derive(Clone)]
pub struct Harness {
    /// The backend.
    pub allocator: Arc<dyn InstanceAllocatorImpl>,
    /// The tunables every request carries.
    pub tunables: Tunables,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("tunables", &self.tunables)
            .finish_non_exhaustive()
    }
}

/// An instance that is deallocated when dropped.
pub struct Live {
    harness: Harness,
    handle: InstanceHandle,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

impl Harness {
    /// Computes offsets and validates `module` with the allocator.
    pub fn load(&self, module: Module) -> Result<Loaded> {
        let offsets = VMOffsets::new(HostPtr, &module)?;
        self.allocator.validate_module(&module, &offsets)?;
        if self.tunables.memory_init_cow {
            // As an engine does: images are built when a module is loaded.
            module.memory_images()?;
        }
        Ok(Loaded {
            module: Arc::new(module),
            offsets,
        })
    }

    /// Instantiates `loaded` (no imports), with an optional limiter, and initializes it.
    pub fn instantiate(&self, loaded: &Loaded, limiter: Option<&mut dyn ResourceLimiter>) -> Result<Live> {
        let resolver = |f: berth_core::FuncIndex| f.as_u32() as usize + 1;
        let request = InstanceAllocationRequest {
            module: &loaded.module,
            offsets: &loaded.offsets,
            tunables: &self.tunables,
            imports: Imports::default(),
            host_state: Box::new(()),
            limiter: limiter.map(|l| l as &mut dyn ResourceLimiter),
            func_resolver: &resolver,
        };
        // SAFETY: `loaded` was validated by this allocator in `load`, with these offsets.
        let handle = unsafe { self.allocator.allocate_module(request)? };
        let mut live = Live {
            harness: self.clone(),
            handle,
        };
        // Data segments a copy-on-write image did not put in place (from here on, a failure
        // deallocates the instance).
        // SAFETY: the instance has no imports, so nothing outside it is read or written.
        unsafe { berth_core::initialize(live.instance_mut(), &resolver)? };
        Ok(live)
    }
}

impl Live {
    /// The core instance.
    pub fn instance(&self) -> &berth_core::Instance {
        self.handle.instance()
    }

    /// The core instance, mutably (pinned: it lives in its block).
    pub fn instance_mut(&mut self) -> std::pin::Pin<&mut berth_core::Instance> {
        self.handle.instance_mut()
    }

    /// Defined memory `i`'s bytes.
    pub fn memory(&self, i: u32) -> &[u8] {
        self.instance()
            .memory(DefinedMemoryIndex::from_u32(i))
            .expect("memory exists")
            .as_slice()
    }

    /// Defined table `i`'s elements.
    pub fn table(&self, i: u32) -> &[usize] {
        self.instance()
            .table(DefinedTableIndex::from_u32(i))
            .expect("table exists")
            .elements()
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // SAFETY: the handle came from this allocator's `allocate_module` and is dropped with
        // this value, so nothing uses it again.
        unsafe { self.harness.allocator.deallocate_module(&mut self.handle) };
    }
}
