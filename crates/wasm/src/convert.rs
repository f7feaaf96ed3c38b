//! Converting `wasmparser`'s types and constant expressions into Berth's.

use anyhow::{Result, anyhow, bail};
use berth_core::{
    ConstExpr, ElementItem, FuncIndex, GlobalIndex, GlobalInit, GlobalType, MemoryType, TableElementType,
    TableType, ValType,
};
use wasmparser::{BinaryReaderError, Operator, RefType};

/// A `wasmparser` error as Berth reports it: the byte offset, then what was wrong.
pub(crate) fn malformed(error: &BinaryReaderError) -> anyhow::Error {
    anyhow!(
        "malformed module at byte offset {:#x}: {}",
        error.offset(),
        error.message()
    )
}

pub(crate) fn memory_type(ty: &wasmparser::MemoryType, offset: u64) -> Result<MemoryType> {
    let page_size_log2 = match ty.page_size_log2 {
        None => 16,
        Some(0) => 0,
        Some(16) => 16,
        Some(other) => bail!("unsupported memory at byte offset {offset:#x}: page size 2^{other}"),
    };
    Ok(MemoryType {
        minimum: ty.initial,
        maximum: ty.maximum,
        memory64: ty.memory64,
        shared: ty.shared,
        page_size_log2,
    })
}

fn ref_type(ty: RefType, offset: u64) -> Result<TableElementType> {
    if ty.is_func_ref() {
        Ok(TableElementType::Func)
    } else if ty.is_extern_ref() {
        Ok(TableElementType::Extern)
    } else {
        bail!("unsupported reference type {ty} at byte offset {offset:#x}: only funcref and externref")
    }
}

pub(crate) fn table_type(ty: &wasmparser::TableType, offset: u64) -> Result<TableType> {
    Ok(TableType {
        element: ref_type(ty.element_type, offset)?,
        minimum: ty.initial,
        maximum: ty.maximum,
        table64: ty.table64,
    })
}

pub(crate) fn global_type(ty: &wasmparser::GlobalType, offset: u64) -> Result<GlobalType> {
    let content = match ty.content_type {
        wasmparser::ValType::I32 => ValType::I32,
        wasmparser::ValType::I64 => ValType::I64,
        wasmparser::ValType::F32 => ValType::F32,
        wasmparser::ValType::F64 => ValType::F64,
        wasmparser::ValType::V128 => ValType::V128,
        wasmparser::ValType::Ref(r) => match ref_type(r, offset)? {
            TableElementType::Func => ValType::FuncRef,
            TableElementType::Extern => ValType::ExternRef,
        },
    };
    Ok(GlobalType {
        content,
        mutable: ty.mutable,
    })
}

/// An instruction's name as wasmparser spells its operator (`I32Add`, `StructNew`), without
/// its operands.
fn instruction(op: &Operator<'_>) -> String {
    let debug = format!("{op:?}");
    let end = debug
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(debug.len());
    debug[..end].to_owned()
}

/// The single operator of a constant expression (validated: it ends with `end`).
fn single<'a>(expr: &wasmparser::ConstExpr<'a>) -> Result<Operator<'a>> {
    let mut reader = expr.get_operators_reader();
    let offset = reader.original_position();
    let first = reader.read().map_err(|e| malformed(&e))?;
    let second = reader.read().map_err(|e| malformed(&e))?;
    if !matches!(second, Operator::End) {
        bail!("unsupported constant expression at byte offset {offset:#x}: extended constant expressions");
    }
    Ok(first)
}

/// A segment offset.
pub(crate) fn const_expr(expr: &wasmparser::ConstExpr<'_>) -> Result<ConstExpr> {
    let offset = expr.get_binary_reader().original_position();
    match single(expr)? {
        Operator::I32Const { value } => Ok(ConstExpr::I32(value)),
        Operator::I64Const { value } => Ok(ConstExpr::I64(value)),
        Operator::GlobalGet { global_index } => Ok(ConstExpr::GlobalGet(GlobalIndex::from_u32(global_index))),
        other => bail!(
            "unsupported segment offset at byte offset {offset:#x}: the `{}` instruction",
            instruction(&other)
        ),
    }
}

/// A global's initial value.
pub(crate) fn global_init(expr: &wasmparser::ConstExpr<'_>, _ty: ValType) -> Result<GlobalInit> {
    let offset = expr.get_binary_reader().original_position();
    Ok(match single(expr)? {
        Operator::I32Const { value } => GlobalInit::I32(value),
        Operator::I64Const { value } => GlobalInit::I64(value),
        Operator::F32Const { value } => GlobalInit::F32(value.bits()),
        Operator::F64Const { value } => GlobalInit::F64(value.bits()),
        Operator::V128Const { value } => GlobalInit::V128(u128::from_le_bytes(*value.bytes())),
        Operator::RefNull { .. } => GlobalInit::RefNull,
        Operator::RefFunc { function_index } => GlobalInit::RefFunc(FuncIndex::from_u32(function_index)),
        Operator::GlobalGet { global_index } => GlobalInit::GetGlobal(GlobalIndex::from_u32(global_index)),
        other => bail!(
            "unsupported global initializer at byte offset {offset:#x}: the `{}` instruction",
            instruction(&other)
        ),
    })
}

/// One element of an expression-encoded element segment.
pub(crate) fn element_item(expr: &wasmparser::ConstExpr<'_>) -> Result<ElementItem> {
    let offset = expr.get_binary_reader().original_position();
    match single(expr)? {
        Operator::RefNull { .. } => Ok(ElementItem::Null),
        Operator::RefFunc { function_index } => Ok(ElementItem::Func(FuncIndex::from_u32(function_index))),
        Operator::GlobalGet { global_index } => Ok(ElementItem::Global(GlobalIndex::from_u32(global_index))),
        other => bail!(
            "unsupported element expression at byte offset {offset:#x}: the `{}` instruction",
            instruction(&other)
        ),
    }
}
