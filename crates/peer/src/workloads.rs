//! The modules both systems instantiate, as WebAssembly text, and what each tenant does.

use std::fmt::Write;

/// What a tenant does between instantiation and drop.
#[derive(Debug, Clone, Default)]
pub struct Tenant {
    /// Pages (64 KiB) it grows memory 0 by first.
    pub grow: u64,
    /// Then (offset, length) runs it writes into memory 0 (exported as `memory`).
    pub writes: Vec<(usize, usize)>,
    /// Runs that change from one tenant to the next: a thread's n-th cycle also writes
    /// `varying[n % varying.len()]` (nothing if empty), the same sequence on every system.
    pub varying: Vec<Vec<(usize, usize)>>,
}

impl Tenant {
    /// A tenant that does nothing.
    pub fn idle() -> Tenant {
        Tenant::default()
    }

    /// The runs the tenant of a thread's `cycle`-th cycle writes.
    pub fn runs(&self, cycle: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let varying = match self.varying.len() {
            0 => &[][..],
            n => &self.varying[cycle % n][..],
        };
        self.writes.iter().chain(varying).copied()
    }

    /// Every run any of its tenants writes.
    pub fn all_runs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.writes.iter().chain(self.varying.iter().flatten()).copied()
    }

    /// Whether its tenants touch memory 0 at all.
    pub fn uses_memory(&self) -> bool {
        self.grow > 0 || self.all_runs().next().is_some()
    }
}

/// The bytes tenants write, starting on a page boundary. Memories are page-aligned, and glibc's
/// `memcpy` on this machine's AMD processor takes 17 times as long (22.5 against 1.3 µs for
/// 64 KiB) when the source lies 16 bytes below the destination's offset in its page: a buffer
/// wherever the heap put it made one system's writes slow, by chance of where its copy landed.
#[derive(Debug)]
pub struct Source {
    bytes: Vec<u8>,
    start: usize,
}

impl Source {
    const ALIGN: usize = 4096;

    /// `len` bytes of `0xA5`.
    pub fn new(len: usize) -> Source {
        let bytes = vec![0xA5u8; len + Source::ALIGN];
        let start = bytes.as_ptr().align_offset(Source::ALIGN).min(Source::ALIGN);
        Source { bytes, start }
    }

    /// The first `len` bytes.
    pub fn get(&self, len: usize) -> &[u8] {
        &self.bytes[self.start..self.start + len]
    }
}

/// One module of a workload and its tenants' behaviour.
#[derive(Debug, Clone)]
pub struct Module {
    pub wat: String,
    pub tenant: Tenant,
}

/// One benchmarked workload: its modules are instantiated in turn, one per cycle.
pub struct Workload {
    /// Short name for the table.
    pub name: &'static str,
    /// What it is, for the docs.
    pub about: String,
    pub modules: Vec<Module>,
}

impl Workload {
    fn one(name: &'static str, about: &str, wat: String, tenant: Tenant) -> Workload {
        Workload {
            name,
            about: about.into(),
            modules: vec![Module { wat, tenant }],
        }
    }
}

fn escaped(bytes: impl Iterator<Item = u8>) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = Vec::new();
    for byte in bytes {
        text.extend_from_slice(&[b'\\', HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 15)]]);
    }
    String::from_utf8(text).unwrap_or_default()
}

/// `len` bytes of data that is not zero, varied by `seed`.
fn data(len: usize, seed: u32) -> String {
    escaped((0..len as u32).map(|i| (i.wrapping_mul(7).wrapping_add(seed) % 251) as u8 | 1))
}

const KIB: usize = 1024;
const PAGE: usize = 64 * KIB;

/// `count` sets of `runs` runs of `len` bytes each, at 4 KiB-aligned offsets drawn from the
/// `span` bytes after `from` by a fixed generator: where tenants that each write different
/// places (a hash table, a collected heap) write.
fn wandering(
    count: usize,
    runs: usize,
    len: usize,
    from: usize,
    span: usize,
    seed: u64,
) -> Vec<Vec<(usize, usize)>> {
    let mut places = draws(seed, ((span - len) / (4 * KIB)) as u64);
    (0..count)
        .map(|_| {
            (&mut places)
                .take(runs)
                .map(|slot| (from + slot as usize * 4 * KIB, len))
                .collect()
        })
        .collect()
}

/// Numbers below `below`, the same sequence on every run (a linear congruential generator).
fn draws(seed: u64, below: u64) -> impl Iterator<Item = u64> {
    let mut state = seed;
    std::iter::repeat_with(move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % below
    })
}

/// A module shaped like a compiled program: a memory of `pages` with `low` bytes of data near
/// its start and `high` bytes near its top, a table of `elements` filled by an element
/// segment, `globals` mutable globals, and `funcs` functions.
fn program(pages: usize, low: usize, high: usize, elements: usize, globals: usize, seed: u32) -> String {
    let funcs = 8;
    let mut wat = format!("(module (memory (export \"memory\") {pages})\n");
    for f in 0..funcs {
        let _ = writeln!(wat, "(func $f{f} (result i32) i32.const {f})");
    }
    let _ = writeln!(wat, "(table {elements} funcref)");
    let names: String = (0..elements).map(|i| format!("$f{} ", i % funcs)).collect();
    let _ = writeln!(wat, "(elem (i32.const 0) func {names})");
    for g in 0..globals {
        let _ = writeln!(wat, "(global (mut i64) (i64.const {g}))");
    }
    let _ = writeln!(wat, "(data (i32.const 1024) \"{}\")", data(low, seed));
    let top = pages * PAGE - high - 4 * KIB;
    let _ = writeln!(wat, "(data (i32.const {top}) \"{}\")", data(high, seed + 1));
    wat.push(')');
    wat
}

/// A small module, different for each `seed`: one page with a little data, a small table.
fn small(seed: u32) -> String {
    format!(
        "(module (memory 1) (func $f) (table 8 funcref) (elem (i32.const 0) func $f $f) (data (i32.const {}) \"{}\"))",
        64 * (seed % 512),
        data(48 + (seed as usize % 32), seed)
    )
}

/// The workloads of the comparison.
pub fn all() -> Vec<Workload> {
    let sparse: String = (0..=16u32)
        .map(|i| {
            format!(
                "(data (i32.const {}) \"{}\")\n",
                (i * 65536).min(1048576 - 16),
                escaped((0..16).map(|b| b + 1))
            )
        })
        .collect();
    let elems = "$f ".repeat(1000);
    let scattered = |runs: &[(usize, usize)]| Tenant {
        grow: 0,
        writes: runs.to_vec(),
        varying: Vec::new(),
    };
    // Grows by `grow` pages and writes `each` bytes at the start of every page it then has.
    let growing = |initial: u64, grow: u64, each: usize| Tenant {
        grow,
        writes: (0..(initial + grow) as usize).map(|p| (p * PAGE, each)).collect(),
        varying: Vec::new(),
    };
    // A heap used by each tenant as far as its request needs: mostly a little, now and then
    // much more (251 requests in turn, each drawn from 13 sizes of 16 KiB to 768 KiB, 111 KiB
    // on average; the sequence is longer than any of the pools' counts of resets).
    let heap_sizes = [16, 16, 16, 32, 16, 64, 16, 32, 256, 16, 16, 64, 768];
    let heap = Tenant {
        grow: 0,
        writes: vec![(1024 * KIB - 16 * KIB, 16 * KIB)],
        varying: draws(5, heap_sizes.len() as u64)
            .take(251)
            .map(|size| vec![(1024 * KIB, heap_sizes[size as usize] * KIB)])
            .collect(),
    };
    let program_1m = program(16, 4 * KIB, 100 * KIB, 300, 10, 1);
    let program_2m = program(32, 2 * KIB, 160 * KIB, 500, 12, 2);
    let image_4m = format!(
        "(module (memory (export \"memory\") 256) (data (i32.const 0) \"{}\"))",
        data(4 << 20, 3)
    );
    let image_1m = format!(
        "(module (memory (export \"memory\") 128) (data (i32.const {}) \"{}\"))",
        2 << 20,
        data(1 << 20, 4)
    );
    let many = |n: u32| Workload {
        name: if n == 64 { "many-64" } else { "many-150" },
        about: format!(
            "{n} small distinct modules (a page with a little data, a table of 8), instantiated in turn"
        ),
        modules: (0..n)
            .map(|i| Module {
                wat: small(i),
                tenant: Tenant::idle(),
            })
            .collect(),
    };
    let program_1m_tenant = scattered(&[(64 * KIB, 4 * KIB), (400 * KIB, 4 * KIB), (960 * KIB, 4 * KIB)]);
    let grow_15 = growing(1, 15, KIB);
    let image_1m_tenant = scattered(&[(2 << 20, 4 * KIB), (2560 * KIB, 8 * KIB), (3 << 20, 4 * KIB)]);
    vec![
        Workload::one(
            "untouched",
            "one 64 KiB memory, not written (an idle tenant)",
            "(module (memory 1))".into(),
            Tenant::idle(),
        ),
        Workload::one(
            "dirty-64k",
            "one 64 KiB memory, all 64 KiB written before deallocation",
            "(module (memory (export \"memory\") 1))".into(),
            scattered(&[(0, PAGE)]),
        ),
        Workload::one(
            "data-64k",
            "one memory initialized by a 64 KiB data segment",
            format!("(module (memory 1) (data (i32.const 0) \"{}\"))", data(PAGE, 0)),
            Tenant::idle(),
        ),
        Workload::one(
            "sparse-1m",
            "a 2 MiB memory with 17 small data segments spread over its first 1 MiB",
            format!("(module (memory 32)\n{sparse})"),
            Tenant::idle(),
        ),
        Workload::one(
            "table-1000",
            "a 1000-element table filled by an element segment",
            format!("(module (func $f) (table 1000 funcref) (elem (i32.const 0) func {elems}))"),
            Tenant::idle(),
        ),
        Workload::one(
            "table-10k",
            "a 10 000-element table, its first 5 000 elements filled by an element segment",
            format!("(module (func $f) (table 10000 funcref) (elem (i32.const 0) func {}))", "$f ".repeat(5000)),
            Tenant::idle(),
        ),
        Workload::one(
            "multi-4x4",
            "four memories and four tables",
            "(module (memory 1) (memory 1) (memory 1) (memory 1) (table 10 funcref) (table 10 funcref) (table 10 funcref) (table 10 funcref))".into(),
            Tenant::idle(),
        ),
        Workload::one(
            "memory-64m",
            "one 64 MiB memory, not written",
            "(module (memory 1024))".into(),
            Tenant::idle(),
        ),
        Workload::one(
            "program-1m",
            "a compiled program's shape: a 1 MiB memory with 4 KiB of data low and 100 KiB near its top, a 300-entry table filled by an element segment, 10 mutable globals; the tenant writes three scattered 4 KiB runs (one inside the high data)",
            program_1m.clone(),
            program_1m_tenant.clone(),
        ),
        Workload::one(
            "program-2m",
            "the same shape at 2 MiB: 2 KiB of data low, 160 KiB near the top, a 500-entry table, 12 globals; the tenant writes four runs of 2 to 8 KiB (one inside the high data)",
            program_2m,
            scattered(&[(16 * KIB, 8 * KIB), (700 * KIB, 4 * KIB), (1536 * KIB, 4 * KIB), (1950 * KIB, 2 * KIB)]),
        ),
        Workload::one(
            "program-4m",
            "the same shape at 4 MiB: 8 KiB of data low, 256 KiB near the top, an 800-entry table, 16 globals; the tenant writes five runs of 4 to 12 KiB spread over the memory (one inside the high data)",
            program(64, 8 * KIB, 256 * KIB, 800, 16, 7),
            scattered(&[
                (32 * KIB, 8 * KIB),
                (900 * KIB, 4 * KIB),
                (2 << 20, 4 * KIB),
                (3 << 20, 12 * KIB),
                (3996 * KIB, 4 * KIB),
            ]),
        ),
        Workload::one(
            "grow-15",
            "a one-page memory the tenant grows by 15 pages, writing 1 KiB into each of its 16 pages",
            "(module (memory (export \"memory\") 1 64))".into(),
            grow_15.clone(),
        ),
        Workload::one(
            "grow-40",
            "a two-page memory the tenant grows by 40 pages, writing 4 KiB into each of its 42 pages",
            "(module (memory (export \"memory\") 2 64))".into(),
            growing(2, 40, 4 * KIB),
        ),
        Workload::one(
            "image-4m",
            "a 16 MiB memory with a dense 4 MiB data image; the tenant writes 64 KiB inside the image",
            image_4m,
            scattered(&[(1 << 20, PAGE)]),
        ),
        Workload::one(
            "image-1m",
            "an 8 MiB memory with a 1 MiB image at 2 MiB; the tenant writes three runs of 4 to 8 KiB inside it",
            image_1m.clone(),
            image_1m_tenant.clone(),
        ),
        Workload::one(
            "image-8m",
            "a 32 MiB memory with a dense 8 MiB data image; the tenant writes 32 KiB inside the image",
            format!(
                "(module (memory (export \"memory\") 512) (data (i32.const 0) \"{}\"))",
                data(8 << 20, 22)
            ),
            scattered(&[(3 << 20, 32 * KIB)]),
        ),
        Workload::one(
            "scatter-8m",
            "an 8 MiB memory, no data; the tenant writes five runs of 4 to 8 KiB, one in each of its 2 MiB quarters and one more",
            "(module (memory (export \"memory\") 128))".into(),
            scattered(&[
                (0, 4 * KIB),
                (1 << 20, 4 * KIB),
                (3 << 20, 8 * KIB),
                (5 << 20, 4 * KIB),
                (7 << 20, 4 * KIB),
            ]),
        ),
        Workload::one(
            "heap-4m",
            "a 4 MiB memory with 8 KiB of data low; each tenant writes 16 KiB of stack below 1 MiB and a heap from 1 MiB as large as its request needs: 16 KiB to 768 KiB, mostly small (251 requests in turn)",
            format!("(module (memory (export \"memory\") 64) (data (i32.const 4096) \"{}\"))", data(8 * KIB, 5)),
            heap,
        ),
        Workload::one(
            "working-2m",
            "a 4 MiB memory with 16 KiB of data low; each tenant writes 64 KiB of stack below 1 MiB and 2 MiB of heap from 1 MiB: a working set larger than the 1 MiB Wasmtime's tuned pool keeps",
            format!("(module (memory (export \"memory\") 64) (data (i32.const 4096) \"{}\"))", data(16 * KIB, 23)),
            scattered(&[(1024 * KIB - 64 * KIB, 64 * KIB), (1024 * KIB, 2048 * KIB)]),
        ),
        Workload::one(
            "wander-16m",
            "a 16 MiB memory; each tenant writes eight 4 KiB runs at places of its own (257 sets in turn), like a hash table or a collected heap",
            "(module (memory (export \"memory\") 256))".into(),
            Tenant {
                grow: 0,
                writes: Vec::new(),
                varying: wandering(257, 8, 4 * KIB, 0, 16 << 20, 7),
            },
        ),
        Workload::one(
            "wander-1m",
            "a 1 MiB memory with 64 KiB of data; each tenant writes 4 KiB at two fixed places and four 2 KiB runs at places of its own (257 sets in turn)",
            format!("(module (memory (export \"memory\") 16) (data (i32.const 65536) \"{}\"))", data(PAGE, 6)),
            Tenant {
                grow: 0,
                writes: vec![(0, 4 * KIB), (1020 * KIB, 4 * KIB)],
                varying: wandering(257, 4, 2 * KIB, 4 * KIB, 1016 * KIB, 11),
            },
        ),
        many(64),
        many(150),
        Workload {
            name: "mixed",
            about: "five shapes in turn: program-1m, grow-15, image-1m, untouched, a small module".into(),
            modules: vec![
                Module {
                    wat: program_1m,
                    tenant: program_1m_tenant,
                },
                Module {
                    wat: "(module (memory (export \"memory\") 1 64))".into(),
                    tenant: grow_15,
                },
                Module {
                    wat: image_1m,
                    tenant: image_1m_tenant,
                },
                Module {
                    wat: "(module (memory 1))".into(),
                    tenant: Tenant::idle(),
                },
                Module {
                    wat: small(999),
                    tenant: Tenant::idle(),
                },
            ],
        },
    ]
}
