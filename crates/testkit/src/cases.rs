//! The deterministic cases. Each makes its own allocators through the factory.

use anyhow::Result;
use berth_core::{
    DefinedMemoryIndex, DefinedTableIndex, LimitExceeded, MemoryType, Module, ResourceLimiter, TableType,
};

use crate::child::{End, expect, touch};
use crate::modules::{self, Shape};
use crate::{Ctx, Harness, Live, Loaded};

/// A case: its name and body.
pub(crate) type Case = (&'static str, fn(&Ctx<'_>));

/// Every case, in the order they run.
pub(crate) const ALL: &[Case] = &[
    (
        "fresh_instances_are_zeroed_and_exact",
        fresh_instances_are_zeroed_and_exact,
    ),
    (
        "modules_over_the_limits_fail_validation",
        modules_over_the_limits_fail_validation,
    ),
    ("growth_follows_the_spec", growth_follows_the_spec),
    (
        "limits_are_typed_and_capacity_returns",
        limits_are_typed_and_capacity_returns,
    ),
    ("reused_slots_read_only_zeros", reused_slots_read_only_zeros),
    (
        "failed_instantiation_leaks_nothing",
        failed_instantiation_leaks_nothing,
    ),
    (
        "bytes_past_the_size_and_guards_fault",
        bytes_past_the_size_and_guards_fault,
    ),
    (
        "programs_agree_with_the_model",
        crate::program::programs_agree_with_the_model,
    ),
];

const PAGE: usize = 65536;

/// The suite's modules this backend can instantiate, loaded.
fn loadable(ctx: &Ctx<'_>, harness: &Harness) -> Vec<(Shape, Loaded)> {
    modules::all()
        .into_iter()
        .enumerate()
        .filter(|(_, shape)| shape.fits(&ctx.caps))
        .map(|(i, shape)| {
            let loaded = harness
                .load(shape.build(&format!("suite{i}")))
                .expect("a fitting module loads");
            (shape, loaded)
        })
        .collect()
}

/// Checks that `live` is as fresh as `shape` says and its vmctx definitions are exact.
pub(crate) fn assert_fresh(live: &Live, shape: &Shape) {
    for (i, &(min, _)) in shape.memories.iter().enumerate() {
        let bytes = live.memory(i as u32);
        assert_eq!(
            bytes.len(),
            min as usize * PAGE,
            "memory {i} starts at its minimum"
        );
        assert!(
            bytes.iter().all(|&b| b == 0),
            "memory {i} of a new instance holds non-zero bytes"
        );
    }
    for (i, &(min, _)) in shape.tables.iter().enumerate() {
        let elements = live.table(i as u32);
        assert_eq!(elements.len(), min as usize, "table {i} starts at its minimum");
        assert!(
            elements.iter().all(|&e| e == 0),
            "table {i} of a new instance holds non-null elements"
        );
    }
    assert_exact(live, shape);
}

/// Checks the vmctx definitions against the memories and tables.
pub(crate) fn assert_exact(live: &Live, shape: &Shape) {
    let instance = live.instance();
    for i in 0..shape.memories.len() {
        let index = DefinedMemoryIndex::from_u32(i as u32);
        let memory = instance.memory(index).unwrap();
        assert_eq!(
            instance.vmmemory_definition(index),
            Some(memory.vmmemory()),
            "memory {i} definition"
        );
    }
    for i in 0..shape.tables.len() {
        let index = DefinedTableIndex::from_u32(i as u32);
        let table = instance.table(index).unwrap();
        assert_eq!(
            instance.vmtable_definition(index),
            Some(table.vmtable()),
            "table {i} definition"
        );
    }
}

/// Checks the backend counts nothing live.
pub(crate) fn assert_idle(harness: &Harness) {
    let stats = harness.allocator.stats();
    assert_eq!(
        (stats.live_instances, stats.live_memories, stats.live_tables),
        (0, 0, 0),
        "the backend still counts live resources"
    );
}

fn fresh_instances_are_zeroed_and_exact(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    for (shape, loaded) in loadable(ctx, &harness) {
        let live = harness.instantiate(&loaded, None).unwrap();
        assert_fresh(&live, &shape);
        let stats = harness.allocator.stats();
        assert_eq!(stats.live_instances, 1);
        assert_eq!(stats.live_memories, shape.memories.len() as u64);
        assert_eq!(stats.live_tables, shape.tables.len() as u64);
        drop(live);
        assert_idle(&harness);
    }
}

fn is_limit(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<LimitExceeded>())
}

fn modules_over_the_limits_fail_validation(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    for (i, shape) in modules::all().into_iter().enumerate() {
        if !shape.fits(&ctx.caps) {
            let error = harness
                .load(shape.build(&format!("suite{i}")))
                .expect_err("a module over a limit");
            assert!(is_limit(&error), "not a typed limit error: {error:#}");
        }
    }
    if let Some(max) = ctx.caps.max_memory_bytes {
        let pages = (max / PAGE + 1) as u64;
        let module = Module::builder()
            .name("big")
            .memory(MemoryType::new(pages, None))
            .build()
            .unwrap();
        let error = harness.load(module).expect_err("a memory over max_memory_bytes");
        assert!(is_limit(&error), "not a typed limit error: {error:#}");
    }
    if let Some(max) = ctx.caps.max_table_elements {
        let module = Module::builder()
            .name("wide")
            .table(TableType::new(max as u64 + 1, None))
            .build()
            .unwrap();
        let error = harness.load(module).expect_err("a table over max_table_elements");
        assert!(is_limit(&error), "not a typed limit error: {error:#}");
    }
}

fn growth_follows_the_spec(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    for (shape, loaded) in loadable(ctx, &harness) {
        let mut live = harness.instantiate(&loaded, None).unwrap();
        for (i, &(min, _)) in shape.memories.iter().enumerate() {
            let index = DefinedMemoryIndex::from_u32(i as u32);
            let cap = shape.memory_cap(i, &ctx.caps);
            let mut pages = min;
            loop {
                let before = live.instance().vmmemory_definition(index);
                let result = live.instance_mut().memory_grow(index, 1, None).unwrap();
                if (pages as usize + 1) * PAGE <= cap {
                    assert_eq!(result, Some(pages), "memory {i} grows by a page");
                    pages += 1;
                    assert_eq!(live.memory(i as u32).len(), pages as usize * PAGE);
                    assert_eq!(
                        live.memory(i as u32)[(pages as usize - 1) * PAGE..].iter().max(),
                        Some(&0)
                    );
                } else {
                    assert_eq!(result, None, "memory {i} grows past its cap of {cap} bytes");
                    assert_eq!(
                        live.instance().vmmemory_definition(index),
                        before,
                        "a failed grow changed memory {i}"
                    );
                    break;
                }
                assert_exact(&live, &shape);
            }
        }
        for (i, &(min, _)) in shape.tables.iter().enumerate() {
            let index = DefinedTableIndex::from_u32(i as u32);
            let cap = shape.table_cap(i, &ctx.caps);
            let result = live
                .instance_mut()
                .table_grow(index, (cap - min as usize) as u64, 7, None)
                .unwrap();
            assert_eq!(result, Some(min), "table {i} grows to its cap");
            assert!(live.table(i as u32)[min as usize..].iter().all(|&e| e == 7));
            assert_eq!(
                live.instance_mut().table_grow(index, 1, 7, None).unwrap(),
                None,
                "table {i} past its cap"
            );
            assert_exact(&live, &shape);
        }
    }
    assert_idle(&harness);
}

fn limits_are_typed_and_capacity_returns(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    let empty = harness
        .load(Module::builder().name("empty").build().unwrap())
        .unwrap();
    let one_memory = Shape {
        memories: vec![(0, 1)],
        tables: vec![],
    };
    let one_table = Shape {
        memories: vec![],
        tables: vec![(0, 1)],
    };
    let checks: [(Option<usize>, Loaded); 3] = [
        (ctx.caps.max_instances, empty),
        (
            ctx.caps.max_memories,
            harness.load(one_memory.build("one-memory")).unwrap(),
        ),
        (
            ctx.caps.max_tables,
            harness.load(one_table.build("one-table")).unwrap(),
        ),
    ];
    for (limit, loaded) in checks {
        let Some(limit) = limit else { continue };
        let mut live: Vec<Live> = (0..limit)
            .map(|_| harness.instantiate(&loaded, None).unwrap())
            .collect();
        let error = harness
            .instantiate(&loaded, None)
            .expect_err("one over the limit");
        assert!(is_limit(&error), "not a typed limit error: {error:#}");
        live.pop();
        live.push(harness.instantiate(&loaded, None).expect("capacity came back"));
        drop(live);
        assert_idle(&harness);
    }
}

/// Writes a pattern over every accessible byte and element, after growing everything.
fn dirty(live: &mut Live, shape: &Shape, ctx: &Ctx<'_>, seed: u8) {
    for i in 0..shape.memories.len() {
        let index = DefinedMemoryIndex::from_u32(i as u32);
        let cap_pages = (shape.memory_cap(i, &ctx.caps) / PAGE) as u64;
        let now = live.memory(i as u32).len() as u64 / PAGE as u64;
        if cap_pages > now {
            live.instance_mut()
                .memory_grow(index, cap_pages - now, None)
                .unwrap();
        }
        let len = live.memory(i as u32).len();
        let pattern: Vec<u8> = (0..len)
            .map(|b| (b as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect();
        live.instance_mut().memory_write(index, 0, &pattern).unwrap();
    }
    for i in 0..shape.tables.len() {
        let index = DefinedTableIndex::from_u32(i as u32);
        let cap = shape.table_cap(i, &ctx.caps);
        let now = live.table(i as u32).len();
        live.instance_mut()
            .table_grow(index, (cap - now) as u64, 0x5eed, None)
            .unwrap();
        live.instance_mut()
            .table_fill(index, 0, 0xdead, cap as u64)
            .unwrap();
    }
}

fn reused_slots_read_only_zeros(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    let loaded = loadable(ctx, &harness);
    for round in 0..3u8 {
        for (a, (shape_a, loaded_a)) in loaded.iter().enumerate() {
            let mut tenant = harness.instantiate(loaded_a, None).unwrap();
            dirty(&mut tenant, shape_a, ctx, round);
            drop(tenant);
            // The same module, then every other one, must see none of it.
            for (shape_b, loaded_b) in loaded.iter().cycle().skip(a).take(loaded.len()) {
                let next = harness.instantiate(loaded_b, None).unwrap();
                assert_fresh(&next, shape_b);
            }
        }
    }
    assert_idle(&harness);
}

/// Denies the `deny_at`-th creation (memories and tables counted together).
struct DenyAt {
    seen: usize,
    deny_at: usize,
}

impl DenyAt {
    fn judge(&mut self) -> bool {
        self.seen += 1;
        self.seen != self.deny_at
    }
}

impl ResourceLimiter for DenyAt {
    fn memory_growing(&mut self, current: usize, _: usize, _: Option<usize>) -> Result<bool> {
        Ok(current != 0 || self.judge())
    }
    fn table_growing(&mut self, current: usize, _: usize, _: Option<usize>) -> Result<bool> {
        Ok(current != 0 || self.judge())
    }
}

fn failed_instantiation_leaks_nothing(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    for (shape, loaded) in loadable(ctx, &harness) {
        let resources = shape.memories.len() + shape.tables.len();
        for deny_at in 1..=resources {
            let mut tenant = harness.instantiate(&loaded, None).unwrap();
            dirty(&mut tenant, &shape, ctx, deny_at as u8);
            drop(tenant);
            let mut limiter = DenyAt { seen: 0, deny_at };
            let error = harness
                .instantiate(&loaded, Some(&mut limiter))
                .expect_err("the limiter denied a resource");
            assert!(
                error.chain().any(|e| e.is::<berth_core::LimiterDenied>()),
                "{error:#}"
            );
            assert_idle(&harness);
            let next = harness.instantiate(&loaded, None).unwrap();
            assert_fresh(&next, &shape);
        }
    }
    assert_idle(&harness);
}

const CASE: &str = "bytes_past_the_size_and_guards_fault";

fn bytes_past_the_size_and_guards_fault(ctx: &Ctx<'_>) {
    let guard = crate::suite_tunables().memory_guard_size as usize;
    let shape = Shape {
        memories: vec![(1, 3)],
        tables: vec![],
    };
    if !shape.fits(&ctx.caps) {
        return;
    }
    let probe =
        |name: &str,
         expected: End,
         at: fn(base: *const u8, size: usize, capacity: usize, guard: usize) -> *const u8| {
            expect(CASE, name, expected, || {
                let harness = ctx.harness();
                let loaded = harness.load(shape.build("fault")).unwrap();
                // A previous tenant grew and wrote, so a reused slot is checked too.
                let mut previous = harness.instantiate(&loaded, None).unwrap();
                dirty(&mut previous, &shape, ctx, 9);
                drop(previous);
                let mut live = harness.instantiate(&loaded, None).unwrap();
                let index = DefinedMemoryIndex::from_u32(0);
                if shape.memory_cap(0, &ctx.caps) >= 2 * PAGE {
                    live.instance_mut().memory_grow(index, 1, None).unwrap();
                }
                let memory = live.instance().memory(index).unwrap();
                let (base, size, capacity) = (
                    memory.base().cast_const(),
                    memory.byte_size(),
                    memory.byte_capacity(),
                );
                // SAFETY: in a child process; a fault is the expected outcome unless `expected`
                // says the byte is in bounds.
                unsafe { touch(at(base, size, capacity, guard)) };
            });
        };
    probe("last byte in bounds", End::Finished, |base, size, _, _| {
        base.wrapping_add(size - 1)
    });
    probe("first byte past the size", End::Faulted, |base, size, _, _| {
        base.wrapping_add(size)
    });
    probe(
        "last byte of the reservation",
        End::Faulted,
        |base, _, capacity, _| base.wrapping_add(capacity.max(1 << 20) - 1),
    );
    probe(
        "last byte of the guard",
        End::Faulted,
        |base, _, capacity, guard| base.wrapping_add(capacity.max(1 << 20) + guard - 1),
    );
    probe("byte before the memory", End::Faulted, |base, _, _, _| {
        base.wrapping_sub(1)
    });
}
