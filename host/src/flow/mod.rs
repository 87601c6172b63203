//! Flow control, as upstream's (`featureGates: [flowControl]`): while the pool is
//! saturated, requests wait in the EPP — their ext_proc stream held open — in priority
//! bands, one queue per tenant (fairness id), and are dispatched, highest band first, by
//! the band's fairness and ordering policies, as soon as the saturation detector says there
//! is room. A request leaves the queue routed (scheduled then, on the metrics of then, by
//! the running profile), or answered by the EPP: over a limit (429), out of time (429, or
//! 503 while the pool is empty), its client gone, or the EPP shutting down (503). Nothing
//! queued is dropped without an answer.
//!
//! `queue` holds the queues as plain state (shared with `epp replay`); this module adds
//! the clock, the dispatcher task and the tickets requests wait on. The dispatcher wakes on
//! every arrival, every request end (capacity freed) and every millisecond while anything
//! is queued (new metrics).

pub mod detector;
pub mod queue;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use epp_core::Request;
use tokio::sync::{Notify, oneshot};
use tracing::{debug, info, warn};

use crate::config::flow::FlowSpec;
use crate::datastore::PoolEndpoint;
use crate::routing::{RouteError, Routed, Router, ShadowJob};
use queue::{Expiry, FlowQueues, ItemId, Meta, Rejection};

/// The fairness-id headers, upstream's current name first.
pub const FAIRNESS_HEADERS: [&str; 2] = ["x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id"];
/// The flow of requests that name none.
pub const DEFAULT_FLOW: &str = "default-flow";
/// The response header naming why flow control answered a request itself.
pub const DROPPED_REASON_HEADER: &str = "x-llm-d-request-dropped-reason";
/// Distinct fairness ids labelled in metrics; the rest are `other`.
const MAX_FLOW_LABELS: usize = 1000;
/// How often queued requests are checked against their TTL.
const EXPIRY_EVERY: Duration = Duration::from_millis(50);
/// Dispatch tick while requests are queued (new metrics may have freed room).
const TICK: Duration = Duration::from_millis(1);

/// Why flow control answered a request itself (upstream's outcomes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Over a band's or the global limits.
    Capacity,
    /// Over the limits while the pool has no endpoints.
    CapacityNoEndpoints,
    /// `defaultRequestTTL` ran out in the queue.
    Ttl,
    /// The queue-wait budget ran out while the pool had no endpoints.
    TtlNoEndpoints,
    /// The client left while queued (nobody reads the answer; counted).
    ClientGone,
    /// The EPP is shutting down.
    ShuttingDown,
}

impl Dropped {
    /// The `x-llm-d-request-dropped-reason` value.
    pub fn reason(self) -> &'static str {
        match self {
            Dropped::Capacity => "rejected-saturated",
            Dropped::CapacityNoEndpoints | Dropped::TtlNoEndpoints => "rejected-no-endpoints",
            Dropped::Ttl => "rejected-ttl-expired",
            Dropped::ClientGone => "rejected-context-cancelled",
            Dropped::ShuttingDown => "rejected-shutting-down",
        }
    }

    /// The `outcome` label of the flow-control metrics.
    pub fn outcome(self) -> &'static str {
        match self {
            Dropped::Capacity => "RejectedCapacity",
            Dropped::CapacityNoEndpoints => "RejectedNoEndpoints",
            Dropped::Ttl => "EvictedTTL",
            Dropped::TtlNoEndpoints => "EvictedNoEndpoints",
            Dropped::ClientGone => "EvictedContextCancelled",
            Dropped::ShuttingDown => "EvictedOther",
        }
    }

    /// The message after `inference error: <Code> - `.
    pub fn message(self) -> &'static str {
        match self {
            Dropped::Capacity => "request rejected pre-queue: queue at capacity",
            Dropped::CapacityNoEndpoints => "no endpoints available: request rejected pre-queue: queue at capacity",
            Dropped::Ttl => "request timed out in queue: request evicted from queue: request TTL expired",
            Dropped::TtlNoEndpoints => {
                "request timed out in queue and no endpoints are available: request evicted from queue: request TTL expired"
            }
            Dropped::ClientGone => "client disconnected: request evicted from queue: request context cancelled",
            Dropped::ShuttingDown => {
                "flow controller shutting down: request evicted from queue: flow controller is not running"
            }
        }
    }
}

/// What routing a request through flow control gives.
pub type Routing = Result<(Routed, Option<ShadowJob>), RouteError>;

/// Where a request stands after `Router::place`.
pub enum Placement {
    /// Routed at once.
    Routed(Box<(Routed, Option<ShadowJob>)>),
    /// Queued: await the ticket (dropping it leaves the queue).
    Queued(Ticket),
}

struct Waiter {
    request: Request,
    subset: Option<Vec<String>>,
    tx: oneshot::Sender<Routing>,
    /// Metric labels.
    flow_label: String,
}

/// A queued request's claim on its answer.
pub struct Ticket {
    id: ItemId,
    rx: oneshot::Receiver<Routing>,
    flow: Arc<FlowControl>,
}

impl Ticket {
    /// Waits until the request is routed or answered by flow control.
    pub async fn wait(&mut self) -> Routing {
        match (&mut self.rx).await {
            Ok(r) => r,
            // The controller went away without answering: it is shutting down.
            Err(_) => Err(RouteError::FlowControl(Dropped::ShuttingDown)),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Still queued means the client left: out of the queue at once.
        self.flow.cancel(self.id);
    }
}

/// The flow controller of one EPP.
pub struct FlowControl {
    queues: Mutex<FlowQueues<Waiter>>,
    wake: Notify,
    router: Weak<Router>,
    clock: Instant,
    stopping: AtomicBool,
    labels: Mutex<HashSet<String>>,
}

impl FlowControl {
    /// Creates the controller for `router` and starts its dispatcher (a tokio task).
    pub fn start(router: &Arc<Router>) -> Arc<FlowControl> {
        let spec = router.built().flow.clone();
        let fc = Arc::new(FlowControl {
            queues: Mutex::new(FlowQueues::new(spec, 0.0)),
            wake: Notify::new(),
            router: Arc::downgrade(router),
            clock: Instant::now(),
            stopping: AtomicBool::new(false),
            labels: Mutex::default(),
        });
        tokio::spawn(dispatcher(fc.clone()));
        fc
    }

    fn now(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }

    fn lock(&self) -> MutexGuard<'_, FlowQueues<Waiter>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests queued now.
    pub fn queued(&self) -> u64 {
        self.lock().len()
    }

    /// Routes `req` now when nothing is queued ahead of it and the pool has room; else
    /// queues it (or refuses it over the limits).
    pub fn submit(
        self: &Arc<Self>,
        router: &Router,
        req: Request,
        subset: Option<Vec<String>>,
        bytes: u64,
    ) -> Result<Placement, RouteError> {
        let built = router.built();
        let now = self.now();
        let flow_id = fairness_id(&req.headers).to_string();
        let flow_label = self.label(&flow_id);
        let priority = req.priority;
        let telemetry = router.telemetry();
        let mut q = self.lock();
        self.refresh(&mut q, router, &built.flow, now);
        if self.stopping.load(AtomicOrdering::Acquire) {
            drop(q);
            telemetry.flow_finished(&flow_label, priority, &req.model, Dropped::ShuttingDown.outcome(), None);
            return Err(RouteError::FlowControl(Dropped::ShuttingDown));
        }
        if q.is_empty() {
            let sat = saturation(router, &built.flow);
            telemetry.flow_saturation(sat);
            if sat < built.flow.usage_limit {
                drop(q);
                let model = req.model.clone();
                let routed = router.route(req, subset.as_deref());
                let outcome = if routed.is_ok() { "Dispatched" } else { "RejectedOther" };
                telemetry.flow_finished(&flow_label, priority, &model, outcome, Some(0.0));
                return routed.map(|r| Placement::Routed(Box::new(r)));
            }
        }
        let model = req.model.clone();
        let meta = Meta { flow: flow_id, priority, bytes, enqueued: now };
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter { request: req, subset, tx, flow_label: flow_label.clone() };
        match q.enqueue(meta, waiter, now) {
            Ok(id) => {
                drop(q);
                telemetry.flow_queued(&flow_label, priority, &model, bytes, 1);
                self.wake.notify_one();
                Ok(Placement::Queued(Ticket { id, rx, flow: self.clone() }))
            }
            Err((why, _)) => {
                drop(q);
                let dropped = match why {
                    Rejection::Capacity => Dropped::Capacity,
                    Rejection::NoEndpoints => Dropped::CapacityNoEndpoints,
                };
                telemetry.flow_finished(&flow_label, priority, &model, dropped.outcome(), None);
                Err(RouteError::FlowControl(dropped))
            }
        }
    }

    /// Brings the queues to the running config and the pool's state.
    fn refresh(&self, q: &mut FlowQueues<Waiter>, router: &Router, spec: &FlowSpec, now: f64) {
        if q.spec() != spec {
            info!(queued = q.len(), "flow-control settings changed; queued requests keep their place");
            q.reconfigure(spec.clone(), now);
        }
        q.set_pool_empty(router.datastore().snapshot().endpoints.is_empty(), now);
    }

    /// Takes a queued request out because its client left.
    fn cancel(&self, id: ItemId) {
        let now = self.now();
        let Some((meta, w)) = self.lock().cancel(id, now) else { return };
        debug!(request_id = %w.request.id, flow = %meta.flow, "client left while queued");
        if let Some(router) = self.router.upgrade() {
            self.left(&router, &meta, &w, Dropped::ClientGone.outcome(), now);
        }
    }

    fn left(&self, router: &Router, meta: &Meta, w: &Waiter, outcome: &str, now: f64) {
        let t = router.telemetry();
        t.flow_queued(&w.flow_label, meta.priority, &w.request.model, meta.bytes, -1);
        t.flow_finished(&w.flow_label, meta.priority, &w.request.model, outcome, Some(now - meta.enqueued));
    }

    /// Answers every queued request 503 (shutting down) and refuses new ones; requests
    /// already routed are not affected.
    pub fn shutdown(&self) {
        self.stopping.store(true, AtomicOrdering::Release);
        let now = self.now();
        let all = self.lock().drain();
        if !all.is_empty() {
            info!(queued = all.len(), "shutting down: answering queued requests");
        }
        let router = self.router.upgrade();
        for (_, meta, w) in all {
            if let Some(r) = &router {
                self.left(r, &meta, &w, Dropped::ShuttingDown.outcome(), now);
            }
            let _ = w.tx.send(Err(RouteError::FlowControl(Dropped::ShuttingDown)));
        }
        self.wake.notify_one();
    }

    /// The metric label of a fairness id (at most `MAX_FLOW_LABELS` distinct, then `other`).
    fn label(&self, flow: &str) -> String {
        let mut labels = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        if labels.contains(flow) {
            return flow.to_string();
        }
        if labels.len() < MAX_FLOW_LABELS {
            labels.insert(flow.to_string());
            return flow.to_string();
        }
        "other".into()
    }

    /// One dispatch cycle: expire what is due, then dispatch while there is room.
    fn cycle(&self, router: &Router, last_expiry: &mut Instant) {
        let built = router.built();
        let started = Instant::now();
        if last_expiry.elapsed() >= EXPIRY_EVERY {
            *last_expiry = Instant::now();
            let now = self.now();
            let gone = {
                let mut q = self.lock();
                self.refresh(&mut q, router, &built.flow, now);
                q.expire(now)
            };
            for (_, meta, w, why) in gone {
                let dropped = match why {
                    Expiry::Ttl => Dropped::Ttl,
                    Expiry::NoEndpoints => Dropped::TtlNoEndpoints,
                };
                warn!(request_id = %w.request.id, flow = %meta.flow, priority = meta.priority, waited_s = now - meta.enqueued, "request timed out in the queue");
                self.left(router, &meta, &w, dropped.outcome(), now);
                let _ = w.tx.send(Err(RouteError::FlowControl(dropped)));
            }
        }
        loop {
            let now = self.now();
            let popped = {
                let mut q = self.lock();
                self.refresh(&mut q, router, &built.flow, now);
                if q.is_empty() {
                    break;
                }
                let sat = saturation(router, &built.flow);
                router.telemetry().flow_saturation(sat);
                q.pop(sat, now)
            };
            let Some((_, meta, w)) = popped else { break };
            if w.tx.is_closed() {
                self.left(router, &meta, &w, Dropped::ClientGone.outcome(), now);
                continue;
            }
            let Waiter { request, subset, tx, flow_label } = w;
            let model = request.model.clone();
            let id = request.id.clone();
            let routed = router.route(request, subset.as_deref());
            let t = router.telemetry();
            t.flow_queued(&flow_label, meta.priority, &model, meta.bytes, -1);
            let outcome = if routed.is_ok() { "Dispatched" } else { "RejectedOther" };
            t.flow_finished(&flow_label, meta.priority, &model, outcome, Some(now - meta.enqueued));
            debug!(request_id = %id, flow = %meta.flow, waited_s = now - meta.enqueued, "dispatched from the queue");
            // A client that left just now drops the routed request, which ends it as cancelled.
            let _ = tx.send(routed);
        }
        router.telemetry().flow_dispatch_cycle(started.elapsed());
    }
}

async fn dispatcher(fc: Arc<FlowControl>) {
    let mut last_expiry = Instant::now();
    loop {
        let Some(router) = fc.router.upgrade() else { return };
        let freed = router.freed().clone();
        let busy = !fc.lock().is_empty();
        drop(router);
        let idle_wait = if busy { TICK } else { EXPIRY_EVERY };
        tokio::select! {
            _ = fc.wake.notified() => {}
            _ = freed.notified() => {}
            _ = tokio::time::sleep(idle_wait) => {}
        }
        let Some(router) = fc.router.upgrade() else { return };
        fc.cycle(&router, &mut last_expiry);
    }
}

/// The pool's saturation by the configured detector, over the endpoints routing may use:
/// an endpoint the breaker took out is no spare capacity (unless every one is out, when
/// routing keeps them all too).
fn saturation(router: &Router, spec: &FlowSpec) -> f64 {
    let ds = router.datastore();
    let pool = ds.snapshot();
    let serving = router.health().filter(pool.endpoints.iter().collect(), PoolEndpoint::target);
    detector::saturation(&spec.detector, &detector::loads(ds, &serving))
}

/// The request's fairness id: upstream's header, its older name, or `default-flow`.
pub fn fairness_id(headers: &[(String, String)]) -> &str {
    FAIRNESS_HEADERS
        .iter()
        .find_map(|h| headers.iter().find(|(k, v)| k.eq_ignore_ascii_case(h) && !v.trim().is_empty()))
        .map_or(DEFAULT_FLOW, |(_, v)| v.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fairness_ids_come_from_the_header_or_default() {
        let h = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert_eq!(fairness_id(&h("x-llm-d-inference-fairness-id", "team-a")), "team-a");
        assert_eq!(fairness_id(&h("x-gateway-inference-fairness-id", " team-b ")), "team-b");
        assert_eq!(fairness_id(&h("x-llm-d-inference-fairness-id", "")), DEFAULT_FLOW);
        assert_eq!(fairness_id(&[]), DEFAULT_FLOW);
    }

    #[test]
    fn outcomes_map_to_upstreams_statuses_and_reasons() {
        let cases = [
            (Dropped::Capacity, 429, "rejected-saturated"),
            (Dropped::CapacityNoEndpoints, 503, "rejected-no-endpoints"),
            (Dropped::Ttl, 429, "rejected-ttl-expired"),
            (Dropped::TtlNoEndpoints, 503, "rejected-no-endpoints"),
            (Dropped::ClientGone, 503, "rejected-context-cancelled"),
            (Dropped::ShuttingDown, 503, "rejected-shutting-down"),
        ];
        for (d, status, reason) in cases {
            // The status comes from the one mapping of errors to replies.
            let reply = crate::routing::RouteError::FlowControl(d).reply();
            assert_eq!((reply.status, d.reason(), reply.dropped_reason), (status, reason, Some(reason)), "{d:?}");
        }
    }
}
