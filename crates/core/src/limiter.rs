//! The embedder's say over memory and table sizes.

use anyhow::Result;

/// Consulted before a memory or table is created or grown.
///
/// Return `Ok(true)` to allow, `Ok(false)` to refuse (creation fails with a
/// [`LimiterDenied`](crate::LimiterDenied) error; `memory.grow` / `table.grow` return -1 and
/// leave the resource untouched), or an error to abort the operation with it (a trap).
pub trait ResourceLimiter: Send {
    /// A memory wants to go from `current` to `desired` bytes; `maximum` is its maximum in
    /// bytes if it has one. Called with `current == 0` when a memory is created.
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> Result<bool>;

    /// A table wants to go from `current` to `desired` elements; `maximum` is its maximum if
    /// it has one. Called with `current == 0` when a table is created.
    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> Result<bool>;
}
