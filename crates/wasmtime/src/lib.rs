//! Wasmtime 48's compiled code on Berth's linear memories.
//!
//! [`BerthMemoryCreator`] is a [`wasmtime::MemoryCreator`] whose memories are Berth standalone
//! memories ([`berth_engine::Engine::new_memory`]) from any Berth backend: on-demand, pooling,
//! or an embedder's own. [`configure`] sets a [`wasmtime::Config`] to match a Berth engine (its
//! reservation, guards and growth policy, which Wasmtime's code relies on when it elides bounds
//! checks) and installs the creator:
//!
//! ```no_run
//! let berth = berth_engine::Engine::new(&berth_engine::Config::new())?;
//! let mut config = wasmtime::Config::new();
//! berth_wasmtime::configure(&mut config, &berth)?;
//! let engine = wasmtime::Engine::new(&config)?;
//! let module = wasmtime::Module::new(&engine, r#"(module (memory (export "m") 1))"#)?;
//! let mut store = wasmtime::Store::new(&engine, ());
//! let instance = wasmtime::Instance::new(&mut store, &module, &[])?;
//! # anyhow::Ok(())
//! ```
//!
//! What it does not cover: Wasmtime's tables and vmctx stay Wasmtime's (the creator API hands
//! over memories only), and so does a memory the host makes with `wasmtime::Memory::new`
//! (Wasmtime 48 makes those without the creator; Wasmtime's GC heaps do go through it, and are
//! Berth memories); Wasmtime's pooling strategy ignores custom memory creators, so
//! [`configure`] selects its on-demand strategy (pooling, if wanted, is Berth's, behind the
//! creator); Wasmtime cannot map its copy-on-write images into memories it did not make, so
//! [`configure`] turns them off and Wasmtime copies data segments in (turned on again, Wasmtime
//! 48 panics at instantiation); shared memories (the threads proposal) are refused, as Berth
//! does not make them. Wasmtime 48 reserves every memory in place, so none moves: a memory
//! grows within its reservation, and `memory.grow` returns -1 past it.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use berth_core::{MemoryType, StandaloneMemories, StandaloneMemory, Tunables, human_bytes};
use wasmtime::{InstanceAllocationStrategy, LinearMemory, MemoryCreator};

/// Configures `config` to run on memories from `engine`: Wasmtime's reservation is what the
/// engine's backend gives a memory to grow in place (its tunables' reservation, or less: a
/// pool's slot may be smaller, and the backend is asked), its guard size, growth reserve,
/// growth policy and pre-guard are the engine's tunables, its copy-on-write images are turned
/// off, its on-demand allocation strategy is selected, and [`BerthMemoryCreator`] is installed.
/// Fails if the backend cannot allocate a memory at all, or if its memories could never grow
/// (nothing to grow in place, and they may not move: a pool's never do).
pub fn configure(config: &mut wasmtime::Config, engine: &berth_engine::Engine) -> Result<()> {
    let tunables = engine.tunables();
    let probe = engine
        .new_memory(MemoryType::new(0, None))
        .context("the Berth engine cannot allocate a memory for Wasmtime")?;
    let in_place = (probe.memory().byte_capacity() as u64).min(tunables.memory_reservation);
    // A memory in a slot of a backend's own mapping (a pool's) never moves, whatever the
    // tunables say.
    let may_move = tunables.memory_may_move && !probe.memory().is_static();
    drop(probe);
    if in_place == 0 && !may_move {
        bail!(
            "the Berth engine's memories have no room to grow in place and may not move: no memory could grow"
        );
    }
    config
        .memory_reservation(in_place)
        .memory_guard_size(tunables.memory_guard_size)
        .memory_reservation_for_growth(tunables.memory_reservation_for_growth)
        .memory_may_move(tunables.memory_may_move)
        .guard_before_linear_memory(tunables.guard_before_linear_memory)
        .memory_init_cow(false)
        .allocation_strategy(InstanceAllocationStrategy::OnDemand)
        .with_host_memory(Arc::new(BerthMemoryCreator::new(engine)));
    Ok(())
}

/// A [`MemoryCreator`] over a Berth engine's standalone memories. Install it with
/// [`configure`], which also makes Wasmtime's sizes agree with the engine's.
#[derive(Debug, Clone)]
pub struct BerthMemoryCreator {
    memories: StandaloneMemories,
}

impl BerthMemoryCreator {
    /// Memories from `engine`'s backend (they may outlive the engine value).
    pub fn new(engine: &berth_engine::Engine) -> Self {
        BerthMemoryCreator {
            memories: engine.memories().clone(),
        }
    }

    fn create(
        &self,
        ty: &wasmtime::MemoryType,
        minimum: usize,
        reserved: Option<usize>,
        guard: usize,
    ) -> Result<BerthMemory> {
        let tunables = self.memories.tunables();
        check_sizes(tunables, reserved, guard)?;
        if ty.is_shared() {
            bail!("shared memories (the threads proposal) are not made by Berth");
        }
        let berth_ty = MemoryType {
            minimum: ty.minimum(),
            maximum: ty.maximum(),
            memory64: ty.is_64(),
            shared: false,
            page_size_log2: ty.page_size_log2(),
        };
        let memory = self.memories.allocate(berth_ty)?;
        let size = memory.memory().byte_size();
        if size != minimum {
            bail!("Berth made a memory of {size} bytes where Wasmtime asked for {minimum}");
        }
        // A memory Wasmtime reserved in place must never move: it must reach its maximum
        // (which Wasmtime says fits in the reservation) without leaving its reservation.
        if let Some(reserved) = reserved {
            let page = 1u64 << ty.page_size_log2();
            let max_bytes = ty
                .maximum()
                .and_then(|m| m.checked_mul(page))
                .and_then(|b| usize::try_from(b).ok());
            let needed = max_bytes.map_or(reserved, |m| m.min(reserved));
            let capacity = memory.memory().byte_capacity();
            if capacity < needed {
                bail!(
                    "Berth's memory can grow in place to {} where Wasmtime's code expects {}: raise the Berth engine's memory_reservation (or the pool's max_memory_size)",
                    human_bytes(capacity as u64),
                    human_bytes(needed as u64)
                );
            }
        }
        Ok(BerthMemory {
            memory,
            fixed: reserved.is_some(),
        })
    }
}

/// Whether memories made under `tunables` have the room Wasmtime's code assumes: at least
/// `reserved` bytes before the guard, and a guard of at least `guard` bytes.
fn check_sizes(tunables: &Tunables, reserved: Option<usize>, guard: usize) -> Result<()> {
    if let Some(reserved) = reserved
        && reserved as u64 > tunables.memory_reservation
    {
        bail!(
            "Wasmtime expects memories reserved for {} but the Berth engine reserves {}: configure Wasmtime with berth_wasmtime::configure",
            human_bytes(reserved as u64),
            human_bytes(tunables.memory_reservation)
        );
    }
    if guard as u64 > tunables.memory_guard_size {
        bail!(
            "Wasmtime expects guards of {} after memories but the Berth engine leaves {}: configure Wasmtime with berth_wasmtime::configure",
            human_bytes(guard as u64),
            human_bytes(tunables.memory_guard_size)
        );
    }
    Ok(())
}

// SAFETY: every memory returned is a Berth standalone memory: zero-filled at `minimum` bytes,
// inside a reservation of at least the `reserved` bytes Wasmtime asked for followed by a
// `PROT_NONE` guard of at least `guard` bytes (both checked against the engine's tunables,
// which Berth backends honour), owned by the returned value alone until it is dropped.
unsafe impl MemoryCreator for BerthMemoryCreator {
    fn new_memory(
        &self,
        ty: wasmtime::MemoryType,
        minimum: usize,
        _maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> std::result::Result<Box<dyn LinearMemory>, String> {
        self.create(&ty, minimum, reserved_size_in_bytes, guard_size_in_bytes)
            .map(|memory| Box::new(memory) as Box<dyn LinearMemory>)
            .map_err(|error| format!("{error:#}"))
    }
}

/// One Berth standalone memory, as Wasmtime uses it.
#[derive(Debug)]
pub struct BerthMemory {
    memory: StandaloneMemory,
    /// Wasmtime reserved it in place: growth must not move it.
    fixed: bool,
}

impl BerthMemory {
    /// The Berth memory.
    pub fn standalone(&self) -> &StandaloneMemory {
        &self.memory
    }

    /// Grows to `new_size` bytes, in place where Wasmtime reserved the memory in place.
    fn grow(&mut self, new_size: usize) -> Result<()> {
        let fixed = self.fixed;
        let memory = self.memory.memory_mut();
        let old = memory.byte_size();
        if new_size <= old {
            return Ok(());
        }
        let page = 1usize << memory.ty().page_size_log2;
        if !(new_size - old).is_multiple_of(page) {
            bail!(
                "cannot grow a memory of {page}-byte pages by {} bytes",
                new_size - old
            );
        }
        if fixed && new_size > memory.byte_capacity() {
            bail!(
                "cannot grow to {}: past its reservation the memory would move, and Wasmtime reserved it in place",
                human_bytes(new_size as u64)
            );
        }
        let delta = ((new_size - old) / page) as u64;
        match memory.grow(delta, None)? {
            Some(_) => Ok(()),
            None => bail!(
                "the Berth memory cannot grow from {} to {}",
                human_bytes(old as u64),
                human_bytes(new_size as u64)
            ),
        }
    }
}

// SAFETY: a `BerthMemory` owns its standalone memory alone (its pages belong to no other value
// until it is dropped and given back); moving it to another thread moves that ownership.
unsafe impl Send for BerthMemory {}
// SAFETY: through `&BerthMemory`, only sizes and the base address are read; the bytes are
// reached through the pointer, as Wasmtime synchronizes its use of any linear memory.
unsafe impl Sync for BerthMemory {}

// SAFETY: `as_ptr` is the base of `byte_size` accessible bytes; growth up to `byte_capacity`
// keeps the base (Berth grows in place within the reservation), and a memory Wasmtime reserved
// in place is never moved (growth past its capacity is refused).
unsafe impl LinearMemory for BerthMemory {
    fn byte_size(&self) -> usize {
        self.memory.memory().byte_size()
    }

    fn byte_capacity(&self) -> usize {
        self.memory.memory().byte_capacity()
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        self.grow(new_size)
            .map_err(|error| wasmtime::Error::msg(format!("{error:#}")))
    }

    fn as_ptr(&self) -> *mut u8 {
        self.memory.memory().base()
    }
}
