//! Errors a caller can test for with `err.is::<T>()` / `err.downcast_ref::<T>()` on an
//! [`anyhow::Error`], so limits and bounds are never matched by message text.

use std::fmt;

/// A configured limit would be exceeded: too many instances, memories or tables, or a
/// memory or table above its maximum size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitExceeded {
    /// The limit's name, as the configuration spells it (`total_core_instances`, ...). A name
    /// ending in `_size` is a size in bytes (`max_memory_size`), which messages show in human
    /// units.
    pub limit: &'static str,
    /// The limit's value.
    pub value: u64,
    /// What was asked for (a count or a size, in the limit's unit).
    pub requested: u64,
}

impl fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |n: u64| {
            if self.in_bytes() {
                crate::units::exact_bytes(n)
            } else {
                n.to_string()
            }
        };
        write!(
            f,
            "limit `{}` of {} exceeded: {} requested",
            self.limit,
            show(self.value),
            show(self.requested)
        )
    }
}

impl std::error::Error for LimitExceeded {}

impl LimitExceeded {
    /// Whether the limit is a size in bytes (its name ends in `_size`), not a count.
    pub fn in_bytes(&self) -> bool {
        self.limit.ends_with("_size")
    }

    /// The error for `requested` against a limit named `limit` of `value`, as an
    /// [`anyhow::Error`] that callers can test with `err.is::<LimitExceeded>()`.
    pub fn error(limit: &'static str, value: u64, requested: u64) -> anyhow::Error {
        anyhow::Error::new(LimitExceeded {
            limit,
            value,
            requested,
        })
    }
}

/// An access outside a memory's or table's current bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfBounds {
    /// What was accessed (`memory 0`, `table 1`).
    pub resource: String,
    /// First byte or element accessed.
    pub offset: u64,
    /// Bytes or elements accessed.
    pub len: u64,
    /// The resource's current size, in the same unit.
    pub size: u64,
}

impl fmt::Display for OutOfBounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} out of bounds: {} at offset {} but size is {}",
            self.resource, self.len, self.offset, self.size
        )
    }
}

impl std::error::Error for OutOfBounds {}

/// The embedder's [`ResourceLimiter`](crate::ResourceLimiter) refused a memory's or table's
/// initial size: the error itself when it answered `false`, a context over its own error when
/// it returned one (found in `err.chain()` after this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimiterDenied {
    /// What was being created (`memory`, `table`).
    pub resource: &'static str,
    /// The size asked for (bytes for memories, elements for tables).
    pub desired: u64,
}

impl fmt::Display for LimiterDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "resource limiter denied a {} of {} {}",
            self.resource,
            self.desired,
            if self.resource == "memory" {
                "bytes"
            } else {
                "elements"
            }
        )
    }
}

impl std::error::Error for LimiterDenied {}

#[cfg(test)]
mod tests {
    use super::LimitExceeded;

    #[test]
    fn sizes_read_in_human_units_and_counts_as_counts() {
        let size = LimitExceeded::error("max_memory_size", 256 << 10, 320 << 10);
        assert_eq!(
            size.to_string(),
            "limit `max_memory_size` of 256.0 KiB exceeded: 320.0 KiB requested"
        );
        let count = LimitExceeded::error("total_memories", 4, 5);
        assert_eq!(
            count.to_string(),
            "limit `total_memories` of 4 exceeded: 5 requested"
        );
    }
}
