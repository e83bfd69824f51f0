//! The test support module as benches/tunnel.rs includes it (`#[path]`): the bench uses only a
//! part of it, so what it leaves unused is allowed here, while the test binary (tests/it),
//! which includes support/mod.rs directly, must use all of it. Not a module of tests/it.
#![allow(dead_code, unused_imports)]

#[path = "support/mod.rs"]
mod shared;

pub use shared::*;
