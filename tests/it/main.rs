//! The integration test binary: every suite that needs the built host (wasm components,
//! the config loader, later servers) lives here as a module, so it links once.

mod common;
mod config_parse;
mod default_profile;
mod plugins;
mod sandbox;
