//! Linear memories on their own, without a module instance: for a host that needs a memory
//! (another runtime's, or its own), from any backend.
//!
//! A backend allocates memories for a module's instances ([`InstanceAllocatorImpl::allocate_memory`]);
//! a standalone memory is that, for a module made for the purpose: one defined memory of the
//! wanted type, nothing else, validated by the backend once per type. So every backend, an
//! embedder's too, serves standalone memories with what it already implements, and keeps its
//! promises for them: zeroed at the initial size, the tunables' reservation and guards, no byte
//! of one tenant visible to the next. Memories of one type share their module, so a pooling
//! backend keeps their slots warm for each other as it does for a module's instances; a
//! backend counts them in its live memories, not its instances.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use cranelift_entity::EntityRef;

use crate::allocator::{Imports, InstanceAllocationRequest, InstanceAllocator, InstanceAllocatorImpl};
use crate::index::{DefinedMemoryIndex, MemoryAllocationIndex};
use crate::limiter::ResourceLimiter;
use crate::memory::Memory;
use crate::module::Module;
use crate::tunables::Tunables;
use crate::types::MemoryType;
use crate::vmoffsets::{HostPtr, VMOffsets};

/// Where standalone memories come from: a backend, the tunables it was built for, and the
/// one-memory modules made so far (one per memory type). Cheap to clone.
#[derive(Clone)]
pub struct StandaloneMemories {
    shared: Arc<Shared>,
}

struct Shared {
    allocator: Arc<dyn InstanceAllocatorImpl>,
    tunables: Tunables,
    modules: Mutex<HashMap<MemoryType, Loaded>>,
}

/// A one-memory module, validated by the backend, with its vmctx layout.
#[derive(Clone)]
struct Loaded {
    module: Arc<Module>,
    offsets: Arc<VMOffsets<HostPtr>>,
}

impl std::fmt::Debug for StandaloneMemories {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandaloneMemories")
            .field("tunables", &self.shared.tunables)
            .finish_non_exhaustive()
    }
}

impl StandaloneMemories {
    /// Standalone memories from `allocator`, which must have been built for `tunables` (a
    /// pooling backend's slots are sized from them).
    pub fn new(allocator: Arc<dyn InstanceAllocatorImpl>, tunables: Tunables) -> Self {
        StandaloneMemories {
            shared: Arc::new(Shared {
                allocator,
                tunables,
                modules: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The tunables every memory from here honours.
    pub fn tunables(&self) -> &Tunables {
        &self.shared.tunables
    }

    /// Allocates a memory of type `ty`: `ty.minimum` pages accessible and zeroed, able to grow
    /// to its maximum within what the backend allows. Fails if the backend cannot serve this
    /// type (its limits, as for a module with this memory), or has no memory to give now (a
    /// typed [`LimitExceeded`](crate::LimitExceeded) for a pool's slots).
    pub fn allocate(&self, ty: MemoryType) -> Result<StandaloneMemory> {
        self.allocate_limited(ty, None)
    }

    /// [`allocate`](Self::allocate), asking `limiter` first, as an instance's memory would.
    pub fn allocate_limited(
        &self,
        ty: MemoryType,
        limiter: Option<&mut dyn ResourceLimiter>,
    ) -> Result<StandaloneMemory> {
        let loaded = self.loaded(ty)?;
        let resolver = |_| 0usize;
        let mut request = InstanceAllocationRequest {
            module: &loaded.module,
            offsets: &loaded.offsets,
            tunables: &self.shared.tunables,
            imports: Imports::default(),
            host_state: Box::new(()),
            limiter: limiter.map(|l| l as &mut dyn ResourceLimiter),
            func_resolver: &resolver,
        };
        let index = DefinedMemoryIndex::new(0);
        // SAFETY: the module was validated by this allocator (`loaded`) and `ty` is its
        // defined memory 0.
        let (allocation, memory) = unsafe { self.shared.allocator.allocate_memory(&mut request, &ty, index) }
            .with_context(|| format!("failed to allocate a standalone memory of {}", describe(&ty)))?;
        Ok(StandaloneMemory {
            shared: self.shared.clone(),
            allocation,
            memory: Some(memory),
        })
    }

    /// The module for `ty`, made and validated the first time.
    fn loaded(&self, ty: MemoryType) -> Result<Loaded> {
        let mut modules = self
            .shared
            .modules
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(loaded) = modules.get(&ty) {
            return Ok(loaded.clone());
        }
        let what = describe(&ty);
        let module = Module::builder()
            .name("standalone memory")
            .memory(ty)
            .build()
            .with_context(|| format!("invalid standalone memory type: {what}"))?;
        let offsets = VMOffsets::new(HostPtr, &module).context("vmctx layout of a standalone memory")?;
        self.shared
            .allocator
            .validate_module(&module, &offsets)
            .with_context(|| format!("this backend cannot allocate a memory of {what}"))?;
        let loaded = Loaded {
            module: Arc::new(module),
            offsets: Arc::new(offsets),
        };
        modules.insert(ty, loaded.clone());
        Ok(loaded)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Every memory is gone (each holds this): the backend may forget what it kept.
        let modules = self
            .modules
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for loaded in modules.values() {
            self.allocator.purge_module(loaded.module.id());
        }
    }
}

/// A linear memory allocated on its own ([`StandaloneMemories::allocate`]). Read, write and
/// grow it through [`memory`](Self::memory) and [`memory_mut`](Self::memory_mut); dropping
/// it gives it back to its backend.
pub struct StandaloneMemory {
    shared: Arc<Shared>,
    allocation: MemoryAllocationIndex,
    /// `None` only while being dropped. (The module it was allocated for lives in `shared`,
    /// which this keeps alive.)
    memory: Option<Memory>,
}

impl std::fmt::Debug for StandaloneMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandaloneMemory")
            .field("memory", &self.memory)
            .finish_non_exhaustive()
    }
}

impl StandaloneMemory {
    /// The memory.
    pub fn memory(&self) -> &Memory {
        self.memory.as_ref().expect("present until dropped")
    }

    /// The memory, to write or grow ([`Memory::grow`]; growth may move it if the tunables
    /// allow, so read [`Memory::base`] again afterwards).
    pub fn memory_mut(&mut self) -> &mut Memory {
        self.memory.as_mut().expect("present until dropped")
    }

    /// Where the backend keeps it (its slot, for a pool).
    pub fn allocation_index(&self) -> MemoryAllocationIndex {
        self.allocation
    }
}

impl Drop for StandaloneMemory {
    fn drop(&mut self) {
        if let Some(memory) = self.memory.take() {
            // SAFETY: `memory` and `allocation` came from this allocator's `allocate_memory`
            // for defined memory 0 and are given back once (the memory was just taken out);
            // the memory is no longer reachable through `self`, and its borrowers (`memory`,
            // `memory_mut`) cannot outlive it.
            unsafe {
                self.shared
                    .allocator
                    .deallocate_memory(DefinedMemoryIndex::new(0), self.allocation, memory);
            }
        }
    }
}

/// A memory type in words, for errors.
fn describe(ty: &MemoryType) -> String {
    let page = 1u64 << ty.page_size_log2;
    let max = ty
        .maximum
        .map_or_else(|| "no maximum".to_owned(), |m| format!("at most {m}"));
    format!(
        "{} pages of {} ({max}){}",
        ty.minimum,
        crate::units::human_bytes(page),
        if ty.memory64 { ", 64-bit" } else { "" }
    )
}
