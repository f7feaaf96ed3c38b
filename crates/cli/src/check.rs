//! `berth check`: whether a module can be instantiated by a pool of the given options, and if
//! not, every reason at once with the flag that would change it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use berth_core::{HostPtr, InstanceBlock, LimitExceeded, MAX_RESERVATION, Module, VMOffsets, exact_bytes};
use serde_json::json;

use crate::options::PoolCommand;
use crate::{Outcome, human};

/// Options of `berth check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The module (.wasm or .wat)
    file: PathBuf,
    #[command(flatten)]
    common: PoolCommand,
}

impl Args {
    /// Whether output (errors included) is JSON.
    pub fn json(&self) -> bool {
        self.common.json
    }
}

/// One reason the module cannot be instantiated with these options.
struct Finding {
    /// `limit` (a pool limit), `unsupported` (a feature Berth lacks), `segment` (a segment no
    /// instantiation can apply) or `imports` (what `berth instantiate` cannot link).
    kind: &'static str,
    message: String,
    limit: Option<LimitExceeded>,
    /// The flag and value that would lift a limit.
    flag: Option<String>,
}

/// `bytes` as a size flag's value: the largest suffix that states it exactly.
fn size_value(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn limit_finding(error: anyhow::Error) -> Finding {
    let Some(limit) = error
        .chain()
        .find_map(|c| c.downcast_ref::<LimitExceeded>())
        .cloned()
    else {
        return Finding {
            kind: "unsupported",
            message: format!("{error:#}"),
            limit: None,
            flag: None,
        };
    };
    let bytes = limit.in_bytes();
    let show = |v: u64| if bytes { exact_bytes(v) } else { v.to_string() };
    let what = error
        .chain()
        .next()
        .filter(|c| c.downcast_ref::<LimitExceeded>().is_none())
        .map(|c| format!("{c}: "))
        .unwrap_or_default();
    // The smallest value that lifts the limit and that the flag accepts: a memory size is a
    // whole number of host pages, at most the largest reservation Berth accepts, and a table
    // slot's words fit in that much too (past it no value does, and no flag is suggested).
    let flag = if limit.limit == "max_memory_size" {
        let page = berth_core::sys::page_size() as u64;
        limit
            .requested
            .checked_next_multiple_of(page)
            .filter(|&size| size <= MAX_RESERVATION)
            .map(size_value)
    } else if limit.limit == "table_elements" {
        let word = size_of::<usize>() as u64;
        let fits = limit
            .requested
            .checked_mul(word)
            .is_some_and(|b| b <= MAX_RESERVATION);
        fits.then(|| limit.requested.to_string())
    } else if bytes {
        Some(size_value(limit.requested))
    } else {
        Some(limit.requested.to_string())
    }
    .map(|value| format!("--{} {value}", limit.limit.replace('_', "-")));
    Finding {
        kind: "limit",
        message: format!(
            "{what}`{}` is {} but the module needs {} (over by {})",
            limit.limit,
            show(limit.value),
            show(limit.requested),
            show(limit.requested.saturating_sub(limit.value)),
        ),
        limit: Some(limit),
        flag,
    }
}

/// What `berth instantiate` cannot link: it supplies no imports.
fn imports_finding(module: &Module) -> Option<Finding> {
    let kinds: Vec<String> = [
        (module.num_imported_funcs(), "function"),
        (module.num_imported_tables(), "table"),
        (module.num_imported_memories(), "memory"),
        (module.num_imported_globals(), "global"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, kind)| match (n, kind) {
        (1, _) => format!("1 {kind}"),
        (_, "memory") => format!("{n} memories"),
        _ => format!("{n} {kind}s"),
    })
    .collect();
    (!kinds.is_empty()).then(|| Finding {
        kind: "imports",
        message: format!(
            "it imports {}, which `berth instantiate` cannot supply (an embedder links imports)",
            kinds.join(", ")
        ),
        limit: None,
        flag: None,
    })
}

pub fn run(args: &Args) -> Result<Outcome> {
    let module = berth_wasm::parse_file(&args.file)?;
    let config = args.common.pool.config();
    let offsets = VMOffsets::new(HostPtr, &module)?;
    let block = InstanceBlock::layout(&offsets)?.size();
    let tunables = args.common.tunables.tunables();
    // What the engine would refuse, `check` refuses too, with the engine's words.
    berth_engine::check_tunables(&tunables).context("invalid engine configuration")?;
    let mut findings: Vec<Finding> = berth_engine::pool_misfits(&config, &tunables, &module)?
        .into_iter()
        .map(limit_finding)
        .collect();
    // A pool may load a module and still hold none of its instances: every instantiation takes
    // one of `total_core_instances` (a backend composed around the pool counts its own).
    if config.total_core_instances == 0 {
        findings.push(limit_finding(LimitExceeded::error("total_core_instances", 0, 1)));
    }
    findings.extend(
        module
            .segments_never_in_bounds()
            .into_iter()
            .map(|error| Finding {
                kind: "segment",
                message: format!("{error:#}, so instantiation always fails"),
                limit: None,
                flag: None,
            }),
    );
    findings.extend(imports_finding(&module));
    let name = args.file.display();
    if args.common.json {
        let first_limit = findings.iter().find_map(|f| f.limit.as_ref());
        let value = json!({
            "file": name.to_string(),
            "fits": findings.is_empty(),
            "memories": module.num_defined_memories(),
            "tables": module.num_defined_tables(),
            "instance_block_bytes": block,
            "limit": first_limit.map(|l| json!({
                "name": l.limit, "value": l.value, "requested": l.requested, "over_by": l.requested.saturating_sub(l.value)
            })),
            "findings": findings.iter().map(|f| json!({
                "kind": f.kind,
                "message": f.message,
                "flag": f.flag,
                "limit": f.limit.as_ref().map(|l| json!({
                    "name": l.limit, "value": l.value, "requested": l.requested, "over_by": l.requested.saturating_sub(l.value)
                })),
            })).collect::<Vec<_>>(),
        });
        say!("{}", serde_json::to_string_pretty(&value)?);
    } else if findings.is_empty() {
        let count = |n: u32, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        say!(
            "{name} fits: {}, {}, instance block of {} (max {})",
            count(module.num_defined_memories(), "memory", "memories"),
            count(module.num_defined_tables(), "table", "tables"),
            human(block as u64),
            human(config.max_core_instance_size as u64)
        );
    } else {
        say!("{name} does not fit:");
        for finding in &findings {
            match &finding.flag {
                Some(flag) => say!("  - {}; pass `{flag}`", finding.message),
                None => say!("  - {}", finding.message),
            }
        }
    }
    Ok(if findings.is_empty() {
        Outcome::Ok
    } else {
        Outcome::DoesNotFit
    })
}
