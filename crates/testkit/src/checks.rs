//! The checks cases share, each failing with a message that says what the backend broke.

use berth_core::{DefinedMemoryIndex, DefinedTableIndex};

use crate::modules::{PAGE, Shape};
use crate::{Capabilities, Harness, Live};

/// The first offset where `got` and `want` differ.
fn first_difference<T: PartialEq>(got: &[T], want: &[T]) -> Option<usize> {
    if got == want {
        return None;
    }
    got.iter().zip(want).position(|(g, w)| g != w)
}

/// Checks that `live` is as fresh as `shape` says (sizes, zeros, data) and its vmctx
/// definitions are exact.
pub(crate) fn assert_fresh(live: &Live, shape: &Shape) {
    for i in 0..shape.memories.len() {
        let bytes = live.memory(i as u32);
        let want = shape.fresh_memory(i);
        assert_eq!(
            bytes.len(),
            want.len(),
            "memory {i} of a new instance does not start at its minimum size"
        );
        if let Some(at) = first_difference(bytes, &want) {
            panic!(
                "memory {i} of a new instance holds {:#x} at offset {at} where a fresh one holds {:#x}: \
                 a previous tenant's bytes are visible",
                bytes[at], want[at]
            );
        }
    }
    for (i, &(min, _)) in shape.tables.iter().enumerate() {
        let elements = live.table(i as u32);
        assert_eq!(
            elements.len(),
            min as usize,
            "table {i} does not start at its minimum"
        );
        if let Some(at) = elements.iter().position(|&e| e != 0) {
            panic!(
                "table {i} of a new instance holds {:#x} at element {at}: a previous tenant's elements are visible",
                elements[at]
            );
        }
    }
    assert_exact(live, shape);
}

/// Grows every memory and table of a fresh `live` to its cap and checks that what growth
/// added reads as zeros (a backend that resets only a memory's initial size fails here).
pub(crate) fn assert_grows_fresh(live: &mut Live, shape: &Shape, caps: &Capabilities) {
    for i in 0..shape.memories.len() {
        let index = DefinedMemoryIndex::from_u32(i as u32);
        let now = live.memory(i as u32).len();
        let cap = shape.memory_cap(i, caps);
        if cap > now {
            let grown = live
                .instance_mut()
                .memory_grow(index, ((cap - now) / PAGE) as u64, None)
                .unwrap();
            assert_eq!(grown, Some((now / PAGE) as u64), "memory {i} grows to its cap");
        }
        let bytes = &live.memory(i as u32)[now..];
        if let Some(at) = bytes.iter().position(|&b| b != 0) {
            panic!(
                "the grown part of memory {i} holds {:#x} at offset {}: a previous tenant's bytes \
                 past the initial size are visible",
                bytes[at],
                now + at
            );
        }
    }
    for i in 0..shape.tables.len() {
        let index = DefinedTableIndex::from_u32(i as u32);
        let now = live.table(i as u32).len();
        let cap = shape.table_cap(i, caps);
        live.instance_mut()
            .table_grow(index, (cap - now) as u64, 0, None)
            .unwrap();
        if let Some(at) = live.table(i as u32).iter().position(|&e| e != 0) {
            panic!("the grown part of table {i} holds a previous tenant's element at {at}");
        }
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
            "the vmctx definition of memory {i} is not the memory's"
        );
    }
    for i in 0..shape.tables.len() {
        let index = DefinedTableIndex::from_u32(i as u32);
        let table = instance.table(index).unwrap();
        assert_eq!(
            instance.vmtable_definition(index),
            Some(table.vmtable()),
            "the vmctx definition of table {i} is not the table's"
        );
    }
}

/// Checks the backend counts nothing live.
pub(crate) fn assert_idle(harness: &Harness) {
    let stats = harness.allocator.stats();
    let counts = (stats.live_instances, stats.live_memories, stats.live_tables);
    assert_eq!(
        counts,
        (0, 0, 0),
        "the backend's counts are wrong: it still counts live (instances, memories, tables) with none live"
    );
}

/// Checks that no two live memories' reservations (base to capacity) and no two live tables'
/// elements overlap.
pub(crate) fn assert_apart<'a>(live: impl IntoIterator<Item = &'a Live>) {
    let mut memories = Vec::new();
    let mut tables = Vec::new();
    for instance in live {
        for (_, (_, memory)) in instance.instance().memories() {
            let start = memory.base() as usize;
            memories.push((start, start + memory.byte_capacity().max(memory.byte_size())));
        }
        for (_, (_, table)) in instance.instance().tables() {
            let elements = table.elements();
            let start = elements.as_ptr() as usize;
            tables.push((start, start + size_of_val(elements)));
        }
    }
    for (what, mut ranges) in [("memories", memories), ("tables", tables)] {
        ranges.retain(|(start, end)| end > start);
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "two live {what} overlap: {:x?} and {:x?}",
                pair[0],
                pair[1]
            );
        }
    }
}

/// The bytes [`dirty`] writes over `len` bytes with `seed`: never zero.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|b| (b as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// The element [`dirty`] fills tables with for `seed`: never null.
fn element(seed: u8) -> usize {
    0xdead_0000 | usize::from(seed)
}

/// Writes a pattern over every accessible byte and element, after growing everything to its
/// cap.
pub(crate) fn dirty(live: &mut Live, shape: &Shape, caps: &Capabilities, seed: u8) {
    for i in 0..shape.memories.len() {
        let index = DefinedMemoryIndex::from_u32(i as u32);
        let cap_pages = (shape.memory_cap(i, caps) / PAGE) as u64;
        let now = live.memory(i as u32).len() as u64 / PAGE as u64;
        if cap_pages > now {
            live.instance_mut()
                .memory_grow(index, cap_pages - now, None)
                .unwrap();
        }
        let len = live.memory(i as u32).len();
        live.instance_mut()
            .memory_write(index, 0, &pattern(len, seed))
            .unwrap();
    }
    for i in 0..shape.tables.len() {
        let index = DefinedTableIndex::from_u32(i as u32);
        let cap = shape.table_cap(i, caps);
        let now = live.table(i as u32).len();
        live.instance_mut()
            .table_grow(index, (cap - now) as u64, 0x5eed, None)
            .unwrap();
        live.instance_mut()
            .table_fill(index, 0, element(seed), cap as u64)
            .unwrap();
    }
}

/// Checks that `live` still holds what [`dirty`] wrote with `seed`: nothing another live
/// instance wrote shows in it.
pub(crate) fn assert_dirty(live: &Live, shape: &Shape, seed: u8) {
    for i in 0..shape.memories.len() {
        let bytes = live.memory(i as u32);
        if let Some(at) = first_difference(bytes, &pattern(bytes.len(), seed)) {
            panic!(
                "memory {i} of a live instance changed at offset {at} without being written: \
                 the backend handed out memories that share bytes"
            );
        }
    }
    for i in 0..shape.tables.len() {
        if let Some(at) = live.table(i as u32).iter().position(|&e| e != element(seed)) {
            panic!(
                "table {i} of a live instance changed at element {at} without being written: \
                 the backend handed out tables that share elements"
            );
        }
    }
}
