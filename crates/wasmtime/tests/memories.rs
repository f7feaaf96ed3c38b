//! Wasmtime's compiled code on Berth memories: reads and writes land in Berth's memory,
//! out-of-bounds accesses trap (never crash) after growth and after a slot is reused, and an
//! inconsistent configuration is refused with a clear error.

use wasmtime::{Instance, Module, Store, Trap};

const WAT: &str = r#"(module
  (memory (export "memory") 1 4)
  (func (export "store") (param i32 i32) (i32.store (local.get 0) (local.get 1)))
  (func (export "load") (param i32) (result i32) (i32.load (local.get 0)))
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0))))"#;

fn engines(pooling: bool) -> (wasmtime::Engine, berth_engine::Engine) {
    let mut berth = berth_engine::Config::new();
    if pooling {
        let mut pool = berth_engine::PoolingConfig::new();
        pool.total_memories(4).max_memory_size(1 << 20);
        berth.allocation_strategy(berth_engine::InstanceAllocationStrategy::Pooling(pool));
    }
    let berth = berth_engine::Engine::new(&berth).unwrap();
    let mut config = wasmtime::Config::new();
    berth_wasmtime::configure(&mut config, &berth).unwrap();
    (wasmtime::Engine::new(&config).unwrap(), berth)
}

#[test]
fn compiled_code_reads_and_writes_berth_memory_and_traps_out_of_bounds() {
    for pooling in [false, true] {
        let (engine, berth) = engines(pooling);
        let module = Module::new(&engine, WAT).unwrap();
        // Several tenants in turn: on the pool, later ones reuse the first one's slot.
        for tenant in 0..3 {
            let mut store = Store::new(&engine, ());
            let instance = Instance::new(&mut store, &module, &[]).unwrap();
            assert_eq!(berth.stats().live_memories, 1, "the memory is Berth's");
            let store_fn = instance
                .get_typed_func::<(i32, i32), ()>(&mut store, "store")
                .unwrap();
            let load = instance.get_typed_func::<i32, i32>(&mut store, "load").unwrap();
            let grow = instance.get_typed_func::<i32, i32>(&mut store, "grow").unwrap();
            assert_eq!(
                load.call(&mut store, 65532).unwrap(),
                0,
                "tenant {tenant} sees an earlier tenant's bytes"
            );
            store_fn.call(&mut store, (65532, 0x1234_5678)).unwrap();
            let memory = instance.get_memory(&mut store, "memory").unwrap();
            assert_eq!(&memory.data(&store)[65532..65536], &0x1234_5678i32.to_le_bytes());
            let trap = load.call(&mut store, 65536).unwrap_err();
            assert_eq!(trap.downcast_ref::<Trap>(), Some(&Trap::MemoryOutOfBounds));
            assert_eq!(grow.call(&mut store, 1).unwrap(), 1);
            assert_eq!(load.call(&mut store, 65536).unwrap(), 0, "grown bytes are zero");
            store_fn.call(&mut store, (131068, 7)).unwrap();
            let trap = load.call(&mut store, 131072).unwrap_err();
            assert_eq!(
                trap.downcast_ref::<Trap>(),
                Some(&Trap::MemoryOutOfBounds),
                "past the grown size"
            );
            assert_eq!(grow.call(&mut store, 3).unwrap(), -1, "past the maximum");
            let trap = load.call(&mut store, i32::MAX).unwrap_err();
            assert_eq!(
                trap.downcast_ref::<Trap>(),
                Some(&Trap::MemoryOutOfBounds),
                "far past the size"
            );
            drop(store);
            assert_eq!(berth.stats().live_memories, 0, "the store gave its memory back");
        }
    }
}

#[test]
fn memories_larger_than_berth_reserves_are_refused_clearly() {
    // Wasmtime told to expect bigger guards than the Berth engine leaves: instantiation fails
    // and says which knob, rather than run code whose bounds checks the guards cannot back.
    let berth = berth_engine::Engine::new(&berth_engine::Config::new()).unwrap();
    let mut config = wasmtime::Config::new();
    berth_wasmtime::configure(&mut config, &berth).unwrap();
    config.memory_guard_size(berth.tunables().memory_guard_size * 2);
    let engine = wasmtime::Engine::new(&config).unwrap();
    let module = Module::new(&engine, WAT).unwrap();
    let mut store = Store::new(&engine, ());
    let error = format!("{:#}", Instance::new(&mut store, &module, &[]).unwrap_err());
    assert!(
        error.contains("guards of") && error.contains("berth_wasmtime::configure"),
        "{error}"
    );
}

#[test]
fn wasmtime_reserves_what_a_small_pool_slot_holds_and_grows_within_it() {
    // Slots of 1 MiB: Wasmtime's code must not assume 4 GiB in place. A memory that fits grows
    // to its maximum in place; one that does not stops at the slot, as the pool says.
    let (engine, berth) = engines(true);
    let module = Module::new(
        &engine,
        r#"(module (memory (export "memory") 1 64)
             (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
             (func (export "load") (param i32) (result i32) (i32.load (local.get 0))))"#,
    )
    .unwrap();
    let mut store = Store::new(&engine, ());
    let instance = Instance::new(&mut store, &module, &[]).unwrap();
    let grow = instance.get_typed_func::<i32, i32>(&mut store, "grow").unwrap();
    let load = instance.get_typed_func::<i32, i32>(&mut store, "load").unwrap();
    assert_eq!(grow.call(&mut store, 15).unwrap(), 1, "grows to the 1 MiB slot");
    assert_eq!(load.call(&mut store, (1 << 20) - 4).unwrap(), 0);
    assert_eq!(
        grow.call(&mut store, 1).unwrap(),
        -1,
        "past the slot: -1, not a move"
    );
    let trap = load.call(&mut store, 1 << 20).unwrap_err();
    assert_eq!(trap.downcast_ref::<Trap>(), Some(&Trap::MemoryOutOfBounds));
    drop(store);
    assert_eq!(berth.stats().live_memories, 0);
}

#[test]
fn a_pool_whose_memories_could_never_grow_is_refused() {
    // Slots of no bytes: nothing to grow in place, and a pool's memories never move, whatever
    // the tunables say about moving.
    let mut config = berth_engine::Config::new();
    let mut pool = berth_engine::PoolingConfig::new();
    pool.total_memories(1).max_memory_size(0);
    config.allocation_strategy(berth_engine::InstanceAllocationStrategy::Pooling(pool));
    assert!(config.tunables().memory_may_move);
    let berth = berth_engine::Engine::new(&config).unwrap();
    let error = berth_wasmtime::configure(&mut wasmtime::Config::new(), &berth).unwrap_err();
    assert!(format!("{error:#}").contains("no memory could grow"), "{error:#}");
}
