//! Berth's cross-backend tests, one test binary with a module per topic (one link for all of
//! them): the conformance suite on every backend, backends broken on purpose that the suite
//! must fail, end-to-end runs through the engine, faults (in child processes), initialization,
//! the on-demand and pooling backends beyond the suite, page states, rollback and the shipped
//! modules. Shared helpers are in this package's library (`berth_tests`).
//!
//! Run one topic with `cargo test -p berth-tests --test berth conformance::`.

#![allow(clippy::cast_possible_truncation)] // Test models index with `as usize` on 64-bit hosts.

mod broken;
mod conformance;
mod end_to_end;
mod faults;
mod initialization;
mod on_demand;
mod page_states;
mod pooling;
mod rollback;
mod shipped_modules;
