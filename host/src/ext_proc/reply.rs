//! Builders for the `ProcessingResponse` messages the EPP sends: header mutations, streamed
//! body pieces, pass-through answers and immediate (error) responses. Only shapes, no
//! decisions: `stream.rs` decides what to send.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse, ProcessingResponse,
    StreamedBodyResponse, TrailersResponse, body_mutation, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value};

use crate::routing::ErrorReply;

/// Header carrying the chosen endpoint(s) to Envoy's ORIGINAL_DST cluster.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// Dynamic metadata namespace read by Envoy's load balancer.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Request metadata namespace of the subset hint, and its key.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Largest body piece sent back in one message.
pub const BODY_CHUNK: usize = 64 << 10;

type Resp = processing_response::Response;

pub fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.to_string(), raw_value: value.as_bytes().to_vec(), ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn mutation(set: Vec<HeaderValueOption>) -> Option<HeaderMutation> {
    (!set.is_empty()).then(|| HeaderMutation { set_headers: set, remove_headers: Vec::new() })
}

fn common(set: Vec<HeaderValueOption>, clear_route_cache: bool, body: Option<BodyMutation>) -> CommonResponse {
    CommonResponse { header_mutation: mutation(set), clear_route_cache, body_mutation: body, ..Default::default() }
}

/// The request-headers answer that routes the request: destination header(s) set, route
/// cache cleared, and the destination in `envoy.lb` dynamic metadata.
pub fn route_request_headers(destination: &str, extra: Vec<HeaderValueOption>) -> ProcessingResponse {
    let mut set = vec![header(DESTINATION_HEADER, destination)];
    set.extend(extra);
    let lb = Struct {
        fields: [(DESTINATION_HEADER.to_string(), Value { kind: Some(value::Kind::StringValue(destination.into())) })]
            .into(),
    };
    let metadata =
        Struct { fields: [(LB_NAMESPACE.to_string(), Value { kind: Some(value::Kind::StructValue(lb)) })].into() };
    ProcessingResponse {
        response: Some(Resp::RequestHeaders(HeadersResponse { response: Some(common(set, true, None)) })),
        dynamic_metadata: Some(metadata),
        ..Default::default()
    }
}

/// A request-body answer carrying `headers` and the route (buffered modes: the decision is
/// made when the body arrives and rides on the body response).
pub fn route_request_body(destination: &str, extra: Vec<HeaderValueOption>) -> ProcessingResponse {
    let mut r = route_request_headers(destination, extra);
    if let Some(Resp::RequestHeaders(h)) = r.response.take() {
        r.response = Some(Resp::RequestBody(BodyResponse { response: h.response }));
    }
    r
}

/// Answers headers without changing anything (request or response side).
pub fn continue_headers(response_side: bool, extra: Vec<HeaderValueOption>) -> ProcessingResponse {
    let h = HeadersResponse { response: Some(common(extra, false, None)) };
    let response = if response_side { Resp::ResponseHeaders(h) } else { Resp::RequestHeaders(h) };
    ProcessingResponse { response: Some(response), ..Default::default() }
}

/// One piece of a streamed body (full-duplex mode), request or response side.
pub fn streamed_body(response_side: bool, body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    let piece = BodyMutation {
        mutation: Some(body_mutation::Mutation::StreamedResponse(StreamedBodyResponse {
            body,
            end_of_stream,
            ..Default::default()
        })),
    };
    let b = BodyResponse { response: Some(common(Vec::new(), false, Some(piece))) };
    let response = if response_side { Resp::ResponseBody(b) } else { Resp::RequestBody(b) };
    ProcessingResponse { response: Some(response), ..Default::default() }
}

/// A body answer that leaves the body as it is (buffered/streamed modes).
pub fn continue_body(response_side: bool) -> ProcessingResponse {
    let b = BodyResponse { response: Some(CommonResponse::default()) };
    let response = if response_side { Resp::ResponseBody(b) } else { Resp::RequestBody(b) };
    ProcessingResponse { response: Some(response), ..Default::default() }
}

pub fn continue_trailers(response_side: bool) -> ProcessingResponse {
    let t = TrailersResponse::default();
    let response = if response_side { Resp::ResponseTrailers(t) } else { Resp::RequestTrailers(t) };
    ProcessingResponse { response: Some(response), ..Default::default() }
}

/// Ends the request with an error status and the `inference error: …` body.
pub fn immediate(reply: &ErrorReply, request_id: &str) -> ProcessingResponse {
    let mut headers = vec![header("content-type", "text/plain; charset=utf-8"), header("x-request-id", request_id)];
    if let Some(reason) = reply.dropped_reason {
        headers.push(header(crate::flow::DROPPED_REASON_HEADER, reason));
    }
    ProcessingResponse {
        response: Some(Resp::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus { code: reply.status as i32 }),
            headers: mutation(headers),
            body: reply.body.clone().into_bytes(),
            details: "epp_rejected".into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The values of `namespace.key` in request metadata: a list of strings or one
/// comma-separated string.
pub fn metadata_strings(
    metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
    namespace: &str,
    key: &str,
) -> Option<Vec<String>> {
    let v = metadata?.filter_metadata.get(namespace)?.fields.get(key)?;
    match v.kind.as_ref()? {
        value::Kind::StringValue(s) => {
            Some(s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect())
        }
        value::Kind::ListValue(list) => Some(
            list.values
                .iter()
                .filter_map(|v| match &v.kind {
                    Some(value::Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}
