//! No byte of one tenant reaches the next, whatever state the kernel put the tenant's pages in:
//! pushed to swap, or on the inactive list. The reproduction of a leak
//! the pool had (a reset that asked the kernel only for *present* written pages skipped swapped
//! ones), on every backend and for every knob that changes how a slot is reset.

use std::sync::Arc;

use berth_core::sys::PageEvent;
use berth_core::{ConstExpr, DataKind, DataSegment, DefinedMemoryIndex, DefinedTableIndex, MemoryIndex};
use berth_core::{MemoryType, Module, TableType};
use berth_engine::{Config, Engine, Instance, InstanceAllocationStrategy, LoadedModule, PoolingConfig};
use berth_testkit::page_states::{disturb, disturb_table, require, swap_works};

const PAGE: usize = 65536;
/// The offsets the leak was found at, and a write of a whole 256 KiB memory.
const WRITES: [(usize, usize); 5] = [(0, 8), (20 << 10, 8), (70_000, 8), (200_000, 8), (0, 4 * PAGE)];

/// The ways a pool can be set up that change how a slot is reset: the defaults, then one knob
/// changed at a time (keep_resident, warm slots, batching, the page map), and the two that
/// keep the most and the least.
fn pools() -> Vec<(String, PoolingConfig)> {
    let setups: [(usize, u32, usize, bool); 8] = [
        (64 << 10, 100, 16, true),
        (0, 100, 16, true),
        (1 << 20, 100, 16, true),
        (64 << 10, 0, 16, true),
        (64 << 10, 100, 1, true),
        (64 << 10, 100, 16, false),
        (1 << 20, 0, 1, true),
        (0, 0, 1, false),
    ];
    setups
        .into_iter()
        .map(|(keep, warm, batch, scan)| {
            let mut pool = PoolingConfig::new();
            pool.total_memories(1)
                .total_tables(1)
                .max_memory_size(1 << 20)
                .table_elements(1024)
                .linear_memory_keep_resident(keep)
                .table_keep_resident(keep.min(4096))
                .max_unused_warm_slots(warm)
                .decommit_batch_size(batch)
                .pagemap_scan(scan);
            let name = format!("pool keep {keep} warm {warm} batch {batch} scan {scan}");
            (name, pool)
        })
        .collect()
}

fn engine(pool: Option<PoolingConfig>) -> Engine {
    let mut config = Config::new();
    config
        .memory_reservation(1 << 20)
        .memory_guard_size(PAGE as u64)
        .memory_reservation_for_growth(0);
    if let Some(pool) = pool {
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&config).unwrap()
}

/// A module with one 4-page memory (with a data segment of `image` bytes at 8 KiB, made a
/// copy-on-write image) and a table of 64 elements, growable to 1024.
fn module(engine: &Engine, name: &str, image: usize) -> LoadedModule {
    let mut builder = Module::builder()
        .name(name)
        .memory(MemoryType::new(4, Some(4)))
        .table(TableType::new(64, Some(1024)));
    if image > 0 {
        builder = builder.data(DataSegment {
            kind: DataKind::Active {
                memory: MemoryIndex::from_u32(0),
                offset: ConstExpr::I32(8192),
            },
            data: Arc::from(vec![0x5A; image]),
        });
    }
    engine.load(builder.build().unwrap()).unwrap()
}

/// What a fresh instance of a module with `image` bytes of data at 8 KiB must read.
fn expected(image: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; 4 * PAGE];
    bytes[8192..8192 + image].fill(0x5A);
    bytes
}

fn memory_span(instance: &Instance) -> (*const u8, usize) {
    let memory = instance.core().memory(DefinedMemoryIndex::from_u32(0)).unwrap();
    (memory.base().cast_const(), memory.byte_size())
}

/// Tenant 1 of `first` writes `len` bytes at `offset` and every table element, its pages are
/// disturbed by `event`, and it is dropped; tenant 2, of `next`, must read only what a fresh
/// instance holds. Returns how many pages the event put in its state.
fn round(
    first: &LoadedModule,
    next: &LoadedModule,
    next_image: usize,
    write: (usize, usize),
    event: PageEvent,
    what: &str,
) -> usize {
    let mut tenant = Instance::new(first).unwrap();
    let (offset, len) = write;
    tenant.memory_write(0, offset as u64, &vec![0xA7; len]).unwrap();
    tenant.table_grow(0, 1024 - 64, 0x77).unwrap();
    for elem in (0..1024).step_by(7) {
        tenant.table_set(0, elem, 0xBEEF).unwrap();
    }
    let (base, size) = memory_span(&tenant);
    let mut moved = disturb(base, size, event);
    let table = tenant.core().table(DefinedTableIndex::from_u32(0)).unwrap();
    moved += disturb_table(table, event);
    drop(tenant);

    let mut after = Instance::new(next).unwrap();
    let mut bytes = vec![0xFF; 4 * PAGE];
    after.memory_read(0, 0, &mut bytes).unwrap();
    let want = expected(next_image);
    if bytes != want {
        let at = (0..bytes.len()).find(|&i| bytes[i] != want[i]).unwrap_or(0);
        panic!(
            "{what}: a byte of the last tenant at offset {at} (wrote {len} bytes at {offset}, {event:?}): {:#x}",
            bytes[at]
        );
    }
    assert_eq!(after.table_grow(0, 1024 - 64, 0).unwrap(), Some(64));
    let table = after.core().table(DefinedTableIndex::from_u32(0)).unwrap();
    let left = table.elements().iter().position(|&e| e != 0);
    assert_eq!(
        left, None,
        "{what}: a table element of the last tenant ({event:?})"
    );
    moved
}

/// Every write, swapped out, under every pool set-up and on demand; next tenant of the same
/// module, with and without an image, and of another module.
#[test]
fn swapped_out_pages_of_a_tenant_never_reach_the_next() {
    if !require(
        "swapped_out_pages_of_a_tenant_never_reach_the_next",
        "swap",
        swap_works(),
    ) {
        return;
    }
    let mut setups: Vec<(String, Option<PoolingConfig>)> = vec![("on-demand".into(), None)];
    setups.extend(pools().into_iter().map(|(name, pool)| (name, Some(pool))));
    for (name, pool) in setups {
        let engine = engine(pool);
        let plain = module(&engine, "plain", 0);
        let imaged = module(&engine, "imaged", 3 * 4096 + 100);
        let other = module(&engine, "other", 0);
        let mut swapped = 0;
        for rounds in 0..2 {
            for write in WRITES {
                let what = format!("{name}, round {rounds}");
                swapped += round(&plain, &plain, 0, write, PageEvent::SwapOut, &what);
                swapped += round(&imaged, &imaged, 3 * 4096 + 100, write, PageEvent::SwapOut, &what);
                swapped += round(&plain, &imaged, 3 * 4096 + 100, write, PageEvent::SwapOut, &what);
                swapped += round(&imaged, &other, 0, write, PageEvent::SwapOut, &what);
            }
        }
        assert!(
            swapped > 0,
            "{name}: no page was ever swapped out, so nothing was tested"
        );
    }
}

/// The same with the tenant's pages moved to the inactive list (first in line for reclaim).
#[test]
fn cold_pages_of_a_tenant_never_reach_the_next() {
    for (name, pool) in pools() {
        let engine = engine(Some(pool));
        let plain = module(&engine, "plain", 0);
        let imaged = module(&engine, "imaged", 4096);
        for write in WRITES {
            round(&plain, &plain, 0, write, PageEvent::Deactivate, &name);
            round(&imaged, &plain, 0, write, PageEvent::Deactivate, &name);
        }
    }
}
