//! The conformance suite every Berth backend runs. **Not API-stable**: it changes with the
//! promises it checks.
//!
//! One entry point, [`run_all`], runs every case against allocators a factory makes. A backend
//! that differs from the others says so in its [`Capabilities`] (it has an instance limit, it
//! reuses slots, its memories cannot grow past some size); no case can be skipped by a
//! backend, so a new case reaches every backend at once. The cases check what an embedder
//! relies on:
//!
//! - an instance's memories and tables start zeroed at their initial sizes, and the vmctx
//!   definitions compiled code reads are exact, also after growth;
//! - growth follows the spec (old size, or -1 with nothing changed), within the declared limits;
//! - limits fail with a typed [`LimitExceeded`](berth_core::LimitExceeded) error and capacity
//!   comes back after deallocation;
//! - **no byte a tenant wrote is ever visible to a later tenant**: not in the next tenant's
//!   memories and tables as they start, nor in what they grow to; also after the tenant grew,
//!   after a failed instantiation, whatever state the kernel put the tenant's pages in (pushed to
//!   swap, on the inactive list, in a transparent huge page: [`page_states`]), and in both
//!   processes after a fork with tenants live;
//! - live memories and tables never share a byte;
//! - bytes past a memory's size, the rest of its reservation and its guards fault, also with
//!   neighbours live (checked in a child process);
//! - programs of random operations (instantiate one of several modules, some with data
//!   segments, write, grow, set and grow tables, move pages to swap, deallocate) agree with a
//!   model, and live memories never overlap;
//! - memories taken on their own ([`StandaloneMemories`](berth_core::StandaloneMemories)), without
//!   an instance, start zeroed, grow by the spec, never overlap, show nothing of an earlier
//!   one, and are counted only while they live;
//! - releasing idle memory leaves no memory slot warm and no byte resident in idle slots, keeps
//!   what a live instance holds, and later instances start fresh.
//!
//! Cases that push pages to swap need swap: without it they say that they skipped and why, and
//! under `CI=true` they fail.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use berth_core::{InstanceAllocatorImpl, Tunables};
//! # fn my_backend(_: &Tunables) -> Arc<dyn InstanceAllocatorImpl> { unimplemented!() }
//! #[test]
//! fn conformance() {
//!     berth_testkit::run_all(&|tunables| my_backend(tunables), berth_testkit::Capabilities::default());
//! }
//! ```

#![deny(missing_docs)]
#![allow(clippy::cast_possible_truncation)] // Sizes in this suite are small and the host is 64-bit.

mod cases;
mod checks;
mod child;
mod faults;
mod harness;
mod modules;
pub mod page_states;
mod program;
mod release;
mod reuse;
mod standalone;

use std::sync::Arc;

use berth_core::{InstanceAllocatorImpl, Tunables};

pub use harness::{Harness, Live, Loaded};

/// How a backend differs from an unlimited, never-reusing one. `None` means "no limit".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The backend hands the same memory or table slot to a later instance (so resets are
    /// what keeps tenants apart). Both answers run the same cases.
    pub reuses_slots: bool,
    /// Live instances at most.
    pub max_instances: Option<usize>,
    /// Live memories at most.
    pub max_memories: Option<usize>,
    /// Live tables at most.
    pub max_tables: Option<usize>,
    /// Bytes one memory may reach at most.
    pub max_memory_bytes: Option<usize>,
    /// Elements one table may reach at most.
    pub max_table_elements: Option<usize>,
    /// Defined memories one module may have.
    pub max_memories_per_module: Option<u32>,
    /// Defined tables one module may have.
    pub max_tables_per_module: Option<u32>,
}

impl Capabilities {
    /// No limits, no slot reuse.
    pub fn unlimited() -> Self {
        Self::default()
    }
}

/// Makes a fresh allocator for the given tunables (the suite picks small ones).
pub type Factory<'a> = &'a dyn Fn(&Tunables) -> Arc<dyn InstanceAllocatorImpl>;

/// The tunables the suite builds allocators with: 1 MiB reservations, 64 KiB guards (also
/// before each memory), 64 KiB of growth reserve, memories may move.
pub fn suite_tunables() -> Tunables {
    Tunables {
        memory_reservation: 1 << 20,
        memory_guard_size: 64 << 10,
        guard_before_linear_memory: true,
        memory_reservation_for_growth: 64 << 10,
        memory_may_move: true,
        memory_init_cow: true,
    }
}

/// What a case gets: a way to make allocators and what they are capable of.
pub(crate) struct Ctx<'a> {
    pub factory: Factory<'a>,
    pub caps: Capabilities,
}

impl Ctx<'_> {
    /// A fresh allocator under the suite's tunables.
    pub fn harness(&self) -> Harness {
        let tunables = suite_tunables();
        Harness {
            allocator: (self.factory)(&tunables),
            tunables,
        }
    }

    /// The `shapes` this backend can instantiate, loaded.
    pub(crate) fn loadable(
        &self,
        harness: &Harness,
        shapes: Vec<modules::Shape>,
    ) -> Vec<(modules::Shape, Loaded)> {
        shapes
            .into_iter()
            .enumerate()
            .filter(|(_, shape)| shape.fits(&self.caps))
            .map(|(i, shape)| {
                let loaded = harness
                    .load(shape.build(&format!("suite{i}")))
                    .expect("a fitting module loads");
                (shape, loaded)
            })
            .collect()
    }
}

/// A case: its name and body.
type Case = (&'static str, fn(&Ctx<'_>));

/// Every case, in the order they run.
const CASES: &[Case] = &[
    (
        "fresh_instances_are_zeroed_and_exact",
        cases::fresh_instances_are_zeroed_and_exact,
    ),
    (
        "modules_over_the_limits_fail_validation",
        cases::modules_over_the_limits_fail_validation,
    ),
    ("growth_follows_the_spec", cases::growth_follows_the_spec),
    (
        "limits_are_typed_and_capacity_returns",
        cases::limits_are_typed_and_capacity_returns,
    ),
    (
        "reused_slots_read_only_fresh_contents",
        reuse::reused_slots_read_only_fresh_contents,
    ),
    (
        "reused_slots_read_only_fresh_contents_in_every_page_state",
        reuse::reused_slots_read_only_fresh_contents_in_every_page_state,
    ),
    ("tenants_survive_a_fork", reuse::tenants_survive_a_fork),
    (
        "live_memories_never_share_a_byte",
        reuse::live_memories_never_share_a_byte,
    ),
    (
        "failed_instantiation_leaks_nothing",
        cases::failed_instantiation_leaks_nothing,
    ),
    (
        "an_unwinding_limiter_leaks_nothing",
        cases::an_unwinding_limiter_leaks_nothing,
    ),
    (
        "bytes_past_the_size_and_guards_fault",
        faults::bytes_past_the_size_and_guards_fault,
    ),
    (
        "programs_agree_with_the_model",
        program::programs_agree_with_the_model,
    ),
    (
        "releasing_idle_memory_keeps_live_tenants_and_fresh_starts",
        release::releasing_idle_memory_keeps_live_tenants_and_fresh_starts,
    ),
    (
        "standalone_memories_are_fresh_grow_and_come_back",
        standalone::standalone_memories_are_fresh_grow_and_come_back,
    ),
];

/// Runs every case of the suite against allocators `factory` makes. Panics (as a test
/// failure) on the first broken promise, naming the case.
///
/// Call it from a `#[test]`: cases that check faults re-run that test in a child process.
pub fn run_all(factory: Factory<'_>, capabilities: Capabilities) {
    let ctx = Ctx {
        factory,
        caps: capabilities,
    };
    let only = child::requested_case();
    for (name, case) in CASES {
        if only.as_deref().is_some_and(|c| c != *name) {
            continue;
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&ctx)));
        if let Err(panic) = result {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("conformance case `{name}` failed: {message}");
        }
    }
}
