//! The pool's layout and cost, computed from a configuration before anything is reserved.
//!
//! ```text
//!  memory pool: one PROT_NONE reservation
//!  ┌──────────┬───────────────────────────────┬───────────────────────────────┬─────┐
//!  │pre-guard │ slot 0                        │ slot 1                        │ ... │
//!  │(optional)│ [accessible][rest   ][guard ] │ [accessible][rest   ][guard ] │     │
//!  └──────────┴───────────────────────────────┴───────────────────────────────┴─────┘
//!              <--- reservation ---><-guard->
//!  reservation = max(max_memory_size, memory_reservation), page-aligned
//!  stride      = reservation + memory_guard_size
//!  One slot's trailing guard is the next slot's pre-guard; the pool's own pre-guard (if the
//!  tunables ask for one) protects slot 0.
//!
//!  table pool: one reservation, read-write
//!  ┌──────────────────┬──────────────────┬─────┐
//!  │ slot 0           │ slot 1           │ ... │   slot = table_elements words, page-aligned
//!  └──────────────────┴──────────────────┴─────┘
//! ```

use anyhow::{Result, anyhow, bail};
use berth_core::{MAX_RESERVATION, Tunables, exact_bytes, sys};

use crate::config::PoolingConfig;

/// Sizes and costs of a pool. All sizes in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLayout {
    /// Host page size the layout was computed for.
    pub page_size: usize,
    /// Guard before slot 0.
    pub pre_guard: usize,
    /// Reservation of one memory slot (accessible bytes and room to grow).
    pub memory_reservation: usize,
    /// Guard after each memory slot.
    pub memory_guard: usize,
    /// Distance between two memory slots.
    pub memory_stride: usize,
    /// Bytes a pooled memory may grow to (`max_memory_size`, a whole number of host pages).
    pub memory_capacity: usize,
    /// Memory slots.
    pub memory_slots: u32,
    /// The memory pool's whole reservation.
    pub memory_pool_bytes: usize,
    /// Bytes of one table slot.
    pub table_stride: usize,
    /// Table slots.
    pub table_slots: u32,
    /// The table pool's whole reservation.
    pub table_pool_bytes: usize,
    /// Bytes each memory slot keeps resident at most (`linear_memory_keep_resident`, rounded up
    /// to whole host pages, at most `memory_capacity`).
    pub memory_keep_resident: usize,
    /// Bytes each table slot keeps resident at most (`table_keep_resident`, rounded up to whole
    /// host pages, at most `table_stride`).
    pub table_keep_resident: usize,
    /// Resident bytes idle memory slots may keep at most: warm slots times their kept bytes, or
    /// `max_unused_warm_bytes` if that is less.
    pub max_idle_memory_resident: usize,
    /// Resident bytes idle slots may keep at most: [`max_idle_memory_resident`](Self::max_idle_memory_resident)
    /// plus every table slot's kept bytes.
    pub max_idle_resident: usize,
    /// Memory mappings (VMAs) the pools may need at most: each memory slot can be split in
    /// two (accessible and not), or in four with a copy-on-write image at a non-zero offset,
    /// plus the two pools themselves.
    pub max_mappings: usize,
}

impl PoolLayout {
    /// The layout of `config` under `tunables`; an error names the knob that makes it
    /// impossible.
    pub fn new(config: &PoolingConfig, tunables: &Tunables) -> Result<PoolLayout> {
        let page = sys::page_size();
        if config.decommit_batch_size == 0 {
            bail!("decommit_batch_size must be at least 1");
        }
        let to_usize = |name: &str, v: u64| {
            usize::try_from(v).map_err(|_| anyhow!("{name} of {} does not fit the host", exact_bytes(v)))
        };
        if config.max_memory_size as u64 > MAX_RESERVATION {
            bail!(
                "max_memory_size of {} is over the largest accepted ({})",
                exact_bytes(config.max_memory_size as u64),
                exact_bytes(MAX_RESERVATION)
            );
        }
        if !config.max_memory_size.is_multiple_of(page) {
            let down = config.max_memory_size / page * page;
            bail!(
                "max_memory_size of {} is not a whole number of {} host pages: use {} or {}",
                exact_bytes(config.max_memory_size as u64),
                exact_bytes(page as u64),
                exact_bytes(down as u64),
                exact_bytes((down + page) as u64)
            );
        }
        let memory_capacity = config.max_memory_size;
        let memory_reservation =
            memory_capacity.max(to_usize("memory_reservation", tunables.memory_reservation)?);
        let memory_guard = to_usize("memory_guard_size", tunables.memory_guard_size)?;
        let pre_guard = to_usize("memory_guard_size", tunables.pre_guard_size())?;
        let memory_stride = memory_reservation.checked_add(memory_guard).ok_or_else(|| {
            anyhow!(
                "memory slot of {} plus guard overflows",
                exact_bytes(memory_reservation as u64)
            )
        })?;
        if memory_stride == 0 && config.total_memories > 0 {
            bail!("memory slots of 0 bytes: set max_memory_size, memory_reservation or memory_guard_size");
        }
        let memory_pool_bytes = memory_stride
            .checked_mul(config.total_memories as usize)
            .and_then(|n| n.checked_add(if config.total_memories > 0 { pre_guard } else { 0 }))
            .ok_or_else(|| {
                anyhow!(
                    "total_memories of {} slots of {} overflows the address space",
                    config.total_memories,
                    exact_bytes(memory_stride as u64)
                )
            })?;
        let table_stride = config
            .table_elements
            .checked_mul(size_of::<usize>())
            .and_then(|n| n.checked_next_multiple_of(page))
            .ok_or_else(|| {
                anyhow!(
                    "table_elements of {} words of {} bytes overflows the address space",
                    config.table_elements,
                    size_of::<usize>()
                )
            })?;
        let table_pool_bytes = table_stride
            .checked_mul(config.total_tables as usize)
            .ok_or_else(|| {
                anyhow!(
                    "total_tables of {} slots of {} overflows",
                    config.total_tables,
                    exact_bytes(table_stride as u64)
                )
            })?;
        // A slot keeps whole pages: a bound that is not a multiple of them keeps the pages that
        // cover it (as Wasmtime rounds it), up to the whole slot (which is whole pages).
        let whole_pages = |bound: usize, slot: usize| bound.min(slot).next_multiple_of(page);
        let memory_keep_resident = whole_pages(config.linear_memory_keep_resident, memory_capacity);
        let table_keep_resident = whole_pages(config.table_keep_resident, table_stride);
        let warm = (config.max_unused_warm_slots as usize).min(config.total_memories as usize);
        let max_idle_memory_resident = warm
            .saturating_mul(memory_keep_resident)
            .min(config.max_unused_warm_bytes);
        let max_idle_resident = max_idle_memory_resident
            .saturating_add((config.total_tables as usize).saturating_mul(table_keep_resident));
        Ok(PoolLayout {
            page_size: page,
            pre_guard,
            memory_reservation,
            memory_guard,
            memory_stride,
            memory_capacity,
            memory_slots: config.total_memories,
            memory_pool_bytes,
            table_stride,
            table_slots: config.total_tables,
            table_pool_bytes,
            memory_keep_resident,
            table_keep_resident,
            max_idle_memory_resident,
            max_idle_resident,
            max_mappings: if tunables.memory_init_cow { 4 } else { 2 } * config.total_memories as usize + 2,
        })
    }

    /// Address space both pools reserve.
    pub fn total_bytes(&self) -> usize {
        self.memory_pool_bytes.saturating_add(self.table_pool_bytes)
    }
}
