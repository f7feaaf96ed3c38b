//! The engine and the modules loaded into it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use berth_core::{
    AllocatorStats, HostPtr, InstanceAllocator, InstanceAllocatorImpl, MemoryType, Module, ModuleId,
    Released, StandaloneMemories, StandaloneMemory, Tunables, VMOffsets, sys,
};
use berth_on_demand::OnDemandInstanceAllocator;
use berth_pooling::PoolingInstanceAllocator;

use crate::config::{Config, InstanceAllocationStrategy};

/// The largest user address space Berth assumes (47 bits, as on x86-64 and most aarch64
/// Linux kernels).
const ADDRESS_SPACE: u64 = 1 << 47;

/// A configured allocation layer. Cheap to clone (it is an `Arc`); share one per process.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    tunables: Tunables,
    allocator: Arc<dyn InstanceAllocatorImpl>,
    strategy: &'static str,
    memories: StandaloneMemories,
    /// How many loaded modules hold each module id (clones of a `Module` keep its id, and each
    /// may be loaded): the backend forgets a module when the last of them goes.
    loaded: Mutex<HashMap<ModuleId, usize>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("tunables", &self.inner.tunables)
            .field("strategy", &self.inner.strategy)
            .finish()
    }
}

impl Engine {
    /// Checks `config` and builds the engine (and its allocator).
    pub fn new(config: &Config) -> Result<Engine> {
        let tunables = config.tunables;
        check_tunables(&tunables).context("invalid engine configuration")?;
        let (allocator, strategy): (Arc<dyn InstanceAllocatorImpl>, _) = match &config.strategy {
            InstanceAllocationStrategy::OnDemand => (Arc::new(OnDemandInstanceAllocator::new()), "on-demand"),
            InstanceAllocationStrategy::Pooling(pooling) => (
                Arc::new(
                    PoolingInstanceAllocator::new(pooling, &tunables)
                        .context("failed to build the pooling allocator")?,
                ),
                "pooling",
            ),
            InstanceAllocationStrategy::Custom(allocator) => (allocator.clone(), "custom"),
        };
        Ok(Engine {
            inner: Arc::new(EngineInner {
                tunables,
                memories: StandaloneMemories::new(allocator.clone(), tunables),
                allocator,
                strategy,
                loaded: Mutex::default(),
            }),
        })
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, HashMap<ModuleId, usize>> {
        // A count and an insert or remove: nothing a panic leaves half done.
        self.inner
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The frozen tunables every backend honours.
    pub fn tunables(&self) -> &Tunables {
        &self.inner.tunables
    }

    /// The allocator instances come from.
    pub fn allocator(&self) -> &Arc<dyn InstanceAllocatorImpl> {
        &self.inner.allocator
    }

    /// The strategy's name: `on-demand`, `pooling` or `custom`.
    pub fn strategy_name(&self) -> &'static str {
        self.inner.strategy
    }

    /// Allocates a linear memory on its own, without an instance, from this engine's backend:
    /// `ty.minimum` pages accessible and zeroed, with the engine's reservation and guards.
    /// Dropping it gives it back. For a host that needs a memory (another runtime's: see
    /// `berth-wasmtime`), whatever the backend.
    pub fn new_memory(&self, ty: MemoryType) -> Result<StandaloneMemory> {
        self.inner.memories.allocate(ty)
    }

    /// Where [`new_memory`](Self::new_memory)'s memories come from, to keep past the engine or
    /// to allocate with a limiter.
    pub fn memories(&self) -> &StandaloneMemories {
        &self.inner.memories
    }

    /// The allocator's statistics.
    pub fn stats(&self) -> AllocatorStats {
        self.inner.allocator.stats()
    }

    /// Gives back, now, the memory the backend keeps for instances to come (idle slots'
    /// resident pages and images, warm slots, kept reservations, queued decommits): for a host
    /// that goes quiet. Live instances are untouched; the next instances pay their set-up
    /// again. See [`InstanceAllocatorImpl::release_idle_memory`](berth_core::InstanceAllocatorImpl::release_idle_memory).
    pub fn release_idle_memory(&self) -> Released {
        self.inner.allocator.release_idle_memory()
    }

    /// Loads module facts: computes the vmctx offsets and has the backend validate the module,
    /// once. A module this backend can never instantiate fails here.
    pub fn load(&self, module: Module) -> Result<LoadedModule> {
        let name = module.name().unwrap_or("<unnamed>").to_owned();
        let offsets =
            VMOffsets::new(HostPtr, &module).with_context(|| format!("module {name}: vmctx layout"))?;
        self.inner
            .allocator
            .validate_module(&module, &offsets)
            .with_context(|| {
                format!(
                    "module {name} cannot be instantiated by the {} allocator",
                    self.inner.strategy
                )
            })?;
        if self.tunables().memory_init_cow {
            // Built now, once, so that no instantiation pays for it or meets its failure.
            module
                .memory_images()
                .with_context(|| format!("module {name}: copy-on-write memory images"))?;
        }
        // Counted before the loaded module exists, whose drop uncounts it.
        *self.loaded().entry(module.id()).or_default() += 1;
        let inner = Arc::new(LoadedInner {
            module: Arc::new(module),
            offsets,
            engine: self.clone(),
        });
        let lanes = (0..lane_count())
            .map(|_| {
                Arc::new(Lane {
                    inner: inner.clone(),
                    module: Arc::new(Module::clone(&inner.module)),
                })
            })
            .collect();
        Ok(LoadedModule { inner, lanes })
    }
}

/// Rejects tunables no backend can honour: what [`Engine::new`] checks, for a tool that
/// plans an engine without building it.
pub fn check_tunables(tunables: &Tunables) -> Result<()> {
    tunables.validate(sys::page_size())?;
    let total = tunables
        .pre_guard_size()
        .saturating_add(tunables.memory_reservation)
        .saturating_add(tunables.memory_guard_size);
    if total > ADDRESS_SPACE / 2 {
        bail!(
            "a memory would need {} of reservation plus guards, over half of a 47-bit address space",
            berth_core::exact_bytes(total)
        );
    }
    Ok(())
}

/// A module loaded into an engine: its facts, its vmctx offsets, validated by the engine's
/// backend. Cheap to clone. When the last clone and the last instance are gone, the backend
/// is told to purge what it kept for the module.
#[derive(Clone, Debug)]
pub struct LoadedModule {
    pub(crate) inner: Arc<LoadedInner>,
    /// What an instance holds to keep the module alive: one handle per lane, so that threads
    /// instantiating the module at once each count their instances on a cache line of their
    /// own (one shared count cost two threads on a 1 µs cycle about a third of their speed).
    lanes: Arc<[Arc<Lane>]>,
}

/// Lanes a loaded module has at most (one per hardware thread up to this).
const MAX_LANES: usize = 64;

/// Lanes every loaded module has: one per hardware thread this process may use, up to
/// [`MAX_LANES`], asked of the system once (it reads the affinity mask and cgroup limits).
fn lane_count() -> usize {
    static LANES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LANES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_LANES)))
}

/// A handle on a loaded module that keeps it (and its engine) alive, one of several so that
/// instances on different threads count themselves apart: on the lane itself, and on the
/// lane's own clone of the module, which the allocator's instance block holds.
///
/// Aligned so that each lane's reference count has its cache lines to itself.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Lane {
    pub(crate) inner: Arc<LoadedInner>,
    /// The module (a clone of `inner`'s, the same module) that instances of this lane hold.
    pub(crate) module: Arc<Module>,
}

#[derive(Debug)]
pub(crate) struct LoadedInner {
    pub(crate) module: Arc<Module>,
    pub(crate) offsets: VMOffsets<HostPtr>,
    pub(crate) engine: Engine,
}

impl LoadedModule {
    /// A handle for an instance made on this thread: this thread's lane's.
    pub(crate) fn lane(&self) -> Arc<Lane> {
        self.lanes[berth_core::sync::thread_lane(self.lanes.len())].clone()
    }

    /// The module facts.
    pub fn module(&self) -> &Arc<Module> {
        &self.inner.module
    }

    /// The vmctx layout.
    pub fn offsets(&self) -> &VMOffsets<HostPtr> {
        &self.inner.offsets
    }

    /// The engine it was loaded into.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }
}

impl Drop for LoadedInner {
    fn drop(&mut self) {
        let id = self.module.id();
        let last = {
            let mut loaded = self.engine.loaded();
            match loaded.get_mut(&id) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    false
                }
                _ => {
                    loaded.remove(&id);
                    true
                }
            }
        };
        if last {
            self.engine.inner.allocator.purge_module(id);
        }
    }
}
