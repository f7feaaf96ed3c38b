//! A failure at any memory or table of an instantiation gives everything back: the error
//! reaches the caller, nothing leaks, and the instance count is where it was.

use std::sync::Arc;

use anyhow::Result;
use berth_core::{
    AllocatorStats, Imports, InstanceAllocationRequest, InstanceAllocator, InstanceAllocatorImpl,
    LimitExceeded, MemoryType, Module, ResourceLimiter, TableType, Tunables, VMFunctionImport,
};
use berth_engine::{
    Config, Engine, Instance, InstanceAllocationStrategy, OnDemandInstanceAllocator, OnDemandLimits,
};
use berth_tests::{FailAt, FailingAllocator};

const MEMORIES: usize = 4;
const TABLES: usize = 3;

fn module() -> Module {
    let mut builder = Module::builder().name("many");
    for i in 0..MEMORIES {
        builder = builder.memory(MemoryType::new(i as u64 + 1, None));
    }
    for i in 0..TABLES {
        builder = builder.table(TableType::new(i as u64 * 5, None));
    }
    builder.build().unwrap()
}

/// What the stats say is live: instances, memories, tables, and the address space of live
/// memories (the backend also keeps freed memories' reservations, all of the default layout
/// here, for later ones).
fn live(stats: &AllocatorStats) -> (u64, u64, u64, u64) {
    let config = Config::new();
    let tunables = config.tunables();
    let kept = tunables.pre_guard_size() + tunables.memory_reservation + tunables.memory_guard_size;
    (
        stats.live_instances,
        stats.live_memories,
        stats.live_tables,
        stats.reserved_bytes - stats.warm_memory_slots * kept,
    )
}

fn check_failure_at(fail_at: FailAt) {
    let allocator = Arc::new(FailingAllocator::new(OnDemandInstanceAllocator::new(), fail_at));
    let mut config = Config::new();
    config.allocation_strategy(InstanceAllocationStrategy::Custom(allocator.clone()));
    let engine = Engine::new(&config).unwrap();
    let module = engine.load(module()).unwrap();

    // One instance stays live throughout so "back where it was" is not just "zero".
    let other = match fail_at {
        FailAt::Never => None,
        _ => Some(Instance::builder(&module).instantiate().ok()),
    };
    let before = engine.stats();
    let (memories_before, tables_before) = (allocator.live_memories(), allocator.live_tables());

    let result = Instance::new(&module);
    match fail_at {
        FailAt::Never => {
            let instance = result.expect("no failure injected");
            assert_eq!(engine.stats().live_memories, MEMORIES as u64);
            drop(instance);
        }
        FailAt::Memory(_) | FailAt::Table(_) => {
            let error = result.expect_err("the injected failure is reported");
            assert!(format!("{error:#}").contains("injected failure"), "{error:#}");
            assert_eq!(
                live(&engine.stats()),
                live(&before),
                "the backend's counts are back where they were"
            );
            assert_eq!(allocator.live_memories(), memories_before, "a memory leaked");
            assert_eq!(allocator.live_tables(), tables_before, "a table leaked");
        }
    }
    drop(other);
    assert_eq!(live(&engine.stats()), (0, 0, 0, 0));
    assert_eq!((allocator.live_memories(), allocator.live_tables()), (0, 0));
}

#[test]
fn a_failure_at_every_memory_rolls_back() {
    // The first instance takes memory calls 0..MEMORIES; the failing one comes after.
    for k in 0..MEMORIES {
        check_failure_at(FailAt::Memory(MEMORIES + k));
    }
}

#[test]
fn a_failure_at_every_table_rolls_back() {
    for k in 0..TABLES {
        check_failure_at(FailAt::Table(TABLES + k));
    }
}

#[test]
fn no_failure_no_leak() {
    check_failure_at(FailAt::Never);
}

struct DenySecond(usize);

impl ResourceLimiter for DenySecond {
    fn memory_growing(&mut self, _: usize, _: usize, _: Option<usize>) -> Result<bool> {
        self.0 += 1;
        Ok(self.0 != 2)
    }
    fn table_growing(&mut self, _: usize, _: usize, _: Option<usize>) -> Result<bool> {
        Ok(true)
    }
}

#[test]
fn a_limiter_denial_mid_instantiation_rolls_back() {
    let engine = Engine::new(&Config::new()).unwrap();
    let module = engine.load(module()).unwrap();
    let error = Instance::builder(&module)
        .limiter(DenySecond(0))
        .instantiate()
        .unwrap_err();
    assert!(
        error.chain().any(|e| e.is::<berth_core::LimiterDenied>()),
        "{error:#}"
    );
    assert!(
        format!("{error:#}").contains("memory 1"),
        "the error names the memory: {error:#}"
    );
    assert_eq!(live(&engine.stats()), (0, 0, 0, 0));
}

#[test]
fn backend_limits_are_typed_and_capacity_returns() {
    let limits = OnDemandLimits {
        total_core_instances: Some(2),
        total_memories: Some(6),
        ..Default::default()
    };
    let mut config = Config::new();
    config.allocation_strategy(InstanceAllocationStrategy::Custom(Arc::new(
        OnDemandInstanceAllocator::with_limits(limits),
    )));
    let engine = Engine::new(&config).unwrap();
    let module = engine
        .load(berth_tests::one_memory(MemoryType::new(1, None)))
        .unwrap();
    let first = Instance::new(&module).unwrap();
    let second = Instance::new(&module).unwrap();
    let error = Instance::new(&module).unwrap_err();
    let limit = error
        .chain()
        .find_map(|e| e.downcast_ref::<LimitExceeded>())
        .expect("typed limit error");
    assert_eq!((limit.limit, limit.value), ("total_core_instances", 2));
    drop(first);
    let third = Instance::new(&module).expect("capacity came back");
    drop((second, third));

    let too_many = Module::builder().name("seven").memory(MemoryType::new(0, None));
    let too_many = (0..6)
        .fold(too_many, |b, _| b.memory(MemoryType::new(0, None)))
        .build()
        .unwrap();
    let error = engine.load(too_many).unwrap_err();
    assert!(error.chain().any(|e| e.is::<LimitExceeded>()), "{error:#}");
    assert!(format!("{error:#}").contains("seven"), "{error:#}");
}

#[test]
fn a_bad_request_fails_before_anything_is_allocated() {
    let allocator = OnDemandInstanceAllocator::new();
    let module = Arc::new(
        Module::builder()
            .imported_funcs(1)
            .memory(MemoryType::new(1, None))
            .build()
            .unwrap(),
    );
    let offsets = berth_core::VMOffsets::new(berth_core::HostPtr, &module).unwrap();
    allocator.validate_module(&module, &offsets).unwrap();
    let tunables = Tunables::default();
    let resolver = |_| 1usize;
    let request = InstanceAllocationRequest {
        module: &module,
        offsets: &offsets,
        tunables: &tunables,
        imports: Imports::<'_> {
            functions: &[] as &[VMFunctionImport],
            ..Imports::default()
        },
        host_state: Box::new(()),
        limiter: None,
        func_resolver: &resolver,
    };
    // SAFETY: the module was validated by this allocator with these offsets.
    let error = unsafe { allocator.allocate_module(request) }.unwrap_err();
    assert!(
        error.to_string().contains("imports 1 function but 0 were given"),
        "{error}"
    );
    assert_eq!(allocator.stats().live_instances, 0);
}
