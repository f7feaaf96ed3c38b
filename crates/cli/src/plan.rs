//! `berth plan`: a pool's layout and cost before it is built.

use anyhow::{Context, Result};
use serde_json::json;

use crate::options::PoolCommand;
use berth_core::exact_bytes as exact;

use crate::{Outcome, human};

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
    let config = args.common.pool.config();
    let tunables = args.common.tunables.tunables();
    // What the engine would refuse, `plan` refuses too, with the engine's words.
    berth_engine::check_tunables(&tunables).context("invalid engine configuration")?;
    // The same preflight `PoolingInstanceAllocator::new` runs: what this process can have,
    // measured now, against what the pool needs.
    let preflight = berth_engine::preflight(&config, &tunables)?;
    let (layout, machine) = (&preflight.layout, &preflight.machine);
    let total = layout.total_bytes() as u64;
    let available = machine.largest_reservation;
    let max_maps = machine.max_map_count;
    let used_maps = machine.mappings_in_use;
    let mut warnings: Vec<String> = preflight
        .findings
        .iter()
        .map(|f| {
            if f.fatal {
                format!("{} (the pool cannot be built here)", f.message)
            } else {
                f.message.clone()
            }
        })
        .collect();
    if config.total_core_instances == 0 {
        warnings.push(
            "total_core_instances is 0: the pool holds no instance, so every instantiation fails".into(),
        );
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
            "address_space": {"total": total, "largest_reservation": available, "rlimit_as": machine.address_space_limit},
            "mappings": {"max": layout.max_mappings, "in_use": used_maps, "max_map_count": max_maps},
            "max_idle_resident": layout.max_idle_resident,
            "max_idle_memory_resident": layout.max_idle_memory_resident,
            "physical_memory": machine.physical_memory,
            "overcommit": machine.overcommit.map(|o| format!("{o:?}").to_lowercase()),
            "commit_available": machine.commit_available,
            "findings": preflight.findings.iter().map(|f| json!({
                "resource": f.resource, "knob": f.knob, "needed": f.needed, "available": f.available,
                "fatal": f.fatal, "message": f.message,
            })).collect::<Vec<_>>(),
            "warnings": warnings,
        });
        say!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        say!(
            "memory slots: {} x {} ({} reservation + {} guard){}",
            layout.memory_slots,
            exact(layout.memory_stride as u64),
            exact(layout.memory_reservation as u64),
            exact(layout.memory_guard as u64),
            if layout.pre_guard > 0 {
                format!(", plus a {} pre-guard", exact(layout.pre_guard as u64))
            } else {
                String::new()
            }
        );
        say!(
            "  memories grow to at most {}",
            exact(layout.memory_capacity as u64)
        );
        say!("  memory pool: {}", human(layout.memory_pool_bytes as u64));
        say!(
            "table slots: {} x {} ({} elements); table pool: {}",
            layout.table_slots,
            exact(layout.table_stride as u64),
            config.table_elements,
            human(layout.table_pool_bytes as u64)
        );
        say!(
            "address space: {} of {} this process can reserve in one piece now ({:.2}%){}",
            human(total),
            human(available),
            total as f64 * 100.0 / available.max(1) as f64,
            machine
                .address_space_limit
                .map(|l| format!(", RLIMIT_AS {}", human(l)))
                .unwrap_or_default()
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
            exact(layout.memory_keep_resident as u64),
            exact(config.max_unused_warm_bytes as u64),
            layout.table_slots,
            exact(layout.table_keep_resident as u64)
        );
        say!(
            "  physical memory {}, overcommit {}{}",
            human(machine.physical_memory),
            machine
                .overcommit
                .map_or("unknown".to_owned(), |o| format!("{o:?}").to_lowercase()),
            match (machine.overcommit, machine.commit_available) {
                (Some(berth_core::sys::Overcommit::Strict), Some(c)) =>
                    format!(" ({} left to commit)", human(c)),
                _ => String::new(),
            }
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
