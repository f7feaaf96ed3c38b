//! Initialization: element and data segments applied in order and bounds-checked, on both
//! backends, with copy-on-write images and without, giving the same bytes.

use std::sync::Arc;

use berth_core::{
    ConstExpr, DataKind, DataSegment, ElementItem, ElementKind, ElementSegment, FuncIndex, GlobalIndex,
    GlobalType, MemoryIndex, MemoryType, Module, OutOfBounds, TableIndex, TableType, VMGlobalDefinition,
    VMGlobalImport, ValType,
};
use berth_engine::{Config, Engine, Instance, InstanceAllocationStrategy, OwnedImports, PoolingConfig};
use proptest::prelude::*;

const PAGE: usize = 65536;

fn engine(pooling: bool, cow: bool, keep_resident: usize) -> Engine {
    engine_with(pooling, cow, keep_resident, 1)
}

fn engine_with(pooling: bool, cow: bool, keep_resident: usize, memories_per_module: u32) -> Engine {
    let mut config = Config::new();
    config.memory_reservation(1 << 20).memory_guard_size(PAGE as u64);
    let mut tunables = *config.tunables();
    tunables.memory_init_cow = cow;
    config.set_tunables(tunables);
    if pooling {
        let mut pool = PoolingConfig::new();
        pool.total_memories(2)
            .total_tables(2)
            .max_memory_size(1 << 20)
            .table_elements(64);
        pool.linear_memory_keep_resident(keep_resident)
            .max_memories_per_module(memories_per_module);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&config).unwrap()
}

fn data(offset: ConstExpr, bytes: &[u8]) -> DataSegment {
    DataSegment {
        kind: DataKind::Active {
            memory: MemoryIndex::from_u32(0),
            offset,
        },
        data: Arc::from(bytes),
    }
}

fn data_module(name: &str, pages: u64, segments: &[(u32, Vec<u8>)]) -> Module {
    let mut builder = Module::builder()
        .name(name)
        .memory(MemoryType::new(pages, Some(8)));
    for (offset, bytes) in segments {
        builder = builder.data(data(ConstExpr::I32(*offset as i32), bytes));
    }
    builder.build().unwrap()
}

fn contents(instance: &Instance) -> Vec<u8> {
    let mut bytes = vec![0u8; instance.memory_size(0).unwrap()];
    instance.memory_read(0, 0, &mut bytes).unwrap();
    bytes
}

/// Where memory 0 of `instance` is mapped from, per `/proc/self/maps`.
fn backing(instance: &Instance) -> String {
    let base = instance
        .core()
        .memory(berth_core::DefinedMemoryIndex::from_u32(0))
        .unwrap()
        .base() as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .find(|line| {
            let range = line.split(' ').next().unwrap();
            let (start, end) = range.split_once('-').unwrap();
            let (start, end) = (
                usize::from_str_radix(start, 16).unwrap(),
                usize::from_str_radix(end, 16).unwrap(),
            );
            (start..end).contains(&base)
        })
        .unwrap_or_default()
        .to_owned()
}

fn segments() -> impl Strategy<Value = (u64, Vec<(u32, Vec<u8>)>)> {
    (1u64..3).prop_flat_map(|pages| {
        let limit = pages as u32 * PAGE as u32 + 100;
        let segment = (0..limit, proptest::collection::vec(any::<u8>(), 0..3000));
        (Just(pages), proptest::collection::vec(segment, 0..6))
    })
}

/// Imports of one global, leaked so that it outlives every instance reading it.
fn one_global(storage: [u8; 16]) -> OwnedImports {
    let global = Box::leak(Box::new(VMGlobalDefinition { storage }));
    OwnedImports {
        globals: vec![VMGlobalImport { from: global }],
        ..OwnedImports::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn images_and_copies_give_the_same_bytes((pages, segments) in segments(), pooling in any::<bool>()) {
        let mut model = vec![0u8; pages as usize * PAGE];
        let mut in_bounds = true;
        for (offset, bytes) in &segments {
            let end = *offset as usize + bytes.len();
            if end > model.len() {
                in_bounds = false;
                break;
            }
            model[*offset as usize..end].copy_from_slice(bytes);
        }
        // What loading judges (every segment past the memory's initial size) agrees with the
        // model: instantiation fails exactly when it names a segment, and then always.
        let never = data_module("data", pages, &segments).segments_never_in_bounds();
        prop_assert_eq!(never.is_empty(), in_bounds, "{:?}", never);
        prop_assert!(never.iter().all(|e| e.is::<OutOfBounds>()));
        for cow in [true, false] {
            let engine = engine(pooling, cow, 0);
            let module = engine.load(data_module("data", pages, &segments)).unwrap();
            for round in 0..2 {
                match Instance::new(&module) {
                    Ok(mut instance) => {
                        prop_assert!(in_bounds, "an out-of-bounds segment was accepted");
                        prop_assert!(contents(&instance) == model, "cow {} round {}: contents differ", cow, round);
                        instance.memory_write(0, 0, &[0xEE; 256]).unwrap();
                    }
                    Err(error) => {
                        prop_assert!(!in_bounds, "in-bounds segments failed: {:#}", error);
                        prop_assert!(error.chain().any(|e| e.is::<OutOfBounds>()), "{:#}", error);
                    }
                }
            }
            let stats = engine.stats();
            prop_assert_eq!((stats.live_instances, stats.live_memories), (0, 0));
        }
    }
}

#[test]
fn images_are_mapped_not_copied() {
    // Data over three pages: an image the backends map.
    let segments = [(100, b"hello".to_vec()), (9000, b"world".to_vec())];
    for pooling in [false, true] {
        let engine = engine(pooling, true, 0);
        let module = engine.load(data_module("hello", 1, &segments)).unwrap();
        let instance = Instance::new(&module).unwrap();
        let backing = backing(&instance);
        assert!(
            backing.contains("memfd:berth-memory-image"),
            "pooling={pooling}: {backing}"
        );
        let mut hello = [0u8; 5];
        instance.memory_read(0, 100, &mut hello).unwrap();
        assert_eq!(&hello, b"hello");
        instance.memory_read(0, 9000, &mut hello).unwrap();
        assert_eq!(&hello, b"world");
    }
    // An image of one page: the pool writes its data instead (cheaper than the mappings of a
    // slot set up for it), and every tenant still starts from it.
    let pool = engine(true, true, 1 << 20);
    let module = pool
        .load(data_module("small", 1, &[(100, b"hello".to_vec())]))
        .unwrap();
    for _ in 0..3 {
        let mut instance = Instance::new(&module).unwrap();
        assert!(
            !backing(&instance).contains("memfd"),
            "a one-page image was mapped"
        );
        let mut hello = [0u8; 5];
        instance.memory_read(0, 100, &mut hello).unwrap();
        assert_eq!(&hello, b"hello");
        instance.memory_write(0, 100, b"HELLO").unwrap();
    }
    let engine = engine(false, false, 0);
    let module = engine
        .load(data_module("hello", 1, &[(100, b"hello".to_vec())]))
        .unwrap();
    let instance = Instance::new(&module).unwrap();
    assert!(!backing(&instance).contains("memfd"), "images were turned off");
}

#[test]
fn a_slot_that_held_an_image_serves_a_module_without_data_with_zeros() {
    for keep in [0, PAGE, 1 << 20] {
        let engine = engine(true, true, keep);
        let with_data = engine
            .load(data_module("with", 1, &[(0, vec![0xAB; 5000])]))
            .unwrap();
        let without = engine.load(data_module("without", 1, &[])).unwrap();
        // Fill both slots with the image module, so the next tenant must reuse one.
        let a = Instance::new(&with_data).unwrap();
        let b = Instance::new(&with_data).unwrap();
        drop((a, b));
        let plain = Instance::new(&without).unwrap();
        assert!(
            contents(&plain).iter().all(|&x| x == 0),
            "keep {keep}: image bytes leaked into a module without data"
        );
        drop(plain);
        let again = Instance::new(&with_data).unwrap();
        assert!(contents(&again)[..5000].iter().all(|&x| x == 0xAB));
    }
}

#[test]
fn an_image_comes_back_after_a_tenant_wrote_over_it() {
    for keep in [0, PAGE, 1 << 20] {
        let engine = engine(true, true, keep);
        let module = engine
            .load(data_module(
                "img",
                2,
                &[(10, vec![7; 70_000]), (PAGE as u32 + 9000, vec![9; 10])],
            ))
            .unwrap();
        let expected = contents(&Instance::new(&module).unwrap());
        for _ in 0..3 {
            let mut tenant = Instance::new(&module).unwrap();
            assert!(
                contents(&tenant) == expected,
                "keep {keep}: the image was not restored"
            );
            tenant.memory_write(0, 0, &vec![0x55; 2 * PAGE]).unwrap();
            tenant.memory_grow(0, 1).unwrap();
            tenant.memory_write(0, 2 * PAGE as u64, &[0x66; 100]).unwrap();
        }
        let stats = engine.stats();
        assert!(stats.resets() >= 4);
    }
}

#[test]
fn element_segments_fill_tables_through_the_resolver() {
    let module = Module::builder()
        .name("elems")
        .defined_funcs(4)
        .table(TableType::new(6, None))
        .element(ElementSegment {
            kind: ElementKind::Active {
                table: TableIndex::from_u32(0),
                offset: ConstExpr::I32(2),
            },
            items: vec![
                ElementItem::Func(FuncIndex::from_u32(3)),
                ElementItem::Null,
                ElementItem::Func(FuncIndex::from_u32(0)),
            ],
        })
        .element(ElementSegment {
            kind: ElementKind::Passive,
            items: vec![ElementItem::Func(FuncIndex::from_u32(1))],
        })
        .build()
        .unwrap();
    for pooling in [false, true] {
        let engine = engine(pooling, true, 0);
        let module = engine.load(module_clone(&module)).unwrap();
        let instance = Instance::builder(&module)
            .func_resolver(|f| 1000 + f.as_u32() as usize)
            .instantiate()
            .unwrap();
        let words: Vec<usize> = (0..6).map(|i| instance.table_get(0, i).unwrap()).collect();
        assert_eq!(words, vec![0, 0, 1003, 0, 1000, 0]);
    }
}

#[test]
fn the_default_resolver_gives_each_function_its_index_plus_one_and_null_zero() {
    // Long enough for the vectorized loop and its tail (61 elements in a pooled table's 64),
    // with nulls among the functions.
    let items: Vec<ElementItem> = (0..61u32)
        .map(|i| {
            if i % 7 == 3 {
                ElementItem::Null
            } else {
                ElementItem::Func(FuncIndex::from_u32(i * 13 % 50))
            }
        })
        .collect();
    let expected: Vec<usize> = std::iter::once(0)
        .chain((0..61u32).map(|i| if i % 7 == 3 { 0 } else { (i * 13 % 50) as usize + 1 }))
        .chain([0, 0])
        .collect();
    for pooling in [false, true] {
        let module = Module::builder()
            .name("defaults")
            .defined_funcs(50)
            .table(TableType::new(64, None))
            .element(ElementSegment {
                kind: ElementKind::Active {
                    table: TableIndex::from_u32(0),
                    offset: ConstExpr::I32(1),
                },
                items: items.clone(),
            })
            .build()
            .unwrap();
        let engine = engine(pooling, true, 0);
        let module = engine.load(module).unwrap();
        let instance = Instance::new(&module).unwrap();
        let words: Vec<usize> = (0..64).map(|i| instance.table_get(0, i).unwrap()).collect();
        assert_eq!(words, expected, "pooling: {pooling}");
    }
}

/// Module facts are not `Clone` (each has its own id); rebuild the element module.
fn module_clone(module: &Module) -> Module {
    let mut builder = Module::builder()
        .name("elems")
        .defined_funcs(module.num_defined_funcs())
        .table(TableType::new(6, None));
    for segment in module.element_segments() {
        builder = builder.element(segment.clone());
    }
    builder.build().unwrap()
}

#[test]
fn out_of_bounds_segments_fail_and_give_everything_back() {
    for pooling in [false, true] {
        let engine = engine(pooling, true, 0);
        let table = Module::builder()
            .name("bad-elem")
            .defined_funcs(1)
            .memory(MemoryType::new(1, None))
            .table(TableType::new(2, None))
            .element(ElementSegment {
                kind: ElementKind::Active {
                    table: TableIndex::from_u32(0),
                    offset: ConstExpr::I32(1),
                },
                items: vec![ElementItem::Null; 2],
            })
            .build()
            .unwrap();
        let error = Instance::new(&engine.load(table).unwrap()).unwrap_err();
        let text = format!("{error:#}");
        assert!(
            text.contains("element segment 0") && text.contains("table 0"),
            "{text}"
        );
        let oob = error
            .chain()
            .find_map(|e| e.downcast_ref::<OutOfBounds>())
            .expect("typed");
        assert_eq!((oob.offset, oob.len, oob.size), (1, 2, 2));

        let memory = engine
            .load(data_module("bad-data", 1, &[(PAGE as u32 - 1, vec![1, 2])]))
            .unwrap();
        let error = Instance::new(&memory).unwrap_err();
        let oob = error
            .chain()
            .find_map(|e| e.downcast_ref::<OutOfBounds>())
            .expect("typed");
        assert_eq!(
            (oob.resource.as_str(), oob.offset, oob.len, oob.size),
            ("memory 0", PAGE as u64 - 1, 2, PAGE as u64)
        );
        assert!(format!("{error:#}").contains("data segment 0"), "{error:#}");
        let stats = engine.stats();
        assert_eq!(
            (stats.live_instances, stats.live_memories, stats.live_tables),
            (0, 0, 0)
        );
    }
}

#[test]
fn offsets_from_imported_globals_are_read_at_instantiation() {
    let module = Module::builder()
        .name("global-offset")
        .import_global(GlobalType {
            content: ValType::I32,
            mutable: false,
        })
        .memory(MemoryType::new(1, None))
        .data(data(ConstExpr::GlobalGet(GlobalIndex::from_u32(0)), b"placed"))
        .build()
        .unwrap();
    let engine = engine(true, true, 0);
    assert!(
        module
            .memory_image(berth_core::DefinedMemoryIndex::from_u32(0))
            .unwrap()
            .is_none(),
        "no image: the offset is not constant"
    );
    let module = engine.load(module).unwrap();
    let imports = one_global(1234u128.to_le_bytes());
    // SAFETY: the only import is a leaked, live i32 global.
    let instance = unsafe { Instance::builder(&module).imports(imports) }
        .instantiate()
        .unwrap();
    let mut placed = [0u8; 6];
    instance.memory_read(0, 1234, &mut placed).unwrap();
    assert_eq!(&placed, b"placed");
}

#[test]
fn globals_copied_from_imported_ones_hold_only_their_value() {
    // An embedder's i32 or f32 global may leave bytes past its value set; a defined global
    // initialized from it is zero-extended like any i32.const, so code reading it as an i64
    // slot, and an offset reading it, see the value alone.
    for content in [ValType::I32, ValType::F32, ValType::I64, ValType::FuncRef] {
        let ty = |mutable| GlobalType { content, mutable };
        let module = Module::builder()
            .name("copied-global")
            .import_global(ty(false))
            .global(
                ty(false),
                berth_core::GlobalInit::GetGlobal(GlobalIndex::from_u32(0)),
            )
            .build()
            .unwrap();
        let module = engine(false, true, 0).load(module).unwrap();
        let mut storage = [0xAA; 16];
        storage[..4].copy_from_slice(&100u32.to_le_bytes());
        let imports = one_global(storage);
        // SAFETY: the only import is a leaked, live global of the imported type.
        let instance = unsafe { Instance::builder(&module).imports(imports) }
            .instantiate()
            .unwrap();
        let width = match content {
            ValType::I32 | ValType::F32 => 4,
            _ => 8,
        };
        let copied = instance.global(1).unwrap().storage;
        assert_eq!(copied[..width], storage[..width], "{content:?}: the value");
        assert!(copied[width..].iter().all(|&b| b == 0), "{content:?}: {copied:?}");
    }
}

#[test]
fn segments_write_through_imported_memories_and_tables() {
    let engine = engine(false, true, 0);
    let exporter = engine
        .load(
            Module::builder()
                .name("exporter")
                .memory(MemoryType::new(1, None))
                .table(TableType::new(4, None))
                .build()
                .unwrap(),
        )
        .unwrap();
    let a = Instance::new(&exporter).unwrap();
    let offsets = exporter.offsets();
    let vmctx = a.vmctx().cast::<u8>();
    let memory_definition = vmctx
        .wrapping_add(offsets.vmctx_vmmemory_definition(berth_core::OwnedMemoryIndex::from_u32(0)) as usize);
    let table_definition = vmctx
        .wrapping_add(offsets.vmctx_vmtable_definition(berth_core::DefinedTableIndex::from_u32(0)) as usize);
    let imports = || OwnedImports {
        memories: vec![berth_core::VMMemoryImport {
            from: memory_definition.cast(),
            vmctx: a.vmctx(),
        }],
        tables: vec![berth_core::VMTableImport {
            from: table_definition.cast(),
            vmctx: a.vmctx(),
        }],
        ..OwnedImports::default()
    };
    let importer = |offset: i32| {
        Module::builder()
            .name("importer")
            .defined_funcs(1)
            .import_memory(MemoryType::new(1, None))
            .import_table(TableType::new(4, None))
            .data(data(ConstExpr::I32(offset), b"through the import"))
            .element(ElementSegment {
                kind: ElementKind::Active {
                    table: TableIndex::from_u32(0),
                    offset: ConstExpr::I32(3),
                },
                items: vec![ElementItem::Func(FuncIndex::from_u32(0))],
            })
            .build()
            .unwrap()
    };
    let good = engine.load(importer(4000)).unwrap();
    // SAFETY: the imports point at `a`'s live memory and table definitions, and `a` outlives `b`.
    let b = unsafe { Instance::builder(&good).imports(imports()) }
        .func_resolver(|_| 77)
        .instantiate()
        .unwrap();
    let mut text = [0u8; 18];
    a.memory_read(0, 4000, &mut text).unwrap();
    assert_eq!(&text, b"through the import");
    assert_eq!(a.table_get(0, 3).unwrap(), 77);
    drop(b);

    let bad = engine.load(importer(PAGE as i32 - 4)).unwrap();
    // SAFETY: the imports point at `a`'s live memory and table definitions, and `a` outlives
    // the attempt.
    let error = unsafe { Instance::builder(&bad).imports(imports()) }
        .instantiate()
        .unwrap_err();
    assert!(error.chain().any(|e| e.is::<OutOfBounds>()), "{error:#}");
    assert_eq!(engine.stats().live_instances, 1, "only `a` is left");
}

#[test]
fn sparse_data_makes_a_sparse_image() {
    let sparse = Module::builder()
        .name("sparse")
        .memory(MemoryType::new(16, None))
        .data(data(ConstExpr::I32(0), b"a"))
        .data(data(ConstExpr::I32(16 * PAGE as i32 - 1), b"z"))
        .build()
        .unwrap();
    let image = sparse
        .memory_image(berth_core::DefinedMemoryIndex::from_u32(0))
        .unwrap()
        .expect("an image");
    assert_eq!(
        (image.offset(), image.len()),
        (0, 16 * PAGE),
        "the image spans the data"
    );
    for pooling in [false, true] {
        let engine = engine(pooling, true, 0);
        let module = engine.load(module_like(&sparse)).unwrap();
        for _ in 0..2 {
            let mut instance = Instance::new(&module).unwrap();
            let bytes = contents(&instance);
            assert_eq!((bytes[0], bytes[16 * PAGE - 1]), (b'a', b'z'));
            assert!(bytes[1..16 * PAGE - 1].iter().all(|&b| b == 0));
            instance.memory_write(0, 5 * PAGE as u64, &[9; 100]).unwrap();
        }
    }
}

/// The same memory and data as `module`, as a new module (facts are not `Clone`).
fn module_like(module: &Module) -> Module {
    let mut builder = Module::builder().name("copy");
    for (_, ty) in module.defined_memories() {
        builder = builder.memory(*ty);
    }
    for segment in module.data_segments() {
        builder = builder.data(segment.clone());
    }
    builder.build().unwrap()
}

#[test]
fn a_module_purged_while_its_slot_waits_for_reset_leaves_no_warm_slot() {
    let mut config = Config::new();
    config.memory_reservation(1 << 20).memory_guard_size(PAGE as u64);
    let mut pool = PoolingConfig::new();
    pool.total_memories(4)
        .total_tables(4)
        .max_memory_size(1 << 20)
        .linear_memory_keep_resident(0)
        .pagemap_scan(false)
        .decommit_batch_size(8);
    let allocator =
        std::sync::Arc::new(berth_engine::PoolingInstanceAllocator::new(&pool, config.tunables()).unwrap());
    config.allocation_strategy(InstanceAllocationStrategy::Custom(allocator.clone()));
    let engine = Engine::new(&config).unwrap();
    let a = engine.load(data_module("a", 1, &[(0, vec![7; 4096])])).unwrap();
    let mut tenant = Instance::new(&a).unwrap();
    tenant.memory_write(0, 0, &[1]).unwrap();
    drop(tenant); // its pages wait in the queue (a blind decommit): the batch holds up to eight ranges
    drop(a); // purged while its slot waits
    let b = engine.load(data_module("b", 1, &[])).unwrap();
    drop(Instance::new(&b).unwrap()); // nothing to decommit: straight back to the pool
    assert!(allocator.flush_decommits(), "a's decommit was queued");
    assert_eq!(
        engine.stats().warm_memory_slots,
        1,
        "only b's slot is warm; a's went cold"
    );
}

/// A clone of a module is the same module (same id, shared images): loaded twice, it is
/// forgotten by the backend only when both loaded modules are gone, and instances of either
/// reuse the same warm slot.
#[test]
fn clones_of_a_module_loaded_twice_are_purged_with_the_last() {
    let mut config = Config::new();
    config.memory_reservation(1 << 20).memory_guard_size(PAGE as u64);
    let mut pool = PoolingConfig::new();
    pool.total_memories(4).total_tables(4).max_memory_size(1 << 20);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let engine = Engine::new(&config).unwrap();
    let module = data_module("twice", 1, &[(0, vec![7; 2 * 4096])]);
    assert_eq!(module.clone().id(), module.id());
    let first = engine.load(module.clone()).unwrap();
    let second = engine.load(module).unwrap();
    drop(Instance::new(&first).unwrap());
    let warm = engine.stats().warm_memory_slots;
    assert_eq!(warm, 1, "the first loaded module's slot is warm");
    drop(first);
    assert_eq!(
        engine.stats().warm_memory_slots,
        warm,
        "the module is still loaded: its warm slot stays"
    );
    let tenant = Instance::new(&second).unwrap();
    let mut byte = [0u8];
    tenant.memory_read(0, 4096, &mut byte).unwrap();
    assert_eq!(byte, [7], "the image is the module's");
    drop(tenant);
    assert_eq!(engine.stats().warm_memory_slots, 1, "one slot, reused");
    drop(second);
    assert_eq!(
        engine.stats().warm_memory_slots,
        0,
        "purged with the last loaded module"
    );
}

/// Constant expressions may `global.get` any earlier immutable global, defined ones included
/// (Wasm 3.0): global initializers and data and element offsets read them, on both backends,
/// with and without images, and an offset loading can resolve still makes an image.
#[test]
fn constant_expressions_read_defined_immutable_globals() {
    let wat = r#"(module
        (global $base i32 (i32.const 4096))
        (global $again i32 (global.get $base))
        (global $wide i64 (i64.const 8192))
        (global $slot i32 (i32.const 3))
        (memory 1)
        (memory i64 1)
        (table 8 funcref)
        (func $f)
        (data (memory 0) (global.get $again) "placed")
        (data (memory 1) (global.get $wide) "wide")
        (elem (table 0) (global.get $slot) func $f))"#;
    let parsed = berth_wasm::parse(wat.as_bytes()).unwrap();
    for memory in 0..2 {
        assert!(
            parsed
                .memory_image(berth_core::DefinedMemoryIndex::from_u32(memory))
                .unwrap()
                .is_some(),
            "memory {memory}: its offset is known at load, so its data is an image"
        );
    }
    for (pooling, cow) in [(false, false), (false, true), (true, false), (true, true)] {
        let engine = engine_with(pooling, cow, 0, 2);
        let module = engine.load(berth_wasm::parse(wat.as_bytes()).unwrap()).unwrap();
        let instance = Instance::new(&module).unwrap();
        let global = |i: u32| u128::from_le_bytes(instance.global(i).unwrap().storage);
        assert_eq!((global(0), global(1), global(2)), (4096, 4096, 8192));
        let mut placed = [0u8; 6];
        instance.memory_read(0, 4096, &mut placed).unwrap();
        assert_eq!(&placed, b"placed", "pooling {pooling}, cow {cow}");
        let mut wide = [0u8; 4];
        instance.memory_read(1, 8192, &mut wide).unwrap();
        assert_eq!(&wide, b"wide", "pooling {pooling}, cow {cow}");
        assert_ne!(instance.table_get(0, 3).unwrap(), 0, "element 3 holds $f");
        assert_eq!(instance.table_get(0, 2).unwrap(), 0);
    }
}

/// `global.get` in an element expression (reference types): the item is the global's word,
/// from an imported global or a defined one, beside functions and nulls in the same segment.
#[test]
fn element_items_read_reference_globals() {
    let wat = r#"(module
        (import "e" "f" (global $imported funcref))
        (global $defined funcref (ref.func $h))
        (table 6 funcref)
        (func $g) (func $h)
        (elem (i32.const 1) funcref (global.get $imported) (ref.func $g) (ref.null func) (global.get $defined)))"#;
    for pooling in [false, true] {
        let engine = engine(pooling, true, 0);
        let module = engine.load(berth_wasm::parse(wat.as_bytes()).unwrap()).unwrap();
        let imports = one_global(0xF00Du128.to_le_bytes());
        // SAFETY: the only import is a leaked, live funcref global.
        let instance = unsafe { Instance::builder(&module).imports(imports) }
            .func_resolver(|f| 1000 + f.as_u32() as usize)
            .instantiate()
            .unwrap();
        let words: Vec<usize> = (0..6).map(|i| instance.table_get(0, i).unwrap()).collect();
        // Functions: $g is 0, $h is 1 (no function is imported).
        assert_eq!(words, [0, 0xF00D, 1000, 0, 1001, 0], "pooling {pooling}");
    }
    let mutable = r#"(module (global $m (mut funcref) (ref.null func)) (table 1 funcref)
        (elem (i32.const 0) funcref (global.get $m)))"#;
    assert!(
        berth_wasm::parse(mutable.as_bytes()).is_err(),
        "wasm forbids a mutable global here"
    );
    // A module built by other means is held to the same: an immutable reference global.
    let ty = |content, mutable| GlobalType { content, mutable };
    let active = ElementKind::Active {
        table: TableIndex::from_u32(0),
        offset: ConstExpr::I32(0),
    };
    let odd = [
        (
            ty(ValType::I32, false),
            berth_core::GlobalInit::I32(0),
            ElementKind::Passive,
        ),
        (
            ty(ValType::FuncRef, true),
            berth_core::GlobalInit::RefNull,
            ElementKind::Passive,
        ),
        // An externref's word in a funcref table: code calling through it would take it for
        // a function.
        (
            ty(ValType::ExternRef, false),
            berth_core::GlobalInit::RefNull,
            active,
        ),
    ];
    for (ty, init, kind) in odd {
        let error = Module::builder()
            .name("odd-item")
            .global(ty, init)
            .table(TableType::new(1, None))
            .element(ElementSegment {
                kind,
                items: vec![ElementItem::Global(GlobalIndex::from_u32(0))],
            })
            .build()
            .expect_err("not an immutable reference global");
        assert!(format!("{error:#}").contains("reads global 0"), "{error:#}");
    }
}

/// What a constant expression may not read is refused when the module is built, saying why.
#[test]
fn constant_expressions_of_mutable_or_later_globals_are_refused() {
    let mutable = GlobalType {
        content: ValType::I32,
        mutable: true,
    };
    let immutable = GlobalType {
        content: ValType::I32,
        mutable: false,
    };
    let error = Module::builder()
        .name("mutable-offset")
        .global(mutable, berth_core::GlobalInit::I32(0))
        .memory(MemoryType::new(1, None))
        .data(data(ConstExpr::GlobalGet(GlobalIndex::from_u32(0)), b"x"))
        .build()
        .unwrap_err();
    assert!(format!("{error:#}").contains("immutable global"), "{error:#}");
    let error = Module::builder()
        .name("mutable-init")
        .global(mutable, berth_core::GlobalInit::I32(0))
        .global(
            immutable,
            berth_core::GlobalInit::GetGlobal(GlobalIndex::from_u32(0)),
        )
        .build()
        .unwrap_err();
    assert!(format!("{error:#}").contains("earlier immutable"), "{error:#}");
    let error = Module::builder()
        .name("forward")
        .global(
            immutable,
            berth_core::GlobalInit::GetGlobal(GlobalIndex::from_u32(1)),
        )
        .global(immutable, berth_core::GlobalInit::I32(0))
        .build()
        .unwrap_err();
    assert!(format!("{error:#}").contains("earlier immutable"), "{error:#}");
}
