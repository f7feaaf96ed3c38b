//! The deterministic cases about one instance at a time: fresh contents, validation, growth,
//! limits, and a failed instantiation. Each makes its own allocators through the factory.

use anyhow::Result;
use berth_core::{
    DefinedMemoryIndex, DefinedTableIndex, LimitExceeded, MemoryType, Module, ResourceLimiter, TableType,
};

use crate::checks::{assert_exact, assert_fresh, assert_idle, dirty};
use crate::modules::{self, PAGE, Shape};
use crate::{Ctx, Live, Loaded};

pub(crate) fn fresh_instances_are_zeroed_and_exact(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    for (shape, loaded) in ctx.loadable(&harness, modules::all()) {
        let live = harness.instantiate(&loaded, None).unwrap();
        assert_fresh(&live, &shape);
        let stats = harness.allocator.stats();
        let counts = (stats.live_instances, stats.live_memories, stats.live_tables);
        let want = (1, shape.memories.len() as u64, shape.tables.len() as u64);
        assert_eq!(
            counts, want,
            "the backend's counts are wrong with one instance live"
        );
        drop(live);
        assert_idle(&harness);
    }
}

fn is_limit(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<LimitExceeded>())
}

pub(crate) fn modules_over_the_limits_fail_validation(ctx: &Ctx<'_>) {
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

pub(crate) fn growth_follows_the_spec(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    for (shape, loaded) in ctx.loadable(&harness, modules::all()) {
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

pub(crate) fn limits_are_typed_and_capacity_returns(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    let empty = harness
        .load(Module::builder().name("empty").build().unwrap())
        .unwrap();
    let one_memory = Shape::plain(vec![(0, 1)], vec![]);
    let one_table = Shape::plain(vec![], vec![(0, 1)]);
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

/// Denies the `deny_at`-th creation (memories and tables counted together), or panics there.
struct DenyAt {
    seen: usize,
    deny_at: usize,
    panics: bool,
}

/// The payload of [`DenyAt`]'s panics, which the suite's panic hook keeps quiet.
struct LimiterPanic;

impl DenyAt {
    fn judge(&mut self) -> bool {
        self.seen += 1;
        if self.seen == self.deny_at && self.panics {
            quiet_limiter_panics();
            std::panic::panic_any(LimiterPanic);
        }
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

pub(crate) fn failed_instantiation_leaks_nothing(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    for (shape, loaded) in ctx.loadable(&harness, modules::all()) {
        let resources = shape.memories.len() + shape.tables.len();
        for deny_at in 1..=resources {
            let mut tenant = harness.instantiate(&loaded, None).unwrap();
            dirty(&mut tenant, &shape, &ctx.caps, deny_at as u8);
            drop(tenant);
            let mut limiter = DenyAt {
                seen: 0,
                deny_at,
                panics: false,
            };
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

/// Installs, once, a panic hook that says nothing of [`LimiterPanic`]s and passes every other
/// panic to the hook before it.
fn quiet_limiter_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<LimiterPanic>() {
                previous(info);
            }
        }));
    });
}

/// A limiter may panic (it is the embedder's code): the unwinding instantiation gives back
/// what it took, the slot it was setting up included, so the backend's counts and capacity
/// are as before, however often it happens.
pub(crate) fn an_unwinding_limiter_leaks_nothing(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    let caps = &ctx.caps;
    // More unwinds than any limit has room: one slot lost each time would run out.
    let rounds = [caps.max_instances, caps.max_memories, caps.max_tables]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(1)
        + 1;
    for (shape, loaded) in ctx.loadable(&harness, modules::all()) {
        let resources = shape.memories.len() + shape.tables.len();
        for deny_at in 1..=resources {
            for _ in 0..rounds {
                let mut limiter = DenyAt {
                    seen: 0,
                    deny_at,
                    panics: true,
                };
                let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    harness.instantiate(&loaded, Some(&mut limiter))
                }));
                match unwound {
                    Err(_) => {}
                    Ok(Ok(_)) => panic!("an instance was made though the limiter panicked"),
                    Ok(Err(error)) => panic!(
                        "the instantiation failed before the limiter's panic at creation \
                         {deny_at}: {error:#} (a slot or count kept by an earlier unwound one?)"
                    ),
                }
                assert_idle(&harness);
            }
            // As many instances as the limits allow at once: all of them fit again.
            let per = |limit: Option<usize>, each: usize| limit.map(|l| l / each.max(1));
            let room = [
                caps.max_instances,
                per(caps.max_memories, shape.memories.len()),
                per(caps.max_tables, shape.tables.len()),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(2);
            let live: Vec<Live> = (0..room)
                .map(|_| harness.instantiate(&loaded, None).expect("capacity came back"))
                .collect();
            for instance in &live {
                assert_fresh(instance, &shape);
            }
            drop(live);
            assert_idle(&harness);
        }
    }
}
