//! The decision for one request, independent of the wire: take the pool snapshot, narrow it
//! to the subset hint, build the scheduler's view, run the active profile, and name the
//! targets. Also the one place where every failure becomes an HTTP status and body.
//!
//! It does no network I/O; the scheduler call is synchronous and short (callers on an async
//! runtime run it with `spawn_blocking`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use llmd_plugin_sdk::{Request, Usage};
use tracing::debug;

use llmd_plugin_sdk::columns::{PREFIX_INDEXED_BLOCKS, PREFIX_MATCHED_BLOCKS, PREFIX_TOTAL_BLOCKS};
use llmd_plugin_sdk::types::find_column;

use crate::datastore::{Datastore, PoolEndpoint};
use crate::request::{InferenceRequest, RequestError};
use crate::scheduler::{Decision, SaturationConfig, ScheduleError, Scheduler};
use crate::telemetry::{InFlight, Telemetry};

/// Metrics older than this are unknown (NaN) to the scheduler.
pub const DEFAULT_METRICS_STALENESS_MS: u32 = 2_000;

/// Every reason a request is not routed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error("{0}")]
    BadRequest(#[from] RequestError),
    #[error("path {0} is not an inference API this EPP routes")]
    UnknownPath(String),
    #[error("request body exceeds the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("no endpoints available in the pool")]
    NoEndpoints,
    #[error("none of the endpoints in the subset hint ({0}) is in the pool")]
    SubsetUnavailable(String),
    #[error("the pool is saturated; sheddable request rejected")]
    Saturated,
    #[error("too many requests in flight (limit {0}); retry later")]
    Overloaded(usize),
    #[error("scheduling failed: {0}")]
    Scheduling(ScheduleError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// How an error is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub status: u16,
    /// The body: `inference error: <Code> - <message>`.
    pub body: String,
}

impl RouteError {
    /// Invariant: the only mapping from an error to what the client sees.
    pub fn reply(&self) -> ErrorReply {
        let (status, code) = match self {
            RouteError::BadRequest(_) => (400, "BadRequest"),
            RouteError::UnknownPath(_) => (404, "NotFound"),
            RouteError::PayloadTooLarge(_) => (413, "PayloadTooLarge"),
            RouteError::Saturated | RouteError::Overloaded(_) => (429, "ResourceExhausted"),
            RouteError::NoEndpoints | RouteError::SubsetUnavailable(_) => (503, "ServiceUnavailable"),
            RouteError::Scheduling(ScheduleError::NoCandidates | ScheduleError::AllFiltered { .. }) => {
                (503, "ServiceUnavailable")
            }
            RouteError::Scheduling(ScheduleError::PluginFailed { .. }) => (503, "ServiceUnavailable"),
            RouteError::Internal(_) => (500, "Internal"),
        };
        ErrorReply { status, body: format!("inference error: {code} - {self}") }
    }
}

/// A routed request: where to send it.
#[derive(Clone)]
pub struct Routed {
    /// Primary first, then fallbacks; never empty.
    pub targets: Vec<SocketAddr>,
    /// The primary's endpoint id (for response hooks).
    pub endpoint_id: u32,
    /// The variant that routed it (index into the scheduler's variants) and its name.
    pub variant: usize,
    pub variant_name: String,
    /// Whether responses should carry the variant's name.
    pub name_variant: bool,
    /// Shadow variants to score this request with, off the request path.
    pub shadows: Option<Arc<ShadowJob>>,
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routed").field("targets", &self.targets).field("variant", &self.variant_name).finish()
    }
}

/// Everything a shadow cycle needs: the same request and candidates the routing variant saw.
pub struct ShadowJob {
    scheduler: Arc<Scheduler>,
    shadows: Vec<usize>,
    request: Request,
    metrics: llmd_plugin_sdk::Metrics,
    /// Where the request really went (ids), primary first.
    actual: Vec<u32>,
}

/// Everything the request path needs, shared by all streams.
pub struct Router {
    datastore: Arc<Datastore>,
    scheduler: ArcSwap<Scheduler>,
    telemetry: Arc<Telemetry>,
    saturation: ArcSwap<SaturationConfig>,
    pub metrics_staleness_ms: u32,
    /// Requests routed and not yet completed; above `max_in_flight` new ones get 429.
    in_flight: Arc<AtomicUsize>,
    pub max_in_flight: usize,
}

/// Default bound on requests in flight through one EPP.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;

/// A routed request, counted as in flight until dropped.
pub struct Admitted {
    _running: InFlight,
    counter: Arc<AtomicUsize>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Router {
    pub fn new(
        datastore: Arc<Datastore>,
        scheduler: Scheduler,
        saturation: SaturationConfig,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Router {
            datastore,
            scheduler: ArcSwap::from_pointee(scheduler),
            telemetry,
            saturation: ArcSwap::from_pointee(saturation),
            metrics_staleness_ms: DEFAULT_METRICS_STALENESS_MS,
            in_flight: Arc::default(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    pub fn datastore(&self) -> &Arc<Datastore> {
        &self.datastore
    }

    pub fn scheduler(&self) -> Arc<Scheduler> {
        self.scheduler.load_full()
    }

    /// Publishes a new scheduler (told the current pool first); in-flight requests finish on
    /// the one they started with.
    pub fn set_scheduler(&self, scheduler: Scheduler) {
        let pool = self.datastore.snapshot();
        scheduler.pool_changed(pool.generation, &pool.infos());
        self.scheduler.store(Arc::new(scheduler));
    }

    /// Publishes new admission thresholds.
    pub fn set_saturation(&self, saturation: SaturationConfig) {
        self.saturation.store(Arc::new(saturation));
    }

    /// Chooses the endpoint(s) for one request. `request` is None for body-less requests
    /// (e.g. `GET /v1/models`), which go to any endpoint the profile picks.
    pub fn route(
        &self,
        request_id: &str,
        headers: &[(String, String)],
        request: Option<&InferenceRequest>,
        subset: Option<&[String]>,
    ) -> Result<Routed, RouteError> {
        // Invariant: work beyond the bound is refused at once rather than queued.
        if self.in_flight.load(Ordering::Relaxed) >= self.max_in_flight {
            return Err(RouteError::Overloaded(self.max_in_flight));
        }
        let pool = self.datastore.snapshot();
        if pool.endpoints.is_empty() {
            return Err(RouteError::NoEndpoints);
        }
        let candidates: Vec<&PoolEndpoint> = match subset {
            Some(hint) if !hint.is_empty() => {
                let chosen: Vec<&PoolEndpoint> =
                    pool.endpoints.iter().filter(|e| hint.iter().any(|h| matches_hint(e, h))).collect();
                if chosen.is_empty() {
                    return Err(RouteError::SubsetUnavailable(hint.join(",")));
                }
                chosen
            }
            _ => pool.endpoints.iter().collect(),
        };
        let mut metrics = self.datastore.metrics_of(&candidates, self.metrics_staleness_ms);
        let priority = crate::request::priority(headers);
        let saturation = self.saturation.load();
        if saturation.shed(priority, &metrics) {
            return Err(RouteError::Saturated);
        }
        let kept = saturation.filter(&metrics);
        if kept.len() != metrics.len() {
            metrics = metrics.select(&kept);
        }
        let req = Request {
            id: request_id.to_string(),
            model: request.map(|r| r.model.clone()).unwrap_or_default(),
            prompt: request.map(|r| r.prompt.as_bytes().to_vec()).unwrap_or_default(),
            cache_salt: request.and_then(|r| r.cache_salt.clone()),
            headers: headers.to_vec(),
            priority,
            random_seed: xxhash_rust::xxh3::xxh3_64(request_id.as_bytes()),
        };
        let scheduler = self.scheduler.load_full();
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let variant = scheduler.choose(request_id, &header, request.and_then(|r| r.user.as_deref()));
        let Some(chosen) = scheduler.variants.get(variant) else {
            return Err(RouteError::Internal(format!("variant {variant} does not exist")));
        };
        let started = std::time::Instant::now();
        let decision = match chosen.profile.schedule(&req, &metrics) {
            Ok(d) => d,
            Err(e) => {
                self.telemetry.variant_errors.with_label_values(&[chosen.name.as_str()]).inc();
                return Err(RouteError::Scheduling(e));
            }
        };
        self.record_decision(&chosen.name, &decision, started.elapsed());
        let targets: Vec<SocketAddr> =
            decision.targets.iter().filter_map(|id| pool.by_id(*id)).map(PoolEndpoint::target).collect();
        let (Some(&endpoint_id), false) = (decision.targets.first(), targets.is_empty()) else {
            return Err(RouteError::Internal("the picked endpoint is not in the pool snapshot".into()));
        };
        if let Some(e) = pool.by_id(endpoint_id) {
            self.telemetry.variant_picks.with_label_values(&[chosen.name.as_str(), e.spec.name.as_str()]).inc();
        }
        debug!(request_id, variant = %chosen.name, ?targets, scores = ?decision.total_scores, candidates = ?decision.candidates, "scheduled");
        let shadows = scheduler.shadows_for(request_id);
        let shadows = (!shadows.is_empty()).then(|| {
            Arc::new(ShadowJob {
                scheduler: scheduler.clone(),
                shadows,
                request: req,
                metrics,
                actual: decision.targets.clone(),
            })
        });
        Ok(Routed {
            targets,
            endpoint_id,
            variant,
            variant_name: chosen.name.clone(),
            name_variant: scheduler.names_variants(),
            shadows,
        })
    }

    /// Runs the shadow variants of a routed request and records what they would have
    /// picked. Never affects the request: call it after answering, off the request path.
    pub fn run_shadows(&self, job: &ShadowJob) {
        for &i in &job.shadows {
            let Some(v) = job.scheduler.variants.get(i) else { continue };
            let started = std::time::Instant::now();
            let outcome = match v.profile.schedule_shadow(&job.request, &job.metrics, &job.actual) {
                Ok(d) if d.targets.first() == job.actual.first() => "agree",
                Ok(_) => "disagree",
                Err(e) => {
                    debug!(variant = %v.name, error = %e, "shadow variant failed");
                    "error"
                }
            };
            let t = &self.telemetry;
            t.variant_scheduling.with_label_values(&[v.name.as_str()]).observe(started.elapsed().as_secs_f64());
            t.shadow_decisions.with_label_values(&[v.name.as_str(), outcome]).inc();
        }
    }

    fn record_decision(&self, variant: &str, d: &Decision, elapsed: std::time::Duration) {
        let t = &self.telemetry;
        t.scheduler_e2e.with_label_values(&[] as &[&str]).observe(elapsed.as_secs_f64());
        t.variant_requests.with_label_values(&[variant]).inc();
        t.variant_scheduling.with_label_values(&[variant]).observe(elapsed.as_secs_f64());
        for timing in &d.timings {
            t.plugin_duration
                .with_label_values(&[timing.role.as_str(), timing.role.as_str(), timing.plugin.as_str()])
                .observe(timing.elapsed.as_secs_f64());
        }
        for (plugin, error) in &d.failures {
            t.plugin_errors.with_label_values(&[plugin.as_str(), error.kind()]).inc();
        }
        let column = |name| find_column(&d.columns, name);
        if let (Some(matched), Some(total), Some(pos)) = (
            column(PREFIX_MATCHED_BLOCKS),
            column(PREFIX_TOTAL_BLOCKS),
            d.targets.first().and_then(|id| d.candidates.iter().position(|c| c == id)),
        ) {
            let (m, n) =
                (matched.values.get(pos).copied().unwrap_or(0.0), total.values.get(pos).copied().unwrap_or(0.0));
            if n > 0.0 && m.is_finite() {
                t.prefix_indexer_hit_ratio
                    .with_label_values(&[] as &[&str])
                    .observe(f64::from((m / n).clamp(0.0, 1.0)));
            }
        }
        if let Some(indexed) = column(PREFIX_INDEXED_BLOCKS) {
            let size: f64 = indexed.values.iter().filter(|v| v.is_finite()).map(|v| f64::from(*v)).sum();
            t.prefix_indexer_size.with_label_values(&[] as &[&str]).set(size as i64);
        }
    }

    /// Recomputes the pool-level gauges from the current pool and metrics.
    pub fn refresh_pool_gauges(&self) {
        let pool = self.datastore.snapshot();
        let all: Vec<&PoolEndpoint> = pool.endpoints.iter().collect();
        let m = self.datastore.metrics_of(&all, self.metrics_staleness_ms);
        let t = &self.telemetry;
        let name = t.pool();
        let fresh: Vec<usize> =
            (0..m.len()).filter(|&i| m.waiting[i].is_finite() && m.kv_usage[i].is_finite()).collect();
        let mean = |col: &[f32]| {
            if fresh.is_empty() {
                0.0
            } else {
                fresh.iter().map(|&i| f64::from(col[i])).sum::<f64>() / fresh.len() as f64
            }
        };
        t.pool_ready_pods.with_label_values(&[name]).set(fresh.len() as f64);
        t.pool_avg_kv.with_label_values(&[name]).set(mean(&m.kv_usage));
        t.pool_avg_queue.with_label_values(&[name]).set(mean(&m.waiting));
        t.pool_saturation.with_label_values(&[name]).set(f64::from(self.saturation.load().pool_saturation(&m)));
        t.pool_per_pod_queue.reset();
        for (i, e) in pool.endpoints.iter().enumerate() {
            if m.waiting[i].is_finite() {
                t.pool_per_pod_queue.with_label_values(&[e.spec.name.as_str(), name]).set(f64::from(m.waiting[i]));
            }
        }
    }

    /// Counts a request the EPP answered with an error (the one place errors are counted).
    pub fn record_error(&self, model: &str, error: &RouteError) {
        let code = error.reply().status.to_string();
        self.telemetry.request_total.with_label_values(&[model, model]).inc();
        self.telemetry.request_error_total.with_label_values(&[model, model, code.as_str()]).inc();
        if let RouteError::Scheduling(ScheduleError::PluginFailed { plugin, error }) = error {
            self.telemetry.plugin_errors.with_label_values(&[plugin.as_str(), error.kind()]).inc();
        }
    }

    /// Counts a routed request; the returned guard tracks it as running until dropped.
    pub fn record_routed(&self, model: &str) -> Admitted {
        self.telemetry.request_total.with_label_values(&[model, model]).inc();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Admitted { _running: self.telemetry.running(model), counter: self.in_flight.clone() }
    }

    /// Requests routed and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Records a completed response of `model` (routed by `variant`) that took `elapsed`,
    /// whose first body byte came after `ttft`, with its usage if known.
    pub fn record_completed(
        &self,
        model: &str,
        variant: &str,
        elapsed: std::time::Duration,
        ttft: Option<std::time::Duration>,
        usage: Option<Usage>,
    ) {
        let t = &self.telemetry;
        t.observe_duration(model, elapsed);
        t.variant_duration.with_label_values(&[variant]).observe(elapsed.as_secs_f64());
        if let Some(ttft) = ttft {
            t.variant_ttft.with_label_values(&[variant]).observe(ttft.as_secs_f64());
        }
        if let Some(u) = usage {
            t.variant_prompt_tokens.with_label_values(&[variant]).inc_by(u64::from(u.prompt_tokens));
            t.variant_cached_tokens.with_label_values(&[variant]).inc_by(u64::from(u.cached_tokens));
        }
        if let Some(u) = usage {
            t.input_tokens.with_label_values(&[model, model]).observe(f64::from(u.prompt_tokens));
            t.output_tokens.with_label_values(&[model, model]).observe(f64::from(u.completion_tokens));
            t.cached_tokens.with_label_values(&[model, model]).observe(f64::from(u.cached_tokens));
        }
    }

    /// Tells the routing variant's plugins a response completed.
    pub fn response_complete(&self, variant: usize, request_id: &str, endpoint_id: u32, usage: Usage) {
        self.scheduler.load().response_complete(variant, request_id, endpoint_id, usage);
    }
}

/// A subset hint entry is `ip:port` or a bare `ip`.
fn matches_hint(e: &PoolEndpoint, hint: &str) -> bool {
    let hint = hint.trim();
    match hint.parse::<SocketAddr>() {
        Ok(addr) => addr == e.target(),
        Err(_) => hint.parse::<std::net::IpAddr>().is_ok_and(|ip| ip == e.spec.address),
    }
}
