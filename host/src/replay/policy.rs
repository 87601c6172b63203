//! Routing policies of a replay: how `--policy` values are named and resolved, and the
//! per-request decision — `epp_core`'s `Scheduler::decide`, the very decision the server
//! makes (admission, variant choice, the profile's cycle), over a scheduler built from a
//! config by the server's loader; or the built-in round-robin, which has no scheduler but
//! the same admission. The plugins' hooks (first chunk, end) are driven by the replay's
//! events, as the ext_proc stream drives them live.
//!
//! Errors become HTTP statuses through `routing::RouteError::reply`, the one mapping. It
//! knows nothing of virtual time or workers beyond the metrics it is handed.

use std::path::PathBuf;
use std::str::FromStr;

use epp_core::{Candidates, Completion, EndpointInfo, Request, SaturationConfig, Scheduler};

use crate::config::PickerConfig;
use crate::routing::RouteError;
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
    /// The upstream no-Kubernetes guide's config (the older optimized baseline).
    Guide,
    /// Only the random picker.
    Random,
    /// Cycle over the admitted endpoints; no scheduler, no plugins.
    RoundRobin,
    /// A model of the peer routers' `cache_aware` policy (`cache_aware.rs`).
    CacheAware,
    /// The default profile on precise prefix matches (`config/precise.yaml`), fed by the
    /// simulated engines' KV events.
    Precise,
    /// An EndpointPickerConfig file (which may name `.wasm` plugins of your own).
    Config(PathBuf),
}

/// A `--policy` value: `baseline`, `guide`, `random`, `round-robin`, `cache-aware`,
/// `name=config.yaml` or a path.
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
        "guide" => Some(PolicySource::Guide),
        "random" => Some(PolicySource::Random),
        "round-robin" => Some(PolicySource::RoundRobin),
        "cache-aware" => Some(PolicySource::CacheAware),
        "precise" => Some(PolicySource::Precise),
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
        Err(format!(
            "`{s}` is neither baseline, guide, precise, random, round-robin, cache-aware, name=config.yaml nor a .yaml file"
        ))
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
    Scheduler(Box<Scheduler>),
    /// The position after the last pick, in endpoint id order.
    RoundRobin {
        next: u32,
    },
    CacheAware(super::cache_aware::CacheAware),
}

/// A ready policy: admission thresholds plus a scheduler (or round-robin).
pub struct Policy {
    pub name: String,
    saturation: SaturationConfig,
    router: Router,
    /// Flow control, when the config turns it on.
    pub flow: Option<crate::config::flow::FlowSpec>,
    /// Precise prefix routing's index, when the config uses it (fed from the simulated
    /// engines' KV events).
    pub kv_events: Option<std::sync::Arc<crate::kv_events::KvEvents>>,
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
                    flow: None,
                    kv_events: None,
                });
            }
            PolicySource::CacheAware => {
                return Ok(Policy {
                    name: spec.name.clone(),
                    saturation: SaturationConfig::default(),
                    router: Router::CacheAware(Default::default()),
                    flow: None,
                    kv_events: None,
                });
            }
            PolicySource::Baseline => cfg(PickerConfig::default_config())?,
            PolicySource::Guide => cfg(PickerConfig::guide_config())?,
            PolicySource::Precise => cfg(PickerConfig::parse(crate::config::PRECISE_CONFIG, None))?,
            PolicySource::Random => cfg(PickerConfig::parse(RANDOM_CONFIG, None))?,
            PolicySource::Config(path) => cfg(PickerConfig::from_file(path))?,
        };
        let mut config = config;
        for plugin in &mut config.plugins {
            plugin.sandbox.call_timeout_ms = plugin.sandbox.call_timeout_ms.max(MIN_CALL_TIMEOUT_MS);
            // A wall-clock breaker would make the report depend on how fast the run went.
            plugin.sandbox.breaker = false;
        }
        let hub = crate::kv_events::KvEvents::new(None);
        let built = crate::loader::build(runtime, &config, &crate::loader::PluginSet::with_kv_events(hub.clone()))
            .map_err(|error| PolicyError::Build { policy: spec.name.clone(), error })?;
        // Replay feeds the index from its simulated engines itself: no subscriptions.
        let precise = built.plugins.precise();
        hub.install(precise);
        Ok(Policy {
            name: spec.name.clone(),
            saturation: config.saturation,
            router: Router::Scheduler(Box::new(built.scheduler)),
            flow: config.flow.enabled.then(|| config.flow.clone()),
            kv_events: precise.is_some().then_some(hub),
        })
    }

    /// Tells the plugins the pool (a new generation of endpoint records).
    pub fn pool_changed(&self, generation: u64, endpoints: &[EndpointInfo]) {
        if let Router::Scheduler(s) = &self.router {
            s.pool_changed(generation, endpoints);
        }
    }

    /// The first output of the request of cycle `cycle`, routed by `variant` to
    /// `endpoint`, came.
    pub fn first_chunk(&self, variant: usize, cycle: u64, endpoint: u32, now_ms: u64) {
        if let Router::Scheduler(s) = &self.router {
            s.first_chunk(&[variant], cycle, endpoint, now_ms);
        }
    }

    /// The request of cycle `cycle`, routed by `variant`, ended.
    pub fn finished(&mut self, variant: usize, cycle: u64, completion: &Completion) {
        match &mut self.router {
            Router::Scheduler(s) => {
                s.finished(&[variant], cycle, completion);
            }
            Router::CacheAware(c) => c.finished(completion.endpoint),
            Router::RoundRobin { .. } => {}
        }
    }

    /// Chooses the endpoint for `req` (cycle `cycle`) given the scraped load of the pool;
    /// returns it with the index of the variant that chose it.
    pub fn route(&mut self, cycle: u64, req: &Request, candidates: Candidates) -> Result<(u32, usize), RouteError> {
        match &mut self.router {
            Router::Scheduler(s) => {
                let d = s.decide(cycle, req, candidates)?;
                Ok((d.primary(), d.variant))
            }
            Router::RoundRobin { next } => {
                if candidates.is_empty() {
                    return Err(RouteError::NoEndpoints);
                }
                if self.saturation.shed(req.priority, &candidates) {
                    return Err(RouteError::Saturated);
                }
                let kept = self.saturation.filter(&candidates);
                let metrics = candidates.select(&kept);
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
                Ok((pick, 0))
            }
            // The peers have no saturation admission: every request is routed.
            Router::CacheAware(c) => {
                c.route(req.prompt.as_bytes(), &candidates.ids).map(|w| (w, 0)).ok_or(RouteError::NoEndpoints)
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

    fn metrics(rows: &[(u32, f32, f32)]) -> Candidates {
        Candidates {
            ids: rows.iter().map(|r| r.0).collect(),
            waiting: rows.iter().map(|r| r.1).collect(),
            running: rows.iter().map(|_| 0.0).collect(),
            kv_usage: rows.iter().map(|r| r.2).collect(),
            age_ms: rows.iter().map(|_| 10.0).collect(),
            own_in_flight: Vec::new(),
            attributes: Vec::new(),
        }
    }

    fn round_robin() -> Policy {
        Policy {
            name: "rr".into(),
            saturation: SaturationConfig::default(),
            router: Router::RoundRobin { next: 0 },
            flow: None,
            kv_events: None,
        }
    }

    #[test]
    fn round_robin_cycles_over_admitted_endpoints() {
        let mut p = round_robin();
        let idle = metrics(&[(0, 0.0, 0.0), (1, 0.0, 0.0), (2, 0.0, 0.0)]);
        let picks: Vec<u32> =
            (0..4).map(|_| p.route(0, &Request::default(), idle.clone()).expect("routed").0).collect();
        assert_eq!(picks, [0, 1, 2, 0]);
        // Endpoint 1 is over the queue threshold: admission leaves it out.
        let busy = metrics(&[(0, 0.0, 0.0), (1, 9.0, 0.0), (2, 0.0, 0.0)]);
        let picks: Vec<u32> =
            (0..3).map(|_| p.route(0, &Request::default(), busy.clone()).expect("routed").0).collect();
        assert_eq!(picks, [2, 0, 2]);
    }

    #[test]
    fn admission_statuses() {
        let mut p = round_robin();
        let saturated = metrics(&[(0, 9.0, 0.9), (1, 9.0, 0.9)]);
        let sheddable = Request { priority: -1, ..Default::default() };
        let status = |r: Result<(u32, usize), RouteError>| r.map_err(|e| e.reply().status);
        assert_eq!(status(p.route(0, &sheddable, saturated.clone())), Err(429));
        assert!(status(p.route(0, &Request::default(), saturated)).is_ok(), "standard requests are scheduled");
        assert_eq!(status(p.route(0, &Request::default(), Candidates::default())), Err(503));
    }
}
