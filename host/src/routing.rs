//! The decision for one request, independent of the wire: bound the requests in flight,
//! take the pool snapshot, narrow it to the subset hint, hand the candidates and the request
//! to `epp_core`'s `Scheduler::decide`, and name the targets. `Routed` then carries the
//! request's life: the first response bytes and the end reach the plugins that asked, and
//! exactly once — a request dropped without an end (client gone, stream reset) ends as
//! cancelled. Also the one place where every failure becomes an HTTP status and body.
//!
//! It does no network I/O. A decision runs inline on the caller's thread: it is a few
//! microseconds of plugin calls, each bounded by its sandbox deadline. Shadow variants run
//! off the request path, at most `MAX_SHADOW_JOBS` at a time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use epp_core::{Completion, DecideError, Decision, Outcome, Request, ScheduleError, Scheduler, Usage};
use tracing::debug;

use crate::config::flow::FlowSpec;
use crate::datastore::{Datastore, MetricsCell, PoolEndpoint};
use crate::flow::{Dropped, FlowControl, Placement};
use crate::health::{Health, HealthConfig};
use crate::request::RequestError;
use crate::telemetry::{InFlight, PoolGauges, SchedulerMetrics, Telemetry};

/// Metrics older than this are unknown (NaN) to the scheduler.
pub const DEFAULT_METRICS_STALENESS_MS: u32 = 2_000;
/// Default bound on requests in flight through one EPP.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;
/// Shadow cycles running or waiting at most; beyond, a shadow is skipped (and counted).
pub const MAX_SHADOW_JOBS: usize = 64;
/// Request bodies above this are decided off the async workers (`Built::heavy_body_bytes`).
pub const HEAVY_BODY_BYTES: usize = 64 << 10;
/// The same when precise prefix routing tokenizes with a model's tokenizer.
pub const HEAVY_BODY_BYTES_TOKENIZED: usize = 4 << 10;

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
    #[error("{}", .0.message())]
    FlowControl(Dropped),
    #[error(
        "Envoy sent the request body in pieces in ext_proc request_body_mode {0}, where a route can no longer be set; configure FULL_DUPLEX_STREAMED (as config/envoy.yaml and the upstream guide do) or BUFFERED"
    )]
    BodyMode(&'static str),
    #[error("internal error: {0}")]
    Internal(String),
}

/// How an error is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub status: u16,
    /// Upstream's canonical code (`BadRequest`, `ResourceExhausted`, …).
    pub code: &'static str,
    /// The body: `inference error: <Code> - <message>`.
    pub body: String,
    /// `x-llm-d-request-dropped-reason`, when flow control answered.
    pub dropped_reason: Option<&'static str>,
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
            RouteError::Scheduling(_) => (503, "ServiceUnavailable"),
            // As upstream: a saturated pool or an expired wait is the client's to retry later.
            RouteError::FlowControl(Dropped::Capacity | Dropped::Ttl) => (429, "ResourceExhausted"),
            RouteError::FlowControl(_) => (503, "ServiceUnavailable"),
            RouteError::Internal(_) | RouteError::BodyMode(_) => (500, "Internal"),
        };
        let dropped_reason = match self {
            RouteError::FlowControl(d) => Some(d.reason()),
            _ => None,
        };
        ErrorReply { status, code, body: format!("inference error: {code} - {self}"), dropped_reason }
    }

    /// The plugin (and the kind of its failure) that caused this error, if one did.
    pub fn plugin(&self) -> Option<(&str, &str)> {
        match self {
            RouteError::Scheduling(ScheduleError::PluginFailed { plugin, error }) => Some((plugin, error.kind())),
            _ => None,
        }
    }
}

impl From<DecideError> for RouteError {
    fn from(e: DecideError) -> Self {
        match e {
            DecideError::NoEndpoints => RouteError::NoEndpoints,
            DecideError::Saturated => RouteError::Saturated,
            DecideError::Schedule { error, .. } => RouteError::Scheduling(error),
        }
    }
}

/// A scheduler, the metric handles resolved for it and the flow-control settings of the
/// same config, published together.
pub struct Built {
    pub scheduler: Scheduler,
    pub metrics: SchedulerMetrics,
    pub flow: FlowSpec,
    /// The settings of its precise prefix producer, if it runs one: the KV-event hub
    /// follows them while this scheduler is installed.
    pub precise: Option<Arc<crate::kv_events::Settings>>,
    /// The pool generation its plugins were last told (the publisher keeps it current).
    told: AtomicU64,
}

impl Built {
    pub fn new(scheduler: Scheduler, telemetry: &Telemetry) -> Built {
        let metrics = telemetry.scheduler_metrics(&scheduler);
        Built { scheduler, metrics, flow: FlowSpec::default(), precise: None, told: AtomicU64::new(0) }
    }

    /// The same, with the config's flow-control settings.
    pub fn with_flow(self, flow: FlowSpec) -> Built {
        Built { flow, ..self }
    }

    /// The same, with its precise prefix producer's settings.
    pub fn with_precise(self, precise: Option<Arc<crate::kv_events::Settings>>) -> Built {
        Built { precise, ..self }
    }

    /// Request bodies above this many bytes are decided where they cannot hold up other
    /// streams (their parsing and tokenization grow with the prompt): a model tokenizer
    /// costs about a millisecond per 4 KB.
    pub fn heavy_body_bytes(&self) -> usize {
        if self.precise.as_ref().is_some_and(|s| s.tokenizer.is_model()) {
            HEAVY_BODY_BYTES_TOKENIZED
        } else {
            HEAVY_BODY_BYTES
        }
    }

    /// Whether its precise prefix producer renders chat requests through a chat template,
    /// which needs their `messages` as sent.
    pub fn renders_chat(&self) -> bool {
        self.precise.as_ref().is_some_and(|s| s.tokenizer.renders_chat())
    }

    /// The pool generation its plugins were last told.
    pub fn told_generation(&self) -> u64 {
        self.told.load(Ordering::Acquire)
    }

    /// Tells every variant's plugins the pool of `generation`.
    pub fn pool_changed(&self, generation: u64, endpoints: &[epp_core::EndpointInfo]) {
        let failures = self.scheduler.pool_changed(generation, endpoints);
        self.metrics.hook_failures(&failures);
        self.told.store(generation, Ordering::Release);
    }
}

/// Everything the request path needs, shared by all streams.
pub struct Router {
    datastore: Arc<Datastore>,
    built: ArcSwap<Built>,
    telemetry: Arc<Telemetry>,
    pub metrics_staleness_ms: u32,
    /// Requests routed and not yet completed; above `max_in_flight` new ones get 429.
    in_flight: Arc<AtomicUsize>,
    pub max_in_flight: usize,
    /// The last cycle id handed out; every decision gets the next one.
    cycles: AtomicU64,
    /// Shadow jobs running or waiting.
    shadow_jobs: Arc<AtomicUsize>,
    /// The passive breaker fed by responses.
    health: Arc<Health>,
    /// Signalled whenever a routed request ends (flow control dispatches on it).
    freed: Arc<tokio::sync::Notify>,
    /// The flow controller, once started.
    flow: std::sync::OnceLock<Arc<FlowControl>>,
    /// Where decisions are shared with peer replicas (the state store), when configured.
    sink: std::sync::OnceLock<Arc<dyn DecisionSink>>,
    clock: Instant,
}

/// Where a replica shares its decisions with its peers (`state_store`). Called on the
/// request path: an implementation queues and returns, it never waits on the network.
pub trait DecisionSink: Send + Sync {
    /// Request `req` (cycle `cycle`) was routed to `target`.
    fn decided(&self, cycle: u64, target: SocketAddr, req: &Request);
    /// That request ended.
    fn finished(&self, cycle: u64, completion: &Completion);
}

/// A peer replica's decision, applied here: this replica's plugins learnt it as their own
/// (prefix index, LRU, in-flight load) until `Router::mirror_finished`.
pub struct Mirrored {
    built: Arc<Built>,
    variant: usize,
    cycle: u64,
    endpoint: u32,
    cell: Arc<MetricsCell>,
    tokens: u64,
}

/// A request counted in flight until dropped.
pub struct Admitted {
    counter: Arc<AtomicUsize>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How the response of a routed request ended, as the wire saw it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ending {
    pub outcome: Outcome,
    /// The worker's HTTP status, 0 when none arrived.
    pub status: u16,
    pub usage: Option<Usage>,
}

/// Shadow variants' plugins learn a request's placement (`decided`) only when their job
/// runs, off the request path; hooks of the request that come earlier wait here and are
/// replayed after it.
#[derive(Default)]
struct ShadowLink {
    /// The shadow variants whose plugins were told the placement, once the job ran.
    ran: Option<Vec<usize>>,
    /// When the first response bytes came (`now-ms`).
    first_chunk: Option<u64>,
    finished: Option<Completion>,
}

/// A routed request: where to send it, and its life until its response ends.
pub struct Routed {
    /// Primary first, then fallbacks; never empty.
    pub targets: Vec<SocketAddr>,
    /// The primary's endpoint id.
    pub endpoint_id: u32,
    /// The variant that routed it (index into the scheduler's variants) and its name.
    pub variant: usize,
    pub variant_name: String,
    /// Whether responses should carry the variant's name.
    pub name_variant: bool,
    /// Headers the plugins add to the client's response.
    pub response_headers: Vec<(String, String)>,
    pub cycle: u64,
    pub model: String,
    built: Arc<Built>,
    telemetry: Arc<Telemetry>,
    started: Instant,
    /// The router's clock, whose milliseconds plugins see as `now-ms`.
    clock: Instant,
    first_chunk: Option<Duration>,
    /// Response headers arrived (the breaker was told).
    answered: bool,
    health: Arc<Health>,
    /// The primary's live counters (in flight until the end) and this request's tokens.
    cell: Arc<MetricsCell>,
    tokens: u64,
    freed: Arc<tokio::sync::Notify>,
    finished: bool,
    shadows: Option<Arc<Mutex<ShadowLink>>>,
    sink: Option<Arc<dyn DecisionSink>>,
    _running: InFlight,
    _admitted: Admitted,
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routed").field("targets", &self.targets).field("variant", &self.variant_name).finish()
    }
}

/// Everything a shadow cycle needs: the same request and candidates the routing variant saw.
pub struct ShadowJob {
    built: Arc<Built>,
    cycle: u64,
    request: Request,
    decision: Decision,
    link: Arc<Mutex<ShadowLink>>,
    slot: ShadowSlot,
}

/// One of the `MAX_SHADOW_JOBS` slots, released when the job is done (or dropped).
struct ShadowSlot(Arc<AtomicUsize>);

impl Drop for ShadowSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `now-ms` plugins see: milliseconds since the router's clock started.
fn millis_since(clock: Instant) -> u64 {
    clock.elapsed().as_millis() as u64
}

impl Routed {
    /// The response headers arrived with `status` (0 when unknown): the breaker learns it.
    pub fn answered(&mut self, status: u16) {
        if !self.answered
            && let Some(&target) = self.targets.first()
        {
            self.answered = true;
            self.health.answered(target, self.cycle, status);
        }
    }

    /// The first response bytes arrived: the plugins that asked learn it (once).
    pub fn first_chunk(&mut self) {
        if self.first_chunk.is_some() || self.finished {
            return;
        }
        self.first_chunk = Some(self.started.elapsed());
        let now_ms = millis_since(self.clock);
        let failures = self.built.scheduler.first_chunk(&[self.variant], self.cycle, self.endpoint_id, now_ms);
        self.built.metrics.hook_failures(&failures);
        if let Some(link) = &self.shadows {
            let mut link = lock(link);
            match &link.ran {
                Some(ran) => {
                    let failures = self.built.scheduler.first_chunk(ran, self.cycle, self.endpoint_id, now_ms);
                    self.built.metrics.hook_failures(&failures);
                }
                None => link.first_chunk = Some(now_ms),
            }
        }
    }

    /// The request ended: metrics are recorded and the plugins that asked learn it (once;
    /// dropping an unfinished `Routed` finishes it as cancelled).
    pub fn finish(&mut self, ending: Ending) {
        if self.finished {
            return;
        }
        self.finished = true;
        if !self.answered
            && let Some(&target) = self.targets.first()
        {
            self.health.unanswered(target, self.cycle);
        }
        self.cell.ended(self.tokens);
        self.freed.notify_one();
        if let Some(v) = self.built.metrics.variant(self.variant) {
            let ttft = self.first_chunk;
            self.telemetry.completed(&self.model, v, self.started.elapsed(), ttft, ending.usage);
        }
        let completion = Completion {
            endpoint: self.endpoint_id,
            outcome: ending.outcome,
            status: ending.status,
            usage: ending.usage,
        };
        debug!(cycle = self.cycle, ?completion, "request finished");
        let failures = self.built.scheduler.finished(&[self.variant], self.cycle, &completion);
        self.built.metrics.hook_failures(&failures);
        if let Some(sink) = &self.sink {
            sink.finished(self.cycle, &completion);
        }
        if let Some(link) = &self.shadows {
            let mut link = lock(link);
            match &link.ran {
                Some(ran) => {
                    let failures = self.built.scheduler.finished(ran, self.cycle, &completion);
                    self.built.metrics.hook_failures(&failures);
                }
                None => link.finished = Some(completion),
            }
        }
    }

    /// Time from routing to the first response bytes, once they came.
    pub fn first_chunk_after(&self) -> Option<Duration> {
        self.first_chunk
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(Ending { outcome: Outcome::Cancelled, status: 0, usage: None });
        }
    }
}

impl Router {
    pub fn new(datastore: Arc<Datastore>, scheduler: Scheduler, telemetry: Arc<Telemetry>) -> Self {
        let built = Built::new(scheduler, &telemetry);
        Router::with_built(datastore, built, telemetry)
    }

    /// A router serving `built` (with its flow-control settings).
    pub fn with_built(datastore: Arc<Datastore>, built: Built, telemetry: Arc<Telemetry>) -> Self {
        Router {
            built: ArcSwap::from_pointee(built),
            datastore,
            metrics_staleness_ms: DEFAULT_METRICS_STALENESS_MS,
            in_flight: Arc::default(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            cycles: AtomicU64::new(0),
            shadow_jobs: Arc::default(),
            health: Arc::new(Health::new(HealthConfig::default(), Some(telemetry.clone()))),
            freed: Arc::default(),
            flow: std::sync::OnceLock::new(),
            sink: std::sync::OnceLock::new(),
            telemetry,
            clock: Instant::now(),
        }
    }

    /// Replaces the passive breaker's settings (before serving).
    pub fn set_health(&mut self, config: HealthConfig) {
        self.health = Arc::new(Health::new(config, Some(self.telemetry.clone())));
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Starts flow control (once; it queues only while the config's gate is on).
    pub fn start_flow_control(self: &Arc<Self>) -> Arc<FlowControl> {
        self.flow.get_or_init(|| FlowControl::start(self)).clone()
    }

    /// Request bodies above this many bytes are decided off the async workers (the
    /// installed scheduler's `Built::heavy_body_bytes`).
    pub fn heavy_body_bytes(&self) -> usize {
        self.built.load().heavy_body_bytes()
    }

    /// Whether the installed scheduler needs chat requests' `messages` as sent
    /// (`Built::renders_chat`).
    pub fn renders_chat(&self) -> bool {
        self.built.load().renders_chat()
    }

    /// Shares every decision from now on through `sink` (set once, before serving).
    pub fn set_sink(&self, sink: Arc<dyn DecisionSink>) {
        let _ = self.sink.set(sink);
    }

    /// Applies a peer replica's decision: the variant the request would use here decides
    /// it as a shadow does, then learns it went to `target`. None when `target` is not in
    /// this replica's pool.
    pub fn mirror(&self, mut req: Request, target: SocketAddr) -> Option<Mirrored> {
        let pool = self.datastore.snapshot();
        let endpoint = pool.endpoints.iter().find(|e| e.target() == target)?;
        let all: Vec<&PoolEndpoint> = pool.endpoints.iter().collect();
        let candidates = self.datastore.candidates(&all, self.metrics_staleness_ms);
        let built = self.built.load_full();
        let cycle = self.cycles.fetch_add(1, Ordering::Relaxed) + 1;
        req.now_ms = self.now_ms();
        let variant = built.scheduler.choose(&req);
        let profile = &built.scheduler.variants.get(variant)?.profile;
        if let Err(e) = profile.schedule_shadow(cycle, &req, &candidates, endpoint.id) {
            debug!(cycle, error = %e, "a peer's decision did not replay here (its placement is still recorded)");
        }
        let tokens = u64::from(req.prompt_tokens);
        endpoint.metrics.routed(tokens);
        Some(Mirrored { built, variant, cycle, endpoint: endpoint.id, cell: endpoint.metrics.clone(), tokens })
    }

    /// A peer's request applied by `mirror` ended.
    pub fn mirror_finished(&self, m: Mirrored, outcome: Outcome, status: u16) {
        m.cell.ended(m.tokens);
        self.freed.notify_one();
        let c = Completion { endpoint: m.endpoint, outcome, status, usage: None };
        m.built.metrics.hook_failures(&m.built.scheduler.finished(&[m.variant], m.cycle, &c));
    }

    pub fn flow_control(&self) -> Option<&Arc<FlowControl>> {
        self.flow.get()
    }

    /// Routes a parsed request, through flow control when its gate is on: routed now, or
    /// queued (a ticket to await), or refused. `bytes` is its body size.
    pub fn place(&self, req: Request, subset: Option<&[String]>, bytes: u64) -> Result<Placement, RouteError> {
        match self.flow.get() {
            Some(fc) if self.built.load().flow.enabled => fc.submit(self, req, subset.map(<[String]>::to_vec), bytes),
            _ => self.route(req, subset).map(|r| Placement::Routed(Box::new(r))),
        }
    }

    /// Notified whenever a routed request ends.
    pub fn freed(&self) -> &Arc<tokio::sync::Notify> {
        &self.freed
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    pub fn datastore(&self) -> &Arc<Datastore> {
        &self.datastore
    }

    /// The running scheduler and its metric handles.
    pub fn built(&self) -> Arc<Built> {
        self.built.load_full()
    }

    /// Publishes `built` (already told the current pool); in-flight requests finish on the
    /// one they started with. Only the pool publisher calls it, so pool and scheduler
    /// changes are applied in one order.
    pub(crate) fn install(&self, built: Arc<Built>) {
        self.built.store(built);
    }

    /// Milliseconds since the router started (the `now-ms` plugins see).
    pub fn now_ms(&self) -> u64 {
        millis_since(self.clock)
    }

    /// Counts a request in flight, or refuses it when `max_in_flight` are.
    fn admit(&self) -> Result<Admitted, RouteError> {
        // Invariant: work beyond the bound is refused at once rather than queued; the check
        // and the increment are one atomic step, so concurrent requests cannot overshoot.
        let max = self.max_in_flight;
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| RouteError::Overloaded(max))?;
        Ok(Admitted { counter: self.in_flight.clone() })
    }

    /// Chooses the endpoint(s) for one request (`req.now_ms` is set here).
    pub fn route(
        &self,
        mut req: Request,
        subset: Option<&[String]>,
    ) -> Result<(Routed, Option<ShadowJob>), RouteError> {
        let admitted = self.admit()?;
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
        let cycle = self.cycles.fetch_add(1, Ordering::Relaxed) + 1;
        let candidates = self.health.filter_for(cycle, candidates, PoolEndpoint::target);
        let candidates = self.datastore.candidates(&candidates, self.metrics_staleness_ms);
        let built = self.built.load_full();
        req.now_ms = self.now_ms();
        // The request id comes from the client and may repeat: the cycle makes each
        // decision's tie-breaks and exploration draws its own.
        req.random_seed ^= cycle.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let started = Instant::now();
        let decision = match built.scheduler.decide(cycle, &req, candidates) {
            Ok(d) => d,
            Err(e) => {
                if let DecideError::Schedule { variant, .. } = &e {
                    built.metrics.failed(*variant);
                }
                self.health.release(cycle);
                return Err(e.into());
            }
        };
        let elapsed = started.elapsed();
        let targets: Vec<SocketAddr> =
            decision.result.targets.iter().filter_map(|id| pool.by_id(*id)).map(PoolEndpoint::target).collect();
        let primary = decision.primary();
        let Some(endpoint) = pool.by_id(primary).filter(|_| !targets.is_empty()) else {
            self.health.release(cycle);
            return Err(RouteError::Internal("the picked endpoint is not in the pool snapshot".into()));
        };
        built.metrics.decided(&decision, elapsed, &endpoint.spec.name);
        self.health.sent(targets[0], cycle, req.stream);
        let tokens = u64::from(req.prompt_tokens);
        endpoint.metrics.routed(tokens);
        let variant = &built.scheduler.variants[decision.variant];
        debug!(
            request_id = %req.id,
            cycle,
            variant = %variant.name,
            ?targets,
            scores = ?decision.result.total_scores,
            candidates = ?decision.result.table.ids(),
            "scheduled"
        );
        let mut routed = Routed {
            targets,
            endpoint_id: primary,
            variant: decision.variant,
            variant_name: variant.name.clone(),
            name_variant: built.scheduler.names_variants(),
            response_headers: decision.result.response_headers.clone(),
            cycle,
            model: req.model.clone(),
            built: built.clone(),
            telemetry: self.telemetry.clone(),
            started,
            clock: self.clock,
            first_chunk: None,
            answered: false,
            health: self.health.clone(),
            cell: endpoint.metrics.clone(),
            tokens,
            freed: self.freed.clone(),
            finished: false,
            shadows: None,
            sink: self.sink.get().cloned(),
            _running: self.telemetry.routed(&req.model),
            _admitted: admitted,
        };
        if let (Some(sink), Some(&target)) = (&routed.sink, routed.targets.first()) {
            sink.decided(cycle, target, &req);
        }
        let job = if decision.shadows.is_empty() {
            None
        } else if self.shadow_jobs.fetch_add(1, Ordering::AcqRel) < MAX_SHADOW_JOBS {
            let link = Arc::new(Mutex::new(ShadowLink::default()));
            routed.shadows = Some(link.clone());
            let slot = ShadowSlot(self.shadow_jobs.clone());
            Some(ShadowJob { built, cycle, request: req, decision, link, slot })
        } else {
            self.shadow_jobs.fetch_sub(1, Ordering::AcqRel);
            built.metrics.shadow_dropped();
            None
        };
        Ok((routed, job))
    }

    /// Runs the shadow variants of a routed request and records what they would have
    /// picked; then replays the hooks its request saw meanwhile. Never affects the request:
    /// call it after answering, off the request path.
    pub fn run_shadows(job: ShadowJob) {
        let ShadowJob { built, cycle, request, decision, link, slot } = job;
        let mut ran = Vec::new();
        for &i in &decision.shadows {
            let started = Instant::now();
            let outcome = built.scheduler.run_shadow(i, cycle, &request, &decision);
            let (agreed, result) = match &outcome {
                Some(Ok(r)) => (Some(r.targets.first() == Some(&decision.primary())), Some(r)),
                Some(Err(e)) => {
                    debug!(variant = i, error = %e, "shadow variant failed");
                    (None, None)
                }
                None => continue,
            };
            built.metrics.shadow(i, started.elapsed(), agreed, result);
            ran.push(i);
        }
        let mut link = lock(&link);
        let endpoint = decision.primary();
        if let Some(now_ms) = link.first_chunk {
            built.metrics.hook_failures(&built.scheduler.first_chunk(&ran, cycle, endpoint, now_ms));
        }
        if let Some(c) = link.finished.take() {
            built.metrics.hook_failures(&built.scheduler.finished(&ran, cycle, &c));
        }
        link.ran = Some(ran);
        drop(slot);
    }

    /// Recomputes the pool-level gauges from the current pool and metrics.
    pub fn refresh_pool_gauges(&self) {
        let pool = self.datastore.snapshot();
        let all: Vec<&PoolEndpoint> = pool.endpoints.iter().collect();
        let m = self.datastore.candidates(&all, self.metrics_staleness_ms);
        let fresh: Vec<usize> =
            (0..m.len()).filter(|&i| m.waiting[i].is_finite() && m.kv_usage[i].is_finite()).collect();
        let mean = |col: &[f32]| {
            if fresh.is_empty() {
                0.0
            } else {
                fresh.iter().map(|&i| f64::from(col[i])).sum::<f64>() / fresh.len() as f64
            }
        };
        let per_pod: Vec<(String, f64)> = pool
            .endpoints
            .iter()
            .enumerate()
            .filter(|(i, _)| m.waiting[*i].is_finite())
            .map(|(i, e)| (e.spec.name.clone(), f64::from(m.waiting[i])))
            .collect();
        let saturation = self.built.load().scheduler.saturation.pool_saturation(&m);
        self.telemetry.pool_gauges(&PoolGauges {
            ready: fresh.len(),
            avg_kv: mean(&m.kv_usage),
            avg_queue: mean(&m.waiting),
            saturation: f64::from(saturation),
            per_pod_queue: &per_pod,
        });
    }

    /// Counts a request the EPP answered with an error (the one place errors are counted).
    pub fn record_error(&self, model: &str, error: &RouteError) {
        self.telemetry.rejected(model, error.reply().code, error.plugin());
    }

    /// Requests routed and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
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
