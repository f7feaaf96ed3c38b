//! What this process may have: address space, memory mappings, commit, physical memory. Each
//! is measured or read from the kernel now, never assumed (a 47-bit user space, say).

use std::io;

use super::{page_size, reserve, unmap};

/// Whether one fresh reservation of `len` bytes (a multiple of the page size) succeeds now: it
/// is made and given back at once, committing no memory.
pub fn can_reserve(len: usize) -> bool {
    if len == 0 {
        return true;
    }
    match reserve(len) {
        Ok(ptr) => {
            // SAFETY: the mapping `reserve` just made, known to nothing else.
            let _ = unsafe { unmap(ptr, len) };
            true
        }
        Err(_) => false,
    }
}

/// The largest single reservation this process can make now, to within 1/1024 of it (at least a
/// page): found by reserving and giving back, so it reflects the hardware's and kernel's
/// address space, `RLIMIT_AS` and what the process has mapped already.
pub fn largest_reservation() -> usize {
    let page = page_size();
    // 2^57 bytes: five-level page tables' user space; nothing larger exists.
    let (mut low, mut high) = (0usize, (1usize << 57) / page);
    if can_reserve(high * page) {
        return high * page;
    }
    // Invariant: `low` pages can be reserved (zero trivially), `high` pages cannot.
    while high - low > (low / 1024).max(1) {
        let mid = low + (high - low) / 2;
        if can_reserve(mid * page) {
            low = mid;
        } else {
            high = mid;
        }
    }
    low * page
}

/// The address-space limit (`RLIMIT_AS`, soft), if one is set.
pub fn address_space_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::As).current
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `vm.max_map_count`: the most memory mappings a process may have.
pub fn max_map_count() -> Option<u64> {
    read_number("/proc/sys/vm/max_map_count")
}

/// Memory mappings this process has now.
pub fn mappings_in_use() -> io::Result<u64> {
    Ok(std::fs::read_to_string("/proc/self/maps")?.lines().count() as u64)
}

/// The kernel's overcommit policy (`vm.overcommit_memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overcommit {
    /// 0: heuristic; address space reserved without access is never refused for lack of memory.
    Heuristic,
    /// 1: always; nothing is refused for lack of memory.
    Always,
    /// 2: strict; every private writable byte counts against the commit limit when mapped or
    /// made accessible.
    Strict,
}

/// The overcommit policy, if the kernel says.
pub fn overcommit() -> Option<Overcommit> {
    match read_number("/proc/sys/vm/overcommit_memory")? {
        0 => Some(Overcommit::Heuristic),
        1 => Some(Overcommit::Always),
        2 => Some(Overcommit::Strict),
        _ => None,
    }
}

/// Bytes that may still be committed before the commit limit (`CommitLimit` less
/// `Committed_AS` in `/proc/meminfo`), which refuses only under [`Overcommit::Strict`].
pub fn commit_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    };
    Some(field("CommitLimit:")?.saturating_sub(field("Committed_AS:")?))
}
