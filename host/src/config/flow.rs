//! The flow-control part of the config: `featureGates` and the `flowControl` section, with
//! the flow-control plugins they reference (fairness, ordering, usage-limit policies and
//! saturation detectors), as upstream writes them. Validated here into a `FlowSpec`; the
//! queues themselves live in `crate::flow`.

use std::collections::BTreeMap;
use std::time::Duration;

use epp_core::SaturationConfig;
// Upstream writes TTLs as Go durations: `60s`, `1m`, `500ms`, `1m30s`, `0s`, `0`.
use llmd_plugin_sdk::params::duration as parse_go_duration;
use serde::Deserialize;

use super::{ConfigError, PluginKind, PluginSpec, invalid};

/// The feature gate that turns flow control on.
pub const FLOW_CONTROL_GATE: &str = "flowControl";
/// Feature gates this EPP knows, with their defaults.
pub const FEATURE_GATES: &[(&str, bool)] = &[(FLOW_CONTROL_GATE, false)];

/// Upstream's per-band defaults.
pub const DEFAULT_BAND_MAX_BYTES: u64 = 1_000_000_000;
pub const DEFAULT_BAND_MAX_REQUESTS: u64 = 5000;
pub const DEFAULT_REQUEST_TTL: Duration = Duration::from_secs(60);

/// Flow-control plugin types (host-native: they order queues, they do not score endpoints).
pub const FAIRNESS_TYPES: &[&str] = &["global-strict-fairness-policy", "round-robin-fairness-policy"];
pub const ORDERING_TYPES: &[&str] = &["fcfs-ordering-policy", "edf-ordering-policy"];
pub const USAGE_LIMIT_TYPES: &[&str] = &["static-usage-limit-policy"];
pub const DETECTOR_TYPES: &[&str] = &["utilization-detector", "concurrency-detector"];

/// How a band picks the flow (fairness id) to serve next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fairness {
    /// The band is one queue: the best head item across flows goes first (no tenant fairness).
    GlobalStrict,
    /// One dispatch per flow in turn, flows in id order, skipping empty ones.
    RoundRobin,
}

/// How a flow orders its own items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ordering {
    /// First come, first served.
    Fcfs,
    /// Earliest deadline (enqueue time + TTL) first; ties by arrival.
    Edf,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BandSpec {
    pub priority: i32,
    /// Queued body bytes at most (always bounded).
    pub max_bytes: u64,
    /// Queued requests at most (always bounded).
    pub max_requests: u64,
    pub fairness: Fairness,
    pub ordering: Ordering,
}

impl BandSpec {
    fn template() -> BandSpec {
        BandSpec {
            priority: 0,
            max_bytes: DEFAULT_BAND_MAX_BYTES,
            max_requests: DEFAULT_BAND_MAX_REQUESTS,
            fairness: Fairness::GlobalStrict,
            ordering: Ordering::Fcfs,
        }
    }
}

/// How "full" the pool is, for dispatch gating (1.0 = the set point).
#[derive(Clone, Debug, PartialEq)]
pub enum DetectorSpec {
    /// From scraped metrics: per endpoint `max(waiting / queueDepthThreshold, kv /
    /// kvCacheUtilThreshold)` (stale = 1), averaged over the pool.
    Utilization(SaturationConfig),
    /// From the EPP's own requests in flight per endpoint.
    Concurrency { mode: ConcurrencyMode, max_requests: u64, max_tokens: u64, headroom: f64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConcurrencyMode {
    Requests,
    Tokens,
    Hybrid,
}

/// The validated flow-control settings.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowSpec {
    /// The `flowControl` feature gate.
    pub enabled: bool,
    /// Global caps over every band; 0 = none.
    pub max_bytes: u64,
    pub max_requests: u64,
    /// Queue-wait budget while the pool has endpoints; None = never expires.
    pub request_ttl: Option<Duration>,
    /// Queue-wait budget while the pool is empty; None = never expires.
    pub no_endpoint_ttl: Option<Duration>,
    pub default_band: BandSpec,
    pub default_negative_band: Option<BandSpec>,
    /// Explicit bands (priority 0 is always present, from the default template if absent).
    pub bands: Vec<BandSpec>,
    /// Dispatch while the pool's saturation is below this (static usage-limit policy).
    pub usage_limit: f64,
    pub detector: DetectorSpec,
}

impl Default for FlowSpec {
    fn default() -> Self {
        FlowSpec {
            enabled: false,
            max_bytes: 0,
            max_requests: 0,
            request_ttl: Some(DEFAULT_REQUEST_TTL),
            no_endpoint_ttl: Some(DEFAULT_REQUEST_TTL),
            default_band: BandSpec::template(),
            default_negative_band: None,
            bands: vec![BandSpec::template()],
            usage_limit: 1.0,
            detector: DetectorSpec::Utilization(SaturationConfig::default()),
        }
    }
}

impl FlowSpec {
    /// The band settings for `priority`: an explicit band, or the template for it.
    pub fn band_for(&self, priority: i32) -> BandSpec {
        if let Some(b) = self.bands.iter().find(|b| b.priority == priority) {
            return b.clone();
        }
        let template = match &self.default_negative_band {
            Some(neg) if priority < 0 => neg,
            _ => &self.default_band,
        };
        BandSpec { priority, ..template.clone() }
    }

    /// The saturation thresholds the legacy admission (gate off) uses too.
    pub fn utilization(&self) -> Option<&SaturationConfig> {
        match &self.detector {
            DetectorSpec::Utilization(c) => Some(c),
            DetectorSpec::Concurrency { .. } => None,
        }
    }
}

// ---- The YAML as written ----

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawFlowControl {
    max_bytes: Option<serde_yaml::Value>,
    max_requests: Option<serde_yaml::Value>,
    #[serde(rename = "defaultRequestTTL")]
    default_request_ttl: Option<String>,
    #[serde(rename = "noEndpointRequestTTL")]
    no_endpoint_request_ttl: Option<String>,
    default_priority_band: Option<RawBand>,
    default_negative_priority_band: Option<RawBand>,
    #[serde(default)]
    priority_bands: Vec<RawBand>,
    usage_limit_policy_plugin_ref: Option<String>,
    saturation_detector: Option<RawPluginRef>,
    enable_eviction: Option<bool>,
}

impl RawFlowControl {
    /// Whether anything beyond the saturation detector is set.
    fn has_settings(&self) -> bool {
        self.max_bytes.is_some()
            || self.max_requests.is_some()
            || self.default_request_ttl.is_some()
            || self.no_endpoint_request_ttl.is_some()
            || self.default_priority_band.is_some()
            || self.default_negative_priority_band.is_some()
            || !self.priority_bands.is_empty()
            || self.usage_limit_policy_plugin_ref.is_some()
            || self.enable_eviction.is_some()
    }
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawBand {
    priority: Option<i32>,
    max_bytes: Option<serde_yaml::Value>,
    max_requests: Option<serde_yaml::Value>,
    fairness_policy_ref: Option<String>,
    ordering_policy_ref: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPluginRef {
    plugin_ref: Option<String>,
}

/// Parses `featureGates`: `name`, `name=true` or `name=false`; unknown names are errors.
pub(super) fn feature_gates(raw: Option<serde_yaml::Value>) -> Result<BTreeMap<String, bool>, ConfigError> {
    let mut gates: BTreeMap<String, bool> = FEATURE_GATES.iter().map(|(n, d)| (n.to_string(), *d)).collect();
    let Some(raw) = raw else { return Ok(gates) };
    let list = match raw {
        serde_yaml::Value::Sequence(s) => s,
        serde_yaml::Value::Null => return Ok(gates),
        _ => return Err(invalid("featureGates", "must be a list of gate names like [flowControl]")),
    };
    for (i, entry) in list.into_iter().enumerate() {
        let field = format!("featureGates[{i}]");
        let serde_yaml::Value::String(text) = entry else {
            return Err(invalid(field, "must be a string like `flowControl` or `flowControl=false`"));
        };
        let (name, value) = match text.split_once('=') {
            Some((n, v)) => {
                let v = match v.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "t" => true,
                    "false" | "0" | "f" => false,
                    other => return Err(invalid(field, format!("`{other}` is not true or false"))),
                };
                (n.trim(), v)
            }
            None => (text.trim(), true),
        };
        match gates.get_mut(name) {
            Some(slot) => *slot = value,
            None => {
                let known: Vec<&str> = FEATURE_GATES.iter().map(|(n, _)| *n).collect();
                return Err(invalid(
                    field,
                    format!("feature gate '{name}' is unknown or unregistered (known: {})", known.join(", ")),
                ));
            }
        }
    }
    Ok(gates)
}

/// Builds the flow spec from the gate, the section and the flow-control plugins.
pub(super) fn flow_spec(
    enabled: bool,
    raw: Option<RawFlowControl>,
    plugins: &[PluginSpec],
    (legacy_saturation, top_detector_ref): (SaturationConfig, Option<String>),
    warnings: &mut Vec<String>,
) -> Result<FlowSpec, ConfigError> {
    let raw = raw.unwrap_or_default();
    if !enabled && raw.has_settings() {
        warnings.push(
            "the flowControl config section is set but the flowControl feature gate is disabled; its settings \
             (other than saturationDetector) are ignored"
                .into(),
        );
    }
    // The saturation detector: the one named (flowControl's reference winning over the
    // deprecated top-level one, as upstream), else the only one configured, else the
    // top-level saturationDetector's thresholds.
    let named = match raw.saturation_detector.as_ref().and_then(|d| d.plugin_ref.clone()) {
        Some(name) => Some((name, "flowControl.saturationDetector.pluginRef")),
        None => top_detector_ref.map(|name| (name, "saturationDetector.pluginRef")),
    };
    let detector_plugin = match named {
        Some((name, field)) => Some(resolve(plugins, &name, DETECTOR_TYPES, field)?),
        None => plugins.iter().find(|p| DETECTOR_TYPES.contains(&p.type_name.as_str())).cloned(),
    };
    let detector = match detector_plugin {
        Some(p) => detector_spec(&p, legacy_saturation)?,
        None => DetectorSpec::Utilization(legacy_saturation),
    };
    let mut spec = FlowSpec { enabled, detector, ..FlowSpec::default() };
    if !enabled {
        return Ok(spec);
    }
    if raw.enable_eviction == Some(true) {
        warnings.push(
            "flowControl.enableEviction: evicting requests already dispatched is not supported by this EPP; \
             queued requests are still bounded and expire by TTL"
                .into(),
        );
    }
    spec.max_bytes = quantity(raw.max_bytes.as_ref(), "flowControl.maxBytes")?.unwrap_or(0);
    spec.max_requests = quantity(raw.max_requests.as_ref(), "flowControl.maxRequests")?.unwrap_or(0);
    let ttl = |field: &str, v: &Option<String>| -> Result<Option<Option<Duration>>, ConfigError> {
        match v {
            None => Ok(None),
            Some(s) => {
                let d = parse_go_duration(s)
                    .ok_or_else(|| invalid(field, format!("`{s}` is not a non-negative duration like 60s or 1m")))?;
                Ok(Some((!d.is_zero()).then_some(d)))
            }
        }
    };
    let default_ttl = ttl("flowControl.defaultRequestTTL", &raw.default_request_ttl)?;
    let no_endpoint_ttl = ttl("flowControl.noEndpointRequestTTL", &raw.no_endpoint_request_ttl)?;
    spec.request_ttl = default_ttl.unwrap_or(Some(DEFAULT_REQUEST_TTL));
    // Follows defaultRequestTTL when only that is set, as upstream.
    spec.no_endpoint_ttl = no_endpoint_ttl.or(default_ttl).unwrap_or(Some(DEFAULT_REQUEST_TTL));
    spec.default_band = band(
        raw.default_priority_band.clone().unwrap_or_default(),
        &BandSpec::template(),
        plugins,
        "flowControl.defaultPriorityBand",
    )?;
    spec.default_band.priority = 0;
    spec.default_negative_band = match raw.default_negative_priority_band.clone() {
        Some(b) => Some(band(b, &BandSpec::template(), plugins, "flowControl.defaultNegativePriorityBand")?),
        None => None,
    };
    spec.bands.clear();
    for (i, b) in raw.priority_bands.iter().enumerate() {
        let field = format!("flowControl.priorityBands[{i}]");
        let priority = b.priority.ok_or_else(|| invalid(format!("{field}.priority"), "missing"))?;
        if spec.bands.iter().any(|x| x.priority == priority) {
            return Err(invalid(format!("{field}.priority"), format!("duplicate priority level {priority}")));
        }
        let mut parsed = band(b.clone(), &BandSpec::template(), plugins, &field)?;
        parsed.priority = priority;
        spec.bands.push(parsed);
    }
    if !spec.bands.iter().any(|b| b.priority == 0) {
        spec.bands.push(spec.default_band.clone());
    }
    spec.bands.sort_by_key(|b| std::cmp::Reverse(b.priority));
    let usage_policy = match &raw.usage_limit_policy_plugin_ref {
        Some(name) => Some(resolve(plugins, name, USAGE_LIMIT_TYPES, "flowControl.usageLimitPolicyPluginRef")?),
        None => plugins.iter().find(|p| USAGE_LIMIT_TYPES.contains(&p.type_name.as_str())).cloned(),
    };
    if let Some(p) = usage_policy {
        spec.usage_limit = number(&p, "threshold", 1.0)?;
        // At 0 nothing would ever be dispatched: every request would wait out its TTL.
        if !(spec.usage_limit > 0.0 && spec.usage_limit.is_finite()) {
            return Err(invalid(
                format!("plugins[{}].parameters.threshold", p.name),
                format!("must be > 0, got {}", spec.usage_limit),
            ));
        }
    }
    Ok(spec)
}

/// A referenced flow plugin: a configured plugin of that name, or (as upstream injects
/// them) a default instance when the name is one of the built-in types.
fn resolve(plugins: &[PluginSpec], name: &str, types: &[&str], field: &str) -> Result<PluginSpec, ConfigError> {
    match plugins.iter().find(|p| p.name == name) {
        Some(p) if types.contains(&p.type_name.as_str()) => Ok(p.clone()),
        Some(p) => {
            Err(invalid(field, format!("plugin `{name}` is a {}, expected one of: {}", p.type_name, types.join(", "))))
        }
        None if types.contains(&name) => Ok(PluginSpec {
            name: name.into(),
            type_name: name.into(),
            kind: PluginKind::Flow,
            parameters: serde_json::Value::Object(Default::default()),
            wasm: None,
            failure_policy: epp_core::FailurePolicy::FailOpen,
            sandbox: crate::wasm::Sandbox::default(),
            implicit: true,
        }),
        None => Err(invalid(field, format!("plugin \"{name}\" not found (expected one of: {})", types.join(", ")))),
    }
}

fn band(raw: RawBand, template: &BandSpec, plugins: &[PluginSpec], field: &str) -> Result<BandSpec, ConfigError> {
    // A 0 or missing limit means the default, as upstream (bands are always bounded).
    let limit = |v: Option<&serde_yaml::Value>, f: &str, default: u64| -> Result<u64, ConfigError> {
        Ok(quantity(v, &format!("{field}.{f}"))?.filter(|&n| n > 0).unwrap_or(default))
    };
    let fairness = match &raw.fairness_policy_ref {
        None => template.fairness,
        Some(name) => {
            match resolve(plugins, name, FAIRNESS_TYPES, &format!("{field}.fairnessPolicyRef"))?.type_name.as_str() {
                "round-robin-fairness-policy" => Fairness::RoundRobin,
                _ => Fairness::GlobalStrict,
            }
        }
    };
    let ordering = match &raw.ordering_policy_ref {
        None => template.ordering,
        Some(name) => {
            match resolve(plugins, name, ORDERING_TYPES, &format!("{field}.orderingPolicyRef"))?.type_name.as_str() {
                "edf-ordering-policy" => Ordering::Edf,
                _ => Ordering::Fcfs,
            }
        }
    };
    Ok(BandSpec {
        priority: raw.priority.unwrap_or(template.priority),
        max_bytes: limit(raw.max_bytes.as_ref(), "maxBytes", template.max_bytes)?,
        max_requests: limit(raw.max_requests.as_ref(), "maxRequests", template.max_requests)?,
        fairness,
        ordering,
    })
}

fn detector_spec(p: &PluginSpec, legacy: SaturationConfig) -> Result<DetectorSpec, ConfigError> {
    let field = |k: &str| format!("plugins[{}].parameters.{k}", p.name);
    let known: &[&str] = match p.type_name.as_str() {
        "utilization-detector" => {
            &["queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThreshold", "headroom"]
        }
        _ => &["concurrencyMode", "maxConcurrency", "maxTokenConcurrency", "headroom", "inFlightLoadProducerName"],
    };
    if let Some(obj) = p.parameters.as_object() {
        for k in obj.keys() {
            if !known.contains(&k.as_str()) {
                return Err(invalid(field(k), format!("unknown parameter; known: {}", known.join(", "))));
            }
        }
    }
    let headroom = number(p, "headroom", 0.0)?;
    if !(headroom >= 0.0 && headroom.is_finite()) {
        return Err(invalid(field("headroom"), format!("must be ≥ 0, got {headroom}")));
    }
    if p.type_name == "utilization-detector" {
        let mut c = SaturationConfig { headroom: headroom as f32, ..legacy };
        let q = number(p, "queueDepthThreshold", f64::from(c.queue_depth_threshold))?;
        if !(q > 0.0 && q.is_finite()) {
            return Err(invalid(field("queueDepthThreshold"), format!("must be > 0, got {q}")));
        }
        c.queue_depth_threshold = q as f32;
        let kv = number(p, "kvCacheUtilThreshold", f64::from(c.kv_cache_threshold))?;
        if !(kv > 0.0 && kv <= 1.0) {
            return Err(invalid(field("kvCacheUtilThreshold"), format!("must be in (0, 1], got {kv}")));
        }
        c.kv_cache_threshold = kv as f32;
        if let Some(v) = p.parameters.get("metricsStalenessThreshold") {
            let text = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
            let d = parse_go_duration(&text).filter(|d| !d.is_zero()).ok_or_else(|| {
                invalid(field("metricsStalenessThreshold"), format!("`{text}` is not a positive duration like 200ms"))
            })?;
            c.staleness_ms = d.as_millis().min(u128::from(u32::MAX)) as u32;
        }
        return Ok(DetectorSpec::Utilization(c));
    }
    let mode = match p.parameters.get("concurrencyMode").and_then(|v| v.as_str()).unwrap_or("requests") {
        "requests" => ConcurrencyMode::Requests,
        "tokens" => ConcurrencyMode::Tokens,
        "hybrid" => ConcurrencyMode::Hybrid,
        other => {
            return Err(invalid(field("concurrencyMode"), format!("`{other}`; expected requests, tokens or hybrid")));
        }
    };
    let positive = |k: &str, default: f64| -> Result<u64, ConfigError> {
        let v = number(p, k, default)?;
        if v >= 1.0 && v.is_finite() { Ok(v as u64) } else { Err(invalid(field(k), format!("must be > 0, got {v}"))) }
    };
    Ok(DetectorSpec::Concurrency {
        mode,
        max_requests: positive("maxConcurrency", 100.0)?,
        max_tokens: positive("maxTokenConcurrency", 1_000_000.0)?,
        headroom,
    })
}

fn number(p: &PluginSpec, key: &str, default: f64) -> Result<f64, ConfigError> {
    match p.parameters.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| {
            invalid(format!("plugins[{}].parameters.{key}", p.name), format!("must be a number, got {v}"))
        }),
    }
}

/// A Kubernetes quantity (`1Gi`, `500M`, `1024`, `1e9`) as a count; negative is an error.
pub fn quantity(v: Option<&serde_yaml::Value>, field: &str) -> Result<Option<u64>, ConfigError> {
    let Some(v) = v else { return Ok(None) };
    let text = match v {
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::String(s) => s.trim().to_string(),
        serde_yaml::Value::Null => return Ok(None),
        other => return Err(invalid(field, format!("must be a quantity like 1Gi or 500, got {other:?}"))),
    };
    let bad = || invalid(field, format!("`{text}` is not a quantity like 1Gi, 500M or 1024"));
    let suffixes: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (num, scale) =
        suffixes.iter().find_map(|(s, f)| text.strip_suffix(s).map(|n| (n, *f))).unwrap_or((text.as_str(), 1.0));
    let value: f64 = num.trim().parse().map_err(|_| bad())?;
    let total = value * scale;
    if !total.is_finite() {
        return Err(bad());
    }
    if total < 0.0 {
        return Err(invalid(field, format!("must be non-negative, got {text}")));
    }
    Ok(Some(total.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn y(s: &str) -> serde_yaml::Value {
        serde_yaml::from_str(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn quantities() {
        for (text, want) in
            [("1Gi", 1u64 << 30), ("500M", 500_000_000), ("1024", 1024), ("1e9", 1_000_000_000), ("0", 0)]
        {
            assert_eq!(quantity(Some(&y(text)), "f").unwrap_or_else(|e| panic!("{text}: {e}")), Some(want), "{text}");
        }
        assert!(quantity(Some(&y("-1")), "f").unwrap_err().to_string().contains("non-negative"));
        assert!(quantity(Some(&y("lots")), "f").is_err());
    }

    #[test]
    fn gates() {
        assert!(!feature_gates(None).unwrap_or_default()[FLOW_CONTROL_GATE]);
        assert!(feature_gates(Some(y("[flowControl]"))).unwrap_or_default()[FLOW_CONTROL_GATE]);
        assert!(!feature_gates(Some(y("[\"flowControl=false\"]"))).unwrap_or_default()[FLOW_CONTROL_GATE]);
        let e = feature_gates(Some(y("[warpDrive]"))).unwrap_err().to_string();
        assert!(e.contains("featureGates[0]") && e.contains("'warpDrive' is unknown"), "{e}");
        assert!(feature_gates(Some(y("[\"flowControl=maybe\"]"))).is_err());
    }
}
