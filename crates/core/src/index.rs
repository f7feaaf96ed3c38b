//! Index newtypes.
//!
//! A module's index spaces put imported entities first and defined ones after them, so the
//! same memory has a [`MemoryIndex`] (module-wide) and, if the module defines it, a
//! [`DefinedMemoryIndex`] (counting defined memories only). Keeping them as distinct types
//! makes mixing them a compile error. [`Module`](crate::Module) converts between the two.
//!
//! [`MemoryAllocationIndex`] and [`TableAllocationIndex`] are what a backend hands back with a
//! memory or table so that it can find its slot again on deallocation; their meaning is the
//! backend's own (a pooling backend stores a slot number, the on-demand one what it learns about
//! the module memory's writes).

use cranelift_entity::entity_impl;

/// A memory in the module's memory index space (imports first).
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemoryIndex(u32);
entity_impl!(MemoryIndex, "memory");

/// A memory the module defines, counting defined memories only.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DefinedMemoryIndex(u32);
entity_impl!(DefinedMemoryIndex, "defined_memory");

/// A table in the module's table index space (imports first).
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableIndex(u32);
entity_impl!(TableIndex, "table");

/// A table the module defines, counting defined tables only.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DefinedTableIndex(u32);
entity_impl!(DefinedTableIndex, "defined_table");

/// A global in the module's global index space (imports first).
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GlobalIndex(u32);
entity_impl!(GlobalIndex, "global");

/// A global the module defines, counting defined globals only.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DefinedGlobalIndex(u32);
entity_impl!(DefinedGlobalIndex, "defined_global");

/// A function in the module's function index space (imports first).
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FuncIndex(u32);
entity_impl!(FuncIndex, "func");

/// What a backend returned with a memory, to find the memory's slot again.
///
/// A pooling backend returns the slot number; the on-demand backend a number of its own for
/// the module memory.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MemoryAllocationIndex(u32);
entity_impl!(MemoryAllocationIndex, "memory_allocation");

/// What a backend returned with a table, to find the table's slot again.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TableAllocationIndex(u32);
entity_impl!(TableAllocationIndex, "table_allocation");

/// A defined memory that is not shared, counting such memories only: its
/// `VMMemoryDefinition` is stored in the instance's vmctx.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnedMemoryIndex(u32);
entity_impl!(OwnedMemoryIndex, "owned_memory");
