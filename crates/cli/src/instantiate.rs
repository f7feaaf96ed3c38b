//! `berth instantiate`: instantiate a module N times and measure it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use berth_core::AllocatorStats;
use berth_engine::{Config, Engine, Instance, InstanceAllocationStrategy, LoadedModule};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::options::{PoolOptions, TunableOptions, parse_size};
use crate::{Outcome, human, machine};

/// The allocation strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Strategy {
    /// A fresh reservation per memory (the default engine).
    OnDemand,
    /// Pre-reserved slots, configured by the pool options.
    Pooling,
}

/// Options of `berth instantiate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The module (.wasm or .wat)
    file: PathBuf,
    /// How instances are allocated
    #[arg(long, value_enum, default_value = "on-demand")]
    strategy: Strategy,
    /// Instances to make, in all
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// Threads instantiating at once
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Bytes each instance writes to memory 0 before it is dropped (64K, 1M, ...)
    #[arg(long, default_value = "0", value_parser = |s: &str| parse_size(s).map_err(|e| e.to_string()))]
    touch: u64,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tunables: TunableOptions,
    #[command(flatten)]
    pool: PoolOptions,
}

/// What one thread measured.
#[derive(Default)]
struct Samples {
    instantiate: Vec<Duration>,
    deallocate: Vec<Duration>,
}

fn cycles(module: &LoadedModule, count: u64, touch: &[u8], progress: &ProgressBar) -> Result<Samples> {
    let mut samples = Samples::default();
    let expected = usize::try_from(count).unwrap_or(0).min(1 << 24);
    samples.instantiate.reserve(expected);
    samples.deallocate.reserve(expected);
    let has_memory =
        module.module().num_defined_memories() > 0 && module.module().num_imported_memories() == 0;
    for i in 0..count {
        let started = Instant::now();
        let mut instance = Instance::new(module)?;
        samples.instantiate.push(started.elapsed());
        if has_memory && !touch.is_empty() {
            let len = touch.len().min(instance.memory_size(0)?);
            instance.write_memory(0, 0, &touch[..len])?;
        }
        let started = Instant::now();
        drop(instance);
        samples.deallocate.push(started.elapsed());
        if i % 256 == 255 {
            progress.inc(256);
        }
    }
    Ok(samples)
}

/// p50, p99 and max of sorted samples.
fn percentiles(sorted: &[Duration]) -> (Duration, Duration, Duration) {
    if sorted.is_empty() {
        return Default::default();
    }
    // The nearest-rank percentile: the sample at rank ceil(q * n), 1-based.
    let at = |per_mille: usize| sorted[(sorted.len() * per_mille).div_ceil(1000).max(1) - 1];
    (at(500), at(990), sorted[sorted.len() - 1])
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn stats_json(stats: &AllocatorStats) -> serde_json::Value {
    json!({
        "live_instances": stats.live_instances,
        "live_memories": stats.live_memories,
        "live_tables": stats.live_tables,
        "reserved_bytes": stats.reserved_bytes,
        "warm_slots": stats.warm_slots,
        "idle_resident_bytes": stats.idle_resident_bytes,
        "resets": stats.resets,
        "decommits": stats.decommits,
    })
}

pub fn run(args: &Args) -> Result<Outcome> {
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    let mut config = Config::new();
    config.set_tunables(args.tunables.tunables());
    if args.strategy == Strategy::Pooling {
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(args.pool.config()));
    }
    let engine = Engine::new(&config)?;
    let facts = berth_wasm::parse_file(&args.file)?;
    let module = engine.load(facts)?;

    // One instance first: what it allocates, with the allocator's view while it lives.
    let probe = Instance::new(&module).context("the first instantiation failed")?;
    let block = probe.core().layout().size();
    let live_stats = engine.stats();
    let memories: Vec<(usize, usize)> = probe
        .core()
        .memories()
        .values()
        .map(|(_, m)| (m.byte_size(), m.byte_capacity()))
        .collect();
    let tables: Vec<usize> = probe.core().tables().values().map(|(_, t)| t.size()).collect();
    drop(probe);

    // Each instance writes at most all of memory 0 (as it is when instantiated).
    let writable = memories.first().map_or(0, |(size, _)| *size);
    let touch_len = usize::try_from(args.touch).unwrap_or(usize::MAX).min(writable);
    let mut touch = Vec::new();
    touch
        .try_reserve_exact(touch_len)
        .with_context(|| format!("cannot allocate {touch_len} bytes to write"))?;
    touch.resize(touch_len, 0xA5u8);
    let progress = if args.count >= 100_000 && !args.json {
        ProgressBar::new(args.count).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} instances, {per_sec}, eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        )
    } else {
        ProgressBar::hidden()
    };
    // No more threads than instances to make.
    let threads = u64::from(args.threads).min(args.count.max(1));
    let started = Instant::now();
    let results: Vec<Result<Samples>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let share = args.count / threads + u64::from(t < args.count % threads);
                let (module, touch, progress) = (&module, &touch, &progress);
                std::thread::Builder::new()
                    .spawn_scoped(scope, move || cycles(module, share, touch, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a thread panicked"))),
                Err(error) => Err(anyhow::anyhow!("failed to start a thread: {error}")),
            })
            .collect()
    });
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    let mut all = Samples::default();
    for result in results {
        let samples = result?;
        all.instantiate.extend(samples.instantiate);
        all.deallocate.extend(samples.deallocate);
    }
    all.instantiate.sort_unstable();
    all.deallocate.sort_unstable();
    let (i50, i99, imax) = percentiles(&all.instantiate);
    let (d50, d99, dmax) = percentiles(&all.deallocate);
    let per_second = args.count as f64 / elapsed.as_secs_f64();
    let peak_rss = machine::peak_rss();
    let stats = engine.stats();
    let strategy = engine.strategy_name();

    if args.json {
        let value = json!({
            "file": args.file.display().to_string(),
            "strategy": strategy,
            "count": args.count,
            "threads": threads,
            "touch_bytes": touch.len(),
            "instance_block_bytes": block,
            "memories": memories.iter().map(|(size, cap)| json!({"bytes": size, "capacity": cap})).collect::<Vec<_>>(),
            "tables": tables,
            "instantiate_us": {"p50": micros(i50), "p99": micros(i99), "max": micros(imax)},
            "deallocate_us": {"p50": micros(d50), "p99": micros(d99), "max": micros(dmax)},
            "instances_per_second": per_second,
            "peak_rss_bytes": peak_rss,
            "reserved_bytes_with_one_instance": live_stats.reserved_bytes,
            "stats": stats_json(&stats),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(Outcome::Ok);
    }
    println!(
        "{}: {} memories, {} tables, instance block {} bytes ({} allocator)",
        args.file.display(),
        memories.len(),
        tables.len(),
        block,
        strategy
    );
    for (i, (size, capacity)) in memories.iter().enumerate() {
        println!(
            "  memory {i}: {} accessible, grows in place to {}",
            human(*size as u64),
            human(*capacity as u64)
        );
    }
    for (i, size) in tables.iter().enumerate() {
        println!("  table {i}: {size} elements");
    }
    println!(
        "{} instances on {} thread(s), {} written to memory 0 by each, in {:.3} s",
        args.count,
        threads,
        human(touch.len() as u64),
        elapsed.as_secs_f64()
    );
    println!(
        "instantiate: p50 {:.2} us  p99 {:.2} us  max {:.2} us",
        micros(i50),
        micros(i99),
        micros(imax)
    );
    println!(
        "deallocate:  p50 {:.2} us  p99 {:.2} us  max {:.2} us",
        micros(d50),
        micros(d99),
        micros(dmax)
    );
    println!("throughput:  {per_second:.0} instances/s");
    println!(
        "peak RSS:    {}",
        peak_rss.map_or_else(|| "unknown".into(), human)
    );
    println!(
        "address space reserved: {} with one instance live, {} now",
        human(live_stats.reserved_bytes),
        human(stats.reserved_bytes)
    );
    println!(
        "allocator: {} live instances, {} memories, {} tables; {} warm slots; {} resident in idle slots; {} resets; {} decommits",
        stats.live_instances,
        stats.live_memories,
        stats.live_tables,
        stats.warm_slots,
        human(stats.idle_resident_bytes),
        stats.resets,
        stats.decommits
    );
    Ok(Outcome::Ok)
}
