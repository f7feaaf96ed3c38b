//! `berth-wasm`'s integration tests, one test binary with a module per topic: reading module
//! facts from text and binary modules, and mutated binaries that must give an error or a
//! module, never a panic.

mod malformed;
mod parse;
