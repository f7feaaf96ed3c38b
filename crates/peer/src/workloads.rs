//! The modules both systems instantiate, as WebAssembly text, and what each cycle does.

use std::fmt::Write;

/// One benchmarked module and what a cycle does with it.
pub struct Workload {
    /// Short name for the table.
    pub name: &'static str,
    /// What it is, for the docs.
    pub about: &'static str,
    /// The module, as text.
    pub wat: String,
    /// Bytes the tenant writes to memory 0 before the instance is dropped.
    pub dirty: usize,
}

fn escaped(bytes: impl Iterator<Item = u8>) -> String {
    let mut text = String::new();
    for byte in bytes {
        let _ = write!(text, "\\{byte:02x}");
    }
    text
}

/// The seven workloads of the comparison.
pub fn all() -> Vec<Workload> {
    let data_64k = escaped((0..65536u32).map(|i| (i % 251) as u8 | 1));
    let sparse: String = (0..=16u32)
        .map(|i| {
            format!(
                "(data (i32.const {}) \"{}\")\n",
                (i * 65536).min(1048576 - 16),
                escaped((0..16).map(|b| b + 1))
            )
        })
        .collect();
    let elems = "$f ".repeat(1000);
    vec![
        Workload {
            name: "untouched",
            about: "one 64 KiB memory, not written",
            wat: "(module (memory 1))".into(),
            dirty: 0,
        },
        Workload {
            name: "dirty-64k",
            about: "one 64 KiB memory, all 64 KiB written before deallocation",
            wat: "(module (memory (export \"memory\") 1))".into(),
            dirty: 65536,
        },
        Workload {
            name: "data-64k",
            about: "one memory initialized by a 64 KiB data segment",
            wat: format!("(module (memory 1) (data (i32.const 0) \"{data_64k}\"))"),
            dirty: 0,
        },
        Workload {
            name: "sparse-1m",
            about: "a 2 MiB memory with 17 small data segments spread over its first 1 MiB",
            wat: format!("(module (memory 32)\n{sparse})"),
            dirty: 0,
        },
        Workload {
            name: "table-1000",
            about: "a 1000-element table filled by an element segment",
            wat: format!("(module (func $f) (table 1000 funcref) (elem (i32.const 0) func {elems}))"),
            dirty: 0,
        },
        Workload {
            name: "multi-4x4",
            about: "four memories and four tables",
            wat: "(module (memory 1) (memory 1) (memory 1) (memory 1) (table 10 funcref) (table 10 funcref) (table 10 funcref) (table 10 funcref))".into(),
            dirty: 0,
        },
        Workload {
            name: "memory-64m",
            about: "one 64 MiB memory, not written",
            wat: "(module (memory 1024))".into(),
            dirty: 0,
        },
    ]
}
