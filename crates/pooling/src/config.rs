//! The pool's knobs, named as a Wasmtime user knows them.

/// How large the pools are and how slots are reset. Read the fields; set them with the
/// same-named setters, which chain.
///
/// The defaults reserve, with the engine's default tunables (4 GiB reservation and 2 GiB
/// guard per memory), 1000 memory slots of 6 GiB: about 6 TiB of address space, under 5% of a
/// 47-bit (128 TiB) user address space, plus 1000 table slots of 20 000 words (about 156 MiB).
/// Nothing is resident until used; afterwards idle slots keep at most 100 MiB of memory pages
/// together (only pages tenants wrote, at most 4 MiB a slot) and 16 KiB per used table slot. [`PoolLayout`](crate::PoolLayout) computes the cost of a
/// configuration before it is built.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolingConfig {
    /// Instances live at once, at most. Default 1000. Costs nothing up front: instances are
    /// counted, their vmctx blocks come from the heap.
    pub total_core_instances: u32,
    /// Memory slots in the pool. Default 1000. Each costs one slot of address space:
    /// `max(max_memory_size, memory_reservation) + memory_guard_size`.
    pub total_memories: u32,
    /// Table slots in the pool. Default 1000. Each costs `table_elements` words of address
    /// space, rounded up to a page.
    pub total_tables: u32,
    /// Bytes a pooled memory may grow to: a whole number of host pages (a pool with any other
    /// value is an error naming the two nearest). Default 4 GiB. A module whose memory starts
    /// larger is rejected at load; growth past it returns -1.
    pub max_memory_size: usize,
    /// Elements a pooled table may grow to. Default 20 000.
    pub table_elements: usize,
    /// Defined memories one module may have. Default 1.
    pub max_memories_per_module: u32,
    /// Defined tables one module may have. Default 1.
    pub max_tables_per_module: u32,
    /// Bytes an instance block (the `Instance` plus its vmctx) may take. Default 1 MiB. A
    /// module over it is rejected at load, with the vmctx's region breakdown.
    pub max_core_instance_size: usize,
    /// Idle slots that keep their last tenant's reset state (resident pages, the module's
    /// accessible size, its image mapped) for a quick reuse by the same module. Default 1000,
    /// for the whole pool (every slot of the default pool): each shard may keep its share, and
    /// more while the others leave theirs unused. Past it, the least recently used idle slot
    /// gives its pages back to the kernel. Slots being reset count as idle; and while the idle
    /// slots and the slots held by tenants (which turn idle when their tenants leave) reach it,
    /// a module with no warm slot of its own takes another module's least recently used one
    /// rather than a fresh slot. What idle slots keep resident is bounded by
    /// `max_unused_warm_bytes` as well: a warm slot whose tenants wrote nothing costs address
    /// space only, which the pool reserved anyway.
    pub max_unused_warm_slots: u32,
    /// Bytes of memory pages the idle slots keep resident, together, at most. Default 100 MiB.
    /// A slot that turns idle with the idle slots over it has the pool's least recently used
    /// idle slots give their pages back until they are under it again. Each slot keeps at most
    /// `linear_memory_keep_resident` bytes, so idle resident memory stays under the smaller of
    /// this and `max_unused_warm_slots × linear_memory_keep_resident`.
    pub max_unused_warm_bytes: usize,
    /// Deallocations (of an instance's memories and tables) whose slots' ranges a shard collects
    /// before giving them back to the kernel in one system call (`process_madvise`, one
    /// `madvise` each on kernels before 6.13), or fewer once three or more of them leave 8
    /// ranges around pages their slots keep, or 16 ranges of any kind. Default 8; 1 decommits
    /// at once. Only ranges a reset gives back without
    /// knowing them written are batched (they are usually empty), but for those of a slot that
    /// keeps 128 KiB or more, which is then its module's next slot while its pages are still in
    /// the cache; pages a reset found written
    /// are given back at once, by the deallocation that left them, unless another thread is
    /// decommitting at that moment (then they wait in the queue too, up to four batches). A slot
    /// with pages left to decommit is not reused before its batch runs: its module's next
    /// tenant runs the queue early, and an exhausted pool runs every queue and retries.
    /// Batching saves a system call and, with other threads running, a TLB shootdown per reset;
    /// keep it well below `max_unused_warm_slots`, or held slots push warm ones out.
    pub decommit_batch_size: usize,
    /// Bytes of each memory slot kept resident between tenants: the pages tenants write,
    /// wherever they lie (in up to 64 runs), are reset in place (zeroed, or the image's bytes
    /// copied back) instead of given back to the kernel, so the next tenant writes them without
    /// a page fault. Default 4 MiB: a slot keeps only pages its tenants keep writing, so the
    /// bound costs nothing for tenants that write little, and a tenant whose working set is
    /// larger than Wasmtime users' usual 1 MiB resets it with `memset`s (about 20 ns a KiB here)
    /// rather than page faults (300 to 650 ns a KiB). Costs up to this much resident memory per
    /// warm slot (all slots together stay under `max_unused_warm_bytes`), and a read of the
    /// kept pages per reset; pages a tenant writes past it are given back. Rounded up to whole
    /// host pages.
    pub linear_memory_keep_resident: usize,
    /// Whether resets ask the kernel which pages a tenant wrote (`PAGEMAP_SCAN`, Linux 6.7+)
    /// and touch only those. Default `true` (used when the kernel has it). Without it, a memory
    /// slot's reset reads the first 64 KiB (at most `linear_memory_keep_resident`) to find the
    /// written pages and decommits all the rest, and a table slot's zeroes everything up to
    /// `table_keep_resident`.
    pub pagemap_scan: bool,
    /// Bytes of each table slot kept resident across tenants and reset with `memset`; what a
    /// tenant wrote past them is given back with `madvise`. Default 1 MiB (131 072 elements,
    /// more than a default slot's 20 000): every page a table's tenants write stays resident,
    /// the zeroing touches only the pages the kernel does not prove clean (past the first
    /// 128 KiB, with `pagemap_scan`), and tables initialized at every instantiation fault in
    /// nothing. Costs up to this much resident memory per table slot that has been used (at
    /// most its `table_elements` words). Rounded up to whole host pages.
    pub table_keep_resident: usize,
}

impl Default for PoolingConfig {
    fn default() -> Self {
        PoolingConfig {
            total_core_instances: 1000,
            total_memories: 1000,
            total_tables: 1000,
            max_memory_size: 4 << 30,
            table_elements: 20_000,
            max_memories_per_module: 1,
            max_tables_per_module: 1,
            max_core_instance_size: 1 << 20,
            max_unused_warm_slots: 1000,
            max_unused_warm_bytes: 100 << 20,
            decommit_batch_size: 8,
            linear_memory_keep_resident: 4 << 20,
            table_keep_resident: 1 << 20,
            pagemap_scan: true,
        }
    }
}

macro_rules! setters {
    ($($name:ident: $ty:ty;)*) => {
        impl PoolingConfig {
            $(
                #[doc = concat!("Sets [`", stringify!($name), "`](PoolingConfig::", stringify!($name), ").")]
                pub fn $name(&mut self, value: $ty) -> &mut Self {
                    self.$name = value;
                    self
                }
            )*
        }
    };
}

setters! {
    total_core_instances: u32;
    total_memories: u32;
    total_tables: u32;
    max_memory_size: usize;
    table_elements: usize;
    max_memories_per_module: u32;
    max_tables_per_module: u32;
    max_core_instance_size: usize;
    max_unused_warm_slots: u32;
    max_unused_warm_bytes: usize;
    decommit_batch_size: usize;
    linear_memory_keep_resident: usize;
    table_keep_resident: usize;
    pagemap_scan: bool;
}

impl PoolingConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }
}
