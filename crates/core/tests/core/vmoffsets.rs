//! The vmctx layout: regions never overlap, are aligned, and are sized by the counts, for a
//! 4-byte and an 8-byte pointer; a layout that cannot fit is an error.

use berth_core::vmoffsets::VMCTX_ALIGN;
use berth_core::{
    DefinedGlobalIndex, DefinedMemoryIndex, DefinedTableIndex, FuncIndex, GlobalIndex, HostPtr, MemoryIndex,
    OwnedMemoryIndex, PtrSize, TableIndex, VMGlobalDefinition, VMMemoryDefinition, VMOffsets,
    VMOffsetsFields, VMTableDefinition,
};
use proptest::prelude::*;

fn fields() -> impl Strategy<Value = VMOffsetsFields> {
    (
        0u32..200,
        0u32..20,
        0u32..20,
        0u32..50,
        0u32..20,
        0u32..20,
        0u32..50,
    )
        .prop_flat_map(|(f, it, im, ig, dt, dm, dg)| {
            (0..=dm).prop_map(move |owned| VMOffsetsFields {
                num_imported_functions: f,
                num_imported_tables: it,
                num_imported_memories: im,
                num_imported_globals: ig,
                num_defined_tables: dt,
                num_defined_memories: dm,
                num_owned_memories: owned,
                num_defined_globals: dg,
            })
        })
}

fn check_layout(ptr: u8, fields: VMOffsetsFields) {
    let offsets = VMOffsets::from_fields(ptr, fields).unwrap();
    let p = u32::from(ptr);
    let regions = offsets.regions();
    let expected = [
        (fields.num_imported_functions, 2 * p),
        (fields.num_imported_tables, 2 * p),
        (fields.num_imported_memories, 2 * p),
        (fields.num_imported_globals, p),
        (fields.num_defined_tables, 2 * p),
        (fields.num_defined_memories, p),
        (fields.num_owned_memories, 2 * p),
        (fields.num_defined_globals, 16),
    ];
    let mut end = 0;
    for (region, (count, entry)) in regions.iter().zip(expected) {
        assert_eq!(
            (region.count, region.entry_size),
            (count, entry),
            "{}",
            region.name
        );
        assert!(
            region.offset >= end,
            "{} overlaps the region before it",
            region.name
        );
        let align = if region.name == "defined globals" { 16 } else { p };
        assert_eq!(region.offset % align, 0, "{} is misaligned", region.name);
        end = region.offset + region.size();
    }
    assert!(offsets.size_of_vmctx() >= end);
    assert!(offsets.size_of_vmctx() < end + VMCTX_ALIGN);
    assert_eq!(offsets.size_of_vmctx() % VMCTX_ALIGN, 0);

    // Every per-index accessor lands in its own region, one entry apart.
    let within = |name: &str, offset: u32, size: u32| {
        let region = regions.iter().find(|r| r.name == name).unwrap();
        assert!(
            offset >= region.offset && offset + size <= region.offset + region.size(),
            "{name} entry outside"
        );
    };
    for i in 0..fields.num_imported_functions {
        within(
            "imported functions",
            offsets.vmctx_vmfunction_import(FuncIndex::from_u32(i)),
            2 * p,
        );
    }
    for i in 0..fields.num_imported_tables {
        within(
            "imported tables",
            offsets.vmctx_vmtable_import(TableIndex::from_u32(i)),
            2 * p,
        );
    }
    for i in 0..fields.num_imported_memories {
        within(
            "imported memories",
            offsets.vmctx_vmmemory_import(MemoryIndex::from_u32(i)),
            2 * p,
        );
    }
    for i in 0..fields.num_imported_globals {
        within(
            "imported globals",
            offsets.vmctx_vmglobal_import(GlobalIndex::from_u32(i)),
            p,
        );
    }
    for i in 0..fields.num_defined_tables {
        within(
            "defined tables",
            offsets.vmctx_vmtable_definition(DefinedTableIndex::from_u32(i)),
            2 * p,
        );
    }
    for i in 0..fields.num_defined_memories {
        within(
            "defined memory pointers",
            offsets.vmctx_vmmemory_pointer(DefinedMemoryIndex::from_u32(i)),
            p,
        );
    }
    for i in 0..fields.num_owned_memories {
        within(
            "owned memory definitions",
            offsets.vmctx_vmmemory_definition(OwnedMemoryIndex::from_u32(i)),
            2 * p,
        );
    }
    for i in 0..fields.num_defined_globals {
        let offset = offsets.vmctx_vmglobal_definition(DefinedGlobalIndex::from_u32(i));
        within("defined globals", offset, 16);
        assert_eq!(offset % 16, 0);
    }
}

proptest! {
    #[test]
    fn regions_are_disjoint_aligned_and_sized_64(fields in fields()) {
        check_layout(8, fields);
    }

    #[test]
    fn regions_are_disjoint_aligned_and_sized_32(fields in fields()) {
        check_layout(4, fields);
    }

    #[test]
    fn a_wider_pointer_never_shrinks_the_vmctx(fields in fields()) {
        let narrow = VMOffsets::from_fields(4u8, fields).unwrap();
        let wide = VMOffsets::from_fields(8u8, fields).unwrap();
        prop_assert!(wide.size_of_vmctx() >= narrow.size_of_vmctx());
    }
}

#[test]
fn host_structures_match_the_host_offsets() {
    let offsets = VMOffsets::from_fields(HostPtr, VMOffsetsFields::default()).unwrap();
    assert_eq!(usize::from(HostPtr.size()), size_of::<usize>());
    assert_eq!(
        offsets.size_of_vmmemory_definition() as usize,
        size_of::<VMMemoryDefinition>()
    );
    assert_eq!(
        offsets.size_of_vmtable_definition() as usize,
        size_of::<VMTableDefinition>()
    );
    assert_eq!(
        offsets.size_of_vmglobal_definition() as usize,
        size_of::<VMGlobalDefinition>()
    );
    assert_eq!(
        offsets.vmmemory_definition_current_length() as usize,
        std::mem::offset_of!(VMMemoryDefinition, current_length)
    );
    assert_eq!(
        offsets.vmtable_definition_current_elements() as usize,
        std::mem::offset_of!(VMTableDefinition, current_elements)
    );
    assert_eq!(offsets.size_of_vmctx(), 0);
}

#[test]
fn a_vmctx_over_four_gib_is_an_error() {
    let fields = VMOffsetsFields {
        num_imported_functions: u32::MAX,
        num_defined_globals: u32::MAX,
        ..VMOffsetsFields::default()
    };
    let error = VMOffsets::from_fields(8u8, fields).unwrap_err().to_string();
    assert!(error.contains("does not fit in 4 GiB"), "{error}");
    let fields = VMOffsetsFields {
        num_defined_globals: u32::MAX / 16 + 1,
        ..VMOffsetsFields::default()
    };
    assert!(VMOffsets::from_fields(4u8, fields).is_err());
}

#[test]
fn odd_pointer_sizes_and_inconsistent_counts_are_errors() {
    assert!(VMOffsets::from_fields(3u8, VMOffsetsFields::default()).is_err());
    let fields = VMOffsetsFields {
        num_defined_memories: 1,
        num_owned_memories: 2,
        ..VMOffsetsFields::default()
    };
    assert!(VMOffsets::from_fields(8u8, fields).is_err());
}

#[test]
fn the_breakdown_names_every_non_empty_region() {
    let fields = VMOffsetsFields {
        num_imported_functions: 2,
        num_defined_globals: 3,
        ..VMOffsetsFields::default()
    };
    let offsets = VMOffsets::from_fields(8u8, fields).unwrap();
    let text = offsets.region_breakdown().to_string();
    assert_eq!(
        text,
        "vmctx 80 bytes = imported functions 2 x 16 at 0, defined globals 3 x 16 at 32"
    );
}
