//! Giving idle memory back ([`InstanceAllocatorImpl::release_idle_memory`](berth_core::InstanceAllocatorImpl::release_idle_memory)):
//! what a host that goes quiet relies on, from any backend.

use crate::Ctx;
use crate::checks::{assert_dirty, assert_fresh, assert_idle, dirty};
use crate::modules::Shape;

/// After tenants wrote and left, a release leaves no memory slot warm and no byte resident in
/// idle slots; an instance live across it keeps every byte it wrote and stays usable; and the
/// instances after it start fresh, as before.
pub(crate) fn releasing_idle_memory_keeps_live_tenants_and_fresh_starts(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    let mut shape = Shape::plain(vec![(1, 3)], vec![(4, 64)]);
    shape.data = vec![(0, 100, 300, 0x7E)];
    if !shape.fits(&ctx.caps) {
        return;
    }
    let loaded = harness.load(shape.build("release")).expect("load");
    let mut survivor = harness.instantiate(&loaded, None).expect("an instance");
    dirty(&mut survivor, &shape, &ctx.caps, 0x31);
    for seed in 0..3u8 {
        let room = ctx.caps.max_memories.is_none_or(|m| m > 1);
        if !room {
            break;
        }
        let mut tenant = harness.instantiate(&loaded, None).expect("a tenant");
        dirty(&mut tenant, &shape, &ctx.caps, 0x40 + seed);
    }

    let released = harness.allocator.release_idle_memory();
    let stats = harness.allocator.stats();
    assert_eq!(
        stats.warm_memory_slots, 0,
        "memory slots (or kept reservations) are still warm after a release: {released:?}"
    );
    assert_eq!(
        stats.idle_resident_bytes(),
        0,
        "idle slots keep resident bytes after a release: {released:?}"
    );
    assert_eq!(stats.live_instances, 1, "a release changed the live count");
    assert_dirty(&survivor, &shape, 0x31);
    dirty(&mut survivor, &shape, &ctx.caps, 0x32);
    assert_dirty(&survivor, &shape, 0x32);

    drop(survivor);
    for _ in 0..2 {
        let live = harness
            .instantiate(&loaded, None)
            .expect("an instance after a release");
        assert_fresh(&live, &shape);
    }
    // A second release with nothing idle to give back changes nothing that is live.
    harness.allocator.release_idle_memory();
    drop(loaded);
    assert_idle(&harness);
}
