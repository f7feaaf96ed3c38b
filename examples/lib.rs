//! Examples of Berth in use: `quickstart.rs` is the README's main job; [`fallback`] is a custom
//! backend an embedder could write. The README itself is this crate's documentation, so its
//! embedding example is compiled and run as a doctest.
#![forbid(unsafe_code)]
#![doc = include_str!("../README.md")]

pub mod fallback;
