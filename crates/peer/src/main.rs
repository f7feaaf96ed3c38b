//! `berth-peer`: Berth and Wasmtime 48 side by side, in one process, on the same modules,
//! interleaved so that both see the same machine. Prints medians, p99s and ratios.
//!
//! Run: `cargo run --release --manifest-path crates/peer/Cargo.toml` (see docs/performance.md).

mod adapter;
mod floor;
mod systems;
mod workloads;

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;

/// Berth against Wasmtime 48, one instance cycle at a time.
#[derive(Debug, Parser)]
struct Args {
    /// Rounds: each runs a batch of every (workload, system) pair, so all share the machine.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Cycles per batch.
    #[arg(long, default_value_t = 250)]
    batch: usize,
    /// Only workloads whose name contains one of these (comma-separated); `adapter` keeps the
    /// table of Wasmtime on Berth's memories, which any other filter leaves out.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Milliseconds of each one- and two-thread throughput run, per workload and system (0
    /// skips them).
    #[arg(long, default_value_t = 200)]
    thread_ms: u64,
    /// Alternating one- and two-thread runs per workload and system; the medians are reported.
    #[arg(long, default_value_t = 5)]
    thread_rounds: usize,
    /// Threads of the many-thread run (besides one and two), e.g. `4,8,16` on a larger machine.
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Only run the cycles of the systems whose name contains this, in rounds of a batch of each
    /// selected workload as the comparison does, and print each workload's median, p99 and
    /// mean: for a profiler.
    #[arg(long)]
    profile: Option<String>,
    /// Threads of the `--profile` run, each running every round.
    #[arg(long, default_value_t = 1)]
    profile_threads: usize,
    /// Cycles of the resident-memory soak on the dirty workload (0 skips it).
    #[arg(long, default_value_t = 0)]
    soak: usize,
}

/// One (workload, system) pair's cycles, in nanoseconds.
struct Cell {
    median: f64,
    p99: f64,
    mean: f64,
    /// What the slowest 1% of cycles add to the mean: a mean far above the median with a large
    /// tail is a few long cycles (a stall of the machine, or a rare costly cycle).
    tail: f64,
}

impl Cell {
    fn of(samples: &mut [f64]) -> Cell {
        let n = samples.len().max(1) as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let (median, p99) = summary(samples);
        let tail = samples.iter().skip(samples.len() * 99 / 100).sum::<f64>() / n;
        Cell {
            median,
            p99,
            mean,
            tail,
        }
    }
}

/// Median and p99 of nanosecond samples.
fn summary(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    (at(0.5), at(0.99))
}

fn us(ns: f64) -> String {
    format!("{:.2}", ns / 1000.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let systems = systems::all()?;
    let workloads: Vec<_> = workloads::all()
        .into_iter()
        .filter(|w| args.only.is_empty() || args.only.iter().any(|o| w.name.contains(o.as_str())))
        .collect();
    if let Some(name) = &args.profile {
        for system in systems.iter().filter(|s| s.name.contains(name.as_str())) {
            profile(&args, system, &workloads)?;
        }
        return Ok(());
    }
    let mut cycles = Vec::new();
    for workload in &workloads {
        let row: Vec<_> = systems
            .iter()
            .map(|s| Ok(s.prepare(workload)?(0)))
            .collect::<Result<_>>()?;
        cycles.push(row);
    }
    let mut samples = vec![vec![Vec::<f64>::new(); systems.len()]; workloads.len()];
    eprintln!(
        "{} rounds x {} cycles x {} systems x {} workloads",
        args.rounds,
        args.batch,
        systems.len(),
        workloads.len()
    );
    for round in 0..=args.rounds {
        for (w, row) in cycles.iter_mut().enumerate() {
            for (s, cycle) in row.iter_mut().enumerate() {
                for _ in 0..args.batch {
                    let started = Instant::now();
                    cycle()?;
                    let elapsed = started.elapsed().as_nanos() as f64;
                    // Round 0 warms everything up (pools, images, caches) and is not kept.
                    if round > 0 {
                        samples[w][s].push(elapsed);
                    }
                }
            }
        }
    }

    println!("## Workloads\n");
    for workload in &workloads {
        println!("- `{}`: {}", workload.name, workload.about);
    }
    // Medians and p99s, then means: a cost paid once in many cycles (a batch of decommits)
    // hides from the median.
    let cells: Vec<Vec<Cell>> = samples
        .iter_mut()
        .map(|row| row.iter_mut().map(|s| Cell::of(s)).collect())
        .collect();
    let median = |c: &Cell| (c.median, format!("{} ({})", us(c.median), us(c.p99)));
    let mean = |c: &Cell| (c.mean, format!("{} (+{})", us(c.mean), us(c.tail)));
    table("median (p99)", true, &systems, &workloads, &cells, median);
    table("mean", false, &systems, &workloads, &cells, mean);

    if args.only.is_empty() || args.only.iter().any(|o| o == "adapter") {
        adapter::table(args.rounds, args.batch)?;
    }

    println!("\n## The floor on this machine: median (p99), microseconds\n");
    println!("| operation | time |\n|---|---|");
    let mut medians = Vec::new();
    for mut floor in floor::measure(args.rounds * 50)? {
        let (median, p99) = summary(&mut floor.samples);
        println!("| {} | {} ({}) |", floor.name, us(median), us(p99));
        medians.push(median);
    }
    // The dirty-64k floor: the tenant's write, a memset of the dirty bytes, a free-list pop + push.
    let dirty_floor = medians[5] + medians[3] + medians[4];
    println!(
        "| dirty-64k floor: memcpy + memset 64 KiB + pop/push | {} |",
        us(dirty_floor)
    );
    if let Some(w) = workloads.iter().position(|w| w.name == "dirty-64k") {
        let (median, _) = summary(&mut samples[w][4]);
        println!(
            "\nberth pooling on dirty-64k: {} us = {:.2}x the floor",
            us(median),
            median / dirty_floor
        );
    }

    if args.thread_ms > 0 {
        threads_table(&args, &workloads)?;
    }

    if args.soak > 0 {
        let dirty = workloads::all()
            .into_iter()
            .find(|w| w.name == "dirty-64k")
            .expect("dirty exists");
        let system = systems::pooled(true)?;
        let mut cycle = system.prepare(&dirty)?(0);
        let before = rss();
        for _ in 0..args.soak {
            cycle()?;
        }
        println!(
            "\n## Resident memory: berth pooling, {} cycles of dirty-64k: VmRSS {} KiB before, {} KiB after",
            args.soak,
            before,
            rss()
        );
    }
    Ok(())
}

/// The `--profile` run of one system: every thread runs the selected workloads in rounds, a
/// batch of each in turn as the comparison does (so a pool serves them all and a workload's
/// slots may be pushed out by the others), and each cycle is timed alone.
fn profile(args: &Args, system: &systems::System, workloads: &[workloads::Workload]) -> Result<()> {
    let prepared: Vec<_> = workloads
        .iter()
        .map(|w| system.prepare(w))
        .collect::<Result<_>>()?;
    let threads = args.profile_threads.max(1);
    let started = Instant::now();
    let per_thread: Vec<Vec<Vec<f64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mut cycles: Vec<_> = prepared.iter().map(|p| p(t)).collect();
                scope.spawn(move || -> Result<Vec<Vec<f64>>> {
                    // Room for every sample up front: no allocation between cycles.
                    let mut samples: Vec<Vec<f64>> = (0..cycles.len())
                        .map(|_| Vec::with_capacity(args.rounds * args.batch))
                        .collect();
                    for round in 0..=args.rounds {
                        for (w, cycle) in cycles.iter_mut().enumerate() {
                            for _ in 0..args.batch {
                                let at = Instant::now();
                                cycle()?;
                                // Round 0 warms up, as in the comparison.
                                if round > 0 {
                                    samples[w].push(at.elapsed().as_nanos() as f64);
                                }
                            }
                        }
                    }
                    Ok(samples)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a thread panicked"))?)
            .collect::<Result<_>>()
    })?;
    let wall = started.elapsed().as_nanos() as f64;
    let total = (args.rounds + 1) * args.batch * workloads.len() * threads;
    println!(
        "{} on {} threads: {} us of wall time a cycle over {} cycles",
        system.name,
        threads,
        us(wall / total as f64),
        total
    );
    for (w, workload) in workloads.iter().enumerate() {
        let mut all: Vec<f64> = per_thread.iter().flat_map(|t| t[w].iter().copied()).collect();
        let cell = Cell::of(&mut all);
        println!(
            "  {}: median {} p99 {} mean {} us (slowest 1% add {} us; max {} us)",
            workload.name,
            us(cell.median),
            us(cell.p99),
            us(cell.mean),
            us(cell.tail),
            us(all.last().copied().unwrap_or(0.0))
        );
    }
    Ok(())
}

/// Prints one cycle table: a cell per (workload, system) and the ratios Berth / Wasmtime of the
/// value `cell` gives.
fn table(
    what: &str,
    p99: bool,
    systems: &[systems::System],
    workloads: &[workloads::Workload],
    cells: &[Vec<Cell>],
    cell: impl Fn(&Cell) -> (f64, String),
) {
    println!("\n## One instance cycle: {what}, microseconds\n");
    if !p99 {
        println!("(+t): what the slowest 1% of the pair's cycles add to its mean.\n");
    }
    print!("| workload |");
    for system in systems {
        print!(" {} |", system.name);
    }
    println!(
        " berth/wasmtime on-demand | berth/wasmtime pooling | berth/wasmtime tuned |{} floor/wasmtime tuned | fresh floor/wasmtime pooling | fresh floor/wasmtime tuned |",
        if p99 { " p99: berth/wasmtime tuned |" } else { "" }
    );
    println!("|---|{}", "---|".repeat(systems.len() + 6 + usize::from(p99)));
    for (workload, row) in workloads.iter().zip(cells) {
        let values: Vec<(f64, String)> = row.iter().map(&cell).collect();
        print!("| {} |", workload.name);
        for (_, text) in &values {
            print!(" {text} |");
        }
        let ratio = |a: usize, b: usize| values[a].0 / values[b].0;
        print!(" {:.2} | {:.2} | {:.2} |", ratio(3, 0), ratio(4, 1), ratio(4, 2));
        if p99 {
            print!(" {:.2} |", row[4].p99 / row[2].p99);
        }
        // Where these exceed a target ratio, the target lies below what the machine allows
        // (the fresh-page floor, for tenants that write where the next ones will not).
        println!(" {:.2} | {:.2} | {:.2} |", ratio(5, 2), ratio(6, 1), ratio(6, 2));
    }
}

/// The throughput table: for every workload, one and two threads (and `--threads`) of Berth's
/// pool, Wasmtime's tuned pool and the control loop, alternating.
fn threads_table(args: &Args, workloads: &[workloads::Workload]) -> Result<()> {
    let systems = [
        systems::pooled(true)?,
        systems::pooled(false)?,
        systems::control(),
        systems::growth_floor(),
        systems::fresh_floor(),
    ];
    let more: Vec<usize> = args.threads.iter().copied().filter(|&t| t > 2).collect();
    println!(
        "\n## Pooling throughput: one and two threads, {} ms a run\n",
        args.thread_ms
    );
    println!(
        "Medians of {} alternating runs (one thread, then two); a ratio is the median of the rounds' ratios. Instances per second, in thousands.\n",
        args.thread_rounds
    );
    print!("| workload |");
    for system in &systems {
        print!(" {0}: 1 thread | {0}: 2 threads | {0}: 2 / 1 |", system.name);
    }
    for t in &more {
        print!(" berth pooling: {t} threads / 1 |");
    }
    println!("\n|---|{}", "---|".repeat(3 * systems.len() + more.len()));
    let duration = Duration::from_millis(args.thread_ms);
    for workload in workloads {
        print!("| {} |", workload.name);
        let prepared: Vec<_> = systems
            .iter()
            .map(|s| s.prepare(workload))
            .collect::<Result<_>>()?;
        let mut ones = Vec::new();
        for (s, cycles) in prepared.iter().enumerate() {
            let (mut one, mut two, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..args.thread_rounds.max(1) {
                let a = throughput(cycles, 1, duration)?;
                let b = throughput(cycles, 2, duration)?;
                one.push(a);
                two.push(b);
                ratio.push(b / a);
            }
            let (one, _) = summary(&mut one);
            let (two, _) = summary(&mut two);
            let (ratio, _) = summary(&mut ratio);
            print!(" {:.0} | {:.0} | {:.2} |", one / 1000.0, two / 1000.0, ratio);
            if s == 0 {
                ones.push(one);
            }
        }
        for &t in &more {
            let many = throughput(&prepared[0], t, duration)?;
            print!(" {:.2} |", many / ones[0]);
        }
        println!();
    }
    Ok(())
}

/// Instances per second with `threads` threads running cycles for `duration`.
fn throughput(cycles: &systems::Cycles, threads: usize, duration: Duration) -> Result<f64> {
    let barrier = std::sync::Barrier::new(threads);
    let done: Result<Vec<(usize, Duration)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                scope.spawn(move || -> Result<(usize, Duration)> {
                    let mut cycle = cycles(t);
                    for _ in 0..200 {
                        cycle()?;
                    }
                    barrier.wait();
                    let started = Instant::now();
                    let mut n = 0;
                    while started.elapsed() < duration {
                        for _ in 0..16 {
                            cycle()?;
                        }
                        n += 16;
                    }
                    Ok((n, started.elapsed()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a thread panicked"))?)
            .collect()
    });
    let done = done?;
    let cycles: usize = done.iter().map(|d| d.0).sum();
    let longest = done.iter().map(|d| d.1).max().unwrap_or(duration);
    Ok(cycles as f64 / longest.as_secs_f64())
}

/// Resident set size now, in KiB.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
