//! The Envoy external-processing (ext_proc v3) gRPC service: the only module that names
//! Envoy types. Each gRPC stream is one HTTP request; `stream` holds its state machine and
//! `reply` builds the messages. Routing decisions come from `routing::Router`.

pub mod reply;
mod stream;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

pub use reply::DESTINATION_HEADER;
pub use stream::DEFAULT_MAX_BODY_BYTES;

use crate::routing::Router;

/// The gRPC service name Envoy health-checks.
pub const SERVICE_NAME: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

pub struct ExtProc {
    router: Arc<Router>,
    max_body: usize,
}

impl ExtProc {
    pub fn new(router: Arc<Router>, max_body: usize) -> Self {
        ExtProc { router, max_body }
    }

    /// The gRPC service. Its message limit follows the body cap: in the buffered modes Envoy
    /// sends a whole body as one message, which tonic's default (4 MiB) would refuse before
    /// the cap could answer 413.
    pub fn into_server(self) -> ExternalProcessorServer<ExtProc> {
        let limit = self.max_body.saturating_add(1 << 20);
        ExternalProcessorServer::new(self).max_decoding_message_size(limit).max_encoding_message_size(limit)
    }
}

/// How the ext_proc server notices a data plane gone without closing its connection (a
/// crashed or partitioned Envoy host sends no FIN or RST): an HTTP/2 PING after `interval`
/// of quiet, and the connection closed when one is not acknowledged within `timeout`. Its
/// streams then end as cancelled, so their requests' load is released.
#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive { interval: std::time::Duration::from_secs(30), timeout: std::time::Duration::from_secs(20) }
    }
}

impl Keepalive {
    /// `builder` with these HTTP/2 keepalive settings.
    pub fn apply(self, builder: tonic::transport::Server) -> tonic::transport::Server {
        builder.http2_keepalive_interval(Some(self.interval)).http2_keepalive_timeout(Some(self.timeout))
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProc {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        // The answers are produced as tonic polls for them: no task or channel per stream,
        // so a message costs no extra wake-up between threads.
        let conn = Conn {
            inbound: request.into_inner(),
            state: stream::StreamState::new(self.router.clone(), self.max_body),
            out: VecDeque::new(),
            multi_thread: tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread,
        };
        let out = futures::stream::unfold(conn, |mut conn| async move {
            loop {
                if let Some(answer) = conn.out.pop_front() {
                    return Some((Ok(answer), conn));
                }
                if conn.state.finished {
                    return None;
                }
                let msg = match conn.inbound.next().await? {
                    Ok(m) => m,
                    Err(status) => {
                        // Envoy closed or reset the stream (client gone): nothing to answer.
                        debug!(%status, "ext_proc stream ended by the data plane");
                        return None;
                    }
                };
                conn.answer(msg).await?;
            }
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// One ext_proc stream: Envoy's messages, the request's state, the answers not yet sent.
struct Conn {
    inbound: Streaming<ProcessingRequest>,
    state: stream::StreamState,
    out: VecDeque<ProcessingResponse>,
    /// Whether `block_in_place` is available (a multi-thread runtime).
    multi_thread: bool,
}

impl Conn {
    /// Handles one message, queueing its answers; `None` when the stream is over.
    async fn answer(&mut self, msg: ProcessingRequest) -> Option<()> {
        // A large prompt's decision runs where it cannot stall other streams.
        let answers = if self.multi_thread && self.state.heavy(&msg) {
            tokio::task::block_in_place(|| self.state.handle(msg))
        } else {
            self.state.handle(msg)
        };
        self.out.extend(answers);
        let Some(mut ticket) = self.state.take_ticket() else { return Some(()) };
        // Queued by flow control: wait for the answer while watching the stream. If it ends
        // (client gone), the ticket is dropped, which takes the request out of the queue at
        // once. Messages meanwhile wait their turn.
        let mut held = Vec::new();
        let routing = loop {
            tokio::select! {
                r = ticket.wait() => break r,
                m = self.inbound.next() => match m {
                    Some(Ok(m)) => held.push(m),
                    _ => {
                        debug!("ext_proc stream ended while its request was queued");
                        return None;
                    }
                },
            }
        };
        self.out.extend(self.state.resume(routing));
        for msg in held {
            self.out.extend(self.state.handle(msg));
        }
        Some(())
    }
}
