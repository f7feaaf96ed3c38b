//! Shared setup for Berth's Criterion benchmarks: engines for each backend and reset policy,
//! and the benchmarked modules.
#![forbid(unsafe_code)]

use anyhow::Result;
use berth_engine::{Config, Engine, InstanceAllocationStrategy, LoadedModule, PoolingConfig};

/// The benchmarked modules, as text: (name, module, bytes written per cycle).
pub const MODULES: &[(&str, &str, usize)] = &[
    ("untouched", "(module (memory 1))", 0),
    ("dirty-64k", "(module (memory 1))", 65536),
    (
        "data",
        "(module (memory 1) (data (i32.const 0) \"hello, berth\") (data (i32.const 40000) \"more\"))",
        0,
    ),
    (
        "table",
        "(module (func $f) (table 100 funcref) (elem (i32.const 0) func $f $f $f $f $f $f $f $f))",
        0,
    ),
];

/// An engine with the on-demand backend.
pub fn on_demand() -> Result<Engine> {
    Engine::new(&Config::new())
}

/// An engine with a pool of 64 slots and otherwise default settings, or `keep_resident` bytes
/// of each memory slot kept resident if given.
pub fn pooling(keep_resident: Option<usize>) -> Result<Engine> {
    let mut pool = PoolingConfig::new();
    pool.total_memories(64).total_tables(64).total_core_instances(64);
    if let Some(keep) = keep_resident {
        pool.linear_memory_keep_resident(keep);
    }
    let mut config = Config::new();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

/// Loads module text into `engine`.
pub fn load(engine: &Engine, text: &str) -> Result<LoadedModule> {
    engine.load(berth_wasm::parse(text.as_bytes())?)
}
