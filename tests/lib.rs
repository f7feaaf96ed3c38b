//! Helpers shared by Berth's cross-backend tests: running a fault in a child process, and an
//! allocator wrapper that fails on demand.

#![allow(clippy::cast_possible_truncation)] // Test models index with `as usize` on 64-bit hosts.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use anyhow::{Result, bail};
use berth_core::{
    AllocatorStats, DefinedMemoryIndex, DefinedTableIndex, HostPtr, InstanceAllocationRequest,
    InstanceAllocatorImpl, Memory, MemoryAllocationIndex, MemoryType, Module, ModuleId, Table,
    TableAllocationIndex, TableType, VMOffsets,
};

const CHILD_VAR: &str = "BERTH_FAULT_CHILD";
const CHILD_DONE: &str = "berth-child-body-finished";

/// How a child process ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ChildEnd {
    /// It ran `body` to the end (checked by a marker it prints, so a child that did not find
    /// the test does not count).
    Finished,
    /// It was killed by SIGSEGV or SIGBUS.
    Faulted,
    /// Anything else (a panic, another signal).
    Other(String),
}

/// Runs `body` in a child process (this test binary, re-run with only the calling test, whose
/// full name is its thread's) and tells how the child ended. In the child, `body` runs and the
/// process exits 0 if it returns.
///
/// # Panics
///
/// If called from a thread other than a `#[test]`'s own (the child could not find the test).
pub fn in_child(body: impl FnOnce()) -> ChildEnd {
    let thread = std::thread::current();
    let test_name = thread
        .name()
        .filter(|n| *n != "main")
        .expect("in_child runs from a #[test] on its own thread");
    if std::env::var(CHILD_VAR).as_deref() == Ok(test_name) {
        body();
        println!("{CHILD_DONE}");
        std::process::exit(0);
    }
    let output = Command::new(std::env::current_exe().expect("test binary path"))
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, test_name)
        .output()
        .expect("failed to start the child test process");
    match (output.status.code(), output.status.signal()) {
        (Some(0), _) if String::from_utf8_lossy(&output.stdout).contains(CHILD_DONE) => ChildEnd::Finished,
        (_, Some(libc_sigsegv)) if libc_sigsegv == 11 || libc_sigsegv == 7 => ChildEnd::Faulted,
        _ => ChildEnd::Other(format!(
            "{:?}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )),
    }
}

/// Reads one byte through a raw pointer, so the compiler cannot drop the access.
///
/// # Safety
///
/// `ptr` is readable, or it points into memory Berth made inaccessible (a guard, the part of a
/// reservation past a memory's size, an unmapped reservation) and the call runs inside
/// [`in_child`], where the fault ends only that child process.
pub unsafe fn touch(ptr: *const u8) -> u8 {
    // SAFETY: per the caller, the read either succeeds or faults in a child process that is
    // expected to die; it never reads memory some Rust value owns.
    unsafe { std::ptr::read_volatile(ptr) }
}

/// The address of memory 0 of `instance`: which reservation or slot it got.
pub fn memory_base(instance: &berth_engine::Instance) -> usize {
    instance
        .core()
        .memory(berth_core::DefinedMemoryIndex::from_u32(0))
        .expect("the instance has a memory 0")
        .base() as usize
}

/// Which call a [`FailingAllocator`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailAt {
    /// Never.
    Never,
    /// The k-th `allocate_memory` (0-based, counted over the wrapper's life).
    Memory(usize),
    /// The k-th `allocate_table`.
    Table(usize),
}

/// Wraps a backend, fails one chosen allocation, and counts what is outstanding so a test can
/// see that nothing leaked.
#[derive(Debug)]
pub struct FailingAllocator<A> {
    inner: A,
    fail_at: FailAt,
    memory_calls: AtomicUsize,
    table_calls: AtomicUsize,
    live_memories: AtomicU64,
    live_tables: AtomicU64,
}

impl<A> FailingAllocator<A> {
    /// Wraps `inner`.
    pub fn new(inner: A, fail_at: FailAt) -> Self {
        FailingAllocator {
            inner,
            fail_at,
            memory_calls: AtomicUsize::new(0),
            table_calls: AtomicUsize::new(0),
            live_memories: AtomicU64::new(0),
            live_tables: AtomicU64::new(0),
        }
    }

    /// Memories handed out and not yet taken back.
    pub fn live_memories(&self) -> u64 {
        self.live_memories.load(Ordering::SeqCst)
    }

    /// Tables handed out and not yet taken back.
    pub fn live_tables(&self) -> u64 {
        self.live_tables.load(Ordering::SeqCst)
    }
}

// SAFETY: forwards every call to a backend that keeps the contract; a failure is reported
// before anything is allocated for that call.
unsafe impl<A: InstanceAllocatorImpl> InstanceAllocatorImpl for FailingAllocator<A> {
    fn validate_module_impl(&self, module: &Module, offsets: &VMOffsets<HostPtr>) -> Result<()> {
        self.inner.validate_module_impl(module, offsets)
    }

    fn increment_core_instance_count(&self) -> Result<()> {
        self.inner.increment_core_instance_count()
    }

    fn decrement_core_instance_count(&self) {
        self.inner.decrement_core_instance_count()
    }

    unsafe fn allocate_memory(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &MemoryType,
        memory_index: DefinedMemoryIndex,
    ) -> Result<(MemoryAllocationIndex, Memory)> {
        let call = self.memory_calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_at == FailAt::Memory(call) {
            bail!("injected failure at memory allocation {call}");
        }
        // SAFETY: forwarded with the caller's guarantees.
        let allocated = unsafe { self.inner.allocate_memory(request, ty, memory_index)? };
        self.live_memories.fetch_add(1, Ordering::SeqCst);
        Ok(allocated)
    }

    unsafe fn deallocate_memory(
        &self,
        memory_index: DefinedMemoryIndex,
        allocation_index: MemoryAllocationIndex,
        memory: Memory,
    ) {
        self.live_memories.fetch_sub(1, Ordering::SeqCst);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe {
            self.inner
                .deallocate_memory(memory_index, allocation_index, memory)
        }
    }

    unsafe fn allocate_table(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &TableType,
        table_index: DefinedTableIndex,
    ) -> Result<(TableAllocationIndex, Table)> {
        let call = self.table_calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_at == FailAt::Table(call) {
            bail!("injected failure at table allocation {call}");
        }
        // SAFETY: forwarded with the caller's guarantees.
        let allocated = unsafe { self.inner.allocate_table(request, ty, table_index)? };
        self.live_tables.fetch_add(1, Ordering::SeqCst);
        Ok(allocated)
    }

    unsafe fn deallocate_table(
        &self,
        table_index: DefinedTableIndex,
        allocation_index: TableAllocationIndex,
        table: Table,
    ) {
        self.live_tables.fetch_sub(1, Ordering::SeqCst);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.deallocate_table(table_index, allocation_index, table) }
    }

    fn purge_module(&self, module: ModuleId) {
        self.inner.purge_module(module)
    }

    fn stats(&self) -> AllocatorStats {
        self.inner.stats()
    }

    fn release_idle_memory(&self) -> berth_core::Released {
        self.inner.release_idle_memory()
    }
}

/// A module with one memory of type `ty` and nothing else, unnamed.
pub fn one_memory(ty: berth_core::MemoryType) -> berth_core::Module {
    berth_core::Module::builder()
        .memory(ty)
        .build()
        .expect("a module of one memory is well-formed")
}

/// A module named `name` with one memory of type `ty` and nothing else.
pub fn named_memory(name: &str, ty: berth_core::MemoryType) -> berth_core::Module {
    berth_core::Module::builder()
        .name(name)
        .memory(ty)
        .build()
        .expect("a module of one memory is well-formed")
}
