//! The pure scheduling core: a profile runs producers → filters → scorers → picker over an
//! immutable snapshot of candidates and returns a decision. It knows plugins only through
//! the traits in `plugin`; it does no I/O, names no wasmtime or Envoy type, and never
//! panics on bad plugin output — a failing plugin is handled by its failure policy.

pub mod admission;
pub mod native;
pub mod plugin;
mod profile;
mod variants;

pub use admission::SaturationConfig;
pub use plugin::{
    FailurePolicy, FilterPlugin, PickerPlugin, PluginCore, PluginError, PluginHandle, ProducerPlugin, Role,
    ScorerPlugin,
};
pub use profile::{Decision, PluginTiming, ScheduleError, SchedulerProfile, Weight, WeightedScorer};
pub use variants::{Scheduler, Variant};
