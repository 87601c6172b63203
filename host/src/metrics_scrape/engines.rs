//! Which metric names read which endpoint's page: one `MetricNames` per inference engine,
//! chosen by an endpoint label, as upstream's `core-metrics-extractor` does (`engineLabelKey`,
//! `defaultEngine`, `engineConfigs`). A pool may mix engines: vLLM workers beside SGLang
//! ones, each read with its own names.
//!
//! Built in, as upstream: `vllm` (the metric flags' names), `sglang`, `atom`,
//! `trtllm-serve`, `triton-tensorrt-llm` and `triton`. An engine config named after a
//! built-in one replaces it. An endpoint without the label, or whose label names no known
//! engine, is read as `defaultEngine` (`vllm`), as upstream; the unknown name is warned
//! about by the caller.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use super::extract::{CustomMetric, MetricNames};

/// The endpoint label naming an endpoint's engine, upstream's default.
pub const ENGINE_LABEL_KEY: &str = "llm-d.ai/engine-type";
/// Read when an endpoint lacks `engineLabelKey`: the Gateway API inference extension's key.
pub const LEGACY_ENGINE_LABEL_KEY: &str = "inference.networking.k8s.io/engine-type";
/// The engine of endpoints without the label, upstream's default.
pub const DEFAULT_ENGINE: &str = "vllm";

/// The metric names of every known engine, and how an endpoint's is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Engines {
    label_key: String,
    default: String,
    by_name: BTreeMap<String, Arc<MetricNames>>,
}

/// A bad `core-metrics-extractor` parameter: its path and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct EngineConfigError {
    pub field: String,
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> EngineConfigError {
    EngineConfigError { field: field.into(), message: message.into() }
}

/// One engine config's keys (upstream's names) and the `MetricNames` field each sets.
const SPEC_KEYS: &[&str] = &[
    "queuedRequestsSpec",
    "runningRequestsSpec",
    "kvUsageSpec",
    "loraSpec",
    "cacheInfoSpec",
    "cacheBlockSizeLabelName",
    "cacheNumBlocksLabelName",
    "cacheBlockSizeSpec",
    "cacheNumBlocksSpec",
];

/// Keys upstream accepts that this EPP does not read (warned about, not refused).
const UNREAD_KEYS: &[&str] = &["loraLoadedSpec", "loraGPULoadedSpec", "loraGPUSlotsSpec"];

impl Engines {
    /// The built-in engines, `vllm` read with `vllm`'s names (the metric flags).
    pub fn builtin(vllm: MetricNames) -> Engines {
        let gauges = |waiting: &str, running: &str, kv: &str, size: &str, count: &str| MetricNames {
            waiting: waiting.into(),
            running: running.into(),
            kv_usage: kv.into(),
            kv_usage_fallback: None,
            lora: String::new(),
            cache: String::new(),
            cache_block_size: size.into(),
            cache_num_blocks: count.into(),
            ..MetricNames::default()
        };
        let by_name = [
            ("vllm", vllm),
            (
                "sglang",
                // Older SGLang states its cache in an info metric's labels, newer in gauges.
                MetricNames {
                    cache: "sglang:cache_config_info".into(),
                    cache_block_size_label: "page_size".into(),
                    cache_num_blocks_label: "num_pages".into(),
                    ..gauges(
                        "sglang:num_queue_reqs",
                        "sglang:num_running_reqs",
                        "sglang:token_usage",
                        "sglang:page_size",
                        "sglang:num_pages",
                    )
                },
            ),
            (
                "atom",
                MetricNames {
                    cache: "atom:cache_config_info".into(),
                    ..gauges("atom:requests_waiting", "atom:requests_running", "atom:kv_cache_usage_ratio", "", "")
                },
            ),
            (
                "trtllm-serve",
                gauges(
                    "trtllm_num_requests_waiting",
                    "trtllm_num_requests_running",
                    "trtllm_kv_cache_utilization",
                    "trtllm_kv_cache_tokens_per_block",
                    "trtllm_kv_cache_max_blocks",
                ),
            ),
            (
                "triton-tensorrt-llm",
                gauges(
                    "nv_trt_llm_request_metrics{request_type=waiting}",
                    "nv_trt_llm_request_metrics{request_type=scheduled}",
                    "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",
                    "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}",
                    "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}",
                ),
            ),
            ("triton", gauges("nv_inference_pending_request_count", "nv_inference_exec_count", "", "", "")),
        ]
        .into_iter()
        .map(|(name, names)| (name.to_string(), Arc::new(names)))
        .collect();
        Engines { label_key: ENGINE_LABEL_KEY.into(), default: DEFAULT_ENGINE.into(), by_name }
    }

    /// The engines of a `core-metrics-extractor`'s parameters over the built-in ones.
    /// Errors name the field (`field` is the parameters' path); warnings name what is
    /// accepted and not read.
    pub fn from_params(
        params: &Value,
        field: &str,
        vllm: MetricNames,
    ) -> Result<(Engines, Vec<String>), EngineConfigError> {
        let mut engines = Engines::builtin(vllm);
        let mut warnings = Vec::new();
        let Some(map) = params.as_object() else {
            return if params.is_null() { Ok((engines, warnings)) } else { Err(bad(field, "must be a mapping")) };
        };
        // As upstream, an empty value means the default.
        let text = |key: &str| string(map, field, key).map(|s| Some(s).filter(|s| !s.is_empty()));
        for key in map.keys() {
            if !["engineLabelKey", "defaultEngine", "engineConfigs"].contains(&key.as_str()) {
                warnings.push(format!("`{field}.{key}` is not a core-metrics-extractor parameter; ignored"));
            }
        }
        if let Some(key) = text("engineLabelKey")? {
            engines.label_key = key;
        }
        if let Some(default) = text("defaultEngine")? {
            engines.default = default;
        }
        match map.get("engineConfigs") {
            None | Some(Value::Null) => {}
            Some(Value::Array(configs)) => {
                let mut seen = Vec::new();
                for (i, config) in configs.iter().enumerate() {
                    let at = format!("{field}.engineConfigs[{i}]");
                    let (name, names) = engine_config(config, &at, &mut warnings)?;
                    if seen.contains(&name) {
                        return Err(bad(format!("{at}.name"), format!("engine `{name}` is configured twice")));
                    }
                    if name == DEFAULT_ENGINE {
                        warnings.push(format!(
                            "`{at}` replaces the built-in `vllm` engine: the --total-queued-requests-metric, \
                             --total-running-requests-metric, --kv-cache-usage-percentage-metric, --lora-info-metric \
                             and --cache-info-metric flags no longer apply"
                        ));
                    }
                    seen.push(name.clone());
                    engines.by_name.insert(name, Arc::new(names));
                }
            }
            Some(_) => return Err(bad(format!("{field}.engineConfigs"), "must be a list")),
        }
        if !engines.by_name.contains_key(&engines.default) {
            let message = format!("`{}` is not an engine (known: {})", engines.default, engines.known());
            return Err(bad(format!("{field}.defaultEngine"), message));
        }
        Ok((engines, warnings))
    }

    /// The names `labels` (an endpoint's) select: its engine's (the label, else the legacy
    /// one), or the default engine's without either. An engine no config names is read as
    /// the default one, as upstream; the second value then says so, for a warning.
    pub fn resolve(&self, labels: &BTreeMap<String, String>) -> (Arc<MetricNames>, Option<String>) {
        fn label<'a>(labels: &'a BTreeMap<String, String>, key: &'a str) -> Option<(&'a str, &'a str)> {
            labels.get(key).map(|v| v.trim()).filter(|v| !v.is_empty()).map(|v| (key, v))
        }
        // Invariant: `from_params` checked that the default engine is configured.
        let default = || self.by_name.get(&self.default).cloned().unwrap_or_default();
        match label(labels, &self.label_key).or_else(|| label(labels, LEGACY_ENGINE_LABEL_KEY)) {
            None => (default(), None),
            Some((key, name)) => match self.by_name.get(name) {
                Some(names) => (names.clone(), None),
                None => {
                    let note = format!(
                        "label {key}={name} names no engine config (known: {}); read with the default engine's \
                         names ({})",
                        self.known(),
                        self.default
                    );
                    (default(), Some(note))
                }
            },
        }
    }

    fn known(&self) -> String {
        self.by_name.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
    }
}

/// One `engineConfigs` entry: its name and names. Keys left out are not read, as upstream
/// (an engine config states everything its engine has).
fn engine_config(
    config: &Value,
    at: &str,
    warnings: &mut Vec<String>,
) -> Result<(String, MetricNames), EngineConfigError> {
    let Some(map) = config.as_object() else { return Err(bad(at, "must be a mapping")) };
    let text = |key: &str| string(map, at, key);
    let name = text("name")?;
    if name.is_empty() {
        return Err(bad(format!("{at}.name"), "missing; each engine config needs a name"));
    }
    for key in map.keys() {
        if UNREAD_KEYS.contains(&key.as_str()) {
            warnings.push(format!("`{at}.{key}` is accepted and not read by this EPP"));
        } else if key != "name" && key != "customMetrics" && !SPEC_KEYS.contains(&key.as_str()) {
            warnings.push(format!("`{at}.{key}` is not an engine config key; ignored"));
        }
    }
    let or = |value: String, default: &str| if value.is_empty() { default.to_string() } else { value };
    let defaults = MetricNames::default();
    let names = MetricNames {
        waiting: text("queuedRequestsSpec")?,
        running: text("runningRequestsSpec")?,
        kv_usage: text("kvUsageSpec")?,
        kv_usage_fallback: None,
        lora: text("loraSpec")?,
        cache: text("cacheInfoSpec")?,
        cache_block_size_label: or(text("cacheBlockSizeLabelName")?, &defaults.cache_block_size_label),
        cache_num_blocks_label: or(text("cacheNumBlocksLabelName")?, &defaults.cache_num_blocks_label),
        cache_block_size: text("cacheBlockSizeSpec")?,
        cache_num_blocks: text("cacheNumBlocksSpec")?,
        custom: custom_metrics(map.get("customMetrics"), at)?,
    };
    names.check().map_err(|e| match e.split_once(": ") {
        // A custom metric's error names its entry: point the field there.
        Some((entry, message)) if entry.starts_with("customMetrics[") => bad(format!("{at}.{entry}"), message),
        _ => bad(at, e),
    })?;
    Ok((name, names))
}

/// An engine config's `customMetrics`: a list of `{attributeKey, metricSpec}` (checked
/// further by `MetricNames::check`).
fn custom_metrics(value: Option<&Value>, at: &str) -> Result<Vec<CustomMetric>, EngineConfigError> {
    let list = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad(format!("{at}.customMetrics"), "must be a list of {attributeKey, metricSpec}")),
    };
    let mut custom = Vec::new();
    for (i, entry) in list.iter().enumerate() {
        let here = format!("{at}.customMetrics[{i}]");
        let Some(map) = entry.as_object() else { return Err(bad(here, "must be a mapping")) };
        if let Some(key) = map.keys().find(|k| !["attributeKey", "metricSpec"].contains(&k.as_str())) {
            return Err(bad(format!("{here}.{key}"), "unknown key (expected attributeKey and metricSpec)"));
        }
        let key = string(map, &here, "attributeKey")?;
        custom.push(CustomMetric { key: key.as_str().into(), spec: string(map, &here, "metricSpec")? });
    }
    Ok(custom)
}

/// The string parameter `key` of `map` (at `at`), trimmed; empty when absent.
fn string(map: &serde_json::Map<String, Value>, at: &str, key: &str) -> Result<String, EngineConfigError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.trim().to_string()),
        Some(_) => Err(bad(format!("{at}.{key}"), "must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn endpoints_are_read_with_their_engines_names() {
        let engines = Engines::builtin(MetricNames::default());
        let (vllm, _) = engines.resolve(&labels(&[]));
        assert_eq!(*vllm, MetricNames::default(), "no label: the default engine, vLLM");
        let (sglang, _) = engines.resolve(&labels(&[(ENGINE_LABEL_KEY, "sglang")]));
        assert_eq!(sglang.waiting, "sglang:num_queue_reqs");
        assert_eq!(
            (sglang.cache_block_size.as_str(), sglang.cache_num_blocks.as_str()),
            ("sglang:page_size", "sglang:num_pages")
        );
        let (legacy, _) = engines.resolve(&labels(&[(LEGACY_ENGINE_LABEL_KEY, "sglang")]));
        assert_eq!(legacy, sglang, "the legacy label is read when the label is missing");
        let both = labels(&[(LEGACY_ENGINE_LABEL_KEY, "sglang"), (ENGINE_LABEL_KEY, "vllm")]);
        assert_eq!(*engines.resolve(&both).0, MetricNames::default(), "the label wins");
        // An unknown engine: read as the default one, and said.
        let (unknown, note) = engines.resolve(&labels(&[(ENGINE_LABEL_KEY, "sglng")]));
        assert_eq!(*unknown, MetricNames::default());
        let note = note.unwrap_or_default();
        assert!(note.contains("sglng") && note.contains("known: atom, sglang, triton, triton-tensorrt-llm"), "{note}");
        let (_, note) = engines.resolve(&labels(&[(LEGACY_ENGINE_LABEL_KEY, "x")]));
        assert!(
            note.is_some_and(|n| n.starts_with(&format!("label {LEGACY_ENGINE_LABEL_KEY}=x"))),
            "the label read is named"
        );
        for names in engines.by_name.values() {
            assert_eq!(names.check(), Ok(()), "{names:?}");
        }
    }

    #[test]
    fn engine_configs_add_or_replace_engines_and_bad_ones_name_the_field() {
        let params = json!({
            "engineLabelKey": "engine",
            "defaultEngine": "mine",
            "engineConfigs": [
                {"name": "mine", "queuedRequestsSpec": "q{tier=gold}", "runningRequestsSpec": "r", "kvUsageSpec": "kv",
                 "customMetrics": [{"attributeKey": "a", "metricSpec": "b"}]},
                {"name": "sglang", "queuedRequestsSpec": "sglang:queue", "runningRequestsSpec": "sglang:running"}
            ]
        });
        let field = "plugins[2].parameters";
        let (engines, warnings) = Engines::from_params(&params, field, MetricNames::default()).unwrap();
        let (mine, _) = engines.resolve(&labels(&[]));
        assert_eq!((mine.waiting.as_str(), mine.running.as_str(), mine.kv_usage.as_str()), ("q{tier=gold}", "r", "kv"));
        assert_eq!(mine.lora, "", "left out: not read");
        let (sglang, _) = engines.resolve(&labels(&[("engine", "sglang")]));
        assert_eq!(sglang.waiting, "sglang:queue", "a config named after a built-in one replaces it");
        assert_eq!(sglang.cache_block_size, "");
        assert_eq!(*engines.resolve(&labels(&[("engine", "vllm")])).0, MetricNames::default());
        assert!(warnings.is_empty(), "customMetrics is read now: {warnings:?}");
        assert_eq!(mine.custom, vec![CustomMetric { key: "a".into(), spec: "b".into() }]);

        let cases = [
            (json!({"defaultEngine": "nope"}), "`plugins[2].parameters.defaultEngine`: `nope` is not an engine"),
            (json!({"engineConfigs": {}}), "`plugins[2].parameters.engineConfigs`: must be a list"),
            (json!({"engineConfigs": [{"queuedRequestsSpec": "q"}]}), "`plugins[2].parameters.engineConfigs[0].name`"),
            (
                json!({"engineConfigs": [{"name": "x", "kvUsageSpec": "kv{"}]}),
                "`plugins[2].parameters.engineConfigs[0]`: metric `kv{`",
            ),
            (
                json!({"engineConfigs": [{"name": "x"}, {"name": "x"}]}),
                "`plugins[2].parameters.engineConfigs[1].name`: engine `x` is configured twice",
            ),
            (json!({"engineLabelKey": 3}), "`plugins[2].parameters.engineLabelKey`: must be a string"),
            (
                json!({"engineConfigs": [{"name": "x", "customMetrics": {"attributeKey": "a"}}]}),
                "`plugins[2].parameters.engineConfigs[0].customMetrics`: must be a list",
            ),
            (
                json!({"engineConfigs": [{"name": "x", "customMetrics": [{"attributeKey": "a", "metricSpec": "m{"}]}]}),
                "`plugins[2].parameters.engineConfigs[0].customMetrics[0].metricSpec`: metric `m{`",
            ),
            (
                json!({"engineConfigs": [{"name": "x", "customMetrics": [{"metricSpec": "m"}]}]}),
                "`plugins[2].parameters.engineConfigs[0].customMetrics[0].attributeKey`: required",
            ),
            (
                json!({"engineConfigs": [{"name": "x", "customMetrics": [
                    {"attributeKey": "a", "metricSpec": "m"}, {"attributeKey": "a", "metricSpec": "n"}]}]}),
                "`plugins[2].parameters.engineConfigs[0].customMetrics[1].attributeKey`: `a` is given twice",
            ),
            (
                json!({"engineConfigs": [{"name": "x", "customMetrics": [{"attributeKey": "a", "metric": "m"}]}]}),
                "`plugins[2].parameters.engineConfigs[0].customMetrics[0].metric`: unknown key",
            ),
        ];
        for (params, expected) in cases {
            let e = Engines::from_params(&params, field, MetricNames::default()).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{params}: {e}");
        }
        // Replacing `vllm` is said: the metric flags no longer apply.
        let params =
            json!({"engineConfigs": [{"name": "vllm", "queuedRequestsSpec": "q", "runningRequestsSpec": "r"}]});
        let (_, warnings) = Engines::from_params(&params, field, MetricNames::default()).unwrap();
        assert!(warnings.iter().any(|w| w.contains("replaces the built-in `vllm` engine")), "{warnings:?}");
        // Empty means the default, as upstream.
        let params = json!({"engineLabelKey": "", "defaultEngine": " "});
        let (engines, _) = Engines::from_params(&params, field, MetricNames::default()).unwrap();
        assert_eq!(engines, Engines::builtin(MetricNames::default()));
    }
}
