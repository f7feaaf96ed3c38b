//! Data and element segments, and the constant expressions that place them.

use std::sync::Arc;

use crate::index::{FuncIndex, GlobalIndex, MemoryIndex, TableIndex};

/// A constant expression, as far as segment offsets and global initializers use them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConstExpr {
    /// `i32.const`.
    I32(i32),
    /// `i64.const`.
    I64(i64),
    /// `global.get` of an immutable global (imported, or defined before the expression's
    /// global), read at instantiation.
    GlobalGet(GlobalIndex),
}

/// Where a data segment goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataKind {
    /// Copied into `memory` at `offset` at instantiation.
    Active {
        /// The memory, in the module's index space.
        memory: MemoryIndex,
        /// Its offset.
        offset: ConstExpr,
    },
    /// Kept for `memory.init` at run time.
    Passive,
}

/// A data segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSegment {
    /// Active or passive.
    pub kind: DataKind,
    /// Its bytes.
    pub data: Arc<[u8]>,
}

/// Where an element segment goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElementKind {
    /// Written into `table` at `offset` at instantiation.
    Active {
        /// The table, in the module's index space.
        table: TableIndex,
        /// Its offset.
        offset: ConstExpr,
    },
    /// Kept for `table.init` at run time.
    Passive,
    /// Only declares function references.
    Declared,
}

/// One element of an element segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElementItem {
    /// A function, resolved to a word through the request's resolver.
    Func(FuncIndex),
    /// A null reference (word 0).
    Null,
    /// The reference an immutable global of a reference type holds (its word), read when the
    /// segment is applied: `global.get` in an element expression.
    Global(GlobalIndex),
}

/// An element segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElementSegment {
    /// Active, passive or declared.
    pub kind: ElementKind,
    /// Its elements.
    pub items: Vec<ElementItem>,
}
