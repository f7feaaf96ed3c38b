//! `berth check`: whether a module fits a pool.

use std::path::PathBuf;

use anyhow::{Context, Result};
use berth_core::{HostPtr, InstanceBlock, LimitExceeded, VMOffsets};
use serde_json::json;

use crate::Outcome;
use crate::options::PoolCommand;

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

pub fn run(args: &Args) -> Result<Outcome> {
    let module = berth_wasm::parse_file(&args.file)?;
    let config = args.common.pool.config()?;
    let offsets = VMOffsets::new(HostPtr, &module)?;
    let block = InstanceBlock::layout(&offsets)?.size();
    let tunables = args.common.tunables.tunables();
    // What the engine would refuse, `check` refuses too, with the engine's words.
    berth_engine::check_tunables(&tunables).context("invalid engine configuration")?;
    let result = berth_engine::check_module(&config, &tunables, &module);
    let name = args.file.display();
    let broken = result
        .as_ref()
        .err()
        .and_then(|e| e.chain().find_map(|c| c.downcast_ref::<LimitExceeded>()));
    if let (Err(error), None) = (&result, broken) {
        // Not a limit the module breaks: a configuration or module error.
        return Err(anyhow::anyhow!("{error:#}"));
    }
    if args.common.json {
        let value = json!({
            "file": name.to_string(),
            "fits": result.is_ok(),
            "memories": module.num_defined_memories(),
            "tables": module.num_defined_tables(),
            "instance_block_bytes": block,
            "limit": broken.map(|l| json!({
                "name": l.limit, "value": l.value, "requested": l.requested, "over_by": l.requested.saturating_sub(l.value)
            })),
            "error": result.as_ref().err().map(|e| format!("{e:#}")),
        });
        say!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        match (&result, broken) {
            (Ok(()), _) => say!(
                "{name} fits: {} memories, {} tables, instance block of {block} bytes (max {})",
                module.num_defined_memories(),
                module.num_defined_tables(),
                config.max_core_instance_size
            ),
            (Err(_), Some(l)) => say!(
                "{name} does not fit: `{}` is {} but the module needs {} (over by {})",
                l.limit,
                l.value,
                l.requested,
                l.requested.saturating_sub(l.value)
            ),
            (Err(error), None) => return Err(anyhow::anyhow!("{error:#}")),
        }
    }
    Ok(if result.is_ok() {
        Outcome::Ok
    } else {
        Outcome::DoesNotFit
    })
}
