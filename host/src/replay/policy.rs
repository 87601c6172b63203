//! Routing policies of a replay: how `--policy` values are named and resolved, and the
//! per-request decision — the EPP's admission (shed sheddable requests when the pool is
//! saturated, leave out endpoints over their thresholds) followed by the scheduling profile
//! built from a config, exactly as `routing::Router::route` does it, or by the built-in
//! round-robin, which has no scheduler.
//!
//! Errors become HTTP statuses through `routing::RouteError::reply`, the one mapping. It
//! knows nothing of virtual time or workers beyond the metrics it is handed.

use std::path::PathBuf;
use std::str::FromStr;

use llmd_plugin_sdk::{EndpointInfo, Metrics, Request, Usage};

use crate::config::PickerConfig;
use crate::routing::RouteError;
use crate::scheduler::{SaturationConfig, SchedulerProfile};
use crate::wasm::WasmRuntime;

/// The built-in `random` policy: only the random picker, the plugins' own baseline.
pub const RANDOM_CONFIG: &str = "\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: random-picker
schedulingProfiles:
  - name: random
    plugins:
      - pluginRef: random-picker
";

/// Plugin call deadlines are wall-clock; under a replay's load they would make results
/// depend on how busy the machine is, so each deadline is raised to at least this.
pub const MIN_CALL_TIMEOUT_MS: u64 = 10_000;

/// Where a policy comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicySource {
    /// The optimized baseline (the default config).
    Baseline,
    /// Only the random picker.
    Random,
    /// Cycle over the admitted endpoints; no scheduler, no plugins.
    RoundRobin,
    /// An EndpointPickerConfig file (which may name `.wasm` plugins of your own).
    Config(PathBuf),
}

/// A `--policy` value: `baseline`, `random`, `round-robin`, `name=config.yaml` or a path.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySpec {
    pub name: String,
    pub source: PolicySource,
}

impl PolicySpec {
    /// The policies compared when none is given.
    pub fn defaults() -> Vec<PolicySpec> {
        ["baseline", "random", "round-robin"].iter().filter_map(|n| n.parse().ok()).collect()
    }
}

fn builtin(name: &str) -> Option<PolicySource> {
    match name {
        "baseline" => Some(PolicySource::Baseline),
        "random" => Some(PolicySource::Random),
        "round-robin" => Some(PolicySource::RoundRobin),
        _ => None,
    }
}

impl FromStr for PolicySpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some((name, value)) = s.split_once('=') {
            let (name, value) = (name.trim(), value.trim());
            if name.is_empty() || value.is_empty() {
                return Err(format!("`{s}`: expected name=config.yaml"));
            }
            let source = builtin(value).unwrap_or_else(|| PolicySource::Config(PathBuf::from(value)));
            return Ok(PolicySpec { name: name.to_string(), source });
        }
        if let Some(source) = builtin(s) {
            return Ok(PolicySpec { name: s.to_string(), source });
        }
        let path = PathBuf::from(s);
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json") {
            let name = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| s.to_string());
            return Ok(PolicySpec { name, source: PolicySource::Config(path) });
        }
        Err(format!("`{s}` is neither baseline, random, round-robin, name=config.yaml nor a .yaml file"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy `{policy}`: {error}")]
    Config { policy: String, error: crate::config::ConfigError },
    #[error("policy `{policy}`: {error}")]
    Build { policy: String, error: crate::loader::BuildError },
}

enum Router {
    Scheduler(Box<SchedulerProfile>),
    /// The position after the last pick, in endpoint id order.
    RoundRobin {
        next: u32,
    },
}

/// A ready policy: admission thresholds plus a scheduler (or round-robin).
pub struct Policy {
    pub name: String,
    saturation: SaturationConfig,
    router: Router,
}

impl Policy {
    /// Builds `spec`'s scheduler through the same loader the server uses (plugins loaded
    /// and probed), each plugin in its own fresh instance.
    pub fn build(spec: &PolicySpec, runtime: &WasmRuntime) -> Result<Policy, PolicyError> {
        let cfg = |r: Result<PickerConfig, crate::config::ConfigError>| {
            r.map_err(|error| PolicyError::Config { policy: spec.name.clone(), error })
        };
        let config = match &spec.source {
            PolicySource::RoundRobin => {
                return Ok(Policy {
                    name: spec.name.clone(),
                    saturation: SaturationConfig::default(),
                    router: Router::RoundRobin { next: 0 },
                });
            }
            PolicySource::Baseline => cfg(PickerConfig::default_config())?,
            PolicySource::Random => cfg(PickerConfig::parse(RANDOM_CONFIG, None))?,
            PolicySource::Config(path) => cfg(PickerConfig::from_file(path))?,
        };
        let mut config = config;
        for plugin in &mut config.plugins {
            plugin.sandbox.call_timeout_ms = plugin.sandbox.call_timeout_ms.max(MIN_CALL_TIMEOUT_MS);
        }
        let profile = crate::loader::build_profile(runtime, &config)
            .map_err(|error| PolicyError::Build { policy: spec.name.clone(), error })?;
        Ok(Policy {
            name: spec.name.clone(),
            saturation: config.saturation,
            router: Router::Scheduler(Box::new(profile)),
        })
    }

    /// Tells the plugins the pool (a new generation of endpoint records).
    pub fn pool_changed(&self, generation: u64, endpoints: &[EndpointInfo]) {
        if let Router::Scheduler(p) = &self.router {
            p.pool_changed(generation, endpoints);
        }
    }

    /// Tells the plugins a response completed.
    pub fn response_complete(&self, request_id: &str, endpoint: u32, usage: Usage) {
        if let Router::Scheduler(p) = &self.router {
            p.response_complete(request_id, endpoint, usage);
        }
    }

    /// Chooses the endpoint for `req` given the scraped `metrics` of the whole pool.
    pub fn route(&mut self, req: &Request, metrics: &Metrics) -> Result<u32, RouteError> {
        if metrics.is_empty() {
            return Err(RouteError::NoEndpoints);
        }
        if self.saturation.shed(req.priority, metrics) {
            return Err(RouteError::Saturated);
        }
        let kept = self.saturation.filter(metrics);
        let filtered;
        let metrics = if kept.len() == metrics.len() {
            metrics
        } else {
            filtered = metrics.select(&kept);
            &filtered
        };
        match &mut self.router {
            Router::Scheduler(profile) => {
                let decision = profile.schedule(req, metrics).map_err(RouteError::Scheduling)?;
                decision
                    .targets
                    .first()
                    .copied()
                    .ok_or_else(|| RouteError::Internal("the scheduler returned no target".into()))
            }
            Router::RoundRobin { next } => {
                // The first admitted id at or after the cursor, wrapping around.
                let pick = metrics
                    .ids
                    .iter()
                    .copied()
                    .filter(|&id| id >= *next)
                    .min()
                    .or_else(|| metrics.ids.iter().copied().min())
                    .ok_or(RouteError::NoEndpoints)?;
                *next = pick.wrapping_add(1);
                Ok(pick)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_values_parse() {
        let cfg =
            |name: &str, path: &str| Ok(PolicySpec { name: name.into(), source: PolicySource::Config(path.into()) });
        let cases: Vec<(&str, Result<PolicySpec, ()>)> = vec![
            ("baseline", Ok(PolicySpec { name: "baseline".into(), source: PolicySource::Baseline })),
            ("round-robin", Ok(PolicySpec { name: "round-robin".into(), source: PolicySource::RoundRobin })),
            ("rr=round-robin", Ok(PolicySpec { name: "rr".into(), source: PolicySource::RoundRobin })),
            ("mine=configs/a.yaml", cfg("mine", "configs/a.yaml")),
            ("configs/lora.yaml", cfg("lora", "configs/lora.yaml")),
            ("=a.yaml", Err(())),
            ("x=", Err(())),
            ("fancy", Err(())),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<PolicySpec>().map_err(|_| ()), want, "{text}");
        }
        let names: Vec<String> = PolicySpec::defaults().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["baseline", "random", "round-robin"]);
    }

    fn metrics(rows: &[(u32, f32, f32)]) -> Metrics {
        Metrics {
            ids: rows.iter().map(|r| r.0).collect(),
            waiting: rows.iter().map(|r| r.1).collect(),
            running: rows.iter().map(|_| 0.0).collect(),
            kv_usage: rows.iter().map(|r| r.2).collect(),
            age_ms: rows.iter().map(|_| 10).collect(),
        }
    }

    fn round_robin() -> Policy {
        Policy { name: "rr".into(), saturation: SaturationConfig::default(), router: Router::RoundRobin { next: 0 } }
    }

    #[test]
    fn round_robin_cycles_over_admitted_endpoints() {
        let mut p = round_robin();
        let idle = metrics(&[(0, 0.0, 0.0), (1, 0.0, 0.0), (2, 0.0, 0.0)]);
        let picks: Vec<u32> = (0..4).map(|_| p.route(&Request::default(), &idle).expect("routed")).collect();
        assert_eq!(picks, [0, 1, 2, 0]);
        // Endpoint 1 is over the queue threshold: admission leaves it out.
        let busy = metrics(&[(0, 0.0, 0.0), (1, 9.0, 0.0), (2, 0.0, 0.0)]);
        let picks: Vec<u32> = (0..3).map(|_| p.route(&Request::default(), &busy).expect("routed")).collect();
        assert_eq!(picks, [2, 0, 2]);
    }

    #[test]
    fn admission_statuses() {
        let mut p = round_robin();
        let saturated = metrics(&[(0, 9.0, 0.9), (1, 9.0, 0.9)]);
        let sheddable = Request { priority: -1, ..Default::default() };
        let status = |r: Result<u32, RouteError>| r.map_err(|e| e.reply().status);
        assert_eq!(status(p.route(&sheddable, &saturated)), Err(429));
        assert!(status(p.route(&Request::default(), &saturated)).is_ok(), "standard requests are scheduled");
        assert_eq!(status(p.route(&Request::default(), &Metrics::default())), Err(503));
    }
}
