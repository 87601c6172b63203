//! The `EndpointPickerConfig` YAML, parsed once into a validated `PickerConfig`.
//!
//! It accepts the upstream EPP's config exactly as users write it (three apiVersions,
//! `plugins`, `schedulingProfiles`, the `dataLayer` section) plus our extensions on a plugin
//! entry (`wasm`, `failurePolicy`, `sandbox`). Errors name the offending field; keys we do
//! not know are reported as warnings, never silently dropped. It loads no plugin and does
//! no I/O beyond reading the file it is given: `loader` turns a `PickerConfig` into a
//! running scheduler.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod experiment;
pub mod flow;

use epp_core::experiment::ExperimentSpec;
use epp_core::{FailurePolicy, SaturationConfig, Weight};
use serde::Deserialize;

use crate::wasm::Sandbox;

/// apiVersions of EndpointPickerConfig we accept, newest first.
pub const API_VERSIONS: &[&str] = &["llm-d.ai/v1", "llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1"];
pub const KIND: &str = "EndpointPickerConfig";

/// Upstream's current optimized baseline, used when no config is given.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/epp-config.yaml");
/// The upstream no-Kubernetes guide's config, unchanged (the older optimized baseline).
pub const GUIDE_CONFIG: &str = include_str!("../../../config/guide/epp-config.yaml");

/// The default profile on precise prefix matches from the engines' KV events.
pub const PRECISE_CONFIG: &str = include_str!("../../../config/precise.yaml");

/// The type of the prefix-index producer that prefix-aware plugins read from.
pub const PREFIX_PRODUCER_TYPE: &str = "approx-prefix-cache-producer";
/// The type of the producer of the EPP's own in-flight load.
pub const INFLIGHT_PRODUCER_TYPE: &str = "inflight-load-producer";
/// Plugins that read the prefix producer's columns: when a profile uses one of them and
/// names no producer, the producer is added implicitly, as upstream does.
const PREFIX_READERS: &[&str] =
    &["prefix-cache-scorer", "no-hit-lru-scorer", "prefix-cache-affinity-filter", INFLIGHT_PRODUCER_TYPE];
/// Plugins that read the in-flight load producer's columns (likewise added implicitly).
const INFLIGHT_READERS: &[&str] = &["token-load-scorer", "active-request-scorer", "prefix-cache-affinity-filter"];

/// What part of the EPP a plugin type belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginKind {
    /// A producer, filter, scorer or picker: a wasm component (embedded or from `wasm:`).
    Scheduling,
    /// Finds the endpoints (`file-discovery`).
    Discovery,
    /// Where metrics come from (`metrics-data-source`).
    DataSource,
    /// Turns scraped metrics into endpoint state (`core-metrics-extractor`).
    Extractor,
    /// Chooses which profile(s) run; only the single-profile handler exists.
    ProfileHandler,
    /// Flow control: fairness, ordering and usage-limit policies, saturation detectors.
    Flow,
}

/// Plugin types built into the host (their scheduling components are embedded).
pub const BUILTIN_TYPES: &[(&str, PluginKind)] = &[
    ("approx-prefix-cache-producer", PluginKind::Scheduling),
    ("prefix-cache-scorer", PluginKind::Scheduling),
    ("no-hit-lru-scorer", PluginKind::Scheduling),
    ("kv-cache-utilization-scorer", PluginKind::Scheduling),
    ("queue-scorer", PluginKind::Scheduling),
    ("lora-affinity-scorer", PluginKind::Scheduling),
    ("max-score-picker", PluginKind::Scheduling),
    ("random-picker", PluginKind::Scheduling),
    ("weighted-random-picker", PluginKind::Scheduling),
    ("inflight-load-producer", PluginKind::Scheduling),
    ("token-load-scorer", PluginKind::Scheduling),
    ("active-request-scorer", PluginKind::Scheduling),
    ("prefix-cache-affinity-filter", PluginKind::Scheduling),
    ("session-affinity-scorer", PluginKind::Scheduling),
    ("label-selector-filter", PluginKind::Scheduling),
    ("precise-prefix-cache-producer", PluginKind::Scheduling),
    ("running-requests-size-scorer", PluginKind::Scheduling),
    ("load-aware-scorer", PluginKind::Scheduling),
    ("utilization-filter", PluginKind::Scheduling),
    ("session-affinity-filter", PluginKind::Scheduling),
    ("context-length-aware", PluginKind::Scheduling),
    ("header-label-affinity-scorer", PluginKind::Scheduling),
    ("endpoint-attribute-scorer", PluginKind::Scheduling),
    ("endpoint-attribute-filter", PluginKind::Scheduling),
    ("by-label-selector", PluginKind::Scheduling),
    ("by-label", PluginKind::Scheduling),
    ("decode-filter", PluginKind::Scheduling),
    ("prefill-filter", PluginKind::Scheduling),
    ("encode-filter", PluginKind::Scheduling),
    ("file-discovery", PluginKind::Discovery),
    ("metrics-data-source", PluginKind::DataSource),
    ("core-metrics-extractor", PluginKind::Extractor),
    ("single-profile-handler", PluginKind::ProfileHandler),
    ("global-strict-fairness-policy", PluginKind::Flow),
    ("round-robin-fairness-policy", PluginKind::Flow),
    ("fcfs-ordering-policy", PluginKind::Flow),
    ("edf-ordering-policy", PluginKind::Flow),
    ("static-usage-limit-policy", PluginKind::Flow),
    ("utilization-detector", PluginKind::Flow),
    ("concurrency-detector", PluginKind::Flow),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read { path: PathBuf, error: String },
    #[error("config is not valid YAML: {0}")]
    Yaml(String),
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.into() }
}

/// One configured plugin, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginSpec {
    pub name: String,
    pub type_name: String,
    pub kind: PluginKind,
    /// `parameters` as JSON (an object; `{}` when absent), handed to `configure`.
    pub parameters: serde_json::Value,
    /// Our extension: load the component from this file instead of the embedded one.
    pub wasm: Option<PathBuf>,
    pub failure_policy: FailurePolicy,
    pub sandbox: Sandbox,
    /// Added by us (e.g. the implicit prefix producer), not written by the user.
    pub implicit: bool,
}

/// One `{pluginRef, weight}` of a profile.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileEntry {
    pub plugin_ref: String,
    /// Only meaningful for scorers; 1 when not given.
    pub weight: Weight,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProfileSpec {
    pub name: String,
    pub plugins: Vec<ProfileEntry>,
}

/// A metrics source and the extractors reading it.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceSpec {
    pub plugin_ref: String,
    pub extractors: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DataLayerSpec {
    /// When true (the default), the metrics source and extractor are added if absent.
    pub inject_defaults: bool,
    /// The discovery plugin's name, if one is configured.
    pub discovery: Option<String>,
    pub sources: Vec<SourceSpec>,
}

/// A validated EndpointPickerConfig.
#[derive(Clone, Debug, PartialEq)]
pub struct PickerConfig {
    pub api_version: String,
    pub plugins: Vec<PluginSpec>,
    /// Every scheduling profile; the first is the primary (the only one without an
    /// experiment). Invariant: never empty.
    pub profiles: Vec<ProfileSpec>,
    /// Our extension: variants of an A/B experiment over the profiles.
    pub experiment: Option<ExperimentSpec>,
    pub data_layer: DataLayerSpec,
    /// Admission thresholds: the utilization detector's (`saturationDetector`, or a
    /// `utilization-detector` plugin).
    pub saturation: SaturationConfig,
    /// Flow control (`featureGates: [flowControl]` and the `flowControl` section).
    pub flow: flow::FlowSpec,
    /// Things worth telling the operator (unknown keys, ignored sections).
    pub warnings: Vec<String>,
    /// The config file's folder: relative paths in plugin parameters resolve against it.
    pub base_dir: Option<PathBuf>,
    /// Our extension: `stateStore: redis://host:port[/db]`, routing state shared between
    /// replicas (read at start; `--state-store` overrides it).
    pub state_store: Option<String>,
}

impl PickerConfig {
    /// Every file the config makes the EPP read besides itself: plugin components and the
    /// precise producer's tokenizer files. A reload follows them and fingerprints them.
    pub fn files_read(&self) -> Vec<PathBuf> {
        let base = self.base_dir.as_deref();
        let mut files: Vec<PathBuf> = self.plugins.iter().filter_map(|p| p.wasm.clone()).collect();
        for p in self.plugins.iter().filter(|p| p.type_name == crate::kv_events::PRECISE_TYPE) {
            files.extend(crate::kv_events::files_read(&p.parameters, base));
        }
        files
    }

    /// The primary scheduling profile.
    pub fn profile(&self) -> &ProfileSpec {
        // Invariant: `profiles` is never empty (parse adds the default profile).
        &self.profiles[0]
    }

    /// The profile named `name`.
    pub fn profile_named(&self, name: &str) -> Option<&ProfileSpec> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// The plugin named `name`.
    pub fn plugin(&self, name: &str) -> Option<&PluginSpec> {
        self.plugins.iter().find(|p| p.name == name)
    }

    /// The discovery plugin: the one `dataLayer.discovery` names, or else the only plugin
    /// of discovery kind.
    pub fn discovery(&self) -> Option<&PluginSpec> {
        match &self.data_layer.discovery {
            Some(name) => self.plugin(name),
            None => self.plugins.iter().find(|p| p.kind == PluginKind::Discovery),
        }
    }

    /// Where to scrape worker metrics (scheme, path), or None when the data layer has no
    /// metrics source: the configured `metrics-data-source`'s parameters, or upstream's
    /// default source (http, /metrics) when `dataLayer.injectDefaults` is on.
    pub fn metrics_source(&self) -> Result<Option<(String, String)>, ConfigError> {
        let source = self.data_layer.sources.first().and_then(|s| self.plugin(&s.plugin_ref));
        let params = match source {
            Some(p) => p.parameters.clone(),
            None if self.data_layer.inject_defaults => empty_params(),
            None => return Ok(None),
        };
        let field = |k: &str| {
            format!("plugins[{}].parameters.{k}", source.map(|p| p.name.as_str()).unwrap_or("metrics-data-source"))
        };
        let text = |k: &str, default: &str| match params.get(k) {
            None | Some(serde_json::Value::Null) => Ok(default.to_string()),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(invalid(field(k), "must be a string")),
        };
        let scheme = text("scheme", "http")?;
        if scheme != "http" {
            return Err(invalid(field("scheme"), format!("`{scheme}` is not supported; use http")));
        }
        let path = text("path", "/metrics")?;
        if !path.starts_with('/') {
            return Err(invalid(field("path"), format!("`{path}` must start with /")));
        }
        Ok(Some((scheme, path)))
    }

    /// The metrics extractor: the first one the data layer's first source names, or else
    /// the first extractor plugin.
    pub fn metrics_extractor(&self) -> Option<&PluginSpec> {
        let named = self.data_layer.sources.first().and_then(|s| s.extractors.first()).and_then(|n| self.plugin(n));
        named.or_else(|| self.plugins.iter().find(|p| p.kind == PluginKind::Extractor))
    }

    /// Which metric names read which endpoint: the built-in engines (`vllm` with `vllm`'s
    /// names: the metric flags) and the extractor's `engineConfigs`.
    pub fn engines(
        &self,
        vllm: crate::metrics_scrape::MetricNames,
    ) -> Result<crate::metrics_scrape::Engines, ConfigError> {
        let Some(extractor) = self.metrics_extractor() else {
            return Ok(crate::metrics_scrape::Engines::builtin(vllm));
        };
        let i = self.plugins.iter().position(|p| p.name == extractor.name).unwrap_or_default();
        crate::metrics_scrape::Engines::from_params(&extractor.parameters, &format!("plugins[{i}].parameters"), vllm)
            .map(|(engines, _)| engines)
            .map_err(|e| invalid(e.field, e.message))
    }

    /// The default config: the optimized baseline.
    pub fn default_config() -> Result<PickerConfig, ConfigError> {
        PickerConfig::parse(DEFAULT_CONFIG, None)
    }

    /// The upstream guide's config (its discovery path points at `/etc/epp`).
    pub fn guide_config() -> Result<PickerConfig, ConfigError> {
        PickerConfig::parse(GUIDE_CONFIG, None)
    }

    /// Reads and parses a config file; relative `wasm:` paths resolve against its folder.
    pub fn from_file(path: &Path) -> Result<PickerConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.to_path_buf(), error: e.to_string() })?;
        PickerConfig::parse(&text, path.parent())
    }

    /// Parses config text. `base_dir` resolves relative `wasm:` paths (current dir if None).
    pub fn parse(text: &str, base_dir: Option<&Path>) -> Result<PickerConfig, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            return Err(ConfigError::Yaml("the config is empty".into()));
        } else {
            serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml(e.to_string()))?
        };
        let mut warnings = Vec::new();
        let api_version = match raw.api_version {
            Some(v) if API_VERSIONS.contains(&v.as_str()) => v,
            Some(v) => {
                return Err(invalid(
                    "apiVersion",
                    format!("unsupported `{v}`; expected one of {}", API_VERSIONS.join(", ")),
                ));
            }
            None => {
                return Err(invalid("apiVersion", format!("missing; expected one of {}", API_VERSIONS.join(", "))));
            }
        };
        if let Some(kind) = &raw.kind
            && kind != KIND
        {
            return Err(invalid("kind", format!("expected `{KIND}`, got `{kind}`")));
        }
        for key in raw.extra.keys() {
            let why = match key.as_str() {
                "parser" | "data" | "requestControl" => "is not supported by this EPP and is ignored",
                _ => "is not a known EndpointPickerConfig field and is ignored",
            };
            warnings.push(format!("top-level `{key}` {why}"));
        }

        let mut plugins: Vec<PluginSpec> = Vec::new();
        for (i, p) in raw.plugins.into_iter().enumerate() {
            let spec = plugin_spec(i, p, base_dir, &mut warnings)?;
            if plugins.iter().any(|q| q.name == spec.name) {
                return Err(invalid(format!("plugins[{i}].name"), format!("duplicate plugin name `{}`", spec.name)));
            }
            plugins.push(spec);
        }

        warn_undeclared_attributes(&plugins, &mut warnings);

        let n = raw.scheduling_profiles.len();
        if n > 1 && raw.experiment.is_none() {
            return Err(invalid(
                "schedulingProfiles",
                format!("{n} profiles given; without an `experiment` section this EPP runs exactly one"),
            ));
        }
        let mut profiles = Vec::with_capacity(n.max(1));
        for (i, raw_profile) in raw.scheduling_profiles.into_iter().enumerate() {
            let p = profile_spec(i, raw_profile, &plugins)?;
            if profiles.iter().any(|q: &ProfileSpec| q.name == p.name) {
                return Err(invalid(
                    format!("schedulingProfiles[{i}].name"),
                    format!("duplicate profile `{}`", p.name),
                ));
            }
            profiles.push(p);
        }
        if profiles.is_empty() {
            profiles.push(default_profile(&plugins));
        }
        let experiment = match raw.experiment {
            Some(e) => Some(experiment::parse_spec(e, &profiles)?),
            None => None,
        };
        let data_layer = data_layer_spec(raw.data_layer, &plugins)?;
        let top_detector_ref = raw.saturation_detector.as_ref().and_then(|s| s.plugin_ref.clone());
        let legacy_saturation = saturation_spec(raw.saturation_detector)?;
        let gates = flow::feature_gates(raw.feature_gates)?;
        let enabled = gates.get(flow::FLOW_CONTROL_GATE).copied().unwrap_or(false);
        let flow =
            flow::flow_spec(enabled, raw.flow_control, &plugins, (legacy_saturation, top_detector_ref), &mut warnings)?;
        let saturation = flow.utilization().copied().unwrap_or(legacy_saturation);
        if let Some(url) = &raw.state_store {
            crate::state_store::check_url(url).map_err(|e| invalid("stateStore", e))?;
        }
        let mut config = PickerConfig {
            api_version,
            plugins,
            profiles,
            experiment,
            data_layer,
            saturation,
            flow,
            warnings,
            base_dir: base_dir.map(Path::to_path_buf),
            state_store: raw.state_store,
        };
        for i in 0..config.profiles.len() {
            // The in-flight producer reads the prefix columns: it goes in first, so the
            // prefix producer, inserted after it at the front, runs before it.
            config.add_implicit_producer(i, INFLIGHT_PRODUCER_TYPE, INFLIGHT_READERS, None);
            config.add_implicit_producer(i, PREFIX_PRODUCER_TYPE, PREFIX_READERS, Some("prefix-cache-scorer"));
        }
        config.check_profile_roles()?;
        Ok(config)
    }

    /// Upstream creates the data producers a plugin requires when the config names none;
    /// so do we: a profile with a plugin of `readers` and no `producer_type` gets one, at
    /// the front of the profile. It takes the parameters of the profile's `params_from`
    /// plugin when there is one (older configs put the prefix index's parameters — block
    /// size, LRU capacity — on `prefix-cache-scorer`), else the defaults.
    fn add_implicit_producer(
        &mut self,
        profile: usize,
        producer_type: &str,
        readers: &[&str],
        params_from: Option<&str>,
    ) {
        let any_in_profile = |cfg: &PickerConfig, wanted: &dyn Fn(&PluginSpec) -> bool| {
            cfg.profiles[profile].plugins.iter().any(|e| cfg.plugin(&e.plugin_ref).is_some_and(wanted))
        };
        let in_profile = |cfg: &PickerConfig, type_name: &str| {
            any_in_profile(cfg, &|p: &PluginSpec| canonical_type(&p.type_name) == type_name)
        };
        // `utilization-filter` reads the in-flight counts only for an `active-requests` cap.
        let reader = |p: &PluginSpec| {
            let t = canonical_type(&p.type_name);
            readers.contains(&t)
                || (producer_type == INFLIGHT_PRODUCER_TYPE && t == "utilization-filter" && caps_active_requests(p))
        };
        // The precise producer publishes its own prefix columns: its readers name it.
        let precise = producer_type == PREFIX_PRODUCER_TYPE && in_profile(self, crate::kv_events::PRECISE_TYPE);
        if precise || in_profile(self, producer_type) || !any_in_profile(self, &reader) {
            return;
        }
        let existing = self.plugins.iter().find(|p| p.type_name == producer_type).map(|p| p.name.clone());
        let name = match existing {
            Some(name) => name,
            None => {
                let parameters = params_from
                    .and_then(|from| {
                        self.plugins.iter().find(|p| {
                            p.type_name == from && self.profiles[profile].plugins.iter().any(|e| e.plugin_ref == p.name)
                        })
                    })
                    .map(|p| p.parameters.clone())
                    .unwrap_or_else(empty_params);
                let mut name = producer_type.to_string();
                while self.plugin(&name).is_some() {
                    name.push('_');
                }
                self.plugins.push(PluginSpec {
                    name: name.clone(),
                    type_name: producer_type.into(),
                    kind: PluginKind::Scheduling,
                    parameters,
                    wasm: None,
                    failure_policy: FailurePolicy::FailOpen,
                    sandbox: Sandbox::default(),
                    implicit: true,
                });
                name
            }
        };
        self.profiles[profile].plugins.insert(0, ProfileEntry { plugin_ref: name, weight: Weight::ONE });
    }

    /// A profile may only reference scheduling plugins.
    fn check_profile_roles(&self) -> Result<(), ConfigError> {
        for (k, profile) in self.profiles.iter().enumerate() {
            for (i, e) in profile.plugins.iter().enumerate() {
                if let Some(p) = self.plugin(&e.plugin_ref)
                    && p.kind != PluginKind::Scheduling
                {
                    return Err(invalid(
                        format!("schedulingProfiles[{k}].plugins[{i}].pluginRef"),
                        format!(
                            "`{}` is a {:?} plugin (type {}), not a filter, scorer or picker",
                            p.name, p.kind, p.type_name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Plugins that read an endpoint attribute, and the parameter naming it.
const ATTRIBUTE_READERS: &[(&str, &str)] =
    &[("endpoint-attribute-scorer", "attributeKey"), ("endpoint-attribute-filter", "attribute")];

/// Warns about an attribute a plugin reads that no extractor's `customMetrics` maps: it
/// would read as missing on every endpoint (a typo, most likely).
fn warn_undeclared_attributes(plugins: &[PluginSpec], warnings: &mut Vec<String>) {
    let declared: Vec<&str> = plugins
        .iter()
        .filter(|p| p.kind == PluginKind::Extractor)
        .filter_map(|p| p.parameters.get("engineConfigs")?.as_array())
        .flatten()
        .filter_map(|engine| engine.get("customMetrics")?.as_array())
        .flatten()
        .filter_map(|custom| custom.get("attributeKey")?.as_str())
        .collect();
    for p in plugins {
        let Some((_, param)) = ATTRIBUTE_READERS.iter().find(|(t, _)| *t == p.type_name) else { continue };
        let Some(key) = p.parameters.get(*param).and_then(|v| v.as_str()) else { continue };
        if !declared.contains(&key) {
            let known = if declared.is_empty() { "none".to_string() } else { declared.join(", ") };
            warnings.push(format!(
                "plugin `{}`: {param} `{key}` is not an attributeKey of any core-metrics-extractor's customMetrics \
                 (declared: {known}); every endpoint will read as missing it",
                p.name
            ));
        }
    }
}

/// The type an alias stands for (`by-label-selector` → `label-selector-filter`).
/// A `utilization-filter` entry with a condition on `active-requests`.
fn caps_active_requests(p: &PluginSpec) -> bool {
    let conditions = p.parameters.get("conditions").and_then(|c| c.as_array());
    conditions.is_some_and(|cs| cs.iter().any(|c| c.get("metric").and_then(|m| m.as_str()) == Some("active-requests")))
}

pub fn canonical_type(type_name: &str) -> &str {
    crate::wasm::embedded::ALIASES.iter().find(|(alias, _)| *alias == type_name).map_or(type_name, |(_, t)| *t)
}

fn empty_params() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

fn plugin_spec(
    i: usize,
    p: RawPlugin,
    base_dir: Option<&Path>,
    warnings: &mut Vec<String>,
) -> Result<PluginSpec, ConfigError> {
    let field = |f: &str| format!("plugins[{i}].{f}");
    let type_name = p.type_name.filter(|t| !t.trim().is_empty()).ok_or_else(|| invalid(field("type"), "missing"))?;
    let name = p.name.filter(|n| !n.trim().is_empty()).unwrap_or_else(|| type_name.clone());
    for key in p.extra.keys() {
        warnings.push(format!("plugin `{name}`: unknown field `{key}` is ignored"));
    }
    let builtin = BUILTIN_TYPES.iter().find(|(t, _)| *t == type_name).map(|(_, k)| *k);
    let kind = match (builtin, &p.wasm) {
        (Some(PluginKind::Scheduling), _) | (None, Some(_)) => PluginKind::Scheduling,
        (Some(kind), None) => kind,
        (Some(kind), Some(_)) => {
            return Err(invalid(
                field("wasm"),
                format!("type `{type_name}` is a built-in {kind:?} plugin and cannot come from a wasm file"),
            ));
        }
        (None, None) => {
            let known: Vec<&str> = BUILTIN_TYPES.iter().map(|(t, _)| *t).collect();
            return Err(invalid(
                field("type"),
                format!(
                    "unknown plugin type `{type_name}`; known types: {} (or give `wasm: <path>` for a custom plugin)",
                    known.join(", ")
                ),
            ));
        }
    };
    let parameters = match p.parameters {
        None | Some(serde_yaml::Value::Null) => empty_params(),
        Some(v @ serde_yaml::Value::Mapping(_)) => serde_json::to_value(&v)
            .map_err(|e| invalid(field("parameters"), format!("cannot be expressed as JSON: {e}")))?,
        Some(_) => {
            return Err(invalid(field("parameters"), "must be a mapping of parameter names to values"));
        }
    };
    let role = crate::wasm::embedded::ROLE_FILTERS.iter().find(|(t, _)| *t == type_name);
    let parameters = match role {
        // Upstream's role filters take no parameters; theirs are fixed.
        Some((_, fixed)) if p.wasm.is_none() => {
            if parameters.as_object().is_some_and(|o| !o.is_empty()) {
                warnings.push(format!("plugin `{name}`: type {type_name} takes no parameters; they are ignored"));
            }
            serde_json::from_str(fixed).expect("role filter parameters are JSON")
        }
        _ => parameters,
    };
    if kind == PluginKind::Extractor {
        // Checked here so a bad engine config stops the load naming its field; the server
        // builds the engines again with the metric flags' vLLM names.
        let (_, notes) = crate::metrics_scrape::Engines::from_params(
            &parameters,
            &field("parameters"),
            crate::metrics_scrape::MetricNames::default(),
        )
        .map_err(|e| invalid(e.field, e.message))?;
        warnings.extend(notes.into_iter().map(|n| format!("plugin `{name}`: {n}")));
    }
    let wasm = p.wasm.map(|w| match base_dir {
        Some(dir) if w.is_relative() => dir.join(w),
        _ => w,
    });
    let failure_policy = match p.failure_policy.as_deref() {
        None | Some("failOpen") => FailurePolicy::FailOpen,
        Some("failClosed") => FailurePolicy::FailClosed,
        Some(other) => {
            return Err(invalid(field("failurePolicy"), format!("`{other}`; expected failOpen or failClosed")));
        }
    };
    let mut sandbox = Sandbox::default();
    if let Some(s) = p.sandbox {
        if let Some(mib) = s.memory_mib {
            if !(1..=4096).contains(&mib) {
                return Err(invalid(field("sandbox.memoryMiB"), format!("{mib} is outside 1..=4096")));
            }
            sandbox.memory_bytes = (mib as usize) << 20;
        }
        if let Some(ms) = s.call_timeout_ms {
            if !(1..=10_000).contains(&ms) {
                return Err(invalid(field("sandbox.callTimeoutMs"), format!("{ms} is outside 1..=10000")));
            }
            sandbox.call_timeout_ms = ms;
        }
    }
    Ok(PluginSpec { name, type_name, kind, parameters, wasm, failure_policy, sandbox, implicit: false })
}

fn profile_spec(k: usize, raw: RawProfile, plugins: &[PluginSpec]) -> Result<ProfileSpec, ConfigError> {
    let name = raw.name.unwrap_or_else(|| "default".into());
    let mut entries: Vec<ProfileEntry> = Vec::new();
    for (i, e) in raw.plugins.into_iter().enumerate() {
        let field = |f: &str| format!("schedulingProfiles[{k}].plugins[{i}].{f}");
        let plugin_ref = e.plugin_ref.ok_or_else(|| invalid(field("pluginRef"), "missing"))?;
        if !plugins.iter().any(|p| p.name == plugin_ref) {
            return Err(invalid(field("pluginRef"), format!("no plugin named `{plugin_ref}` in `plugins`")));
        }
        if entries.iter().any(|x| x.plugin_ref == plugin_ref) {
            return Err(invalid(field("pluginRef"), format!("`{plugin_ref}` is listed twice")));
        }
        let weight = match e.weight {
            None => Ok(Weight::ONE),
            Some(serde_yaml::Value::Number(n)) => Weight::new(n.as_f64().unwrap_or(f64::NAN)),
            Some(other) => Err(format!("weight must be a number, got {}", yaml_inline(&other))),
        }
        .map_err(|m| invalid(field("weight"), m))?;
        entries.push(ProfileEntry { plugin_ref, weight });
    }
    Ok(ProfileSpec { name, plugins: entries })
}

/// With no `schedulingProfiles`, every scheduling plugin forms the one profile, weight 1.
fn default_profile(plugins: &[PluginSpec]) -> ProfileSpec {
    let plugins = plugins
        .iter()
        .filter(|p| p.kind == PluginKind::Scheduling)
        .map(|p| ProfileEntry { plugin_ref: p.name.clone(), weight: Weight::ONE })
        .collect();
    ProfileSpec { name: "default".into(), plugins }
}

fn data_layer_spec(raw: Option<RawDataLayer>, plugins: &[PluginSpec]) -> Result<DataLayerSpec, ConfigError> {
    let raw = raw.unwrap_or_default();
    let check = |field: String, name: &str, kinds: &[PluginKind]| -> Result<(), ConfigError> {
        match plugins.iter().find(|p| p.name == name) {
            None => Err(invalid(field, format!("no plugin named `{name}` in `plugins`"))),
            Some(p) if !kinds.contains(&p.kind) => {
                Err(invalid(field, format!("`{name}` (type {}) is not a {:?} plugin", p.type_name, kinds[0])))
            }
            Some(_) => Ok(()),
        }
    };
    let discovery = match raw.discovery {
        None => None,
        Some(d) => {
            let (field, name) = match (d.plugin_ref, d.endpoints.and_then(|e| e.plugin_ref)) {
                (Some(r), _) => ("dataLayer.discovery.pluginRef", r),
                (None, Some(r)) => ("dataLayer.discovery.endpoints.pluginRef", r),
                (None, None) => {
                    return Err(invalid("dataLayer.discovery", "needs `pluginRef` or `endpoints.pluginRef`"));
                }
            };
            check(field.into(), &name, &[PluginKind::Discovery])?;
            Some(name)
        }
    };
    let mut sources = Vec::new();
    for (i, s) in raw.sources.into_iter().enumerate() {
        let plugin_ref = s.plugin_ref.ok_or_else(|| invalid(format!("dataLayer.sources[{i}].pluginRef"), "missing"))?;
        check(format!("dataLayer.sources[{i}].pluginRef"), &plugin_ref, &[PluginKind::DataSource])?;
        let mut extractors = Vec::new();
        for (j, x) in s.extractors.into_iter().enumerate() {
            let field = format!("dataLayer.sources[{i}].extractors[{j}].pluginRef");
            let name = x.plugin_ref.ok_or_else(|| invalid(field.clone(), "missing"))?;
            check(field, &name, &[PluginKind::Extractor])?;
            extractors.push(name);
        }
        sources.push(SourceSpec { plugin_ref, extractors });
    }
    Ok(DataLayerSpec { inject_defaults: raw.inject_defaults.unwrap_or(true), discovery, sources })
}

fn saturation_spec(raw: Option<RawSaturation>) -> Result<SaturationConfig, ConfigError> {
    let mut c = SaturationConfig::default();
    let Some(raw) = raw else { return Ok(c) };
    if let Some(q) = raw.queue_depth_threshold {
        if !(q.is_finite() && q > 0.0) {
            return Err(invalid("saturationDetector.queueDepthThreshold", format!("must be > 0, got {q}")));
        }
        c.queue_depth_threshold = q as f32;
    }
    if let Some(k) = raw.kv_cache_util_threshold {
        if !(k > 0.0 && k <= 1.0) {
            return Err(invalid("saturationDetector.kvCacheUtilThreshold", format!("must be in (0, 1], got {k}")));
        }
        c.kv_cache_threshold = k as f32;
    }
    if let Some(s) = raw.metrics_staleness_threshold {
        c.staleness_ms =
            parse_duration(&s).filter(|d| !d.is_zero()).map(|d| d.as_millis() as u32).ok_or_else(|| {
                invalid(
                    "saturationDetector.metricsStalenessThreshold",
                    format!("`{s}` is not a positive duration like 200ms or 1s"),
                )
            })?;
    }
    Ok(c)
}

/// A Go duration (`200ms`, `1s`, `1.5s`, `2m`, `1m30s`) of at most `u32::MAX` ms. Shared
/// by the config and the command-line flags.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    llmd_plugin_sdk::params::duration(s).filter(|d| d.as_millis() <= u128::from(u32::MAX))
}

fn yaml_inline(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v).map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

// ---- The YAML as written. Unknown keys land in `extra` and become warnings. ----

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    plugins: Vec<RawPlugin>,
    #[serde(default)]
    scheduling_profiles: Vec<RawProfile>,
    data_layer: Option<RawDataLayer>,
    saturation_detector: Option<RawSaturation>,
    experiment: Option<experiment::RawExperiment>,
    feature_gates: Option<serde_yaml::Value>,
    flow_control: Option<flow::RawFlowControl>,
    state_store: Option<String>,
    #[serde(flatten)]
    extra: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSaturation {
    /// Upstream's current form (deprecated there in favour of flowControl's): a detector
    /// plugin by name.
    plugin_ref: Option<String>,
    queue_depth_threshold: Option<f64>,
    kv_cache_util_threshold: Option<f64>,
    metrics_staleness_threshold: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPlugin {
    #[serde(rename = "type")]
    type_name: Option<String>,
    name: Option<String>,
    parameters: Option<serde_yaml::Value>,
    wasm: Option<PathBuf>,
    failure_policy: Option<String>,
    sandbox: Option<RawSandbox>,
    #[serde(flatten)]
    extra: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    #[serde(rename = "memoryMiB")]
    memory_mib: Option<u64>,
    #[serde(rename = "callTimeoutMs")]
    call_timeout_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawProfile {
    name: Option<String>,
    #[serde(default)]
    plugins: Vec<RawProfileEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawProfileEntry {
    plugin_ref: Option<String>,
    weight: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawDataLayer {
    inject_defaults: Option<bool>,
    discovery: Option<RawDiscovery>,
    #[serde(default)]
    sources: Vec<RawSource>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDiscovery {
    plugin_ref: Option<String>,
    endpoints: Option<RawRef>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRef {
    plugin_ref: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSource {
    plugin_ref: Option<String>,
    #[serde(default)]
    extractors: Vec<RawRef>,
}
