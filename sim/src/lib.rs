//! `sim`: a simulated vLLM worker, for testing and benchmarking the endpoint picker without
//! GPUs. It speaks the OpenAI endpoints (`/v1/completions`, `/v1/chat/completions`,
//! `/v1/responses`, `/v1/embeddings`) and serves vLLM-named Prometheus metrics, with reply
//! timing and metric values driven by a small serving model (continuous batching, a KV cache
//! with prefix reuse, LoRA slots).
//!
//! The crate is split so the model can be reused offline: `model` and `kv_cache` are pure
//! (explicit timestamps, no tokio, no clock) and could drive a discrete-event replay in
//! virtual time; `engine` runs that model in real time; `server` is the HTTP front end;
//! `openai` and `metrics` are the wire formats; `config` and `fault` hold the settings.
//! Nothing here knows about the picker: a worker serves whatever it is sent.
//!
//! Library users start a worker with [`spawn`] and keep the [`SimHandle`]; the
//! `sim-worker` binary does the same from flags ([`Cli`]).

pub mod config;
pub mod engine;
pub mod fault;
pub mod kv_cache;
pub mod kv_publish;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod server;

pub use config::{Cli, KvEventsConfig, MetricsNames, ModelFlags, SimConfig};
pub use fault::{FaultMode, FaultUpdate};
pub use model::{Model, ModelParams, PoolShape};
pub use server::{SimHandle, WORKER_HEADER, spawn};
