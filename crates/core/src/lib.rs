//! Berth's core: the instance allocation layer of a WebAssembly runtime.
//!
//! Between "I have a validated module" and "I can run code in an instance" a runtime needs an
//! instance's `VMContext` (a block compiled code reads at fixed offsets), its linear memories
//! (virtual-memory reservations with guard regions) and its tables. This crate holds what every
//! backend shares:
//!
//! - module facts ([`Module`], [`ModuleBuilder`]) and index newtypes ([`MemoryIndex`], ...);
//! - the vmctx layout ([`VMOffsets`]) and the `#[repr(C)]` structures in it;
//! - the instance block ([`InstanceBlock`], [`Instance`], [`InstanceHandle`]);
//! - [`Memory`] and [`Table`], over [`Mmap`] and the [`sys`] module (the only place that makes
//!   system calls);
//! - the two traits: [`InstanceAllocatorImpl`], which a backend implements, and
//!   [`InstanceAllocator`], which a runtime calls and which holds the ordering and rollback
//!   logic once for every backend;
//! - memories on their own, without an instance, from any backend ([`StandaloneMemories`]).
//!
//! What it will not do: compile or run code, parse binaries (that is `berth-wasm`), or choose
//! a backend (that is `berth-engine`). Backends live in their own crates
//! (`berth-on-demand`, `berth-pooling`) or in the embedder's code.

#![deny(missing_docs)]

mod allocator;
mod error;
mod image;
mod index;
mod init;
mod instance;
mod limiter;
mod memory;
mod mmap;
mod module;
mod resolver;
mod segments;
mod standalone;
pub mod sync;
pub mod sys;
mod table;
mod tunables;
mod types;
mod units;
mod vmcontext;
pub mod vmoffsets;

pub use allocator::{
    AllocatorStats, Imports, InstanceAllocationRequest, InstanceAllocator, InstanceAllocatorImpl, Released,
};
pub use error::{LimitExceeded, LimiterDenied, OutOfBounds};
pub use image::MemoryImage;
pub use index::{
    DefinedGlobalIndex, DefinedMemoryIndex, DefinedTableIndex, FuncIndex, GlobalIndex, MemoryAllocationIndex,
    MemoryIndex, OwnedMemoryIndex, TableAllocationIndex, TableIndex,
};
pub use init::initialize;
pub use instance::{Instance, InstanceBlock, InstanceHandle};
pub use limiter::ResourceLimiter;
pub use memory::{Memory, Reservation, ReservationLayout};
pub use mmap::Mmap;
pub use module::{Module, ModuleBuilder, ModuleId};
pub use resolver::FuncResolver;
pub use segments::{ConstExpr, DataKind, DataSegment, ElementItem, ElementKind, ElementSegment};
pub use standalone::{StandaloneMemories, StandaloneMemory};
pub use table::Table;
pub use tunables::{MAX_RESERVATION, Tunables};
pub use types::{
    GlobalInit, GlobalType, MemoryType, TableElementType, TableType, ValType, WASM_PAGE_SIZE_LOG2,
};
pub use units::{exact_bytes, human_bytes};
pub use vmcontext::{
    VMContext, VMFunctionImport, VMGlobalDefinition, VMGlobalImport, VMMemoryDefinition, VMMemoryImport,
    VMTableDefinition, VMTableImport,
};
pub use vmoffsets::{HostPtr, PtrSize, VMOffsets, VMOffsetsFields};

/// Re-exported so embedders and backends name the same `PrimaryMap` and `EntityRef`.
pub use cranelift_entity::{self, EntityRef, PrimaryMap};
