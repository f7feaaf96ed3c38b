//! The modules the suite instantiates.

use std::sync::Arc;

use berth_core::{ConstExpr, DataKind, DataSegment, MemoryIndex, MemoryType, Module, TableType};

use crate::Capabilities;

pub(crate) const PAGE: usize = 65536;

/// A module with its shape, for the model.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    /// Memories as (minimum pages, maximum pages).
    pub memories: Vec<(u64, u64)>,
    /// Tables as (minimum, maximum) elements.
    pub tables: Vec<(u64, u64)>,
    /// Active data segments as (memory, offset, length, byte): a backend with copy-on-write
    /// images maps them, another copies them.
    pub data: Vec<(u32, usize, usize, u8)>,
}

impl Shape {
    /// Memories and tables, no data.
    pub fn plain(memories: Vec<(u64, u64)>, tables: Vec<(u64, u64)>) -> Shape {
        Shape {
            memories,
            tables,
            data: Vec::new(),
        }
    }

    pub fn build(&self, name: &str) -> Module {
        let mut builder = Module::builder().name(name);
        for &(min, max) in &self.memories {
            builder = builder.memory(MemoryType::new(min, Some(max)));
        }
        for &(min, max) in &self.tables {
            builder = builder.table(TableType::new(min, Some(max)));
        }
        for &(memory, offset, len, byte) in &self.data {
            builder = builder.data(DataSegment {
                kind: DataKind::Active {
                    memory: MemoryIndex::from_u32(memory),
                    offset: ConstExpr::I32(i32::try_from(offset).expect("suite offsets are small")),
                },
                data: Arc::from(vec![byte; len]),
            });
        }
        builder.build().expect("suite modules are well-formed")
    }

    /// What memory `i` of a fresh instance holds: its minimum size of zeros, with the data
    /// segments in place.
    pub fn fresh_memory(&self, i: usize) -> Vec<u8> {
        let mut bytes = vec![0; self.memories[i].0 as usize * PAGE];
        for &(memory, offset, len, byte) in &self.data {
            if memory as usize == i {
                bytes[offset..offset + len].fill(byte);
            }
        }
        bytes
    }

    /// Whether a backend with `caps` can ever instantiate it.
    pub fn fits(&self, caps: &Capabilities) -> bool {
        let per_module_memories = caps
            .max_memories_per_module
            .is_none_or(|m| self.memories.len() <= m as usize);
        let per_module_tables = caps
            .max_tables_per_module
            .is_none_or(|m| self.tables.len() <= m as usize);
        let memories = caps.max_memories.is_none_or(|m| self.memories.len() <= m);
        let tables = caps.max_tables.is_none_or(|m| self.tables.len() <= m);
        let sizes = self.memories.iter().all(|&(min, _)| {
            caps.max_memory_bytes
                .is_none_or(|m| min * PAGE as u64 <= m as u64)
        });
        let elements = self
            .tables
            .iter()
            .all(|&(min, _)| caps.max_table_elements.is_none_or(|m| min <= m as u64));
        per_module_memories && per_module_tables && memories && tables && sizes && elements
    }

    /// The largest size in bytes memory `i` can reach under `caps`.
    pub fn memory_cap(&self, i: usize, caps: &Capabilities) -> usize {
        let max = self.memories[i].1 as usize * PAGE;
        caps.max_memory_bytes.map_or(max, |m| max.min(m / PAGE * PAGE))
    }

    /// The largest size table `i` can reach under `caps`.
    pub fn table_cap(&self, i: usize, caps: &Capabilities) -> usize {
        let max = self.tables[i].1 as usize;
        caps.max_table_elements.map_or(max, |m| max.min(m))
    }
}

/// The suite's modules: one memory and one table; one bigger memory initialized by data
/// segments (a copy-on-write image where the backend makes one); a table alone; two of each;
/// nothing at all.
pub(crate) fn all() -> Vec<Shape> {
    vec![
        Shape::plain(vec![(1, 4)], vec![(2, 8)]),
        Shape {
            memories: vec![(2, 3)],
            tables: vec![],
            // A few bytes in the first page, and a run over the first page's end.
            data: vec![(0, 100, 300, 0x5A), (0, PAGE - 4000, 9000, 0xC3)],
        },
        Shape::plain(vec![], vec![(4, 4)]),
        Shape::plain(vec![(1, 2), (0, 1)], vec![(1, 3), (0, 2)]),
        Shape::plain(vec![], vec![]),
    ]
}

/// A module whose memory can hold a transparent huge page (a 2 MiB-aligned 2 MiB block lies in
/// any 4 MiB), with an image in its first page and a table: only for the page-state cases.
pub(crate) fn huge() -> Shape {
    Shape {
        memories: vec![(64, 64)],
        tables: vec![(512, 1024)],
        data: vec![(0, 4096, 4096, 0x3C)],
    }
}
