//! The state machine of one ext_proc stream (one HTTP request through Envoy).
//!
//! Request path, full-duplex mode (the upstream Envoy config): headers are held until the
//! body's end of stream (a request whose body ends with trailers gets 400: see
//! `request_trailers`); the body is buffered (size cap → 413), parsed, the request routed,
//! then a headers answer (destination + cleared route cache + `envoy.lb` metadata) and the
//! body as streamed mutations (moved, not copied, when it fits one message). A request whose
//! headers end the stream is routed (or rejected) at once, or Envoy would wait for its
//! message timeout. So is a request that is no inference call and will not end its body
//! before it is answered (a `GET` or `HEAD` whose headers leave the stream open, a
//! WebSocket upgrade, a `CONNECT`): its body, if any, then passes through as it comes.
//! Buffered modes are served too: headers are let through and the route
//! rides on the body answer. In `BUFFERED` mode the one body message is the whole body even
//! when trailers follow it (no end of stream then), so it is routed at once. In `STREAMED`
//! and `BUFFERED_PARTIAL` modes a body that comes in pieces cannot be routed (Envoy has sent
//! the headers on, or lets the rest by): it gets a clear 500 naming the modes that work.
//!
//! Response path: headers are answered at once (with the request id, the variant and any
//! header the plugins add); body chunks are echoed in full-duplex mode and acknowledged in
//! streamed mode, so SSE streams through; usage is read on the way. The first body bytes
//! and the end of the response reach the plugins through `Routed`; a stream that ends
//! without a response end (client gone, reset) drops its `Routed`, which ends the request
//! as cancelled.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValueOption};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse};
use epp_core::Outcome;
use tracing::{debug, warn};

use super::reply;
use crate::flow::{Placement, Routing, Ticket};
use crate::request::{self, ApiKind};
use crate::routing::{Ending, RouteError, Routed, Router, ShadowJob};
use crate::usage::UsageTracker;

/// Default cap on a request body the EPP buffers.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;

pub struct StreamState {
    router: Arc<Router>,
    max_body: usize,
    /// Body modes Envoy announced (full duplex unless told otherwise, as upstream runs).
    request_full_duplex: bool,
    /// `BUFFERED` request bodies: one message holds the whole body, trailers or not.
    request_whole_body: bool,
    /// The announced body mode, when it is one where a body in pieces cannot be routed
    /// (`STREAMED`: Envoy has sent the headers on; `BUFFERED_PARTIAL`: the rest of the body
    /// goes by without the EPP).
    request_pieces_unroutable: Option<&'static str>,
    response_full_duplex: bool,
    request_id: String,
    generated_id: bool,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    subset: Option<Vec<String>>,
    body: Vec<u8>,
    routed: Option<Routed>,
    /// Routed at its headers while its body (if any) was still to come: the body passes
    /// through unbuffered.
    passthrough: bool,
    /// Set while the request waits in flow control's queue.
    ticket: Option<Ticket>,
    usage: Option<UsageTracker>,
    /// The worker's response status, once its headers passed.
    status: u16,
    /// The request's model, once parsed (metric label).
    model: String,
    /// Set once an immediate response was sent: the stream is over for Envoy.
    pub finished: bool,
}

impl StreamState {
    pub fn new(router: Arc<Router>, max_body: usize) -> Self {
        StreamState {
            router,
            max_body,
            request_full_duplex: true,
            request_whole_body: false,
            request_pieces_unroutable: None,
            response_full_duplex: true,
            request_id: String::new(),
            generated_id: false,
            method: String::new(),
            path: String::new(),
            headers: Vec::new(),
            subset: None,
            body: Vec::new(),
            routed: None,
            passthrough: false,
            ticket: None,
            usage: None,
            status: 0,
            model: String::new(),
            finished: false,
        }
    }

    /// Whether handling `msg` may take long enough to hold up other streams on this thread:
    /// the end of a large request body, whose parsing, tokenization (precise prefix routing)
    /// and hashing grow with the prompt.
    pub fn heavy(&self, msg: &ProcessingRequest) -> bool {
        match &msg.request {
            Some(Msg::RequestBody(b)) => {
                (b.end_of_stream || self.request_whole_body)
                    && self.body.len() + b.body.len() > self.router.heavy_body_bytes()
            }
            _ => false,
        }
    }

    /// Handles one message from Envoy; returns the answers to send, in order.
    pub fn handle(&mut self, msg: ProcessingRequest) -> Vec<ProcessingResponse> {
        if let Some(pc) = &msg.protocol_config {
            self.request_full_duplex = pc.request_body_mode == BodySendMode::FullDuplexStreamed as i32;
            self.request_whole_body = pc.request_body_mode == BodySendMode::Buffered as i32;
            self.request_pieces_unroutable = match BodySendMode::try_from(pc.request_body_mode) {
                Ok(BodySendMode::Streamed) => Some("STREAMED"),
                Ok(BodySendMode::BufferedPartial) => Some("BUFFERED_PARTIAL"),
                _ => None,
            };
            self.response_full_duplex = pc.response_body_mode == BodySendMode::FullDuplexStreamed as i32;
        }
        let Some(request) = msg.request else { return Vec::new() };
        match request {
            Msg::RequestHeaders(h) => {
                self.subset =
                    reply::metadata_strings(msg.metadata_context.as_ref(), reply::SUBSET_NAMESPACE, reply::SUBSET_KEY);
                self.request_headers(h)
            }
            Msg::RequestBody(b) => self.request_body(b),
            Msg::RequestTrailers(_) => self.request_trailers(),
            Msg::ResponseHeaders(h) => self.response_headers(h),
            Msg::ResponseBody(b) => self.response_body(b),
            Msg::ResponseTrailers(_) => {
                self.complete();
                vec![reply::continue_trailers(true)]
            }
        }
    }

    fn request_headers(&mut self, h: HttpHeaders) -> Vec<ProcessingResponse> {
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
        let inference = ApiKind::from_path(&self.path).is_some();
        if h.end_of_stream && inference {
            return self.fail(RouteError::BadRequest(request::RequestError::EmptyBody));
        }
        // No body will come, or none before the answer: decide now.
        let passthrough = !h.end_of_stream && !inference && self.answered_before_body();
        if h.end_of_stream || passthrough {
            let req = request::for_scheduling(&self.request_id, &self.headers, None);
            return match self.router.route(req, self.subset.as_deref()) {
                Ok((routed, job)) => {
                    let dest = self.accept(routed, job);
                    self.passthrough = passthrough;
                    vec![reply::route_request_headers(&dest, self.id_header())]
                }
                Err(e) => self.fail(e),
            };
        }
        if self.request_full_duplex { Vec::new() } else { vec![reply::continue_headers(false, self.id_header())] }
    }

    /// Whether the client waits for the answer before sending a body: a method without a
    /// request body, an upgrade (WebSocket) or a tunnel.
    fn answered_before_body(&self) -> bool {
        let method = |m: &str| self.method.eq_ignore_ascii_case(m);
        method("GET") || method("HEAD") || method("CONNECT") || self.headers.iter().any(|(k, _)| k == "upgrade")
    }

    fn request_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        if self.passthrough {
            return if self.request_full_duplex {
                vec![reply::streamed_body(false, b.body, b.end_of_stream)]
            } else {
                vec![reply::continue_body(false)]
            };
        }
        if self.body.len() + b.body.len() > self.max_body {
            return self.fail(RouteError::PayloadTooLarge(self.max_body));
        }
        if self.body.is_empty() {
            self.body = b.body;
        } else {
            self.body.extend_from_slice(&b.body);
        }
        if !b.end_of_stream && !self.request_whole_body {
            if let Some(mode) = self.request_pieces_unroutable {
                // The route would come too late: refused clearly, not sent on unrouted.
                return self.fail(RouteError::BodyMode(mode));
            }
            // Streamed modes answer every message; full duplex answers once at the end.
            return if self.request_full_duplex { Vec::new() } else { vec![reply::continue_body(false)] };
        }
        let parse = if self.router.renders_chat() { request::parse_keeping_messages } else { request::parse };
        let parsed = match ApiKind::from_path(&self.path) {
            Some(kind) => match parse(kind, &self.body) {
                Ok(r) => {
                    self.model.clone_from(&r.model);
                    Some(r)
                }
                Err(e) => return self.fail(e.into()),
            },
            None if self.method.eq_ignore_ascii_case("GET") || self.method.eq_ignore_ascii_case("HEAD") => None,
            None => return self.fail(RouteError::UnknownPath(self.path.clone())),
        };
        let inference = parsed.is_some();
        let req = request::for_scheduling(&self.request_id, &self.headers, parsed);
        // Inference requests go through flow control (when on); anything else is routed.
        let placed = if inference {
            self.router.place(req, self.subset.as_deref(), self.body.len() as u64)
        } else {
            self.router.route(req, self.subset.as_deref()).map(|r| Placement::Routed(Box::new(r)))
        };
        match placed {
            Ok(Placement::Routed(routed)) => self.resume(Ok(*routed)),
            Ok(Placement::Queued(ticket)) => {
                debug!(request_id = %self.request_id, "request queued by flow control");
                self.ticket = Some(ticket);
                Vec::new()
            }
            Err(e) => self.fail(e),
        }
    }

    /// Request trailers. In full-duplex mode they, not a body chunk, mark the body's end. The
    /// request is refused then, at once and with a clear error, not left to Envoy's message
    /// timeout: Envoy (1.40) forwards a body answer twice when the request's trailers come
    /// after it, so such a request cannot reach the worker intact. In `BUFFERED` mode the body
    /// was already routed. A request with nothing routed by its trailers (no body, or the
    /// partial body modes) is refused likewise: a trailers answer cannot carry a route.
    fn request_trailers(&mut self) -> Vec<ProcessingResponse> {
        if self.finished || self.routed.is_some() || self.ticket.is_some() {
            return vec![reply::continue_trailers(false)];
        }
        if self.body.is_empty() && ApiKind::from_path(&self.path).is_some() {
            return self.fail(RouteError::BadRequest(request::RequestError::EmptyBody));
        }
        self.fail(RouteError::BadRequest(request::RequestError::Trailers))
    }

    /// A request that waited in flow control's queue: returns the ticket to await, once.
    pub fn take_ticket(&mut self) -> Option<Ticket> {
        self.ticket.take()
    }

    /// Answers a request whose body has arrived, once it is routed (at once or after
    /// waiting in the queue) or refused.
    pub fn resume(&mut self, routing: Routing) -> Vec<ProcessingResponse> {
        let dest = match routing {
            Ok((routed, job)) => self.accept(routed, job),
            Err(e) => return self.fail(e),
        };
        if !self.request_full_duplex {
            return vec![reply::route_request_body(&dest, self.id_header())];
        }
        let body = std::mem::take(&mut self.body);
        let mut out = Vec::with_capacity(2 + body.len() / reply::BODY_CHUNK);
        out.push(reply::route_request_headers(&dest, self.id_header()));
        if body.len() <= reply::BODY_CHUNK {
            out.push(reply::streamed_body(false, body, true));
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
        let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        self.status = get(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        if let Some(r) = self.routed.as_mut() {
            r.answered(self.status);
        }
        self.usage = Some(UsageTracker::new(get("content-type")));
        // The client always learns the id its request was logged and scheduled under (and,
        // if the experiment says so, the variant that routed it, and what plugins add).
        let mut extra = vec![reply::header("x-request-id", &self.request_id)];
        if let Some(r) = &self.routed {
            if r.name_variant {
                extra.push(reply::header(crate::experiment::VARIANT_HEADER, &r.variant_name));
            }
            extra.extend(r.response_headers.iter().map(|(k, v)| reply::header(k, v)));
        }
        if h.end_of_stream {
            self.complete();
        }
        vec![reply::continue_headers(true, extra)]
    }

    fn response_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        if !b.body.is_empty()
            && let Some(r) = self.routed.as_mut()
        {
            r.first_chunk();
        }
        if let Some(t) = self.usage.as_mut() {
            t.feed(&b.body);
        }
        let end = b.end_of_stream;
        let answer = if self.response_full_duplex {
            reply::streamed_body(true, b.body, end)
        } else {
            reply::continue_body(true)
        };
        if end {
            self.complete();
        }
        vec![answer]
    }

    /// The response ended: the request's life ends as completed, with the usage found.
    fn complete(&mut self) {
        if let Some(mut routed) = self.routed.take() {
            let usage = self.usage.take().and_then(UsageTracker::finish);
            debug!(request_id = %self.request_id, status = self.status, ?usage, "response complete");
            routed.finish(Ending { outcome: Outcome::Completed, status: self.status, usage });
        }
    }

    /// Takes a routed request on; returns the destination header's value.
    fn accept(&mut self, routed: Routed, shadows: Option<ShadowJob>) -> String {
        let dest = destination(&routed);
        debug!(request_id = %self.request_id, path = %self.path, endpoint = %dest, cycle = routed.cycle, "request routed");
        if let Some(job) = shadows {
            // Shadows score after the decision, on their own thread: never on this request's path.
            tokio::task::spawn_blocking(move || Router::run_shadows(job));
        }
        self.routed = Some(routed);
        dest
    }

    fn fail(&mut self, e: RouteError) -> Vec<ProcessingResponse> {
        let r = e.reply();
        self.router.record_error(&self.model, &e);
        warn!(request_id = %self.request_id, path = %self.path, status = r.status, error = %e, "request rejected");
        self.finished = true;
        vec![reply::immediate(&r, &self.request_id)]
    }

    /// The request id header to add, when the EPP made the id up.
    fn id_header(&self) -> Vec<HeaderValueOption> {
        if self.generated_id { vec![reply::header("x-request-id", &self.request_id)] } else { Vec::new() }
    }
}

fn destination(r: &Routed) -> String {
    match r.targets.as_slice() {
        [one] => one.to_string(),
        many => many.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","),
    }
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
