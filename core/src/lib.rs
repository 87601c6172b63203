//! `epp-core`: the endpoint picker's pure decision. Given a snapshot of the candidates (ids
//! and their scraped load) and a parsed request, `Scheduler::decide` applies admission
//! (shed sheddable requests when the pool is saturated, leave out endpoints over their
//! thresholds), chooses the experiment variant, runs that variant's scheduling profile —
//! producers → filters → scorers → picker — and returns the decision. The server, `epp
//! replay` and the benchmarks all call it.
//!
//! It does no I/O, reads no clock that influences a decision, and names no async runtime,
//! RPC or wasm type (a test reads Cargo's dependency graph to keep it so): plugins are
//! traits, implemented by the host's wasm adapter or by `native` for natively compiled
//! plugin crates.

pub mod admission;
pub mod columns;
pub mod experiment;
pub mod native;
pub mod plugin;
pub mod profile;
pub mod request;
pub mod scheduler;

pub use admission::SaturationConfig;
pub use columns::{Candidates, Table};
pub use plugin::{
    CallInput, FailurePolicy, FilterPlugin, PickerPlugin, PluginCore, PluginError, PluginHandle, ProducerPlugin, Role,
    ScorerPlugin,
};
pub use profile::{
    CycleResult, HookFailure, PluginTiming, ProfileError, ScheduleError, SchedulerProfile, Weight, WeightedScorer,
};
pub use request::Request;
pub use scheduler::{DecideError, Decision, Scheduler, Variant};

pub use llmd_plugin_sdk::{CacheInfo, Completion, EndpointInfo, Manifest, Needs, Outcome, Usage};
