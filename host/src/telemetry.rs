//! The EPP's own Prometheus metrics (upstream names where upstream has them, `epp_…` for
//! ours) and the `/metrics` HTTP endpoint on `--metrics-port`.
//!
//! Other modules record through the typed methods here; this is the only module that names
//! the `prometheus` crate. Recording never fails and never blocks on I/O.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
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
    pub request_total: IntCounterVec,
    pub request_error_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub input_tokens: HistogramVec,
    pub output_tokens: HistogramVec,
    pub cached_tokens: HistogramVec,
    pub running_requests: IntGaugeVec,
    pub pool_avg_kv: GaugeVec,
    pub pool_avg_queue: GaugeVec,
    pub pool_ready_pods: GaugeVec,
    pub pool_per_pod_queue: GaugeVec,
    pub pool_saturation: GaugeVec,
    pub scheduler_e2e: HistogramVec,
    pub plugin_duration: HistogramVec,
    pub prefix_indexer_size: IntGaugeVec,
    pub prefix_indexer_hit_ratio: HistogramVec,
    pub plugin_errors: IntCounterVec,
    pub discovery_reloads: IntCounterVec,
    pub scrape_errors: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub variant_requests: IntCounterVec,
    pub variant_errors: IntCounterVec,
    pub variant_scheduling: HistogramVec,
    pub variant_ttft: HistogramVec,
    pub variant_duration: HistogramVec,
    pub variant_prompt_tokens: IntCounterVec,
    pub variant_cached_tokens: IntCounterVec,
    pub variant_picks: IntCounterVec,
    pub shadow_decisions: IntCounterVec,
}

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
            shadow_decisions: must(IntCounterVec::new(
                opts(
                    "epp_shadow_decisions_total",
                    "Shadow variant decisions: agree / disagree with the routing pick, or error.",
                ),
                &["variant", "outcome"],
            )),
            registry,
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

    /// Counts one running request of `model` until the returned guard is dropped.
    pub fn running(&self, model: &str) -> InFlight {
        let gauge = self.running_requests.with_label_values(&[model]);
        gauge.inc();
        InFlight(gauge)
    }

    pub fn observe_duration(&self, model: &str, d: Duration) {
        self.request_duration.with_label_values(&[model, model]).observe(d.as_secs_f64());
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
