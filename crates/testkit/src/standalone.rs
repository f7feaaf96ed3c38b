//! Memories on their own ([`StandaloneMemories`]): what a host that takes a memory without an
//! instance relies on, from any backend.

use berth_core::{MemoryType, StandaloneMemories, StandaloneMemory};

use crate::Ctx;
use crate::checks::assert_idle;
use crate::modules::PAGE;

/// Up to this many pages, fewer if the backend's memories cannot reach them.
const MAX_PAGES: u64 = 4;

/// A standalone memory starts zeroed at its initial size, grows by the spec within its
/// maximum and the backend's cap, never shares a byte with another live one, and once given
/// back shows nothing of what it held to the next memory, grown or not; the backend counts it
/// while it lives and not after.
pub(crate) fn standalone_memories_are_fresh_grow_and_come_back(ctx: &Ctx<'_>) {
    let harness = ctx.harness();
    let memories = StandaloneMemories::new(harness.allocator.clone(), harness.tunables);
    let cap_pages = ctx
        .caps
        .max_memory_bytes
        .map_or(MAX_PAGES, |bytes| MAX_PAGES.min((bytes / PAGE) as u64));
    let ty = MemoryType::new(1, Some(MAX_PAGES));

    let mut first = memories.allocate(ty).expect("a standalone memory");
    assert_fresh(&first, PAGE);
    assert_eq!(
        harness.allocator.stats().live_memories,
        1,
        "a live standalone memory is counted"
    );
    first.memory_mut().as_mut_slice().fill(0xA5);
    let mut pages = 1;
    loop {
        let before = first.memory().vmmemory();
        let grown = first.memory_mut().grow(1, None).expect("growth by a page");
        if pages < cap_pages {
            assert_eq!(grown, Some(pages), "a standalone memory grows by a page");
            pages += 1;
            let bytes = first.memory().as_slice();
            assert_eq!(bytes.len(), pages as usize * PAGE);
            assert!(
                bytes[(pages as usize - 1) * PAGE..].iter().all(|&b| b == 0),
                "grown bytes are zero"
            );
            first.memory_mut().as_mut_slice().fill(0xA5);
        } else {
            assert_eq!(grown, None, "a standalone memory grows past {cap_pages} pages");
            assert_eq!(
                first.memory().vmmemory(),
                before,
                "a failed grow changed the memory"
            );
            break;
        }
    }

    let second = memories.allocate(ty).expect("a second standalone memory");
    assert_fresh(&second, PAGE);
    let span = |m: &StandaloneMemory| {
        let start = m.memory().base() as usize;
        start..start + m.memory().byte_capacity().max(m.memory().byte_size())
    };
    let (a, b) = (span(&first), span(&second));
    assert!(
        a.end <= b.start || b.end <= a.start,
        "two live standalone memories overlap"
    );

    // Given back and taken again (a reusing backend hands the same slot out): nothing of the
    // old tenant, neither at the initial size nor in what the next one grows to.
    drop(first);
    drop(second);
    for _ in 0..2 {
        let mut next = memories.allocate(ty).expect("a standalone memory again");
        assert_fresh(&next, PAGE);
        for page in 1..cap_pages {
            assert_eq!(next.memory_mut().grow(1, None).unwrap(), Some(page));
        }
        assert!(
            next.memory().as_slice().iter().all(|&b| b == 0),
            "a standalone memory shows a previous tenant's bytes"
        );
        next.memory_mut().as_mut_slice().fill(0x5A);
    }
    drop(memories);
    assert_idle(&harness);
}

/// `memory` is accessible for `len` bytes, all zero, and its definition says so.
fn assert_fresh(memory: &StandaloneMemory, len: usize) {
    let memory = memory.memory();
    assert_eq!(
        memory.byte_size(),
        len,
        "a standalone memory starts at its initial size"
    );
    assert!(
        memory.as_slice().iter().all(|&b| b == 0),
        "a standalone memory starts zeroed"
    );
    let definition = memory.vmmemory();
    assert_eq!(definition.base, memory.base());
    assert_eq!(definition.current_length, len);
}
