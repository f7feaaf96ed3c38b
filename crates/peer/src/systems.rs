//! The systems compared: Wasmtime 48 (on-demand, pooling with defaults, pooling tuned) and
//! Berth (on-demand, pooling with defaults). One cycle of each is one instance's whole life.

use anyhow::{Context, Result};

use crate::workloads::Workload;

/// One prepared (system, workload) pair: calling it runs one cycle.
pub type Cycle = Box<dyn FnMut() -> Result<()>>;

/// Compiles or loads a workload once and returns its cycle.
type Prepare = Box<dyn Fn(&Workload) -> Result<Cycle> + Send + Sync>;

/// A system under comparison.
pub struct System {
    /// Its label in the tables.
    pub name: &'static str,
    prepare: Prepare,
}

impl System {
    /// Compiles or loads `workload` once and returns its cycle.
    pub fn prepare(&self, workload: &Workload) -> Result<Cycle> {
        (self.prepare)(workload).with_context(|| format!("{} cannot run {}", self.name, workload.name))
    }
}

fn wasmtime_engine(pooling: Option<bool>) -> Result<wasmtime::Engine> {
    let mut config = wasmtime::Config::new();
    if let Some(tuned) = pooling {
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        // Raised from 1 so that the four-memory workload can run; nothing else changes.
        pool.max_memories_per_module(4).max_tables_per_module(4);
        if tuned {
            pool.linear_memory_keep_resident(1 << 20)
                .table_keep_resident(1 << 20)
                .pagemap_scan(wasmtime::Enabled::Yes);
        }
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    wt(wasmtime::Engine::new(&config))
}

/// Wasmtime's own error type, as an `anyhow` error.
fn wt<T>(result: wasmtime::Result<T>) -> Result<T> {
    result.map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// One Wasmtime cycle: `Store::new` + instantiate (+ write) + drop.
fn wasmtime_system(name: &'static str, pooling: Option<bool>) -> Result<System> {
    let engine = wasmtime_engine(pooling)?;
    Ok(System {
        name,
        prepare: Box::new(move |workload: &Workload| -> Result<Cycle> {
            let engine = engine.clone();
            let module = wt(wasmtime::Module::new(&engine, &workload.wat))?;
            let buffer = vec![0xA5u8; workload.dirty];
            Ok(Box::new(move || {
                let mut store = wasmtime::Store::new(&engine, ());
                let instance = wt(wasmtime::Instance::new(&mut store, &module, &[]))?;
                if !buffer.is_empty() {
                    let memory = instance
                        .get_memory(&mut store, "memory")
                        .context("no exported memory")?;
                    memory
                        .write(&mut store, 0, &buffer)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                }
                drop(store);
                Ok(())
            }))
        }),
    })
}

/// One Berth cycle: instantiate through the engine (+ write) + drop.
fn berth_system(name: &'static str, pooling: bool) -> Result<System> {
    let mut config = berth_engine::Config::new();
    if pooling {
        let mut pool = berth_engine::PoolingConfig::new();
        // Raised from 1 so that the four-memory workload can run; nothing else changes.
        pool.max_memories_per_module(4).max_tables_per_module(4);
        config.allocation_strategy(berth_engine::InstanceAllocationStrategy::Pooling(pool));
    }
    let engine = berth_engine::Engine::new(&config)?;
    Ok(System {
        name,
        prepare: Box::new(move |workload: &Workload| -> Result<Cycle> {
            let module = engine.load(berth_wasm::parse(workload.wat.as_bytes())?)?;
            let buffer = vec![0xA5u8; workload.dirty];
            Ok(Box::new(move || {
                let mut instance = berth_engine::Instance::new(&module)?;
                if !buffer.is_empty() {
                    instance.write_memory(0, 0, &buffer)?;
                }
                drop(instance);
                Ok(())
            }))
        }),
    })
}

/// Every system, in table order.
pub fn all() -> Result<Vec<System>> {
    Ok(vec![
        wasmtime_system("wasmtime on-demand", None)?,
        wasmtime_system("wasmtime pooling", Some(false))?,
        wasmtime_system("wasmtime pooling tuned", Some(true))?,
        berth_system("berth on-demand", false)?,
        berth_system("berth pooling", true)?,
    ])
}

/// A pooled system for the thread and resident-memory runs.
pub fn pooled(berth: bool) -> Result<System> {
    if berth {
        berth_system("berth pooling", true)
    } else {
        wasmtime_system("wasmtime pooling", Some(false))
    }
}

/// Not an allocator: a user-space loop of about the length of a pooled cycle (a 2 KiB heap
/// block zeroed, filled, summed and freed), sharing nothing between threads. Its two-thread
/// ratio is what this machine gives a workload with no contention at all, in the same run.
pub fn control() -> System {
    System {
        name: "control: user-space loop, nothing shared",
        prepare: Box::new(|_: &Workload| -> Result<Cycle> {
            let mut seed = 1u64;
            Ok(Box::new(move || {
                let mut block = vec![0u64; 256];
                for (i, word) in block.iter_mut().enumerate() {
                    *word = seed.wrapping_mul(i as u64 + 1);
                }
                seed = std::hint::black_box(block.iter().fold(0, |a, &w| a ^ w)) | 1;
                Ok(())
            }))
        }),
    }
}
