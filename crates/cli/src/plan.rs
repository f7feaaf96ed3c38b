//! `berth plan`: a pool's layout and cost before it is built.

use anyhow::{Context, Result};
use berth_engine::PoolLayout;
use serde_json::json;

use crate::options::PoolCommand;
use crate::{Outcome, human, machine};

/// Options of `berth plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
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
    let config = args.common.pool.config()?;
    let tunables = args.common.tunables.tunables();
    // What the engine would refuse, `plan` refuses too, with the engine's words.
    berth_engine::check_tunables(&tunables).context("invalid engine configuration")?;
    let layout = PoolLayout::new(&config, &tunables)?;
    let available = machine::available_address_space();
    let max_maps = machine::max_map_count();
    let used_maps = machine::current_mappings().unwrap_or(0);
    let total = layout.total_bytes() as u64;
    let mut warnings = Vec::new();
    if total > available {
        warnings.push(format!(
            "the pools need {} of address space but this process may use {}: lower total_memories or max_memory_size",
            human(total),
            human(available)
        ));
    }
    if let Some(max) = max_maps
        && layout.max_mappings as u64 + used_maps > max
    {
        warnings.push(format!(
            "the pools may need {} memory mappings, plus {used_maps} in use, over vm.max_map_count of {max}: raise it (sysctl vm.max_map_count) or lower total_memories",
            layout.max_mappings
        ));
    }
    if args.common.json {
        let value = json!({
            "memory_slot": {
                "reservation": layout.memory_reservation,
                "guard": layout.memory_guard,
                "stride": layout.memory_stride,
                "max_memory_size": layout.memory_capacity,
                "slots": layout.memory_slots,
                "pool_bytes": layout.memory_pool_bytes,
                "pre_guard": layout.pre_guard,
            },
            "table_slot": {"stride": layout.table_stride, "slots": layout.table_slots, "pool_bytes": layout.table_pool_bytes},
            "address_space": {"total": total, "available": available},
            "mappings": {"max": layout.max_mappings, "in_use": used_maps, "max_map_count": max_maps},
            "max_idle_resident": layout.max_idle_resident,
            "max_idle_memory_resident": layout.max_idle_memory_resident,
            "warnings": warnings,
        });
        say!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        say!(
            "memory slots: {} x {} ({} reservation + {} guard){}",
            layout.memory_slots,
            human(layout.memory_stride as u64),
            human(layout.memory_reservation as u64),
            human(layout.memory_guard as u64),
            if layout.pre_guard > 0 {
                format!(", plus a {} pre-guard", human(layout.pre_guard as u64))
            } else {
                String::new()
            }
        );
        say!(
            "  memories grow to at most {}",
            human(layout.memory_capacity as u64)
        );
        say!("  memory pool: {}", human(layout.memory_pool_bytes as u64));
        say!(
            "table slots: {} x {} ({} elements); table pool: {}",
            layout.table_slots,
            human(layout.table_stride as u64),
            config.table_elements,
            human(layout.table_pool_bytes as u64)
        );
        say!(
            "address space: {} of {} available ({:.2}%)",
            human(total),
            human(available),
            total as f64 * 100.0 / available as f64
        );
        match max_maps {
            Some(max) => say!(
                "memory mappings: up to {} for the pools, {used_maps} in use now, vm.max_map_count {max}",
                layout.max_mappings
            ),
            None => say!(
                "memory mappings: up to {} for the pools (vm.max_map_count unknown)",
                layout.max_mappings
            ),
        }
        say!(
            "resident when idle: up to {} ({} in warm memory slots: {} slots x {} kept, at most {} + {} table slots x {} kept)",
            human(layout.max_idle_resident as u64),
            human(layout.max_idle_memory_resident as u64),
            config.max_unused_warm_slots.min(config.total_memories),
            human(layout.memory_keep_resident as u64),
            human(config.max_unused_warm_bytes as u64),
            layout.table_slots,
            human(layout.table_keep_resident as u64)
        );
        for warning in &warnings {
            say!("warning: {warning}");
        }
    }
    Ok(if warnings.is_empty() {
        Outcome::Ok
    } else {
        Outcome::DoesNotFit
    })
}
