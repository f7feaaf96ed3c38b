//! `berth`: instantiate a module and measure what it costs, plan a pool before building it,
//! check whether a module fits a pool.
#![forbid(unsafe_code)]

/// Writes a line to standard output, returning an error the command passes up: a closed pipe
/// (`berth ... | head -2`) then ends the command quietly, as any Unix tool does (see `main`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

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
    let json = match &cli.command {
        Command::Instantiate(args) => args.json(),
        Command::Plan(args) => args.json(),
        Command::Check(args) => args.json(),
    };
    let result = match cli.command {
        Command::Instantiate(args) => instantiate::run(&args),
        Command::Plan(args) => plan::run(&args),
        Command::Check(args) => check::run(&args),
    };
    match result {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::DoesNotFit) => ExitCode::from(1),
        // The reader went away (a closed pipe): nothing is left to say to anyone.
        Err(error) if closed_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            if json {
                // With --json, the error too is JSON, on standard output where the result would be.
                println!("{}", serde_json::json!({ "error": format!("{error:#}") }));
            } else {
                eprintln!("error: {error:#}");
            }
            ExitCode::from(2)
        }
    }
}

/// Whether `error` is standard output's reader having gone away.
fn closed_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Bytes in a human unit: `512 B`, `64.0 KiB`, `6.0 GiB`.
pub use berth_core::human_bytes as human;
