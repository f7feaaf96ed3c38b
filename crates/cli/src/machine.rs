//! What this machine allows: address space, memory mappings, resident memory.

/// The user address space Berth assumes on 64-bit Linux (47 bits).
pub const USER_ADDRESS_SPACE: u64 = 1 << 47;

/// The process's address-space limit (`RLIMIT_AS`), if one is set.
pub fn address_space_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max address space"))?;
    line.split_whitespace().nth(3).and_then(|soft| soft.parse().ok())
}

/// The address space a pool may use here: the smaller of the user address space and the limit.
pub fn available_address_space() -> u64 {
    address_space_limit().map_or(USER_ADDRESS_SPACE, |l| l.min(USER_ADDRESS_SPACE))
}

/// `vm.max_map_count`: the most memory mappings a process may have.
pub fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Memory mappings this process has now.
pub fn current_mappings() -> Option<u64> {
    Some(std::fs::read_to_string("/proc/self/maps").ok()?.lines().count() as u64)
}

/// Peak resident set size of this process, in bytes (`VmHWM`).
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
