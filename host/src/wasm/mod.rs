//! Everything that names wasmtime lives here: the shared engine (with its epoch ticker),
//! the component cache, the sandbox limits and the adapter that makes a component look
//! like a scheduler plugin. Nothing outside this module sees a wasmtime type.

mod bindings;
pub mod embedded;
mod instance;
mod runtime;
mod sandbox;

pub use instance::WasmPlugin;
pub use runtime::{LoadError, WIT_PACKAGE, WasmRuntime};
pub use sandbox::Sandbox;
