//! `berth`: instantiate a module and measure what it costs, plan a pool before building it,
//! check whether a module fits a pool.

mod check;
mod instantiate;
mod machine;
mod options;
mod plan;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Berth, the instance allocation layer for WebAssembly runtimes.
#[derive(Debug, Parser)]
#[command(name = "berth", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Instantiate a module N times and print latency, throughput, memory and allocator stats.
    Instantiate(instantiate::Args),
    /// Show a pool's layout and cost before it is built, and whether it fits this machine.
    Plan(plan::Args),
    /// Check whether a module fits a pool, and if not, which limit it breaks and by how much.
    Check(check::Args),
}

/// What a command found: `Ok` (exit 0) or a finding the user should act on (exit 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// All is well.
    Ok,
    /// The pool or module does not fit (already reported).
    DoesNotFit,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Instantiate(args) => instantiate::run(&args),
        Command::Plan(args) => plan::run(&args),
        Command::Check(args) => check::run(&args),
    };
    match result {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::DoesNotFit) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Bytes in a human unit: `512 B`, `64.0 KiB`, `6.0 GiB`.
pub use berth_core::human_bytes as human;
