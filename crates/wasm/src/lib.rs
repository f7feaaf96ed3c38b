//! Berth's front-end: reads what instance allocation needs from a WebAssembly module, binary
//! (`.wasm`) or text (`.wat`), into [`berth_core::Module`] facts.
//!
//! It reads memories (multi-memory, memory64 and custom page sizes included), tables, globals
//! and their constant initializers, imports, and active and passive data and element segments
//! (offsets as constants or `global.get` of an immutable global; element items as functions,
//! nulls or `global.get` of an immutable reference global). It validates the module first
//! (with `wasmparser`), so a malformed binary is an error that names the byte offset and what
//! was wrong, never a panic. It does not compile code: functions are only counted.
//!
//! What it rejects, with a clear error: components, exception-handling tags, tables with an
//! initializer expression, GC reference types, and extended constant expressions (`i32.add` in
//! an offset).
//!
//! ```
//! let module = berth_wasm::parse(br#"(module (memory 1 4) (data (i32.const 8) "hi"))"#)?;
//! assert_eq!(module.num_defined_memories(), 1);
//! assert_eq!(module.data_segments().len(), 1);
//! # anyhow::Ok(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod convert;

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use berth_core::{
    DataKind, DataSegment, ElementItem, ElementKind, ElementSegment, FuncIndex, GlobalInit, MemoryIndex,
    Module, TableIndex,
};
use wasmparser::{Encoding, Parser, Payload, TypeRef, Validator, WasmFeatures};

use convert::{const_expr, global_init, global_type, malformed, memory_type, table_type};

/// The proposals whose modules Berth reads besides the defaults.
fn features() -> WasmFeatures {
    WasmFeatures::default()
        | WasmFeatures::MEMORY64
        | WasmFeatures::MULTI_MEMORY
        | WasmFeatures::CUSTOM_PAGE_SIZES
        | WasmFeatures::THREADS
}

/// Reads a module from `bytes`, binary or text.
pub fn parse(bytes: &[u8]) -> Result<Module> {
    parse_named(None, bytes)
}

/// Reads the module in the file at `path`, binary or text; the module is named after the file.
pub fn parse_file(path: impl AsRef<Path>) -> Result<Module> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    // A `.wasm` file is a binary: read as text, an empty or truncated one would get a parser's
    // complaint about text it never had.
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("wasm")) && !bytes.starts_with(b"\0asm") {
        let head = &bytes[..bytes.len().min(4)];
        let what = if bytes.is_empty() {
            "it is empty".to_owned()
        } else {
            let hex: Vec<String> = head.iter().map(|b| format!("0x{b:02x}")).collect();
            let text = std::str::from_utf8(head)
                .is_ok_and(|t| t.chars().all(|c| !c.is_control() || c.is_whitespace()));
            format!(
                "its first {} bytes are {}{}",
                head.len(),
                hex.join(" "),
                if text {
                    ": it looks like text (a module in the text format goes in a .wat file)"
                } else {
                    ""
                }
            )
        };
        bail!(
            "{} is not a WebAssembly binary: a .wasm file starts with the \\0asm header, and {what}",
            path.display()
        );
    }
    parse_named(name.as_deref(), &bytes).with_context(|| format!("failed to load {}", path.display()))
}

/// Reads a module from `bytes` (binary or text) and names it `name`.
pub fn parse_named(name: Option<&str>, bytes: &[u8]) -> Result<Module> {
    if bytes.starts_with(b"\0asm") {
        return parse_binary(name, bytes);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "not a WebAssembly binary (no \\0asm header) nor UTF-8 text: invalid byte at offset {}",
            e.valid_up_to()
        )
    })?;
    let binary = wat::parse_str(text).map_err(|e| anyhow!("malformed WebAssembly text: {e}"))?;
    parse_binary(name, &binary)
}

fn parse_binary(name: Option<&str>, bytes: &[u8]) -> Result<Module> {
    Validator::new_with_features(features())
        .validate_all(bytes)
        .map_err(|e| malformed(&e))?;
    let mut builder = Module::builder();
    if let Some(name) = name {
        builder = builder.name(name);
    }
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| malformed(&e))?;
        builder = match payload {
            Payload::Version {
                encoding: Encoding::Component,
                ..
            } => {
                bail!("a WebAssembly component, not a core module: components are not supported")
            }
            Payload::ImportSection(reader) => {
                let mut builder = builder;
                for import in reader.into_imports_with_offsets() {
                    let (offset, import) = import.map_err(|e| malformed(&e))?;
                    builder = match import.ty {
                        TypeRef::Func(_) | TypeRef::FuncExact(_) => builder.imported_funcs(1),
                        TypeRef::Table(ty) => builder.import_table(table_type(&ty, offset)?),
                        TypeRef::Memory(ty) => builder.import_memory(memory_type(&ty, offset)?),
                        TypeRef::Global(ty) => builder.import_global(global_type(&ty, offset)?),
                        TypeRef::Tag(_) => {
                            bail!("unsupported import at byte offset {offset:#x}: exception-handling tags")
                        }
                    };
                }
                builder
            }
            Payload::FunctionSection(reader) => builder.defined_funcs(reader.count()),
            Payload::TableSection(reader) => {
                let mut builder = builder;
                for table in reader.into_iter_with_offsets() {
                    let (offset, table) = table.map_err(|e| malformed(&e))?;
                    if let wasmparser::TableInit::Expr(_) = table.init {
                        bail!("unsupported table at byte offset {offset:#x}: initializer expressions");
                    }
                    builder = builder.table(table_type(&table.ty, offset)?);
                }
                builder
            }
            Payload::MemorySection(reader) => {
                let mut builder = builder;
                for memory in reader.into_iter_with_offsets() {
                    let (offset, memory) = memory.map_err(|e| malformed(&e))?;
                    builder = builder.memory(memory_type(&memory, offset)?);
                }
                builder
            }
            Payload::TagSection(reader) if reader.count() > 0 => {
                bail!(
                    "unsupported tag section at byte offset {:#x}: exception handling",
                    reader.range().start
                )
            }
            Payload::GlobalSection(reader) => {
                let mut builder = builder;
                for global in reader.into_iter_with_offsets() {
                    let (offset, global) = global.map_err(|e| malformed(&e))?;
                    let ty = global_type(&global.ty, offset)?;
                    let init: GlobalInit = global_init(&global.init_expr, ty.content)?;
                    builder = builder.global(ty, init);
                }
                builder
            }
            Payload::DataSection(reader) => {
                let mut builder = builder;
                for data in reader {
                    let data = data.map_err(|e| malformed(&e))?;
                    let kind = match data.kind {
                        wasmparser::DataKind::Passive => DataKind::Passive,
                        wasmparser::DataKind::Active {
                            memory_index,
                            offset_expr,
                        } => DataKind::Active {
                            memory: MemoryIndex::from_u32(memory_index),
                            offset: const_expr(&offset_expr)?,
                        },
                    };
                    builder = builder.data(DataSegment {
                        kind,
                        data: Arc::from(data.data),
                    });
                }
                builder
            }
            Payload::ElementSection(reader) => {
                let mut builder = builder;
                for element in reader {
                    let element = element.map_err(|e| malformed(&e))?;
                    let kind = match element.kind {
                        wasmparser::ElementKind::Passive => ElementKind::Passive,
                        wasmparser::ElementKind::Declared => ElementKind::Declared,
                        wasmparser::ElementKind::Active {
                            table_index,
                            offset_expr,
                        } => ElementKind::Active {
                            table: TableIndex::from_u32(table_index.unwrap_or(0)),
                            offset: const_expr(&offset_expr)?,
                        },
                    };
                    let items = match element.items {
                        wasmparser::ElementItems::Functions(functions) => functions
                            .into_iter()
                            .map(|f| {
                                f.map(|f| ElementItem::Func(FuncIndex::from_u32(f)))
                                    .map_err(|e| malformed(&e))
                            })
                            .collect::<Result<Vec<_>>>()?,
                        wasmparser::ElementItems::Expressions(_, exprs) => exprs
                            .into_iter()
                            .map(|expr| convert::element_item(&expr.map_err(|e| malformed(&e))?))
                            .collect::<Result<Vec<_>>>()?,
                    };
                    builder = builder.element(ElementSegment { kind, items });
                }
                builder
            }
            _ => builder,
        };
    }
    builder.build()
}
