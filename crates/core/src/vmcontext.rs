//! The `#[repr(C)]` structures compiled code reads in a vmctx, at the offsets
//! [`VMOffsets`](crate::VMOffsets) gives for the host pointer width.

use std::marker::PhantomPinned;
use std::ptr;

/// The opaque start of an instance's vmctx. Only ever used behind a pointer; its alignment
/// is the vmctx's ([`VMCTX_ALIGN`](crate::vmoffsets::VMCTX_ALIGN)).
#[repr(C, align(16))]
#[derive(Debug)]
pub struct VMContext {
    pub(crate) _pinned: PhantomPinned,
}

/// A linear memory as compiled code sees it. Always exact: `base` is the first accessible
/// byte and `current_length` the accessible size in bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VMMemoryDefinition {
    /// Start of the accessible bytes.
    pub base: *mut u8,
    /// Accessible size in bytes.
    pub current_length: usize,
}

/// A table as compiled code sees it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VMTableDefinition {
    /// Start of the elements (pointer-sized words).
    pub base: *mut usize,
    /// Current number of elements.
    pub current_elements: usize,
}

/// A global's storage: 16 bytes, 16-aligned, so any value type fits.
#[repr(C, align(16))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VMGlobalDefinition {
    /// The value's bytes, little-endian, zero-extended.
    pub storage: [u8; 16],
}

/// An imported function: its code and the vmctx to call it with.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VMFunctionImport {
    /// The function's entry point.
    pub body: *const u8,
    /// The callee's vmctx.
    pub vmctx: *mut VMContext,
}

/// An imported table: the exporting instance's definition.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VMTableImport {
    /// The table's definition in its owner's vmctx.
    pub from: *mut VMTableDefinition,
    /// The owner's vmctx.
    pub vmctx: *mut VMContext,
}

/// An imported memory: the exporting instance's definition.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VMMemoryImport {
    /// The memory's definition in its owner's vmctx.
    pub from: *mut VMMemoryDefinition,
    /// The owner's vmctx.
    pub vmctx: *mut VMContext,
}

/// An imported global: where its value lives.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VMGlobalImport {
    /// The global's storage.
    pub from: *mut VMGlobalDefinition,
}

impl Default for VMMemoryDefinition {
    fn default() -> Self {
        VMMemoryDefinition {
            base: ptr::null_mut(),
            current_length: 0,
        }
    }
}

impl Default for VMTableDefinition {
    fn default() -> Self {
        VMTableDefinition {
            base: ptr::null_mut(),
            current_elements: 0,
        }
    }
}
