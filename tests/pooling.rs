//! The pooling backend beyond the shared suite: two threads hammering one pool, slot
//! affinity, the reset policy's costs, and errors that name their limit. (Failed resets and
//! decommits, which need failures injected, are tested inside the crate.)

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use berth_core::{GlobalInit, GlobalType, LimitExceeded, MemoryType, Module, TableType, ValType};
use berth_engine::{
    Config, Engine, Instance, InstanceAllocationStrategy, PoolingConfig, PoolingInstanceAllocator,
};
use berth_tests::memory_base;

const PAGE: usize = 65536;

fn small_config() -> Config {
    let mut config = Config::new();
    config
        .memory_reservation(1 << 20)
        .memory_guard_size(PAGE as u64)
        .memory_reservation_for_growth(0);
    config
}

fn pool(pooling: &PoolingConfig) -> (Engine, Arc<PoolingInstanceAllocator>) {
    let mut config = small_config();
    let allocator = Arc::new(PoolingInstanceAllocator::new(pooling, config.tunables()).unwrap());
    config.allocation_strategy(InstanceAllocationStrategy::Custom(allocator.clone()));
    (Engine::new(&config).unwrap(), allocator)
}

/// A pool of `n` memory and table slots of 1 MiB and 16 elements.
fn slots(n: u32) -> PoolingConfig {
    let mut pooling = PoolingConfig::new();
    pooling
        .total_memories(n)
        .total_tables(n)
        .max_memory_size(1 << 20)
        .table_elements(16);
    pooling
}

fn module(name: &str, pages: u64) -> Module {
    Module::builder()
        .name(name)
        .memory(MemoryType::new(pages, Some(8)))
        .table(TableType::new(4, Some(16)))
        .build()
        .unwrap()
}

#[test]
fn two_threads_never_share_a_slot_and_leave_nothing_behind() {
    let mut pooling = PoolingConfig::new();
    pooling
        .total_core_instances(8)
        .total_memories(8)
        .total_tables(8)
        .max_memory_size(1 << 20)
        .table_elements(16);
    pooling.max_unused_warm_slots(3).decommit_batch_size(2);
    let (engine, _) = pool(&pooling);
    let modules = [
        engine.load(module("a", 1)).unwrap(),
        engine.load(module("b", 2)).unwrap(),
    ];
    let owners: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let threads: Vec<_> = (0..2u8)
        .map(|t| {
            let (modules, owners) = (modules.clone(), owners.clone());
            std::thread::spawn(move || {
                for i in 0..1500u32 {
                    let mut instance = Instance::new(&modules[(i % 2) as usize]).unwrap();
                    let slot = memory_base(&instance);
                    assert!(
                        owners.lock().unwrap().insert(slot),
                        "slot {slot:#x} handed out twice"
                    );
                    let mut first = [0xffu8; 8];
                    instance.memory_read(0, 0, &mut first).unwrap();
                    assert_eq!(first, [0; 8], "a previous tenant's bytes are visible");
                    assert_eq!(instance.table_get(0, 3).unwrap(), 0);
                    instance.memory_write(0, 0, &[t + 1; 8]).unwrap();
                    if i % 7 == 0 {
                        instance.memory_grow(0, 1).unwrap();
                        let end = instance.memory_size(0).unwrap() as u64 - 8;
                        instance.memory_write(0, end, &[t + 1; 8]).unwrap();
                    }
                    instance.table_set(0, 3, 42).unwrap();
                    assert!(owners.lock().unwrap().remove(&slot));
                    drop(instance);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let stats = engine.stats();
    assert_eq!(
        (stats.live_instances, stats.live_memories, stats.live_tables),
        (0, 0, 0)
    );
    assert!(stats.warm_memory_slots <= 3);
    assert!(
        stats.resets() >= 5998,
        "every memory and table was reset: {}",
        stats.resets()
    );
}

#[test]
fn a_module_gets_its_own_slot_back_and_others_take_cold_ones() {
    let pooling = slots(4);
    let (engine, _) = pool(&pooling);
    let a = engine.load(module("a", 1)).unwrap();
    let b = engine.load(module("b", 1)).unwrap();
    let slot_a = memory_base(&Instance::new(&a).unwrap());
    let slot_b = memory_base(&Instance::new(&b).unwrap());
    assert_ne!(slot_a, slot_b, "b took a cold slot rather than a's warm one");
    assert_eq!(
        memory_base(&Instance::new(&a).unwrap()),
        slot_a,
        "a got its warm slot back"
    );
    assert_eq!(memory_base(&Instance::new(&b).unwrap()), slot_b);
    assert_eq!(engine.stats().warm_memory_slots, 2);
}

#[test]
fn a_module_whose_slot_waits_for_a_decommit_batch_gets_it_back_rather_than_steal() {
    // Every slot warm for `b` but `a`'s, which waits in the decommit queue (its tenant wrote
    // above keep_resident 0). `a` must get its own slot back (the queue runs early), not take
    // one of `b`'s, which would cost `b` its warm slot and `a` a slot set up again.
    let n = 64;
    let mut pooling = slots(n);
    pooling
        .max_unused_warm_slots(1000)
        .decommit_batch_size(16)
        .linear_memory_keep_resident(0);
    let (engine, _) = pool(&pooling);
    let a = engine.load(module("a", 1)).unwrap();
    let b = engine.load(module("b", 1)).unwrap();
    let mut first = Instance::new(&a).unwrap();
    first.memory_write(0, 0, &[7; 8]).unwrap();
    let slot_a = memory_base(&first);
    let others: Vec<Instance> = (1..n).map(|_| Instance::new(&b).unwrap()).collect();
    drop(first);
    drop(others);
    let again = Instance::new(&a).unwrap();
    assert_eq!(memory_base(&again), slot_a, "a took another module's warm slot");
    let mut buf = [1u8; 8];
    again.memory_read(0, 0, &mut buf).unwrap();
    assert_eq!(
        buf, [0; 8],
        "the queued decommit ran before the slot was handed out"
    );
}

#[test]
fn a_new_slot_inherits_what_scans_learned_about_its_module() {
    // Scans of a memory whose tenants write nothing stop after a few resets (the slot is then
    // decommitted blindly, one decommit per reset). A slot new to that memory starts blind too,
    // instead of scanning again from scratch.
    if berth_testkit::page_states::page_map_for("inherited scan habits").is_none() {
        return;
    }
    let mut pooling = slots(8);
    pooling.decommit_batch_size(1).linear_memory_keep_resident(0);
    let (engine, _) = pool(&pooling);
    let a = engine.load(module("a", 1)).unwrap();
    for _ in 0..8 {
        drop(Instance::new(&a).unwrap());
    }
    let before = engine.stats().decommit_ranges;
    drop(Instance::new(&a).unwrap());
    assert_eq!(
        engine.stats().decommit_ranges,
        before + 1,
        "the warm slot resets blindly"
    );
    // Two at once: the second takes a slot `a` never used.
    let first = Instance::new(&a).unwrap();
    let second = Instance::new(&a).unwrap();
    assert_ne!(memory_base(&first), memory_base(&second));
    let before = engine.stats().decommit_ranges;
    drop(second);
    assert_eq!(
        engine.stats().decommit_ranges,
        before + 1,
        "the new slot scanned instead of decommitting blindly"
    );
    drop(first);
}

#[test]
fn keep_resident_resets_by_memset_without_decommits() {
    let mut pooling = slots(2);
    pooling
        .linear_memory_keep_resident(PAGE)
        .table_keep_resident(4096);
    let (engine, allocator) = pool(&pooling);
    let a = engine.load(module("a", 1)).unwrap();
    for round in 0..5u8 {
        let mut instance = Instance::new(&a).unwrap();
        let mut buf = [1u8; 64];
        instance.memory_read(0, PAGE as u64 - 64, &mut buf).unwrap();
        assert_eq!(
            buf, [0; 64],
            "round {round}: the previous tenant's bytes are visible"
        );
        instance
            .memory_write(0, PAGE as u64 - 64, &[round + 1; 64])
            .unwrap();
    }
    let stats = engine.stats();
    assert_eq!(
        (stats.memory_resets, stats.table_resets),
        (5, 5),
        "five memory and five table resets"
    );
    assert_eq!(
        (stats.decommit_calls, stats.decommit_ranges),
        (0, 0),
        "a tenant that stayed within keep_resident costs no madvise"
    );
    assert_eq!((stats.warm_memory_slots, stats.warm_table_slots), (1, 1));
    assert_eq!(
        (stats.idle_memory_resident_bytes, stats.idle_table_resident_bytes),
        (4096, 4096)
    );
    // The tenants wrote one page near the end of the first 64 KiB: that page alone stays
    // resident (kept pages are the ones tenants write, wherever they lie), and the table's
    // first page.
    assert_eq!(stats.idle_resident_bytes(), (4096 + 4096) as u64);

    // A tenant that writes past keep_resident has what is not kept given back (after five
    // resets that found nothing new, the slot's resets decommit what is not kept without
    // asking, in a batch), and its growth is undone. The module's next tenant finds its slot
    // waiting for the batch and runs it early.
    let mut instance = Instance::new(&a).unwrap();
    let slot = memory_base(&instance);
    instance.memory_grow(0, 2).unwrap();
    instance.memory_write(0, PAGE as u64, &vec![9; 2 * PAGE]).unwrap();
    drop(instance);
    let instance = Instance::new(&a).unwrap();
    let stats = engine.stats();
    assert!(stats.decommit_ranges >= 1, "given back before the slot is reused");
    assert!(
        (1..=stats.decommit_ranges).contains(&stats.decommit_calls),
        "at least one call, and no more calls than ranges: {stats:?}"
    );
    assert!(!allocator.flush_decommits(), "nothing left queued");
    assert_eq!(memory_base(&instance), slot, "the warm slot again");
    assert_eq!(instance.memory_size(0).unwrap(), PAGE);
    let mut grown = Instance::new(&a).unwrap();
    grown.memory_grow(0, 2).unwrap();
    let mut bytes = vec![1u8; 3 * PAGE];
    grown.memory_read(0, 0, &mut bytes).unwrap();
    assert!(
        bytes.iter().all(|&b| b == 0),
        "kept pages past the initial size were reset"
    );
}

#[test]
fn exhaustion_and_oversized_modules_name_their_limit() {
    let mut pooling = PoolingConfig::new();
    pooling
        .total_core_instances(2)
        .total_memories(2)
        .total_tables(2)
        .max_memory_size(2 * PAGE)
        .table_elements(8);
    pooling.max_core_instance_size(256);
    let (engine, _) = pool(&pooling);
    let a = engine.load(module("a", 1)).unwrap();
    let live = [Instance::new(&a).unwrap(), Instance::new(&a).unwrap()];
    let error = Instance::new(&a).unwrap_err();
    let limit = error
        .chain()
        .find_map(|e| e.downcast_ref::<LimitExceeded>())
        .expect("typed");
    assert_eq!((limit.limit, limit.value), ("total_core_instances", 2));
    drop(live);

    let error = engine.load(module("big", 3)).unwrap_err();
    let limit = error
        .chain()
        .find_map(|e| e.downcast_ref::<LimitExceeded>())
        .expect("typed");
    assert_eq!(
        (limit.limit, limit.value, limit.requested),
        ("max_memory_size", 2 * PAGE as u64, 3 * PAGE as u64)
    );
    assert!(format!("{error:#}").contains("big"), "{error:#}");

    let globals = (0..40).fold(Module::builder().name("globals"), |b, i| {
        b.global(
            GlobalType {
                content: ValType::I64,
                mutable: true,
            },
            GlobalInit::I64(i),
        )
    });
    let error = engine.load(globals.build().unwrap()).unwrap_err();
    let limit = error
        .chain()
        .find_map(|e| e.downcast_ref::<LimitExceeded>())
        .expect("typed");
    assert_eq!(limit.limit, "max_core_instance_size");
    // The context says where the bytes go.
    assert!(
        format!("{error:#}").contains("defined globals 40 x 16"),
        "{error:#}"
    );

    let two = Module::builder()
        .name("two")
        .memory(MemoryType::new(0, None))
        .memory(MemoryType::new(0, None));
    let error = engine.load(two.build().unwrap()).unwrap_err();
    let limit = error
        .chain()
        .find_map(|e| e.downcast_ref::<LimitExceeded>())
        .expect("typed");
    assert_eq!(
        (limit.limit, limit.value, limit.requested),
        ("max_memories_per_module", 1, 2)
    );
}

#[test]
fn dropping_a_module_purges_its_warm_slots() {
    let mut pooling = slots(4);
    pooling.linear_memory_keep_resident(PAGE).table_keep_resident(0);
    let (engine, _) = pool(&pooling);
    let a = engine.load(module("a", 1)).unwrap();
    let mut instance = Instance::new(&a).unwrap();
    instance.memory_write(0, 0, &[1; 8192]).unwrap();
    drop(instance);
    assert_eq!(engine.stats().warm_memory_slots, 1);
    assert_eq!(
        engine.stats().idle_resident_bytes(),
        8192,
        "the two written pages stay resident"
    );
    drop(a);
    assert_eq!(
        engine.stats().warm_memory_slots,
        0,
        "the module's warm slot was purged"
    );
    assert_eq!(
        engine.stats().idle_resident_bytes(),
        0,
        "and its resident pages given back"
    );
}

#[test]
fn the_pooling_strategy_is_built_from_the_config() {
    let mut config = small_config();
    let pooling = slots(2);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    let engine = Engine::new(&config).unwrap();
    assert_eq!(engine.strategy_name(), "pooling");
    let a = engine.load(module("a", 1)).unwrap();
    let mut instance = Instance::new(&a).unwrap();
    assert_eq!(instance.memory_grow(0, 20).unwrap(), None, "past max_memory_size");
    assert_eq!(instance.memory_grow(0, 7).unwrap(), Some(1));
    assert_eq!(
        engine.stats().reserved_bytes,
        2 * ((1 << 20) + PAGE as u64) + 2 * 4096
    );

    let mut absurd = PoolingConfig::new();
    absurd.total_memories(u32::MAX).max_memory_size(1 << 40);
    let mut config = small_config();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(absurd));
    let error = format!("{:#}", Engine::new(&config).unwrap_err());
    assert!(
        error.contains("failed to reserve") || error.contains("overflows"),
        "{error}"
    );
}

#[test]
fn sizes_are_whole_host_pages_or_an_error_never_rounded_to_nothing() {
    // A growth limit that is not whole host pages is an error naming the nearest two.
    let mut odd = slots(2);
    odd.max_memory_size((1 << 20) + 1);
    let mut config = small_config();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(odd));
    let error = format!("{:#}", Engine::new(&config).unwrap_err());
    assert!(
        error.contains("max_memory_size of 1.0 MiB (1048577 bytes) is not a whole number of"),
        "{error}"
    );
    // A keep bound that is not whole pages keeps the pages that cover it (as Wasmtime rounds
    // it), never none; one past the slot keeps the whole slot.
    let host = berth_core::sys::page_size();
    let mut keep = slots(2);
    keep.table_elements(4 * host)
        .linear_memory_keep_resident(1)
        .table_keep_resident(host + 1);
    let layout = berth_pooling::PoolLayout::new(&keep, &berth_core::Tunables::default()).unwrap();
    assert_eq!(
        (layout.memory_keep_resident, layout.table_keep_resident),
        (host, 2 * host)
    );
    keep.linear_memory_keep_resident(usize::MAX)
        .table_keep_resident(usize::MAX);
    let layout = berth_pooling::PoolLayout::new(&keep, &berth_core::Tunables::default()).unwrap();
    assert_eq!(
        (layout.memory_keep_resident, layout.table_keep_resident),
        (layout.memory_capacity, layout.table_stride)
    );
}

#[test]
fn a_decommit_batch_of_any_size_builds_a_pool_that_resets() {
    for batch in [1, 1 << 40, usize::MAX] {
        let mut pooling = slots(2);
        pooling.decommit_batch_size(batch);
        let (engine, _) = pool(&pooling);
        let a = engine.load(module("a", 1)).unwrap();
        for _ in 0..20 {
            let mut instance = Instance::new(&a).unwrap();
            let mut byte = [1u8];
            instance.memory_read(0, 100, &mut byte).unwrap();
            assert_eq!(byte, [0], "batch of {batch}: a tenant's byte reached the next");
            instance.memory_write(0, 100, &[7]).unwrap();
        }
    }
}

#[test]
fn pools_without_table_elements_still_serve_empty_tables() {
    let mut pooling = slots(2);
    pooling.table_elements(0);
    let (engine, _) = pool(&pooling);
    let module = engine
        .load(Module::builder().table(TableType::new(0, None)).build().unwrap())
        .unwrap();
    let mut instance = Instance::new(&module).unwrap();
    assert_eq!(instance.table_grow(0, 1, 0).unwrap(), None);
}

#[test]
fn the_instance_limit_stays_exact_when_instances_are_dropped_on_another_thread() {
    // Each shard counts a share of the limit; instances made on one thread and dropped on
    // another move counts between shards, never the sum.
    let mut pooling = slots(8);
    pooling.total_core_instances(5);
    let (engine, _) = pool(&pooling);
    let a = engine.load(module("a", 1)).unwrap();
    for _ in 0..3 {
        let made: Vec<Instance> = (0..5).map(|_| Instance::new(&a).unwrap()).collect();
        let error = Instance::new(&a).expect_err("a sixth instance is over the limit");
        let limit = error
            .downcast_ref::<LimitExceeded>()
            .expect("a typed limit error");
        assert_eq!((limit.limit, limit.value), ("total_core_instances", 5));
        assert_eq!(engine.stats().live_instances, 5);
        std::thread::scope(|s| {
            s.spawn(move || drop(made));
        });
        assert_eq!(engine.stats().live_instances, 0);
    }
    // Made on other threads, dropped here: the limit still holds at five.
    let made: Vec<Instance> = std::thread::scope(|s| {
        (0..5)
            .map(|_| s.spawn(|| Instance::new(&a).unwrap()))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    });
    assert!(Instance::new(&a).is_err(), "the limit holds across threads");
    drop(made);
    let again: Vec<Instance> = (0..5).map(|_| Instance::new(&a).unwrap()).collect();
    assert_eq!(engine.stats().live_instances, 5);
    drop(again);
}

#[test]
fn one_thread_keeps_the_whole_warm_cap_whatever_the_shards() {
    // The cap is the pool's, not a shard's: a thread working alone may keep all of it warm.
    let mut pooling = slots(16);
    pooling.max_unused_warm_slots(4).decommit_batch_size(1);
    let (engine, _) = pool(&pooling);
    let modules: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|name| engine.load(module(name, 1)).unwrap())
        .collect();
    let bases: Vec<usize> = modules
        .iter()
        .map(|m| memory_base(&Instance::new(m).unwrap()))
        .collect();
    assert_eq!(engine.stats().warm_memory_slots, 4);
    for (m, base) in modules.iter().zip(&bases) {
        assert_eq!(
            memory_base(&Instance::new(m).unwrap()),
            *base,
            "a module lost its warm slot"
        );
    }
}

#[test]
fn idle_slots_keep_at_most_the_byte_cap_and_slots_that_keep_nothing_stay_warm() {
    // Warm slots may be many; the pages they keep may not. Each tenant of a to d writes 8 KiB,
    // with room for 20 KiB in all: the least recently used writers give theirs back (and go
    // cold), the bytes kept never pass the cap, and modules whose tenants write nothing keep
    // their slots, older as they are (pushing them out would free nothing).
    let mut pooling = slots(16);
    pooling
        .max_unused_warm_slots(16)
        .max_unused_warm_bytes(20 << 10)
        .linear_memory_keep_resident(PAGE)
        .table_keep_resident(0)
        .decommit_batch_size(1);
    let (engine, _) = pool(&pooling);
    let load = |name| engine.load(module(name, 1)).unwrap();
    let idle: Vec<_> = ["i1", "i2", "i3"].into_iter().map(load).collect();
    let idle_bases: Vec<usize> = idle
        .iter()
        .map(|m| memory_base(&Instance::new(m).unwrap()))
        .collect();
    let writers: Vec<_> = ["a", "b", "c", "d"].into_iter().map(load).collect();
    let mut bases = Vec::new();
    for m in &writers {
        let mut instance = Instance::new(m).unwrap();
        instance.memory_write(0, 0, &[7; 8192]).unwrap();
        bases.push(memory_base(&instance));
        drop(instance);
        let kept = engine.stats().idle_resident_bytes();
        assert!(kept <= 20 << 10, "idle slots keep {kept} bytes");
    }
    let stats = engine.stats();
    assert_eq!(
        stats.idle_resident_bytes(),
        16 << 10,
        "the two most recent writers keep their pages"
    );
    assert_eq!(stats.warm_memory_slots, 5, "three idle modules and two writers");
    for (m, base) in idle.iter().zip(&idle_bases) {
        assert_eq!(
            memory_base(&Instance::new(m).unwrap()),
            *base,
            "a slot that keeps nothing lost its place"
        );
    }
    for (m, base) in writers.iter().zip(&bases).skip(2) {
        assert_eq!(memory_base(&Instance::new(m).unwrap()), *base);
    }
    // The writers pushed out read zeros where their pages were.
    let instance = Instance::new(&writers[0]).unwrap();
    let mut buf = [1u8; 8192];
    instance.memory_read(0, 0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "a pushed-out slot shows its old tenant's bytes"
    );
}

#[test]
fn a_thread_gets_its_share_of_the_warm_cap_back_from_one_that_kept_it_all() {
    let mut pooling = slots(16);
    pooling.max_unused_warm_slots(4).decommit_batch_size(1);
    let (engine, _) = pool(&pooling);
    let load = |name| engine.load(module(name, 1)).unwrap();
    let first: Vec<_> = ["a", "b", "c", "d"].into_iter().map(load).collect();
    let bases: Vec<usize> = std::thread::scope(|s| {
        s.spawn(|| {
            first
                .iter()
                .map(|m| memory_base(&Instance::new(m).unwrap()))
                .collect()
        })
        .join()
        .unwrap()
    });
    let second = [load("e"), load("f")];
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..3 {
                for m in &second {
                    drop(Instance::new(m).unwrap());
                }
            }
        });
    });
    assert_eq!(
        engine.stats().warm_memory_slots,
        4,
        "the cap holds across threads"
    );
    // The least recently used slots (a's and b's) made room; c and d kept theirs.
    for (m, base) in first.iter().zip(&bases).skip(2) {
        assert_eq!(memory_base(&Instance::new(m).unwrap()), *base);
    }
}

#[test]
fn a_slot_pushed_out_of_the_warm_set_shows_nothing_to_its_next_tenant() {
    // No warm slots: every slot turns cold when given back, keeping its accessible size but
    // none of its resident pages.
    let mut pooling = slots(4);
    pooling
        .max_unused_warm_slots(0)
        .linear_memory_keep_resident(PAGE)
        .table_keep_resident(0)
        .decommit_batch_size(1);
    let (engine, _) = pool(&pooling);
    let a = engine.load(module("a", 2)).unwrap();
    let b = engine.load(module("b", 1)).unwrap();
    let mut first = Instance::new(&a).unwrap();
    let base = memory_base(&first);
    first.memory_write(0, 0, &[7; 2 * PAGE]).unwrap();
    drop(first);
    assert_eq!(engine.stats().warm_memory_slots, 0);
    assert_eq!(
        engine.stats().idle_resident_bytes(),
        0,
        "the cold slot keeps no page"
    );
    let next = Instance::new(&b).unwrap();
    assert_eq!(memory_base(&next), base, "the cold slot is reused");
    assert_eq!(next.memory_size(0).unwrap(), PAGE);
    let mut bytes = vec![1u8; PAGE];
    next.memory_read(0, 0, &mut bytes).unwrap();
    assert!(
        bytes.iter().all(|&b| b == 0),
        "a byte of the last tenant is visible"
    );
}

#[test]
fn an_absurd_but_valid_pool_is_an_error_that_names_the_knob() {
    // 4 KiB slots and a 4 KiB reservation: the address space (16 TiB) can be reserved, the
    // bookkeeping for 4 294 967 295 slots cannot be had; that is an error, not an abort. The
    // same for tables.
    for guard in [0, 4096] {
        for (knob, memories, tables) in [("total_memories", u32::MAX, 1), ("total_tables", 1, u32::MAX)] {
            let mut config = Config::new();
            config
                .memory_reservation(4096)
                .memory_guard_size(guard)
                .memory_reservation_for_growth(0);
            let mut pooling = PoolingConfig::new();
            pooling
                .total_memories(memories)
                .total_tables(tables)
                .max_memory_size(4096)
                .table_elements(16);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
            let error = Engine::new(&config).unwrap_err();
            let limit = error
                .chain()
                .find_map(|e| e.downcast_ref::<berth_engine::MachineLimit>())
                .unwrap_or_else(|| panic!("not a MachineLimit: {error:#}"));
            assert_eq!(
                (limit.knob, limit.resource, limit.fatal),
                (knob, "physical memory", true)
            );
        }
    }
}

#[test]
fn a_pool_this_process_cannot_reserve_is_a_machine_limit_naming_the_knob() {
    // 200 000 slots of 6 GiB: 1.1 PiB in one piece, more than any x86-64 or AArch64 process
    // can reserve without asking for high addresses. The preflight measures what this process
    // can have and refuses before reserving anything.
    let mut pooling = PoolingConfig::new();
    pooling.total_memories(200_000).total_tables(1);
    let preflight = berth_engine::preflight(&pooling, Config::new().tunables()).unwrap();
    let fatal = preflight.fatal().expect("the memory pool cannot be reserved");
    assert_eq!((fatal.resource, fatal.knob), ("address space", "total_memories"));
    assert!(fatal.needed > fatal.available && fatal.available == preflight.machine.largest_reservation);
    assert!(preflight.machine.largest_reservation > 0);
    let mut config = Config::new();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    let error = Engine::new(&config).unwrap_err();
    let limit = error
        .chain()
        .find_map(|e| e.downcast_ref::<berth_engine::MachineLimit>())
        .unwrap_or_else(|| panic!("not a MachineLimit: {error:#}"));
    assert_eq!(limit.knob, "total_memories");
    let text = format!("{error:#}");
    assert!(
        text.contains("can reserve at most") && !text.contains("0x"),
        "{text}"
    );

    // What the preflight says can be reserved, can.
    let mut fits = PoolingConfig::new();
    fits.total_memories(4).total_tables(4).max_memory_size(1 << 20);
    let preflight = berth_engine::preflight(&fits, small_config().tunables()).unwrap();
    assert!(preflight.fatal().is_none(), "{:?}", preflight.findings);
    assert!(berth_core::sys::can_reserve(preflight.layout.memory_pool_bytes));
}

#[test]
fn pages_a_slot_kept_for_another_module_stay_resident_only_as_pages_it_keeps() {
    // A slot taken by another module keeps the pages it kept for the first where the new
    // memory can reach them (they read as zeros); the new tenant's reset accounts for them,
    // and those past the new memory's initial size go back at once. Whatever happens, what
    // stays resident in an idle slot is what the pool says it keeps.
    let Some(map) = berth_testkit::page_states::page_map_for("kept pages across modules") else {
        return;
    };
    let mut pooling = slots(1);
    pooling.max_unused_warm_slots(1);
    let (engine, allocator) = pool(&pooling);
    let memory_only =
        |name: &str, pages: u64| berth_tests::named_memory(name, MemoryType::new(pages, Some(8)));
    let a = engine.load(memory_only("a", 4)).unwrap();
    let b = engine.load(memory_only("b", 1)).unwrap();
    for round in 0..3u8 {
        let mut tenant = Instance::new(&a).unwrap();
        tenant.memory_write(0, 0, &[round + 1; 4096]).unwrap();
        tenant
            .memory_write(0, 3 * PAGE as u64, &[round + 1; 4096])
            .unwrap();
    }
    // Runs of pages holding memory of their own (the shared zero page, which reads map, does
    // not), as offsets in the slot.
    let resident_runs = |base: usize| {
        let mut runs = Vec::new();
        let base = std::ptr::NonNull::new(base as *mut u8).unwrap();
        map.written(base, 1 << 20, &mut runs).unwrap();
        runs
    };
    let resident = |base: usize| resident_runs(base).iter().map(|r| r.len()).sum::<usize>();
    let tenant = Instance::new(&b).unwrap();
    let base = memory_base(&tenant);
    let mut bytes = vec![1u8; PAGE];
    tenant.memory_read(0, 0, &mut bytes).unwrap();
    assert!(bytes.iter().all(|&x| x == 0), "module a's bytes are visible to b");
    let past: Vec<_> = resident_runs(base).into_iter().filter(|r| r.end > PAGE).collect();
    assert!(
        past.is_empty(),
        "pages a kept past b's initial size stayed resident: {past:x?}"
    );
    drop(tenant);
    allocator.flush_decommits();
    assert_eq!(
        resident(base) as u64,
        engine.stats().idle_resident_bytes(),
        "the idle slot holds resident pages the pool does not count"
    );
}

#[test]
fn releasing_idle_memory_gives_the_kept_pages_back_to_the_kernel() {
    // A host that goes quiet: the pages idle slots keep leave the process, not only the
    // books; the next instance of the module starts fresh and works.
    let Some(map) = berth_testkit::page_states::page_map_for("released pages") else {
        return;
    };
    let mut pooling = slots(2);
    pooling
        .linear_memory_keep_resident(1 << 20)
        .decommit_batch_size(1);
    let (engine, _) = pool(&pooling);
    let a = engine.load(module("a", 4)).unwrap();
    let mut instance = Instance::new(&a).unwrap();
    let base = std::ptr::NonNull::new(memory_base(&instance) as *mut u8).unwrap();
    instance.memory_write(0, 0, &vec![0xC3; 4 * PAGE]).unwrap();
    drop(instance);
    let present = |len| map.count(base, len, berth_core::sys::PageState::Present).unwrap();
    assert!(present(4 * PAGE) >= 64, "the written pages are kept resident");
    assert!(engine.stats().idle_resident_bytes() >= (4 * PAGE) as u64);

    let released = engine.release_idle_memory();
    assert!(
        released.slots >= 1 && released.resident_bytes >= (4 * PAGE) as u64,
        "{released:?}"
    );
    assert_eq!(
        present(4 * PAGE),
        0,
        "pages of a released slot are still resident"
    );
    let stats = engine.stats();
    assert_eq!((stats.warm_memory_slots, stats.idle_resident_bytes()), (0, 0));
    assert!(stats.decommit_calls >= 1);

    let instance = Instance::new(&a).unwrap();
    let mut bytes = vec![1u8; 4 * PAGE];
    instance.memory_read(0, 0, &mut bytes).unwrap();
    assert!(bytes.iter().all(|&b| b == 0), "a released slot shows old bytes");
}

#[test]
fn a_request_with_other_tunables_than_the_pools_is_refused() {
    // Slots are cut for the pool's tunables: a request carrying others (a reservation or guard
    // of another size) must not get one.
    let pool = PoolingInstanceAllocator::new(&slots(2), small_config().tunables()).unwrap();
    let mut other = *small_config().tunables();
    other.memory_guard_size *= 2;
    let harness = berth_testkit::Harness {
        allocator: Arc::new(pool),
        tunables: other,
    };
    let a = harness.load(module("a", 1)).unwrap();
    let error = harness.instantiate(&a, None).unwrap_err();
    assert!(format!("{error:#}").contains("other tunables"), "{error:#}");
    assert_eq!(harness.allocator.stats().live_memories, 0);
}

#[test]
fn kept_pages_no_tenant_writes_any_more_go_back() {
    // Tenants write one page for a while, then another: the first stays kept (and reset) only
    // until the resets have seen it unchanged long enough, then goes back to the kernel.
    let (engine, allocator) = pool(&slots(1));
    let a = engine.load(module("a", 8)).unwrap();
    let kept = || {
        allocator.flush_decommits();
        engine.stats().idle_memory_resident_bytes
    };
    let cycle = |at: u64, round: u8| {
        let mut tenant = Instance::new(&a).unwrap();
        let mut page = vec![1u8; 4096];
        tenant.memory_read(0, at, &mut page).unwrap();
        assert!(
            page.iter().all(|&b| b == 0),
            "round {round}: a previous tenant's bytes at {at:#x}"
        );
        tenant.memory_write(0, at, &[round | 1; 4096]).unwrap();
    };
    for round in 0..10 {
        cycle(0, round);
    }
    assert_eq!(kept(), 4096, "the written page is kept");
    for round in 0..100 {
        cycle(5 * PAGE as u64, round);
    }
    assert_eq!(kept(), 4096, "only the page tenants still write is kept");
    // Both pages read as a fresh memory's.
    let tenant = Instance::new(&a).unwrap();
    let mut bytes = vec![1u8; 8 * PAGE];
    tenant.memory_read(0, 0, &mut bytes).unwrap();
    assert!(bytes.iter().all(|&b| b == 0));
}

#[test]
fn tenants_that_write_somewhere_new_each_time_keep_little_resident() {
    // Each tenant writes four pages of its own choosing in a 1 MiB memory (a hash table, a
    // collected heap): a page is written again in one reset in 64, too seldom to be worth
    // resetting at every reset, so the slot does not keep the memory resident for them (its
    // budget would hold all of it); every tenant finds the whole memory zeroed.
    let (engine, allocator) = pool(&slots(1));
    let memory = MemoryType::new(16, Some(16));
    let a = engine.load(berth_tests::named_memory("a", memory)).unwrap();
    let mut state = 7u64;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % 256
    };
    let mut most = 0;
    let mut whole = vec![1u8; 1 << 20];
    for round in 0..600u32 {
        let mut tenant = Instance::new(&a).unwrap();
        let mut pages = Vec::new();
        while pages.len() < 4 {
            let page = next();
            if !pages.contains(&page) {
                pages.push(page);
            }
        }
        tenant.memory_read(0, 0, &mut whole).unwrap();
        if let Some(at) = whole.iter().position(|&b| b != 0) {
            panic!("round {round}: a previous tenant's bytes at {at:#x}");
        }
        for at in pages.into_iter().map(|page| page * 4096) {
            tenant.memory_write(0, at, &[0xA5; 4096]).unwrap();
        }
        drop(tenant);
        if round >= 300 {
            allocator.flush_decommits();
            most = most.max(engine.stats().idle_memory_resident_bytes);
        }
    }
    assert!(
        most <= 64 * 4096,
        "tenants writing scattered pages kept {most} bytes resident in an idle slot"
    );
}

/// Runs tenants on a one-slot pool of a memory of `mib` MiB: 60 taking turns at `small`,
/// `small`, `medium` (each a list of writes: offset and length), then `large` after a `small`
/// one, then `small` ones and `large` again. Every tenant checks that it reads zeros. Returns
/// the bytes the slot keeps resident after the tenants before the first `large` one, and after
/// it.
fn kept_around_a_rare_large_tenant(
    mib: u64,
    small: &[(u64, u64)],
    medium: &[(u64, u64)],
    large: &[(u64, u64)],
) -> (u64, u64) {
    let mut config = small_config();
    config.memory_reservation(mib << 20);
    let mut pooling = slots(1);
    pooling.max_memory_size((mib << 20) as usize);
    let allocator = Arc::new(PoolingInstanceAllocator::new(&pooling, config.tunables()).unwrap());
    config.allocation_strategy(InstanceAllocationStrategy::Custom(allocator.clone()));
    let engine = Engine::new(&config).unwrap();
    let memory = MemoryType::new(16 * mib, Some(16 * mib));
    let a = engine.load(berth_tests::named_memory("a", memory)).unwrap();
    let mut whole = vec![1u8; (mib << 20) as usize];
    let mut cycle = |writes: &[(u64, u64)], round: usize| {
        let mut tenant = Instance::new(&a).unwrap();
        tenant.memory_read(0, 0, &mut whole).unwrap();
        if let Some(at) = whole.iter().position(|&b| b != 0) {
            panic!("round {round}: a previous tenant's bytes at {at:#x}");
        }
        for &(at, len) in writes {
            tenant
                .memory_write(0, at, &vec![round as u8 | 1; len as usize])
                .unwrap();
        }
        drop(tenant);
        allocator.flush_decommits();
        engine.stats().idle_memory_resident_bytes
    };
    for round in 0..60 {
        cycle(if round % 3 == 2 { medium } else { small }, round);
    }
    let before = cycle(small, 60);
    let after = cycle(large, 61);
    for round in 62..70 {
        cycle(small, round);
    }
    assert!(cycle(large, 70) >= after, "the large tenant's pages went back");
    cycle(small, 71);
    (before, after)
}

#[test]
fn the_default_pool_keeps_a_working_set_larger_than_one_mib() {
    // Tenants that each write 2 MiB of a 4 MiB memory, a heap larger than the 1 MiB Wasmtime's
    // users keep: with the default bound a slot keeps all of it resident and resets it in place,
    // where a 1 MiB bound gives half of it back and the next tenant faults it in again. Every
    // tenant finds the memory zeroed.
    let mut config = small_config();
    config.memory_reservation(4 << 20);
    let mut pooling = slots(1);
    pooling.max_memory_size(4 << 20);
    let allocator = Arc::new(PoolingInstanceAllocator::new(&pooling, config.tunables()).unwrap());
    config.allocation_strategy(InstanceAllocationStrategy::Custom(allocator.clone()));
    let engine = Engine::new(&config).unwrap();
    let memory = MemoryType::new(64, Some(64));
    let a = engine.load(berth_tests::named_memory("a", memory)).unwrap();
    let mut whole = vec![1u8; 4 << 20];
    for round in 0..12u8 {
        let mut tenant = Instance::new(&a).unwrap();
        tenant.memory_read(0, 0, &mut whole).unwrap();
        if let Some(at) = whole.iter().position(|&b| b != 0) {
            panic!("round {round}: a previous tenant's bytes at {at:#x}");
        }
        tenant
            .memory_write(0, 1 << 20, &vec![round | 1; 2 << 20])
            .unwrap();
        drop(tenant);
        allocator.flush_decommits();
        assert_eq!(
            engine.stats().idle_memory_resident_bytes,
            2 << 20,
            "round {round}: the tenant's 2 MiB kept resident"
        );
    }
}

#[test]
fn a_rare_tenant_that_reaches_further_has_its_pages_learned_at_once() {
    // The usual tenants' pages are learned and the slot stops scanning. A tenant that reaches
    // further than the ones before it is seen at its first reset, so the slot keeps its pages
    // for the next such tenant rather than fault them in at each one.
    if berth_testkit::page_states::page_map_for("a rare large tenant").is_none() {
        return;
    }
    const K: u64 = 1024;
    // A stack growing down from 512 KiB in a 4 MiB memory (where a slot with a few kept runs
    // stops scanning), with 8 KiB of data kept below it: the deep stack writes between the
    // data and the usual stack.
    let data = (440 * K, 8 * K);
    let (before, after) = kept_around_a_rare_large_tenant(
        4,
        &[data, (496 * K, 16 * K)],
        &[data, (480 * K, 32 * K)],
        &[data, (456 * K, 56 * K)],
    );
    assert_eq!(before, 40 * K, "the usual tenants' data and stack are kept");
    assert_eq!(after, 64 * K, "the deep stack's pages are kept");
    // A heap growing up from 512 KiB, whose large tenant leaves 8 KiB untouched past the
    // usual heap (an allocator aligning a large block).
    let (before, after) = kept_around_a_rare_large_tenant(
        1,
        &[(512 * K, 16 * K)],
        &[(512 * K, 32 * K)],
        &[(512 * K, 32 * K), (552 * K, 216 * K)],
    );
    assert_eq!(before, 32 * K, "the usual tenants' heap is kept");
    assert_eq!(after, 248 * K, "the large heap's pages are kept");
    // Tenants that all use the same heap but for the rare large one: every one changes the
    // kept run's end page, and the large one writes the page past it.
    let usual = [(512 * K, 32 * K)];
    let (before, after) = kept_around_a_rare_large_tenant(1, &usual, &usual, &[(512 * K, 256 * K)]);
    assert_eq!(before, 32 * K, "the usual tenants' heap is kept");
    assert_eq!(after, 256 * K, "the large heap's pages are kept");
}

/// Runs tenants on a one-slot pool of a 1 MiB memory with a decommit batch of one (and
/// `keep` bytes of keep budget, if given): tenant `round` writes `len(round)` bytes from
/// 512 KiB, after checking that it reads zeros. Returns the ranges the 100 resets after 40
/// warm-up rounds decommitted: two a blind reset (below and above the kept run), none a scan
/// that finds nothing new.
fn ranges_decommitted_by_a_blind_slot(keep: Option<usize>, len: impl Fn(usize) -> usize) -> u64 {
    let mut pooling = slots(1);
    pooling.decommit_batch_size(1);
    if let Some(keep) = keep {
        pooling.linear_memory_keep_resident(keep);
    }
    decommits_of_tenants(&pooling, len).0
}

/// Runs tenants of a 1 MiB memory on `pooling`: tenant `round` writes `len(round)` bytes from
/// 512 KiB, after checking that it reads zeros. Returns the ranges decommitted, and the system
/// calls that did it, in the 100 resets after 40 warm-up rounds.
fn decommits_of_tenants(pooling: &PoolingConfig, len: impl Fn(usize) -> usize) -> (u64, u64) {
    let tenants = tenants_of(pooling, len);
    (tenants.ranges, tenants.calls)
}

/// What [`tenants_of`] saw of the 100 tenants after the warm-up.
struct Tenants {
    /// Ranges decommitted, and the system calls that did it.
    ranges: u64,
    calls: u64,
    /// Each tenant's memory base, in turn.
    bases: Vec<usize>,
}

/// The tenants of [`decommits_of_tenants`], with where each one's memory was.
fn tenants_of(pooling: &PoolingConfig, len: impl Fn(usize) -> usize) -> Tenants {
    let (engine, _) = pool(pooling);
    let memory = MemoryType::new(16, Some(16));
    let a = engine.load(berth_tests::named_memory("a", memory)).unwrap();
    let mut whole = vec![1u8; 1 << 20];
    let mut cycle = |round: usize| {
        let mut tenant = Instance::new(&a).unwrap();
        tenant.memory_read(0, 0, &mut whole).unwrap();
        assert!(
            whole.iter().all(|&b| b == 0),
            "round {round}: a previous tenant's bytes"
        );
        tenant
            .memory_write(0, 512 << 10, &vec![round as u8 | 1; len(round)])
            .unwrap();
        memory_base(&tenant)
    };
    for round in 0..40 {
        cycle(round);
    }
    let before = engine.stats();
    let bases = (40..140).map(&mut cycle).collect();
    let after = engine.stats();
    Tenants {
        ranges: after.decommit_ranges - before.decommit_ranges,
        calls: after.decommit_calls - before.decommit_calls,
        bases,
    }
}

#[test]
fn tenants_taking_turns_at_two_sizes_leave_the_slot_blind() {
    // Tenants write 16 or 32 KiB in turn: each larger one changes the kept run's end page that
    // the one before left unchanged, but writes nothing past it, so the slot's resets go on
    // decommitting around its kept pages without scanning.
    if berth_testkit::page_states::page_map_for("two sizes in turn").is_none() {
        return;
    }
    let ranges = ranges_decommitted_by_a_blind_slot(None, |round| {
        if round.is_multiple_of(2) {
            16 << 10
        } else {
            32 << 10
        }
    });
    // Rescans (one reset in 16, then fewer) decommit nothing.
    assert!(
        ranges >= 2 * 90,
        "{ranges} ranges decommitted in 100 resets: the resets scanned"
    );
}

#[test]
fn tenants_past_a_full_budget_leave_the_slot_blind() {
    // The keep budget is 32 KiB and the usual tenants fill it; one in ten writes 64 KiB. Each
    // of those reaches past the kept run, but a scan could keep none of it, so the slot's
    // resets go on decommitting around the kept pages without scanning, the large tenants'
    // pages with them.
    if berth_testkit::page_states::page_map_for("a full budget").is_none() {
        return;
    }
    let ranges = ranges_decommitted_by_a_blind_slot(Some(32 << 10), |round| match round % 10 {
        9 => 64 << 10,
        odd if odd % 2 == 1 => 32 << 10,
        _ => 16 << 10,
    });
    assert!(
        ranges >= 170,
        "{ranges} ranges decommitted in 100 resets: the resets scanned"
    );
}

#[test]
fn an_instance_of_several_memories_is_one_deallocation_in_a_batch() {
    // Tenants of a module with four memories write nothing: once the slots stop scanning,
    // each deallocation leaves four ranges (one a memory) to decommit. With a batch of two,
    // every other deallocation makes the system call, for eight ranges, rather than every
    // deallocation two calls of two slots each.
    if berth_testkit::page_states::page_map_for("a batch of instances").is_none() {
        return;
    }
    let mut pooling = slots(64);
    pooling.max_memories_per_module(4).decommit_batch_size(2);
    let (engine, _) = pool(&pooling);
    let four = (0..4).fold(Module::builder().name("four"), |module, _| {
        module.memory(MemoryType::new(1, Some(16)))
    });
    let module = engine.load(four.build().unwrap()).unwrap();
    let cycle = || drop(Instance::new(&module).unwrap());
    (0..40).for_each(|_| cycle());
    let before = engine.stats();
    (0..100).for_each(|_| cycle());
    let after = engine.stats();
    let (ranges, calls) = (
        after.decommit_ranges - before.decommit_ranges,
        after.decommit_calls - before.decommit_calls,
    );
    assert!(
        ranges >= 360,
        "{ranges} ranges in 100 deallocations: the slots scanned"
    );
    if berth_testkit::page_states::require("a batch of instances", "process_madvise", calls < ranges) {
        assert!(
            calls <= 60,
            "{calls} system calls for {ranges} ranges in 100 deallocations: batches counted slots"
        );
    }
}

#[test]
fn a_blind_slot_that_keeps_many_pages_is_its_modules_next_slot_each_time() {
    // Each tenant writes 256 KiB in the middle of a 1 MiB memory: once its slot stops scanning,
    // every reset leaves two gaps to decommit around the kept run. Those go at once, so the
    // module's next tenant gets the same slot, its kept pages still in the cache, rather than
    // the tenants taking turns at the slots of a batch (as 8 KiB tenants do, below).
    if berth_testkit::page_states::page_map_for("a slot that keeps many pages").is_none() {
        return;
    }
    let Tenants { ranges, bases, .. } = tenants_of(&slots(16), |_| 256 << 10);
    assert!(ranges >= 180, "{ranges} ranges in 100 resets: the slot scanned");
    // A tenant gets another slot only when its slot's decommit waited because another
    // thread (another test) was decommitting; taking turns at a batch's slots, 70 or more do.
    let moves = bases.windows(2).filter(|pair| pair[0] != pair[1]).count();
    assert!(
        moves <= 10,
        "{moves} of 99 tenants got another slot than the tenant before"
    );
}

#[test]
fn a_blind_slot_that_keeps_a_run_runs_its_decommits_one_deallocation_in_a_batch() {
    // Each tenant writes 8 KiB in the middle of a 1 MiB memory: once its slot stops scanning,
    // every reset leaves two gaps to decommit, around the kept run. A batch counts
    // deallocations, not ranges: with a batch of four, one deallocation in four makes the
    // system call (and the module's tenants take turns at four slots meanwhile), rather than
    // one in two.
    if berth_testkit::page_states::page_map_for("a blind slot's batch").is_none() {
        return;
    }
    let mut pooling = slots(8);
    pooling.decommit_batch_size(4);
    let (ranges, calls) = decommits_of_tenants(&pooling, |_| 8 << 10);
    assert!(ranges >= 180, "{ranges} ranges in 100 resets: the slots scanned");
    // One call a batch where the kernel takes several ranges in one (`process_madvise`);
    // elsewhere one a range, which says nothing about batches.
    if berth_testkit::page_states::require("a blind slot's batch", "process_madvise", calls < ranges) {
        assert!(
            calls <= 30,
            "{calls} system calls for {ranges} ranges in 100 resets: batches of fewer than four slots"
        );
    }
}

#[test]
fn large_tables_come_back_zeroed_and_keep_their_written_pages() {
    // A table of 20 000 elements (160 000 bytes, 40 pages) whose tenants write elements all
    // over it. Past its first 128 KiB (or the bound, if lower) a reset zeroes only the pages
    // the kernel does not prove clean; within `table_keep_resident` they stay resident, past it
    // they are given back. Whichever way, the next tenant finds every element null.
    // Fifteen pages, more than a slot's decommits hold ranges: past the bound they go back as
    // one range.
    let written = [
        0u64, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9999, 11000, 12000, 13000, 14000, 16500, 19999,
    ];
    for (keep, scan) in [
        (None, true),
        (Some(16 << 10), true),
        (None, false),
        (Some(16 << 10), false),
    ] {
        let mut pooling = PoolingConfig::new();
        pooling
            .total_memories(2)
            .total_tables(2)
            .max_memory_size(1 << 20)
            .pagemap_scan(scan);
        if let Some(keep) = keep {
            pooling.table_keep_resident(keep);
        }
        let (engine, _allocator) = pool(&pooling);
        let big = Module::builder()
            .name("big-table")
            .table(TableType::new(20_000, Some(20_000)))
            .build()
            .unwrap();
        let big = engine.load(big).unwrap();
        for round in 1..=6usize {
            let mut instance = Instance::new(&big).unwrap();
            for &elem in &written {
                assert_eq!(
                    instance.table_get(0, elem).unwrap(),
                    0,
                    "keep {keep:?}, scan {scan}, round {round}: element {elem} of the previous tenant"
                );
                instance.table_set(0, elem, round * 1000 + elem as usize).unwrap();
            }
        }
        let stats = engine.stats();
        assert_eq!(stats.table_resets, 6);
        if keep.is_none() {
            assert_eq!(
                stats.decommit_ranges, 0,
                "scan {scan}: the written pages are within the default bound and stay resident"
            );
        } else {
            assert!(
                stats.decommit_ranges > 0,
                "scan {scan}: pages written past the bound were given back"
            );
        }
    }
}
