//! Instance initialization: active element segments fill tables, then active data segments
//! fill memories, in module order, bounds-checked (an out-of-bounds segment is an error, never
//! a write outside the target). Data already in place through a copy-on-write image is not
//! copied again.

use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use crate::error::OutOfBounds;
use cranelift_entity::packed_option::PackedOption;

use crate::index::{DefinedGlobalIndex, FuncIndex, GlobalIndex, MemoryIndex, TableIndex};
use crate::instance::Instance;
use crate::module::Module;
use crate::resolver::FuncResolver;
use crate::segments::{ConstExpr, DataKind, ElementKind};
use crate::vmcontext::{VMGlobalImport, VMMemoryImport, VMTableImport};

/// Applies `instance`'s active element and data segments. `resolver` turns a function
/// index into a table element word (as in the allocation request).
///
/// On error (a segment out of bounds, an offset that does not fit) the instance is partly
/// initialized: the caller deallocates it, as the spec's failed instantiation requires.
///
/// # Safety
///
/// The instance's imports (written into its vmctx at allocation) point at live definitions:
/// imported globals may be read, imported tables and memories written within their current
/// bounds, by this thread, now.
pub unsafe fn initialize(instance: Pin<&mut Instance>, resolver: &dyn FuncResolver) -> Result<()> {
    // SAFETY: nothing below moves the instance; fields are mutated in place.
    let instance = unsafe { instance.get_unchecked_mut() };
    let module: *const Module = Arc::as_ptr(instance.module());
    // SAFETY: the instance holds this `Arc` for as long as it lives, and nothing below drops
    // or replaces it (segments only write memories and tables); borrowing it this way spares
    // two atomic operations on a count other threads instantiating the module also touch.
    let module = unsafe { &*module };
    for (i, segment) in module.element_segments().iter().enumerate() {
        let ElementKind::Active { table, offset } = segment.kind else {
            continue;
        };
        // SAFETY: the caller's contract covers imported globals.
        let offset =
            unsafe { evaluate(instance, &offset) }.with_context(|| format!("element segment {i}"))?;
        let items = Items {
            funcs: module.element_funcs(i),
            globals: module.element_globals(i),
        };
        // SAFETY: the caller's contract covers imported tables and globals.
        unsafe { write_table(instance, module, table, offset, items, resolver) }
            .with_context(|| format!("element segment {i} of {} elements", segment.items.len()))?;
    }
    for (i, segment) in module.data_segments().iter().enumerate() {
        let DataKind::Active { memory, offset } = segment.kind else {
            continue;
        };
        let defined = module.defined_memory_index(memory);
        if defined.is_some_and(|d| instance.memory(d).is_some_and(|m| m.image().is_some())) {
            continue;
        }
        // SAFETY: the caller's contract covers imported globals.
        let offset = unsafe { evaluate(instance, &offset) }.with_context(|| format!("data segment {i}"))?;
        // SAFETY: the caller's contract covers imported memories.
        unsafe { write_memory(instance, module, memory, offset, &segment.data) }
            .with_context(|| format!("data segment {i} of {} bytes", segment.data.len()))?;
    }
    Ok(())
}

/// The value of a segment offset: a constant, or an immutable global's value (imported, or
/// defined and already initialized).
///
/// # Safety
///
/// Imported globals point at live definitions.
unsafe fn evaluate(instance: &Instance, expr: &ConstExpr) -> Result<u64> {
    match *expr {
        ConstExpr::I32(v) => Ok(u64::from(u32::from_ne_bytes(v.to_ne_bytes()))),
        ConstExpr::I64(v) => Ok(u64::from_ne_bytes(v.to_ne_bytes())),
        ConstExpr::GlobalGet(global) => {
            // SAFETY: imported globals point at live definitions (`evaluate`'s contract).
            let value = unsafe { global_value(instance, global) }?;
            let bytes: [u8; 8] = value[..8].try_into().unwrap_or_default();
            let ty = instance.module().globals().get(global).map(|g| g.content);
            Ok(match ty {
                Some(crate::ValType::I32) => {
                    u64::from(u32::from_le_bytes(bytes[..4].try_into().unwrap_or_default()))
                }
                _ => u64::from_le_bytes(bytes),
            })
        }
    }
}

/// The 16 bytes of global `global`: a defined one (initialized at allocation, before any
/// segment) or an imported one.
///
/// # Safety
///
/// Imported globals point at live definitions.
unsafe fn global_value(instance: &Instance, global: GlobalIndex) -> Result<[u8; 16]> {
    match global
        .as_u32()
        .checked_sub(instance.module().num_imported_globals())
    {
        Some(defined) => Ok(instance
            .global(DefinedGlobalIndex::from_u32(defined))
            .ok_or_else(|| anyhow::anyhow!("global {} does not exist", global.as_u32()))?
            .storage),
        // SAFETY: imported globals point at live definitions (`global_value`'s contract).
        None => unsafe { imported_global(instance, global) },
    }
}

/// The 16 bytes of imported global `global`.
///
/// # Safety
///
/// The import points at a live `VMGlobalDefinition`.
pub(crate) unsafe fn imported_global(instance: &Instance, global: GlobalIndex) -> Result<[u8; 16]> {
    if global.as_u32() >= instance.module().num_imported_globals() {
        bail!("global {} is not imported", global.as_u32());
    }
    let import: VMGlobalImport = instance.read_vmctx(instance.offsets().vmctx_vmglobal_import(global));
    if import.from.is_null() {
        bail!("imported global {} is a null pointer", global.as_u32());
    }
    // SAFETY: non-null and live per the caller.
    Ok(unsafe { import.from.read() }.storage)
}

fn out_of_bounds(resource: String, offset: u64, len: usize, size: usize) -> anyhow::Error {
    anyhow::Error::new(OutOfBounds {
        resource,
        offset,
        len: len as u64,
        size: size as u64,
    })
}

/// An element segment's items: functions for the resolver (null where a global gives the
/// item), and the items globals give.
#[derive(Clone, Copy)]
struct Items<'a> {
    funcs: &'a [PackedOption<FuncIndex>],
    globals: &'a [(u32, GlobalIndex)],
}

impl Items<'_> {
    /// Writes the items' words into `out` (exactly as many words).
    ///
    /// # Safety
    ///
    /// Imported globals point at live definitions.
    unsafe fn write(self, instance: &Instance, resolver: &dyn FuncResolver, out: &mut [usize]) -> Result<()> {
        resolver.resolve_funcs(self.funcs, out);
        for &(at, global) in self.globals {
            // SAFETY: imported globals point at live definitions (`write`'s contract).
            let value = unsafe { global_value(instance, global) }?;
            let word = value[..size_of::<usize>()].try_into().map(usize::from_le_bytes);
            out[at as usize] = word.unwrap_or_default();
        }
        Ok(())
    }
}

/// Writes `items` into table `table` at `offset`, all or nothing.
///
/// # Safety
///
/// An imported table's definition is live and writable within its bounds; imported globals
/// point at live definitions.
unsafe fn write_table(
    instance: &mut Instance,
    module: &Module,
    table: TableIndex,
    offset: u64,
    items: Items<'_>,
    resolver: &dyn FuncResolver,
) -> Result<()> {
    let name = || format!("table {}", table.as_u32());
    let len = items.funcs.len();
    if let Some(defined) = module.defined_table_index(table) {
        let size = instance.table(defined).map_or(0, |t| t.size());
        let start = usize::try_from(offset)
            .ok()
            .filter(|o| o.checked_add(len).is_some_and(|e| e <= size));
        let start = start.ok_or_else(|| out_of_bounds(name(), offset, len, size))?;
        if items.globals.is_empty() {
            let elements = instance.tables[defined].1.elements_mut();
            resolver.resolve_funcs(items.funcs, &mut elements[start..start + len]);
            return Ok(());
        }
        let mut words = vec![0; len];
        // SAFETY: imported globals point at live definitions (`write_table`'s contract).
        unsafe { items.write(instance, resolver, &mut words) }?;
        instance.tables[defined].1.elements_mut()[start..start + len].copy_from_slice(&words);
        return Ok(());
    }
    let mut words = vec![0; len];
    // SAFETY: imported globals point at live definitions (`write_table`'s contract).
    unsafe { items.write(instance, resolver, &mut words) }?;
    let name = name();
    let import: VMTableImport = instance.read_vmctx(instance.offsets().vmctx_vmtable_import(table));
    if import.from.is_null() {
        bail!("imported {name} is a null pointer");
    }
    // SAFETY: live per the caller.
    let definition = unsafe { import.from.read() };
    // SAFETY: the imported table's `current_elements` words at `base` are writable (caller).
    unsafe { copy_into(definition.base, definition.current_elements, name, offset, &words) }
}

/// Copies `items` into the `size` elements at `base`, starting at `offset`, all or nothing.
///
/// # Safety
///
/// `base..base + size` is valid for writes and not referenced from Rust meanwhile.
unsafe fn copy_into<T: Copy>(
    base: *mut T,
    size: usize,
    name: String,
    offset: u64,
    items: &[T],
) -> Result<()> {
    let start = usize::try_from(offset)
        .ok()
        .filter(|o| o.checked_add(items.len()).is_some_and(|e| e <= size));
    let start = start.ok_or_else(|| out_of_bounds(name, offset, items.len(), size))?;
    if items.is_empty() {
        return Ok(());
    }
    // SAFETY: `start + len <= size` elements at `base` are writable (caller's contract).
    unsafe {
        base.add(start)
            .copy_from_nonoverlapping(items.as_ptr(), items.len())
    };
    Ok(())
}

/// Copies `data` into memory `memory` at `offset`, all or nothing.
///
/// # Safety
///
/// An imported memory's definition is live and writable within its bounds.
unsafe fn write_memory(
    instance: &mut Instance,
    module: &Module,
    memory: MemoryIndex,
    offset: u64,
    data: &[u8],
) -> Result<()> {
    let name = || format!("memory {}", memory.as_u32());
    if let Some(defined) = module.defined_memory_index(memory) {
        return instance.memories[defined].1.write(offset, data).map_err(|error| {
            match error.downcast::<OutOfBounds>() {
                Ok(mut oob) => {
                    oob.resource = name();
                    anyhow::Error::new(oob)
                }
                Err(other) => other,
            }
        });
    }
    let import: VMMemoryImport = instance.read_vmctx(instance.offsets().vmctx_vmmemory_import(memory));
    let name = name();
    if import.from.is_null() {
        bail!("imported {name} is a null pointer");
    }
    // SAFETY: live per the caller.
    let definition = unsafe { import.from.read() };
    // SAFETY: the imported memory's `current_length` bytes at `base` are writable (caller).
    unsafe { copy_into(definition.base, definition.current_length, name, offset, data) }
}
