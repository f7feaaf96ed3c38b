//! The engine-wide settings that compiled code may rely on.
//!
//! A code generator decides from these whether it can leave out bounds checks: with the
//! defaults, a 32-bit memory has 4 GiB reserved and 2 GiB of guard after it, so any
//! `i32` address plus any static offset under 2 GiB lands either in the memory, in
//! `PROT_NONE` reservation or in the guard, and an out-of-bounds access faults instead of
//! reaching another allocation. Every backend must honour them: they are frozen when the
//! engine is built.

use crate::units::{exact_bytes, human_bytes};
use anyhow::{Result, bail};

/// Reservation and guard sizes for linear memories.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tunables {
    /// Bytes of address space reserved for each linear memory (accessible bytes plus room
    /// to grow in place). A memory whose maximum fits here never moves. Default: 4 GiB on
    /// 64-bit hosts.
    pub memory_reservation: u64,
    /// Bytes of `PROT_NONE` guard after each memory's reservation. Default: 2 GiB on
    /// 64-bit hosts.
    pub memory_guard_size: u64,
    /// Whether a guard of `memory_guard_size` bytes also stands before each memory, so a
    /// negative effective address faults too. Default: `false`.
    pub guard_before_linear_memory: bool,
    /// Extra bytes reserved past the initial size when a memory does not fit
    /// `memory_reservation` (so the next few grows are in place). Default: 2 GiB on 64-bit
    /// hosts.
    pub memory_reservation_for_growth: u64,
    /// Whether a memory may be moved (re-reserved and copied) when it grows past its
    /// reservation. Code compiled with `false` may cache a memory's base. Default: `true`.
    pub memory_may_move: bool,
    /// Whether a memory's initial data is mapped from a copy-on-write image instead of being
    /// copied at each instantiation. Default: `true`.
    pub memory_init_cow: bool,
}

const GIB: u64 = 1 << 30;

impl Default for Tunables {
    fn default() -> Self {
        if cfg!(target_pointer_width = "64") {
            Tunables {
                memory_reservation: 4 * GIB,
                memory_guard_size: 2 * GIB,
                guard_before_linear_memory: false,
                memory_reservation_for_growth: 2 * GIB,
                memory_may_move: true,
                memory_init_cow: true,
            }
        } else {
            Tunables {
                memory_reservation: 10 << 20,
                memory_guard_size: 64 << 10,
                guard_before_linear_memory: false,
                memory_reservation_for_growth: 1 << 20,
                memory_may_move: true,
                memory_init_cow: true,
            }
        }
    }
}

/// The largest reservation, guard or growth reserve Berth accepts: 2^46 bytes, a quarter of
/// a 47-bit user address space, so that at least a few memories fit.
pub const MAX_RESERVATION: u64 = 1 << 46;

impl Tunables {
    /// Checks that every size is a multiple of `page_size` and under [`MAX_RESERVATION`].
    pub fn validate(&self, page_size: usize) -> Result<()> {
        let page = page_size as u64;
        for (name, value) in [
            ("memory_reservation", self.memory_reservation),
            ("memory_guard_size", self.memory_guard_size),
            (
                "memory_reservation_for_growth",
                self.memory_reservation_for_growth,
            ),
        ] {
            if value % page != 0 {
                bail!(
                    "{name} of {} is not a multiple of the host page size ({})",
                    exact_bytes(value),
                    exact_bytes(page)
                );
            }
            if value > MAX_RESERVATION {
                bail!(
                    "{name} of {} is over the largest accepted ({})",
                    exact_bytes(value),
                    human_bytes(MAX_RESERVATION)
                );
            }
        }
        Ok(())
    }

    /// Bytes of guard before each memory (0 unless `guard_before_linear_memory`).
    pub fn pre_guard_size(&self) -> u64 {
        if self.guard_before_linear_memory {
            self.memory_guard_size
        } else {
            0
        }
    }
}
