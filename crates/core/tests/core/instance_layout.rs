//! The instance block: its layout holds an `Instance` and the vmctx, every definition
//! location lies inside it, aligned.

use berth_core::vmoffsets::VMCTX_ALIGN;
use berth_core::{HostPtr, InstanceBlock, VMMemoryDefinition, VMOffsets, VMOffsetsFields, VMTableDefinition};
use proptest::prelude::*;

proptest! {
    #[test]
    fn definitions_lie_inside_the_block(mems in 0u32..20, owned_gap in 0u32..3, tables in 0u32..20, globals in 0u32..20, imports in 0u32..10) {
        let fields = VMOffsetsFields {
            num_imported_functions: imports,
            num_imported_memories: imports,
            num_defined_memories: mems + owned_gap,
            num_owned_memories: mems,
            num_defined_tables: tables,
            num_defined_globals: globals,
            ..VMOffsetsFields::default()
        };
        let offsets = VMOffsets::from_fields(HostPtr, fields).unwrap();
        let layout = InstanceBlock::layout(&offsets).unwrap();
        prop_assert!(layout.align() >= VMCTX_ALIGN as usize);
        prop_assert!(layout.align() >= align_of::<berth_core::Instance>());
        prop_assert!(layout.size() >= size_of::<berth_core::Instance>() + offsets.size_of_vmctx() as usize);
        prop_assert_eq!(layout.size() % layout.align(), 0);

        let (block, memories, table_defs) = InstanceBlock::new(&offsets).unwrap();
        prop_assert_eq!(memories.len(), mems as usize);
        prop_assert_eq!(table_defs.len(), tables as usize);
        let vmctx = block.vmctx().as_ptr() as usize;
        prop_assert_eq!(vmctx % VMCTX_ALIGN as usize, 0);
        let block_end = vmctx + offsets.size_of_vmctx() as usize;
        for location in &memories {
            let at = location.as_ptr() as usize;
            prop_assert!(at >= vmctx && at + size_of::<VMMemoryDefinition>() <= block_end);
            prop_assert_eq!(at % align_of::<VMMemoryDefinition>(), 0);
            // The block is zeroed: a definition starts null.
            // SAFETY: the location is inside the live, zeroed block (checked above).
            let definition = unsafe { location.as_ptr().read() };
            prop_assert_eq!(definition, VMMemoryDefinition::default());
        }
        for location in &table_defs {
            let at = location.as_ptr() as usize;
            prop_assert!(at >= vmctx && at + size_of::<VMTableDefinition>() <= block_end);
            prop_assert_eq!(at % align_of::<VMTableDefinition>(), 0);
        }
        let mut all: Vec<usize> = memories.iter().map(|p| p.as_ptr() as usize)
            .chain(table_defs.iter().map(|p| p.as_ptr() as usize)).collect();
        all.sort_unstable();
        all.dedup();
        prop_assert_eq!(all.len(), memories.len() + table_defs.len(), "two definitions share a location");
    }
}
