//! Engine configuration.

use std::fmt;
use std::sync::Arc;

use berth_core::{InstanceAllocatorImpl, Tunables};

/// How an engine allocates instances. Chosen once, when the engine is built.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum InstanceAllocationStrategy {
    /// A fresh reservation per memory and a `Vec` per table, given back on deallocation
    /// (`berth-on-demand`, no limits). The default.
    #[default]
    OnDemand,
    /// Pre-reserved slots reused across instances (`berth-pooling`), sized by the config.
    Pooling(berth_pooling::PoolingConfig),
    /// A backend the embedder wrote or configured (for example an
    /// [`OnDemandInstanceAllocator`](crate::OnDemandInstanceAllocator) with limits).
    Custom(Arc<dyn InstanceAllocatorImpl>),
}

impl fmt::Debug for InstanceAllocationStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstanceAllocationStrategy::OnDemand => f.write_str("OnDemand"),
            InstanceAllocationStrategy::Pooling(config) => f.debug_tuple("Pooling").field(config).finish(),
            InstanceAllocationStrategy::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Everything an [`Engine`](crate::Engine) is built from. Setters take and return `&mut Self`
/// so they chain.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub(crate) tunables: Tunables,
    pub(crate) strategy: InstanceAllocationStrategy,
}

impl Config {
    /// The defaults: [`Tunables::default`] and on-demand allocation.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tunables as configured so far.
    pub fn tunables(&self) -> &Tunables {
        &self.tunables
    }

    /// Replaces all tunables at once.
    pub fn set_tunables(&mut self, tunables: Tunables) -> &mut Self {
        self.tunables = tunables;
        self
    }

    /// Bytes of address space reserved per memory; see [`Tunables::memory_reservation`].
    pub fn memory_reservation(&mut self, bytes: u64) -> &mut Self {
        self.tunables.memory_reservation = bytes;
        self
    }

    /// Bytes of guard after each memory; see [`Tunables::memory_guard_size`].
    pub fn memory_guard_size(&mut self, bytes: u64) -> &mut Self {
        self.tunables.memory_guard_size = bytes;
        self
    }

    /// Whether a guard also stands before each memory; see
    /// [`Tunables::guard_before_linear_memory`].
    pub fn guard_before_linear_memory(&mut self, enable: bool) -> &mut Self {
        self.tunables.guard_before_linear_memory = enable;
        self
    }

    /// Extra bytes reserved past a memory that does not fit its reservation; see
    /// [`Tunables::memory_reservation_for_growth`].
    pub fn memory_reservation_for_growth(&mut self, bytes: u64) -> &mut Self {
        self.tunables.memory_reservation_for_growth = bytes;
        self
    }

    /// Whether memories may move when they grow past their reservation; see
    /// [`Tunables::memory_may_move`].
    pub fn memory_may_move(&mut self, enable: bool) -> &mut Self {
        self.tunables.memory_may_move = enable;
        self
    }

    /// How instances are allocated.
    pub fn allocation_strategy(&mut self, strategy: InstanceAllocationStrategy) -> &mut Self {
        self.strategy = strategy;
        self
    }
}
