//! The Envoy external-processing (ext_proc v3) gRPC service: the only module that names
//! Envoy types. Each gRPC stream is one HTTP request; `stream` holds its state machine and
//! `reply` builds the messages. Routing decisions come from `routing::Router`.

mod reply;
pub mod stream;

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
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

    pub fn into_server(self) -> ExternalProcessorServer<ExtProc> {
        ExternalProcessorServer::new(self)
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
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<ProcessingResponse, Status>>(64);
        let mut state = stream::StreamState::new(self.router.clone(), self.max_body);
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(status) => {
                        // Envoy closed or reset the stream (client gone): nothing to answer.
                        debug!(%status, "ext_proc stream ended by the data plane");
                        break;
                    }
                };
                // A large prompt's decision runs where it cannot stall other streams.
                let multi_thread =
                    tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
                let mut answers = if multi_thread && state.heavy(&msg) {
                    tokio::task::block_in_place(|| state.handle(msg))
                } else {
                    state.handle(msg)
                };
                let mut held = Vec::new();
                if let Some(mut ticket) = state.take_ticket() {
                    // Queued by flow control: wait for the answer while watching the stream.
                    // If it ends (client gone), the ticket is dropped, which takes the
                    // request out of the queue at once. Messages meanwhile wait their turn.
                    let routing = loop {
                        tokio::select! {
                            r = ticket.wait() => break Some(r),
                            m = inbound.next() => match m {
                                Some(Ok(m)) => held.push(m),
                                _ => break None,
                            },
                        }
                    };
                    let Some(routing) = routing else {
                        debug!("ext_proc stream ended while its request was queued");
                        return;
                    };
                    answers.extend(state.resume(routing));
                }
                for answer in answers {
                    if tx.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
                for msg in held {
                    for answer in state.handle(msg) {
                        if tx.send(Ok(answer)).await.is_err() {
                            return;
                        }
                    }
                }
                if state.finished {
                    break;
                }
            }
        });
        let out = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out)))
    }
}
