//! Berth's engine: the place an embedder configures instance allocation once and then
//! instantiates modules safely.
//!
//! 1. Build a [`Config`]: tunables (reservation and guard sizes, whether memories may move) and
//!    an [`InstanceAllocationStrategy`] (on-demand, pooling, or any [`InstanceAllocatorImpl`](berth_core::InstanceAllocatorImpl) of the
//!    embedder's).
//! 2. [`Engine::new`] checks the config and freezes it: compiled code may rely on the tunables.
//! 3. [`Engine::load`] turns module facts ([`berth_core::Module`]) into a [`LoadedModule`]: its
//!    vmctx offsets are computed and the backend validates it, once.
//! 4. [`Instance::new`] (or [`Instance::builder`]) allocates an instance; the safe handle reads,
//!    writes and grows memories and tables, gives compiled code its vmctx, and gives everything
//!    back to the backend when dropped.
//!
//! Backends compose: [`Fallback`] puts one in front of another (a pool in front of on-demand
//! allocation), [`Quotas`] limits each group of tenants; either is a backend to plug in with
//! [`InstanceAllocationStrategy::Custom`].
//!
//! A host that needs a linear memory without an instance (another runtime's memory, say) takes
//! one from the same backend with [`Engine::new_memory`].
//!
//! The common path needs no `unsafe` from the embedder.
//!
//! ```
//! use berth_core::{MemoryType, Module, TableType};
//! use berth_engine::{Config, Engine, Instance};
//!
//! let engine = Engine::new(&Config::new())?;
//! let facts = Module::builder().memory(MemoryType::new(1, Some(4))).table(TableType::new(10, None)).build()?;
//! let module = engine.load(facts)?;
//! let mut instance = Instance::new(&module)?;
//! instance.memory_write(0, 16, b"hello")?;
//! assert_eq!(instance.memory_grow(0, 1)?, Some(1));
//! # anyhow::Ok(())
//! ```

#![deny(missing_docs)]

mod config;
mod engine;
mod instance;

pub use config::{Config, InstanceAllocationStrategy};
pub use engine::{Engine, LoadedModule, check_tunables};
pub use instance::{Instance, InstanceBuilder, OwnedImports};

pub use berth_compose::{Fallback, QuotaExceeded, QuotaLimits, QuotaUsage, Quotas};
pub use berth_core;
pub use berth_on_demand::{OnDemandInstanceAllocator, OnDemandLimits};
pub use berth_pooling::{
    Machine, MachineLimit, PoolLayout, PoolingConfig, PoolingInstanceAllocator, Preflight, check_module,
    pool_misfits, preflight,
};
