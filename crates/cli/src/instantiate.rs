//! `berth instantiate`: instantiate a module N times and measure it.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use berth_core::AllocatorStats;
use berth_engine::{Config, Engine, Instance, InstanceAllocationStrategy, LoadedModule, PoolingConfig};
use hdrhistogram::Histogram;
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

/// The most threads `--threads` may ask for: more would cost the machine its memory in thread
/// stacks long before it measured anything.
const MAX_THREADS: u32 = 1024;

/// The longest write each `--touch` copies at once, from one buffer reused: a large `--touch`
/// costs this much heap, not its own size.
const TOUCH_CHUNK: usize = 1 << 20;

/// What one thread measured: latencies in nanoseconds, in histograms of bounded size (3
/// significant digits, up to an hour), however many instances are made.
struct Samples {
    instantiate: Histogram<u64>,
    deallocate: Histogram<u64>,
}

impl Samples {
    fn new() -> Result<Samples> {
        let histogram = || Histogram::new_with_bounds(1, 3_600_000_000_000, 3).context("latency histogram");
        Ok(Samples {
            instantiate: histogram()?,
            deallocate: histogram()?,
        })
    }

    fn add(&mut self, other: &Samples) -> Result<()> {
        self.instantiate
            .add(&other.instantiate)
            .context("merging latencies")?;
        self.deallocate
            .add(&other.deallocate)
            .context("merging latencies")?;
        Ok(())
    }
}

/// `n` and the noun, singular or plural.
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Nanoseconds of `d`, for a histogram (saturating at an hour).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos())
        .unwrap_or(u64::MAX)
        .min(3_600_000_000_000)
}

fn cycles(
    module: &LoadedModule,
    count: u64,
    touch: u64,
    chunk: &[u8],
    progress: &Progress,
) -> Result<Samples> {
    let mut samples = Samples::new()?;
    for i in 0..count {
        let started = Instant::now();
        let mut instance = Instance::new(module)?;
        samples.instantiate.saturating_record(nanos(started.elapsed()));
        let mut at = 0;
        while at < touch {
            let len = usize::try_from(touch - at).unwrap_or(usize::MAX).min(chunk.len());
            instance.memory_write(0, at, &chunk[..len])?;
            at += len as u64;
        }
        let started = Instant::now();
        drop(instance);
        samples.deallocate.saturating_record(nanos(started.elapsed()));
        if i % 256 == 255 {
            progress.advance(256);
        }
    }
    Ok(samples)
}

/// p50, p99 and max of a histogram, in microseconds.
fn percentiles(histogram: &Histogram<u64>) -> (f64, f64, f64) {
    if histogram.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    (
        us(histogram.value_at_quantile(0.5)),
        us(histogram.value_at_quantile(0.99)),
        us(histogram.max()),
    )
}

fn stats_json(stats: &AllocatorStats) -> serde_json::Value {
    json!({
        "live_instances": stats.live_instances,
        "live_memories": stats.live_memories,
        "live_tables": stats.live_tables,
        "reserved_bytes": stats.reserved_bytes,
        "warm_memory_slots": stats.warm_memory_slots,
        "warm_table_slots": stats.warm_table_slots,
        "idle_memory_resident_bytes": stats.idle_memory_resident_bytes,
        "idle_table_resident_bytes": stats.idle_table_resident_bytes,
        "memory_resets": stats.memory_resets,
        "table_resets": stats.table_resets,
        "decommit_calls": stats.decommit_calls,
        "decommit_ranges": stats.decommit_ranges,
    })
}

/// Progress of a long run: a bar on a terminal; off one (a log, a pipe), a line on stderr every
/// few seconds, so a long run is never silent.
struct Progress {
    bar: ProgressBar,
    lines: bool,
    total: u64,
    done: AtomicU64,
    started: Instant,
    last: Mutex<Instant>,
}

impl Progress {
    fn new(total: u64, json: bool) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = if terminal && !json && total >= 100_000 {
            ProgressBar::new(total).with_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} instances, {per_sec}, eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            )
        } else {
            ProgressBar::hidden()
        };
        Progress {
            bar,
            lines: !terminal,
            total,
            done: AtomicU64::new(0),
            started: Instant::now(),
            last: Mutex::new(Instant::now()),
        }
    }

    fn advance(&self, n: u64) {
        self.bar.inc(n);
        if !self.lines {
            return;
        }
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Ok(mut last) = self.last.try_lock()
            && last.elapsed() >= Duration::from_secs(5)
        {
            *last = Instant::now();
            let rate = done as f64 / self.started.elapsed().as_secs_f64();
            eprintln!("{done} of {} instances, {rate:.0} a second", self.total);
        }
    }
}

impl Args {
    /// Whether output (errors included) is JSON.
    pub fn json(&self) -> bool {
        self.json
    }
}

/// Whether a pool of `config` holds what `threads` threads keep live at once (an instance
/// each, with its `memories` and `tables`): otherwise instantiations fail whenever enough
/// threads overlap, which depends on timing.
fn pool_holds_threads(config: &PoolingConfig, threads: u64, memories: usize, tables: usize) -> Result<()> {
    let live = threads;
    for (flag, slots, what, each) in [
        (
            "--total-core-instances",
            config.total_core_instances,
            "instances",
            1,
        ),
        (
            "--total-memories",
            config.total_memories,
            "memory slots",
            memories as u64,
        ),
        (
            "--total-tables",
            config.total_tables,
            "table slots",
            tables as u64,
        ),
    ] {
        let needed = live.saturating_mul(each);
        anyhow::ensure!(
            needed <= u64::from(slots),
            "--threads {threads} keeps {threads} instances live at once, which take {needed} {what}, but the pool has {slots} ({flag} {slots}): lower --threads or raise {flag}"
        );
    }
    Ok(())
}

pub fn run(args: &Args) -> Result<Outcome> {
    anyhow::ensure!(
        args.count >= 1,
        "--count must be at least 1: there is nothing to measure in 0 instances"
    );
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    anyhow::ensure!(
        args.threads <= MAX_THREADS,
        "--threads {} is more than this command runs: at most {MAX_THREADS}",
        args.threads
    );
    // No more threads than instances to make (the output says how many ran).
    let threads = u64::from(args.threads).min(args.count);
    let mut config = Config::new();
    config.set_tunables(args.tunables.tunables());
    if args.strategy == Strategy::Pooling {
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(args.pool.config()));
    } else {
        let given = args.pool.given();
        anyhow::ensure!(
            given.is_empty(),
            "{} {} the pool: add --strategy pooling, or leave {} out",
            given.join(", "),
            if given.len() == 1 {
                "configures"
            } else {
                "configure"
            },
            if given.len() == 1 { "it" } else { "them" }
        );
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
    if args.strategy == Strategy::Pooling {
        pool_holds_threads(&args.pool.config(), threads, memories.len(), tables.len())?;
    }

    // Each instance writes `--touch` bytes of its memory 0, which must hold them when made.
    if args.touch > 0 {
        let Some(&(writable, _)) = memories.first() else {
            anyhow::bail!(
                "--touch {}: the module defines no memory to write",
                human(args.touch)
            );
        };
        anyhow::ensure!(
            args.touch <= writable as u64,
            "--touch {} is more than memory 0 holds when instantiated ({})",
            berth_core::exact_bytes(args.touch),
            berth_core::exact_bytes(writable as u64)
        );
    }
    let chunk_len = usize::try_from(args.touch).unwrap_or(usize::MAX).min(TOUCH_CHUNK);
    let chunk = vec![0xA5u8; chunk_len];
    let progress = Progress::new(args.count, args.json);
    let started = Instant::now();
    let results: Vec<Result<Samples>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let share = args.count / threads + u64::from(t < args.count % threads);
                let (module, chunk, progress) = (&module, &chunk, &progress);
                std::thread::Builder::new()
                    .spawn_scoped(scope, move || cycles(module, share, args.touch, chunk, progress))
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
    progress.bar.finish_and_clear();
    let mut all = Samples::new()?;
    for result in results {
        all.add(&result?)?;
    }
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
            "touch_bytes": args.touch,
            "instance_block_bytes": block,
            "memories": memories.iter().map(|(size, cap)| json!({"bytes": size, "capacity": cap})).collect::<Vec<_>>(),
            "tables": tables,
            "instantiate_us": {"p50": i50, "p99": i99, "max": imax},
            "deallocate_us": {"p50": d50, "p99": d99, "max": dmax},
            "instances_per_second": per_second,
            "peak_rss_bytes": peak_rss,
            "reserved_bytes_with_one_instance": live_stats.reserved_bytes,
            "stats": stats_json(&stats),
        });
        say!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(Outcome::Ok);
    }
    say!(
        "{}: {}, {}, instance block (the Instance and its vmctx) {} ({} allocator)",
        args.file.display(),
        count(memories.len() as u64, "memory", "memories"),
        count(tables.len() as u64, "table", "tables"),
        human(block as u64),
        strategy
    );
    for ((i, (size, capacity)), (_, ty)) in memories
        .iter()
        .enumerate()
        .zip(module.module().defined_memories())
    {
        let page = 1u64 << ty.page_size_log2;
        let maximum = ty.maximum.map_or_else(
            || "no declared maximum".to_owned(),
            |max| {
                format!(
                    "declared maximum {} ({})",
                    count(max, "page", "pages"),
                    max.checked_mul(page)
                        .map_or_else(|| "16 EiB or more".to_owned(), human)
                )
            },
        );
        say!(
            "  memory {i}: {} accessible when instantiated ({}); {maximum}; room to grow in place {}",
            berth_core::exact_bytes(*size as u64),
            count(ty.minimum, "page", "pages"),
            berth_core::exact_bytes(*capacity as u64)
        );
    }
    for (i, size) in tables.iter().enumerate() {
        say!("  table {i}: {size} elements");
    }
    let written = if memories.is_empty() {
        String::new()
    } else {
        format!(", {} written to memory 0 by each", human(args.touch))
    };
    say!(
        "{} on {}{written}, in {:.3} s",
        count(args.count, "instance", "instances"),
        count(threads, "thread", "threads"),
        elapsed.as_secs_f64()
    );
    say!("instantiate: p50 {i50:.2} us  p99 {i99:.2} us  max {imax:.2} us");
    say!("deallocate:  p50 {d50:.2} us  p99 {d99:.2} us  max {dmax:.2} us");
    say!("throughput:  {per_second:.0} instances/s");
    say!(
        "peak RSS:    {}",
        peak_rss.map_or_else(|| "unknown".into(), human)
    );
    let (kept, why) = if strategy == "pooling" {
        (
            format!(
                "warm slots: {} and {}",
                count(stats.warm_memory_slots, "memory", "memories"),
                count(stats.warm_table_slots, "table", "tables")
            ),
            "the pool's slots, reserved when it was built",
        )
    } else {
        (
            count(
                stats.warm_memory_slots,
                "freed reservation kept for reuse",
                "freed reservations kept for reuse",
            ),
            "freed reservations kept for the next instances, their pages given back",
        )
    };
    say!(
        "address space reserved: {} with one instance live, {} now ({why})",
        human(live_stats.reserved_bytes),
        human(stats.reserved_bytes)
    );
    say!(
        "allocator: {} live, {}, {}; {kept}",
        count(stats.live_instances, "instance", "instances"),
        count(stats.live_memories, "memory", "memories"),
        count(stats.live_tables, "table", "tables"),
    );
    say!(
        "  resident in idle slots: {} of memories, {} of tables; resets: {} and {}; decommits: {} giving back {}",
        human(stats.idle_memory_resident_bytes),
        human(stats.idle_table_resident_bytes),
        count(stats.memory_resets, "memory", "memories"),
        count(stats.table_resets, "table", "tables"),
        count(stats.decommit_calls, "system call", "system calls"),
        count(stats.decommit_ranges, "range", "ranges")
    );
    Ok(Outcome::Ok)
}
