//! No byte a tenant wrote reaches a later tenant: after growth, whatever state the kernel put
//! the tenant's pages in (swapped out, inactive, in a huge page), across a fork; and live
//! memories never share a byte.

use berth_core::sys::{self, PageEvent};

use crate::checks::{assert_apart, assert_dirty, assert_fresh, assert_grows_fresh, assert_idle, dirty};
use crate::child::{End, expect};
use crate::modules::{self, PAGE, Shape};
use crate::page_states::{disturb, disturb_table, require, swap_works};
use crate::{Ctx, Harness, Live, Loaded};

/// Instantiates `loaded` and checks every byte and element it has, and every one it can grow
/// to, is as a fresh instance has it.
fn assert_next_is_fresh(harness: &Harness, ctx: &Ctx<'_>, shape: &Shape, loaded: &Loaded) {
    let mut next = harness.instantiate(loaded, None).unwrap();
    assert_fresh(&next, shape);
    assert_grows_fresh(&mut next, shape, &ctx.caps);
}

pub(crate) fn reused_slots_read_only_fresh_contents(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    let loaded = ctx.loadable(&harness, modules::all());
    for round in 0..3u8 {
        for (a, (shape_a, loaded_a)) in loaded.iter().enumerate() {
            let mut tenant = harness.instantiate(loaded_a, None).unwrap();
            dirty(&mut tenant, shape_a, &ctx.caps, round);
            drop(tenant);
            // The same module, then every other one, must see none of it, grown or not.
            for (shape_b, loaded_b) in loaded.iter().cycle().skip(a).take(loaded.len()) {
                assert_next_is_fresh(&harness, ctx, shape_b, loaded_b);
            }
        }
    }
    assert_idle(&harness);
}

/// Asks the kernel for `event` on every memory and table of `live`; returns how many pages
/// it then holds in the state the event aims for.
pub(crate) fn disturb_all(live: &Live, event: PageEvent) -> usize {
    let instance = live.instance();
    let memories: usize = instance
        .memories()
        .values()
        .map(|(_, memory)| disturb(memory.base(), memory.byte_size(), event))
        .sum();
    let tables: usize = instance
        .tables()
        .values()
        .map(|(_, table)| disturb_table(table, event))
        .sum();
    memories + tables
}

const PAGE_STATES: &str = "reused_slots_read_only_fresh_contents_in_every_page_state";

pub(crate) fn reused_slots_read_only_fresh_contents_in_every_page_state(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    let mut shapes = modules::all();
    shapes.push(modules::huge());
    let loaded = ctx.loadable(&harness, shapes);
    let can_hold_huge = loaded.iter().any(|(shape, _)| {
        shape
            .memories
            .iter()
            .any(|&(min, _)| min as usize * PAGE >= 4 << 20)
    });
    for event in [PageEvent::SwapOut, PageEvent::Deactivate, PageEvent::HugePage] {
        if event == PageEvent::SwapOut && !require(PAGE_STATES, "swap", swap_works()) {
            continue;
        }
        let mut moved = 0;
        for (a, (shape_a, loaded_a)) in loaded.iter().enumerate() {
            let mut tenant = harness.instantiate(loaded_a, None).unwrap();
            dirty(&mut tenant, shape_a, &ctx.caps, a as u8);
            moved += disturb_all(&tenant, event);
            drop(tenant);
            for (shape_b, loaded_b) in loaded.iter().cycle().skip(a).take(loaded.len()) {
                assert_next_is_fresh(&harness, ctx, shape_b, loaded_b);
            }
        }
        match event {
            PageEvent::SwapOut => assert!(
                moved > 0,
                "swap works here, but none of the tenants' pages went to swap: nothing was tested"
            ),
            PageEvent::HugePage if moved == 0 && can_hold_huge => {
                eprintln!("{PAGE_STATES}: the kernel made no huge page here; that state was not tested");
            }
            _ => {}
        }
    }
    assert_idle(&harness);
}

const FORK: &str = "tenants_survive_a_fork";

/// Live tenants are forked with the process: in the child and in the parent, dropping them
/// and instantiating again shows nothing of them. Runs in a child process with one test
/// thread, where a fork is safe.
pub(crate) fn tenants_survive_a_fork(ctx: &Ctx<'_>) {
    expect(FORK, "fork with live tenants", End::Finished, || {
        let harness = ctx.harness();
        let loaded = ctx.loadable(&harness, modules::all());
        let tenants: Vec<Live> = instantiate_within_limits(ctx, &harness, &loaded, 1)
            .into_iter()
            .enumerate()
            .map(|(i, (mut tenant, shape))| {
                dirty(&mut tenant, shape, &ctx.caps, 0x40 + i as u8);
                tenant
            })
            .collect();
        let after = |tenants: Vec<Live>| {
            drop(tenants);
            for (shape, loaded) in &loaded {
                assert_next_is_fresh(&harness, ctx, shape, loaded);
            }
            assert_idle(&harness);
            true
        };
        // The tenants as the fork finds them: the child takes its copy, the parent its own.
        let mut tenants = Some(tenants);
        // SAFETY: this process is a child running this case alone, on one test thread; the
        // main thread waits for it and holds no lock.
        let child =
            unsafe { sys::fork(|| after(tenants.take().expect("the child's tenants"))) }.expect("fork");
        after(tenants.take().expect("the parent's tenants"));
        assert!(
            child.wait().expect("wait for the forked child"),
            "in a forked child, a tenant's bytes reached the next tenant (its output is above)"
        );
    });
}

pub(crate) fn live_memories_never_share_a_byte(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    let loaded = ctx.loadable(&harness, modules::all());
    let caps = &ctx.caps;
    let mut live = instantiate_within_limits(ctx, &harness, &loaded, 4);
    // Every memory and table as large as it gets, each instance with its own pattern: what
    // one writes must not show in another.
    for (seed, (instance, shape)) in live.iter_mut().enumerate() {
        dirty(instance, shape, caps, seed as u8);
    }
    assert_apart(live.iter().map(|(l, _)| l));
    for (seed, (instance, shape)) in live.iter().enumerate() {
        assert_dirty(instance, shape, seed as u8);
    }
    drop(live);
    assert_idle(&harness);
}

/// Instances of every loaded module in turn, `rounds` times, as many as the backend's limits
/// allow at once.
fn instantiate_within_limits<'a>(
    ctx: &Ctx<'_>,
    harness: &Harness,
    loaded: &'a [(Shape, Loaded)],
    rounds: usize,
) -> Vec<(Live, &'a Shape)> {
    let caps = &ctx.caps;
    let mut live: Vec<(Live, &Shape)> = Vec::new();
    let (mut memories, mut tables) = (0, 0);
    for (shape, loaded) in loaded.iter().cycle().take(rounds * loaded.len()) {
        let fits = caps.max_instances.is_none_or(|m| live.len() < m)
            && caps
                .max_memories
                .is_none_or(|m| memories + shape.memories.len() <= m)
            && caps.max_tables.is_none_or(|m| tables + shape.tables.len() <= m);
        if !fits {
            break;
        }
        memories += shape.memories.len();
        tables += shape.tables.len();
        live.push((harness.instantiate(loaded, None).unwrap(), shape));
    }
    live
}
