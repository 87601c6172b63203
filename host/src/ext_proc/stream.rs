//! The state machine of one ext_proc stream (one HTTP request through Envoy).
//!
//! Request path, full-duplex mode (the upstream Envoy config): headers are held until the
//! body's end of stream; the body is buffered (size cap → 413), parsed, the request routed,
//! then a headers answer (destination + cleared route cache + `envoy.lb` metadata) and the
//! body, re-chunked, as streamed mutations. A request whose headers end the stream is routed
//! (or rejected) at once, or Envoy would wait for its message timeout. Buffered modes are
//! served too: headers are let through and the route rides on the body answer.
//!
//! Response path: headers and every body chunk are answered as they come, so SSE streams
//! through; usage is read on the way and handed to the plugins' response hooks.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse};
use tracing::{debug, info, warn};

use super::reply;
use crate::request::{self, ApiKind};
use crate::routing::{RouteError, Routed, Router};
use crate::usage::UsageTracker;

/// Default cap on a request body the EPP buffers.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;

pub struct StreamState {
    router: Arc<Router>,
    max_body: usize,
    full_duplex: bool,
    request_id: String,
    generated_id: bool,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    subset: Option<Vec<String>>,
    body: Vec<u8>,
    routed: Option<Routed>,
    usage: Option<UsageTracker>,
    /// The request's model, once parsed (metric label).
    model: String,
    started: std::time::Instant,
    /// When the first response body byte passed (time to first token).
    first_byte: Option<std::time::Duration>,
    in_flight: Option<crate::routing::Admitted>,
    /// Set once an immediate response was sent: the stream is over for Envoy.
    pub finished: bool,
}

impl StreamState {
    pub fn new(router: Arc<Router>, max_body: usize) -> Self {
        StreamState {
            router,
            max_body,
            full_duplex: true,
            request_id: String::new(),
            generated_id: false,
            method: String::new(),
            path: String::new(),
            headers: Vec::new(),
            subset: None,
            body: Vec::new(),
            routed: None,
            usage: None,
            model: String::new(),
            started: std::time::Instant::now(),
            first_byte: None,
            in_flight: None,
            finished: false,
        }
    }

    /// Handles one message from Envoy; returns the answers to send, in order.
    pub async fn handle(&mut self, msg: ProcessingRequest) -> Vec<ProcessingResponse> {
        if let Some(pc) = &msg.protocol_config {
            self.full_duplex = pc.request_body_mode == BodySendMode::FullDuplexStreamed as i32;
        }
        let Some(request) = msg.request else { return Vec::new() };
        match request {
            Msg::RequestHeaders(h) => {
                self.subset =
                    reply::metadata_strings(msg.metadata_context.as_ref(), reply::SUBSET_NAMESPACE, reply::SUBSET_KEY);
                self.request_headers(h).await
            }
            Msg::RequestBody(b) => self.request_body(b).await,
            Msg::RequestTrailers(_) => vec![reply::continue_trailers(false)],
            Msg::ResponseHeaders(h) => self.response_headers(h),
            Msg::ResponseBody(b) => self.response_body(b),
            Msg::ResponseTrailers(_) => vec![reply::continue_trailers(true)],
        }
    }

    async fn request_headers(&mut self, h: HttpHeaders) -> Vec<ProcessingResponse> {
        self.started = std::time::Instant::now();
        self.headers = header_pairs(h.headers.as_ref());
        let get = |name: &str| self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        self.method = get(":method").unwrap_or_default();
        self.path = get(":path").unwrap_or_default();
        match get("x-request-id").filter(|v| !v.is_empty()) {
            Some(id) => self.request_id = id,
            None => {
                self.request_id = new_request_id();
                self.generated_id = true;
            }
        }
        if h.end_of_stream {
            // No body will come: decide now.
            let result = match ApiKind::from_path(&self.path) {
                Some(_) => Err(RouteError::BadRequest(request::RequestError::EmptyBody)),
                None => self.route(None).await,
            };
            return match result {
                Ok(routed) => vec![reply::route_request_headers(&destination(&routed), self.id_header())],
                Err(e) => self.fail(e),
            };
        }
        if self.full_duplex { Vec::new() } else { vec![reply::continue_headers(false, self.id_header())] }
    }

    async fn request_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        if self.body.len() + b.body.len() > self.max_body {
            return self.fail(RouteError::PayloadTooLarge(self.max_body));
        }
        self.body.extend_from_slice(&b.body);
        if !b.end_of_stream {
            // Buffered modes answer every message; full duplex answers once at the end.
            return if self.full_duplex { Vec::new() } else { vec![reply::continue_body(false)] };
        }
        let parsed = match ApiKind::from_path(&self.path) {
            Some(kind) => match request::parse(kind, &self.body) {
                Ok(r) => {
                    self.model = r.model.clone();
                    Some(r)
                }
                Err(e) => return self.fail(e.into()),
            },
            None if self.method.eq_ignore_ascii_case("GET") || self.method.eq_ignore_ascii_case("HEAD") => None,
            None => return self.fail(RouteError::UnknownPath(self.path.clone())),
        };
        let routed = match self.route(parsed).await {
            Ok(r) => r,
            Err(e) => return self.fail(e),
        };
        let dest = destination(&routed);
        if !self.full_duplex {
            return vec![reply::route_request_body(&dest, self.id_header())];
        }
        let body = std::mem::take(&mut self.body);
        let mut out = Vec::with_capacity(2 + body.len() / reply::BODY_CHUNK);
        out.push(reply::route_request_headers(&dest, self.id_header()));
        if body.is_empty() {
            out.push(reply::streamed_body(false, Vec::new(), true));
        } else {
            let pieces = body.len().div_ceil(reply::BODY_CHUNK);
            for (i, piece) in body.chunks(reply::BODY_CHUNK).enumerate() {
                out.push(reply::streamed_body(false, piece.to_vec(), i + 1 == pieces));
            }
        }
        out
    }

    fn response_headers(&mut self, h: HttpHeaders) -> Vec<ProcessingResponse> {
        let headers = header_pairs(h.headers.as_ref());
        let content_type = headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v.as_str());
        self.usage = Some(UsageTracker::new(content_type));
        // The client always learns the id its request was logged and scheduled under (and,
        // if the experiment says so, the variant that routed it).
        let mut extra = vec![reply::header("x-request-id", &self.request_id)];
        if let Some(r) = self.routed.as_ref().filter(|r| r.name_variant) {
            extra.push(reply::header(crate::experiment::VARIANT_HEADER, &r.variant_name));
        }
        if h.end_of_stream {
            self.complete(None);
        }
        vec![reply::continue_headers(true, extra)]
    }

    fn response_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        if self.first_byte.is_none() && !b.body.is_empty() {
            self.first_byte = Some(self.started.elapsed());
        }
        if let Some(t) = self.usage.as_mut() {
            t.feed(&b.body);
        }
        if b.end_of_stream {
            let usage = self.usage.take().and_then(UsageTracker::finish);
            self.complete(usage);
        }
        if self.full_duplex {
            vec![reply::streamed_body(true, b.body, b.end_of_stream)]
        } else {
            vec![reply::continue_body(true)]
        }
    }

    /// Runs the response hooks once per routed request.
    fn complete(&mut self, usage: Option<llmd_plugin_sdk::Usage>) {
        if let Some(routed) = self.routed.take() {
            debug!(request_id = %self.request_id, ?usage, "response complete");
            self.router.record_completed(
                &self.model,
                &routed.variant_name,
                self.started.elapsed(),
                self.first_byte,
                usage,
            );
            self.in_flight = None;
            self.router.response_complete(
                routed.variant,
                &self.request_id,
                routed.endpoint_id,
                usage.unwrap_or_default(),
            );
        }
    }

    async fn route(&mut self, parsed: Option<request::InferenceRequest>) -> Result<Routed, RouteError> {
        let router = self.router.clone();
        let (id, headers, subset) = (self.request_id.clone(), self.headers.clone(), self.subset.clone());
        let started = std::time::Instant::now();
        // The scheduler is synchronous (wasm calls): keep it off the async workers.
        let routed =
            tokio::task::spawn_blocking(move || router.route(&id, &headers, parsed.as_ref(), subset.as_deref()))
                .await
                .map_err(|e| RouteError::Internal(format!("scheduling task failed: {e}")))??;
        info!(
            request_id = %self.request_id,
            path = %self.path,
            endpoint = %destination(&routed),
            elapsed_us = started.elapsed().as_micros() as u64,
            "request routed"
        );
        if let Some(job) = routed.shadows.clone() {
            // Shadows score after the decision, on their own thread: never on this request's path.
            let router = self.router.clone();
            tokio::task::spawn_blocking(move || router.run_shadows(&job));
        }
        self.routed = Some(routed.clone());
        self.in_flight = Some(self.router.record_routed(&self.model));
        Ok(routed)
    }

    fn fail(&mut self, e: RouteError) -> Vec<ProcessingResponse> {
        let r = e.reply();
        self.router.record_error(&self.model, &e);
        warn!(request_id = %self.request_id, path = %self.path, status = r.status, error = %e, "request rejected");
        self.finished = true;
        vec![reply::immediate(&r, &self.request_id)]
    }

    /// The request id header to add, when the EPP made the id up.
    fn id_header(&self) -> Vec<envoy_types::pb::envoy::config::core::v3::HeaderValueOption> {
        if self.generated_id { vec![reply::header("x-request-id", &self.request_id)] } else { Vec::new() }
    }
}

fn destination(r: &Routed) -> String {
    r.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")
}

/// Header pairs with lower-case names; Envoy sends values in `raw_value` (or `value`).
fn header_pairs(map: Option<&HeaderMap>) -> Vec<(String, String)> {
    let Some(map) = map else { return Vec::new() };
    map.headers
        .iter()
        .map(|h| {
            let v = if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            };
            (h.key.to_ascii_lowercase(), v)
        })
        .collect()
}

/// A fresh request id: 128 random-looking bits from time, a counter and the process id,
/// hashed (unique per process and restart; not a security token).
fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let seed = format!("{t}-{n}-{}", std::process::id());
    let h = xxhash_rust::xxh3::xxh3_128(seed.as_bytes());
    let s = format!("{h:032x}");
    format!("{}-{}-{}-{}-{}", &s[0..8], &s[8..12], &s[12..16], &s[16..20], &s[20..32])
}
