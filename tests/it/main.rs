//! The integration test binary: every suite that needs the built host (wasm components,
//! the config loader, later servers) lives here as a module, so it links once.

mod common;
mod config_parse;
mod default_profile;
mod e2e_churn;
mod e2e_experiment;
mod e2e_faults;
mod e2e_flow;
mod e2e_load;
mod e2e_precise;
mod e2e_reload;
mod e2e_replicas;
mod e2e_routing;
mod ext_proc_wire;
mod guide_profile;
mod plugins;
mod properties;
mod publisher;
mod python_plugin;
mod reload;
mod replay;
mod sandbox;
mod stack;
mod toolkit;
