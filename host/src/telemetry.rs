//! The EPP's own Prometheus metrics (upstream names where upstream has them, `epp_…` for
//! ours) and the `/metrics` HTTP endpoint on `--metrics-port`.
//!
//! Other modules record through the typed methods here; this is the only module that names
//! the `prometheus` crate. Recording never fails and never blocks on I/O.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::Mutex;

use epp_core::{CycleResult, Decision, HookFailure, PluginTiming, Scheduler, Usage};
use llmd_plugin_sdk::columns::{PREFIX_INDEXED_BLOCKS, PREFIX_MATCHED_BLOCKS, PREFIX_TOTAL_BLOCKS};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use tracing::{info, warn};

/// Request latency buckets (seconds), wide enough for long generations.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0,
    45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0,
];
/// Token-count buckets.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32778.0, 65536.0,
    131072.0,
];
/// Scheduling and plugin latency buckets (seconds), down to microseconds.
const FAST_BUCKETS: &[f64] =
    &[0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1];
const RATIO_BUCKETS: &[f64] = &[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

pub struct Telemetry {
    registry: Registry,
    pool: String,
    request_total: IntCounterVec,
    request_error_total: IntCounterVec,
    request_duration: HistogramVec,
    input_tokens: HistogramVec,
    output_tokens: HistogramVec,
    cached_tokens: HistogramVec,
    running_requests: IntGaugeVec,
    pool_avg_kv: GaugeVec,
    pool_avg_queue: GaugeVec,
    pool_ready_pods: GaugeVec,
    pool_per_pod_queue: GaugeVec,
    pool_saturation: GaugeVec,
    scheduler_e2e: HistogramVec,
    plugin_duration: HistogramVec,
    prefix_indexer_size: IntGaugeVec,
    prefix_indexer_hit_ratio: HistogramVec,
    plugin_errors: IntCounterVec,
    discovery_reloads: IntCounterVec,
    scrape_errors: IntCounterVec,
    config_reloads: IntCounterVec,
    variant_requests: IntCounterVec,
    variant_errors: IntCounterVec,
    variant_scheduling: HistogramVec,
    variant_ttft: HistogramVec,
    variant_duration: HistogramVec,
    variant_prompt_tokens: IntCounterVec,
    variant_cached_tokens: IntCounterVec,
    variant_picks: IntCounterVec,
    shadow_decisions: IntCounterVec,
    shadows_dropped: IntCounter,
    ejections: IntCounterVec,
    ejected: IntGaugeVec,
    flow_queue_duration: HistogramVec,
    flow_queue_size: IntGaugeVec,
    flow_queue_bytes: IntGaugeVec,
    flow_requests: IntCounterVec,
    flow_saturation: GaugeVec,
    flow_dispatch_cycle: Histogram,
    kv_messages: IntCounterVec,
    kv_gaps: IntCounterVec,
    kv_replays: IntCounterVec,
    kv_malformed: IntCounterVec,
    kv_skipped: IntCounterVec,
    kv_index_blocks: IntGaugeVec,
    kv_lag: GaugeVec,
    state_connected: IntGauge,
    state_events: IntCounterVec,
    state_lag: Gauge,
    /// The model names used as labels so far (the model comes from the client).
    models: std::sync::RwLock<std::collections::HashSet<String>>,
}

/// Distinct model names labelled before the rest are counted as `other`: the name comes
/// from the request body, and each one makes some 90 series that live as long as the
/// process.
const MAX_MODEL_LABELS: usize = 256;
/// Model names are cut to this many bytes in labels.
const MAX_MODEL_LABEL_BYTES: usize = 128;

/// Flow-control queue-wait buckets (seconds), upstream's.
const QUEUE_BUCKETS: &[f64] =
    &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Dispatch-cycle buckets (seconds), upstream's.
const CYCLE_BUCKETS: &[f64] = &[0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1];
const FLOW_LABELS: &[&str] = &["fairness_id", "priority", "inference_pool", "model_name", "target_model_name"];

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

fn hist(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

impl Telemetry {
    /// Creates every metric. `pool` labels the pool-level series (`--pool-name`).
    pub fn new(pool: &str) -> Arc<Telemetry> {
        let registry = Registry::new();
        let objective = &["model_name", "target_model_name"];
        // Invariant: metric names and label sets below are static and valid, so building
        // them cannot fail; `must` keeps that assumption in one place.
        let t = Telemetry {
            pool: pool.to_string(),
            request_total: must(IntCounterVec::new(
                opts("inference_objective_request_total", "Requests received, by model."),
                objective,
            )),
            request_error_total: must(IntCounterVec::new(
                opts("inference_objective_request_error_total", "Requests that failed, by model and error code."),
                &["model_name", "target_model_name", "error_code"],
            )),
            request_duration: must(HistogramVec::new(
                hist(
                    "inference_objective_request_duration_seconds",
                    "End-to-end request latency seen by the EPP.",
                    DURATION_BUCKETS,
                ),
                objective,
            )),
            input_tokens: must(HistogramVec::new(
                hist("inference_objective_input_tokens", "Prompt tokens per request (from usage).", TOKEN_BUCKETS),
                objective,
            )),
            output_tokens: must(HistogramVec::new(
                hist("inference_objective_output_tokens", "Completion tokens per request (from usage).", TOKEN_BUCKETS),
                objective,
            )),
            cached_tokens: must(HistogramVec::new(
                hist(
                    "inference_objective_cached_tokens",
                    "Prompt tokens served from the prefix cache (from usage).",
                    TOKEN_BUCKETS,
                ),
                objective,
            )),
            running_requests: must(IntGaugeVec::new(
                opts("inference_objective_running_requests", "Requests in flight through the EPP, by model."),
                &["model_name"],
            )),
            pool_avg_kv: must(GaugeVec::new(
                opts(
                    "inference_pool_average_kv_cache_utilization",
                    "Mean KV-cache utilization over endpoints with fresh metrics.",
                ),
                &["name"],
            )),
            pool_avg_queue: must(GaugeVec::new(
                opts(
                    "inference_pool_average_queue_size",
                    "Mean waiting-queue length over endpoints with fresh metrics.",
                ),
                &["name"],
            )),
            pool_ready_pods: must(GaugeVec::new(
                opts("inference_pool_ready_pods", "Endpoints in the pool with fresh metrics."),
                &["name"],
            )),
            pool_per_pod_queue: must(GaugeVec::new(
                opts("inference_pool_per_pod_queue_size", "Waiting-queue length per endpoint."),
                &["model_server_pod", "name"],
            )),
            pool_saturation: must(GaugeVec::new(
                opts(
                    "epp_pool_saturation",
                    "Pool saturation: mean of max(queue/threshold, kv/threshold); 1 = saturated.",
                ),
                &["name"],
            )),
            scheduler_e2e: must(HistogramVec::new(
                hist(
                    "inference_extension_scheduler_e2e_duration_seconds",
                    "Time of one scheduling cycle.",
                    FAST_BUCKETS,
                ),
                &[],
            )),
            plugin_duration: must(HistogramVec::new(
                hist("inference_extension_plugin_duration_seconds", "Time of one plugin call.", FAST_BUCKETS),
                &["extension_point", "plugin_type", "plugin_name"],
            )),
            prefix_indexer_size: must(IntGaugeVec::new(
                opts(
                    "inference_extension_prefix_indexer_size",
                    "Block hashes held by the prefix index (over the last request's candidates).",
                ),
                &[],
            )),
            prefix_indexer_hit_ratio: must(HistogramVec::new(
                hist(
                    "inference_extension_prefix_indexer_hit_ratio",
                    "Share of a request's prefix blocks held by the chosen endpoint.",
                    RATIO_BUCKETS,
                ),
                &[],
            )),
            plugin_errors: must(IntCounterVec::new(
                opts(
                    "epp_plugin_errors_total",
                    "Failed plugin calls, by plugin and kind (trap, timeout, memory, invalid output, …).",
                ),
                &["plugin_name", "kind"],
            )),
            discovery_reloads: must(IntCounterVec::new(
                opts("epp_discovery_reloads_total", "Endpoints-file reloads, by result (applied, rejected)."),
                &["result"],
            )),
            scrape_errors: must(IntCounterVec::new(
                opts("epp_scrape_errors_total", "Failed /metrics scrapes, by endpoint."),
                &["endpoint"],
            )),
            config_reloads: must(IntCounterVec::new(
                opts("epp_config_reload_total", "Config reloads, by result."),
                &["result"],
            )),
            variant_requests: must(IntCounterVec::new(
                opts("epp_variant_requests_total", "Requests routed, by experiment variant."),
                &["variant"],
            )),
            variant_errors: must(IntCounterVec::new(
                opts("epp_variant_errors_total", "Requests a variant failed to schedule."),
                &["variant"],
            )),
            variant_scheduling: must(HistogramVec::new(
                hist(
                    "epp_variant_scheduling_duration_seconds",
                    "Scheduling time, by variant (shadows included).",
                    FAST_BUCKETS,
                ),
                &["variant"],
            )),
            variant_ttft: must(HistogramVec::new(
                hist("epp_variant_ttft_seconds", "Time to the first response byte, by variant.", DURATION_BUCKETS),
                &["variant"],
            )),
            variant_duration: must(HistogramVec::new(
                hist(
                    "epp_variant_request_duration_seconds",
                    "End-to-end request latency, by variant.",
                    DURATION_BUCKETS,
                ),
                &["variant"],
            )),
            variant_prompt_tokens: must(IntCounterVec::new(
                opts("epp_variant_prompt_tokens_total", "Prompt tokens (from usage), by variant."),
                &["variant"],
            )),
            variant_cached_tokens: must(IntCounterVec::new(
                opts(
                    "epp_variant_cached_tokens_total",
                    "Prompt tokens served from the prefix cache (from usage), by variant.",
                ),
                &["variant"],
            )),
            variant_picks: must(IntCounterVec::new(
                opts("epp_variant_picks_total", "Requests sent to each endpoint, by variant."),
                &["variant", "endpoint"],
            )),
            shadows_dropped: must(IntCounter::new(
                "epp_shadow_dropped_total",
                "Shadow cycles skipped because shadow work was already at its bound.",
            )),
            shadow_decisions: must(IntCounterVec::new(
                opts(
                    "epp_shadow_decisions_total",
                    "Shadow variant decisions: agree / disagree with the routing pick, or error.",
                ),
                &["variant", "outcome"],
            )),
            ejections: must(IntCounterVec::new(
                opts(
                    "epp_endpoint_ejections_total",
                    "Endpoints taken out of routing by the passive breaker, by reason (stalled, failures, probe_failed).",
                ),
                &["endpoint", "reason"],
            )),
            ejected: must(IntGaugeVec::new(
                opts("epp_endpoint_ejected", "1 while the passive breaker keeps the endpoint out of routing."),
                &["endpoint"],
            )),
            flow_queue_duration: must(HistogramVec::new(
                hist(
                    "llm_d_epp_flow_control_request_queue_duration_seconds",
                    "Time requests spent in the flow-control queue, by outcome.",
                    QUEUE_BUCKETS,
                ),
                &["fairness_id", "priority", "outcome", "inference_pool", "model_name", "target_model_name"],
            )),
            flow_queue_size: must(IntGaugeVec::new(
                opts("llm_d_epp_flow_control_queue_size", "Requests waiting in the flow-control queue."),
                FLOW_LABELS,
            )),
            flow_queue_bytes: must(IntGaugeVec::new(
                opts("llm_d_epp_flow_control_queue_bytes", "Request body bytes waiting in the flow-control queue."),
                FLOW_LABELS,
            )),
            flow_requests: must(IntCounterVec::new(
                opts(
                    "llm_d_epp_flow_control_requests_total",
                    "Requests through flow control, by outcome (Dispatched, RejectedCapacity, EvictedTTL, ...).",
                ),
                &["outcome", "priority", "inference_pool"],
            )),
            flow_saturation: must(GaugeVec::new(
                opts(
                    "llm_d_epp_flow_control_pool_saturation",
                    "The pool's saturation as flow control sees it (1 = full).",
                ),
                &["inference_pool", "stage"],
            )),
            flow_dispatch_cycle: must(Histogram::with_opts(hist(
                "llm_d_epp_flow_control_dispatch_cycle_duration_seconds",
                "Duration of one flow-control dispatch cycle.",
                CYCLE_BUCKETS,
            ))),
            kv_messages: must(IntCounterVec::new(
                opts("llm_d_epp_kv_cache_events_messages_received_total", "KV-event messages received, by endpoint."),
                &["endpoint"],
            )),
            kv_gaps: must(IntCounterVec::new(
                opts("llm_d_epp_kv_cache_events_gaps_total", "Gaps in an endpoint's KV-event sequence numbers."),
                &["endpoint"],
            )),
            kv_replays: must(IntCounterVec::new(
                opts("llm_d_epp_kv_cache_events_replays_total", "KV-event replays asked for, by outcome (ok, failed)."),
                &["endpoint", "outcome"],
            )),
            kv_malformed: must(IntCounterVec::new(
                opts("llm_d_epp_kv_cache_events_malformed_total", "KV-event messages that did not decode (dropped)."),
                &["endpoint"],
            )),
            kv_skipped: must(IntCounterVec::new(
                opts(
                    "llm_d_epp_kv_cache_events_stores_skipped_total",
                    "Stored blocks not indexed: unknown parent, another tier or KV-group kind, not dense, index full.",
                ),
                &["endpoint"],
            )),
            kv_index_blocks: must(IntGaugeVec::new(
                opts("llm_d_epp_kv_cache_index_blocks", "Blocks the precise prefix index holds, by endpoint."),
                &["endpoint"],
            )),
            kv_lag: must(GaugeVec::new(
                opts(
                    "llm_d_epp_kv_cache_events_lag_seconds",
                    "Age of the newest KV event applied when it was applied (engine timestamp to now).",
                ),
                &["endpoint"],
            )),
            state_connected: must(IntGauge::new(
                "epp_state_store_connected",
                "1 while the shared state store (Redis) answers, 0 while this replica routes on local state only.",
            )),
            state_events: must(IntCounterVec::new(
                opts(
                    "epp_state_store_events_total",
                    "Routing events shared through the state store: published, applied (from peers), dropped \
                     (not published: store down or queue full), skipped (malformed or for an unknown endpoint).",
                ),
                &["direction"],
            )),
            state_lag: must(Gauge::new(
                "epp_state_store_lag_seconds",
                "Age of the newest peer event applied when it was applied.",
            )),
            registry,
            models: Default::default(),
        };
        for c in t.collectors() {
            if let Err(e) = t.registry.register(c) {
                warn!(error = %e, "metric registration failed");
            }
        }
        Arc::new(t)
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.request_total.clone()),
            Box::new(self.request_error_total.clone()),
            Box::new(self.request_duration.clone()),
            Box::new(self.input_tokens.clone()),
            Box::new(self.output_tokens.clone()),
            Box::new(self.cached_tokens.clone()),
            Box::new(self.running_requests.clone()),
            Box::new(self.pool_avg_kv.clone()),
            Box::new(self.pool_avg_queue.clone()),
            Box::new(self.pool_ready_pods.clone()),
            Box::new(self.pool_per_pod_queue.clone()),
            Box::new(self.pool_saturation.clone()),
            Box::new(self.scheduler_e2e.clone()),
            Box::new(self.plugin_duration.clone()),
            Box::new(self.prefix_indexer_size.clone()),
            Box::new(self.prefix_indexer_hit_ratio.clone()),
            Box::new(self.plugin_errors.clone()),
            Box::new(self.discovery_reloads.clone()),
            Box::new(self.scrape_errors.clone()),
            Box::new(self.config_reloads.clone()),
            Box::new(self.variant_requests.clone()),
            Box::new(self.variant_errors.clone()),
            Box::new(self.variant_scheduling.clone()),
            Box::new(self.variant_ttft.clone()),
            Box::new(self.variant_duration.clone()),
            Box::new(self.variant_prompt_tokens.clone()),
            Box::new(self.variant_cached_tokens.clone()),
            Box::new(self.variant_picks.clone()),
            Box::new(self.shadow_decisions.clone()),
            Box::new(self.shadows_dropped.clone()),
            Box::new(self.ejections.clone()),
            Box::new(self.ejected.clone()),
            Box::new(self.flow_queue_duration.clone()),
            Box::new(self.flow_queue_size.clone()),
            Box::new(self.flow_queue_bytes.clone()),
            Box::new(self.flow_requests.clone()),
            Box::new(self.flow_saturation.clone()),
            Box::new(self.flow_dispatch_cycle.clone()),
            Box::new(self.kv_messages.clone()),
            Box::new(self.kv_gaps.clone()),
            Box::new(self.kv_replays.clone()),
            Box::new(self.kv_malformed.clone()),
            Box::new(self.kv_skipped.clone()),
            Box::new(self.kv_index_blocks.clone()),
            Box::new(self.kv_lag.clone()),
            Box::new(self.state_connected.clone()),
            Box::new(self.state_events.clone()),
            Box::new(self.state_lag.clone()),
        ]
    }

    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The registry as Prometheus text.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The label of a client-given model name: itself (cut to `MAX_MODEL_LABEL_BYTES`) for
    /// the first `MAX_MODEL_LABELS` names seen, `other` after.
    pub fn model_label<'a>(&self, model: &'a str) -> std::borrow::Cow<'a, str> {
        let mut end = model.len().min(MAX_MODEL_LABEL_BYTES);
        while !model.is_char_boundary(end) {
            end -= 1;
        }
        let model = &model[..end];
        let known = |m: &std::collections::HashSet<String>| m.contains(model);
        if self.models.read().map(|m| known(&m)).unwrap_or(false) {
            return model.into();
        }
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        if known(&models) || models.len() < MAX_MODEL_LABELS {
            models.insert(model.to_string());
            return model.into();
        }
        "other".into()
    }

    /// Counts a routed request of `model`; the guard counts it as running until dropped.
    pub fn routed(&self, model: &str) -> InFlight {
        let model = &*self.model_label(model);
        self.request_total.with_label_values(&[model, model]).inc();
        let gauge = self.running_requests.with_label_values(&[model]);
        gauge.inc();
        InFlight(gauge)
    }

    /// Counts a request the EPP answered with error `code` (upstream's canonical code, e.g.
    /// `ResourceExhausted`); `plugin` names the plugin (and the kind of its failure) when
    /// one caused it.
    pub fn rejected(&self, model: &str, code: &str, plugin: Option<(&str, &str)>) {
        let model = &*self.model_label(model);
        self.request_total.with_label_values(&[model, model]).inc();
        self.request_error_total.with_label_values(&[model, model, code]).inc();
        if let Some((plugin, kind)) = plugin {
            self.plugin_errors.with_label_values(&[plugin, kind]).inc();
        }
    }

    /// Records a completed response of `model`, routed by `variant`: latency, time to the
    /// first byte (when one came) and usage (when the worker reported it).
    pub fn completed(
        &self,
        model: &str,
        variant: &VariantMetrics,
        elapsed: Duration,
        ttft: Option<Duration>,
        usage: Option<Usage>,
    ) {
        let model = &*self.model_label(model);
        self.request_duration.with_label_values(&[model, model]).observe(elapsed.as_secs_f64());
        variant.duration.observe(elapsed.as_secs_f64());
        if let Some(ttft) = ttft {
            variant.ttft.observe(ttft.as_secs_f64());
        }
        if let Some(u) = usage {
            variant.prompt_tokens.inc_by(u64::from(u.prompt_tokens));
            variant.cached_tokens.inc_by(u64::from(u.cached_tokens));
            self.input_tokens.with_label_values(&[model, model]).observe(f64::from(u.prompt_tokens));
            self.output_tokens.with_label_values(&[model, model]).observe(f64::from(u.completion_tokens));
            self.cached_tokens.with_label_values(&[model, model]).observe(f64::from(u.cached_tokens));
        }
    }

    /// Counts a plugin failure outside a decision (a hook).
    pub fn plugin_failed(&self, plugin: &str, kind: &str) {
        self.plugin_errors.with_label_values(&[plugin, kind]).inc();
    }

    /// A request entered (`delta` 1) or left (-1) flow control's queue.
    pub fn flow_queued(&self, fairness_id: &str, priority: i32, model: &str, bytes: u64, delta: i64) {
        let model = &*self.model_label(model);
        let p = priority.to_string();
        let labels = [fairness_id, p.as_str(), self.pool.as_str(), model, model];
        self.flow_queue_size.with_label_values(&labels).add(delta);
        self.flow_queue_bytes.with_label_values(&labels).add(delta * bytes.min(i64::MAX as u64) as i64);
    }

    /// A request's flow-control outcome, with its time in the queue when it was queued.
    pub fn flow_finished(&self, fairness_id: &str, priority: i32, model: &str, outcome: &str, waited_s: Option<f64>) {
        let model = &*self.model_label(model);
        let p = priority.to_string();
        self.flow_requests.with_label_values(&[outcome, p.as_str(), self.pool.as_str()]).inc();
        if let Some(w) = waited_s {
            self.flow_queue_duration
                .with_label_values(&[fairness_id, p.as_str(), outcome, self.pool.as_str(), model, model])
                .observe(w.max(0.0));
        }
    }

    /// The saturation the flow controller last computed.
    pub fn flow_saturation(&self, saturation: f64) {
        self.flow_saturation.with_label_values(&[self.pool.as_str(), "effective"]).set(saturation);
    }

    pub fn flow_dispatch_cycle(&self, elapsed: Duration) {
        self.flow_dispatch_cycle.observe(elapsed.as_secs_f64());
    }

    pub fn kv_events_message(&self, endpoint: &str) {
        self.kv_messages.with_label_values(&[endpoint]).inc();
    }

    pub fn kv_events_gap(&self, endpoint: &str) {
        self.kv_gaps.with_label_values(&[endpoint]).inc();
    }

    pub fn kv_events_replay(&self, endpoint: &str, outcome: &str) {
        self.kv_replays.with_label_values(&[endpoint, outcome]).inc();
    }

    pub fn kv_events_malformed(&self, endpoint: &str) {
        self.kv_malformed.with_label_values(&[endpoint]).inc();
    }

    pub fn kv_events_skipped(&self, endpoint: &str, n: u64) {
        self.kv_skipped.with_label_values(&[endpoint]).inc_by(n);
    }

    pub fn kv_index_blocks(&self, endpoint: &str, blocks: usize) {
        self.kv_index_blocks.with_label_values(&[endpoint]).set(blocks.min(i64::MAX as usize) as i64);
    }

    pub fn kv_events_lag(&self, endpoint: &str, seconds: f64) {
        self.kv_lag.with_label_values(&[endpoint]).set(seconds);
    }

    pub fn state_store_connected(&self, up: bool) {
        self.state_connected.set(i64::from(up));
    }

    /// `direction`: published, applied, dropped or skipped.
    pub fn state_store_events(&self, direction: &str, n: u64) {
        self.state_events.with_label_values(&[direction]).inc_by(n);
    }

    pub fn state_store_lag(&self, seconds: f64) {
        self.state_lag.set(seconds);
    }

    /// Counts an ejection of `endpoint` by the passive breaker.
    pub fn endpoint_ejected(&self, endpoint: &str, reason: &str) {
        self.ejections.with_label_values(&[endpoint, reason]).inc();
    }

    /// Whether the passive breaker keeps `endpoint` out of routing.
    pub fn endpoint_ejection_state(&self, endpoint: &str, ejected: bool) {
        self.ejected.with_label_values(&[endpoint]).set(i64::from(ejected));
    }

    /// Counts a failed scrape of endpoint `target`.
    pub fn scrape_failed(&self, target: &str) {
        self.scrape_errors.with_label_values(&[target]).inc();
    }

    /// Adds endpoints-file reloads by outcome.
    pub fn discovery_reloads(&self, applied: u64, rejected: u64) {
        self.discovery_reloads.with_label_values(&["applied"]).inc_by(applied);
        self.discovery_reloads.with_label_values(&["rejected"]).inc_by(rejected);
    }

    /// Counts a config reload that was applied (true) or rejected.
    pub fn config_reload(&self, applied: bool) {
        self.config_reloads.with_label_values(&[if applied { "applied" } else { "rejected" }]).inc();
    }

    /// Publishes the pool-level gauges.
    pub fn pool_gauges(&self, gauges: &PoolGauges<'_>) {
        let name = self.pool.as_str();
        self.pool_ready_pods.with_label_values(&[name]).set(gauges.ready as f64);
        self.pool_avg_kv.with_label_values(&[name]).set(gauges.avg_kv);
        self.pool_avg_queue.with_label_values(&[name]).set(gauges.avg_queue);
        self.pool_saturation.with_label_values(&[name]).set(gauges.saturation);
        self.pool_per_pod_queue.reset();
        for (pod, queue) in gauges.per_pod_queue {
            self.pool_per_pod_queue.with_label_values(&[pod.as_str(), name]).set(*queue);
        }
    }

    /// Resolves every handle a scheduler's decisions record into, once per build.
    pub fn scheduler_metrics(&self, scheduler: &Scheduler) -> SchedulerMetrics {
        let variants = scheduler
            .variants
            .iter()
            .map(|v| {
                let name = v.name.as_str();
                let plugins = v
                    .profile
                    .plugins()
                    .iter()
                    .map(|p| {
                        let (point, core) = (p.role().extension_point(), p.core());
                        PluginMetrics {
                            name: core.name().to_string(),
                            duration: self.plugin_duration.with_label_values(&[point, core.type_name(), core.name()]),
                        }
                    })
                    .collect();
                let slot = |column| v.profile.column_slot(column);
                VariantMetrics {
                    name: name.to_string(),
                    requests: self.variant_requests.with_label_values(&[name]),
                    errors: self.variant_errors.with_label_values(&[name]),
                    scheduling: self.variant_scheduling.with_label_values(&[name]),
                    ttft: self.variant_ttft.with_label_values(&[name]),
                    duration: self.variant_duration.with_label_values(&[name]),
                    prompt_tokens: self.variant_prompt_tokens.with_label_values(&[name]),
                    cached_tokens: self.variant_cached_tokens.with_label_values(&[name]),
                    // Only shadows have decision outcomes (the report tells them apart by it).
                    shadow: v.shadow.then(|| ShadowMetrics {
                        agree: self.shadow_decisions.with_label_values(&[name, "agree"]),
                        disagree: self.shadow_decisions.with_label_values(&[name, "disagree"]),
                        error: self.shadow_decisions.with_label_values(&[name, "error"]),
                    }),
                    plugins,
                    prefix_slots: (slot(PREFIX_MATCHED_BLOCKS), slot(PREFIX_TOTAL_BLOCKS), slot(PREFIX_INDEXED_BLOCKS)),
                    picks: self.variant_picks.clone(),
                    pick_cache: Mutex::default(),
                }
            })
            .collect();
        SchedulerMetrics {
            e2e: self.scheduler_e2e.with_label_values(&[] as &[&str]),
            hit_ratio: self.prefix_indexer_hit_ratio.with_label_values(&[] as &[&str]),
            indexer_size: self.prefix_indexer_size.with_label_values(&[] as &[&str]),
            plugin_errors: self.plugin_errors.clone(),
            shadows_dropped: self.shadows_dropped.clone(),
            variants,
        }
    }
}

/// Pool-level gauge values, computed by the router.
pub struct PoolGauges<'a> {
    pub ready: usize,
    pub avg_kv: f64,
    pub avg_queue: f64,
    pub saturation: f64,
    pub per_pod_queue: &'a [(String, f64)],
}

/// One plugin's handles within a built scheduler.
pub struct PluginMetrics {
    pub name: String,
    duration: Histogram,
}

/// One variant's handles within a built scheduler.
pub struct VariantMetrics {
    pub name: String,
    requests: IntCounter,
    errors: IntCounter,
    scheduling: Histogram,
    ttft: Histogram,
    duration: Histogram,
    prompt_tokens: IntCounter,
    cached_tokens: IntCounter,
    shadow: Option<ShadowMetrics>,
    plugins: Vec<PluginMetrics>,
    /// Table slots of the prefix index's matched, total and indexed columns.
    prefix_slots: (Option<usize>, Option<usize>, Option<usize>),
    picks: IntCounterVec,
    /// Pick counters by endpoint id, resolved on first use (ids are stable per endpoint).
    pick_cache: Mutex<HashMap<u32, IntCounter>>,
}

/// A shadow variant's decision outcomes.
struct ShadowMetrics {
    agree: IntCounter,
    disagree: IntCounter,
    error: IntCounter,
}

/// The handles of one built scheduler: resolved once by `Telemetry::scheduler_metrics`,
/// recorded into with no label lookup on the request path.
pub struct SchedulerMetrics {
    e2e: Histogram,
    hit_ratio: Histogram,
    indexer_size: IntGauge,
    plugin_errors: IntCounterVec,
    shadows_dropped: IntCounter,
    variants: Vec<VariantMetrics>,
}

impl SchedulerMetrics {
    /// The handles of variant `i` (of the scheduler these were resolved for).
    pub fn variant(&self, i: usize) -> Option<&VariantMetrics> {
        self.variants.get(i)
    }

    /// Records a decision of variant `decision.variant` that took `elapsed`; `endpoint` names
    /// its primary target.
    pub fn decided(&self, decision: &Decision, elapsed: Duration, endpoint: &str) {
        let Some(v) = self.variants.get(decision.variant) else { return };
        self.e2e.observe(elapsed.as_secs_f64());
        v.requests.inc();
        v.scheduling.observe(elapsed.as_secs_f64());
        self.plugin_calls(v, &decision.result.timings, &decision.result.failures);
        let primary = decision.primary();
        let counter = {
            let mut cache = v.pick_cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.entry(primary).or_insert_with(|| v.picks.with_label_values(&[v.name.as_str(), endpoint])).clone()
        };
        counter.inc();
        let table = &decision.result.table;
        let pos = table.ids().iter().position(|&id| id == primary);
        if let ((Some(m), Some(t), _), Some(pos)) = (v.prefix_slots, pos) {
            let (m, t) =
                (table.column(m).get(pos).copied().unwrap_or(0.0), table.column(t).get(pos).copied().unwrap_or(0.0));
            if t > 0.0 && m.is_finite() {
                self.hit_ratio.observe(f64::from((m / t).clamp(0.0, 1.0)));
            }
        }
        if let (_, _, Some(k)) = v.prefix_slots {
            let size: f64 = table.column(k).iter().filter(|v| v.is_finite()).map(|v| f64::from(*v)).sum();
            self.indexer_size.set(size as i64);
        }
    }

    /// Records a variant's failed decision.
    pub fn failed(&self, variant: usize) {
        if let Some(v) = self.variants.get(variant) {
            v.errors.inc();
        }
    }

    /// Records a shadow variant's cycle: whether it agreed with the routing pick, or failed.
    pub fn shadow(&self, variant: usize, elapsed: Duration, agreed: Option<bool>, result: Option<&CycleResult>) {
        let Some(v) = self.variants.get(variant) else { return };
        v.scheduling.observe(elapsed.as_secs_f64());
        if let Some(s) = &v.shadow {
            match agreed {
                Some(true) => s.agree.inc(),
                Some(false) => s.disagree.inc(),
                None => s.error.inc(),
            }
        }
        if let Some(r) = result {
            self.plugin_calls(v, &r.timings, &r.failures);
        }
    }

    /// Counts a shadow cycle skipped because the shadow work queue was full.
    pub fn shadow_dropped(&self) {
        self.shadows_dropped.inc();
    }

    /// Counts hook failures of variant `variant`'s plugins.
    pub fn hook_failures(&self, failures: &[(usize, HookFailure)]) {
        for (variant, f) in failures {
            if let Some(p) = self.variants.get(*variant).and_then(|v| v.plugins.get(f.plugin)) {
                self.plugin_errors.with_label_values(&[p.name.as_str(), f.error.kind()]).inc();
            }
        }
    }

    fn plugin_calls(&self, v: &VariantMetrics, timings: &[PluginTiming], failures: &[HookFailure]) {
        for t in timings {
            if let Some(p) = v.plugins.get(t.plugin) {
                p.duration.observe(t.elapsed.as_secs_f64());
            }
        }
        for f in failures {
            if let Some(p) = v.plugins.get(f.plugin) {
                self.plugin_errors.with_label_values(&[p.name.as_str(), f.error.kind()]).inc();
            }
        }
    }
}

/// A request counted in `inference_objective_running_requests` until dropped.
pub struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        // Only reachable by a programming error in the static definitions above.
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

/// Serves `GET /metrics` on `addr` until `shutdown` resolves.
pub async fn serve(
    telemetry: Arc<Telemetry>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let t = telemetry.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], t.render()) }
        }),
    );
    info!(addr = ?addr, "metrics endpoint listening");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Model names come from clients: a bounded number become labels, the rest `other`,
    /// and long ones are cut on a character boundary.
    #[test]
    fn client_model_names_make_a_bounded_set_of_labels() {
        let t = Telemetry::new("pool");
        for i in 0..MAX_MODEL_LABELS {
            assert_eq!(t.model_label(&format!("m-{i}")), format!("m-{i}"));
        }
        assert_eq!(t.model_label("one-too-many"), "other");
        assert_eq!(t.model_label("m-7"), "m-7", "names already labelled stay");
        for i in 0..1000 {
            t.rejected(&format!("spam-{i}"), "BadRequest", None);
        }
        let page = t.render();
        assert!(!page.contains("spam-"), "client names past the bound became labels");
        assert!(page.contains("error_code=\"BadRequest\""));
        let t = Telemetry::new("pool");
        let long = "é".repeat(100);
        let label = t.model_label(&long);
        assert!(label.len() <= MAX_MODEL_LABEL_BYTES && long.starts_with(&*label), "{label}");
    }
}
