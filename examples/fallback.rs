//! A pool that never refuses for lack of slots: Berth's pool first, on-demand allocation when
//! the pool is full or cannot hold a module, built from the library's [`Fallback`], with a quota
//! per module on top ([`Quotas`]). It is the backend `tests/conformance.rs` runs the suite on as
//! an embedder's own.

use anyhow::Result;
use berth_core::Tunables;
use berth_engine::{
    Fallback, OnDemandInstanceAllocator, PoolingConfig, PoolingInstanceAllocator, QuotaLimits, Quotas,
};

/// Pool first, on-demand when the pool is full.
pub type FallbackAllocator = Fallback<PoolingInstanceAllocator, OnDemandInstanceAllocator>;

/// A pool of `config` under `tunables`, with on-demand allocation behind it.
pub fn fallback(config: &PoolingConfig, tunables: &Tunables) -> Result<FallbackAllocator> {
    Ok(Fallback::new(
        PoolingInstanceAllocator::new(config, tunables)?,
        OnDemandInstanceAllocator::new(),
    ))
}

/// [`fallback`] with every module name a group of tenants holding at most `per_module`
/// instances at a time (modules without a name are not limited).
pub fn fallback_with_quotas(
    config: &PoolingConfig,
    tunables: &Tunables,
    per_module: u64,
) -> Result<Quotas<FallbackAllocator, String>> {
    let limits = QuotaLimits {
        instances: Some(per_module),
        ..QuotaLimits::default()
    };
    Ok(Quotas::new(fallback(config, tunables)?, limits, |request| {
        request.module.name().map(str::to_owned)
    }))
}
