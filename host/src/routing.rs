//! The decision for one request, independent of the wire: take the pool snapshot, narrow it
//! to the subset hint, build the scheduler's view, run the active profile, and name the
//! targets. Also the one place where every failure becomes an HTTP status and body.
//!
//! It does no network I/O; the scheduler call is synchronous and short (callers on an async
//! runtime run it with `spawn_blocking`).

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use llmd_plugin_sdk::{Request, Usage};
use tracing::debug;

use crate::datastore::{Datastore, PoolEndpoint};
use crate::request::{InferenceRequest, RequestError};
use crate::scheduler::{ScheduleError, SchedulerProfile};

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
            RouteError::Saturated => (429, "ResourceExhausted"),
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
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    /// Primary first, then fallbacks; never empty.
    pub targets: Vec<SocketAddr>,
    /// The primary's endpoint id (for response hooks).
    pub endpoint_id: u32,
}

/// Everything the request path needs, shared by all streams.
pub struct Router {
    datastore: Arc<Datastore>,
    scheduler: ArcSwap<SchedulerProfile>,
    pub metrics_staleness_ms: u32,
}

impl Router {
    pub fn new(datastore: Arc<Datastore>, scheduler: SchedulerProfile) -> Self {
        Router {
            datastore,
            scheduler: ArcSwap::from_pointee(scheduler),
            metrics_staleness_ms: DEFAULT_METRICS_STALENESS_MS,
        }
    }

    pub fn datastore(&self) -> &Arc<Datastore> {
        &self.datastore
    }

    pub fn scheduler(&self) -> Arc<SchedulerProfile> {
        self.scheduler.load_full()
    }

    /// Publishes a new scheduler (told the current pool first); in-flight requests finish on
    /// the one they started with.
    pub fn set_scheduler(&self, scheduler: SchedulerProfile) {
        let pool = self.datastore.snapshot();
        scheduler.pool_changed(pool.generation, &pool.infos());
        self.scheduler.store(Arc::new(scheduler));
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
        let metrics = self.datastore.metrics_of(&candidates, self.metrics_staleness_ms);
        let req = Request {
            id: request_id.to_string(),
            model: request.map(|r| r.model.clone()).unwrap_or_default(),
            prompt: request.map(|r| r.prompt.as_bytes().to_vec()).unwrap_or_default(),
            cache_salt: request.and_then(|r| r.cache_salt.clone()),
            headers: headers.to_vec(),
            priority: 0,
            random_seed: xxhash_rust::xxh3::xxh3_64(request_id.as_bytes()),
        };
        let decision = self.scheduler.load().schedule(&req, &metrics).map_err(RouteError::Scheduling)?;
        let targets: Vec<SocketAddr> =
            decision.targets.iter().filter_map(|id| pool.by_id(*id)).map(PoolEndpoint::target).collect();
        let (Some(&endpoint_id), false) = (decision.targets.first(), targets.is_empty()) else {
            return Err(RouteError::Internal("the picked endpoint is not in the pool snapshot".into()));
        };
        debug!(request_id, ?targets, scores = ?decision.total_scores, candidates = ?decision.candidates, "scheduled");
        Ok(Routed { targets, endpoint_id })
    }

    /// Tells the plugins a response completed.
    pub fn response_complete(&self, request_id: &str, endpoint_id: u32, usage: Usage) {
        self.scheduler.load().response_complete(request_id, endpoint_id, usage);
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
