//! A fuzz-style property test: mutated binaries are an error or a module, never a panic.
//! Run longer with `PROPTEST_CASES=100000 cargo test --release -p berth-wasm --test wasm malformed::`.

use proptest::prelude::*;

const SEEDS: &[&str] = &[
    "(module (memory 1 4) (data (i32.const 8) \"hello\"))",
    "(module (import \"e\" \"g\" (global i32)) (memory 2) (data (global.get 0) \"x\") (table 3 funcref) (func) (elem (i32.const 0) func 0))",
    "(module (memory i64 1) (memory 1 (pagesize 1)) (global (mut i64) (i64.const 3)) (data (memory 0) (i64.const 0) \"y\"))",
];

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn mutated_binaries_never_panic(seed in 0..SEEDS.len(), mutations in proptest::collection::vec(mutation(), 1..6)) {
        let mut bytes = wat::parse_str(SEEDS[seed]).unwrap();
        for mutation in mutations {
            let len = bytes.len().max(1);
            match mutation {
                Mutation::Flip(i, b) => { let i = i % len; if i < bytes.len() { bytes[i] ^= b | 1; } }
                Mutation::Truncate(i) => bytes.truncate(i % len),
                Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
                Mutation::Remove(i) => { if !bytes.is_empty() { bytes.remove(i % bytes.len()); } }
            }
        }
        if let Err(error) = berth_wasm::parse(&bytes) {
            prop_assert!(!error.to_string().is_empty());
        }
    }
}
