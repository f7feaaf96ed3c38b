//! The systems compared: Wasmtime 48 (on-demand, pooling with defaults, pooling tuned) and
//! Berth (on-demand, pooling with defaults). One cycle of each is one instance's whole life.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::workloads::{Source, Tenant, Workload};

/// One thread's loop over a prepared (system, workload) pair: calling it runs one cycle.
pub type Cycle = Box<dyn FnMut() -> Result<()> + Send>;

/// A prepared (system, workload) pair, its modules compiled or loaded once: makes the cycle of
/// thread `t` (threads share the modules, and start at different ones).
pub type Cycles = Box<dyn Fn(usize) -> Cycle + Send + Sync>;

/// Compiles or loads a workload once.
type Prepare = Box<dyn Fn(&Workload) -> Result<Cycles> + Send + Sync>;

/// A system under comparison.
pub struct System {
    /// Its label in the tables.
    pub name: &'static str,
    prepare: Prepare,
}

impl System {
    /// Compiles or loads `workload` once, for cycles on any number of threads.
    pub fn prepare(&self, workload: &Workload) -> Result<Cycles> {
        (self.prepare)(workload).with_context(|| format!("{} cannot run {}", self.name, workload.name))
    }
}

fn wasmtime_engine(pooling: Option<bool>) -> Result<wasmtime::Engine> {
    let mut config = wasmtime::Config::new();
    if let Some(tuned) = pooling {
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        // Raised from 1 so that the four-memory workload can run; nothing else changes.
        pool.max_memories_per_module(4).max_tables_per_module(4);
        if tuned {
            pool.linear_memory_keep_resident(1 << 20)
                .table_keep_resident(1 << 20)
                .pagemap_scan(wasmtime::Enabled::Yes);
        }
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    wt(wasmtime::Engine::new(&config))
}

/// Wasmtime's own error type, as an `anyhow` error.
fn wt<T>(result: wasmtime::Result<T>) -> Result<T> {
    result.map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Where thread `t` starts in a workload of `n` modules: spread out, so threads rarely
/// instantiate the same module at once.
fn start(thread: usize, n: usize) -> usize {
    (thread * n.div_ceil(2)) % n.max(1)
}

/// The bytes a tenant writes, enough for its longest run, shared by the threads.
fn buffer(workload: &Workload) -> Arc<Source> {
    let longest = workload
        .modules
        .iter()
        .flat_map(|m| m.tenant.all_runs().map(|w| w.1))
        .max()
        .unwrap_or(0);
    Arc::new(Source::new(longest))
}

/// One Wasmtime cycle: `Store::new` + instantiate (+ grow and write) + drop, each cycle the
/// next module of the workload.
fn wasmtime_system(name: &'static str, pooling: Option<bool>) -> Result<System> {
    let engine = wasmtime_engine(pooling)?;
    Ok(System {
        name,
        prepare: Box::new(move |workload: &Workload| -> Result<Cycles> {
            let engine = engine.clone();
            let modules = workload
                .modules
                .iter()
                .map(|m| Ok((wt(wasmtime::Module::new(&engine, &m.wat))?, m.tenant.clone())))
                .collect::<Result<Vec<_>>>()?;
            let modules = Arc::new(modules);
            let buffer = buffer(workload);
            Ok(Box::new(move |thread| {
                let (engine, modules, buffer) = (engine.clone(), modules.clone(), buffer.clone());
                let mut next = start(thread, modules.len());
                let mut cycle = 0;
                Box::new(move || {
                    let (module, tenant) = &modules[next];
                    next = (next + 1) % modules.len();
                    cycle += 1;
                    let mut store = wasmtime::Store::new(&engine, ());
                    let instance = wt(wasmtime::Instance::new(&mut store, module, &[]))?;
                    if tenant.uses_memory() {
                        let memory = instance
                            .get_memory(&mut store, "memory")
                            .context("no exported memory")?;
                        if tenant.grow > 0 {
                            wt(memory.grow(&mut store, tenant.grow))?;
                        }
                        for (offset, len) in tenant.runs(cycle) {
                            memory
                                .write(&mut store, offset, buffer.get(len))
                                .map_err(|e| anyhow::anyhow!("{e}"))?;
                        }
                    }
                    drop(store);
                    Ok(())
                })
            }))
        }),
    })
}

/// One Berth cycle: instantiate through the engine (+ grow and write) + drop, each cycle the
/// next module of the workload.
fn berth_system(name: &'static str, pooling: bool) -> Result<System> {
    let mut config = berth_engine::Config::new();
    if pooling {
        let mut pool = berth_engine::PoolingConfig::new();
        // Raised from 1 so that the four-memory workload can run; nothing else changes.
        pool.max_memories_per_module(4).max_tables_per_module(4);
        config.allocation_strategy(berth_engine::InstanceAllocationStrategy::Pooling(pool));
    }
    let engine = berth_engine::Engine::new(&config)?;
    Ok(System {
        name,
        prepare: Box::new(move |workload: &Workload| -> Result<Cycles> {
            let modules = workload
                .modules
                .iter()
                .map(|m| {
                    Ok((
                        engine.load(berth_wasm::parse(m.wat.as_bytes())?)?,
                        m.tenant.clone(),
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let modules = Arc::new(modules);
            let buffer = buffer(workload);
            Ok(Box::new(move |thread| {
                let (modules, buffer) = (modules.clone(), buffer.clone());
                let mut next = start(thread, modules.len());
                let mut cycle = 0;
                Box::new(move || {
                    let (module, tenant) = &modules[next];
                    next = (next + 1) % modules.len();
                    cycle += 1;
                    let mut instance = berth_engine::Instance::new(module)?;
                    if tenant.grow > 0 {
                        instance
                            .memory_grow(0, tenant.grow)?
                            .context("memory.grow failed")?;
                    }
                    for (offset, len) in tenant.runs(cycle) {
                        instance.memory_write(0, offset as u64, buffer.get(len))?;
                    }
                    drop(instance);
                    Ok(())
                })
            }))
        }),
    })
}

/// Every system, in table order.
pub fn all() -> Result<Vec<System>> {
    Ok(vec![
        wasmtime_system("wasmtime on-demand", None)?,
        wasmtime_system("wasmtime pooling", Some(false))?,
        wasmtime_system("wasmtime pooling tuned", Some(true))?,
        berth_system("berth on-demand", false)?,
        berth_system("berth pooling", true)?,
        growth_floor(),
        fresh_floor(),
    ])
}

/// A pooled system for the thread and resident-memory runs.
pub fn pooled(berth: bool) -> Result<System> {
    if berth {
        berth_system("berth pooling", true)
    } else {
        wasmtime_system("wasmtime pooling", Some(false))
    }
}

/// Not an allocator: a user-space loop of about the length of a pooled cycle (a 2 KiB heap
/// block zeroed, filled, summed and freed), sharing nothing between threads. Its two-thread
/// ratio is what this machine gives a workload with no contention at all, in the same run.
pub fn control() -> System {
    System {
        name: "control: user-space loop, nothing shared",
        prepare: Box::new(|_: &Workload| -> Result<Cycles> {
            Ok(Box::new(|_| {
                let mut seed = 1u64;
                Box::new(move || {
                    let mut block = vec![0u64; 256];
                    for (i, word) in block.iter_mut().enumerate() {
                        *word = seed.wrapping_mul(i as u64 + 1);
                    }
                    seed = std::hint::black_box(block.iter().fold(0, |a, &w| a ^ w)) | 1;
                    Ok(())
                })
            }))
        }),
    }
}

/// Not an allocator: the work a growing tenant needs that no allocator can skip, in a mapping of
/// each thread's own, with nothing else: the growth (`mprotect` to readable and writable), the
/// tenant's writes into pages that stay resident, the cheapest reset that keeps them resident
/// and leaves nothing for the next tenant (one `PAGEMAP_SCAN` of what was accessible, which
/// pages were written being unknown to an allocator, and a `memset` of the pages it reports),
/// and the undoing of the growth (`mprotect` to `PROT_NONE`, which makes the kernel flush the
/// TLB of every core running the process), so that bytes past the next tenant's size fault.
/// Its times and two-thread ratio are what this machine allows a growing tenant, in the same
/// run. For a workload that does not grow it is the writes, a `memset` of the pages they
/// touched, without the scan, and a read of the pages other tenants of the sequence write (one
/// in [`KEPT_EVERY`] or more) and this one left alone: the least any reset that keeps those
/// pages resident does, knowing where the tenant wrote (a pool does not, and proves the rest of
/// the memory clean with a system call as well).
pub fn growth_floor() -> System {
    floor("floor: growth, writes and reset, nothing shared", Reset::Keep)
}

/// Not an allocator: what a tenant costs in a mapping of each thread's own when nothing is kept
/// for the next: the growth, the tenant's writes into pages faulted in afresh, one decommit of
/// everything it could reach (`madvise(MADV_DONTNEED)`, as Wasmtime's default pool does, without
/// the instantiation), and the undoing of the growth. Where each tenant writes pages the next
/// ones will not (more than a slot may keep), every write takes a page fault whatever
/// allocates the memory, and this is the floor.
pub fn fresh_floor() -> System {
    floor(
        "floor: fresh pages and one decommit, nothing shared",
        Reset::Fresh,
    )
}

/// How a floor gives its mapping back for the next tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reset {
    /// Keep the written pages: a `memset` of them (after a scan of what was accessible, for a
    /// tenant that grew).
    Keep,
    /// Decommit everything the tenant could reach.
    Fresh,
}

fn floor(name: &'static str, reset: Reset) -> System {
    System {
        name,
        prepare: Box::new(move |workload: &Workload| -> Result<Cycles> {
            let page = 65536usize;
            let sys_page = berth_core::sys::page_size();
            // Per module: its tenant, the bytes accessible before and after its growth, and
            // (for a tenant that does not grow) the pages each cycle of the sequence leaves alone
            // among those its other cycles write.
            let shapes = workload
                .modules
                .iter()
                .map(|m| {
                    let tenant = m.tenant.clone();
                    let end = tenant.all_runs().map(|w| w.0 + w.1).max().unwrap_or(0);
                    let grown = usize::try_from(tenant.grow).context("growth")? * page;
                    let initial = end
                        .div_ceil(page)
                        .saturating_mul(page)
                        .saturating_sub(grown)
                        .max(page);
                    let unwritten = if grown == 0 {
                        unwritten(&tenant, sys_page)
                    } else {
                        Vec::new()
                    };
                    Ok((tenant, initial, grown, unwritten))
                })
                .collect::<Result<Vec<_>>>()?;
            let shapes = Arc::new(shapes);
            let buffer = buffer(workload);
            Ok(Box::new(move |thread| {
                let (shapes, buffer) = (shapes.clone(), buffer.clone());
                let mappings: Vec<Mapping> = shapes
                    .iter()
                    .map(|(_, initial, grown, _)| Mapping::new(initial + grown, *initial))
                    .collect();
                let mut next = start(thread, shapes.len());
                let mut cycle = 0;
                let page_map = berth_core::sys::page_map();
                let host_page = berth_core::sys::page_size();
                let mut written = Vec::with_capacity(64);
                Box::new(move || {
                    let (tenant, initial, grown, unwritten) = &shapes[next];
                    let (initial, grown) = (*initial, *grown);
                    let base = mappings[next].base();
                    next = (next + 1) % shapes.len();
                    cycle += 1;
                    let grow = base.wrapping_add(initial);
                    if grown > 0 {
                        // SAFETY: `initial` and `grown` are multiples of 64 KiB, so the range
                        // is page-aligned, inside the mapping `Mapping::new` reserved for this
                        // cycle alone, and nothing refers into it.
                        unsafe { berth_core::sys::make_accessible(nonnull(grow), grown) }?;
                    }
                    for (offset, n) in tenant.runs(cycle) {
                        if offset + n <= initial + grown {
                            // SAFETY: `offset + n` is within `initial + grown` (checked), all
                            // readable and writable now, of the mapping this cycle alone uses; the
                            // buffer, a distinct allocation, holds the longest write.
                            unsafe {
                                base.add(offset)
                                    .copy_from_nonoverlapping(buffer.get(n).as_ptr(), n)
                            };
                        }
                    }
                    let accessible = initial + grown;
                    if reset == Reset::Fresh {
                        // SAFETY: `0..accessible` (a multiple of 64 KiB) starts the private
                        // mapping `Mapping::new` made with `reserve` for this cycle alone, and no
                        // Rust reference points into it.
                        unsafe { berth_core::sys::decommit(nonnull(base), accessible) }?;
                    } else if grown == 0 {
                        // The pages the tenant wrote, which it knows here, zeroed: what any
                        // reset that keeps them resident does at least.
                        for (offset, n) in tenant.runs(cycle) {
                            let start = offset / host_page * host_page;
                            let end = (offset + n)
                                .div_ceil(host_page)
                                .saturating_mul(host_page)
                                .min(accessible);
                            if start < end {
                                // SAFETY: `start < end <= accessible` (checked, `end` clipped),
                                // so the range lies in `0..accessible`, all readable and writable,
                                // of the private mapping `Mapping::new` made for this cycle alone,
                                // and no Rust reference points into it.
                                unsafe { base.add(start).write_bytes(0, end - start) };
                            }
                        }
                        // The pages other tenants write and this one left alone: a reset that
                        // keeps them resident for those tenants must make sure they hold zeros.
                        // Reading them is the cheapest way: the kernel tells which pages were
                        // written only of pages write-protected beforehand, and protecting them
                        // again costs more than the read.
                        if !unwritten.is_empty() {
                            for range in &unwritten[cycle % unwritten.len()] {
                                if range.end > accessible {
                                    continue;
                                }
                                // SAFETY: `range` lies in `0..accessible` (checked), readable, of
                                // the private mapping `Mapping::new` made for this cycle alone,
                                // and nothing writes into it while the slice lives.
                                let bytes =
                                    unsafe { std::slice::from_raw_parts(base.add(range.start), range.len()) };
                                anyhow::ensure!(all_zero(bytes), "a kept page was not reset");
                            }
                        }
                    } else {
                        written.clear();
                        match page_map {
                            Some(map) => map.written(nonnull(base), accessible, &mut written)?,
                            // Without the scan, every accessible byte may have been written.
                            None => written.push(0..accessible),
                        }
                        for range in &written {
                            // SAFETY: the scan reports runs inside `0..accessible`, all readable
                            // and writable now, of the mapping this cycle alone uses.
                            unsafe { base.add(range.start).write_bytes(0, range.len()) };
                        }
                    }
                    if grown > 0 {
                        // SAFETY: `initial..initial + grown` (multiples of 64 KiB) lies inside
                        // the private mapping `Mapping::new` made with `reserve` for this cycle
                        // alone, and no Rust reference points into it.
                        unsafe { berth_core::sys::make_inaccessible(nonnull(grow), grown) }?;
                    }
                    Ok(())
                })
            }))
        }),
    }
}

/// A page that at least one tenant in this many writes counts as kept in the growth floor: a
/// reset reads a kept page's 4 KiB for about a fortieth of what a page fault costs, so keeping
/// a page written that often costs its tenants less than giving it back (Berth's pool keeps
/// pages by the same measure).
const KEPT_EVERY: usize = 40;

/// For each tenant of `tenant`'s sequence, the host pages that at least one tenant in
/// [`KEPT_EVERY`] of the sequence writes and it does not, as ranges (empty when there are none).
fn unwritten(tenant: &Tenant, page: usize) -> Vec<Vec<Range<usize>>> {
    let cycles = tenant.varying.len();
    let written = |cycle: usize| -> BTreeSet<usize> {
        tenant
            .runs(cycle)
            .filter(|&(_, n)| n > 0)
            .flat_map(|(offset, n)| offset / page..(offset + n).div_ceil(page))
            .collect()
    };
    let mut counts = BTreeMap::<usize, usize>::new();
    for cycle in 0..cycles {
        for at in written(cycle) {
            *counts.entry(at).or_default() += 1;
        }
    }
    let kept: Vec<usize> = counts
        .into_iter()
        .filter(|&(_, n)| n * KEPT_EVERY >= cycles)
        .map(|(at, _)| at)
        .collect();
    let each: Vec<Vec<Range<usize>>> = (0..cycles)
        .map(|cycle| {
            let written = written(cycle);
            let mut ranges: Vec<Range<usize>> = Vec::new();
            for at in kept.iter().filter(|at| !written.contains(at)) {
                match ranges.last_mut() {
                    Some(last) if last.end == at * page => last.end += page,
                    _ => ranges.push(at * page..(at + 1) * page),
                }
            }
            ranges
        })
        .collect();
    if each.iter().all(Vec::is_empty) {
        Vec::new()
    } else {
        each
    }
}

/// Whether `bytes` are all zero, read a page at a time.
fn all_zero(bytes: &[u8]) -> bool {
    bytes.chunks(4096).all(|page| {
        let (words, rest) = page.as_chunks::<8>();
        words.iter().fold(0, |acc, word| acc | u64::from_ne_bytes(*word)) == 0 && rest.iter().all(|&b| b == 0)
    })
}

fn nonnull(ptr: *mut u8) -> std::ptr::NonNull<u8> {
    std::ptr::NonNull::new(ptr).expect("a mapping is never at address 0")
}

/// One thread's mapping for a floor, unmapped when dropped. Holds its address (with
/// its provenance exposed), so that a cycle owning it can move to its thread.
struct Mapping {
    address: usize,
    len: usize,
}

impl Mapping {
    fn new(len: usize, accessible: usize) -> Mapping {
        let base = berth_core::sys::reserve(len).expect("reserve");
        // SAFETY: `accessible` (a multiple of 64 KiB, at most `len`) starts the fresh mapping
        // `reserve` just made, which nothing else knows of.
        unsafe { berth_core::sys::make_accessible(base, accessible) }.expect("mprotect");
        Mapping {
            address: base.as_ptr().expose_provenance(),
            len,
        }
    }

    fn base(&self) -> *mut u8 {
        std::ptr::with_exposed_provenance_mut(self.address)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the whole mapping `new` reserved, owned by this value alone; its cycle, the
        // only user, is gone, so nothing refers into it.
        let _ = unsafe { berth_core::sys::unmap(nonnull(self.base()), self.len) };
    }
}
