//! End to end through `Config`: the on-demand strategy and a custom backend written here, as
//! an embedder would write one.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow, bail};
use berth_core::{
    AllocatorStats, DefinedMemoryIndex, DefinedTableIndex, GlobalInit, GlobalType, HostPtr,
    InstanceAllocationRequest, InstanceAllocatorImpl, Memory, MemoryAllocationIndex, MemoryType, Mmap,
    Module, ModuleId, Table, TableAllocationIndex, TableType, VMFunctionImport, VMGlobalDefinition,
    VMGlobalImport, VMOffsets, ValType,
};
use berth_engine::{Config, Engine, Instance, InstanceAllocationStrategy, OwnedImports};

const PAGE: usize = 65536;

/// A custom backend: `slots` memory slots of `slot_size` bytes in one reservation, reused
/// first-in first-out; each slot is reset (decommitted and protected) when given back.
struct SlabAllocator {
    slab: Mutex<Mmap>,
    base: NonNull<u8>,
    slot_size: usize,
    free: Mutex<Vec<u32>>,
    instances: AtomicU64,
    memories: AtomicU64,
    tables: AtomicU64,
    resets: AtomicU64,
}

// SAFETY: `base` points into `slab`, which lives as long as the allocator; slots are handed
// to one memory at a time through the `free` list.
unsafe impl Send for SlabAllocator {}
// SAFETY: `&SlabAllocator` reaches the slab only through the `free` list and the slab's `Mutex`,
// and counts in atomics.
unsafe impl Sync for SlabAllocator {}

impl SlabAllocator {
    fn new(slots: u32, slot_size: usize) -> Result<Self> {
        let mut slab = Mmap::reserve(slots as usize * slot_size)?;
        let base = NonNull::new(slab.as_mut_ptr()).ok_or_else(|| anyhow!("empty slab"))?;
        Ok(SlabAllocator {
            slab: Mutex::new(slab),
            base,
            slot_size,
            free: Mutex::new((0..slots).rev().collect()),
            instances: AtomicU64::new(0),
            memories: AtomicU64::new(0),
            tables: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        })
    }
}

// SAFETY: each slot is given to one memory at a time and reset (zeroed, `PROT_NONE`) before it
// is handed out again; tables are fresh `Vec`s; counts are balanced.
unsafe impl InstanceAllocatorImpl for SlabAllocator {
    fn validate_module_impl(&self, module: &Module, _offsets: &VMOffsets<HostPtr>) -> Result<()> {
        for (index, ty) in module.defined_memories() {
            if ty.minimum_bytes().unwrap_or(u64::MAX) > self.slot_size as u64 {
                bail!(
                    "memory {} does not fit a slot of {} bytes",
                    index.as_u32(),
                    self.slot_size
                );
            }
        }
        Ok(())
    }

    fn increment_core_instance_count(&self) -> Result<()> {
        self.instances.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn decrement_core_instance_count(&self) {
        self.instances.fetch_sub(1, Ordering::SeqCst);
    }

    unsafe fn allocate_memory(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &MemoryType,
        _memory_index: DefinedMemoryIndex,
    ) -> Result<(MemoryAllocationIndex, Memory)> {
        let slot = self
            .free
            .lock()
            .unwrap()
            .pop()
            .ok_or_else(|| anyhow!("slab exhausted"))?;
        // SAFETY: the slot is inside the slab (slot < slots), page-aligned, reset, and ours
        // alone until it is given back.
        let base = unsafe { self.base.add(slot as usize * self.slot_size) };
        // SAFETY: `base` is this slot's page-aligned start, `slot_size` bytes inside the slab, ours
        // alone until given back; the slab outlives every memory.
        match unsafe { Memory::new_static(ty, base, self.slot_size, 0, request.limiter.as_deref_mut()) } {
            Ok(memory) => {
                self.memories.fetch_add(1, Ordering::SeqCst);
                Ok((MemoryAllocationIndex::from_u32(slot), memory))
            }
            Err(error) => {
                self.free.lock().unwrap().push(slot);
                Err(error)
            }
        }
    }

    unsafe fn deallocate_memory(
        &self,
        _index: DefinedMemoryIndex,
        slot: MemoryAllocationIndex,
        memory: Memory,
    ) {
        drop(memory);
        let offset = slot.as_u32() as usize * self.slot_size;
        let mut slab = self.slab.lock().unwrap();
        slab.decommit(offset, self.slot_size).expect("decommit");
        slab.make_inaccessible(offset, self.slot_size).expect("protect");
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.free.lock().unwrap().insert(0, slot.as_u32());
        self.memories.fetch_sub(1, Ordering::SeqCst);
    }

    unsafe fn allocate_table(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &TableType,
        _index: DefinedTableIndex,
    ) -> Result<(TableAllocationIndex, Table)> {
        let table = Table::new_dynamic(ty, None, request.limiter.as_deref_mut())?;
        self.tables.fetch_add(1, Ordering::SeqCst);
        Ok((TableAllocationIndex::default(), table))
    }

    unsafe fn deallocate_table(&self, _index: DefinedTableIndex, _slot: TableAllocationIndex, table: Table) {
        drop(table);
        self.tables.fetch_sub(1, Ordering::SeqCst);
    }

    fn purge_module(&self, _module: ModuleId) {}

    fn stats(&self) -> AllocatorStats {
        let mut stats = AllocatorStats::default();
        stats.live_instances = self.instances.load(Ordering::SeqCst);
        stats.live_memories = self.memories.load(Ordering::SeqCst);
        stats.live_tables = self.tables.load(Ordering::SeqCst);
        stats.reserved_bytes = self.slab.lock().unwrap().len() as u64;
        stats.memory_resets = self.resets.load(Ordering::SeqCst);
        stats
    }
}

fn rich_module() -> Module {
    Module::builder()
        .name("rich")
        .imported_funcs(2)
        .defined_funcs(3)
        .import_global(GlobalType {
            content: ValType::I64,
            mutable: false,
        })
        .memory(MemoryType::new(1, Some(4)))
        .memory(MemoryType::new(2, None))
        .table(TableType::new(4, Some(8)))
        .global(
            GlobalType {
                content: ValType::I32,
                mutable: true,
            },
            GlobalInit::I32(-7),
        )
        .global(
            GlobalType {
                content: ValType::FuncRef,
                mutable: false,
            },
            GlobalInit::RefFunc(berth_core::FuncIndex::from_u32(4)),
        )
        .global(
            GlobalType {
                content: ValType::I64,
                mutable: false,
            },
            GlobalInit::GetGlobal(berth_core::GlobalIndex::from_u32(0)),
        )
        .build()
        .unwrap()
}

/// The rich module's imports: two functions (never called: Berth only stores them) and an
/// `i64` global holding 40, leaked so it outlives every instance.
fn imports() -> OwnedImports {
    let global = Box::leak(Box::new(VMGlobalDefinition {
        storage: 40u128.to_le_bytes(),
    }));
    OwnedImports {
        functions: vec![
            VMFunctionImport {
                body: 0x1000 as *const u8,
                vmctx: std::ptr::null_mut(),
            },
            VMFunctionImport {
                body: 0x2000 as *const u8,
                vmctx: std::ptr::null_mut(),
            },
        ],
        globals: vec![VMGlobalImport { from: global }],
        ..OwnedImports::default()
    }
}

/// An instantiation of `module` linked with [`imports`].
fn linked(module: &berth_engine::LoadedModule) -> berth_engine::InstanceBuilder<'_> {
    // SAFETY: the global points at a leaked, live definition; the function imports are never
    // dereferenced by Berth (no code runs); the rich module imports no table or memory.
    unsafe { Instance::builder(module).imports(imports()) }
}

/// Reads a `T` at `offset` in the instance's vmctx.
fn vmctx_read<T: Copy>(instance: &Instance, offset: u32) -> T {
    // SAFETY: offsets come from the instance's own `VMOffsets`, inside its vmctx.
    unsafe {
        instance
            .vmctx()
            .cast::<u8>()
            .add(offset as usize)
            .cast::<T>()
            .read()
    }
}

/// What every backend must do for an embedder, checked through the safe API and the vmctx.
fn exercise(engine: &Engine) {
    let module = engine.load(rich_module()).unwrap();
    let offsets = *module.offsets();
    let mut instance = linked(&module)
        .func_resolver(|f| 0x10_0000 + f.as_u32() as usize)
        .host_state(String::from("tenant 7"))
        .instantiate()
        .unwrap();
    assert_eq!(
        instance.host_state().downcast_ref::<String>().unwrap(),
        "tenant 7"
    );

    // Imports are where compiled code looks for them.
    let f1: VMFunctionImport = vmctx_read(
        &instance,
        offsets.vmctx_vmfunction_import(berth_core::FuncIndex::from_u32(1)),
    );
    assert_eq!(f1.body as usize, 0x2000);
    let g0: VMGlobalImport = vmctx_read(
        &instance,
        offsets.vmctx_vmglobal_import(berth_core::GlobalIndex::from_u32(0)),
    );
    // SAFETY: the import points at the leaked definition made by `imports`.
    assert_eq!(u128::from_le_bytes(unsafe { g0.from.read() }.storage), 40);
    // A global initialized with `global.get` of the import read it at instantiation.
    assert_eq!(&instance.global(3).unwrap().storage[..8], &40i64.to_le_bytes());

    // Globals hold their initial values; ref.func went through the resolver.
    assert_eq!(&instance.global(1).unwrap().storage[..4], &(-7i32).to_le_bytes());
    assert_eq!(
        &instance.global(2).unwrap().storage[..8],
        &(0x10_0004usize).to_le_bytes()
    );
    assert!(instance.global(0).is_none(), "global 0 is imported");

    // Memories: the vmctx definitions and pointers agree with the memories, also after growth.
    let check_memory = |instance: &Instance, memory: u32| {
        let index = DefinedMemoryIndex::from_u32(memory);
        let definition = instance.core().vmmemory_definition(index).unwrap();
        assert_eq!(definition, instance.core().memory(index).unwrap().vmmemory());
        let pointer: *mut berth_core::VMMemoryDefinition =
            vmctx_read(instance, offsets.vmctx_vmmemory_pointer(index));
        // SAFETY: the pointer region points at the definition inside the same vmctx.
        assert_eq!(unsafe { pointer.read() }, definition);
        assert_eq!(definition.current_length, instance.memory_size(memory).unwrap());
    };
    check_memory(&instance, 0);
    check_memory(&instance, 1);
    instance.memory_write(1, 2 * PAGE as u64 - 4, b"edge").unwrap();
    assert!(
        instance.memory_write(1, 2 * PAGE as u64 - 3, b"edge").is_err(),
        "out of bounds"
    );
    assert_eq!(instance.memory_grow(0, 3).unwrap(), Some(1));
    assert_eq!(instance.memory_grow(0, 1).unwrap(), None, "maximum is 4 pages");
    check_memory(&instance, 0);
    let mut edge = [0u8; 4];
    instance.memory_read(1, 2 * PAGE as u64 - 4, &mut edge).unwrap();
    assert_eq!(&edge, b"edge");

    // Tables, likewise.
    let table = DefinedTableIndex::from_u32(0);
    instance.table_set(0, 3, 99).unwrap();
    assert!(instance.table_set(0, 4, 1).is_err());
    assert_eq!(instance.table_grow(0, 4, 5).unwrap(), Some(4));
    assert_eq!(instance.table_grow(0, 1, 5).unwrap(), None, "maximum is 8");
    assert_eq!(
        (
            instance.table_get(0, 3).unwrap(),
            instance.table_get(0, 7).unwrap()
        ),
        (99, 5)
    );
    assert_eq!(
        instance.core().vmtable_definition(table).unwrap(),
        instance.core().table(table).unwrap().vmtable()
    );
    assert_eq!(
        instance
            .core()
            .vmtable_definition(table)
            .unwrap()
            .current_elements,
        8
    );

    let stats = engine.stats();
    assert_eq!(
        (stats.live_instances, stats.live_memories, stats.live_tables),
        (1, 2, 1)
    );
    drop(instance);

    // A new tenant sees none of the old one's bytes.
    let second = linked(&module).instantiate().unwrap();
    let mut buf = vec![0xffu8; 2 * PAGE];
    second.memory_read(1, 0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "a previous tenant's bytes are visible"
    );
    assert_eq!(second.memory_size(0).unwrap(), PAGE, "back to the initial size");
    assert_eq!(second.table_get(0, 3).unwrap(), 0);
    drop(second);
    let stats = engine.stats();
    assert_eq!(
        (stats.live_instances, stats.live_memories, stats.live_tables),
        (0, 0, 0)
    );

    // Wrong imports are an error that names them, and nothing is left allocated.
    let error = Instance::new(&module).unwrap_err();
    assert!(
        format!("{error:#}").contains("imports 2 functions but 0 were given"),
        "{error:#}"
    );
    assert_eq!(engine.stats().live_instances, 0);
}

/// Address space of one memory reservation with `config`'s tunables, guards included.
fn reservation_len(config: &Config) -> u64 {
    let tunables = config.tunables();
    tunables.pre_guard_size() + tunables.memory_reservation + tunables.memory_guard_size
}

#[test]
fn on_demand_end_to_end() {
    let config = Config::new();
    let engine = Engine::new(&config).unwrap();
    assert_eq!(engine.strategy_name(), "on-demand");
    exercise(&engine);
    // What is left is the address space of freed memories kept for the next ones, and running
    // the same instances again reuses it rather than adding to it.
    let after_one = engine.stats();
    assert!(after_one.warm_memory_slots > 0);
    assert_eq!(
        after_one.reserved_bytes,
        after_one.warm_memory_slots * reservation_len(&config)
    );
    exercise(&engine);
    assert_eq!(engine.stats(), after_one);
}

#[test]
fn on_demand_without_cached_reservations_gives_all_address_space_back() {
    let mut config = Config::new();
    let allocator = berth_engine::OnDemandInstanceAllocator::new().with_cached_reservations(0);
    config.allocation_strategy(InstanceAllocationStrategy::Custom(Arc::new(allocator)));
    let engine = Engine::new(&config).unwrap();
    exercise(&engine);
    let stats = engine.stats();
    assert_eq!((stats.reserved_bytes, stats.warm_memory_slots), (0, 0));
}

#[test]
fn custom_backend_end_to_end() {
    let slab = Arc::new(SlabAllocator::new(4, 8 * PAGE).unwrap());
    let mut config = Config::new();
    config.allocation_strategy(InstanceAllocationStrategy::Custom(slab.clone()));
    let engine = Engine::new(&config).unwrap();
    assert_eq!(engine.strategy_name(), "custom");
    exercise(&engine);
    let stats = engine.stats();
    assert_eq!(stats.resets(), 4, "two instances of two memories each were reset");
    assert_eq!(stats.reserved_bytes, 32 * PAGE as u64);

    let too_big = berth_tests::named_memory("big", MemoryType::new(9, None));
    let error = engine.load(too_big).unwrap_err();
    assert!(format!("{error:#}").contains("does not fit a slot"), "{error:#}");
}

#[test]
fn inconsistent_configs_are_rejected_with_the_setting_named() {
    let mut config = Config::new();
    config.memory_reservation(12345);
    let error = format!("{:#}", Engine::new(&config).unwrap_err());
    assert!(
        error.contains("memory_reservation") && error.contains("page size"),
        "{error}"
    );

    let mut config = Config::new();
    config.memory_guard_size(1 << 50);
    let error = format!("{:#}", Engine::new(&config).unwrap_err());
    assert!(error.contains("memory_guard_size"), "{error}");

    let mut config = Config::new();
    config
        .memory_reservation(1 << 46)
        .memory_guard_size(1 << 46)
        .guard_before_linear_memory(true);
    let error = format!("{:#}", Engine::new(&config).unwrap_err());
    assert!(error.contains("47-bit"), "{error}");
}

#[test]
fn modules_no_backend_can_instantiate_fail_at_load() {
    let engine = Engine::new(&Config::new()).unwrap();
    let shared = berth_tests::named_memory(
        "threads",
        MemoryType {
            shared: true,
            ..MemoryType::new(1, Some(1))
        },
    );
    let error = format!("{:#}", engine.load(shared).unwrap_err());
    assert!(error.contains("shared") && error.contains("threads"), "{error}");
}

#[test]
fn malformed_module_facts_are_errors() {
    let error = Module::builder()
        .memory(MemoryType::new(3, Some(2)))
        .build()
        .unwrap_err();
    assert!(format!("{error:#}").contains("above its maximum"), "{error:#}");
    let error = Module::builder()
        .memory(MemoryType::new(1, None))
        .import_memory(MemoryType::new(1, None))
        .build();
    assert!(format!("{:#}", error.unwrap_err()).contains("import after"));
    let error = Module::builder()
        .global(
            GlobalType {
                content: ValType::I64,
                mutable: false,
            },
            GlobalInit::I32(1),
        )
        .build()
        .unwrap_err();
    assert!(format!("{error:#}").contains("initializer"), "{error:#}");
    let error = Module::builder()
        .global(
            GlobalType {
                content: ValType::FuncRef,
                mutable: false,
            },
            GlobalInit::RefFunc(berth_core::FuncIndex::from_u32(0)),
        )
        .build()
        .unwrap_err();
    assert!(format!("{error:#}").contains("does not exist"), "{error:#}");
}

#[test]
fn instances_move_between_threads() {
    let engine = Engine::new(&Config::new()).unwrap();
    let module = engine
        .load(berth_tests::one_memory(MemoryType::new(1, None)))
        .unwrap();
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let module = module.clone();
            std::thread::spawn(move || {
                for i in 0..50u8 {
                    let mut instance = Instance::new(&module).unwrap();
                    instance.memory_write(0, 0, &[t, i]).unwrap();
                    let mut buf = [0; 2];
                    instance.memory_read(0, 0, &mut buf).unwrap();
                    assert_eq!(buf, [t, i]);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    assert_eq!(engine.stats().live_instances, 0);
}

#[allow(dead_code)]
fn assert_send<T: Send>() {}
const _: fn() = || assert_send::<Instance>();

#[test]
fn out_of_range_indices_are_errors_not_panics() {
    let engine = Engine::new(&Config::new()).unwrap();
    let module = engine.load(rich_module()).unwrap();
    let mut instance = linked(&module).instantiate().unwrap();
    let mut buf = [0u8; 1];
    for index in [2, 1000, u32::MAX] {
        assert!(instance.memory_read(index, 0, &mut buf).is_err());
        assert!(instance.memory_write(index, 0, &buf).is_err());
        assert!(instance.memory_grow(index, 1).is_err());
        assert!(instance.table_get(index, 0).is_err());
        assert!(instance.table_grow(index, 1, 0).is_err());
        assert!(instance.global(index.saturating_add(2)).is_none());
    }
    assert!(instance.global(u32::MAX).is_none());
    assert!(instance.table_get(0, u64::MAX).is_err());
    assert!(instance.memory_read(0, u64::MAX, &mut buf).is_err());
}

struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("host state drop panicked");
    }
}

#[test]
fn a_panicking_host_state_still_gives_everything_back() {
    let engine = Engine::new(&Config::new()).unwrap();
    let module = engine
        .load(berth_tests::one_memory(MemoryType::new(1, None)))
        .unwrap();
    let instance = Instance::builder(&module)
        .host_state(std::sync::Mutex::new(PanicsOnDrop))
        .instantiate()
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(instance)));
    assert!(result.is_err(), "the host state's panic reaches the caller");
    let stats = engine.stats();
    assert_eq!(
        (stats.live_instances, stats.live_memories, stats.reserved_bytes),
        (0, 0, reservation_len(&Config::new())),
        "only the freed memory's address space is kept"
    );
}

#[test]
fn on_demand_reserved_bytes_follow_a_moved_memory() {
    let mut config = Config::new();
    config
        .memory_reservation(PAGE as u64)
        .memory_reservation_for_growth(0)
        .memory_guard_size(PAGE as u64);
    let engine = Engine::new(&config).unwrap();
    let module = engine
        .load(berth_tests::one_memory(MemoryType::new(1, None)))
        .unwrap();
    let mut instance = Instance::new(&module).unwrap();
    assert_eq!(engine.stats().reserved_bytes, 2 * PAGE as u64);
    assert_eq!(instance.memory_grow(0, 2).unwrap(), Some(1));
    assert_eq!(
        engine.stats().reserved_bytes,
        4 * PAGE as u64,
        "reservation plus guard after the move"
    );
    drop(instance);
    let stats = engine.stats();
    assert_eq!(
        (stats.reserved_bytes, stats.warm_memory_slots),
        (4 * PAGE as u64, 1),
        "the moved reservation is kept for a memory of its layout, the first one unmapped"
    );
}

#[test]
fn instantiation_writes_the_definitions_where_the_instance_block_says() {
    // `InstanceBlock::new`'s location lists (the seed's API) are where instantiation puts each
    // owned memory's and each table's definition: the same vmctx offsets, on both backends.
    for pooling in [false, true] {
        let mut config = Config::new();
        config.memory_reservation(1 << 20).memory_guard_size(65536);
        if pooling {
            let mut pool = berth_engine::PoolingConfig::new();
            pool.total_memories(4)
                .total_tables(4)
                .max_memory_size(1 << 20)
                .max_memories_per_module(2)
                .max_tables_per_module(2);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&config).unwrap();
        let module = Module::builder()
            .memory(MemoryType::new(1, Some(4)))
            .memory(MemoryType::new(2, Some(4)))
            .table(TableType::new(3, None))
            .table(TableType::new(5, None))
            .build()
            .unwrap();
        let module = engine.load(module).unwrap();
        let (block, memories, tables) = berth_core::InstanceBlock::new(module.offsets()).unwrap();
        let vmctx = block.vmctx().as_ptr() as usize;
        let instance = Instance::new(&module).unwrap();
        for (i, location) in memories.iter().enumerate() {
            let offset = u32::try_from(location.as_ptr() as usize - vmctx).unwrap();
            let written: berth_core::VMMemoryDefinition = vmctx_read(&instance, offset);
            let index = berth_core::DefinedMemoryIndex::from_u32(u32::try_from(i).unwrap());
            assert_eq!(Some(written), instance.core().vmmemory_definition(index));
            assert_eq!(written.current_length, (i + 1) * 65536);
        }
        for (i, location) in tables.iter().enumerate() {
            let offset = u32::try_from(location.as_ptr() as usize - vmctx).unwrap();
            let written: berth_core::VMTableDefinition = vmctx_read(&instance, offset);
            let index = berth_core::DefinedTableIndex::from_u32(u32::try_from(i).unwrap());
            assert_eq!(Some(written), instance.core().vmtable_definition(index));
        }
    }
}
