//! What Berth needs to know about a module: its memories, tables and globals (imported and
//! defined), its imported-function count, and a process-unique id.
//!
//! A [`Module`] is built once, by `berth-wasm` from a binary or by an embedder with
//! [`ModuleBuilder`], and then shared (`Arc<Module>`) by every instance made from it. Fields are
//! private so that more facts (data and element segments) can be added without breaking
//! anyone; the builder checks every type, so a built `Module` is always well-formed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use cranelift_entity::packed_option::PackedOption;
use cranelift_entity::{EntityRef, PrimaryMap};
use once_cell::sync::OnceCell;

use crate::image::MemoryImage;
use crate::index::{
    DefinedGlobalIndex, DefinedMemoryIndex, DefinedTableIndex, FuncIndex, GlobalIndex, MemoryIndex,
    OwnedMemoryIndex, TableIndex,
};
use crate::segments::{ConstExpr, DataKind, DataSegment, ElementItem, ElementKind, ElementSegment};
use crate::types::{GlobalInit, GlobalType, MemoryType, TableElementType, TableType, ValType};
use crate::vmoffsets::{PtrSize, VMOffsets, VMOffsetsFields};

/// A process-unique module identity. Backends key per-module state (warm slots, images) on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId(u64);

impl ModuleId {
    fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ModuleId(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The id as a number (never 0).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

/// The facts about one WebAssembly module that instance allocation needs.
///
/// Cloning is cheap and keeps the module's identity: a clone has the same id and shares the
/// segments and the images (built once for all clones), so that threads can each count their
/// instances on an `Arc<Module>` of their own (one count updated by every instance on both
/// threads costs two threads on a 1 µs cycle about a tenth of their speed). A clone is the same module to a
/// backend, which keys what it keeps on the id: an engine that loads two clones tells its
/// backend to forget the module only when both loaded modules are gone.
///
/// Aligned to 128 bytes (two cache lines, the unit the processor's adjacent-line prefetcher
/// fetches) so that in an `Arc<Module>` the reference count, which every instance updates,
/// shares no cache line with the fields every instantiation reads.
#[derive(Debug, Clone)]
#[repr(align(128))]
pub struct Module {
    id: ModuleId,
    name: Option<String>,
    num_imported_funcs: u32,
    num_defined_funcs: u32,
    num_imported_memories: u32,
    num_imported_tables: u32,
    num_imported_globals: u32,
    memories: PrimaryMap<MemoryIndex, MemoryType>,
    tables: PrimaryMap<TableIndex, TableType>,
    globals: PrimaryMap<GlobalIndex, GlobalType>,
    global_inits: PrimaryMap<DefinedGlobalIndex, GlobalInit>,
    /// What clones share.
    segments: Arc<Segments>,
    /// The counts its vmctx layout depends on, computed once when it is built (every
    /// instantiation checks its offsets against them).
    vmctx_fields: VMOffsetsFields,
}

/// The parts of a module its clones share: the segments, and the images built from them.
#[derive(Debug)]
struct Segments {
    data: Vec<DataSegment>,
    elements: Vec<ElementSegment>,
    /// Each element segment's items as packed function indices (null as the reserved value,
    /// also where a global gives the item), the form resolvers read in bulk.
    element_funcs: Vec<Box<[PackedOption<FuncIndex>]>>,
    /// Each element segment's items that globals give: their positions and globals (empty for
    /// nearly every segment).
    element_globals: Vec<Box<[(u32, GlobalIndex)]>>,
    images: OnceCell<PrimaryMap<DefinedMemoryIndex, Option<Arc<MemoryImage>>>>,
}

impl Module {
    /// Starts building a module: what a front-end (`berth-wasm` reads them from a binary)
    /// knows of a validated module that instance allocation needs.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use berth_core::{ConstExpr, DataKind, DataSegment, MemoryIndex, MemoryType, Module, TableType};
    ///
    /// let module = Module::builder()
    ///     .name("hello")
    ///     .memory(MemoryType::new(1, Some(16)))
    ///     .table(TableType::new(8, None))
    ///     .data(DataSegment {
    ///         kind: DataKind::Active { memory: MemoryIndex::from_u32(0), offset: ConstExpr::I32(16) },
    ///         data: Arc::from(&b"hello"[..]),
    ///     })
    ///     .build()?;
    /// assert_eq!((module.num_defined_memories(), module.num_defined_tables()), (1, 1));
    /// // The data segment is known at load: it becomes a copy-on-write image.
    /// assert!(module.segments_never_in_bounds().is_empty());
    /// # anyhow::Ok(())
    /// ```
    pub fn builder() -> ModuleBuilder {
        ModuleBuilder::default()
    }

    /// This module's process-unique id.
    pub fn id(&self) -> ModuleId {
        self.id
    }

    /// The module's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Number of imported functions.
    pub fn num_imported_funcs(&self) -> u32 {
        self.num_imported_funcs
    }

    /// Number of defined functions.
    pub fn num_defined_funcs(&self) -> u32 {
        self.num_defined_funcs
    }

    /// Number of imported memories.
    pub fn num_imported_memories(&self) -> u32 {
        self.num_imported_memories
    }

    /// Number of imported tables.
    pub fn num_imported_tables(&self) -> u32 {
        self.num_imported_tables
    }

    /// Number of imported globals.
    pub fn num_imported_globals(&self) -> u32 {
        self.num_imported_globals
    }

    /// Every memory, imported ones first.
    pub fn memories(&self) -> &PrimaryMap<MemoryIndex, MemoryType> {
        &self.memories
    }

    /// Every table, imported ones first.
    pub fn tables(&self) -> &PrimaryMap<TableIndex, TableType> {
        &self.tables
    }

    /// Every global, imported ones first.
    pub fn globals(&self) -> &PrimaryMap<GlobalIndex, GlobalType> {
        &self.globals
    }

    /// Number of memories the module defines.
    pub fn num_defined_memories(&self) -> u32 {
        count(self.memories.len()) - self.num_imported_memories
    }

    /// Number of defined memories that are not shared: their `VMMemoryDefinition` lives in
    /// the instance's vmctx.
    pub fn num_owned_memories(&self) -> u32 {
        let owned = self.defined_memories().filter(|(_, ty)| !ty.shared).count();
        count(owned)
    }

    /// Number of tables the module defines.
    pub fn num_defined_tables(&self) -> u32 {
        count(self.tables.len()) - self.num_imported_tables
    }

    /// Number of globals the module defines.
    pub fn num_defined_globals(&self) -> u32 {
        count(self.globals.len()) - self.num_imported_globals
    }

    /// The defined memories in index order, with their types.
    pub fn defined_memories(&self) -> impl ExactSizeIterator<Item = (DefinedMemoryIndex, &MemoryType)> {
        let skip = self.num_imported_memories as usize;
        self.memories
            .values()
            .skip(skip)
            .enumerate()
            .map(|(i, ty)| (DefinedMemoryIndex::new(i), ty))
    }

    /// The defined tables in index order, with their types.
    pub fn defined_tables(&self) -> impl ExactSizeIterator<Item = (DefinedTableIndex, &TableType)> {
        let skip = self.num_imported_tables as usize;
        self.tables
            .values()
            .skip(skip)
            .enumerate()
            .map(|(i, ty)| (DefinedTableIndex::new(i), ty))
    }

    /// The defined globals in index order, with their types and initial values.
    pub fn defined_globals(
        &self,
    ) -> impl ExactSizeIterator<Item = (DefinedGlobalIndex, &GlobalType, &GlobalInit)> {
        let skip = self.num_imported_globals as usize;
        self.globals
            .values()
            .skip(skip)
            .zip(self.global_inits.iter())
            .map(|(ty, (i, init))| (i, ty, init))
    }

    /// A segment offset's value when loading can know it: a constant, or a `global.get` of a
    /// defined global whose initializer is one (directly or through earlier defined globals);
    /// `None` when it depends on an imported global, read only at instantiation. An `i32`
    /// offset is read as unsigned.
    pub fn constant_offset(&self, offset: &ConstExpr) -> Option<u64> {
        let mut global = match *offset {
            ConstExpr::I32(v) => return Some(u64::from(u32::from_ne_bytes(v.to_ne_bytes()))),
            ConstExpr::I64(v) => return Some(u64::from_ne_bytes(v.to_ne_bytes())),
            ConstExpr::GlobalGet(g) => g,
        };
        // Each step goes to an earlier global (checked when the module was built), so this ends.
        loop {
            let defined = global.as_u32().checked_sub(self.num_imported_globals)?;
            match self.global_inits.get(DefinedGlobalIndex::from_u32(defined))? {
                GlobalInit::I32(v) => return Some(u64::from(u32::from_ne_bytes(v.to_ne_bytes()))),
                GlobalInit::I64(v) => return Some(u64::from_ne_bytes(v.to_ne_bytes())),
                GlobalInit::GetGlobal(g) => global = *g,
                _ => return None,
            }
        }
    }

    /// The active segments no instantiation can apply: an offset loading knows (see
    /// [`constant_offset`](Self::constant_offset)) that puts the segment past the initial size
    /// of the defined memory or table it targets. Each is an [`OutOfBounds`](crate::OutOfBounds)
    /// error with the segment named in its context; instantiating the module always fails on the
    /// first of them. Segments into imported memories and tables, whose sizes are known only
    /// at instantiation, are not judged.
    pub fn segments_never_in_bounds(&self) -> Vec<anyhow::Error> {
        let mut found = Vec::new();
        let mut judge = |what: String, resource: String, offset: &ConstExpr, len: u64, size: Option<u64>| {
            let (Some(offset), Some(size)) = (self.constant_offset(offset), size) else {
                return;
            };
            if offset.checked_add(len).is_none_or(|end| end > size) {
                let error = crate::OutOfBounds {
                    resource,
                    offset,
                    len,
                    size,
                };
                found.push(anyhow::Error::new(error).context(what));
            }
        };
        for (i, segment) in self.segments.elements.iter().enumerate() {
            if let ElementKind::Active { table, offset } = &segment.kind {
                let size = self
                    .defined_table_index(*table)
                    .map(|_| self.tables[*table].minimum);
                let what = format!("element segment {i} of {} elements", segment.items.len());
                judge(
                    what,
                    format!("table {}", table.as_u32()),
                    offset,
                    segment.items.len() as u64,
                    size,
                );
            }
        }
        for (i, segment) in self.segments.data.iter().enumerate() {
            if let DataKind::Active { memory, offset } = &segment.kind {
                let size = self
                    .defined_memory_index(*memory)
                    .and_then(|_| self.memories[*memory].minimum_bytes());
                let what = format!(
                    "data segment {i} of {}",
                    crate::human_bytes(segment.data.len() as u64)
                );
                judge(
                    what,
                    format!("memory {}", memory.as_u32()),
                    offset,
                    segment.data.len() as u64,
                    size,
                );
            }
        }
        found
    }

    /// The counts its vmctx layout depends on.
    pub fn vmctx_fields(&self) -> &VMOffsetsFields {
        &self.vmctx_fields
    }

    /// The data segments, in module order.
    pub fn data_segments(&self) -> &[DataSegment] {
        &self.segments.data
    }

    /// The element segments, in module order.
    pub fn element_segments(&self) -> &[ElementSegment] {
        &self.segments.elements
    }

    /// Element segment `index`'s items as packed function indices (null entries as
    /// `PackedOption::default()`), in the form [`FuncResolver::resolve_funcs`](crate::FuncResolver::resolve_funcs) takes.
    pub fn element_funcs(&self, index: usize) -> &[PackedOption<FuncIndex>] {
        self.segments.element_funcs.get(index).map_or(&[], |funcs| funcs)
    }

    /// Element segment `index`'s items that globals give ([`ElementItem::Global`]): each
    /// one's position in the segment and its global. [`element_funcs`](Self::element_funcs)
    /// holds null there.
    pub fn element_globals(&self, index: usize) -> &[(u32, GlobalIndex)] {
        self.segments
            .element_globals
            .get(index)
            .map_or(&[], |globals| globals)
    }

    /// The copy-on-write images of the defined memories' initial data (`None` for a memory
    /// whose data cannot be an image, see [`MemoryImage`], or that has none), built the first
    /// time they are asked for: loading a module into an engine that maps images asks, so
    /// instantiation finds them built. An image that cannot be made (the kernel refuses the
    /// file) is an error, here and every time it is asked again, never a silent copy.
    pub fn memory_images(&self) -> Result<&PrimaryMap<DefinedMemoryIndex, Option<Arc<MemoryImage>>>> {
        self.segments.images.get_or_try_init(|| {
            let mut images = PrimaryMap::new();
            for (defined, _) in self.defined_memories() {
                let image = match self.image_data(defined) {
                    Some(placed) => MemoryImage::new(placed)
                        .with_context(|| {
                            format!(
                                "memory {} of module {}",
                                defined.as_u32(),
                                self.name().unwrap_or("<unnamed>")
                            )
                        })?
                        .map(Arc::new),
                    None => None,
                };
                images.push(image);
            }
            Ok(images)
        })
    }

    /// The copy-on-write image of defined memory `index`, if it has one (see
    /// [`memory_images`](Self::memory_images)).
    pub fn memory_image(&self, index: DefinedMemoryIndex) -> Result<Option<Arc<MemoryImage>>> {
        Ok(self.memory_images()?.get(index).cloned().flatten())
    }

    /// What the active data segments of defined memory `index` put where (offset, bytes), in
    /// order, if they can be an image: every offset known at load and every segment within the
    /// memory's initial size (else they are copied at instantiation, in order, and one out of
    /// bounds fails it).
    fn image_data(&self, index: DefinedMemoryIndex) -> Option<Vec<(usize, &[u8])>> {
        let memory = self.memory_index(index)?;
        let initial = self.memories[memory]
            .minimum_bytes()
            .and_then(|b| usize::try_from(b).ok())?;
        let mut placed = Vec::new();
        for segment in &self.segments.data {
            let DataKind::Active {
                memory: target,
                offset,
            } = segment.kind
            else {
                continue;
            };
            if target != memory {
                continue;
            }
            let start = usize::try_from(self.constant_offset(&offset)?).ok()?;
            let end = start.checked_add(segment.data.len())?;
            if end > initial {
                return None;
            }
            placed.push((start, &segment.data[..]));
        }
        Some(placed)
    }

    /// The defined index of memory `index`, or `None` if it is imported or does not exist.
    pub fn defined_memory_index(&self, index: MemoryIndex) -> Option<DefinedMemoryIndex> {
        self.memories.get(index)?;
        index
            .as_u32()
            .checked_sub(self.num_imported_memories)
            .map(DefinedMemoryIndex::from_u32)
    }

    /// The module-wide index of defined memory `index`, or `None` if it does not exist.
    pub fn memory_index(&self, index: DefinedMemoryIndex) -> Option<MemoryIndex> {
        let i = self.num_imported_memories.checked_add(index.as_u32())?;
        (i < count(self.memories.len())).then(|| MemoryIndex::from_u32(i))
    }

    /// The owned index of defined memory `index` (its slot among the vmctx's memory
    /// definitions), or `None` if the memory is shared.
    pub fn owned_memory_index(&self, index: DefinedMemoryIndex) -> Option<OwnedMemoryIndex> {
        let ty = self.memories.get(self.memory_index(index)?)?;
        if ty.shared {
            return None;
        }
        let owned_before = self
            .defined_memories()
            .take(index.index())
            .filter(|(_, ty)| !ty.shared)
            .count();
        Some(OwnedMemoryIndex::new(owned_before))
    }

    /// The defined index of table `index`, or `None` if it is imported or does not exist.
    pub fn defined_table_index(&self, index: TableIndex) -> Option<DefinedTableIndex> {
        self.tables.get(index)?;
        index
            .as_u32()
            .checked_sub(self.num_imported_tables)
            .map(DefinedTableIndex::from_u32)
    }

    /// The module-wide index of defined table `index`, or `None` if it does not exist.
    pub fn table_index(&self, index: DefinedTableIndex) -> Option<TableIndex> {
        let i = self.num_imported_tables.checked_add(index.as_u32())?;
        (i < count(self.tables.len())).then(|| TableIndex::from_u32(i))
    }
}

/// A count that the builder has already bounded to `u32`.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Builds a [`Module`], checking every type. Imports must come before definitions of the
/// same kind, as in a binary.
#[derive(Debug, Default)]
pub struct ModuleBuilder {
    name: Option<String>,
    num_imported_funcs: u64,
    num_defined_funcs: u64,
    memories: Vec<(bool, MemoryType)>,
    tables: Vec<(bool, TableType)>,
    globals: Vec<(GlobalType, Option<GlobalInit>)>,
    data: Vec<DataSegment>,
    elements: Vec<ElementSegment>,
}

impl ModuleBuilder {
    /// Names the module (shown in error messages).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Adds `n` imported functions.
    pub fn imported_funcs(mut self, n: u32) -> Self {
        self.num_imported_funcs += u64::from(n);
        self
    }

    /// Adds `n` defined functions.
    pub fn defined_funcs(mut self, n: u32) -> Self {
        self.num_defined_funcs += u64::from(n);
        self
    }

    /// Adds an imported memory.
    pub fn import_memory(mut self, ty: MemoryType) -> Self {
        self.memories.push((true, ty));
        self
    }

    /// Adds a defined memory.
    pub fn memory(mut self, ty: MemoryType) -> Self {
        self.memories.push((false, ty));
        self
    }

    /// Adds an imported table.
    pub fn import_table(mut self, ty: TableType) -> Self {
        self.tables.push((true, ty));
        self
    }

    /// Adds a defined table.
    pub fn table(mut self, ty: TableType) -> Self {
        self.tables.push((false, ty));
        self
    }

    /// Adds an imported global.
    pub fn import_global(mut self, ty: GlobalType) -> Self {
        self.globals.push((ty, None));
        self
    }

    /// Adds a defined global with its initial value.
    pub fn global(mut self, ty: GlobalType, init: GlobalInit) -> Self {
        self.globals.push((ty, Some(init)));
        self
    }

    /// Adds a data segment.
    pub fn data(mut self, segment: DataSegment) -> Self {
        self.data.push(segment);
        self
    }

    /// Adds an element segment.
    pub fn element(mut self, segment: ElementSegment) -> Self {
        self.elements.push(segment);
        self
    }

    /// Checks everything and builds the module.
    pub fn build(self) -> Result<Module> {
        let name = self.name.as_deref().unwrap_or("<unnamed>");
        let too_many =
            |what: &str, n: usize| anyhow::anyhow!("module {name} has {n} {what}: more than u32 can index");
        let num_imported_funcs =
            u32::try_from(self.num_imported_funcs).map_err(|_| too_many("imported functions", usize::MAX))?;
        let num_defined_funcs =
            u32::try_from(self.num_defined_funcs).map_err(|_| too_many("defined functions", usize::MAX))?;
        u32::try_from(self.num_imported_funcs + self.num_defined_funcs)
            .map_err(|_| too_many("functions", usize::MAX))?;

        let mut memories = PrimaryMap::new();
        let num_imported_memories = imports_first(name, "memory", self.memories.iter().map(|m| m.0))?;
        for (i, (_, ty)) in self.memories.iter().enumerate() {
            ty.validate()
                .with_context(|| format!("module {name}: memory {i}"))?;
            memories.push(*ty);
        }
        u32::try_from(memories.len()).map_err(|_| too_many("memories", memories.len()))?;

        let mut tables = PrimaryMap::new();
        let num_imported_tables = imports_first(name, "table", self.tables.iter().map(|t| t.0))?;
        for (i, (_, ty)) in self.tables.iter().enumerate() {
            ty.validate()
                .with_context(|| format!("module {name}: table {i}"))?;
            tables.push(*ty);
        }
        u32::try_from(tables.len()).map_err(|_| too_many("tables", tables.len()))?;

        let mut globals = PrimaryMap::new();
        let mut global_inits = PrimaryMap::new();
        let num_imported_globals = imports_first(name, "global", self.globals.iter().map(|g| g.1.is_none()))?;
        for (i, (ty, init)) in self.globals.iter().enumerate() {
            if let Some(init) = init {
                if !init.matches(ty.content) {
                    bail!(
                        "module {name}: global {i} of type {:?} has initializer {init:?}",
                        ty.content
                    );
                }
                if let GlobalInit::GetGlobal(g) = init {
                    // Any earlier immutable global, imported or defined (the constant
                    // expressions of the GC proposal, which Wasm 3.0 includes).
                    let source = self.globals[..i]
                        .get(g.as_u32() as usize)
                        .map(|(source, _)| source);
                    match source {
                        Some(source) if source.content == ty.content && !source.mutable => {}
                        _ => bail!(
                            "module {name}: global {i} is initialized from global {}, which is not an earlier immutable {:?} global",
                            g.as_u32(),
                            ty.content
                        ),
                    }
                }
                if let GlobalInit::RefFunc(f) = init
                    && u64::from(f.as_u32()) >= self.num_imported_funcs + self.num_defined_funcs
                {
                    bail!(
                        "module {name}: global {i} refers to function {} which does not exist",
                        f.as_u32()
                    );
                }
                global_inits.push(*init);
            }
            globals.push(*ty);
        }
        u32::try_from(globals.len()).map_err(|_| too_many("globals", globals.len()))?;

        let offset_ok = |what: String, offset: &ConstExpr, is64: bool| -> Result<()> {
            let ok = match offset {
                ConstExpr::I32(_) => !is64,
                ConstExpr::I64(_) => is64,
                ConstExpr::GlobalGet(g) => {
                    let want = if is64 { ValType::I64 } else { ValType::I32 };
                    globals
                        .get(*g)
                        .is_some_and(|source: &GlobalType| source.content == want && !source.mutable)
                }
            };
            if !ok {
                bail!(
                    "module {name}: {what} has offset {offset:?}, which is not a constant of its index type (a `global.get` must name an immutable global)"
                );
            }
            Ok(())
        };
        let total_funcs = self.num_imported_funcs + self.num_defined_funcs;
        for (i, segment) in self.data.iter().enumerate() {
            if let DataKind::Active { memory, offset } = &segment.kind {
                let Some(ty) = memories.get(*memory) else {
                    bail!(
                        "module {name}: data segment {i} targets memory {}, which does not exist",
                        memory.as_u32()
                    );
                };
                offset_ok(format!("data segment {i}"), offset, ty.memory64)?;
            }
        }
        for (i, segment) in self.elements.iter().enumerate() {
            let mut element = None;
            if let ElementKind::Active { table, offset } = &segment.kind {
                let Some(ty) = tables.get(*table) else {
                    bail!(
                        "module {name}: element segment {i} targets table {}, which does not exist",
                        table.as_u32()
                    );
                };
                offset_ok(format!("element segment {i}"), offset, ty.table64)?;
                element = Some(ty.element);
            }
            for item in &segment.items {
                match item {
                    ElementItem::Func(f) if u64::from(f.as_u32()) >= total_funcs => bail!(
                        "module {name}: element segment {i} refers to function {}, which does not exist",
                        f.as_u32()
                    ),
                    ElementItem::Global(g) => {
                        // A reference of the kind the target table holds (any kind for a passive
                        // segment, checked by whatever applies it).
                        let fits = |content: ValType| {
                            matches!(
                                (content, element),
                                (ValType::FuncRef, None | Some(TableElementType::Func))
                                    | (ValType::ExternRef, None | Some(TableElementType::Extern))
                            )
                        };
                        let reference = globals
                            .get(*g)
                            .is_some_and(|source: &GlobalType| fits(source.content) && !source.mutable);
                        if !reference {
                            bail!(
                                "module {name}: element segment {i} reads global {}, which is not an immutable reference global of its table's element type",
                                g.as_u32()
                            );
                        }
                    }
                    _ => {}
                }
            }
        }

        let mut module = Module {
            id: ModuleId::next(),
            name: self.name,
            num_imported_funcs,
            num_defined_funcs,
            num_imported_memories,
            num_imported_tables,
            num_imported_globals,
            memories,
            tables,
            globals,
            global_inits,
            segments: Arc::new(Segments {
                data: self.data,
                element_funcs: self
                    .elements
                    .iter()
                    .map(|segment| {
                        segment
                            .items
                            .iter()
                            .map(|item| match item {
                                ElementItem::Func(func) => PackedOption::from(*func),
                                ElementItem::Null | ElementItem::Global(_) => PackedOption::default(),
                            })
                            .collect()
                    })
                    .collect(),
                element_globals: self
                    .elements
                    .iter()
                    .map(|segment| {
                        (0u32..)
                            .zip(&segment.items)
                            .filter_map(|(at, item)| match item {
                                ElementItem::Global(g) => Some((at, *g)),
                                _ => None,
                            })
                            .collect()
                    })
                    .collect(),
                elements: self.elements,
                images: OnceCell::new(),
            }),
            vmctx_fields: VMOffsetsFields::default(),
        };
        module.vmctx_fields = VMOffsetsFields {
            num_imported_functions: module.num_imported_funcs(),
            num_imported_tables: module.num_imported_tables(),
            num_imported_memories: module.num_imported_memories(),
            num_imported_globals: module.num_imported_globals(),
            num_defined_tables: module.num_defined_tables(),
            num_defined_memories: module.num_defined_memories(),
            num_owned_memories: module.num_owned_memories(),
            num_defined_globals: module.num_defined_globals(),
        };
        Ok(module)
    }
}

// A module's layout is built here, from the counts its loading computed: `vmoffsets` knows
// counts and pointer widths, not modules.
impl<P: PtrSize> VMOffsets<P> {
    /// The layout for `module`: where compiled code finds each import, definition and global
    /// in the vmctx.
    ///
    /// ```
    /// use berth_core::{DefinedMemoryIndex, HostPtr, InstanceBlock, MemoryType, Module, VMOffsets};
    ///
    /// let module = Module::builder().memory(MemoryType::new(1, None)).build()?;
    /// let offsets = VMOffsets::new(HostPtr, &module)?;
    /// let definition = offsets.vmctx_vmmemory_definition(berth_core::OwnedMemoryIndex::from_u32(0));
    /// assert!(definition + offsets.size_of_vmmemory_definition() <= offsets.size_of_vmctx());
    /// // The instance block: the `Instance` with the vmctx after it.
    /// let block = InstanceBlock::layout(&offsets)?;
    /// assert!(block.size() > offsets.size_of_vmctx() as usize);
    /// # let _ = DefinedMemoryIndex::from_u32(0);
    /// # anyhow::Ok(())
    /// ```
    pub fn new(ptr: P, module: &Module) -> Result<Self> {
        Self::from_fields(ptr, *module.vmctx_fields())
    }
}

/// Counts the leading imports and rejects an import that follows a definition.
fn imports_first(name: &str, what: &str, is_import: impl Iterator<Item = bool>) -> Result<u32> {
    let mut imported = 0u32;
    let mut seen_defined = false;
    for (i, import) in is_import.enumerate() {
        match (import, seen_defined) {
            (true, true) => bail!("module {name}: {what} {i} is an import after a defined {what}"),
            (true, false) => {
                imported = imported
                    .checked_add(1)
                    .with_context(|| format!("module {name}: too many imported {what} entries"))?;
            }
            (false, _) => seen_defined = true,
        }
    }
    Ok(imported)
}
