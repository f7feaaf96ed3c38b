//! Examples of Berth in use; see `quickstart.rs`.
