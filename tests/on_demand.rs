//! The on-demand backend beyond the shared suite: freed reservations reused without a byte of
//! their last tenant, a bounded cache of them, and the pages a module's instances write
//! faulted in ahead for its next instance.

use std::ptr::NonNull;
use std::sync::Arc;

use berth_core::{ConstExpr, DataKind, DataSegment, MemoryIndex, MemoryType, Module};
use berth_engine::{Config, Engine, Instance, InstanceAllocationStrategy, OnDemandInstanceAllocator};
use berth_tests::memory_base;

const PAGE: usize = 65536;

fn engine_with(allocator: OnDemandInstanceAllocator) -> Engine {
    let mut config = Config::new();
    config.allocation_strategy(InstanceAllocationStrategy::Custom(Arc::new(allocator)));
    Engine::new(&config).unwrap()
}

fn memory_module(name: &str, pages: u64, data: Option<(u32, &[u8])>) -> Module {
    let mut builder = Module::builder()
        .name(name)
        .memory(MemoryType::new(pages, Some(8)));
    if let Some((offset, bytes)) = data {
        builder = builder.data(DataSegment {
            kind: DataKind::Active {
                memory: MemoryIndex::from_u32(0),
                offset: ConstExpr::I32(i32::try_from(offset).unwrap()),
            },
            data: Arc::from(bytes),
        });
    }
    builder.build().unwrap()
}

fn contents(instance: &Instance) -> Vec<u8> {
    let mut bytes = vec![0xee; instance.memory_size(0).unwrap()];
    instance.memory_read(0, 0, &mut bytes).unwrap();
    bytes
}

#[test]
fn a_reused_reservation_holds_nothing_of_its_last_tenant() {
    let engine = engine_with(OnDemandInstanceAllocator::new());
    // The first module's data is a copy-on-write image; its tenant also writes past it and
    // grows the memory.
    let with_image = engine
        .load(memory_module("image", 1, Some((8, b"image bytes"))))
        .unwrap();
    let plain = engine.load(memory_module("plain", 2, None)).unwrap();

    let mut first = Instance::new(&with_image).unwrap();
    assert_eq!(&contents(&first)[8..19], b"image bytes");
    assert_eq!(first.memory_grow(0, 2).unwrap(), Some(1));
    first.memory_write(0, 0, &vec![0x5a; 3 * PAGE]).unwrap();
    let reservation = memory_base(&first);
    drop(first);

    let mut second = Instance::new(&plain).unwrap();
    assert_eq!(
        memory_base(&second),
        reservation,
        "the freed reservation was reused"
    );
    assert_eq!(
        second.memory_size(0).unwrap(),
        2 * PAGE,
        "its own size, not the last tenant's"
    );
    assert!(
        contents(&second).iter().all(|&b| b == 0),
        "the last tenant's bytes are visible"
    );
    assert_eq!(second.memory_grow(0, 1).unwrap(), Some(2));
    assert!(
        contents(&second).iter().all(|&b| b == 0),
        "a page grown into holds old bytes"
    );
    second.memory_write(0, 0, &[0x77; 64]).unwrap();
    drop(second);

    // The image module gets its image back, and zeros elsewhere.
    let third = Instance::new(&with_image).unwrap();
    assert_eq!(memory_base(&third), reservation);
    let bytes = contents(&third);
    assert_eq!(bytes.len(), PAGE);
    assert_eq!(&bytes[8..19], b"image bytes");
    assert!(bytes[..8].iter().chain(&bytes[19..]).all(|&b| b == 0));
}

#[test]
fn the_cache_of_freed_reservations_is_bounded() {
    let engine = engine_with(OnDemandInstanceAllocator::new().with_cached_reservations(2));
    let module = engine.load(memory_module("m", 1, None)).unwrap();
    let instances: Vec<_> = (0..5).map(|_| Instance::new(&module).unwrap()).collect();
    let live = engine.stats().reserved_bytes;
    drop(instances);
    let stats = engine.stats();
    assert_eq!(stats.warm_memory_slots, 2);
    assert_eq!(
        stats.reserved_bytes,
        live / 5 * 2,
        "three reservations were unmapped"
    );
    assert_eq!(stats.live_memories, 0);
}

/// Runs of pages of `instance`'s memory 0 that are resident and written to, as byte offsets.
fn resident(instance: &Instance) -> Option<Vec<std::ops::Range<usize>>> {
    let map = berth_core::sys::page_map()?;
    let mut runs = Vec::new();
    let base = NonNull::new(memory_base(instance) as *mut u8).unwrap();
    map.written(base, instance.memory_size(0).unwrap(), &mut runs)
        .unwrap();
    Some(runs)
}

#[test]
#[allow(clippy::single_range_in_vec_init)] // One run of pages, not a range of numbers.
fn pages_a_module_writes_are_faulted_in_for_its_next_instance() {
    let engine = engine_with(OnDemandInstanceAllocator::new());
    let writer = engine.load(memory_module("writer", 4, None)).unwrap();
    let idle = engine.load(memory_module("idle", 4, None)).unwrap();
    let mut first = Instance::new(&writer).unwrap();
    if berth_testkit::page_states::page_map_for("prefaulted pages").is_none() {
        return;
    }
    let before = resident(&first).expect("PAGEMAP_SCAN is here");
    assert_eq!(before, [], "a first instance starts with nothing resident");
    first.memory_write(0, PAGE as u64, &[1; PAGE]).unwrap();
    drop(first);

    let next = Instance::new(&writer).unwrap();
    assert_eq!(
        resident(&next).unwrap(),
        vec![PAGE..2 * PAGE],
        "what the last tenant wrote"
    );
    assert!(
        contents(&next).iter().all(|&b| b == 0),
        "prefaulted pages read as zero"
    );
    drop(next);

    // Another module in the same reservation gets none of that.
    let other = Instance::new(&idle).unwrap();
    assert_eq!(resident(&other).unwrap(), []);
}

#[test]
fn a_memory_freed_after_its_module_was_purged_teaches_nothing_to_another_module() {
    // The allocation index of a memory once named its module memory's habit by number, and a
    // purge recycled the number: a memory of the purged module freed later taught its pages to
    // whichever module took the number next.
    use berth_core::InstanceAllocatorImpl;
    let allocator = Arc::new(OnDemandInstanceAllocator::new());
    let harness = berth_testkit::Harness {
        allocator: allocator.clone(),
        tunables: *Config::new().tunables(),
    };
    if berth_testkit::page_states::page_map_for("habits after a purge").is_none() {
        return;
    }
    let a = harness.load(memory_module("a", 4, None)).unwrap();
    let b = harness.load(memory_module("b", 4, None)).unwrap();
    let mut stale = harness.instantiate(&a, None).unwrap();
    stale
        .instance_mut()
        .memory_write(
            berth_core::DefinedMemoryIndex::from_u32(0),
            2 * PAGE as u64,
            &[7; 2 * PAGE],
        )
        .unwrap();
    allocator.purge_module(a.module.id());
    // b's first instance learns that b writes nothing; then a's memory is freed.
    drop(harness.instantiate(&b, None).unwrap());
    drop(stale);
    let next = harness.instantiate(&b, None).unwrap();
    let map = berth_core::sys::page_map().unwrap();
    let memory = next.instance().memories()[berth_core::DefinedMemoryIndex::from_u32(0)]
        .1
        .base();
    let mut runs = Vec::new();
    map.written(NonNull::new(memory).unwrap(), 4 * PAGE, &mut runs)
        .unwrap();
    assert_eq!(runs, [], "b's instance was given a's pages");
}
