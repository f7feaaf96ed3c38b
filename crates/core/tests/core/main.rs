//! `berth-core`'s integration tests, one test binary with a module per topic: batched
//! decommits, the instance block's layout, memories and tables against models, `PAGEMAP_SCAN`,
//! and the vmctx layout. The instance block's leak test, which counts every allocation with a
//! global allocator, stays a binary of its own.

#![allow(clippy::cast_possible_truncation)] // Test models index with `as usize` on 64-bit hosts.

mod decommit;
mod instance_layout;
mod memory;
mod pagemap;
mod table;
mod vmoffsets;
