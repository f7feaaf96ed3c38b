//! Whether a module can ever be instantiated by a pool, decided from the configuration alone
//! (no pool needs to exist): what `validate_module` uses, and what `berth check` reports.

use anyhow::{Context, Result};
use berth_core::{HostPtr, InstanceBlock, LimitExceeded, Module, Tunables, VMOffsets};

use crate::config::PoolingConfig;
use crate::layout::PoolLayout;

/// Wraps a limit error with the module's name.
fn for_module<T>(module: &Module, result: Result<T, anyhow::Error>) -> Result<T> {
    result.with_context(|| {
        format!(
            "module {} can never be instantiated by this pool",
            module.name().unwrap_or("<unnamed>")
        )
    })
}

/// Checks `module` against a pool of `config` under `tunables` without building the pool.
/// The error (if any) holds a [`LimitExceeded`] naming the first limit the module breaks, its
/// value and what the module asks for.
pub fn check_module(config: &PoolingConfig, tunables: &Tunables, module: &Module) -> Result<()> {
    let layout = PoolLayout::new(config, tunables)?;
    let offsets = VMOffsets::new(HostPtr, module)?;
    check(config, &layout, module, &offsets)
}

pub(crate) fn check(
    c: &PoolingConfig,
    layout: &PoolLayout,
    module: &Module,
    offsets: &VMOffsets<HostPtr>,
) -> Result<()> {
    for (index, ty) in module.defined_memories() {
        if ty.shared {
            anyhow::bail!(
                "module {}: defined memory {} is shared, which Berth does not support yet",
                module.name().unwrap_or("<unnamed>"),
                index.as_u32()
            );
        }
    }
    let memories = module.num_defined_memories();
    if memories > c.max_memories_per_module {
        return for_module(
            module,
            Err(LimitExceeded::error(
                "max_memories_per_module",
                c.max_memories_per_module.into(),
                memories.into(),
            )),
        );
    }
    if memories > c.total_memories {
        return for_module(
            module,
            Err(LimitExceeded::error(
                "total_memories",
                c.total_memories.into(),
                memories.into(),
            )),
        );
    }
    let tables = module.num_defined_tables();
    if tables > c.max_tables_per_module {
        return for_module(
            module,
            Err(LimitExceeded::error(
                "max_tables_per_module",
                c.max_tables_per_module.into(),
                tables.into(),
            )),
        );
    }
    if tables > c.total_tables {
        return for_module(
            module,
            Err(LimitExceeded::error(
                "total_tables",
                c.total_tables.into(),
                tables.into(),
            )),
        );
    }
    for (index, ty) in module.defined_memories() {
        let minimum = ty.minimum_bytes().unwrap_or(u64::MAX);
        if minimum > layout.memory_capacity as u64 {
            return for_module(
                module,
                Err(
                    LimitExceeded::error("max_memory_size", layout.memory_capacity as u64, minimum)
                        .context(format!("memory {} starts at {minimum:#x} bytes", index.as_u32())),
                ),
            );
        }
    }
    for (index, ty) in module.defined_tables() {
        if ty.minimum > c.table_elements as u64 {
            return for_module(
                module,
                Err(
                    LimitExceeded::error("table_elements", c.table_elements as u64, ty.minimum).context(
                        format!("table {} starts at {} elements", index.as_u32(), ty.minimum),
                    ),
                ),
            );
        }
    }
    let size = InstanceBlock::layout(offsets)?.size();
    if size > c.max_core_instance_size {
        return for_module(
            module,
            Err(LimitExceeded::error(
                "max_core_instance_size",
                c.max_core_instance_size as u64,
                size as u64,
            )
            .context(format!(
                "instance block of {size} bytes: {}",
                offsets.region_breakdown()
            ))),
        );
    }
    Ok(())
}
