//! The types of memories, tables and globals, as a module declares them.

use anyhow::{Result, bail};

/// The largest page-size exponent WebAssembly allows (64 KiB pages).
pub const WASM_PAGE_SIZE_LOG2: u8 = 16;

/// A linear memory's type: limits in pages, index type, sharing and page size.
///
/// Sizes in bytes are computed with checked arithmetic, never wrapped: a type whose initial
/// size in bytes does not fit in a `u64` is rejected by [`MemoryType::validate`]; a maximum
/// that large is allowed (growth stops short of it), and [`MemoryType::maximum_bytes`] says
/// `None` for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemoryType {
    /// Initial size in pages.
    pub minimum: u64,
    /// Maximum size in pages, if the module declares one.
    pub maximum: Option<u64>,
    /// Whether the memory is indexed by `i64` (the memory64 proposal).
    pub memory64: bool,
    /// Whether the memory is shared between threads (the threads proposal).
    pub shared: bool,
    /// log2 of the page size: 16 for the usual 64 KiB pages, 0 for one-byte pages (the
    /// custom-page-sizes proposal).
    pub page_size_log2: u8,
}

impl MemoryType {
    /// A 32-bit, unshared memory with 64 KiB pages.
    pub fn new(minimum: u64, maximum: Option<u64>) -> Self {
        Self {
            minimum,
            maximum,
            memory64: false,
            shared: false,
            page_size_log2: WASM_PAGE_SIZE_LOG2,
        }
    }

    /// The page size in bytes.
    pub fn page_size(&self) -> u64 {
        1u64 << self.page_size_log2.min(WASM_PAGE_SIZE_LOG2)
    }

    /// The largest number of pages any memory of this index type and page size may have: the
    /// index type's address space in pages, but no more than its largest page count
    /// (`memory.size` returns one), so one-byte pages stop at 2^32 - 1 and 2^64 - 1.
    pub fn absolute_max_pages(&self) -> u64 {
        let (address_bits, largest) = if self.memory64 {
            (64, u64::MAX)
        } else {
            (32, u64::from(u32::MAX))
        };
        let page_bits = u32::from(self.page_size_log2.min(WASM_PAGE_SIZE_LOG2));
        let pages = (1u128 << address_bits) >> page_bits;
        u64::try_from(pages).unwrap_or(u64::MAX).min(largest)
    }

    /// The initial size in bytes, or `None` if it does not fit in a `u64`.
    pub fn minimum_bytes(&self) -> Option<u64> {
        self.minimum.checked_mul(self.page_size())
    }

    /// The largest size in bytes the memory may ever reach: its declared maximum, else the
    /// absolute maximum of its index type. `None` means "more than a `u64` can count".
    pub fn maximum_bytes(&self) -> Option<u64> {
        self.maximum
            .unwrap_or_else(|| self.absolute_max_pages())
            .checked_mul(self.page_size())
    }

    /// Checks the type against the WebAssembly rules: a page size of 1 or 64 KiB, limits
    /// within the index type's range, a minimum no larger than the maximum, a maximum on
    /// shared memories; and an initial size under 16 EiB, which a memory64 type may declare
    /// but no address space holds.
    pub fn validate(&self) -> Result<()> {
        if self.page_size_log2 != 0 && self.page_size_log2 != WASM_PAGE_SIZE_LOG2 {
            bail!(
                "memory page size 2^{} is not allowed: only 1 byte (2^0) and 64 KiB (2^16)",
                self.page_size_log2
            );
        }
        let absolute = self.absolute_max_pages();
        if self.minimum > absolute {
            bail!(
                "memory minimum of {} pages is over the limit of {absolute} pages",
                self.minimum
            );
        }
        if self.minimum_bytes().is_none() {
            // Within the index type's limit (2^48 pages of 64 KiB for memory64) yet 16 EiB or
            // more: no address space holds it, so no instantiation could ever succeed.
            bail!(
                "memory minimum of {} pages of {} is 16 EiB or more, which no address space holds",
                self.minimum,
                crate::units::human_bytes(self.page_size())
            );
        }
        if let Some(max) = self.maximum {
            if max > absolute {
                bail!("memory maximum of {max} pages is over the limit of {absolute} pages");
            }
            if self.minimum > max {
                bail!(
                    "memory minimum of {} pages is above its maximum of {max} pages",
                    self.minimum
                );
            }
        } else if self.shared {
            bail!("a shared memory must declare a maximum size");
        }
        Ok(())
    }
}

/// What a table holds. Every element is stored as one pointer-sized word; 0 is null.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TableElementType {
    /// `funcref`: a word the embedder's function resolver produced.
    Func,
    /// `externref`: a word the embedder manages.
    Extern,
}

/// A table's type: element kind and limits in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableType {
    /// What the table holds.
    pub element: TableElementType,
    /// Initial number of elements.
    pub minimum: u64,
    /// Maximum number of elements, if the module declares one.
    pub maximum: Option<u64>,
    /// Whether the table is indexed by `i64` (the memory64 proposal's table64).
    pub table64: bool,
}

impl TableType {
    /// A 32-bit `funcref` table.
    pub fn new(minimum: u64, maximum: Option<u64>) -> Self {
        Self {
            element: TableElementType::Func,
            minimum,
            maximum,
            table64: false,
        }
    }

    /// The largest number of elements a table of this index type may ever have.
    pub fn absolute_max_elements(&self) -> u64 {
        if self.table64 {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        }
    }

    /// Checks the type: limits within the index type's range, minimum no larger than maximum.
    pub fn validate(&self) -> Result<()> {
        let absolute = self.absolute_max_elements();
        if self.minimum > absolute {
            bail!(
                "table minimum of {} elements is over the limit of {absolute} elements",
                self.minimum
            );
        }
        if let Some(max) = self.maximum {
            if max > absolute {
                bail!("table maximum of {max} elements is over the limit of {absolute} elements");
            }
            if self.minimum > max {
                bail!(
                    "table minimum of {} elements is above its maximum of {max} elements",
                    self.minimum
                );
            }
        }
        Ok(())
    }
}

/// A value type, as far as a global's storage is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValType {
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// 128-bit vector.
    V128,
    /// Function reference (one pointer-sized word).
    FuncRef,
    /// External reference (one pointer-sized word).
    ExternRef,
}

impl ValType {
    /// Bytes of a value of this type, as a `VMGlobalDefinition` holds it (the rest of its 16
    /// bytes are zero).
    pub fn bytes(self) -> usize {
        match self {
            ValType::I32 | ValType::F32 => 4,
            ValType::I64 | ValType::F64 => 8,
            ValType::V128 => 16,
            ValType::FuncRef | ValType::ExternRef => size_of::<usize>(),
        }
    }
}

/// A global's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GlobalType {
    /// What the global holds.
    pub content: ValType,
    /// Whether code may write it.
    pub mutable: bool,
}

/// The initial value of a defined global: a constant, a null reference, or a function
/// reference resolved through the instantiation request's resolver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GlobalInit {
    /// `i32.const`.
    I32(i32),
    /// `i64.const`.
    I64(i64),
    /// `f32.const`, as its bits.
    F32(u32),
    /// `f64.const`, as its bits.
    F64(u64),
    /// `v128.const`, as its bits.
    V128(u128),
    /// `ref.null`.
    RefNull,
    /// `ref.func`.
    RefFunc(crate::FuncIndex),
    /// `global.get` of an earlier immutable global of the same type, imported or defined, read
    /// at instantiation.
    GetGlobal(crate::GlobalIndex),
}

impl GlobalInit {
    /// Whether this initializer produces a value of type `ty`.
    pub fn matches(&self, ty: ValType) -> bool {
        matches!(
            (self, ty),
            (GlobalInit::I32(_), ValType::I32)
                | (GlobalInit::I64(_), ValType::I64)
                | (GlobalInit::F32(_), ValType::F32)
                | (GlobalInit::F64(_), ValType::F64)
                | (GlobalInit::V128(_), ValType::V128)
                | (GlobalInit::RefNull, ValType::FuncRef | ValType::ExternRef)
                | (GlobalInit::RefFunc(_), ValType::FuncRef)
                | (GlobalInit::GetGlobal(_), _)
        )
    }
}
