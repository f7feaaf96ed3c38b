//! Examples of Berth in use: `quickstart.rs` shows the Rust API in brief; [`fallback`] is a
//! backend built from the pool, on-demand allocation and quotas (`berth-compose`). The README itself is this crate's documentation, so its
//! embedding example is compiled and run as a doctest.
#![forbid(unsafe_code)]
#![doc = include_str!("../README.md")]

pub mod fallback;
