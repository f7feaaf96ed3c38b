//! Runs a WebAssembly module in Wasmtime 48 on Berth's memories: loads a `.wat` or `.wasm`,
//! instantiates it, invokes an exported function with the arguments given, and prints its
//! results and what Berth allocated.
//!
//! Run: `cargo run --release --manifest-path crates/wasmtime/Cargo.toml --bin berth-wasmtime-run -- examples/modules/checksum.wat --invoke checksum 100000`

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use berth_core::human_bytes;
use clap::Parser;
use wasmtime::{Instance, Module, Store, Val, ValType};

/// Run a module's exported function in Wasmtime on Berth memories.
#[derive(Debug, Parser)]
struct Args {
    /// The module (`.wat` or `.wasm`).
    module: PathBuf,
    /// The exported function to call (none: instantiate only).
    #[arg(long)]
    invoke: Option<String>,
    /// Its arguments, as the function's parameter types read them.
    args: Vec<String>,
    /// Berth's pooling backend (default: on-demand).
    #[arg(long)]
    pooling: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut berth = berth_engine::Config::new();
    if args.pooling {
        berth.allocation_strategy(berth_engine::InstanceAllocationStrategy::Pooling(
            berth_engine::PoolingConfig::new(),
        ));
    }
    let berth = berth_engine::Engine::new(&berth)?;
    let mut config = wasmtime::Config::new();
    config.wasm_memory64(true).wasm_custom_page_sizes(true);
    berth_wasmtime::configure(&mut config, &berth)?;
    let engine = wasmtime::Engine::new(&config)?;
    let bytes =
        std::fs::read(&args.module).with_context(|| format!("cannot read {}", args.module.display()))?;
    let module = wt(Module::new(&engine, &bytes))
        .with_context(|| format!("cannot compile {}", args.module.display()))?;
    let mut store = Store::new(&engine, ());
    let instance = wt(Instance::new(&mut store, &module, &[]))
        .context("cannot instantiate (imports are not supplied)")?;
    println!(
        "instantiated {} on Berth's {} backend",
        args.module.display(),
        berth.strategy_name()
    );

    if let Some(name) = &args.invoke {
        let func = instance
            .get_func(&mut store, name)
            .with_context(|| format!("no exported function {name}"))?;
        let ty = func.ty(&store);
        let params: Vec<ValType> = ty.params().collect();
        if params.len() != args.args.len() {
            bail!(
                "{name} takes {} arguments, {} given",
                params.len(),
                args.args.len()
            );
        }
        let values = params
            .iter()
            .zip(&args.args)
            .map(|(ty, text)| parse(ty, text))
            .collect::<Result<Vec<_>>>()?;
        let mut results = vec![Val::I32(0); ty.results().len()];
        wt(func.call(&mut store, &values, &mut results)).with_context(|| format!("{name} trapped"))?;
        let shown: Vec<String> = results.iter().map(show).collect();
        println!("{name}({}) = {}", args.args.join(", "), shown.join(", "));
    }

    for export in module.exports() {
        if let Some(memory) = instance.get_memory(&mut store, export.name()) {
            println!(
                "memory {}: {} accessible at {:p}",
                export.name(),
                human_bytes(memory.data_size(&store) as u64),
                memory.data_ptr(&store)
            );
        }
    }
    let stats = berth.stats();
    println!(
        "berth: live memories {}, address space reserved {}, warm slots {}",
        stats.live_memories,
        human_bytes(stats.reserved_bytes),
        stats.warm_memory_slots
    );
    drop(store);
    let stats = berth.stats();
    println!(
        "berth after the store is dropped: live memories {}",
        stats.live_memories
    );
    Ok(())
}

/// Wasmtime's error, as an `anyhow` one.
fn wt<T>(result: wasmtime::Result<T>) -> Result<T> {
    result.map_err(|error| anyhow::anyhow!("{error:?}"))
}

fn parse(ty: &ValType, text: &str) -> Result<Val> {
    let bad = || format!("{text:?} is not a {ty}");
    Ok(match ty {
        ValType::I32 => Val::I32(text.parse().with_context(bad)?),
        ValType::I64 => Val::I64(text.parse().with_context(bad)?),
        ValType::F32 => Val::F32(text.parse::<f32>().with_context(bad)?.to_bits()),
        ValType::F64 => Val::F64(text.parse::<f64>().with_context(bad)?.to_bits()),
        other => bail!("arguments of type {other} are not supported here"),
    })
}

fn show(value: &Val) -> String {
    match value {
        Val::I32(v) => v.to_string(),
        Val::I64(v) => v.to_string(),
        Val::F32(bits) => f32::from_bits(*bits).to_string(),
        Val::F64(bits) => f64::from_bits(*bits).to_string(),
        other => format!("{other:?}"),
    }
}
