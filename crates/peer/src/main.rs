//! `berth-peer`: Berth and Wasmtime 48 side by side, in one process, on the same modules,
//! interleaved so that both see the same machine. Prints medians, p99s and ratios.
//!
//! Run: `cargo run --release --manifest-path crates/peer/Cargo.toml` (see docs/performance.md).

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
    /// Only workloads whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Cycles per thread for the one- and two-thread throughput runs (0 skips them).
    #[arg(long, default_value_t = 100_000)]
    thread_cycles: usize,
    /// Alternating one- and two-thread runs per system; the medians are reported.
    #[arg(long, default_value_t = 7)]
    thread_rounds: usize,
    /// Cycles of the resident-memory soak on the dirty workload (0 skips it).
    #[arg(long, default_value_t = 0)]
    soak: usize,
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
        .filter(|w| args.only.as_deref().is_none_or(|o| w.name.contains(o)))
        .collect();
    let mut cycles = Vec::new();
    for workload in &workloads {
        let row: Vec<_> = systems
            .iter()
            .map(|s| s.prepare(workload))
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
    let cells: Vec<Vec<(f64, f64, f64)>> = samples
        .iter_mut()
        .map(|row| {
            row.iter_mut()
                .map(|s| {
                    let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
                    let (median, p99) = summary(s);
                    (median, p99, mean)
                })
                .collect()
        })
        .collect();
    let median = |c: &(f64, f64, f64)| (c.0, format!("{} ({})", us(c.0), us(c.1)));
    let mean = |c: &(f64, f64, f64)| (c.2, us(c.2));
    table("median (p99)", &systems, &workloads, &cells, median);
    table("mean", &systems, &workloads, &cells, mean);

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

    if args.thread_cycles > 0 {
        println!(
            "\n## Pooling throughput, {} cycles per thread of `untouched`\n",
            args.thread_cycles
        );
        println!(
            "Medians of {} alternating runs (one thread, then two); the ratio is the median of the rounds' ratios.\n",
            args.thread_rounds
        );
        println!(
            "| system | 1 thread (instances/s) | 2 threads (instances/s) | 2 threads / 1 thread | ratios, lowest to highest |\n|---|---|---|---|---|"
        );
        let untouched = workloads::all()
            .into_iter()
            .find(|w| w.name == "untouched")
            .expect("untouched exists");
        let systems = [
            systems::pooled(false)?,
            systems::pooled(true)?,
            systems::control(),
        ];
        let mut runs = vec![(Vec::new(), Vec::new(), Vec::new()); systems.len()];
        for _ in 0..args.thread_rounds.max(1) {
            for (system, (ones, twos, ratios)) in systems.iter().zip(&mut runs) {
                let one = throughput(system, &untouched, 1, args.thread_cycles)?;
                let two = throughput(system, &untouched, 2, args.thread_cycles)?;
                ones.push(one);
                twos.push(two);
                ratios.push(two / one);
            }
        }
        for (system, (ones, twos, ratios)) in systems.iter().zip(&mut runs) {
            let (one, _) = summary(ones);
            let (two, _) = summary(twos);
            let (ratio, _) = summary(ratios);
            let all: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "| {} | {:.0} | {:.0} | {:.2} | {} |",
                system.name,
                one,
                two,
                ratio,
                all.join(", ")
            );
        }
    }

    if args.soak > 0 {
        let dirty = workloads::all()
            .into_iter()
            .find(|w| w.name == "dirty-64k")
            .expect("dirty exists");
        let system = systems::pooled(true)?;
        let mut cycle = system.prepare(&dirty)?;
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

/// Prints one cycle table: a cell per (workload, system) and the ratios Berth / Wasmtime of the
/// value `cell` gives.
fn table(
    what: &str,
    systems: &[systems::System],
    workloads: &[workloads::Workload],
    cells: &[Vec<(f64, f64, f64)>],
    cell: impl Fn(&(f64, f64, f64)) -> (f64, String),
) {
    println!("\n## One instance cycle: {what}, microseconds\n");
    print!("| workload |");
    for system in systems {
        print!(" {} |", system.name);
    }
    println!(" berth/wasmtime on-demand | berth/wasmtime pooling | berth/wasmtime tuned |");
    println!("|---|{}", "---|".repeat(systems.len() + 3));
    for (workload, row) in workloads.iter().zip(cells) {
        let values: Vec<(f64, String)> = row.iter().map(&cell).collect();
        print!("| {} |", workload.name);
        for (_, text) in &values {
            print!(" {text} |");
        }
        let ratio = |a: usize, b: usize| values[a].0 / values[b].0;
        println!(" {:.2} | {:.2} | {:.2} |", ratio(3, 0), ratio(4, 1), ratio(4, 2));
    }
}

/// Instances per second with `threads` threads running `cycles` cycles each.
fn throughput(
    system: &systems::System,
    workload: &workloads::Workload,
    threads: usize,
    cycles: usize,
) -> Result<f64> {
    let barrier = std::sync::Barrier::new(threads);
    let elapsed: Result<Duration> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = &barrier;
                scope.spawn(move || -> Result<Duration> {
                    let mut cycle = system.prepare(workload)?;
                    for _ in 0..1000 {
                        cycle()?;
                    }
                    barrier.wait();
                    let started = Instant::now();
                    for _ in 0..cycles {
                        cycle()?;
                    }
                    Ok(started.elapsed())
                })
            })
            .collect();
        let mut longest = Duration::ZERO;
        for handle in handles {
            longest = longest.max(
                handle
                    .join()
                    .map_err(|_| anyhow::anyhow!("a thread panicked"))??,
            );
        }
        Ok(longest)
    });
    Ok((threads * cycles) as f64 / elapsed?.as_secs_f64())
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
