//! Preflight: what this process can really have, measured before a pool is built, against what
//! a pool of a configuration needs. [`PoolingInstanceAllocator::new`](crate::PoolingInstanceAllocator::new)
//! refuses a pool with a [`MachineLimit`] that is fatal; `berth plan` prints every finding.

use std::fmt;

use anyhow::Result;
use berth_core::sys::{self, Overcommit};
use berth_core::{Tunables, human_bytes};

use crate::config::PoolingConfig;
use crate::layout::PoolLayout;
use crate::{memory_pool, table_pool};

/// What this process may have now, measured or read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The largest single reservation of address space this process can make now, probed (so
    /// it reflects the hardware's and kernel's user space, `RLIMIT_AS` and what is mapped).
    pub largest_reservation: u64,
    /// `RLIMIT_AS`, if set.
    pub address_space_limit: Option<u64>,
    /// `vm.max_map_count`, if readable.
    pub max_map_count: Option<u64>,
    /// Memory mappings this process has now.
    pub mappings_in_use: u64,
    /// `vm.overcommit_memory`, if readable.
    pub overcommit: Option<Overcommit>,
    /// Bytes that may still be committed (binding only under [`Overcommit::Strict`]).
    pub commit_available: Option<u64>,
    /// Physical memory.
    pub physical_memory: u64,
}

impl Machine {
    /// Measures this process now (a few dozen reservations made and given back, a few files of
    /// `/proc` read).
    pub fn measure() -> Machine {
        Machine {
            largest_reservation: sys::largest_reservation() as u64,
            address_space_limit: sys::address_space_limit(),
            max_map_count: sys::max_map_count(),
            mappings_in_use: sys::mappings_in_use().unwrap_or(0),
            overcommit: sys::overcommit(),
            commit_available: sys::commit_available(),
            physical_memory: sys::physical_memory(),
        }
    }
}

/// One way a pool does not fit this machine: the knob to change, what the pool needs and what
/// the machine has, in the resource's unit (bytes or mappings). A fatal one makes
/// [`PoolingInstanceAllocator::new`](crate::PoolingInstanceAllocator::new) fail with it, so a
/// caller can test for it with `err.downcast_ref::<MachineLimit>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineLimit {
    /// What runs out: `address space`, `memory mappings`, `physical memory`, `commit`.
    pub resource: &'static str,
    /// The configuration knob that sets the need.
    pub knob: &'static str,
    /// What the pool needs (or may need).
    pub needed: u64,
    /// What the machine has.
    pub available: u64,
    /// Whether the pool cannot be built at all (otherwise it can, and may fail or cost more than
    /// the machine has later).
    pub fatal: bool,
    /// The finding in words, with figures in human units and what to do.
    pub message: String,
}

impl fmt::Display for MachineLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for MachineLimit {}

/// A configuration checked against this machine.
#[derive(Debug, Clone)]
pub struct Preflight {
    /// What was measured.
    pub machine: Machine,
    /// The pool's layout.
    pub layout: PoolLayout,
    /// Every way the pool does not fit, fatal ones first.
    pub findings: Vec<MachineLimit>,
}

impl Preflight {
    /// The first fatal finding, if any.
    pub fn fatal(&self) -> Option<&MachineLimit> {
        self.findings.iter().find(|f| f.fatal)
    }
}

/// Checks a pool of `config` under `tunables` against this machine, measured now. The `Err` is
/// an invalid configuration; what does not fit is in [`Preflight::findings`].
pub fn preflight(config: &PoolingConfig, tunables: &Tunables) -> Result<Preflight> {
    let layout = PoolLayout::new(config, tunables)?;
    let machine = Machine::measure();
    let findings = judge(config, &layout, &machine);
    Ok(Preflight {
        machine,
        layout,
        findings,
    })
}

/// The first reason a pool of `layout` cannot be built here, if any: what building needs is
/// tried first (one reservation of each pool, made and given back, the bookkeeping against
/// physical memory, the overcommit policy); only when that fails is the machine measured, to
/// say by how much.
pub(crate) fn fatal(config: &PoolingConfig, layout: &PoolLayout) -> Option<MachineLimit> {
    let physical = sys::physical_memory();
    let builds = sys::can_reserve(layout.memory_pool_bytes)
        && sys::can_reserve(layout.table_pool_bytes)
        && memory_pool::bookkeeping_bytes(config.total_memories) <= physical
        && table_pool::bookkeeping_bytes(config.total_tables) <= physical
        // Under strict overcommit the table pool's commit is judged by the full measurement.
        && sys::overcommit() != Some(Overcommit::Strict);
    if builds {
        return None;
    }
    judge(config, layout, &Machine::measure())
        .into_iter()
        .find(|f| f.fatal)
}

/// The findings for `layout` on `machine`, fatal first.
pub(crate) fn judge(config: &PoolingConfig, layout: &PoolLayout, machine: &Machine) -> Vec<MachineLimit> {
    let mut findings = Vec::new();
    let limit_note = machine
        .address_space_limit
        .map(|l| format!(" (RLIMIT_AS is {})", human_bytes(l)))
        .unwrap_or_default();
    // Each pool is one reservation; the two must also fit together.
    for (knob, what, bytes) in [
        (
            "total_memories",
            "the memory pool",
            layout.memory_pool_bytes as u64,
        ),
        ("total_tables", "the table pool", layout.table_pool_bytes as u64),
    ] {
        if bytes > machine.largest_reservation {
            findings.push(MachineLimit {
                resource: "address space",
                knob,
                needed: bytes,
                available: machine.largest_reservation,
                fatal: true,
                message: format!(
                    "{what} needs {} of address space in one piece, but this process can reserve at most {}{limit_note}: lower {knob}{}",
                    human_bytes(bytes),
                    human_bytes(machine.largest_reservation),
                    if knob == "total_memories" {
                        " or the memory reservation (memory_reservation, max_memory_size, memory_guard_size)"
                    } else {
                        " or table_elements"
                    }
                ),
            });
        }
    }
    let total = layout.total_bytes() as u64;
    if findings.is_empty() && total > machine.largest_reservation {
        findings.push(MachineLimit {
            resource: "address space",
            knob: "total_memories",
            needed: total,
            available: machine.largest_reservation,
            fatal: false,
            message: format!(
                "the pools need {} of address space together, and this process can reserve at most {} in one piece{limit_note}: they may not both fit; lower total_memories",
                human_bytes(total),
                human_bytes(machine.largest_reservation)
            ),
        });
    }
    for (knob, slots, bytes) in [
        (
            "total_memories",
            config.total_memories,
            memory_pool::bookkeeping_bytes(config.total_memories),
        ),
        (
            "total_tables",
            config.total_tables,
            table_pool::bookkeeping_bytes(config.total_tables),
        ),
    ] {
        if bytes > machine.physical_memory {
            findings.push(MachineLimit {
                resource: "physical memory",
                knob,
                needed: bytes,
                available: machine.physical_memory,
                fatal: true,
                message: format!(
                    "{knob} of {slots} needs {} of bookkeeping, more than this machine's {} of memory: lower {knob}",
                    human_bytes(bytes),
                    human_bytes(machine.physical_memory)
                ),
            });
        }
    }
    if let Some(max) = machine.max_map_count {
        let needed = layout.max_mappings as u64 + machine.mappings_in_use;
        if needed > max {
            findings.push(MachineLimit {
                resource: "memory mappings",
                knob: "total_memories",
                needed,
                available: max,
                fatal: false,
                message: format!(
                    "the pools may need {} memory mappings, plus {} in use, over vm.max_map_count of {max}: instantiation may fail once many slots are in use; raise it (sysctl vm.max_map_count) or lower total_memories",
                    layout.max_mappings, machine.mappings_in_use
                ),
            });
        }
    }
    let resident = layout.max_idle_resident as u64;
    if resident > machine.physical_memory {
        findings.push(MachineLimit {
            resource: "physical memory",
            knob: "linear_memory_keep_resident",
            needed: resident,
            available: machine.physical_memory,
            fatal: false,
            message: format!(
                "idle slots may keep up to {} resident, more than this machine's {} of memory: the bound bounds nothing; lower linear_memory_keep_resident, max_unused_warm_bytes or table_keep_resident",
                human_bytes(resident),
                human_bytes(machine.physical_memory)
            ),
        });
    }
    if machine.overcommit == Some(Overcommit::Strict) {
        // Under strict overcommit every accessible byte is committed: the table pool when it is
        // built, a memory's accessible bytes while it is live.
        let accessible = (layout.memory_capacity as u64)
            .saturating_mul(u64::from(config.total_memories))
            .saturating_add(layout.table_pool_bytes as u64);
        let available = machine.commit_available.unwrap_or(0);
        if accessible > available {
            findings.push(MachineLimit {
                resource: "commit",
                knob: "total_memories",
                needed: accessible,
                available,
                fatal: (layout.table_pool_bytes as u64) > available,
                message: format!(
                    "overcommit is strict (vm.overcommit_memory=2): every accessible byte counts against the commit limit, {} left, and every memory at its largest with the table pool is {}: growth and instantiation fail past it; lower total_memories or max_memory_size",
                    human_bytes(available),
                    human_bytes(accessible)
                ),
            });
        }
    }
    findings.sort_by_key(|f| !f.fatal);
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            largest_reservation: 1 << 46,
            address_space_limit: None,
            max_map_count: Some(65530),
            mappings_in_use: 100,
            overcommit: Some(Overcommit::Heuristic),
            commit_available: Some(1 << 34),
            physical_memory: 1 << 34,
        }
    }

    fn findings(config: &PoolingConfig, machine: &Machine) -> Vec<MachineLimit> {
        let mut tunables = Tunables::default();
        if config.max_memory_size < 1 << 30 {
            // Small slots: a reservation of the memory's size and a 64 KiB guard.
            tunables.memory_reservation = config.max_memory_size as u64;
            tunables.memory_guard_size = 1 << 16;
        }
        let layout = PoolLayout::new(config, &tunables).unwrap();
        judge(config, &layout, machine)
    }

    #[test]
    fn the_default_pool_fits_a_machine_of_this_size() {
        assert_eq!(findings(&PoolingConfig::new(), &machine()), vec![]);
    }

    #[test]
    fn too_little_address_space_is_fatal_and_names_the_limit() {
        let small = Machine {
            largest_reservation: 4 << 30,
            address_space_limit: Some(4 << 30),
            ..machine()
        };
        let found = findings(&PoolingConfig::new(), &small);
        let fatal = &found[0];
        assert!(fatal.fatal && fatal.knob == "total_memories" && fatal.resource == "address space");
        assert!(
            fatal.message.contains("RLIMIT_AS is 4.0 GiB"),
            "{}",
            fatal.message
        );
    }

    #[test]
    fn mappings_resident_bytes_and_strict_commit_are_warnings() {
        let mut config = PoolingConfig::new();
        config
            .total_memories(20_000)
            .max_memory_size(1 << 20)
            .max_unused_warm_bytes(usize::MAX)
            .max_unused_warm_slots(20_000)
            .linear_memory_keep_resident(1 << 20);
        let tight = Machine {
            max_map_count: Some(65530),
            physical_memory: 8 << 30,
            overcommit: Some(Overcommit::Strict),
            commit_available: Some(4 << 30),
            ..machine()
        };
        let found = findings(&config, &tight);
        let resources: Vec<_> = found.iter().map(|f| (f.resource, f.fatal)).collect();
        assert_eq!(
            resources,
            vec![
                ("memory mappings", false),
                ("physical memory", false),
                ("commit", false)
            ],
            "{found:?}"
        );
        // With room for all of it, none.
        let roomy = Machine {
            max_map_count: Some(1 << 20),
            physical_memory: 1 << 40,
            commit_available: Some(1 << 40),
            ..tight
        };
        assert_eq!(findings(&config, &roomy), vec![]);
    }
}
