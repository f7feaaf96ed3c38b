//! `Table` against a model: get/set/fill/grow with bounds errors, -1 on failed growth.

use std::ptr::NonNull;

use berth_core::{LimitExceeded, OutOfBounds, Table, TableType};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Get(u64),
    Set(u64, usize),
    Fill(u64, usize, u64),
    Grow(u64, usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        (0u64..40).prop_map(Op::Get),
        (0u64..40, 1usize..1000).prop_map(|(i, v)| Op::Set(i, v)),
        (0u64..40, 1usize..1000, 0u64..20).prop_map(|(i, v, n)| Op::Fill(i, v, n)),
        (0u64..8, 0usize..1000).prop_map(|(d, v)| Op::Grow(d, v)),
    ];
    proptest::collection::vec(op, 1..50)
}

proptest! {
    #[test]
    fn tables_follow_the_model(minimum in 0u64..10, maximum in proptest::option::of(10u64..30), slab in any::<bool>(), ops in ops()) {
        let ty = TableType::new(minimum, maximum);
        let mut words = vec![0usize; 24];
        let (mut table, capacity) = if slab {
            let base = NonNull::new(words.as_mut_ptr()).unwrap();
            // SAFETY: `words` is zeroed, used only by this table, and outlives it.
            (unsafe { Table::new_static(&ty, base, 24, None).unwrap() }, 24usize)
        } else {
            (Table::new_dynamic(&ty, None, None).unwrap(), usize::MAX)
        };
        let max = (maximum.unwrap_or(u64::MAX) as usize).min(capacity);
        let mut model = vec![0usize; minimum as usize];
        for op in ops {
            match op {
                Op::Get(i) => prop_assert_eq!(table.get(i), model.get(i as usize).copied()),
                Op::Set(i, v) => {
                    let result = table.set(i, v);
                    if (i as usize) < model.len() {
                        prop_assert!(result.is_ok());
                        model[i as usize] = v;
                    } else {
                        prop_assert!(result.unwrap_err().is::<OutOfBounds>());
                    }
                }
                Op::Fill(i, v, n) => {
                    let result = table.fill(i, v, n);
                    if (i + n) as usize <= model.len() {
                        prop_assert!(result.is_ok());
                        model[i as usize..(i + n) as usize].fill(v);
                    } else {
                        prop_assert!(result.unwrap_err().is::<OutOfBounds>());
                    }
                }
                Op::Grow(d, v) => {
                    let result = table.grow(d, v, None).unwrap();
                    if model.len() + d as usize <= max {
                        prop_assert_eq!(result, Some(model.len() as u64));
                        model.resize(model.len() + d as usize, v);
                    } else {
                        prop_assert_eq!(result, None);
                    }
                }
            }
            prop_assert_eq!(table.elements(), &model[..]);
            prop_assert_eq!(table.vmtable().current_elements, model.len());
            prop_assert_eq!(table.vmtable().base.cast_const(), table.elements().as_ptr());
        }
        drop(table);
    }
}

#[test]
fn a_table_over_the_backend_limit_is_a_typed_error() {
    let error = Table::new_dynamic(&TableType::new(11, None), Some(10), None).unwrap_err();
    let limit = error.downcast_ref::<LimitExceeded>().unwrap();
    assert_eq!(
        (limit.limit, limit.value, limit.requested),
        ("table_elements", 10, 11)
    );
    let mut table = Table::new_dynamic(&TableType::new(10, None), Some(10), None).unwrap();
    assert_eq!(table.grow(1, 0, None).unwrap(), None);
}

#[test]
fn a_minimum_above_the_maximum_is_an_error() {
    assert!(Table::new_dynamic(&TableType::new(5, Some(4)), None, None).is_err());
}

#[test]
fn a_large_table_starts_zero_and_grows_and_an_impossible_one_is_an_error() {
    // 16 Mi elements (128 MiB): the allocator hands over zeroed pages without writing them.
    let size = 1u64 << 24;
    let mut table = Table::new_dynamic(&TableType::new(size, None), None, None).unwrap();
    assert_eq!(
        (table.get(0), table.get(size / 2), table.get(size - 1)),
        (Some(0), Some(0), Some(0))
    );
    table.set(size - 1, 7).unwrap();
    assert_eq!(table.grow(2, 9, None).unwrap(), Some(size));
    assert_eq!(
        (table.get(size - 1), table.get(size), table.get(size + 1)),
        (Some(7), Some(9), Some(9))
    );
    // More words than the address space holds: an error that says how much, not an abort.
    let ty = TableType {
        table64: true,
        ..TableType::new(u64::MAX >> 3, None)
    };
    let error = Table::new_dynamic(&ty, None, None).unwrap_err();
    let text = format!("{error:#}");
    assert!(text.contains("elements"), "{text}");
}
