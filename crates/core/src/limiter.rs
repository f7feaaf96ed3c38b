//! The embedder's say over memory and table sizes.

use anyhow::Result;

use crate::error::{LimitExceeded, LimiterDenied};

/// Consulted before a memory or table is created or grown.
///
/// Return `Ok(true)` to allow, `Ok(false)` to refuse (creation fails with a
/// [`LimiterDenied`] error; `memory.grow` / `table.grow` return -1 and
/// leave the resource untouched), or an error to abort the operation with it (a trap; at
/// creation, under a [`LimiterDenied`] context, the error itself still found by
/// `downcast_ref`).
pub trait ResourceLimiter: Send {
    /// A memory wants to go from `current` to `desired` bytes; `maximum` is its maximum in
    /// bytes if it has one. Called with `current == 0` when a memory is created.
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> Result<bool>;

    /// A table wants to go from `current` to `desired` elements; `maximum` is its maximum if
    /// it has one. Called with `current == 0` when a table is created.
    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> Result<bool>;
}

/// What is being created, for [`admit_initial`].
#[derive(Clone, Copy)]
pub(crate) enum Resource {
    Memory,
    Table,
}

/// Lets the backend's limit and the embedder's limiter judge a new memory (sizes in bytes) or
/// table (sizes in elements) of `minimum`, and returns its effective maximum: the smaller of
/// the type's and the backend's.
pub(crate) fn admit_initial(
    resource: Resource,
    minimum: usize,
    type_max: Option<usize>,
    backend_max: Option<usize>,
    limiter: Option<&mut (dyn ResourceLimiter + '_)>,
) -> Result<Option<usize>> {
    let maximum = match (type_max, backend_max) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let (limit_name, name) = match resource {
        Resource::Memory => ("max_memory_size", "memory"),
        Resource::Table => ("table_elements", "table"),
    };
    if let Some(limit) = backend_max
        && minimum > limit
    {
        return Err(LimitExceeded::error(limit_name, limit as u64, minimum as u64));
    }
    if let Some(limiter) = limiter {
        let denied = LimiterDenied {
            resource: name,
            desired: minimum as u64,
        };
        let allowed = match resource {
            Resource::Memory => limiter.memory_growing(0, minimum, maximum),
            Resource::Table => limiter.table_growing(0, minimum, maximum),
        };
        // The limiter's own error keeps its type (and any `LimitExceeded` it holds, which is
        // then the limiter's, not the backend's), under a `LimiterDenied` that says whose it is.
        match allowed {
            Ok(true) => {}
            Ok(false) => return Err(anyhow::Error::new(denied)),
            Err(error) => return Err(error.context(denied)),
        }
    }
    Ok(maximum)
}
