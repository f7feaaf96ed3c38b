//! Reading module facts from text and binary modules.

use berth_core::{
    ConstExpr, DataKind, ElementItem, ElementKind, FuncIndex, GlobalIndex, GlobalInit, MemoryIndex,
    TableElementType, TableIndex, ValType,
};

const RICH: &str = r#"
(module
  (import "env" "f" (func))
  (import "env" "base" (global $base i32))
  (import "env" "mem" (memory 1))
  (import "env" "tab" (table 2 funcref))
  (func $a) (func $b)
  (memory 2 10)
  (memory i64 1)
  (memory 100 (pagesize 1))
  (table 4 8 funcref)
  (table 1 externref)
  (global (mut i32) (i32.const -5))
  (global i64 (i64.const 7))
  (global f32 (f32.const 1.5))
  (global funcref (ref.func $b))
  (global i32 (global.get $base))
  (data (memory 1) (i32.const 16) "hello")
  (data (memory 2) (i64.const 8) "wide")
  (data (memory 1) (global.get $base) "there")
  (data "passive")
  (elem (table 1) (i32.const 1) func $a $b)
  (elem (table 1) (i32.const 0) funcref (ref.null func) (ref.func $a))
  (elem func $b)
  (elem declare func $a)
)
"#;

#[test]
fn a_rich_text_module_is_read_whole() {
    let module = berth_wasm::parse(RICH.as_bytes()).unwrap();
    assert_eq!((module.num_imported_funcs(), module.num_defined_funcs()), (1, 2));
    assert_eq!(
        (module.num_imported_memories(), module.num_defined_memories()),
        (1, 3)
    );
    assert_eq!(
        (module.num_imported_tables(), module.num_defined_tables()),
        (1, 2)
    );
    assert_eq!(
        (module.num_imported_globals(), module.num_defined_globals()),
        (1, 5)
    );

    let memories: Vec<_> = module.memories().values().copied().collect();
    assert_eq!(
        (memories[1].minimum, memories[1].maximum, memories[1].memory64),
        (2, Some(10), false)
    );
    assert!(memories[2].memory64);
    assert_eq!((memories[3].minimum, memories[3].page_size_log2), (100, 0));
    let tables: Vec<_> = module.tables().values().copied().collect();
    assert_eq!(
        (tables[1].minimum, tables[1].maximum, tables[1].element),
        (4, Some(8), TableElementType::Func)
    );
    assert_eq!(tables[2].element, TableElementType::Extern);

    let inits: Vec<_> = module
        .defined_globals()
        .map(|(_, ty, init)| (ty.content, *init))
        .collect();
    assert_eq!(inits[0], (ValType::I32, GlobalInit::I32(-5)));
    assert_eq!(inits[1], (ValType::I64, GlobalInit::I64(7)));
    assert_eq!(inits[2], (ValType::F32, GlobalInit::F32(1.5f32.to_bits())));
    assert_eq!(
        inits[3],
        (ValType::FuncRef, GlobalInit::RefFunc(FuncIndex::from_u32(2)))
    );
    assert_eq!(
        inits[4],
        (ValType::I32, GlobalInit::GetGlobal(GlobalIndex::from_u32(0)))
    );

    let data = module.data_segments();
    assert_eq!(data.len(), 4);
    assert_eq!(
        data[0].kind,
        DataKind::Active {
            memory: MemoryIndex::from_u32(1),
            offset: ConstExpr::I32(16)
        }
    );
    assert_eq!(&*data[0].data, b"hello");
    assert_eq!(
        data[1].kind,
        DataKind::Active {
            memory: MemoryIndex::from_u32(2),
            offset: ConstExpr::I64(8)
        }
    );
    assert_eq!(
        data[2].kind,
        DataKind::Active {
            memory: MemoryIndex::from_u32(1),
            offset: ConstExpr::GlobalGet(GlobalIndex::from_u32(0))
        }
    );
    assert_eq!(data[3].kind, DataKind::Passive);

    let elements = module.element_segments();
    assert_eq!(elements.len(), 4);
    assert_eq!(
        elements[0].kind,
        ElementKind::Active {
            table: TableIndex::from_u32(1),
            offset: ConstExpr::I32(1)
        }
    );
    assert_eq!(
        elements[0].items,
        vec![
            ElementItem::Func(FuncIndex::from_u32(1)),
            ElementItem::Func(FuncIndex::from_u32(2))
        ]
    );
    assert_eq!(
        elements[1].items,
        vec![ElementItem::Null, ElementItem::Func(FuncIndex::from_u32(1))]
    );
    assert_eq!(elements[2].kind, ElementKind::Passive);
    assert_eq!(elements[3].kind, ElementKind::Declared);
}

#[test]
fn binary_and_text_give_the_same_facts() {
    let binary = wat::parse_str(RICH).unwrap();
    let from_binary = berth_wasm::parse(&binary).unwrap();
    let from_text = berth_wasm::parse(RICH.as_bytes()).unwrap();
    assert_eq!(
        format!("{:?}", from_binary.memories()),
        format!("{:?}", from_text.memories())
    );
    assert_eq!(from_binary.data_segments(), from_text.data_segments());
    assert_eq!(from_binary.element_segments(), from_text.element_segments());
}

#[test]
fn files_are_read_and_named() {
    let dir = std::env::temp_dir().join(format!("berth-wasm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("named.wasm");
    std::fs::write(&path, wat::parse_str("(module (memory 1))").unwrap()).unwrap();
    assert_eq!(berth_wasm::parse_file(&path).unwrap().name(), Some("named"));
    let error = format!(
        "{:#}",
        berth_wasm::parse_file(dir.join("missing.wasm")).unwrap_err()
    );
    assert!(error.contains("missing.wasm"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn malformed_input_is_a_clear_error() {
    let binary = wat::parse_str("(module (memory 1) (data (i32.const 0) \"abc\"))").unwrap();
    let truncated = &binary[..binary.len() - 3];
    let error = berth_wasm::parse(truncated).unwrap_err().to_string();
    assert!(error.contains("byte offset 0x"), "{error}");

    let error = berth_wasm::parse(b"(module (memory))").unwrap_err().to_string();
    assert!(error.contains("malformed WebAssembly text"), "{error}");

    let error = berth_wasm::parse(&[0xff, 0xfe, 0x00]).unwrap_err().to_string();
    assert!(error.contains("not a WebAssembly binary"), "{error}");

    let invalid = wat::parse_str("(module (data (i32.const 0) \"x\"))");
    // wat itself accepts a data segment without a memory; validation must not.
    if let Ok(bytes) = invalid {
        let error = berth_wasm::parse(&bytes).unwrap_err().to_string();
        assert!(error.contains("byte offset"), "{error}");
    }
}

#[test]
fn unsupported_features_are_named() {
    let error = berth_wasm::parse(b"(module (memory 1) (data (i32.add (i32.const 1) (i32.const 2)) \"x\"))")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("extended constant expressions") || error.contains("byte offset"),
        "{error}"
    );

    let error = berth_wasm::parse(b"(component)").unwrap_err().to_string();
    assert!(
        error.contains("component") || error.contains("malformed"),
        "{error}"
    );
}
