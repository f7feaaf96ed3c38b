//! Examples of Berth in use: `quickstart.rs` is the README's main job. The README itself is
//! this crate's documentation, so its embedding example is compiled and run as a doctest.
#![doc = include_str!("../README.md")]
