//! Criterion benchmarks: one instance cycle (instantiate + initialize + deallocate) per
//! backend and module, sequential and on two threads; memory growth; the reset policies.
//! Run with `cargo bench -p berth-bench`.
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use berth_bench::{MODULES, load, on_demand, pooling};
use berth_engine::{Engine, Instance};
use criterion::{Criterion, criterion_group, criterion_main};

fn engines() -> Vec<(&'static str, Engine)> {
    vec![
        ("on-demand", on_demand().unwrap()),
        ("pooling", pooling(None).unwrap()),
    ]
}

fn cycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("cycle");
    for (backend, engine) in engines() {
        for &(name, text, dirty) in MODULES {
            let module = load(&engine, text).unwrap();
            let buffer = vec![0xA5u8; dirty];
            group.bench_function(format!("{backend}/{name}"), |b| {
                b.iter(|| {
                    let mut instance = Instance::new(&module).unwrap();
                    if dirty > 0 {
                        instance.memory_write(0, 0, &buffer).unwrap();
                    }
                    black_box(&instance);
                })
            });
        }
    }
    group.finish();
}

fn two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("cycle-2-threads");
    for (backend, engine) in engines() {
        let module = load(&engine, MODULES[0].1).unwrap();
        group.bench_function(format!("{backend}/untouched"), |b| {
            b.iter_custom(|iterations| {
                let half = iterations.div_ceil(2);
                let started = Instant::now();
                std::thread::scope(|scope| {
                    for _ in 0..2 {
                        scope.spawn(|| {
                            for _ in 0..half {
                                black_box(Instance::new(&module).unwrap());
                            }
                        });
                    }
                });
                // Time per instance across both threads.
                started.elapsed().mul_f64(iterations as f64 / (2 * half) as f64)
            })
        });
    }
    group.finish();
}

fn grow(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory-grow");
    for (backend, engine) in engines() {
        let module = load(&engine, "(module (memory 1 1000))").unwrap();
        group.bench_function(format!("{backend}/grow-16-pages-by-one"), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations.div_ceil(16) {
                    let mut instance = Instance::new(&module).unwrap();
                    let started = Instant::now();
                    for _ in 0..16 {
                        black_box(instance.memory_grow(0, 1).unwrap());
                    }
                    total += started.elapsed();
                }
                // `total` covers `16 * ceil(iterations / 16)` grows; scale it to `iterations`.
                total.mul_f64(iterations as f64 / (16 * iterations.div_ceil(16)) as f64)
            })
        });
    }
    group.finish();
}

fn reset_policy(c: &mut Criterion) {
    let mut group = c.benchmark_group("reset-policy-dirty-64k");
    for keep in [0usize, 64 << 10, 1 << 20] {
        let engine = pooling(Some(keep)).unwrap();
        let module = load(&engine, "(module (memory 1))").unwrap();
        let buffer = vec![0xA5u8; 65536];
        group.bench_function(format!("keep-resident-{}k", keep >> 10), |b| {
            b.iter(|| {
                let mut instance = Instance::new(&module).unwrap();
                instance.memory_write(0, 0, &buffer).unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, cycle, two_threads, grow, reset_policy);
criterion_main!(benches);
