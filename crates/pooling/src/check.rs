//! Whether a module can ever be instantiated by a pool, decided from the configuration alone
//! (no pool needs to exist): what `validate_module` uses, and what `berth check` reports.

use anyhow::{Context, Result};
use berth_core::{HostPtr, InstanceBlock, LimitExceeded, Module, Tunables, VMOffsets, human_bytes};

use crate::config::PoolingConfig;
use crate::layout::PoolLayout;

/// Checks `module` against a pool of `config` under `tunables` without building the pool.
/// The error (if any) is the first of [`pool_misfits`]: a [`LimitExceeded`] naming a limit the
/// module breaks, its value and what the module asks for, or what Berth cannot do.
pub fn check_module(config: &PoolingConfig, tunables: &Tunables, module: &Module) -> Result<()> {
    let layout = PoolLayout::new(config, tunables)?;
    let offsets = VMOffsets::new(HostPtr, module)?;
    check(config, &layout, module, &offsets)
}

/// Every reason a pool of `config` under `tunables` can never instantiate `module`, all at once:
/// each limit it breaks (an error holding a [`LimitExceeded`], with the memory or table in its
/// context) and each feature Berth does not support (shared memories). Empty when it fits. An
/// invalid configuration is the `Err`.
pub fn pool_misfits(
    config: &PoolingConfig,
    tunables: &Tunables,
    module: &Module,
) -> Result<Vec<anyhow::Error>> {
    let layout = PoolLayout::new(config, tunables)?;
    let offsets = VMOffsets::new(HostPtr, module)?;
    misfits(config, &layout, module, &offsets)
}

pub(crate) fn check(
    c: &PoolingConfig,
    layout: &PoolLayout,
    module: &Module,
    offsets: &VMOffsets<HostPtr>,
) -> Result<()> {
    match misfits(c, layout, module, offsets)?.into_iter().next() {
        None => Ok(()),
        Some(misfit) => Err(misfit.context(format!(
            "module {} can never be instantiated by this pool",
            module.name().unwrap_or("<unnamed>")
        ))),
    }
}

fn misfits(
    c: &PoolingConfig,
    layout: &PoolLayout,
    module: &Module,
    offsets: &VMOffsets<HostPtr>,
) -> Result<Vec<anyhow::Error>> {
    let name = module.name().unwrap_or("<unnamed>");
    let mut found = Vec::new();
    for (index, ty) in module.defined_memories() {
        if ty.shared {
            found.push(anyhow::anyhow!(
                "module {name}: defined memory {} is shared, which Berth does not support yet",
                index.as_u32()
            ));
        }
    }
    let memories = u64::from(module.num_defined_memories());
    let tables = u64::from(module.num_defined_tables());
    for (limit, value, requested) in [
        (
            "max_memories_per_module",
            c.max_memories_per_module.into(),
            memories,
        ),
        ("total_memories", c.total_memories.into(), memories),
        ("max_tables_per_module", c.max_tables_per_module.into(), tables),
        ("total_tables", c.total_tables.into(), tables),
    ] {
        if requested > value {
            found.push(LimitExceeded::error(limit, value, requested));
        }
    }
    for (index, ty) in module.defined_memories() {
        let minimum = ty.minimum_bytes().unwrap_or(u64::MAX);
        if minimum > layout.memory_capacity as u64 {
            found.push(
                LimitExceeded::error("max_memory_size", layout.memory_capacity as u64, minimum).context(
                    format!("memory {} starts at {}", index.as_u32(), human_bytes(minimum)),
                ),
            );
        }
    }
    for (index, ty) in module.defined_tables() {
        if ty.minimum > c.table_elements as u64 {
            found.push(
                LimitExceeded::error("table_elements", c.table_elements as u64, ty.minimum).context(format!(
                    "table {} starts at {} elements",
                    index.as_u32(),
                    ty.minimum
                )),
            );
        }
    }
    let size = InstanceBlock::layout(offsets)
        .with_context(|| format!("module {name}: instance block"))?
        .size();
    if size > c.max_core_instance_size {
        found.push(
            LimitExceeded::error(
                "max_core_instance_size",
                c.max_core_instance_size as u64,
                size as u64,
            )
            .context(format!(
                "instance block of {size} bytes: {}",
                offsets.region_breakdown()
            )),
        );
    }
    Ok(found)
}
