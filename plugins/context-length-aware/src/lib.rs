//! `context-length-aware`: scores each endpoint by how well the range of prompt lengths it
//! declares in a label fits the request, as upstream (the `context-length` library says how).
//! With `enableFiltering: true` the host also runs `context-length-aware-filter`, built from
//! the same library, in front of it.

pub use context_length::*;

llmd_plugin_sdk::export_scorer!(ContextLengthAware);
