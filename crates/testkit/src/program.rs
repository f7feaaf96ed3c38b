//! Programs of random operations checked against a model: what every memory and table holds
//! (also after the kernel moved their pages to swap or the inactive list), how many resources
//! are live, when a limit must refuse, and that live memories never overlap.

use berth_core::sys::PageEvent;
use berth_core::{DefinedMemoryIndex, DefinedTableIndex, LimitExceeded};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::checks::{assert_apart, assert_exact, assert_fresh, assert_idle};
use crate::modules::{self, PAGE, Shape};
use crate::reuse::disturb_all;
use crate::{Ctx, Live};

#[derive(Debug, Clone)]
enum Op {
    /// Instantiate module `i` (modulo the loadable ones).
    New(usize),
    /// Write `len` bytes of `byte` into memory `mem` of instance `inst` at `offset` (all
    /// modulo what exists).
    Write {
        inst: usize,
        mem: usize,
        offset: usize,
        len: usize,
        byte: u8,
    },
    /// Grow memory `mem` of instance `inst` by `delta` pages.
    Grow { inst: usize, mem: usize, delta: u64 },
    /// Set element `elem` of table `table` of instance `inst`.
    Set {
        inst: usize,
        table: usize,
        elem: usize,
        value: usize,
    },
    /// Grow table `table` of instance `inst` by `delta`.
    GrowTable { inst: usize, table: usize, delta: u64 },
    /// Deallocate instance `inst`.
    Drop(usize),
    /// Ask the kernel to move instance `inst`'s pages (to swap if `swap`, else to the inactive
    /// list): nothing it holds may change, and nothing of it may reach a later tenant.
    Disturb { inst: usize, swap: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<usize>().prop_map(Op::New),
        4 => (any::<usize>(), any::<usize>(), any::<usize>(), 1usize..5000, 1u8..=255)
            .prop_map(|(inst, mem, offset, len, byte)| Op::Write { inst, mem, offset, len, byte }),
        2 => (any::<usize>(), any::<usize>(), 0u64..3).prop_map(|(inst, mem, delta)| Op::Grow { inst, mem, delta }),
        2 => (any::<usize>(), any::<usize>(), any::<usize>(), 1usize..1000)
            .prop_map(|(inst, table, elem, value)| Op::Set { inst, table, elem, value }),
        1 => (any::<usize>(), any::<usize>(), 0u64..4).prop_map(|(inst, table, delta)| Op::GrowTable { inst, table, delta }),
        2 => any::<usize>().prop_map(Op::Drop),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(inst, swap)| Op::Disturb { inst, swap }),
    ]
}

/// One live instance and what the model says it holds.
struct Modeled {
    live: Live,
    shape: Shape,
    memories: Vec<Vec<u8>>,
    tables: Vec<Vec<usize>>,
}

pub(crate) fn programs_agree_with_the_model(ctx: &Ctx<'_>) {
    let cases = std::env::var("BERTH_CONFORMANCE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..60), |ops| {
        run_program(ctx, ops);
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
}

fn run_program(ctx: &Ctx<'_>, ops: Vec<Op>) {
    let harness = ctx.harness();
    let shapes: Vec<Shape> = modules::all().into_iter().filter(|s| s.fits(&ctx.caps)).collect();
    let loaded: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| harness.load(s.build(&format!("m{i}"))).unwrap())
        .collect();
    let mut live: Vec<Modeled> = Vec::new();
    let caps = &ctx.caps;
    for op in ops {
        match op {
            Op::New(i) => {
                let i = i % shapes.len();
                let shape = &shapes[i];
                let memories: usize = live.iter().map(|m| m.shape.memories.len()).sum();
                let tables: usize = live.iter().map(|m| m.shape.tables.len()).sum();
                let fits = caps.max_instances.is_none_or(|m| live.len() < m)
                    && caps
                        .max_memories
                        .is_none_or(|m| memories + shape.memories.len() <= m)
                    && caps.max_tables.is_none_or(|m| tables + shape.tables.len() <= m);
                match harness.instantiate(&loaded[i], None) {
                    Ok(instance) => {
                        assert!(fits, "an instantiation over a declared limit succeeded");
                        assert_fresh(&instance, shape);
                        live.push(Modeled {
                            memories: (0..shape.memories.len()).map(|i| shape.fresh_memory(i)).collect(),
                            tables: shape
                                .tables
                                .iter()
                                .map(|&(min, _)| vec![0; min as usize])
                                .collect(),
                            shape: shape.clone(),
                            live: instance,
                        });
                    }
                    Err(error) => {
                        assert!(!fits, "an instantiation within the limits failed: {error:#}");
                        assert!(
                            error.chain().any(|e| e.is::<LimitExceeded>()),
                            "not a typed limit error: {error:#}"
                        );
                    }
                }
            }
            Op::Write {
                inst,
                mem,
                offset,
                len,
                byte,
            } => {
                let Some(m) = pick(&mut live, inst) else { continue };
                if m.memories.is_empty() {
                    continue;
                }
                let mem = mem % m.memories.len();
                let size = m.memories[mem].len();
                if size == 0 {
                    continue;
                }
                let offset = offset % size;
                let data = vec![byte; len];
                let index = DefinedMemoryIndex::from_u32(mem as u32);
                let result = m.live.instance_mut().memory_write(index, offset as u64, &data);
                if offset + len <= size {
                    result.unwrap();
                    m.memories[mem][offset..offset + len].fill(byte);
                } else {
                    assert!(result.is_err(), "an out-of-bounds write succeeded");
                }
            }
            Op::Grow { inst, mem, delta } => {
                let Some(m) = pick(&mut live, inst) else { continue };
                if m.memories.is_empty() {
                    continue;
                }
                let mem = mem % m.memories.len();
                let index = DefinedMemoryIndex::from_u32(mem as u32);
                let old = m.memories[mem].len();
                let result = m.live.instance_mut().memory_grow(index, delta, None).unwrap();
                let new = old + delta as usize * PAGE;
                if new <= m.shape.memory_cap(mem, caps) {
                    assert_eq!(result, Some((old / PAGE) as u64));
                    m.memories[mem].resize(new, 0);
                } else {
                    assert_eq!(result, None);
                }
            }
            Op::Set {
                inst,
                table,
                elem,
                value,
            } => {
                let Some(m) = pick(&mut live, inst) else { continue };
                if m.tables.is_empty() {
                    continue;
                }
                let table = table % m.tables.len();
                let index = DefinedTableIndex::from_u32(table as u32);
                let size = m.tables[table].len();
                let elem = elem % (size + 2);
                let result = m.live.instance_mut().table_set(index, elem as u64, value);
                if elem < size {
                    result.unwrap();
                    m.tables[table][elem] = value;
                } else {
                    assert!(result.is_err(), "an out-of-bounds table set succeeded");
                }
            }
            Op::GrowTable { inst, table, delta } => {
                let Some(m) = pick(&mut live, inst) else { continue };
                if m.tables.is_empty() {
                    continue;
                }
                let table = table % m.tables.len();
                let index = DefinedTableIndex::from_u32(table as u32);
                let old = m.tables[table].len();
                let result = m.live.instance_mut().table_grow(index, delta, 3, None).unwrap();
                if old + delta as usize <= m.shape.table_cap(table, caps) {
                    assert_eq!(result, Some(old as u64));
                    m.tables[table].resize(old + delta as usize, 3);
                } else {
                    assert_eq!(result, None);
                }
            }
            Op::Drop(inst) => {
                if !live.is_empty() {
                    let i = inst % live.len();
                    live.swap_remove(i);
                }
            }
            Op::Disturb { inst, swap } => {
                let Some(m) = pick(&mut live, inst) else { continue };
                let event = if swap {
                    PageEvent::SwapOut
                } else {
                    PageEvent::Deactivate
                };
                disturb_all(&m.live, event);
            }
        }
        check(&harness, &live);
    }
    drop(live);
    assert_idle(&harness);
}

fn pick(live: &mut [Modeled], inst: usize) -> Option<&mut Modeled> {
    if live.is_empty() {
        return None;
    }
    let len = live.len();
    live.get_mut(inst % len)
}

/// Everything the model knows, checked against the allocator.
fn check(harness: &crate::Harness, live: &[Modeled]) {
    for m in live {
        for (i, expected) in m.memories.iter().enumerate() {
            let bytes = m.live.memory(i as u32);
            if bytes != &expected[..] {
                let at = bytes.iter().zip(expected).position(|(a, b)| a != b);
                panic!(
                    "memory {i} differs from the model (sizes {} and {}, first difference at {at:?})",
                    bytes.len(),
                    expected.len()
                );
            }
        }
        for (i, expected) in m.tables.iter().enumerate() {
            assert_eq!(
                m.live.table(i as u32),
                &expected[..],
                "table {i} differs from the model"
            );
        }
        assert_exact(&m.live, &m.shape);
    }
    assert_apart(live.iter().map(|m| &m.live));
    let stats = harness.allocator.stats();
    let memories: usize = live.iter().map(|m| m.memories.len()).sum();
    let tables: usize = live.iter().map(|m| m.tables.len()).sum();
    assert_eq!(
        (stats.live_instances, stats.live_memories, stats.live_tables),
        (live.len() as u64, memories as u64, tables as u64),
        "the backend's counts of live (instances, memories, tables) differ from the model"
    );
}
