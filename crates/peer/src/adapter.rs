//! Wasmtime running code on Berth's memories (`berth-wasmtime`) against Wasmtime's own pool:
//! one cycle is `Store::new` + instantiate + a call of an exported function that writes the
//! memory + dropping the store.

use std::time::Instant;

use anyhow::{Context, Result};

/// Modules whose `run` writes their memory the way a program's first call does.
const MODULES: &[(&str, &str)] = &[
    (
        "writes 4 KiB",
        r#"(module (memory (export "memory") 1)
             (func (export "run") (result i32)
               (memory.fill (i32.const 1024) (i32.const 7) (i32.const 4096))
               (i32.load (i32.const 2048))))"#,
    ),
    (
        "program: 1 MiB, data, three writes",
        r#"(module (memory (export "memory") 16)
             (data (i32.const 0) "a few bytes of data low in memory")
             (data (i32.const 983040) "and some near the top, as a compiled program's data")
             (func (export "run") (result i32)
               (memory.fill (i32.const 65536) (i32.const 1) (i32.const 4096))
               (memory.fill (i32.const 524288) (i32.const 2) (i32.const 4096))
               (memory.fill (i32.const 983100) (i32.const 3) (i32.const 4096))
               (i32.load (i32.const 524300))))"#,
    ),
];

/// The systems: Wasmtime's pool (default and tuned as in the main table), and Wasmtime's
/// on-demand strategy with Berth's pooled memories behind `berth_wasmtime::configure`.
fn engines() -> Result<Vec<(&'static str, wasmtime::Engine)>> {
    let pooled = |tuned: bool| {
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        if tuned {
            pool.linear_memory_keep_resident(1 << 20)
                .table_keep_resident(1 << 20)
                .pagemap_scan(wasmtime::Enabled::Yes);
        }
        let mut config = wasmtime::Config::new();
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        config
    };
    let mut berth = berth_engine::Config::new();
    berth.allocation_strategy(berth_engine::InstanceAllocationStrategy::Pooling(
        berth_engine::PoolingConfig::new(),
    ));
    let berth = berth_engine::Engine::new(&berth)?;
    let mut on_berth = wasmtime::Config::new();
    berth_wasmtime::configure(&mut on_berth, &berth)?;
    let build =
        |config: &wasmtime::Config| wasmtime::Engine::new(config).map_err(|e| anyhow::anyhow!("{e:?}"));
    Ok(vec![
        ("wasmtime pooling", build(&pooled(false))?),
        ("wasmtime pooling tuned", build(&pooled(true))?),
        ("wasmtime on-demand + berth pooled memories", build(&on_berth)?),
    ])
}

/// Prints the table: medians (p99) and means of `rounds` interleaved batches of `batch`
/// cycles per (module, system).
pub fn table(rounds: usize, batch: usize) -> Result<()> {
    let engines = engines()?;
    let mut prepared = Vec::new();
    for (name, wat) in MODULES {
        let row = engines
            .iter()
            .map(|(_, engine)| {
                let module = wasmtime::Module::new(engine, wat).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let run = move || -> Result<()> {
                    let mut store = wasmtime::Store::new(module.engine(), ());
                    let instance = wasmtime::Instance::new(&mut store, &module, &[])
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let run = instance
                        .get_typed_func::<(), i32>(&mut store, "run")
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    run.call(&mut store, ()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    Ok(())
                };
                Ok(run)
            })
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("preparing {name}"))?;
        prepared.push(row);
    }
    let mut samples = vec![vec![Vec::with_capacity(rounds * batch); engines.len()]; MODULES.len()];
    for round in 0..=rounds {
        for (m, row) in prepared.iter().enumerate() {
            for (s, run) in row.iter().enumerate() {
                for _ in 0..batch {
                    let at = Instant::now();
                    run()?;
                    if round > 0 {
                        samples[m][s].push(at.elapsed().as_nanos() as f64);
                    }
                }
            }
        }
    }
    println!("\n## Wasmtime running code on Berth's memories: median (p99), mean, microseconds\n");
    println!(
        "One cycle: `Store::new` + instantiate + call `run` (which writes the memory) + drop the store. Berth's memories come through `berth_wasmtime::configure` (Wasmtime's on-demand strategy, a Berth pool behind its memory creator, Wasmtime's copy-on-write images off).\n"
    );
    print!("| module |");
    for (name, _) in &engines {
        print!(" {name} |");
    }
    println!(" berth memories / wasmtime pooling (median, mean) | berth memories / tuned (median, mean) |");
    println!("|---|{}", "---|".repeat(engines.len() + 2));
    for ((name, _), row) in MODULES.iter().zip(&mut samples) {
        let stats: Vec<(f64, f64, f64)> = row
            .iter_mut()
            .map(|s| {
                let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
                let (median, p99) = crate::summary(s);
                (median, p99, mean)
            })
            .collect();
        print!("| {name} |");
        for (median, p99, mean) in &stats {
            print!(
                " {} ({}), {} |",
                crate::us(*median),
                crate::us(*p99),
                crate::us(*mean)
            );
        }
        let ratio = |a: usize, b: usize| (stats[a].0 / stats[b].0, stats[a].2 / stats[b].2);
        let (d, t) = (ratio(2, 0), ratio(2, 1));
        println!(" {:.2}, {:.2} | {:.2}, {:.2} |", d.0, d.1, t.0, t.1);
    }
    Ok(())
}
