//! Offsets of every field in a `VMContext`, for the host and for a code generator.
//!
//! The vmctx is the block compiled code reads at fixed offsets. Its regions, in order:
//!
//! ```text
//!  offset 0 ┌────────────────────────────────┐
//!           │ imported functions  (2 ptrs ea)│ VMFunctionImport { body, vmctx }
//!           │ imported tables     (2 ptrs ea)│ VMTableImport { from, vmctx }
//!           │ imported memories   (2 ptrs ea)│ VMMemoryImport { from, vmctx }
//!           │ imported globals    (1 ptr ea) │ VMGlobalImport { from }
//!           │ defined tables      (2 ptrs ea)│ VMTableDefinition { base, current_elements }
//!           │ defined memory ptrs (1 ptr ea) │ *mut VMMemoryDefinition, one per defined memory
//!           │ owned memory defs   (2 ptrs ea)│ VMMemoryDefinition { base, current_length }
//!           │ (pad to 16)                    │
//!           │ defined globals     (16 ea)    │ VMGlobalDefinition
//!  size     └────────────────────────────────┘ (rounded up to 16)
//! ```
//!
//! Every region is aligned to its element's alignment; all arithmetic is checked, so a module
//! whose vmctx would not fit in `u32` offsets is an error, not a wrapped offset. The pointer
//! width is a parameter ([`PtrSize`]): the host uses [`HostPtr`], a cross-compiler passes the
//! target's width as a `u8`.

use std::fmt;

use crate::index::{
    DefinedGlobalIndex, DefinedMemoryIndex, DefinedTableIndex, FuncIndex, GlobalIndex, MemoryIndex,
    OwnedMemoryIndex, TableIndex,
};
use anyhow::{Result, bail};

/// A pointer width in bytes.
pub trait PtrSize {
    /// The size of a pointer in bytes (4 or 8).
    fn size(&self) -> u8;
}

/// The pointer width of the host this code runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostPtr;

impl PtrSize for HostPtr {
    fn size(&self) -> u8 {
        const SIZE: u8 = match size_of::<usize>() {
            4 => 4,
            8 => 8,
            _ => panic!("only 32-bit and 64-bit hosts are supported"),
        };
        SIZE
    }
}

impl PtrSize for u8 {
    fn size(&self) -> u8 {
        *self
    }
}

/// The entity counts a vmctx layout depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VMOffsetsFields {
    /// Imported functions.
    pub num_imported_functions: u32,
    /// Imported tables.
    pub num_imported_tables: u32,
    /// Imported memories.
    pub num_imported_memories: u32,
    /// Imported globals.
    pub num_imported_globals: u32,
    /// Defined tables.
    pub num_defined_tables: u32,
    /// Defined memories (each has a pointer to its definition).
    pub num_defined_memories: u32,
    /// Defined memories that are not shared (each has its definition in the vmctx).
    pub num_owned_memories: u32,
    /// Defined globals.
    pub num_defined_globals: u32,
}

/// One region of the vmctx, for error messages and tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VMRegion {
    /// What the region holds.
    pub name: &'static str,
    /// Offset of its first byte.
    pub offset: u32,
    /// Number of entries.
    pub count: u32,
    /// Bytes per entry.
    pub entry_size: u32,
}

impl VMRegion {
    /// Bytes in the region.
    pub fn size(&self) -> u32 {
        // Cannot overflow: `VMOffsets::from_fields` checked it.
        self.count * self.entry_size
    }
}

/// Offsets of every vmctx field for one module and pointer width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VMOffsets<P> {
    /// The pointer width.
    pub ptr: P,
    fields: VMOffsetsFields,
    imported_functions: u32,
    imported_tables: u32,
    imported_memories: u32,
    imported_globals: u32,
    defined_tables: u32,
    defined_memories: u32,
    owned_memories: u32,
    defined_globals: u32,
    size: u32,
}

/// Alignment of the vmctx and of its globals region.
pub const VMCTX_ALIGN: u32 = 16;

impl<P: PtrSize> VMOffsets<P> {
    /// The layout for the given counts; an error if a pointer width other than 4 or 8 is
    /// given or the vmctx would not fit in `u32` offsets.
    pub fn from_fields(ptr: P, fields: VMOffsetsFields) -> Result<Self> {
        let p = u32::from(ptr.size());
        if p != 4 && p != 8 {
            bail!("pointer size of {p} bytes is not supported (only 4 and 8)");
        }
        if fields.num_owned_memories > fields.num_defined_memories {
            bail!(
                "{} owned memories but only {} defined memories",
                fields.num_owned_memories,
                fields.num_defined_memories
            );
        }
        let mut cursor = 0u32;
        let mut region = |name: &str, align: u32, count: u32, entry: u32| -> Result<u32> {
            let start = cursor
                .checked_next_multiple_of(align)
                .and_then(|start| Some((start, count.checked_mul(entry)?)))
                .and_then(|(start, len)| Some((start, start.checked_add(len)?)));
            match start {
                Some((start, end)) => {
                    cursor = end;
                    Ok(start)
                }
                None => bail!(
                    "vmctx does not fit in 4 GiB: {count} {name} of {entry} bytes each after {cursor} bytes"
                ),
            }
        };
        let imported_functions = region("imported functions", p, fields.num_imported_functions, 2 * p)?;
        let imported_tables = region("imported tables", p, fields.num_imported_tables, 2 * p)?;
        let imported_memories = region("imported memories", p, fields.num_imported_memories, 2 * p)?;
        let imported_globals = region("imported globals", p, fields.num_imported_globals, p)?;
        let defined_tables = region("defined tables", p, fields.num_defined_tables, 2 * p)?;
        let defined_memories = region("defined memory pointers", p, fields.num_defined_memories, p)?;
        let owned_memories = region("owned memory definitions", p, fields.num_owned_memories, 2 * p)?;
        let defined_globals = region("defined globals", VMCTX_ALIGN, fields.num_defined_globals, 16)?;
        let size = region("trailing padding", VMCTX_ALIGN, 0, 0)?;
        Ok(VMOffsets {
            ptr,
            fields,
            imported_functions,
            imported_tables,
            imported_memories,
            imported_globals,
            defined_tables,
            defined_memories,
            owned_memories,
            defined_globals,
            size,
        })
    }

    /// The counts this layout was computed from.
    pub fn fields(&self) -> &VMOffsetsFields {
        &self.fields
    }

    fn p(&self) -> u32 {
        u32::from(self.ptr.size())
    }

    /// Total size of the vmctx in bytes (a multiple of [`VMCTX_ALIGN`]).
    pub fn size_of_vmctx(&self) -> u32 {
        self.size
    }

    /// Size of a `VMFunctionImport`.
    pub fn size_of_vmfunction_import(&self) -> u32 {
        2 * self.p()
    }

    /// Size of a `VMTableImport`.
    pub fn size_of_vmtable_import(&self) -> u32 {
        2 * self.p()
    }

    /// Size of a `VMMemoryImport`.
    pub fn size_of_vmmemory_import(&self) -> u32 {
        2 * self.p()
    }

    /// Size of a `VMGlobalImport`.
    pub fn size_of_vmglobal_import(&self) -> u32 {
        self.p()
    }

    /// Size of a `VMTableDefinition`.
    pub fn size_of_vmtable_definition(&self) -> u32 {
        2 * self.p()
    }

    /// Size of a `VMMemoryDefinition`.
    pub fn size_of_vmmemory_definition(&self) -> u32 {
        2 * self.p()
    }

    /// Size of a `VMGlobalDefinition`.
    pub fn size_of_vmglobal_definition(&self) -> u32 {
        16
    }

    /// Offset of `base` in a `VMMemoryDefinition`.
    pub fn vmmemory_definition_base(&self) -> u32 {
        0
    }

    /// Offset of `current_length` in a `VMMemoryDefinition`.
    pub fn vmmemory_definition_current_length(&self) -> u32 {
        self.p()
    }

    /// Offset of `base` in a `VMTableDefinition`.
    pub fn vmtable_definition_base(&self) -> u32 {
        0
    }

    /// Offset of `current_elements` in a `VMTableDefinition`.
    pub fn vmtable_definition_current_elements(&self) -> u32 {
        self.p()
    }

    /// Offset of imported function `index`'s `VMFunctionImport`.
    ///
    /// Panics if `index` is not an imported function: a caller bug, not bad input.
    pub fn vmctx_vmfunction_import(&self, index: FuncIndex) -> u32 {
        self.entry(
            self.imported_functions,
            index.as_u32(),
            self.fields.num_imported_functions,
            2,
        )
    }

    /// Offset of imported table `index`'s `VMTableImport`.
    pub fn vmctx_vmtable_import(&self, index: TableIndex) -> u32 {
        self.entry(
            self.imported_tables,
            index.as_u32(),
            self.fields.num_imported_tables,
            2,
        )
    }

    /// Offset of imported memory `index`'s `VMMemoryImport`.
    pub fn vmctx_vmmemory_import(&self, index: MemoryIndex) -> u32 {
        self.entry(
            self.imported_memories,
            index.as_u32(),
            self.fields.num_imported_memories,
            2,
        )
    }

    /// Offset of imported global `index`'s `VMGlobalImport`.
    pub fn vmctx_vmglobal_import(&self, index: GlobalIndex) -> u32 {
        self.entry(
            self.imported_globals,
            index.as_u32(),
            self.fields.num_imported_globals,
            1,
        )
    }

    /// Offset of defined table `index`'s `VMTableDefinition`.
    pub fn vmctx_vmtable_definition(&self, index: DefinedTableIndex) -> u32 {
        self.entry(
            self.defined_tables,
            index.as_u32(),
            self.fields.num_defined_tables,
            2,
        )
    }

    /// Offset of the pointer to defined memory `index`'s `VMMemoryDefinition`.
    pub fn vmctx_vmmemory_pointer(&self, index: DefinedMemoryIndex) -> u32 {
        self.entry(
            self.defined_memories,
            index.as_u32(),
            self.fields.num_defined_memories,
            1,
        )
    }

    /// Offset of owned memory `index`'s `VMMemoryDefinition`.
    pub fn vmctx_vmmemory_definition(&self, index: OwnedMemoryIndex) -> u32 {
        self.entry(
            self.owned_memories,
            index.as_u32(),
            self.fields.num_owned_memories,
            2,
        )
    }

    /// Offset of defined global `index`'s `VMGlobalDefinition`.
    pub fn vmctx_vmglobal_definition(&self, index: DefinedGlobalIndex) -> u32 {
        assert!(
            index.as_u32() < self.fields.num_defined_globals,
            "{index} out of range"
        );
        self.defined_globals + index.as_u32() * 16
    }

    fn entry(&self, start: u32, index: u32, count: u32, ptrs: u32) -> u32 {
        assert!(index < count, "vmctx index {index} out of range (count {count})");
        // Cannot overflow: `from_fields` checked `count * ptrs * p` after `start`.
        start + index * ptrs * self.p()
    }

    /// Every region with its offset, count and entry size, in vmctx order.
    pub fn regions(&self) -> [VMRegion; 8] {
        let p = self.p();
        let f = &self.fields;
        let r = |name, offset, count, entry_size| VMRegion {
            name,
            offset,
            count,
            entry_size,
        };
        [
            r(
                "imported functions",
                self.imported_functions,
                f.num_imported_functions,
                2 * p,
            ),
            r(
                "imported tables",
                self.imported_tables,
                f.num_imported_tables,
                2 * p,
            ),
            r(
                "imported memories",
                self.imported_memories,
                f.num_imported_memories,
                2 * p,
            ),
            r(
                "imported globals",
                self.imported_globals,
                f.num_imported_globals,
                p,
            ),
            r("defined tables", self.defined_tables, f.num_defined_tables, 2 * p),
            r(
                "defined memory pointers",
                self.defined_memories,
                f.num_defined_memories,
                p,
            ),
            r(
                "owned memory definitions",
                self.owned_memories,
                f.num_owned_memories,
                2 * p,
            ),
            r("defined globals", self.defined_globals, f.num_defined_globals, 16),
        ]
    }

    /// A one-line breakdown of the vmctx size by region, for error messages:
    /// `vmctx 96 bytes = imported functions 2 x 16 at 0, ...`.
    pub fn region_breakdown(&self) -> RegionBreakdown<'_, P> {
        RegionBreakdown(self)
    }
}

/// The [`Display`](fmt::Display) of [`VMOffsets::region_breakdown`].
#[derive(Debug)]
pub struct RegionBreakdown<'a, P>(&'a VMOffsets<P>);

impl<P: PtrSize> fmt::Display for RegionBreakdown<'_, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vmctx {} bytes =", self.0.size_of_vmctx())?;
        let mut first = true;
        for region in self.0.regions().iter().filter(|r| r.count > 0) {
            let sep = if first { " " } else { ", " };
            first = false;
            write!(
                f,
                "{sep}{} {} x {} at {}",
                region.name, region.count, region.entry_size, region.offset
            )?;
        }
        if first {
            write!(f, " (no regions)")?;
        }
        Ok(())
    }
}
