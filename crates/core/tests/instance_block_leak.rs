//! An instance block dropped before it is consumed frees its buffer. One test in this binary,
//! so the counting allocator sees nothing else.

#![allow(clippy::cast_possible_truncation)] // Test models index with `as usize` on 64-bit hosts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use berth_core::{HostPtr, InstanceBlock, VMOffsets, VMOffsetsFields};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to `System`, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::SeqCst);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::SeqCst);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::SeqCst);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn an_unconsumed_block_is_freed() {
    let fields = VMOffsetsFields {
        num_defined_memories: 3,
        num_owned_memories: 3,
        num_defined_tables: 2,
        num_defined_globals: 5,
        ..VMOffsetsFields::default()
    };
    let offsets = VMOffsets::from_fields(HostPtr, fields).unwrap();
    let layout = InstanceBlock::layout(&offsets).unwrap();
    for _ in 0..100 {
        let before = LIVE_BYTES.load(Ordering::SeqCst);
        let (block, memories, tables) = InstanceBlock::new(&offsets).unwrap();
        drop((memories, tables));
        let during = LIVE_BYTES.load(Ordering::SeqCst);
        assert_eq!(
            during - before,
            layout.size() as isize,
            "the block was allocated with its layout"
        );
        drop(block);
        assert_eq!(
            LIVE_BYTES.load(Ordering::SeqCst),
            before,
            "dropping the block freed it"
        );
    }
}
