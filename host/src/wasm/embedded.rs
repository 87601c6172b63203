//! The default plugin set, compiled to components by `build.rs` and embedded in the
//! binary so the EPP runs with no plugin files on disk.

/// (plugin type, component bytes) of every embedded plugin.
pub const DEFAULT_PLUGINS: &[(&str, &[u8])] = &[
    (
        "approx-prefix-cache-producer",
        include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/approx_prefix_cache_producer.wasm")),
    ),
    ("prefix-cache-scorer", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/prefix_cache_scorer.wasm"))),
    ("no-hit-lru-scorer", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/no_hit_lru_scorer.wasm"))),
    (
        "kv-cache-utilization-scorer",
        include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/kv_cache_utilization_scorer.wasm")),
    ),
    ("queue-scorer", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/queue_scorer.wasm"))),
    ("lora-affinity-scorer", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/lora_affinity_scorer.wasm"))),
    ("max-score-picker", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/max_score_picker.wasm"))),
    ("random-picker", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/random_picker.wasm"))),
    ("weighted-random-picker", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/weighted_random_picker.wasm"))),
    ("inflight-load-producer", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/inflight_load_producer.wasm"))),
    ("token-load-scorer", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/token_load_scorer.wasm"))),
    ("active-request-scorer", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/active_request_scorer.wasm"))),
    (
        "prefix-cache-affinity-filter",
        include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/prefix_cache_affinity_filter.wasm")),
    ),
    ("session-affinity-scorer", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/session_affinity_scorer.wasm"))),
    ("label-selector-filter", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/label_selector_filter.wasm"))),
    (
        "precise-prefix-cache-producer",
        include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/precise_prefix_cache_producer.wasm")),
    ),
    (
        "running-requests-size-scorer",
        include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/running_requests_size_scorer.wasm")),
    ),
    ("load-aware-scorer", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/load_aware_scorer.wasm"))),
    ("utilization-filter", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/utilization_filter.wasm"))),
    ("session-affinity-filter", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/session_affinity_filter.wasm"))),
    ("context-length-aware", include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/context_length_aware.wasm"))),
    (
        "context-length-aware-filter",
        include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/context_length_aware_filter.wasm")),
    ),
    (
        "header-label-affinity-scorer",
        include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/header_label_affinity_scorer.wasm")),
    ),
    (
        "endpoint-attribute-scorer",
        include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/endpoint_attribute_scorer.wasm")),
    ),
    (
        "endpoint-attribute-filter",
        include_bytes!(concat!(env!("EPP_PLUGIN_WASM_DIR"), "/endpoint_attribute_filter.wasm")),
    ),
];

/// Older names upstream still accepts, and the type they stand for.
pub const ALIASES: &[(&str, &str)] = &[
    ("by-label-selector", "label-selector-filter"),
    ("by-label", "label-selector-filter"),
    ("decode-filter", "label-selector-filter"),
    ("prefill-filter", "label-selector-filter"),
    ("encode-filter", "label-selector-filter"),
];

/// Upstream's role filters: `by-label` rules on the `llm-d.ai/role` label with fixed
/// parameters, which the config loader gives them (they take none of their own).
pub const ROLE_FILTERS: &[(&str, &str)] = &[
    (
        "decode-filter",
        r#"{"label": "llm-d.ai/role", "allowsNoLabel": true, "validValues": ["decode", "prefill-decode", "both", "encode-prefill-decode"]}"#,
    ),
    (
        "prefill-filter",
        r#"{"label": "llm-d.ai/role", "validValues": ["prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"]}"#,
    ),
    (
        "encode-filter",
        r#"{"label": "llm-d.ai/role", "validValues": ["encode", "encode-prefill", "encode-prefill-decode"]}"#,
    ),
];

/// Upstream plugins that are a filter and a scorer at once, built here as two components:
/// (type, the type of its embedded filtering half, the boolean parameter that turns the
/// filtering on). The host runs the filtering half in front of the scorer when an entry of
/// the type (without a `wasm:` file of its own) sets the parameter.
pub const FILTERING_HALVES: &[(&str, &str, &str)] =
    &[("context-length-aware", "context-length-aware-filter", "enableFiltering")];

/// The type of the filtering half an entry of `type_name` with `parameters` asks for.
pub fn filtering_half(type_name: &str, parameters: &serde_json::Value) -> Option<&'static str> {
    FILTERING_HALVES
        .iter()
        .find(|(t, _, flag)| *t == type_name && parameters.get(*flag).and_then(|v| v.as_bool()) == Some(true))
        .map(|(_, half, _)| *half)
}

/// The embedded component for plugin `type_name`, if it is one of the defaults.
pub fn find(type_name: &str) -> Option<&'static [u8]> {
    let type_name = ALIASES.iter().find(|(alias, _)| *alias == type_name).map_or(type_name, |(_, t)| *t);
    DEFAULT_PLUGINS.iter().find(|(t, _)| *t == type_name).map(|(_, bytes)| *bytes)
}

/// Where `build.rs` left every plugin component, including test-only ones.
pub const PLUGIN_WASM_DIR: &str = env!("EPP_PLUGIN_WASM_DIR");
