//! The endpoint picker (EPP) library: configuration, the pure scheduler, and the wasm
//! plugin runtime. `main.rs` is a thin shell over it.

pub mod config;
pub mod loader;
pub mod scheduler;
pub mod wasm;
