//! The conformance kit proves itself: backends broken on purpose, each in one way a real
//! backend could be, fail `run_all` with a message that says what broke; the same backend
//! without its flaw passes.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use berth_core::{
    AllocatorStats, DefinedMemoryIndex, DefinedTableIndex, HostPtr, InstanceAllocationRequest,
    InstanceAllocatorImpl, LimitExceeded, Memory, MemoryAllocationIndex, MemoryType, Mmap, Module, ModuleId,
    Table, TableAllocationIndex, TableType, Tunables, VMOffsets,
};
use berth_testkit::page_states::{require, swap_works};
use berth_testkit::{Capabilities, run_all};

/// What a [`Slab`] gets wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    /// Nothing.
    None,
    /// Its reset skips the first byte of a memory.
    LeavesAByte,
    /// Its reset zeroes a memory's initial size and only protects what the tenant grew.
    ForgetsTheGrownPart,
    /// Its slots are half a reservation apart, so live memories' reservations overlap.
    Overlaps,
    /// It never counts an instance down.
    Miscounts,
    /// Its slots touch each other: no guard after (or before) a memory.
    NoGuard,
    /// Its table reset skips a table's first element.
    LeavesAnElement,
    /// Its reset zeroes only the pages the kernel holds present, as if what is swapped out
    /// were clean.
    SkipsSwappedPages,
}

/// Memories may grow to this in a slab slot (the suite's reservation).
const CAPACITY: usize = 1 << 20;
const GUARD: usize = 64 << 10;
const SLOTS: u32 = 128;
/// Elements a table slot holds.
const ELEMENTS: usize = 1024;

/// A small pooling backend: memory slots in one reservation and table slots in one slab,
/// lowest free slot first, reset by `memset` (and `mprotect` for memories).
struct Slab {
    flaw: Flaw,
    _mapping: Mmap,
    first: NonNull<u8>,
    stride: usize,
    /// Free slots and the bytes accessible in each (what its last reset left).
    free: Mutex<Vec<(u32, usize)>>,
    _tables: Mmap,
    first_table: NonNull<usize>,
    free_tables: Mutex<Vec<u32>>,
    instances: AtomicU64,
    memories: AtomicU64,
    tables: AtomicU64,
}

// SAFETY: `first` points into `_mapping`, which lives as long as the slab; each slot is given
// to one memory at a time through `free`.
unsafe impl Send for Slab {}
// SAFETY: `&Slab` reaches the mapping only through `free` (a `Mutex`) and counts in atomics.
unsafe impl Sync for Slab {}

impl Slab {
    fn new(flaw: Flaw) -> Result<Slab> {
        let (pre_guard, stride) = match flaw {
            Flaw::NoGuard => (0, CAPACITY),
            Flaw::Overlaps => (GUARD, CAPACITY / 2),
            _ => (GUARD, CAPACITY + GUARD),
        };
        let len = pre_guard + (SLOTS as usize - 1) * stride + CAPACITY + GUARD;
        let mut mapping = Mmap::reserve(len)?;
        let first =
            NonNull::new(mapping.as_mut_ptr().wrapping_add(pre_guard)).ok_or_else(|| anyhow!("null"))?;
        let table_bytes = SLOTS as usize * ELEMENTS * size_of::<usize>();
        let mut tables = Mmap::with_accessible(table_bytes, table_bytes)?;
        let first_table = NonNull::new(tables.as_mut_ptr().cast()).ok_or_else(|| anyhow!("null"))?;
        Ok(Slab {
            flaw,
            _mapping: mapping,
            first,
            stride,
            free: Mutex::new((0..SLOTS).rev().map(|slot| (slot, 0)).collect()),
            _tables: tables,
            first_table,
            free_tables: Mutex::new((0..SLOTS).rev().collect()),
            instances: AtomicU64::new(0),
            memories: AtomicU64::new(0),
            tables: AtomicU64::new(0),
        })
    }

    fn base(&self, slot: u32) -> NonNull<u8> {
        // SAFETY: `slot < SLOTS`, so the slot lies inside the mapping (sized for all of them).
        unsafe { self.first.add(slot as usize * self.stride) }
    }

    fn table(&self, slot: u32) -> NonNull<usize> {
        // SAFETY: `slot < SLOTS`, so the slot lies inside the table slab.
        unsafe { self.first_table.add(slot as usize * ELEMENTS) }
    }

    fn take(&self) -> Option<(u32, usize)> {
        let mut free = self.free.lock().unwrap();
        let lowest = free.iter().enumerate().min_by_key(|(_, (slot, _))| *slot)?.0;
        Some(free.swap_remove(lowest))
    }
}

// SAFETY: without a flaw, each slot is given to one memory at a time and reset to zeros, its
// bytes past the initial size made inaccessible, before it is handed out again; tables are
// fresh `Vec`s; counts are balanced. The flaws break exactly what their names say, on purpose.
unsafe impl InstanceAllocatorImpl for Slab {
    fn validate_module_impl(&self, module: &Module, _offsets: &VMOffsets<HostPtr>) -> Result<()> {
        for (_, ty) in module.defined_memories() {
            let bytes = ty.minimum_bytes().unwrap_or(u64::MAX);
            if bytes > CAPACITY as u64 {
                return Err(LimitExceeded::error("max_memory_size", CAPACITY as u64, bytes));
            }
        }
        for (_, ty) in module.defined_tables() {
            if ty.minimum > ELEMENTS as u64 {
                return Err(LimitExceeded::error(
                    "table_elements",
                    ELEMENTS as u64,
                    ty.minimum,
                ));
            }
        }
        Ok(())
    }

    fn increment_core_instance_count(&self) -> Result<()> {
        self.instances.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn decrement_core_instance_count(&self) {
        if self.flaw != Flaw::Miscounts {
            self.instances.fetch_sub(1, Ordering::SeqCst);
        }
    }

    unsafe fn allocate_memory(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &MemoryType,
        index: DefinedMemoryIndex,
    ) -> Result<(MemoryAllocationIndex, Memory)> {
        let (slot, accessible) = self.take().ok_or_else(|| anyhow!("slab exhausted"))?;
        // SAFETY: the slot is ours alone until deallocation, inside the mapping, page-aligned;
        // its first `accessible` bytes are readable and writable (they read as zeros, unless
        // this slab's flaw says otherwise), the rest inaccessible.
        let memory = unsafe {
            Memory::new_static(
                ty,
                self.base(slot),
                CAPACITY,
                accessible,
                request.limiter.as_deref_mut(),
            )
        };
        match memory {
            Ok(mut memory) => {
                if request.tunables.memory_init_cow
                    && let Some(image) = request.module.memory_image(index)?
                {
                    memory.map_image(image)?;
                }
                self.memories.fetch_add(1, Ordering::SeqCst);
                Ok((MemoryAllocationIndex::from_u32(slot), memory))
            }
            Err(error) => {
                self.free.lock().unwrap().push((slot, 0));
                Err(error)
            }
        }
    }

    unsafe fn deallocate_memory(
        &self,
        _index: DefinedMemoryIndex,
        slot: MemoryAllocationIndex,
        memory: Memory,
    ) {
        let accessible = memory.accessible_bytes();
        let page = berth_core::sys::page_size();
        let initial = (memory.ty().minimum_bytes().unwrap_or(0) as usize).next_multiple_of(page);
        let had_image = memory.image().is_some();
        drop(memory);
        let base = self.base(slot.as_u32());
        let zeroed = match self.flaw {
            Flaw::LeavesAByte => 1..accessible,
            Flaw::ForgetsTheGrownPart => 0..initial,
            _ => 0..accessible,
        };
        for start in zeroed.clone().step_by(page) {
            let end = (start / page * page + page).min(zeroed.end);
            if self.flaw == Flaw::SkipsSwappedPages && !present(base, start / page * page, page) {
                continue;
            }
            // SAFETY: the tenant is gone and the slot is not free yet: ours alone; `start..end`
            // lies in its accessible bytes.
            unsafe { base.add(start).write_bytes(0, end - start) };
        }
        if had_image {
            // SAFETY: the tenant is gone and the slot is not free yet: ours alone; the image's
            // private mapping over its first `accessible` bytes is replaced by zeros, and the
            // rest protected again below.
            unsafe { berth_core::sys::replace_with_zeros(base, accessible) }.expect("unmap the image");
        }
        if accessible > initial {
            // SAFETY: the slot is ours alone (tenant gone, not free yet); `initial..accessible` is
            // page-aligned inside it.
            unsafe { berth_core::sys::make_inaccessible(base.add(initial), accessible - initial) }
                .expect("protect");
        }
        self.free
            .lock()
            .unwrap()
            .push((slot.as_u32(), initial.min(accessible)));
        self.memories.fetch_sub(1, Ordering::SeqCst);
    }

    unsafe fn allocate_table(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &TableType,
        _index: DefinedTableIndex,
    ) -> Result<(TableAllocationIndex, Table)> {
        let slot = self
            .free_tables
            .lock()
            .unwrap()
            .pop()
            .ok_or_else(|| anyhow!("no table slot"))?;
        // SAFETY: the slot is ours alone until deallocation, inside the slab (read-write),
        // word-aligned and zeroed (unless this slab's flaw says otherwise).
        let table =
            unsafe { Table::new_static(ty, self.table(slot), ELEMENTS, request.limiter.as_deref_mut()) };
        match table {
            Ok(table) => {
                self.tables.fetch_add(1, Ordering::SeqCst);
                Ok((TableAllocationIndex::from_u32(slot), table))
            }
            Err(error) => {
                self.free_tables.lock().unwrap().push(slot);
                Err(error)
            }
        }
    }

    unsafe fn deallocate_table(&self, _index: DefinedTableIndex, slot: TableAllocationIndex, table: Table) {
        let size = table.size();
        drop(table);
        let skip = usize::from(self.flaw == Flaw::LeavesAnElement).min(size);
        // SAFETY: the tenant is gone and the slot is not free yet: ours alone; its first
        // `size` words lie in the slot.
        unsafe { self.table(slot.as_u32()).add(skip).write_bytes(0, size - skip) };
        self.free_tables.lock().unwrap().push(slot.as_u32());
        self.tables.fetch_sub(1, Ordering::SeqCst);
    }

    fn purge_module(&self, _module: ModuleId) {}

    fn stats(&self) -> AllocatorStats {
        let mut stats = AllocatorStats::default();
        stats.live_instances = self.instances.load(Ordering::SeqCst);
        stats.live_memories = self.memories.load(Ordering::SeqCst);
        stats.live_tables = self.tables.load(Ordering::SeqCst);
        stats
    }
}

/// Whether the kernel holds the page at `offset` from `base` present.
fn present(base: NonNull<u8>, offset: usize, page: usize) -> bool {
    let map = berth_core::sys::page_map().expect("PAGEMAP_SCAN");
    // SAFETY: the offset stays inside the slot.
    let at = unsafe { base.add(offset) };
    map.count(at, page, berth_core::sys::PageState::Present)
        .unwrap_or(0)
        > 0
}

fn caps() -> Capabilities {
    let mut caps = Capabilities::unlimited();
    caps.reuses_slots = true;
    caps.max_memory_bytes = Some(CAPACITY);
    caps.max_table_elements = Some(ELEMENTS);
    caps
}

/// Runs the kit against a slab with `flaw`; the message it failed with, if it did.
fn kit_verdict(flaw: Flaw) -> Option<String> {
    let factory =
        move |_: &Tunables| -> Arc<dyn InstanceAllocatorImpl> { Arc::new(Slab::new(flaw).unwrap()) };
    let result = catch_unwind(AssertUnwindSafe(|| run_all(&factory, caps())));
    result.err().map(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default()
    })
}

fn assert_fails(flaw: Flaw, says: &str) {
    let message = kit_verdict(flaw).unwrap_or_else(|| panic!("the kit passed a slab that {flaw:?}"));
    assert!(
        message.contains(says),
        "the kit failed a slab that {flaw:?}, but its message does not say `{says}`: {message}"
    );
}

#[test]
fn the_slab_without_a_flaw_passes() {
    assert_eq!(kit_verdict(Flaw::None), None);
}

#[test]
fn a_backend_that_leaves_a_byte_of_the_last_tenant_fails() {
    assert_fails(Flaw::LeavesAByte, "a previous tenant's bytes are visible");
}

#[test]
fn a_backend_that_forgets_the_grown_part_fails() {
    assert_fails(Flaw::ForgetsTheGrownPart, "the grown part of memory 0");
}

#[test]
fn a_backend_that_hands_out_overlapping_memories_fails() {
    assert_fails(Flaw::Overlaps, "two live memories overlap");
}

#[test]
fn a_backend_that_miscounts_instances_fails() {
    assert_fails(Flaw::Miscounts, "the backend's counts are wrong");
}

#[test]
fn a_backend_without_a_guard_fails() {
    assert_fails(Flaw::NoGuard, "guard after the memory did not fault");
}

#[test]
fn a_backend_that_leaves_a_table_element_of_the_last_tenant_fails() {
    assert_fails(Flaw::LeavesAnElement, "a previous tenant's elements are visible");
}

#[test]
fn a_backend_that_skips_swapped_out_pages_fails() {
    if !require(
        "a_backend_that_skips_swapped_out_pages_fails",
        "swap",
        swap_works(),
    ) {
        return;
    }
    assert_fails(Flaw::SkipsSwappedPages, "a previous tenant's bytes are visible");
    // Found by the case that pushes pages to swap, not by chance elsewhere.
    assert_fails(Flaw::SkipsSwappedPages, "in_every_page_state");
}
