//! Configuration of one simulated worker: the plain [`SimConfig`] that library users fill in,
//! the command-line flags that produce it, and [`ServedModels`], the validated answer to
//! "which model names does this worker serve, and which of them are LoRA adapters".
//!
//! It validates once, at start; nothing here runs per request except `ServedModels::resolve`.

use std::net::{IpAddr, Ipv4Addr};

use clap::Parser;
use thiserror::Error;

use crate::fault::FaultMode;
use crate::model::{ModelParams, ParamsError};

/// Model name reported when `served_model_name` is not set.
pub const DEFAULT_MODEL_NAME: &str = "sim-model";

/// Everything needed to start a worker. `SimConfig::default()` binds 127.0.0.1 on any free
/// port, answers in model time (`time_scale` 1) and serves any model name.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub host: IpAddr,
    /// 0 picks a free port; [`crate::SimHandle::addr`] tells which.
    pub port: u16,
    /// Sent in the `x-sim-worker` header of every response.
    pub name: String,
    /// When set, requests naming another model (and no LoRA adapter) get 404, like vLLM.
    pub served_model_name: Option<String>,
    /// LoRA adapters this worker serves.
    pub loras: Vec<String>,
    /// Real seconds per model second: 0 answers at once, 1 takes model time.
    pub time_scale: f64,
    pub model: ModelParams,
    pub metrics_mode: FaultMode,
    pub requests_mode: FaultMode,
    /// Publish KV-cache events as vLLM does (`--kv-events-config`), when set.
    pub kv_events: Option<KvEventsConfig>,
    /// Whose metric names `/metrics` uses.
    pub metrics_names: MetricsNames,
    /// More gauges on `/metrics`, as `name` or `name{labels}` and a value (what an
    /// operator's exporter adds: a GPU's temperature, a tier), changeable while running
    /// ([`crate::SimHandle::set_extra_metric`]).
    pub extra_metrics: Vec<(String, f64)>,
}

/// The engine whose metric names `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MetricsNames {
    /// vLLM's (`vllm:num_requests_waiting`, `vllm:cache_config_info`, …).
    #[default]
    Vllm,
    /// SGLang's (`sglang:num_queue_reqs`, `sglang:token_usage`, `sglang:page_size`, …).
    Sglang,
}

/// Where KV-cache events are published (vLLM's `endpoint`, `replay_endpoint`, `topic`).
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventsConfig {
    /// PUB port on the worker's host; 0 picks a free one ([`crate::SimHandle::kv_events_ports`]).
    pub port: u16,
    /// ROUTER replay port; 0 picks a free one; None: no replay.
    pub replay_port: Option<u16>,
    pub topic: String,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            name: "sim".into(),
            served_model_name: None,
            loras: Vec::new(),
            time_scale: 1.0,
            model: ModelParams::default(),
            metrics_mode: FaultMode::Ok,
            requests_mode: FaultMode::Ok,
            kv_events: None,
            metrics_names: MetricsNames::Vllm,
            extra_metrics: Vec::new(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("model parameters: {0}")]
    Params(#[from] ParamsError),
    #[error("time scale must be a finite number >= 0, got {0}")]
    TimeScale(f64),
    #[error("worker name {0:?} cannot be sent in an HTTP header")]
    Name(String),
    #[error("LoRA adapter name {0:?} is empty or repeated, or equals the served model name")]
    Lora(String),
}

impl SimConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        if !(self.time_scale.is_finite() && self.time_scale >= 0.0) {
            return Err(ConfigError::TimeScale(self.time_scale));
        }
        if axum::http::HeaderValue::from_str(&self.name).is_err() {
            return Err(ConfigError::Name(self.name.clone()));
        }
        ServedModels::new(self.served_model_name.clone(), self.loras.clone())?;
        Ok(())
    }
}

/// The model names a worker answers to.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedModels {
    base: String,
    /// Whether a name that is neither `base` nor an adapter is refused.
    strict: bool,
    loras: Vec<String>,
}

/// What a request's `model` field resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    /// The name echoed in replies and seeding the prefix-cache hashes.
    pub name: String,
    pub lora: Option<String>,
}

impl ServedModels {
    pub fn new(served_model_name: Option<String>, loras: Vec<String>) -> Result<Self, ConfigError> {
        let strict = served_model_name.is_some();
        let base = served_model_name.unwrap_or_else(|| DEFAULT_MODEL_NAME.to_owned());
        for (i, l) in loras.iter().enumerate() {
            if l.is_empty() || *l == base || loras[..i].contains(l) {
                return Err(ConfigError::Lora(l.clone()));
            }
        }
        Ok(ServedModels { base, strict, loras })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn loras(&self) -> &[String] {
        &self.loras
    }

    /// Resolves a request's `model`; `None` when this worker does not serve it.
    ///
    /// Without a configured served name any model is served as the base model: the gateway
    /// under test decides routing, the worker does not second-guess it.
    pub fn resolve(&self, requested: Option<&str>) -> Option<ResolvedModel> {
        let Some(name) = requested else {
            return Some(ResolvedModel { name: self.base.clone(), lora: None });
        };
        if self.loras.iter().any(|l| l == name) {
            return Some(ResolvedModel { name: name.to_owned(), lora: Some(name.to_owned()) });
        }
        if name == self.base || !self.strict {
            return Some(ResolvedModel { name: name.to_owned(), lora: None });
        }
        None
    }
}

/// Command-line flags of `sim-worker`.
#[derive(Debug, Parser)]
#[command(name = "sim-worker", about = "A simulated vLLM worker (OpenAI API + vLLM metrics)")]
pub struct Cli {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to bind; 0 picks a free one (the listening line says which).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Worker name, sent in the `x-sim-worker` response header.
    #[arg(long, default_value = "sim-worker")]
    pub name: String,
    /// Model name to serve; others get 404. Without it any name is served.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// A LoRA adapter to serve (repeatable).
    #[arg(long = "lora")]
    pub loras: Vec<String>,
    /// Real seconds per model second (0 = answer at once).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Behaviour of `/metrics`.
    #[arg(long, value_enum, default_value_t = FaultMode::Ok)]
    pub metrics_mode: FaultMode,
    /// Behaviour of the inference endpoints.
    #[arg(long, value_enum, default_value_t = FaultMode::Ok)]
    pub requests_mode: FaultMode,
    /// Whose metric names `/metrics` uses.
    #[arg(long, value_enum, default_value_t = MetricsNames::Vllm)]
    pub metrics_names: MetricsNames,
    /// Publish KV-cache events (ZMQ PUB) on this port, as vLLM's `--kv-events-config`.
    #[arg(long)]
    pub kv_events_port: Option<u16>,
    /// The replay (ZMQ ROUTER) port for missed events.
    #[arg(long, requires = "kv_events_port")]
    pub kv_events_replay_port: Option<u16>,
    /// The events' topic.
    #[arg(long, default_value = "")]
    pub kv_events_topic: String,
    /// Another gauge on `/metrics`, as `name=value` or `name{label="v"}=value` (repeatable).
    #[arg(long = "extra-metric", value_parser = parse_extra_metric)]
    pub extra_metrics: Vec<(String, f64)>,
    #[command(flatten)]
    pub model: ModelFlags,
}

/// `--extra-metric`: `name=value`, the value after the last `=` (labels hold `=` too).
fn parse_extra_metric(s: &str) -> Result<(String, f64), String> {
    let (name, value) = s.rsplit_once('=').ok_or("expected name=value")?;
    let value: f64 = value.trim().parse().map_err(|_| format!("`{value}` is not a number"))?;
    let name = name.trim();
    let bare = name.split('{').next().unwrap_or_default();
    if bare.is_empty() || !bare.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':')) {
        return Err(format!("`{name}` is not a metric name"));
    }
    Ok((name.to_string(), value))
}

/// Flags of the serving model (reusable by other binaries that run the model).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelFlags {
    /// Running sequences at most.
    #[arg(long, default_value_t = ModelParams::default().max_num_seqs)]
    pub max_num_seqs: usize,
    /// Distinct LoRA adapters running at once at most.
    #[arg(long, default_value_t = ModelParams::default().max_loras)]
    pub max_loras: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = ModelParams::default().block_size)]
    pub block_size: usize,
    /// KV blocks on the (simulated) GPU.
    #[arg(long, default_value_t = ModelParams::default().num_gpu_blocks)]
    pub num_gpu_blocks: usize,
    /// Prefill cost per uncached prompt token, microseconds.
    #[arg(long, default_value_t = ModelParams::default().prefill_us_per_token)]
    pub prefill_us_per_token: f64,
    /// Fixed cost of a decode step, milliseconds.
    #[arg(long, default_value_t = ModelParams::default().decode_ms_base)]
    pub decode_ms_base: f64,
    /// Extra cost of a decode step per running sequence, milliseconds.
    #[arg(long, default_value_t = ModelParams::default().decode_ms_per_seq)]
    pub decode_ms_per_seq: f64,
}

impl From<ModelFlags> for ModelParams {
    fn from(f: ModelFlags) -> Self {
        ModelParams {
            max_num_seqs: f.max_num_seqs,
            max_loras: f.max_loras,
            block_size: f.block_size,
            num_gpu_blocks: f.num_gpu_blocks,
            prefill_us_per_token: f.prefill_us_per_token,
            decode_ms_base: f.decode_ms_base,
            decode_ms_per_seq: f.decode_ms_per_seq,
        }
    }
}

impl From<Cli> for SimConfig {
    fn from(cli: Cli) -> Self {
        SimConfig {
            host: cli.host,
            port: cli.port,
            name: cli.name,
            served_model_name: cli.served_model_name,
            loras: cli.loras,
            time_scale: cli.time_scale,
            model: cli.model.into(),
            metrics_mode: cli.metrics_mode,
            requests_mode: cli.requests_mode,
            metrics_names: cli.metrics_names,
            extra_metrics: cli.extra_metrics,
            kv_events: cli.kv_events_port.map(|port| KvEventsConfig {
                port,
                replay_port: cli.kv_events_replay_port,
                topic: cli.kv_events_topic,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_model_names() {
        let open = ServedModels::new(None, vec!["ad".into()]).expect("valid");
        let strict = ServedModels::new(Some("m".into()), vec!["ad".into()]).expect("valid");
        let resolved =
            |name: &str, lora: Option<&str>| Some(ResolvedModel { name: name.into(), lora: lora.map(str::to_owned) });
        let cases = [
            (&open, None, resolved(DEFAULT_MODEL_NAME, None)),
            (&open, Some("anything"), resolved("anything", None)),
            (&open, Some("ad"), resolved("ad", Some("ad"))),
            (&strict, Some("m"), resolved("m", None)),
            (&strict, Some("ad"), resolved("ad", Some("ad"))),
            (&strict, Some("other"), None),
            (&strict, None, resolved("m", None)),
        ];
        for (served, requested, want) in cases {
            assert_eq!(served.resolve(requested), want, "{requested:?}");
        }
    }

    #[test]
    fn rejects_bad_configs() {
        let bad = [
            SimConfig { time_scale: -1.0, ..SimConfig::default() },
            SimConfig { time_scale: f64::INFINITY, ..SimConfig::default() },
            SimConfig { name: "bad\nname".into(), ..SimConfig::default() },
            SimConfig { loras: vec!["a".into(), "a".into()], ..SimConfig::default() },
            SimConfig { model: ModelParams { block_size: 0, ..ModelParams::default() }, ..SimConfig::default() },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
        assert!(SimConfig::default().validate().is_ok());
    }

    #[test]
    fn flags_map_to_config() {
        let cli = Cli::try_parse_from([
            "sim-worker",
            "--port",
            "0",
            "--name",
            "w1",
            "--lora",
            "a",
            "--lora",
            "b",
            "--time-scale",
            "0",
            "--metrics-mode",
            "garbage",
            "--max-num-seqs",
            "8",
        ])
        .expect("valid flags");
        let config = SimConfig::from(cli);
        assert_eq!(config.port, 0);
        assert_eq!(config.name, "w1");
        assert_eq!(config.loras, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(config.time_scale, 0.0);
        assert_eq!(config.metrics_mode, FaultMode::Garbage);
        assert_eq!(config.model, ModelParams { max_num_seqs: 8, ..ModelParams::default() });
    }
}
