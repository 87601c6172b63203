//! The ext_proc protocol spoken directly (no Envoy): a gRPC client plays the data plane
//! against the in-process service, to check the wire details Envoy alone cannot easily
//! provoke — subset hints, the body cap, body-less requests, re-chunking, buffered mode,
//! request and response trailers.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, ProtocolConfiguration, body_mutation,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value};
use epp::config::PickerConfig;
use epp::datastore::Datastore;
use epp::discovery::EndpointSpec;
use epp::ext_proc::ExtProc;
use epp::routing::Router;
use tokio_stream::StreamExt;

use crate::common::runtime;

async fn server(endpoints: usize, max_body: usize) -> String {
    server_with(endpoints, max_body, epp::ext_proc::Keepalive::default()).await.0
}

/// An ext_proc server with the given keepalive; its URL and router.
async fn server_with(endpoints: usize, max_body: usize, keepalive: epp::ext_proc::Keepalive) -> (String, Arc<Router>) {
    let config = PickerConfig::default_config().unwrap();
    let scheduler = epp::loader::build(runtime(), &config, &Default::default()).unwrap().scheduler;
    let ds = Arc::new(Datastore::new());
    let specs: Vec<EndpointSpec> = (0..endpoints)
        .map(|i| EndpointSpec {
            name: format!("e{i}"),
            namespace: "default".into(),
            address: "10.0.0.1".parse().unwrap(),
            port: 8000 + i as u16,
            metrics_port: None,
            labels: Default::default(),
        })
        .collect();
    let (snap, _) = ds.set_pool(&specs);
    scheduler.pool_changed(snap.generation, &snap.infos());
    let router = Arc::new(Router::new(ds, scheduler, epp::telemetry::Telemetry::new("test")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = ExtProc::new(router.clone(), max_body).into_server();
    tokio::spawn(
        keepalive
            .apply(tonic::transport::Server::builder())
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), router)
}

fn headers(method: &str, path: &str, end_of_stream: bool) -> HttpHeaders {
    let h = |k: &str, v: &str| HeaderValue { key: k.into(), raw_value: v.as_bytes().to_vec(), ..Default::default() };
    HttpHeaders {
        headers: Some(HeaderMap { headers: vec![h(":method", method), h(":path", path), h("x-request-id", "wire-1")] }),
        end_of_stream,
        ..Default::default()
    }
}

fn msg(m: Msg) -> ProcessingRequest {
    ProcessingRequest { request: Some(m), ..Default::default() }
}

fn with_mode(mut r: ProcessingRequest, mode: BodySendMode) -> ProcessingRequest {
    r.protocol_config = Some(ProtocolConfiguration { request_body_mode: mode as i32, ..Default::default() });
    r
}

fn subset_hint(r: &mut ProcessingRequest, addrs: &[&str]) {
    let list = ListValue {
        values: addrs.iter().map(|a| Value { kind: Some(value::Kind::StringValue(a.to_string())) }).collect(),
    };
    let s = Struct {
        fields: [(
            "x-gateway-destination-endpoint-subset".to_string(),
            Value { kind: Some(value::Kind::ListValue(list)) },
        )]
        .into(),
    };
    r.metadata_context =
        Some(Metadata { filter_metadata: [("envoy.lb.subset_hint".to_string(), s)].into(), ..Default::default() });
}

fn body(b: &[u8], end_of_stream: bool) -> ProcessingRequest {
    msg(Msg::RequestBody(HttpBody { body: b.to_vec(), end_of_stream, ..Default::default() }))
}

/// Sends `msgs`, then collects `expect` answers.
async fn exchange(url: &str, msgs: Vec<ProcessingRequest>, expect: usize) -> Vec<ProcessingResponse> {
    let mut client = ExternalProcessorClient::connect(url.to_string()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    let mut answers = client.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut out = Vec::new();
    while out.len() < expect {
        match tokio::time::timeout(std::time::Duration::from_secs(10), answers.next()).await {
            Ok(Some(Ok(r))) => out.push(r),
            other => panic!("stream ended after {} answers: {other:?}", out.len()),
        }
    }
    drop(tx);
    out
}

/// The destination header set by a headers/body answer.
fn destination(r: &ProcessingResponse) -> Option<String> {
    let common = match r.response.as_ref()? {
        Resp::RequestHeaders(h) => h.response.as_ref()?,
        Resp::RequestBody(b) => b.response.as_ref()?,
        _ => return None,
    };
    let set = &common.header_mutation.as_ref()?.set_headers;
    let dest = set
        .iter()
        .filter_map(|o| o.header.as_ref())
        .find(|h| h.key == epp::ext_proc::DESTINATION_HEADER)
        .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned())?;
    assert!(common.clear_route_cache, "a routing answer must clear the route cache");
    Some(dest)
}

fn immediate_status(r: &ProcessingResponse) -> (i32, String) {
    match r.response.as_ref() {
        Some(Resp::ImmediateResponse(i)) => {
            (i.status.as_ref().unwrap().code, String::from_utf8_lossy(&i.body).into_owned())
        }
        other => panic!("expected an immediate response, got {other:?}"),
    }
}

const BODY: &[u8] = br#"{"model":"m","prompt":"hello"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_duplex_routes_and_streams_the_body_back_rechunked() {
    let url = server(3, 1 << 20).await;
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(150_000));
    let (a, b) = big.as_bytes().split_at(70_000);
    let first = with_mode(
        msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false))),
        BodySendMode::FullDuplexStreamed,
    );
    // 150 KB comes back as 64 KiB pieces: headers answer + 3 body answers.
    let out = exchange(&url, vec![first, body(a, false), body(b, true)], 4).await;
    let dest = destination(&out[0]).expect("destination header");
    assert!(dest.starts_with("10.0.0.1:800"), "{dest}");
    let lb = out[0].dynamic_metadata.as_ref().and_then(|m| m.fields.get("envoy.lb")).expect("envoy.lb metadata");
    assert!(format!("{lb:?}").contains(&dest));
    let mut echoed = Vec::new();
    for (i, r) in out[1..].iter().enumerate() {
        let Some(Resp::RequestBody(b)) = &r.response else { panic!("body answer expected: {r:?}") };
        let m = b.response.as_ref().unwrap().body_mutation.as_ref().unwrap().mutation.as_ref().unwrap();
        let body_mutation::Mutation::StreamedResponse(s) = m else { panic!("streamed mutation expected") };
        assert_eq!(s.end_of_stream, i == 2, "end_of_stream only on the last piece");
        echoed.extend_from_slice(&s.body);
    }
    assert_eq!(echoed, big.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_hint_restricts_candidates() {
    let url = server(3, 1 << 20).await;
    let mut first = msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false)));
    subset_hint(&mut first, &["10.0.0.1:8002"]);
    let out = exchange(&url, vec![first, body(BODY, true)], 2).await;
    assert_eq!(destination(&out[0]).as_deref(), Some("10.0.0.1:8002"));

    let mut first = msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false)));
    subset_hint(&mut first, &["10.9.9.9:1"]);
    let out = exchange(&url, vec![first, body(BODY, true)], 1).await;
    let (status, text) = immediate_status(&out[0]);
    assert_eq!(status, 503);
    assert!(text.starts_with("inference error: ServiceUnavailable - "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let url = server(2, 1024).await;
    let first = msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false)));
    let out = exchange(&url, vec![first, body(&[b' '; 800], false), body(&[b' '; 800], false)], 1).await;
    let (status, text) = immediate_status(&out[0]);
    assert_eq!(status, 413);
    assert!(text.contains("PayloadTooLarge"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodyless_requests_are_answered_at_the_headers() {
    let url = server(2, 1 << 20).await;
    // GET without a body: routed at once.
    let out = exchange(&url, vec![msg(Msg::RequestHeaders(headers("GET", "/v1/models", true)))], 1).await;
    assert!(destination(&out[0]).is_some(), "{:?}", out[0]);
    // An inference POST without a body: 400 at once, not a hang.
    let out = exchange(&url, vec![msg(Msg::RequestHeaders(headers("POST", "/v1/completions", true)))], 1).await;
    assert_eq!(immediate_status(&out[0]).0, 400);
    // An unknown path with a body: 404.
    let first = msg(Msg::RequestHeaders(headers("POST", "/v2/whatever", false)));
    let out = exchange(&url, vec![first, body(BODY, true)], 1).await;
    assert_eq!(immediate_status(&out[0]).0, 404);
}

/// A request whose client waits for the answer before sending any body (a WebSocket
/// upgrade, a `GET` that leaves its stream open) is routed at its headers, in full duplex
/// as in the buffered modes, and whatever body follows passes through as it comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_answered_before_their_body_are_routed_at_the_headers() {
    let url = server(2, 1 << 20).await;
    let mut upgrade = headers("GET", "/v1/realtime", false);
    if let Some(map) = upgrade.headers.as_mut() {
        map.headers.push(HeaderValue { key: "upgrade".into(), raw_value: b"websocket".to_vec(), ..Default::default() });
    }
    for mode in [BodySendMode::FullDuplexStreamed, BodySendMode::Buffered] {
        let first = with_mode(msg(Msg::RequestHeaders(upgrade.clone())), mode);
        // Only the headers: the client waits for the answer.
        let out = exchange(&url, vec![first.clone()], 1).await;
        assert!(destination(&out[0]).is_some(), "{mode:?}: {:?}", out[0]);
        // Frames after the upgrade pass through, each as it comes.
        let out = exchange(&url, vec![first, body(b"frame-1", false), body(b"frame-2", true)], 3).await;
        for (r, want) in out[1..].iter().zip([&b"frame-1"[..], b"frame-2"]) {
            let Some(Resp::RequestBody(b)) = &r.response else { panic!("{mode:?}: body answer expected: {r:?}") };
            let mutation = b.response.as_ref().and_then(|c| c.body_mutation.as_ref()).and_then(|m| m.mutation.as_ref());
            match (mode, mutation) {
                (BodySendMode::FullDuplexStreamed, Some(body_mutation::Mutation::StreamedResponse(s))) => {
                    assert_eq!(s.body, want)
                }
                (BodySendMode::Buffered, None) => {}
                other => panic!("unexpected body answer {other:?}"),
            }
        }
    }
    // A plain GET whose stream stays open is routed at once too.
    let first = msg(Msg::RequestHeaders(headers("GET", "/v2/whatever", false)));
    let out = exchange(&url, vec![first], 1).await;
    assert!(destination(&out[0]).is_some(), "a GET with an open stream is routed at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_mode_routes_on_the_body_answer() {
    let url = server(2, 1 << 20).await;
    let first = with_mode(msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false))), BodySendMode::Buffered);
    let out = exchange(&url, vec![first, body(BODY, true)], 2).await;
    assert!(matches!(out[0].response, Some(Resp::RequestHeaders(_))));
    assert!(destination(&out[0]).is_none(), "headers pass untouched in buffered mode");
    assert!(matches!(out[1].response, Some(Resp::RequestBody(_))));
    assert!(destination(&out[1]).is_some(), "the route rides on the body answer");

    // A buffered body comes as one message: 6 MiB (over gRPC's usual 4 MiB) under a 16 MiB
    // cap is routed; over the cap it gets 413, not a broken stream.
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(6 << 20));
    let url = server(2, 16 << 20).await;
    let first = with_mode(msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false))), BodySendMode::Buffered);
    let out = exchange(&url, vec![first, body(big.as_bytes(), true)], 2).await;
    assert!(destination(&out[1]).is_some(), "{:?}", out[1].response.as_ref().map(|_| "not routed"));
    let url = server(2, (11 << 20) / 2).await;
    let first = with_mode(msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false))), BodySendMode::Buffered);
    let out = exchange(&url, vec![first, body(big.as_bytes(), true)], 2).await;
    assert_eq!(immediate_status(&out[1]).0, 413);

    // When trailers follow, Envoy's one `BUFFERED` body message has no end of stream; it is
    // still the whole body, and routed. The trailers are then let through.
    let url = server(2, 1 << 20).await;
    let first = with_mode(msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false))), BodySendMode::Buffered);
    let trailers = msg(Msg::RequestTrailers(Default::default()));
    let out = exchange(&url, vec![first, body(BODY, false), trailers], 3).await;
    assert!(destination(&out[1]).is_some(), "the whole body is routed before its trailers");
    assert!(matches!(out[2].response, Some(Resp::RequestTrailers(_))), "{:?}", out[2].response);
    // Trailers with no body before them: nothing can be routed on a trailers answer, so the
    // request gets a clear 400 at once.
    let first = with_mode(msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false))), BodySendMode::Buffered);
    let trailers = msg(Msg::RequestTrailers(Default::default()));
    let out = exchange(&url, vec![first, trailers], 2).await;
    let (status, text) = immediate_status(&out[1]);
    assert_eq!(status, 400);
    assert!(text.contains("body is empty"), "{text}");
}

/// `STREAMED` and `BUFFERED_PARTIAL` request body modes: a body in one message is routed,
/// but a body in pieces cannot be (Envoy has moved on by its end), so it gets a clear 500
/// naming the modes that work, not an unrouted request (Envoy's "no healthy upstream").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_in_pieces_in_the_partial_modes_gets_a_clear_error() {
    let url = server(2, 1 << 20).await;
    for mode in [BodySendMode::Streamed, BodySendMode::BufferedPartial] {
        let first = with_mode(msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false))), mode);
        let out = exchange(&url, vec![first, body(BODY, true)], 2).await;
        assert!(destination(&out[1]).is_some(), "{mode:?}: one whole body message is routed");
        let (a, b) = BODY.split_at(BODY.len() / 2);
        let first = with_mode(msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false))), mode);
        let out = exchange(&url, vec![first, body(a, false), body(b, true)], 2).await;
        let (status, text) = immediate_status(&out[1]);
        assert_eq!(status, 500, "{mode:?}");
        assert!(text.contains("FULL_DUPLEX_STREAMED") && text.contains(mode.as_str_name()), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_get_a_clear_400_not_a_hang() {
    let url = server(2, 1 << 20).await;
    // The last body chunk carries no end of stream: the trailers say the body is complete.
    let first = with_mode(
        msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false))),
        BodySendMode::FullDuplexStreamed,
    );
    let trailers = msg(Msg::RequestTrailers(Default::default()));
    let out = exchange(&url, vec![first, body(BODY, false), trailers], 1).await;
    let (status, text) = immediate_status(&out[0]);
    assert_eq!(status, 400);
    assert!(text.contains("request trailers are not supported"), "{text}");
}

/// A response that ends with trailers (gRPC-style upstreams, HTTP/2 workers) is complete at
/// its trailers: they are answered and the request's load is released while the stream is
/// still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_end_the_request_and_release_its_load() {
    use std::time::Duration;
    let (url, router) = server_with(2, 1 << 20, epp::ext_proc::Keepalive::default()).await;
    let mut client = ExternalProcessorClient::connect(url).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    // Full duplex both ways (the default, as the guide's Envoy config): the headers are
    // answered with the body.
    tx.send(msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false)))).await.unwrap();
    tx.send(body(BODY, true)).await.unwrap();
    let mut answers = client.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    // Reads answers until one satisfies `done`.
    let mut until = async |what: &str, done: fn(&ProcessingResponse) -> bool| loop {
        match tokio::time::timeout(Duration::from_secs(10), answers.next()).await {
            Ok(Some(Ok(r))) if done(&r) => return r,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no {what}: {other:?}"),
        }
    };
    until("routing answer", |r| destination(r).is_some()).await;
    assert_eq!(router.in_flight(), 1);
    let status = HeaderValue { key: ":status".into(), raw_value: b"200".to_vec(), ..Default::default() };
    let response_headers =
        HttpHeaders { headers: Some(HeaderMap { headers: vec![status] }), end_of_stream: false, ..Default::default() };
    tx.send(msg(Msg::ResponseHeaders(response_headers))).await.unwrap();
    let answer = br#"{"choices":[{"text":"hi"}],"usage":{"prompt_tokens":2,"completion_tokens":1}}"#;
    let chunk = HttpBody { body: answer.to_vec(), end_of_stream: false, ..Default::default() };
    tx.send(msg(Msg::ResponseBody(chunk))).await.unwrap();
    until("response body answer", |r| matches!(r.response, Some(Resp::ResponseBody(_)))).await;
    assert_eq!(router.in_flight(), 1, "no end of stream yet");
    tx.send(msg(Msg::ResponseTrailers(Default::default()))).await.unwrap();
    until("trailers answer", |r| matches!(r.response, Some(Resp::ResponseTrailers(_)))).await;
    assert_eq!(router.in_flight(), 0, "the trailers completed the request; the stream is still open");
    drop(tx);
}

/// A data plane that goes away without closing its connection (host crashed, network cut):
/// the keepalive PING goes unanswered, the connection is closed, and the routed request's
/// load is released instead of being counted forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_data_plane_is_dropped_and_its_requests_released() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    let keepalive =
        epp::ext_proc::Keepalive { interval: Duration::from_millis(200), timeout: Duration::from_millis(300) };
    let (url, router) = server_with(2, 1 << 20, keepalive).await;
    let upstream: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    // A proxy that forwards until told to go silent: then it neither forwards nor closes.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let silent = Arc::new(AtomicBool::new(false));
    let gate = silent.clone();
    tokio::spawn(async move {
        let (client, _) = proxy.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        tokio::join!(pipe(cr, sw, gate.clone()), pipe(sr, cw, gate));
    });
    let mut client = ExternalProcessorClient::connect(proxy_url).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(msg(Msg::RequestHeaders(headers("POST", "/v1/completions", false)))).await.unwrap();
    tx.send(body(BODY, true)).await.unwrap();
    let mut answers = client.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = answers.next().await.unwrap().unwrap();
    assert!(destination(&first).is_some(), "routed");
    assert_eq!(router.in_flight(), 1, "the routed request is in flight");
    // The data plane goes silent mid-request, with the response never coming.
    silent.store(true, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while router.in_flight() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the request is still counted 10 s after its data plane went silent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(tx);
}

/// Copies `r` to `w` until `silent` is set; then drops what it reads and never closes `w`.
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    silent: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !silent.load(std::sync::atomic::Ordering::SeqCst) && w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Silence, not a close: the write half stays open.
    std::future::pending::<()>().await;
    drop(w);
}
