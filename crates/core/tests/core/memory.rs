//! `Memory` against a model: grow semantics (old size or -1, nothing changed on failure),
//! reads and writes within bounds, contents kept across a move, the limiter's say.

use std::ptr::NonNull;

use anyhow::{Result, bail};
use berth_core::{
    LimitExceeded, LimiterDenied, Memory, MemoryType, Mmap, OutOfBounds, ResourceLimiter, Tunables,
};
use proptest::prelude::*;

const PAGE: usize = 65536;

#[derive(Debug, Clone)]
enum Op {
    Grow(u64),
    Write(u64, Vec<u8>),
    Read(u64, usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        (0u64..4).prop_map(Op::Grow),
        (
            0u64..(6 * PAGE as u64),
            proptest::collection::vec(any::<u8>(), 1..300)
        )
            .prop_map(|(o, d)| Op::Write(o, d)),
        (0u64..(6 * PAGE as u64), 1usize..300).prop_map(|(o, l)| Op::Read(o, l)),
    ];
    proptest::collection::vec(op, 1..40)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Default tunables: 4 GiB reserved, never moves.
    Reserved,
    /// No reservation beyond the initial size, one page of growth reserve, may move.
    Moving,
    /// Two pages reserved, may not move.
    Pinned,
    /// A static memory of four pages in a caller-owned mapping.
    Static,
}

/// What the model says one memory can grow to, in bytes.
fn capacity(kind: Kind) -> usize {
    match kind {
        Kind::Reserved | Kind::Moving => usize::MAX,
        Kind::Pinned => 2 * PAGE,
        Kind::Static => 4 * PAGE,
    }
}

fn make(kind: Kind, ty: &MemoryType, slab: &mut Mmap) -> Memory {
    let tunables = match kind {
        Kind::Reserved | Kind::Static => Tunables::default(),
        Kind::Moving => Tunables {
            memory_reservation: 0,
            memory_reservation_for_growth: PAGE as u64,
            memory_guard_size: PAGE as u64,
            ..Tunables::default()
        },
        Kind::Pinned => Tunables {
            memory_reservation: 2 * PAGE as u64,
            memory_may_move: false,
            memory_guard_size: PAGE as u64,
            ..Tunables::default()
        },
    };
    match kind {
        Kind::Static => {
            let base = NonNull::new(slab.as_mut_ptr()).unwrap();
            // SAFETY: the slab is a fresh PROT_NONE reservation of 4 pages that only this
            // memory uses, and it outlives the memory (dropped after it in the test).
            unsafe { Memory::new_static(ty, base, 4 * PAGE, 0, None).unwrap() }
        }
        _ => Memory::new_dynamic(ty, &tunables, None, None).unwrap(),
    }
}

fn run(kind: Kind, minimum: u64, maximum: Option<u64>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let ty = MemoryType::new(minimum, maximum);
    let mut slab = Mmap::reserve(4 * PAGE).unwrap();
    let mut memory = make(kind, &ty, &mut slab);
    let mut model = vec![0u8; minimum as usize * PAGE];
    let max_bytes = (maximum.unwrap_or(65536) as usize * PAGE).min(capacity(kind));
    for op in ops {
        match op {
            Op::Grow(delta) => {
                let before = memory.vmmemory();
                let result = memory.grow(delta, None).unwrap();
                let wanted = model.len() + delta as usize * PAGE;
                if wanted <= max_bytes {
                    prop_assert_eq!(result, Some((model.len() / PAGE) as u64));
                    model.resize(wanted, 0);
                } else {
                    prop_assert_eq!(result, None);
                    prop_assert_eq!(memory.vmmemory(), before, "a failed grow changed the memory");
                }
            }
            Op::Write(offset, data) => {
                let result = memory.write(offset, &data);
                let end = offset as usize + data.len();
                if end <= model.len() {
                    prop_assert!(result.is_ok());
                    model[offset as usize..end].copy_from_slice(&data);
                } else {
                    prop_assert!(result.unwrap_err().is::<OutOfBounds>());
                }
            }
            Op::Read(offset, len) => {
                let mut buf = vec![0u8; len];
                let result = memory.read(offset, &mut buf);
                let end = offset as usize + len;
                if end <= model.len() {
                    prop_assert!(result.is_ok());
                    prop_assert_eq!(&buf[..], &model[offset as usize..end]);
                } else {
                    prop_assert!(result.unwrap_err().is::<OutOfBounds>());
                }
            }
        }
        let definition = memory.vmmemory();
        prop_assert_eq!(definition.current_length, model.len());
        prop_assert_eq!(memory.byte_size(), model.len());
        prop_assert_eq!(definition.base, memory.base());
    }
    prop_assert!(
        memory.as_slice() == &model[..],
        "memory contents differ from the model"
    );
    drop(memory);
    drop(slab);
    Ok(())
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Reserved),
        Just(Kind::Moving),
        Just(Kind::Pinned),
        Just(Kind::Static)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn grow_write_read_follow_the_model(
        kind in kind(),
        minimum in 0u64..2,
        maximum in proptest::option::of(2u64..6),
        ops in ops(),
    ) {
        run(kind, minimum, maximum, ops)?;
    }
}

#[test]
fn contents_survive_a_move() {
    let tunables = Tunables {
        memory_reservation: 0,
        memory_reservation_for_growth: 0,
        memory_guard_size: PAGE as u64,
        ..Tunables::default()
    };
    let mut memory = Memory::new_dynamic(&MemoryType::new(1, None), &tunables, None, None).unwrap();
    let pattern: Vec<u8> = (0..PAGE).map(|i| (i * 7 % 251) as u8).collect();
    memory.write(0, &pattern).unwrap();
    let old_base = memory.base();
    assert_eq!(memory.byte_capacity(), PAGE, "no room to grow in place");
    assert_eq!(memory.grow(3, None).unwrap(), Some(1));
    assert_ne!(memory.base(), old_base, "the memory moved");
    assert_eq!(&memory.as_slice()[..PAGE], &pattern[..]);
    assert!(
        memory.as_slice()[PAGE..].iter().all(|&b| b == 0),
        "new pages read zero"
    );
    assert_eq!(memory.vmmemory().current_length, 4 * PAGE);
}

#[test]
fn a_move_makes_resident_only_what_was_written() {
    let Some(map) = berth_core::sys::page_map() else {
        eprintln!("skipped a_move_makes_resident_only_what_was_written: no PAGEMAP_SCAN here");
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true: CI must have PAGEMAP_SCAN"
        );
        return;
    };
    let tunables = Tunables {
        memory_reservation: 0,
        memory_reservation_for_growth: 0,
        memory_guard_size: PAGE as u64,
        ..Tunables::default()
    };
    // 8 MiB, of which the tenant writes one byte near the start and one near the end (with
    // transparent huge pages always on, each makes 2 MiB resident: half the memory).
    let mut memory = Memory::new_dynamic(&MemoryType::new(128, None), &tunables, None, None).unwrap();
    memory.write(100, &[0xA1]).unwrap();
    memory.write(128 * PAGE as u64 - 1, &[0xB2]).unwrap();
    // Reading untouched pages maps the zero page: nothing to copy there either.
    assert!(memory.as_slice()[PAGE..2 * PAGE].iter().all(|&b| b == 0));
    let present = |memory: &Memory| {
        let base = std::ptr::NonNull::new(memory.base()).unwrap();
        map.count(base, memory.byte_size(), berth_core::sys::PageState::Present)
            .unwrap()
    };
    let before = present(&memory);
    assert_eq!(memory.grow(128, None).unwrap(), Some(128), "moved to 16 MiB");
    let after = present(&memory);
    // (Transparent huge pages may make a written byte's 2 MiB resident: as many as before.)
    assert!(
        after <= before,
        "{after} pages resident after the move, {before} before it"
    );
    let bytes = memory.as_slice();
    assert_eq!((bytes[100], bytes[128 * PAGE - 1]), (0xA1, 0xB2));
    assert_eq!(bytes.iter().filter(|&&b| b != 0).count(), 2);
}

#[test]
fn a_memory_that_may_not_move_fails_to_grow_past_its_reservation() {
    let tunables = Tunables {
        memory_reservation: PAGE as u64,
        memory_may_move: false,
        ..Tunables::default()
    };
    let mut memory = Memory::new_dynamic(&MemoryType::new(1, None), &tunables, None, None).unwrap();
    let base = memory.base();
    assert_eq!(memory.grow(1, None).unwrap(), None);
    assert_eq!((memory.base(), memory.byte_size()), (base, PAGE));
}

#[test]
fn the_backend_limit_caps_creation_and_growth() {
    let tunables = Tunables::default();
    let error = Memory::new_dynamic(&MemoryType::new(3, None), &tunables, Some(2 * PAGE), None).unwrap_err();
    let limit = error
        .downcast_ref::<LimitExceeded>()
        .expect("a typed limit error");
    assert_eq!(
        (limit.limit, limit.value, limit.requested),
        ("max_memory_size", 2 * PAGE as u64, 3 * PAGE as u64)
    );
    let mut memory = Memory::new_dynamic(&MemoryType::new(1, None), &tunables, Some(2 * PAGE), None).unwrap();
    assert_eq!(memory.grow(1, None).unwrap(), Some(1));
    assert_eq!(memory.grow(1, None).unwrap(), None);
}

/// Allows growth up to `cap` bytes, errors when asked for exactly `trap_at`.
struct Cap {
    cap: usize,
    trap_at: usize,
    calls: Vec<(usize, usize)>,
}

impl ResourceLimiter for Cap {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> Result<bool> {
        self.calls.push((current, desired));
        if desired == self.trap_at {
            bail!("limiter trap at {desired}");
        }
        Ok(desired <= self.cap)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> Result<bool> {
        Ok(desired <= self.cap)
    }
}

#[test]
fn the_limiter_is_consulted_on_creation_and_growth() {
    let tunables = Tunables::default();
    let mut limiter = Cap {
        cap: 2 * PAGE,
        trap_at: 4 * PAGE,
        calls: Vec::new(),
    };
    let denied =
        Memory::new_dynamic(&MemoryType::new(3, None), &tunables, None, Some(&mut limiter)).unwrap_err();
    assert_eq!(
        denied.downcast_ref::<LimiterDenied>().unwrap().desired,
        3 * PAGE as u64
    );

    let mut memory =
        Memory::new_dynamic(&MemoryType::new(1, None), &tunables, None, Some(&mut limiter)).unwrap();
    assert_eq!(memory.grow(1, Some(&mut limiter)).unwrap(), Some(1));
    assert_eq!(memory.grow(1, Some(&mut limiter)).unwrap(), None, "denied: -1");
    assert!(
        memory.grow(2, Some(&mut limiter)).is_err(),
        "the limiter's error is passed on"
    );
    assert_eq!(
        memory.byte_size(),
        2 * PAGE,
        "unchanged after the denial and the error"
    );
    assert_eq!(
        limiter.calls,
        vec![
            (0, 3 * PAGE),
            (0, PAGE),
            (PAGE, 2 * PAGE),
            (2 * PAGE, 3 * PAGE),
            (2 * PAGE, 4 * PAGE)
        ]
    );
}

#[test]
fn growth_past_the_type_maximum_or_the_index_space_is_minus_one() {
    let mut memory =
        Memory::new_dynamic(&MemoryType::new(1, Some(2)), &Tunables::default(), None, None).unwrap();
    assert_eq!(memory.grow(2, None).unwrap(), None);
    assert_eq!(memory.grow(u64::MAX, None).unwrap(), None);
    assert_eq!(memory.grow(0, None).unwrap(), Some(1));
    assert_eq!(memory.grow(1, None).unwrap(), Some(1));
    assert_eq!(memory.pages(), 2);
}

#[test]
fn bad_types_are_errors() {
    let tunables = Tunables::default();
    let mut ty = MemoryType::new(2, Some(1));
    assert!(Memory::new_dynamic(&ty, &tunables, None, None).is_err());
    ty = MemoryType::new(65537, None);
    assert!(Memory::new_dynamic(&ty, &tunables, None, None).is_err());
    ty = MemoryType {
        page_size_log2: 12,
        ..MemoryType::new(1, None)
    };
    assert!(Memory::new_dynamic(&ty, &tunables, None, None).is_err());
}

#[test]
fn one_byte_pages_are_exact() {
    let ty = MemoryType {
        page_size_log2: 0,
        ..MemoryType::new(100, Some(5000))
    };
    let mut memory = Memory::new_dynamic(&ty, &Tunables::default(), None, None).unwrap();
    assert_eq!(memory.vmmemory().current_length, 100);
    assert!(memory.write(100, &[1]).unwrap_err().is::<OutOfBounds>());
    assert_eq!(memory.grow(4900, None).unwrap(), Some(100));
    assert_eq!(memory.byte_size(), 5000);
    assert_eq!(memory.grow(1, None).unwrap(), None);
}

#[test]
fn one_byte_pages_stop_at_the_largest_page_count_of_the_index_type() {
    let one_byte = |memory64, minimum| MemoryType {
        page_size_log2: 0,
        memory64,
        ..MemoryType::new(minimum, None)
    };
    // memory.size of a 32-bit memory is an i32 read as unsigned: 2^32 pages do not fit.
    assert_eq!(one_byte(false, 0).absolute_max_pages(), u64::from(u32::MAX));
    assert_eq!(one_byte(true, 0).absolute_max_pages(), u64::MAX);
    assert_eq!(MemoryType::new(0, None).absolute_max_pages(), 1 << 16);
    assert!(one_byte(false, 1 << 32).validate().is_err());
    one_byte(false, u64::from(u32::MAX)).validate().unwrap();
    let mut memory = Memory::new_dynamic(&one_byte(false, 0), &Tunables::default(), None, None).unwrap();
    assert_eq!(memory.grow(1 << 32, None).unwrap(), None, "2^32 one-byte pages");
    assert_eq!(memory.byte_size(), 0);
}

#[test]
fn growth_zeroes_the_host_page_tail_of_one_byte_page_memories() {
    let ty = MemoryType {
        page_size_log2: 0,
        ..MemoryType::new(10, None)
    };
    let mut memory = Memory::new_dynamic(&ty, &Tunables::default(), None, None).unwrap();
    // Compiled code without bounds checks could store past the size, inside the host page.
    // SAFETY: byte 100 is inside the accessible host page that holds the memory's last byte.
    unsafe { memory.base().add(100).write(0xAA) };
    assert_eq!(memory.grow(200, None).unwrap(), Some(10));
    assert!(
        memory.as_slice()[10..].iter().all(|&b| b == 0),
        "new bytes must read zero"
    );
}

#[test]
fn a_tracked_reservation_follows_moves_and_drop() {
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tunables = Tunables {
        memory_reservation: 0,
        memory_reservation_for_growth: 0,
        memory_guard_size: PAGE as u64,
        ..Tunables::default()
    };
    let mut memory = Memory::new_dynamic(&MemoryType::new(1, None), &tunables, None, None).unwrap();
    memory.track_reservation(counter.clone());
    let load = || counter.load(std::sync::atomic::Ordering::Relaxed) as usize;
    assert_eq!(load(), memory.reserved_bytes());
    assert_eq!(memory.grow(3, None).unwrap(), Some(1));
    assert_eq!(load(), memory.reserved_bytes(), "a move updates the count");
    assert_eq!(load(), 5 * PAGE);
    drop(memory);
    assert_eq!(load(), 0);
}

#[test]
fn a_memory64_whose_minimum_is_16_eib_is_invalid_but_such_a_maximum_is_not() {
    let huge = MemoryType {
        memory64: true,
        ..MemoryType::new(1 << 48, None)
    };
    let err = huge
        .validate()
        .expect_err("2^48 pages of 64 KiB do not fit a u64");
    assert!(err.to_string().contains("16 EiB or more"), "{err}");
    let tunables = Tunables::default();
    assert!(Memory::new_dynamic(&huge, &tunables, None, None).is_err());
    // A declared maximum that large is valid: growth stops short of it.
    let bounded = MemoryType {
        memory64: true,
        ..MemoryType::new(1, Some(1 << 48))
    };
    bounded.validate().expect("a maximum of 16 EiB is allowed");
}
