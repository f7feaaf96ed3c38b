//! Options shared by the subcommands: the engine's tunables and the pool's knobs, with sizes
//! written as `65536`, `64K`, `64KiB`, `4G` and the like.

use anyhow::{Result, bail};
use berth_core::Tunables;
use berth_engine::PoolingConfig;
use clap::Args;

/// Parses a byte size: a number with an optional `K`, `M`, `G` or `T` suffix (powers of 1024,
/// `KiB` and `KB` accepted too).
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let digits: String = digits.chars().filter(|c| *c != '_').collect();
    if digits.is_empty() {
        bail!("`{text}` is not a size: expected a number like 65536, 64K or 4GiB");
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| anyhow::anyhow!("`{text}` is too large a size"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other if other.starts_with('.') => {
            bail!("`{text}` is not a whole number of bytes: sizes take no fractions (1536 rather than 1.5K)")
        }
        other => bail!("`{other}` is not a size unit: use K, M, G or T"),
    };
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| anyhow::anyhow!("`{text}` is too large a size"))
}

fn size(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

fn usize_size(text: &str) -> Result<usize, String> {
    let value = size(text)?;
    usize::try_from(value).map_err(|_| format!("`{text}` does not fit this machine"))
}

/// The engine's tunables.
#[derive(Debug, Clone, Args)]
pub struct TunableOptions {
    /// Address space reserved per memory [default: 4G]
    #[arg(long, value_parser = size, help_heading = "Engine")]
    pub memory_reservation: Option<u64>,
    /// Guard after each memory [default: 2G]
    #[arg(long, value_parser = size, help_heading = "Engine")]
    pub memory_guard_size: Option<u64>,
    /// Put a guard before each memory too
    #[arg(long, help_heading = "Engine")]
    pub guard_before_linear_memory: bool,
    /// Copy data segments instead of mapping copy-on-write images
    #[arg(long, help_heading = "Engine")]
    pub no_cow: bool,
}

impl TunableOptions {
    /// The tunables these options describe.
    pub fn tunables(&self) -> Tunables {
        let mut tunables = Tunables::default();
        if let Some(v) = self.memory_reservation {
            tunables.memory_reservation = v;
        }
        if let Some(v) = self.memory_guard_size {
            tunables.memory_guard_size = v;
        }
        tunables.guard_before_linear_memory = self.guard_before_linear_memory;
        tunables.memory_init_cow = !self.no_cow;
        tunables
    }
}

/// The pool's knobs (see docs/pooling.md); unset ones keep their defaults.
#[derive(Debug, Clone, Args)]
pub struct PoolOptions {
    /// Instances live at once [default: 1000]
    #[arg(long, help_heading = "Pool")]
    pub total_core_instances: Option<u32>,
    /// Memory slots [default: 1000]
    #[arg(long, help_heading = "Pool")]
    pub total_memories: Option<u32>,
    /// Table slots [default: 1000]
    #[arg(long, help_heading = "Pool")]
    pub total_tables: Option<u32>,
    /// Bytes a pooled memory may grow to [default: 4G]
    #[arg(long, value_parser = usize_size, help_heading = "Pool")]
    pub max_memory_size: Option<usize>,
    /// Elements a pooled table may grow to [default: 20000]
    #[arg(long, help_heading = "Pool")]
    pub table_elements: Option<usize>,
    /// Defined memories per module [default: 1]
    #[arg(long, help_heading = "Pool")]
    pub max_memories_per_module: Option<u32>,
    /// Defined tables per module [default: 1]
    #[arg(long, help_heading = "Pool")]
    pub max_tables_per_module: Option<u32>,
    /// Bytes of an instance block (Instance + vmctx) [default: 1M]
    #[arg(long, value_parser = usize_size, help_heading = "Pool")]
    pub max_core_instance_size: Option<usize>,
    /// Idle slots kept warm [default: 1000]
    #[arg(long, help_heading = "Pool")]
    pub max_unused_warm_slots: Option<u32>,
    /// Bytes of memory pages the idle slots keep resident together [default: 100M]
    #[arg(long, value_parser = usize_size, help_heading = "Pool")]
    pub max_unused_warm_bytes: Option<usize>,
    /// Deallocations whose idle slots' decommits a shard collects for one system call [default: 8]
    #[arg(long, help_heading = "Pool")]
    pub decommit_batch_size: Option<usize>,
    /// Bytes of each memory slot kept resident between tenants (pages tenants wrote) [default: 4M]
    #[arg(long, value_parser = usize_size, help_heading = "Pool")]
    pub linear_memory_keep_resident: Option<usize>,
    /// Bytes of each table slot kept resident between tenants (pages tenants wrote) [default: 1M]
    #[arg(long, value_parser = usize_size, help_heading = "Pool")]
    pub table_keep_resident: Option<usize>,
    /// Do not ask the kernel which pages were written (PAGEMAP_SCAN) when resetting
    #[arg(long, help_heading = "Pool")]
    pub no_pagemap_scan: bool,
}

/// Calls `$m!` with every optional pool option's field (each a `PoolingConfig` setter of the
/// same name and a `--flag` spelled with dashes), so the list is written once.
macro_rules! pool_options {
    ($m:ident) => {
        $m!(
            total_core_instances,
            total_memories,
            total_tables,
            max_memory_size,
            table_elements,
            max_memories_per_module,
            max_tables_per_module,
            max_core_instance_size,
            max_unused_warm_slots,
            max_unused_warm_bytes,
            decommit_batch_size,
            linear_memory_keep_resident,
            table_keep_resident
        )
    };
}

impl PoolOptions {
    /// The pool configuration these options describe (the pool checks it when it is built: a
    /// `--max-memory-size` that is not a whole number of host pages is an error there).
    pub fn config(&self) -> PoolingConfig {
        let mut c = PoolingConfig::new();
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { c.$field(v); })* };
        }
        pool_options!(set);
        if self.no_pagemap_scan {
            c.pagemap_scan(false);
        }
        c
    }

    /// The flags given, by name (for a command that has no pool to give them to).
    pub fn given(&self) -> Vec<String> {
        let mut given = Vec::new();
        macro_rules! flag {
            ($($field:ident),*) => {
                $(if self.$field.is_some() {
                    given.push(format!("--{}", stringify!($field).replace('_', "-")));
                })*
            };
        }
        pool_options!(flag);
        if self.no_pagemap_scan {
            given.push("--no-pagemap-scan".to_owned());
        }
        given
    }
}

#[cfg(test)]
mod tests {
    use super::{PoolOptions, TunableOptions, parse_size};
    use berth_core::Tunables;
    use berth_engine::PoolingConfig;
    use clap::{Args, Command};

    /// The number an option's help gives as its `[default: ...]`.
    fn help_default(command: &Command, id: &str) -> u64 {
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_id() == id)
            .unwrap_or_else(|| panic!("no option {id}"));
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let default = help
            .rsplit_once("[default: ")
            .and_then(|(_, rest)| rest.strip_suffix(']'))
            .unwrap_or_else(|| panic!("--{id}: no default in {help:?}"));
        parse_size(default).unwrap_or_else(|e| panic!("--{id}: {e}"))
    }

    #[test]
    fn the_help_gives_the_libraries_defaults() {
        let pool = PoolOptions::augment_args(Command::new("pool"));
        let d = PoolingConfig::default();
        let size = |bytes: usize| bytes as u64;
        for (id, value) in [
            ("total_core_instances", u64::from(d.total_core_instances)),
            ("total_memories", u64::from(d.total_memories)),
            ("total_tables", u64::from(d.total_tables)),
            ("max_memory_size", size(d.max_memory_size)),
            ("table_elements", size(d.table_elements)),
            ("max_memories_per_module", u64::from(d.max_memories_per_module)),
            ("max_tables_per_module", u64::from(d.max_tables_per_module)),
            ("max_core_instance_size", size(d.max_core_instance_size)),
            ("max_unused_warm_slots", u64::from(d.max_unused_warm_slots)),
            ("max_unused_warm_bytes", size(d.max_unused_warm_bytes)),
            ("decommit_batch_size", size(d.decommit_batch_size)),
            ("linear_memory_keep_resident", size(d.linear_memory_keep_resident)),
            ("table_keep_resident", size(d.table_keep_resident)),
        ] {
            assert_eq!(help_default(&pool, id), value, "--{id}'s help");
        }
        let engine = TunableOptions::augment_args(Command::new("engine"));
        let t = Tunables::default();
        for (id, value) in [
            ("memory_reservation", t.memory_reservation),
            ("memory_guard_size", t.memory_guard_size),
        ] {
            assert_eq!(help_default(&engine, id), value, "--{id}'s help");
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("1_000").unwrap(), 1000);
        assert!(parse_size("12Q").is_err());
        let fraction = parse_size("1.5K").unwrap_err().to_string();
        assert!(fraction.contains("no fractions"), "{fraction}");
        assert!(parse_size("K").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }
}

/// The options every pool command takes: output format, engine tunables, pool knobs.
#[derive(Debug, Clone, Args)]
pub struct PoolCommand {
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tunables: TunableOptions,
    #[command(flatten)]
    pub pool: PoolOptions,
}
