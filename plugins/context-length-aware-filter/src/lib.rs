//! `context-length-aware-filter`: the filtering half of `context-length-aware`, which the
//! host runs in front of that scorer when its entry sets `enableFiltering: true` (not named
//! in configs itself). Keeps the endpoints whose declared range holds the prompt's length
//! and those that declare none (the `context-length` library says how).

pub use context_length::*;

llmd_plugin_sdk::export_filter!(ContextLengthAware);
