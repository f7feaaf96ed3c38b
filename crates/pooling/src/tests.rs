//! What needs the pool's insides to set up: failures the kernel rarely gives (injected here),
//! and threads placed in chosen shards.

use std::sync::Arc;

use berth_core::{
    DefinedMemoryIndex, DefinedTableIndex, HostPtr, Imports, InstanceAllocationRequest, InstanceAllocator,
    InstanceAllocatorImpl, InstanceHandle, LimiterDenied, MemoryType, Module, ResourceLimiter, TableType,
    Tunables, VMOffsets,
};

use crate::{PoolingConfig, PoolingInstanceAllocator, shard};

const PAGE: usize = 65536;

/// Taken by every test here: decommits take turns across the process, and a release that
/// finds another thread decommitting leaves its batch for later, so a test that counts what a
/// release gave back must not run beside one that decommits.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn tunables() -> Tunables {
    Tunables {
        memory_reservation: 1 << 20,
        memory_guard_size: PAGE as u64,
        memory_reservation_for_growth: 0,
        ..Tunables::default()
    }
}

fn pool(configure: impl FnOnce(&mut PoolingConfig)) -> PoolingInstanceAllocator {
    let mut config = PoolingConfig::new();
    config
        .total_memories(4)
        .total_tables(4)
        .max_memory_size(1 << 20)
        .table_elements(1024);
    configure(&mut config);
    PoolingInstanceAllocator::new(&config, &tunables()).unwrap()
}

struct Loaded {
    module: Arc<Module>,
    offsets: VMOffsets<HostPtr>,
}

fn load(pool: &PoolingInstanceAllocator, name: &str, pages: u64, elements: u64) -> Loaded {
    let module = Module::builder()
        .name(name)
        .memory(MemoryType::new(pages, Some(8)))
        .table(TableType::new(elements, Some(1024)))
        .build()
        .unwrap();
    let offsets = VMOffsets::new(HostPtr, &module).unwrap();
    pool.validate_module(&module, &offsets).unwrap();
    Loaded {
        module: Arc::new(module),
        offsets,
    }
}

fn instantiate(pool: &PoolingInstanceAllocator, loaded: &Loaded) -> InstanceHandle {
    try_instantiate(pool, loaded, None).unwrap()
}

fn try_instantiate(
    pool: &PoolingInstanceAllocator,
    loaded: &Loaded,
    limiter: Option<&mut dyn ResourceLimiter>,
) -> anyhow::Result<InstanceHandle> {
    let resolver = |f: berth_core::FuncIndex| f.as_u32() as usize + 1;
    let tunables = tunables();
    let request = InstanceAllocationRequest {
        module: &loaded.module,
        offsets: &loaded.offsets,
        tunables: &tunables,
        imports: Imports::default(),
        host_state: Box::new(()),
        limiter: limiter.map(|l| l as &mut dyn ResourceLimiter),
        func_resolver: &resolver,
    };
    // SAFETY: `loaded` was validated by this pool, with these offsets.
    unsafe { pool.allocate_module(request) }
}

fn deallocate(pool: &PoolingInstanceAllocator, mut handle: InstanceHandle) {
    // SAFETY: the handle came from this pool's `allocate_module` and is not used again.
    unsafe { pool.deallocate_module(&mut handle) };
}

fn memory() -> DefinedMemoryIndex {
    DefinedMemoryIndex::from_u32(0)
}

fn table() -> DefinedTableIndex {
    DefinedTableIndex::from_u32(0)
}

/// Every byte of memory 0 and every element of table 0 of a new instance.
fn contents(pool: &PoolingInstanceAllocator, loaded: &Loaded) -> (Vec<u8>, Vec<usize>, usize) {
    let mut handle = instantiate(pool, loaded);
    let instance = handle.instance_mut();
    let base = instance.memory(memory()).unwrap().base() as usize;
    let bytes = instance.memory(memory()).unwrap().as_slice().to_vec();
    let elements = instance.table(table()).unwrap().elements().to_vec();
    deallocate(pool, handle);
    (bytes, elements, base)
}

#[test]
fn a_slot_whose_reset_failed_is_remapped_before_reuse() {
    let _serial = serial();
    let pool = pool(|c| {
        c.total_memories(1);
    });
    let a = load(&pool, "a", 2, 4);
    let mut tenant = instantiate(&pool, &a);
    let base = tenant.instance().memory(memory()).unwrap().base() as usize;
    tenant
        .instance_mut()
        .memory_write(memory(), 0, &[0xAB; 4096])
        .unwrap();
    tenant
        .instance_mut()
        .memory_write(memory(), PAGE as u64 + 100, &[0xCD; 100])
        .unwrap();
    pool.fail_next_resets(1);
    deallocate(&pool, tenant);
    let (bytes, _, again) = contents(&pool, &a);
    assert_eq!(again, base, "the only slot is reused");
    assert!(
        bytes.iter().all(|&b| b == 0),
        "a failed reset leaked the previous tenant's bytes"
    );
}

/// Refuses (`Ok(false)`) or panics at the `at`-th creation it is asked about (memory 0 comes
/// before table 0).
struct Refuse {
    at: usize,
    seen: usize,
    panics: bool,
}

impl Refuse {
    fn judge(&mut self, current: usize) -> anyhow::Result<bool> {
        if current != 0 {
            return Ok(true);
        }
        self.seen += 1;
        if self.seen - 1 != self.at {
            return Ok(true);
        }
        assert!(!self.panics, "the limiter panics at creation {}", self.at);
        Ok(false)
    }
}

impl ResourceLimiter for Refuse {
    fn memory_growing(&mut self, current: usize, _: usize, _: Option<usize>) -> anyhow::Result<bool> {
        self.judge(current)
    }
    fn table_growing(&mut self, current: usize, _: usize, _: Option<usize>) -> anyhow::Result<bool> {
        self.judge(current)
    }
}

#[test]
fn a_refused_or_unwound_set_up_gives_its_slot_and_the_pages_kept_in_it_back() {
    let _serial = serial();
    let Some(map) = berth_testkit::page_states::page_map_for("refused set-ups give kept pages back") else {
        return;
    };
    // One slot of each kind: a slot kept by a set-up that never finished shows at once.
    let pool = pool(|c| {
        c.total_core_instances(1).total_memories(1).total_tables(1);
    });
    let a = load(&pool, "a", 2, 4);
    for (at, panics) in [(0, false), (1, false), (0, true), (1, true)] {
        let mut tenant = instantiate(&pool, &a);
        let base = tenant.instance().memory(memory()).unwrap().base();
        tenant
            .instance_mut()
            .memory_write(memory(), 0, &[0xAB; 2 * PAGE])
            .unwrap();
        deallocate(&pool, tenant);
        let slot = std::ptr::NonNull::new(base).unwrap();
        let resident = || {
            map.count(slot, 2 * PAGE, berth_core::sys::PageState::Present)
                .unwrap()
        };
        assert!(resident() > 0, "the warm slot keeps its tenant's pages");
        let mut limiter = Refuse { at, seen: 0, panics };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            try_instantiate(&pool, &a, Some(&mut limiter))
        }));
        match outcome {
            Ok(result) => {
                let Err(error) = result else {
                    panic!("an instance was made though the limiter refused a creation");
                };
                assert!(error.is::<LimiterDenied>(), "{error:#}");
            }
            Err(_) => assert!(panics, "only the panicking limiter unwinds"),
        }
        let stats = pool.stats();
        assert_eq!(
            (stats.live_instances, stats.live_memories, stats.live_tables),
            (0, 0, 0)
        );
        if at == 0 {
            // The memory's set-up was given up: its slot holds nothing resident, counted or not.
            assert_eq!(resident(), 0, "pages kept in a given-up slot (panics: {panics})");
        }
        // Both slots are free again, for the next instance.
        let (bytes, elements, _) = contents(&pool, &a);
        assert!(bytes.iter().all(|&b| b == 0) && elements.iter().all(|&e| e == 0));
    }
}

#[test]
fn a_memory_slot_whose_decommit_failed_is_remapped_before_reuse() {
    let _serial = serial();
    let pool = pool(|c| {
        c.total_memories(1)
            .decommit_batch_size(1)
            .linear_memory_keep_resident(0);
    });
    let a = load(&pool, "a", 2, 4);
    let mut tenant = instantiate(&pool, &a);
    tenant
        .instance_mut()
        .memory_write(memory(), 70_000, &[0xEF; 64])
        .unwrap();
    pool.fail_next_decommits(1);
    deallocate(&pool, tenant);
    let (bytes, ..) = contents(&pool, &a);
    assert!(
        bytes.iter().all(|&b| b == 0),
        "a failed decommit leaked the previous tenant's bytes"
    );
}

#[test]
fn a_table_slot_whose_decommit_failed_is_zeroed() {
    let _serial = serial();
    let pool = pool(|c| {
        c.total_tables(1).decommit_batch_size(1).table_keep_resident(0);
    });
    let a = load(&pool, "a", 1, 1024);
    let mut tenant = instantiate(&pool, &a);
    tenant
        .instance_mut()
        .table_fill(table(), 0, 0xBEEF, 1024)
        .unwrap();
    pool.fail_next_decommits(1);
    deallocate(&pool, tenant);
    // The failed decommit was not run: the elements are still there for the failure path.
    assert_eq!(pool.stats().decommit_ranges, 0);
    let (_, elements, _) = contents(&pool, &a);
    assert!(
        elements.iter().all(|&e| e == 0),
        "a failed decommit left the previous tenant's elements"
    );
}

/// Pages of `len` bytes at `at` present in memory.
fn present(map: &berth_core::sys::PageMap, at: *const u8, len: usize) -> usize {
    let at = std::ptr::NonNull::new(at.cast_mut()).unwrap();
    map.count(at, len, berth_core::sys::PageState::Present).unwrap()
}

#[test]
fn releasing_idle_memory_leaves_no_page_of_a_slot_resident() {
    let _serial = serial();
    let Some(map) = berth_testkit::page_states::page_map_for("idle slots give every page back") else {
        return;
    };
    // A table slot used by a large table, then by a small one: the large one's zeroed pages
    // are still the slot's to give back.
    let tables = pool(|c| {
        c.total_tables(1);
    });
    let large = load(&tables, "large", 1, 1024);
    let small = load(&tables, "small", 1, 4);
    let mut tenant = instantiate(&tables, &large);
    tenant
        .instance_mut()
        .table_fill(table(), 0, 0xBEEF, 1024)
        .unwrap();
    let slot = tenant
        .instance()
        .table(table())
        .unwrap()
        .elements()
        .as_ptr()
        .cast::<u8>();
    deallocate(&tables, tenant);
    deallocate(&tables, instantiate(&tables, &small));
    assert!(
        present(map, slot, 1024 * 8) > 1,
        "the large tenant's pages are kept"
    );
    tables.release_idle_memory();
    assert_eq!(present(map, slot, 1024 * 8), 0, "table pages left resident");
    assert_eq!(tables.stats().idle_table_resident_bytes, 0);

    // Resets without the page map read the first pages and leave those that read as zeros,
    // though a tenant may have written those zeros.
    let unscanned = pool(|c| {
        c.total_memories(1).pagemap_scan(false);
    });
    let a = load(&unscanned, "a", 1, 4);
    let mut tenant = instantiate(&unscanned, &a);
    tenant
        .instance_mut()
        .memory_write(memory(), 0, &[0; PAGE])
        .unwrap();
    let slot = tenant.instance().memory(memory()).unwrap().base();
    deallocate(&unscanned, tenant);
    assert!(
        present(map, slot, PAGE) > 0,
        "the zeros the tenant wrote are resident"
    );
    unscanned.release_idle_memory();
    assert_eq!(present(map, slot, PAGE), 0, "memory pages left resident");
}

/// Runs `f` on a new thread whose home is shard `home` of `shards` (threads are given homes
/// round-robin, so a few tries find one).
fn on_shard(shards: usize, home: usize, f: impl Fn() + Sync) {
    std::thread::scope(|s| {
        for _ in 0..1000 {
            let ran = s
                .spawn(|| {
                    let here = shard::home(shards) == home;
                    if here {
                        f();
                    }
                    here
                })
                .join()
                .unwrap();
            if ran {
                return;
            }
        }
        panic!("no thread was homed in shard {home}");
    });
}

/// How many shards a pool has here, if more than one (tests of threads in different shards
/// need two; on a one-core machine they say they skipped).
fn shards_for_threads() -> Option<usize> {
    let shards = pool(|_| {}).shards.len();
    if shards < 2 {
        eprintln!("skipped: one shard on this machine");
        return None;
    }
    Some(shards)
}

#[test]
fn a_release_that_runs_a_batch_keeps_the_warm_cap() {
    let _serial = serial();
    // Shard 0 keeps more than its share of warm slots while shard 1 keeps none. Shard 1 then
    // finishes memory slots within its share inside a batch of blind decommits that a later
    // release runs: the pool is over its cap until someone gives back, and the release (of a
    // memory or a table) must see to it.
    let Some(shards) = shards_for_threads() else {
        return;
    };
    let cap = 2 * shards;
    // Each shard can hold the whole cap and more.
    let slots = u32::try_from(shards * (cap + 2)).unwrap();
    let pool = pool(|c| {
        c.total_memories(slots)
            .total_tables(slots)
            .max_unused_warm_slots(u32::try_from(cap).unwrap())
            .decommit_batch_size(2)
            .linear_memory_keep_resident(0)
            .pagemap_scan(false);
    });
    let modules: Vec<Loaded> = (0..cap).map(|i| load(&pool, &format!("m{i}"), 1, 0)).collect();
    on_shard(shards, 0, || {
        for module in &modules {
            let handle = instantiate(&pool, module);
            deallocate(&pool, handle);
        }
        pool.flush_decommits();
    });
    assert_eq!(
        pool.stats().warm_memory_slots,
        cap as u64,
        "shard 0 borrowed the whole cap"
    );
    let others = [load(&pool, "x", 1, 0), load(&pool, "y", 1, 0)];
    let before = pool.stats().decommit_ranges;
    on_shard(shards, 1, || {
        // The first one's blind decommit waits for a batch; the second's completes it.
        let first = instantiate(&pool, &others[0]);
        let second = instantiate(&pool, &others[1]);
        deallocate(&pool, first);
        deallocate(&pool, second);
    });
    assert_eq!(
        pool.stats().decommit_ranges - before,
        2,
        "one batch of both memories' ranges"
    );
    let stats = pool.stats();
    assert!(
        stats.warm_memory_slots <= cap as u64,
        "{} warm slots over a cap of {cap}",
        stats.warm_memory_slots
    );
}

#[test]
fn a_thread_takes_slots_of_its_own_shard_rather_than_share_another_threads() {
    let _serial = serial();
    // One thread instantiates a module in shard 0; another, homed in shard 1, instantiates
    // it too: while the pool is far from its warm cap, it takes a slot of its own shard, so
    // the two threads share no lock from then on.
    let Some(shards) = shards_for_threads() else {
        return;
    };
    let pool = pool(|c| {
        c.total_memories(u32::try_from(shards * 8).unwrap())
            .total_tables(u32::try_from(shards * 8).unwrap())
            .max_unused_warm_slots(100);
    });
    let a = load(&pool, "a", 1, 0);
    let bases = std::sync::Mutex::new(Vec::new());
    let cycle = |n| {
        for _ in 0..n {
            let handle = instantiate(&pool, &a);
            bases
                .lock()
                .unwrap()
                .push(handle.instance().memory(memory()).unwrap().base() as usize);
            deallocate(&pool, handle);
        }
    };
    on_shard(shards, 0, || cycle(4));
    pool.flush_decommits();
    let first: Vec<usize> = std::mem::take(&mut *bases.lock().unwrap());
    on_shard(shards, 1, || cycle(4));
    let second = bases.lock().unwrap();
    assert!(
        second.iter().all(|b| !first.contains(b)),
        "the thread of shard 1 took a slot of shard 0: {second:x?} among {first:x?}"
    );
}

#[test]
fn a_slot_keeping_many_pages_queued_behind_another_decommit_is_taken_again() {
    let _serial = serial();
    // A slot that keeps `CACHED` bytes or more gives back the pages around them when its
    // tenant leaves, unless another thread is decommitting then: it waits in the queue
    // instead. Its module's next tenant runs the queue and takes it again rather than set up
    // a cold slot, which would keep as many pages again (the two would take turns, their
    // pages out of the cache, and two threads would each set up slots that way).
    let case = "a slot keeping many pages queued behind another decommit";
    if berth_testkit::page_states::page_map_for(case).is_none() {
        return;
    }
    let pool = pool(|c| {
        c.total_memories(8).total_tables(8);
    });
    // 8 pages of 64 KiB; each tenant writes the first 192 KiB.
    let big = load(&pool, "big", 8, 0);
    let cycle = || {
        let mut handle = instantiate(&pool, &big);
        handle
            .instance_mut()
            .memory_write(memory(), 0, &[7; 3 * PAGE])
            .unwrap();
        let base = handle.instance().memory(memory()).unwrap().base() as usize;
        deallocate(&pool, handle);
        base
    };
    // The slot learns its tenants' pages and stops asking the kernel about the rest.
    let mut base = cycle();
    for _ in 0..16 {
        base = cycle();
    }
    let queued = {
        let _turn = berth_core::sys::hold_decommit_turn();
        cycle()
    };
    assert_eq!(queued, base, "the learned slot is the module's");
    let before = pool.stats().decommit_calls;
    assert_eq!(
        cycle(),
        base,
        "a cold slot was set up while the module's waited in the queue"
    );
    assert!(pool.stats().decommit_calls > before, "the queue ran");
}
