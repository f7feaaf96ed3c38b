//! Backends built from backends, each itself a backend (an
//! [`InstanceAllocatorImpl`](berth_core::InstanceAllocatorImpl)) that wraps any other:
//!
//! - [`Fallback`]: one backend first, another when the first is full or cannot hold a module
//!   (a pool in front of on-demand allocation);
//! - [`Quotas`]: limits on the instances, memories, tables and memory bytes of each group of
//!   tenants the embedder names.
//!
//! Both keep, per memory and table they hand out, what they need to give it back (which
//! backend made it, what it was charged), under an allocation index of their own, so the
//! backends inside may use their index space as they like. They nest:
//! `Quotas::new(Fallback::new(pool, on_demand), ...)` limits groups on a pool with a fallback.
//! Both pass the conformance suite (`berth_testkit::run_all`) over each backend.
//!
//! ```
//! use berth_compose::{QuotaLimits, Quotas};
//! use berth_core::InstanceAllocatorImpl;
//!
//! /// Each module name is a group, and may hold two instances at a time; one may hold 100.
//! fn per_module<A: InstanceAllocatorImpl>(backend: A) -> Quotas<A, String> {
//!     let limits = QuotaLimits { instances: Some(2), ..QuotaLimits::default() };
//!     let quotas = Quotas::new(backend, limits, |request| request.module.name().map(str::to_owned));
//!     quotas.set_limits("big-tenant".to_owned(), QuotaLimits { instances: Some(100), ..limits });
//!     quotas
//! }
//! ```

#![deny(missing_docs)]

mod fallback;
mod ledger;
mod quotas;
#[cfg(test)]
mod tests;

use berth_core::AllocatorStats;

pub use fallback::Fallback;
pub use quotas::{QuotaExceeded, QuotaLimits, QuotaUsage, Quotas};

/// Two backends' statistics added up.
fn sum(a: &AllocatorStats, b: &AllocatorStats) -> AllocatorStats {
    let mut stats = a.clone();
    stats.live_instances += b.live_instances;
    stats.live_memories += b.live_memories;
    stats.live_tables += b.live_tables;
    stats.reserved_bytes += b.reserved_bytes;
    stats.warm_memory_slots += b.warm_memory_slots;
    stats.warm_table_slots += b.warm_table_slots;
    stats.idle_memory_resident_bytes += b.idle_memory_resident_bytes;
    stats.idle_table_resident_bytes += b.idle_table_resident_bytes;
    stats.memory_resets += b.memory_resets;
    stats.table_resets += b.table_resets;
    stats.decommit_calls += b.decommit_calls;
    stats.decommit_ranges += b.decommit_ranges;
    stats
}
