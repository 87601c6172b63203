//! The endpoint picker (EPP) library: configuration, endpoint discovery, the datastore, the
//! wasm plugin runtime and the Envoy ext_proc service around `epp_core`, the pure decision.
//! `main.rs` is a thin shell over `server`.

pub mod config;
pub mod datastore;
pub mod discovery;
pub mod experiment;
pub mod ext_proc;
pub mod file_watch;
pub mod flow;
pub mod health;
pub mod kv_events;
pub mod loader;
pub mod metrics_scrape;
pub mod probe;
pub mod publisher;
pub mod reload;
pub mod replay;
pub mod request;
pub mod routing;
pub mod server;
pub mod state_store;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod toolkit;
pub mod usage;
pub mod wasm;
