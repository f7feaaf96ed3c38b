//! Bytes past a memory's size, its reservation's rest, its guard and its pre-guard fault, also
//! with neighbours live and grown as far as they go (so a backend without guards, whose
//! neighbour's bytes would lie there, is caught). Each probe runs in a child process.

use berth_core::DefinedMemoryIndex;

use crate::checks::dirty;
use crate::child::{End, expect, touch};
use crate::modules::{PAGE, Shape};
use crate::{Ctx, Live};

const CASE: &str = "bytes_past_the_size_and_guards_fault";

/// Where a probe reads, from the memory's base, size, capacity and the suite's guard.
type At = fn(base: *const u8, size: usize, capacity: usize, guard: usize) -> *const u8;

pub(crate) fn bytes_past_the_size_and_guards_fault(ctx: &Ctx<'_>) {
    let guard = crate::suite_tunables().memory_guard_size as usize;
    let reservation = crate::suite_tunables().memory_reservation as usize;
    let shape = Shape::plain(vec![(1, 3)], vec![]);
    if !shape.fits(&ctx.caps) {
        return;
    }
    // Up to two neighbours, as the limits allow.
    let neighbours = [ctx.caps.max_instances, ctx.caps.max_memories]
        .into_iter()
        .flatten()
        .min()
        .map_or(2, |m| m.saturating_sub(1).min(2));
    let probe = |what: &str, expected: End, at: At| {
        expect(CASE, what, expected, || {
            let harness = ctx.harness();
            let loaded = harness.load(shape.build("fault")).unwrap();
            // A previous tenant grew and wrote, so a reused slot is checked too.
            let mut previous = harness.instantiate(&loaded, None).unwrap();
            dirty(&mut previous, &shape, &ctx.caps, 9);
            drop(previous);
            let mut live = harness.instantiate(&loaded, None).unwrap();
            let index = DefinedMemoryIndex::from_u32(0);
            if shape.memory_cap(0, &ctx.caps) >= 2 * PAGE {
                live.instance_mut().memory_grow(index, 1, None).unwrap();
            }
            let others: Vec<Live> = (0..neighbours)
                .map(|i| {
                    let mut other = harness.instantiate(&loaded, None).unwrap();
                    dirty(&mut other, &shape, &ctx.caps, i as u8);
                    other
                })
                .collect();
            let memory = live.instance().memory(index).unwrap();
            let (base, size, capacity) = (
                memory.base().cast_const(),
                memory.byte_size(),
                memory.byte_capacity().max(reservation),
            );
            // SAFETY: in a child process; a fault is the expected outcome unless `expected`
            // says the byte is in bounds.
            unsafe { touch(at(base, size, capacity, guard)) };
            drop(others);
        });
    };
    probe("the last byte in bounds", End::Finished, |base, size, _, _| {
        base.wrapping_add(size - 1)
    });
    probe(
        "the first byte past the size",
        End::Faulted,
        |base, size, _, _| base.wrapping_add(size),
    );
    probe(
        "the last byte of the reservation",
        End::Faulted,
        |base, _, capacity, _| base.wrapping_add(capacity - 1),
    );
    probe(
        "the first byte of the guard after the memory",
        End::Faulted,
        |base, _, capacity, _| base.wrapping_add(capacity),
    );
    probe(
        "the last byte of the guard after the memory",
        End::Faulted,
        |base, _, capacity, guard| base.wrapping_add(capacity + guard - 1),
    );
    probe(
        "the byte before the memory (the guard before it)",
        End::Faulted,
        |base, _, _, _| base.wrapping_sub(1),
    );
}
