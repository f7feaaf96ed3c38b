//! Every backend runs the whole conformance suite: on-demand, pooling in several
//! configurations, the fallback backend from `examples/`, and quotas over a pool and over it.

use std::sync::Arc;

use berth_core::{InstanceAllocatorImpl, Tunables};
use berth_engine::{
    OnDemandInstanceAllocator, OnDemandLimits, PoolingConfig, PoolingInstanceAllocator, QuotaLimits, Quotas,
};
use berth_examples::fallback;
use berth_testkit::{Capabilities, run_all};

fn pool_config() -> PoolingConfig {
    let mut config = PoolingConfig::new();
    config
        .total_core_instances(16)
        .total_memories(16)
        .total_tables(16)
        .max_memory_size(4 << 20)
        .table_elements(1024)
        .max_memories_per_module(2)
        .max_tables_per_module(2)
        .max_unused_warm_slots(8);
    config
}

fn pool_caps(config: &PoolingConfig) -> Capabilities {
    let mut caps = Capabilities::unlimited();
    caps.reuses_slots = true;
    caps.max_instances = Some(config.total_core_instances as usize);
    caps.max_memories = Some(config.total_memories as usize);
    caps.max_tables = Some(config.total_tables as usize);
    caps.max_memory_bytes = Some(config.max_memory_size);
    caps.max_table_elements = Some(config.table_elements);
    caps.max_memories_per_module = Some(config.max_memories_per_module);
    caps.max_tables_per_module = Some(config.max_tables_per_module);
    caps
}

fn run_pool(config: PoolingConfig) {
    let caps = pool_caps(&config);
    let factory = move |tunables: &Tunables| -> Arc<dyn InstanceAllocatorImpl> {
        Arc::new(PoolingInstanceAllocator::new(&config, tunables).expect("pool builds"))
    };
    run_all(&factory, caps);
}

#[test]
fn on_demand() {
    run_all(
        &|_| Arc::new(OnDemandInstanceAllocator::new()),
        Capabilities::unlimited(),
    );
}

#[test]
fn on_demand_with_limits() {
    let limits = OnDemandLimits {
        total_core_instances: Some(5),
        total_memories: Some(4),
        total_tables: Some(3),
        max_memory_size: Some(3 << 16),
        table_elements: Some(6),
    };
    let mut caps = Capabilities::unlimited();
    caps.max_instances = Some(5);
    caps.max_memories = Some(4);
    caps.max_tables = Some(3);
    caps.max_memory_bytes = Some(3 << 16);
    caps.max_table_elements = Some(6);
    run_all(
        &|_| Arc::new(OnDemandInstanceAllocator::with_limits(limits)),
        caps,
    );
}

#[test]
fn pooling_no_warm_slots() {
    let mut config = pool_config();
    config.max_unused_warm_slots(0);
    run_pool(config);
}

#[test]
fn pooling_many_warm_slots() {
    let mut config = pool_config();
    config.max_unused_warm_slots(100);
    run_pool(config);
}

#[test]
fn pooling_without_pagemap_scan() {
    let mut config = pool_config();
    config.pagemap_scan(false).decommit_batch_size(2);
    run_pool(config);
}

#[test]
fn pooling_batched_decommit() {
    let mut config = pool_config();
    config.decommit_batch_size(4);
    run_pool(config);
}

#[test]
fn pooling_keep_resident_64k() {
    let mut config = pool_config();
    config
        .linear_memory_keep_resident(64 << 10)
        .table_keep_resident(4096);
    run_pool(config);
}

#[test]
fn pooling_keep_resident_1m() {
    let mut config = pool_config();
    config
        .linear_memory_keep_resident(1 << 20)
        .table_keep_resident(1 << 20);
    run_pool(config);
}

#[test]
fn pooling_tiny_pool_that_exhausts() {
    let mut config = pool_config();
    config
        .total_core_instances(3)
        .total_memories(2)
        .total_tables(2)
        .max_memory_size(2 << 16)
        .table_elements(4)
        .max_memories_per_module(1)
        .max_tables_per_module(1)
        .decommit_batch_size(2)
        .max_unused_warm_slots(1);
    run_pool(config);
}

#[test]
fn fallback_from_examples() {
    let mut config = pool_config();
    config
        .total_memories(2)
        .total_tables(2)
        .max_memories_per_module(1)
        .max_tables_per_module(1);
    // The pool's limits do not show: what it cannot serve, on-demand does.
    run_all(
        &move |tunables: &Tunables| -> Arc<dyn InstanceAllocatorImpl> {
            Arc::new(fallback::fallback(&config, tunables).expect("fallback builds"))
        },
        Capabilities::unlimited(),
    );
}

#[test]
fn quotas_over_the_fallback_from_examples() {
    // A quota per module name (the suite's modules are named) that the suite's instances stay
    // within: every resource passes through the quotas' books and back.
    let config = pool_config();
    run_all(
        &move |tunables: &Tunables| -> Arc<dyn InstanceAllocatorImpl> {
            Arc::new(fallback::fallback_with_quotas(&config, tunables, 1 << 20).expect("builds"))
        },
        Capabilities::unlimited(),
    );
}

#[test]
fn quotas_over_a_pool() {
    // One group for every request, limited at the pool's own capacity: the pool's limits are
    // what shows, typed as the suite expects.
    let config = pool_config();
    let caps = pool_caps(&config);
    let limits = QuotaLimits {
        instances: Some(u64::from(config.total_core_instances)),
        memories: Some(u64::from(config.total_memories)),
        tables: Some(u64::from(config.total_tables)),
        memory_bytes: None,
    };
    run_all(
        &move |tunables: &Tunables| -> Arc<dyn InstanceAllocatorImpl> {
            let pool = PoolingInstanceAllocator::new(&config, tunables).expect("pool builds");
            Arc::new(Quotas::new(pool, limits, |_| Some(())))
        },
        caps,
    );
}
