//! The floor of the ext_proc path: an ext_proc server that makes no decision. It answers
//! Envoy's messages in the order and shapes the EPP does in full-duplex mode (the request's
//! headers answered with a destination once its body has arrived, the body streamed back,
//! the response passed through piece by piece) and picks the workers in turn. Run behind
//! the guide's Envoy config it measures what Envoy and one gRPC round trip per message cost
//! by themselves; the EPP's path over that is the EPP's own part.
//!
//! It runs as its own process (`epp-bench --serve-null-ext-proc PORT --null-destinations
//! …`) so that its CPU time is measured apart from the load generator's, as the EPP's is.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use epp::ext_proc::reply;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

struct NullExtProc {
    destinations: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
}

type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

/// One stream's state: the request body so far.
struct Conn {
    inbound: Streaming<ProcessingRequest>,
    body: Vec<u8>,
    destination: String,
    pending: VecDeque<ProcessingResponse>,
}

impl Conn {
    /// The answers to one message (none while the request's body is still coming).
    fn answer(&mut self, msg: ProcessingRequest) -> Vec<ProcessingResponse> {
        match msg.request {
            Some(Msg::RequestHeaders(h)) if h.end_of_stream => {
                vec![reply::route_request_headers(&self.destination, Vec::new())]
            }
            Some(Msg::RequestHeaders(_)) => Vec::new(),
            Some(Msg::RequestBody(b)) => {
                self.body.extend_from_slice(&b.body);
                if !b.end_of_stream {
                    return Vec::new();
                }
                vec![
                    reply::route_request_headers(&self.destination, Vec::new()),
                    reply::streamed_body(false, std::mem::take(&mut self.body), true),
                ]
            }
            Some(Msg::RequestTrailers(_)) => vec![reply::continue_trailers(false)],
            Some(Msg::ResponseHeaders(_)) => vec![reply::continue_headers(true, Vec::new())],
            Some(Msg::ResponseBody(b)) => vec![reply::streamed_body(true, b.body, b.end_of_stream)],
            Some(Msg::ResponseTrailers(_)) => vec![reply::continue_trailers(true)],
            None => Vec::new(),
        }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for NullExtProc {
    type ProcessStream = Answers;

    async fn process(&self, request: Request<Streaming<ProcessingRequest>>) -> Result<Response<Answers>, Status> {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        let destination = self.destinations[k % self.destinations.len()].clone();
        let conn = Conn { inbound: request.into_inner(), body: Vec::new(), destination, pending: VecDeque::new() };
        let out = futures::stream::unfold(conn, |mut conn| async move {
            loop {
                if let Some(first) = conn.pending.pop_front() {
                    return Some((Ok(first), conn));
                }
                let msg = conn.inbound.next().await?.ok()?;
                let answers = conn.answer(msg);
                conn.pending.extend(answers);
            }
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Serves the null ext_proc (and gRPC health, as Envoy's health check asks) on
/// 127.0.0.1:`port` until the process is killed.
pub async fn serve(port: u16, destinations: Vec<String>) -> anyhow::Result<()> {
    anyhow::ensure!(!destinations.is_empty(), "--null-destinations names no worker");
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status(epp::ext_proc::SERVICE_NAME, tonic_health::ServingStatus::Serving).await;
    let service = NullExtProc { destinations: Arc::new(destinations), next: Arc::new(AtomicUsize::new(0)) };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(ExternalProcessorServer::new(service))
        .serve(([127, 0, 0, 1], port).into())
        .await?;
    Ok(())
}
