//! The Rust API in brief (the README's main job is the `berth` command): instantiate a module
//! built in code through a default engine and print what was allocated (vmctx size, memory
//! reservations, table sizes) and what it cost.
//!
//! Run with `cargo run --release --example quickstart`.
#![forbid(unsafe_code)]

use std::time::Instant;

use anyhow::Result;
use berth_core::{GlobalInit, GlobalType, MemoryType, Module, TableType, ValType};
use berth_engine::{Config, Engine, Instance};

fn main() -> Result<()> {
    let engine = Engine::new(&Config::new())?;
    let facts = Module::builder()
        .name("quickstart")
        .defined_funcs(3)
        .memory(MemoryType::new(1, Some(16)))
        .memory(MemoryType::new(2, None))
        .table(TableType::new(10, Some(100)))
        .global(
            GlobalType {
                content: ValType::I32,
                mutable: true,
            },
            GlobalInit::I32(42),
        )
        .build()?;
    let module = engine.load(facts)?;
    let offsets = module.offsets();
    println!(
        "module `quickstart`: 2 memories, 1 table, 1 global, on the {} allocator",
        engine.strategy_name()
    );
    println!("vmctx: {}", offsets.region_breakdown());

    let started = Instant::now();
    let mut instance = Instance::new(&module)?;
    let first = started.elapsed();
    let core = instance.core();
    println!(
        "instance block: {} bytes (Instance {} + vmctx {})",
        core.layout().size(),
        core.layout().size() - offsets.size_of_vmctx() as usize,
        offsets.size_of_vmctx()
    );
    for (index, (_, memory)) in core.memories() {
        println!(
            "memory {}: {} bytes accessible ({} pages), {} bytes reserved with guards, grows in place to {} bytes",
            index.as_u32(),
            memory.byte_size(),
            memory.pages(),
            memory.reserved_bytes(),
            memory.byte_capacity()
        );
    }
    for (index, (_, table)) in core.tables() {
        println!(
            "table {}: {} elements (maximum {:?})",
            index.as_u32(),
            table.size(),
            table.maximum()
        );
    }

    instance.memory_write(0, 0, b"hello from berth")?;
    let old = instance.memory_grow(0, 1)?;
    let mut buf = [0u8; 16];
    instance.memory_read(0, 0, &mut buf)?;
    println!(
        "memory 0 grown from {:?} pages to {} bytes; first bytes: {:?}",
        old,
        instance.memory_size(0)?,
        String::from_utf8_lossy(&buf)
    );
    let stats = engine.stats();
    println!(
        "allocator: {} live instances, {} memories, {} tables, {} bytes of address space reserved",
        stats.live_instances, stats.live_memories, stats.live_tables, stats.reserved_bytes
    );
    drop(instance);

    let cycles = 10_000u32;
    let started = Instant::now();
    for _ in 0..cycles {
        drop(Instance::new(&module)?);
    }
    let per_cycle = started.elapsed() / cycles;
    println!("first instantiation: {first:?}; then {cycles} instantiate+drop cycles at {per_cycle:?} each");
    println!("after: {} live instances", engine.stats().live_instances);
    Ok(())
}
