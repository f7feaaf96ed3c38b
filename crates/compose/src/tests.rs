//! Fallback and quotas where they bind: the suite (`tests/conformance.rs`) runs them where
//! they do not.

use std::sync::Arc;

use berth_core::{
    InstanceAllocatorImpl, LimitExceeded, LimiterDenied, MemoryType, Module, ResourceLimiter, TableType,
    Tunables,
};
use berth_on_demand::OnDemandInstanceAllocator;
use berth_pooling::{PoolingConfig, PoolingInstanceAllocator};
use berth_testkit::Harness;

use crate::{Fallback, QuotaExceeded, QuotaLimits, QuotaUsage, Quotas};

fn tunables() -> Tunables {
    Tunables {
        memory_reservation: 1 << 20,
        memory_guard_size: 1 << 16,
        ..Tunables::default()
    }
}

fn pool(slots: u32) -> PoolingInstanceAllocator {
    let mut config = PoolingConfig::new();
    config
        .total_core_instances(slots)
        .total_memories(slots)
        .total_tables(slots)
        .max_memory_size(1 << 20)
        .table_elements(16);
    PoolingInstanceAllocator::new(&config, &tunables()).unwrap()
}

fn harness(allocator: impl InstanceAllocatorImpl + 'static) -> Harness {
    Harness {
        allocator: Arc::new(allocator),
        tunables: tunables(),
    }
}

fn module(name: &str, max_pages: Option<u64>) -> Module {
    Module::builder()
        .name(name)
        .memory(MemoryType::new(1, max_pages))
        .table(TableType::new(2, Some(8)))
        .build()
        .unwrap()
}

#[test]
fn the_secondary_serves_what_the_full_primary_cannot_and_each_goes_back_where_it_came_from() {
    let fallback = Fallback::new(pool(2), OnDemandInstanceAllocator::new());
    let harness = harness(fallback);
    let a = harness.load(module("a", Some(4))).unwrap();
    let live: Vec<_> = (0..5).map(|_| harness.instantiate(&a, None).unwrap()).collect();
    let stats = harness.allocator.stats();
    assert_eq!(
        (stats.live_instances, stats.live_memories, stats.live_tables),
        (5, 5, 5)
    );
    let static_memories = live
        .iter()
        .filter(|l| l.instance().memories().values().all(|(_, m)| m.is_static()))
        .count();
    assert_eq!(static_memories, 2, "the pool's two slots first, then on-demand");
    drop(live);
    let stats = harness.allocator.stats();
    assert_eq!(
        (stats.live_instances, stats.live_memories, stats.live_tables),
        (0, 0, 0)
    );
    // The pool has its slots back: the next two come from it again.
    let again: Vec<_> = (0..2).map(|_| harness.instantiate(&a, None).unwrap()).collect();
    assert!(
        again
            .iter()
            .all(|l| l.instance().memories().values().all(|(_, m)| m.is_static()))
    );
}

#[test]
fn a_module_only_the_secondary_can_hold_goes_there_and_one_neither_can_fails_to_load() {
    let fallback = Fallback::new(pool(2), OnDemandInstanceAllocator::new());
    let harness = harness(fallback);
    // 32 MiB: past the pool's 1 MiB slots, within on-demand's reach.
    let big = Module::builder()
        .name("big")
        .memory(MemoryType::new(512, None))
        .build()
        .unwrap();
    let big = harness.load(big).unwrap();
    let live = harness.instantiate(&big, None).unwrap();
    assert!(live.instance().memories().values().all(|(_, m)| !m.is_static()));
    drop(live);
    // Past both: on-demand capped at 16 MiB behind the pool's 1 MiB slots.
    let limits = berth_on_demand::OnDemandLimits {
        max_memory_size: Some(16 << 20),
        ..Default::default()
    };
    let harness = harness_of(Fallback::new(
        pool(2),
        OnDemandInstanceAllocator::with_limits(limits),
    ));
    let big = Module::builder()
        .name("big")
        .memory(MemoryType::new(512, None))
        .build()
        .unwrap();
    let error = harness.load(big).unwrap_err();
    assert!(error.chain().any(|e| e.is::<LimitExceeded>()), "{error:#}");
    assert!(
        format!("{error:#}").contains("primary backend refused it too"),
        "{error:#}"
    );
}

#[test]
fn a_module_one_engine_purges_is_served_for_another_as_before() {
    // Two engines sharing one fallback each validated the module; one drops it (the purge),
    // the other goes on instantiating it, from the side that accepts it.
    let fallback = Arc::new(Fallback::new(OnDemandInstanceAllocator::new(), pool(2)));
    let harness = Harness {
        allocator: fallback.clone(),
        tunables: tunables(),
    };
    let big = || {
        Module::builder()
            .name("big")
            .memory(MemoryType::new(512, None))
            .build()
            .unwrap()
    };
    let facts = big();
    let id = facts.id();
    let mine = harness.load(facts).unwrap();
    harness.allocator.purge_module(id);
    let live = harness
        .instantiate(&mine, None)
        .expect("the 32 MiB memory still goes to on-demand, not to the 1 MiB pool");
    assert!(live.instance().memories().values().all(|(_, m)| !m.is_static()));
    drop(live);
    // Pool first with room: after the purge, still the pool, no fallback.
    let fallback = Arc::new(Fallback::new(pool(2), OnDemandInstanceAllocator::new()));
    let harness = Harness {
        allocator: fallback.clone(),
        tunables: tunables(),
    };
    let small = module("small", Some(4));
    let id = small.id();
    let small = harness.load(small).unwrap();
    harness.allocator.purge_module(id);
    let live = harness.instantiate(&small, None).unwrap();
    assert!(live.instance().memories().values().all(|(_, m)| m.is_static()));
    assert_eq!(fallback.fallbacks(), 0);
}

/// A limiter with a quota of its own, reported as a `LimitExceeded`, counting its calls.
struct Budget {
    calls: u32,
}

impl ResourceLimiter for Budget {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> anyhow::Result<bool> {
        self.calls += 1;
        Err(LimitExceeded::error("tenant_bytes", 4096, desired as u64))
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _max: Option<usize>,
    ) -> anyhow::Result<bool> {
        self.calls += 1;
        Ok(true)
    }
}

#[test]
fn a_limiters_own_limit_is_final_and_not_the_primary_being_full() {
    let fallback = Arc::new(Fallback::new(pool(2), OnDemandInstanceAllocator::new()));
    let harness = Harness {
        allocator: fallback.clone(),
        tunables: tunables(),
    };
    let a = harness.load(module("a", Some(4))).unwrap();
    let mut budget = Budget { calls: 0 };
    let error = harness.instantiate(&a, Some(&mut budget)).unwrap_err();
    assert_eq!(budget.calls, 1, "the limiter is asked once: {error:#}");
    assert_eq!(fallback.fallbacks(), 0);
    assert!(error.is::<LimiterDenied>(), "{error:#}");
    let limit = error
        .downcast_ref::<LimitExceeded>()
        .expect("the limiter's own error");
    assert_eq!(limit.limit, "tenant_bytes");
    let stats = harness.allocator.stats();
    assert_eq!(
        (stats.live_instances, stats.live_memories, stats.live_tables),
        (0, 0, 0)
    );
    // The pool had room all along: the next instance without the limiter comes from it.
    let live = harness.instantiate(&a, None).unwrap();
    assert!(live.instance().memories().values().all(|(_, m)| m.is_static()));
}

#[test]
fn a_full_pool_without_a_secondary_that_accepts_is_the_pools_limit() {
    // On-demand with a limit of one memory behind a pool of one slot: the third instance has
    // nowhere to go, and the error is the secondary's typed limit.
    let limits = berth_on_demand::OnDemandLimits {
        total_memories: Some(1),
        ..Default::default()
    };
    let fallback = Fallback::new(pool(1), OnDemandInstanceAllocator::with_limits(limits));
    let harness = harness(fallback);
    let a = harness.load(module("a", Some(4))).unwrap();
    let _one = harness.instantiate(&a, None).unwrap();
    let _two = harness.instantiate(&a, None).unwrap();
    let error = harness.instantiate(&a, None).unwrap_err();
    assert!(error.chain().any(|e| e.is::<LimitExceeded>()), "{error:#}");
    assert_eq!(harness.allocator.stats().live_instances, 2);
}

fn by_name(
    backend: impl InstanceAllocatorImpl,
    limits: QuotaLimits,
) -> Quotas<impl InstanceAllocatorImpl, String> {
    Quotas::new(backend, limits, |request| {
        request.module.name().map(str::to_owned)
    })
}

fn quota_of(error: &anyhow::Error) -> &QuotaExceeded {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<QuotaExceeded>())
        .unwrap_or_else(|| panic!("not a quota: {error:#}"))
}

#[test]
fn each_group_is_held_to_its_quota_and_nothing_is_left_allocated_by_a_refusal() {
    let limits = QuotaLimits {
        instances: Some(2),
        ..QuotaLimits::default()
    };
    let quotas = Arc::new(by_name(OnDemandInstanceAllocator::new(), limits));
    let harness = Harness {
        allocator: quotas.clone(),
        tunables: tunables(),
    };
    let a = harness.load(module("a", Some(4))).unwrap();
    let b = harness.load(module("b", Some(4))).unwrap();
    let a1 = harness.instantiate(&a, None).unwrap();
    let _a2 = harness.instantiate(&a, None).unwrap();
    let error = harness.instantiate(&a, None).unwrap_err();
    let refused = quota_of(&error);
    assert_eq!(
        (refused.group.as_str(), refused.quota, refused.limit),
        ("\"a\"", "instances", 2)
    );
    // Group b has its own count; the refusal left nothing behind.
    let _b1 = harness.instantiate(&b, None).unwrap();
    let stats = harness.allocator.stats();
    assert_eq!(
        (stats.live_instances, stats.live_memories, stats.live_tables),
        (3, 3, 3)
    );
    assert_eq!(
        quotas.usage(&"a".to_owned()),
        QuotaUsage {
            instances: 2,
            memories: 2,
            tables: 2,
            memory_bytes: 2 * 4 * 65536
        }
    );
    drop(a1);
    let _a3 = harness
        .instantiate(&a, None)
        .expect("room again once one is gone");
    // A group's own limits replace the default for what it allocates next.
    quotas.set_limits(
        "b".to_owned(),
        QuotaLimits {
            tables: Some(1),
            ..QuotaLimits::default()
        },
    );
    let error = harness.instantiate(&b, None).unwrap_err();
    assert_eq!(quota_of(&error).quota, "tables");
    assert_eq!(
        quotas.usage(&"b".to_owned()).memories,
        1,
        "the refused instance's memory went back"
    );
}

#[test]
fn memory_bytes_count_what_memories_may_reach() {
    let limits = QuotaLimits {
        memory_bytes: Some(6 * 65536),
        ..QuotaLimits::default()
    };
    let quotas = Arc::new(by_name(pool(4), limits));
    let harness = Harness {
        allocator: quotas.clone(),
        tunables: tunables(),
    };
    // Each may reach 4 pages: one fits in 6, a second does not.
    let a = harness.load(module("a", Some(4))).unwrap();
    let _one = harness.instantiate(&a, None).unwrap();
    let error = harness.instantiate(&a, None).unwrap_err();
    let refused = quota_of(&error);
    assert_eq!((refused.quota, refused.requested), ("memory_bytes", 8 * 65536));
    // No declared maximum: the pool's 1 MiB cap counts.
    let unbounded = harness.load(module("c", None)).unwrap();
    let error = harness.instantiate(&unbounded, None).unwrap_err();
    assert_eq!(quota_of(&error).requested, 1 << 20);
    assert_eq!(harness.allocator.stats().live_memories, 1);
    // On demand, a 32-bit memory with no declared maximum may reach 4 GiB; a 64-bit one with
    // none and no cap may reach any size, and cannot be admitted under a byte quota.
    let on_demand = harness_of(by_name(OnDemandInstanceAllocator::new(), limits));
    let unbounded = on_demand.load(module("c", None)).unwrap();
    let error = on_demand.instantiate(&unbounded, None).unwrap_err();
    assert_eq!(quota_of(&error).requested, 4 << 30);
    let wide = Module::builder()
        .name("wide")
        .memory(MemoryType {
            memory64: true,
            ..MemoryType::new(1, None)
        })
        .build()
        .unwrap();
    let wide = on_demand.load(wide).unwrap();
    let error = on_demand.instantiate(&wide, None).unwrap_err();
    assert_eq!(quota_of(&error).requested, u64::MAX);
    assert!(format!("{error:#}").contains("no maximum"), "{error:#}");
    assert_eq!(on_demand.allocator.stats().live_memories, 0);
}

fn harness_of(allocator: impl InstanceAllocatorImpl + 'static) -> Harness {
    harness(allocator)
}

#[test]
fn groups_without_limits_of_their_own_are_forgotten_once_they_hold_nothing() {
    // A group per request: none may outlive what it holds.
    let counter = std::sync::atomic::AtomicU64::new(0);
    let quotas = Arc::new(Quotas::new(
        OnDemandInstanceAllocator::new(),
        QuotaLimits {
            instances: Some(1),
            ..QuotaLimits::default()
        },
        move |_| Some(counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
    ));
    let harness = Harness {
        allocator: quotas.clone(),
        tunables: tunables(),
    };
    let a = harness.load(module("a", Some(4))).unwrap();
    for _ in 0..100 {
        drop(harness.instantiate(&a, None).unwrap());
    }
    assert_eq!(quotas.groups(), 0);
    // A refusal leaves nothing either, and a group with limits of its own stays until they
    // are cleared and it holds nothing.
    let by_name = Arc::new(by_name(OnDemandInstanceAllocator::new(), QuotaLimits::default()));
    let harness = Harness {
        allocator: by_name.clone(),
        tunables: tunables(),
    };
    let b = harness.load(module("b", Some(4))).unwrap();
    by_name.set_limits(
        "b".to_owned(),
        QuotaLimits {
            instances: Some(0),
            ..QuotaLimits::default()
        },
    );
    assert_eq!(
        quota_of(&harness.instantiate(&b, None).unwrap_err()).quota,
        "instances"
    );
    assert_eq!(by_name.groups(), 1);
    by_name.clear_limits(&"b".to_owned());
    assert_eq!(by_name.groups(), 0);
    let live = harness.instantiate(&b, None).expect("the default limits again");
    assert_eq!(by_name.groups(), 1);
    drop(live);
    assert_eq!(by_name.groups(), 0);
}

#[test]
fn requests_in_no_group_are_not_limited() {
    let limits = QuotaLimits {
        instances: Some(0),
        ..QuotaLimits::default()
    };
    let harness = harness(by_name(OnDemandInstanceAllocator::new(), limits));
    let unnamed = Module::builder()
        .memory(MemoryType::new(1, None))
        .build()
        .unwrap();
    let unnamed = harness.load(unnamed).unwrap();
    let _live: Vec<_> = (0..3)
        .map(|_| harness.instantiate(&unnamed, None).unwrap())
        .collect();
    let named = harness.load(module("a", Some(1))).unwrap();
    assert_eq!(
        quota_of(&harness.instantiate(&named, None).unwrap_err()).quota,
        "instances"
    );
}
