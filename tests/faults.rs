//! Bytes past a memory's current size, its guard and its pre-guard fault. Each access runs in
//! a child process (this test binary re-run), so the test survives the signal; a control
//! access in bounds must not fault, so a test cannot pass by crashing for another reason.

use berth_core::MemoryType;
use std::sync::Arc;

use berth_engine::{
    Config, Engine, Instance, InstanceAllocationStrategy, LoadedModule, OnDemandInstanceAllocator,
    PoolingConfig,
};
use berth_tests::{ChildEnd, in_child, touch};

const PAGE: usize = 65536;

fn instance(config: &Config, ty: MemoryType) -> Instance {
    let engine = Engine::new(config).unwrap();
    let module = engine.load(berth_tests::one_memory(ty)).unwrap();
    Instance::new(&module).unwrap()
}

/// A module with one memory of `pages` pages, loaded into `engine`.
fn memory_module(engine: &Engine, pages: u64) -> LoadedModule {
    engine
        .load(berth_tests::one_memory(MemoryType::new(pages, None)))
        .unwrap()
}

/// Base and size of memory 0.
fn memory0(instance: &Instance) -> (*const u8, usize) {
    let definition = instance
        .core()
        .vmmemory_definition(berth_core::DefinedMemoryIndex::from_u32(0))
        .unwrap();
    (definition.base.cast_const(), definition.current_length)
}

#[test]
fn the_last_byte_is_readable() {
    let end = in_child(|| {
        let instance = instance(&Config::new(), MemoryType::new(1, None));
        let (base, size) = memory0(&instance);
        // SAFETY: in a child; this byte is in bounds.
        unsafe { touch(base.add(size - 1)) };
    });
    assert_eq!(end, ChildEnd::Finished);
}

#[test]
fn the_byte_past_the_current_size_faults() {
    let end = in_child(|| {
        let instance = instance(&Config::new(), MemoryType::new(1, None));
        let (base, size) = memory0(&instance);
        // SAFETY: in a child; a fault is the expected outcome.
        unsafe { touch(base.add(size)) };
    });
    assert_eq!(end, ChildEnd::Faulted);
}

#[test]
fn after_a_grow_the_new_end_faults_and_the_old_end_does_not() {
    let end = in_child(|| {
        let mut instance = instance(&Config::new(), MemoryType::new(1, None));
        assert_eq!(instance.memory_grow(0, 2).unwrap(), Some(1));
        let (base, size) = memory0(&instance);
        assert_eq!(size, 3 * PAGE);
        // SAFETY: in a child; the old end is now in bounds.
        unsafe { touch(base.add(PAGE)) };
        // SAFETY: in a child; a fault is the expected outcome.
        unsafe { touch(base.add(size)) };
    });
    assert_eq!(end, ChildEnd::Faulted);
}

#[test]
fn in_a_reused_reservation_the_bytes_past_the_new_size_fault() {
    let end = in_child(|| {
        let engine = Engine::new(&Config::new()).unwrap();
        let load = |pages| memory_module(&engine, pages);
        let mut grown = Instance::new(&load(1)).unwrap();
        assert_eq!(grown.memory_grow(0, 3).unwrap(), Some(1));
        let (old_base, _) = memory0(&grown);
        drop(grown);
        let next = Instance::new(&load(2)).unwrap();
        let (base, size) = memory0(&next);
        assert_eq!((base, size), (old_base, 2 * PAGE), "the reservation is reused");
        // SAFETY: in a child; the last byte is in bounds.
        unsafe { touch(base.add(size - 1)) };
        // SAFETY: in a child; a fault is the expected outcome (the last tenant's third page).
        unsafe { touch(base.add(size)) };
    });
    assert_eq!(end, ChildEnd::Faulted);
}

#[test]
fn in_a_pool_slot_pushed_out_of_the_warm_set_the_bytes_past_the_next_size_fault() {
    let end = in_child(|| {
        let mut pooling = PoolingConfig::new();
        // No warm slots: a slot given back turns cold at once, keeping its accessible size.
        pooling
            .total_memories(1)
            .max_memory_size(1 << 20)
            .max_unused_warm_slots(0)
            .decommit_batch_size(1);
        let mut config = Config::new();
        config
            .memory_reservation(1 << 20)
            .memory_reservation_for_growth(0)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = Engine::new(&config).unwrap();
        let load = |pages| memory_module(&engine, pages);
        let (wide, narrow) = (load(3), load(1));
        let (old_base, _) = memory0(&Instance::new(&wide).unwrap());
        assert_eq!(engine.stats().warm_memory_slots, 0);
        let next = Instance::new(&narrow).unwrap();
        let (base, size) = memory0(&next);
        assert_eq!((base, size), (old_base, PAGE), "the one slot is reused");
        // SAFETY: in a child; the last byte is in bounds.
        unsafe { touch(base.add(size - 1)) };
        // SAFETY: in a child; a fault is the expected outcome (the last tenant's second page).
        unsafe { touch(base.add(size)) };
    });
    assert_eq!(end, ChildEnd::Faulted);
}

#[test]
fn after_a_move_the_new_end_faults() {
    let end = in_child(|| {
        let mut config = Config::new();
        config
            .memory_reservation(PAGE as u64)
            .memory_reservation_for_growth(0)
            .memory_guard_size(PAGE as u64);
        let mut instance = instance(&config, MemoryType::new(1, None));
        let (old_base, _) = memory0(&instance);
        assert_eq!(instance.memory_grow(0, 1).unwrap(), Some(1));
        let (base, size) = memory0(&instance);
        assert_ne!(base, old_base, "the memory moved");
        // SAFETY: in a child; in bounds.
        unsafe { touch(base.add(size - 1)) };
        // SAFETY: in a child; a fault is the expected outcome.
        unsafe { touch(base.add(size)) };
    });
    assert_eq!(end, ChildEnd::Faulted);
}

#[test]
fn the_guard_faults() {
    let end = in_child(|| {
        let mut config = Config::new();
        config
            .memory_reservation(4 * PAGE as u64)
            .memory_guard_size(2 * PAGE as u64);
        let instance = instance(&config, MemoryType::new(4, None));
        let (base, size) = memory0(&instance);
        assert_eq!(size, 4 * PAGE, "the memory fills its reservation");
        // SAFETY: in a child; a fault is the expected outcome (the guard's last byte).
        unsafe { touch(base.add(6 * PAGE - 1)) };
    });
    assert_eq!(end, ChildEnd::Faulted);
}

#[test]
fn the_pre_guard_faults() {
    let end = in_child(|| {
        let mut config = Config::new();
        config
            .guard_before_linear_memory(true)
            .memory_guard_size(PAGE as u64);
        let instance = instance(&config, MemoryType::new(1, None));
        let (base, _) = memory0(&instance);
        // SAFETY: in a child; a fault is the expected outcome.
        unsafe { touch(base.wrapping_sub(1)) };
    });
    assert_eq!(end, ChildEnd::Faulted);
}

#[test]
fn a_dropped_instance_memory_is_gone_without_cached_reservations() {
    let end = in_child(|| {
        let mut config = Config::new();
        let allocator = OnDemandInstanceAllocator::new().with_cached_reservations(0);
        config.allocation_strategy(InstanceAllocationStrategy::Custom(Arc::new(allocator)));
        let instance = instance(&config, MemoryType::new(1, None));
        let (base, _) = memory0(&instance);
        drop(instance);
        // SAFETY: in a child; a fault is the expected outcome (the reservation was unmapped).
        unsafe { touch(base) };
    });
    assert_eq!(end, ChildEnd::Faulted);
}

#[test]
fn a_dropped_instance_memory_kept_for_reuse_holds_none_of_its_bytes() {
    // The default engine keeps a freed memory's address space for the next memory; its pages
    // are given back when the instance goes, not when the next one comes.
    let engine = Engine::new(&Config::new()).unwrap();
    let module = engine
        .load(berth_tests::one_memory(MemoryType::new(2, None)))
        .unwrap();
    let mut instance = Instance::new(&module).unwrap();
    let ones = vec![0xa5; 2 * PAGE];
    instance.memory_write(0, 0, &ones).unwrap();
    let (base, size) = memory0(&instance);
    drop(instance);
    assert_eq!(engine.stats().warm_memory_slots, 1);
    // SAFETY: the reservation is kept by the engine's allocator, which is alive and idle, so
    // its first `size` bytes are still mapped readable; nothing writes them while we read.
    let left = unsafe { std::slice::from_raw_parts(base, size) };
    assert!(
        left.iter().all(|&b| b == 0),
        "a freed memory's bytes were not discarded"
    );
    let next = Instance::new(&module).unwrap();
    assert_eq!(memory0(&next).0, base, "the next memory reuses the reservation");
}
