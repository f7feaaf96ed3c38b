//! The floor: what the operations a cycle cannot avoid cost on this machine, in the same run.

use std::hint::black_box;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};
use berth_core::sys;

use crate::workloads::Source;

const KIB64: usize = 65536;

/// One floor operation and its samples (nanoseconds).
pub struct Floor {
    /// What was measured.
    pub name: &'static str,
    /// Per-operation times, in nanoseconds.
    pub samples: Vec<f64>,
}

fn time(samples: &mut Vec<f64>, f: impl FnOnce()) {
    let started = Instant::now();
    f();
    samples.push(started.elapsed().as_nanos() as f64);
}

/// Measures each floor operation `n` times.
pub fn measure(n: usize) -> Result<Vec<Floor>> {
    let page = sys::page_size();
    let mut reserve = Vec::with_capacity(n);
    let mut madvise = Vec::with_capacity(n);
    let mut refault = Vec::with_capacity(n);
    let mut memset = Vec::with_capacity(n);
    let mut memcpy = Vec::with_capacity(n);
    let source = Source::new(KIB64);
    let mut freelist = Vec::with_capacity(n);
    let mut idle = Vec::with_capacity(n);

    // A 64 KiB region to dirty, decommit and fault again.
    let region = sys::reserve(KIB64).context("reserve")?;
    // SAFETY: our own fresh mapping.
    unsafe { sys::make_accessible(region, KIB64) }?;
    let list = Mutex::new((0..1000u32).collect::<Vec<_>>());
    // A default batch of 64 KiB memories 1 MiB apart, accessible and never written: what the
    // pool gives back for that many idle tenants, in one call.
    let batch = berth_engine::PoolingConfig::default().decommit_batch_size;
    let slots = sys::reserve(batch << 20).context("reserve")?;
    let idle_ranges: Vec<std::ops::Range<usize>> = (0..batch)
        .map(|i| {
            let start = slots.as_ptr().addr() + (i << 20);
            start..start + KIB64
        })
        .collect();
    for i in 0..batch {
        // SAFETY: our own fresh mapping; each range lies inside it.
        unsafe { sys::make_accessible(slots.add(i << 20), KIB64) }?;
    }
    for _ in 0..n {
        time(&mut reserve, || {
            // mmap of a 6 GiB reservation, mprotect of 64 KiB, munmap.
            let len = 6usize << 30;
            let base = sys::reserve(len).expect("reserve");
            // SAFETY: our own fresh mapping.
            unsafe { sys::make_accessible(base, KIB64) }.expect("mprotect");
            // SAFETY: our own mapping, no longer used.
            unsafe { sys::unmap(base, len) }.expect("munmap");
        });
        // SAFETY: the region is ours and accessible; no reference into it is live.
        unsafe { region.as_ptr().write_bytes(0x5A, KIB64) };
        // SAFETY: the region is our own private mapping and no reference into it is live.
        time(&mut madvise, || {
            unsafe { sys::decommit(region, KIB64) }.expect("madvise")
        });
        time(&mut refault, || {
            for offset in (0..KIB64).step_by(page) {
                // SAFETY: inside the accessible region.
                unsafe { region.as_ptr().add(offset).write_volatile(1) };
            }
        });
        time(&mut memset, || {
            // SAFETY: inside the accessible, resident region.
            unsafe { black_box(region.as_ptr()).write_bytes(0, KIB64) };
        });
        time(&mut memcpy, || {
            // SAFETY: inside the accessible, resident region; `source` is a distinct buffer.
            unsafe {
                black_box(region.as_ptr())
                    .copy_from_nonoverlapping(black_box(source.get(KIB64).as_ptr()), KIB64)
            };
        });
        time(&mut idle, || {
            // SAFETY: the ranges are page-aligned, inside our own private mapping, and nothing
            // refers into them.
            unsafe { sys::decommit_all(&idle_ranges) }.expect("process_madvise");
        });
        time(&mut freelist, || {
            let slot = list.lock().expect("lock").pop();
            list.lock().expect("lock").push(black_box(slot.unwrap_or(0)));
        });
    }
    // SAFETY: our own mappings, no longer used.
    unsafe { sys::unmap(region, KIB64) }?;
    // SAFETY: the four-slot mapping is our own, and nothing uses it after this.
    unsafe { sys::unmap(slots, 4 << 20) }?;
    Ok(vec![
        Floor {
            name: "mmap 6 GiB + mprotect 64 KiB + munmap",
            samples: reserve,
        },
        Floor {
            name: "madvise(DONTNEED) of 64 KiB dirty",
            samples: madvise,
        },
        Floor {
            name: "re-fault 16 pages (4 KiB each)",
            samples: refault,
        },
        Floor {
            name: "memset 64 KiB (resident)",
            samples: memset,
        },
        Floor {
            name: "memcpy 64 KiB into resident memory (the tenant's write)",
            samples: memcpy,
        },
        Floor {
            name: "locked free-list pop + push",
            samples: freelist,
        },
        Floor {
            name: "decommit of a default batch (`decommit_batch_size`) of 64 KiB memories never written, in one call (an idle tenant's reset pays its share)",
            samples: idle,
        },
    ])
}
