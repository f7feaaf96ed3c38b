//! The modules the suite instantiates.

use berth_core::{MemoryType, Module, TableType};

use crate::Capabilities;

/// A module with its shape, for the model.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    /// Memories as (minimum pages, maximum pages).
    pub memories: Vec<(u64, u64)>,
    /// Tables as (minimum, maximum) elements.
    pub tables: Vec<(u64, u64)>,
}

impl Shape {
    pub fn build(&self, name: &str) -> Module {
        let mut builder = Module::builder().name(name);
        for &(min, max) in &self.memories {
            builder = builder.memory(MemoryType::new(min, Some(max)));
        }
        for &(min, max) in &self.tables {
            builder = builder.table(TableType::new(min, Some(max)));
        }
        builder.build().expect("suite modules are well-formed")
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
        let sizes = self
            .memories
            .iter()
            .all(|&(min, _)| caps.max_memory_bytes.is_none_or(|m| min * 65536 <= m as u64));
        let elements = self
            .tables
            .iter()
            .all(|&(min, _)| caps.max_table_elements.is_none_or(|m| min <= m as u64));
        per_module_memories && per_module_tables && memories && tables && sizes && elements
    }

    /// The largest size in bytes memory `i` can reach under `caps`.
    pub fn memory_cap(&self, i: usize, caps: &Capabilities) -> usize {
        let max = self.memories[i].1 as usize * 65536;
        caps.max_memory_bytes.map_or(max, |m| max.min(m / 65536 * 65536))
    }

    /// The largest size table `i` can reach under `caps`.
    pub fn table_cap(&self, i: usize, caps: &Capabilities) -> usize {
        let max = self.tables[i].1 as usize;
        caps.max_table_elements.map_or(max, |m| max.min(m))
    }
}

/// The suite's modules: one memory and one table; one bigger memory; a table alone; two of
/// each; nothing at all.
pub(crate) fn all() -> Vec<Shape> {
    vec![
        Shape {
            memories: vec![(1, 4)],
            tables: vec![(2, 8)],
        },
        Shape {
            memories: vec![(2, 3)],
            tables: vec![],
        },
        Shape {
            memories: vec![],
            tables: vec![(4, 4)],
        },
        Shape {
            memories: vec![(1, 2), (0, 1)],
            tables: vec![(1, 3), (0, 2)],
        },
        Shape {
            memories: vec![],
            tables: vec![],
        },
    ]
}
