//! `approx-prefix-cache-producer`: the approximate prefix index (the `prefix-index` library)
//! as a component. See that crate for what it does.

pub use prefix_index::*;

llmd_plugin_sdk::export_producer!(PrefixIndexProducer);
