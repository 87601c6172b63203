//! End to end through real Envoy: client → Envoy → ext_proc (the `epp` binary) → the
//! simulated worker the EPP picked.

use std::time::Duration;

use crate::stack::{EnvoyConfig, Reply, Stack, completion, eventually, health_status};

/// Asserts the request reached the worker the EPP logged for it.
async fn assert_routed_as_picked(stack: &Stack, r: &Reply) {
    let id = &r.request_id;
    assert!(!id.is_empty(), "no x-request-id in the response: {r:?}");
    let worker = r.worker.as_deref().unwrap_or_else(|| panic!("request {id}: no x-sim-worker header"));
    let picked = stack.routed_to(id).await;
    assert_eq!(picked, stack.worker_by_name(worker).addr().to_string(), "request {id} went to {worker}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_kind_reaches_the_picked_worker() {
    let stack = Stack::start(3).await;
    let cases = [
        ("/v1/completions", r#"{"model":"m","prompt":"hello there","max_tokens":3}"#),
        ("/v1/chat/completions", r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#),
        ("/v1/responses", r#"{"model":"m","input":"hi"}"#),
        ("/v1/embeddings", r#"{"model":"m","input":"embed me"}"#),
    ];
    for (i, (path, body)) in cases.iter().enumerate() {
        let id = format!("kind-{i}");
        let r = stack.post(path, &id, body).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_routed_as_picked(&stack, &r).await;
    }
    // A request without a body (GET) is routed too.
    let r = stack.client.get(stack.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-sim-worker"));
    // The health port reports the ext_proc service too (the ext_proc port speaks TLS here;
    // it is checked in plaintext with the guide's config below).
    assert_eq!(health_status(stack.health_port, epp::ext_proc::SERVICE_NAME).await.as_deref(), Some("SERVING"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_through_with_usage() {
    let stack = Stack::start(2).await;
    let body = r#"{"model":"m","messages":[{"role":"user","content":"stream please"}],"max_tokens":5,"stream":true,"stream_options":{"include_usage":true}}"#;
    let r = stack.post("/v1/chat/completions", "sse-1", body).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.content_type.starts_with("text/event-stream"), "{r:?}");
    let events: Vec<&str> = r.body.lines().filter(|l| l.starts_with("data:")).collect();
    assert!(events.len() >= 5, "expected a token per event: {}", r.body);
    assert!(r.body.contains("\"usage\""), "usage missing: {}", r.body);
    assert_eq!(events.last().map(|l| l.trim()), Some("data: [DONE]"));
    assert_routed_as_picked(&stack, &r).await;
}

/// Sends `body` to `path` over HTTP/2 with request id `id`, ending the body with trailers;
/// returns the status, the worker that answered (if one did), the request id the EPP
/// answered with, and the response body.
async fn post_with_trailers(
    stack: &Stack,
    path: &str,
    id: &str,
    body: String,
) -> (u16, Option<String>, String, String) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.listener)).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2c handshake with Envoy");
    tokio::spawn(conn);
    let request = http::Request::post(stack.url(path))
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(body.into(), false).unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "abc".parse().unwrap());
    send.send_trailers(trailers).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), response)
        .await
        .expect("no answer within 20 s: the trailers were not seen as the body's end")
        .unwrap();
    let status = response.status().as_u16();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let worker = header("x-sim-worker");
    let request_id = header("x-request-id").unwrap_or_default();
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    (status, worker, request_id, String::from_utf8_lossy(&text).into_owned())
}

/// An HTTP/2 client whose request body ends with trailers: with the Envoy configs'
/// `request_trailer_mode: SEND`, the trailers (not a body chunk) mark the body's end. Envoy
/// would forward the EPP's body answer twice then, so the request gets a clear 400 at once
/// rather than a duplicated body or a wait for Envoy's message timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_ended_by_trailers_gets_a_clear_400() {
    let stack = Stack::start(2).await;
    let (status, worker, _, text) =
        post_with_trailers(&stack, "/v1/completions", "trailers-1", completion("hello with trailers", 3)).await;
    assert!(worker.is_none(), "no worker may get a trailer-ended body");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("request trailers are not supported"), "{text}");
    // The same stack still routes ordinary requests.
    let r = stack.post("/v1/completions", "after-trailers", &completion("plain", 2)).await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// In the buffered modes (request body `BUFFERED`, response body `STREAMED`) Envoy sends
/// the whole body in one message and holds the headers until it is answered: requests are
/// routed, SSE streams through, and a body that ends with trailers is routed as well (its
/// one body message is the whole body) and reaches the worker intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_modes_route_every_request_including_trailer_ended_ones() {
    let stack = Stack::start_with(2, EnvoyConfig::Buffered, |_| {}).await;
    let r = stack.post("/v1/completions", "buffered-1", &completion("hello buffered", 4)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_routed_as_picked(&stack, &r).await;
    let body = r#"{"model":"m","prompt":"stream buffered","max_tokens":4,"stream":true}"#;
    let r = stack.post("/v1/completions", "buffered-2", body).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.trim_end().ends_with("data: [DONE]"), "{r:?}");
    let (status, worker, id, text) =
        post_with_trailers(&stack, "/v1/completions", "buffered-3", completion("hello with trailers", 3)).await;
    assert_eq!(status, 200, "{text}");
    let worker = worker.expect("a worker answered");
    let picked = stack.routed_to(&id).await;
    assert_eq!(picked, stack.worker_by_name(&worker).addr().to_string(), "the request went to {worker}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefix_goes_to_the_same_worker() {
    let stack = Stack::start(4).await;
    let system: String = (0..40).map(|i| format!("You are assistant number {i:04}, precise and brief. ")).collect();
    let first = stack.post("/v1/completions", "p-0", &completion(&format!("{system} Question zero?"), 4)).await;
    assert_eq!(first.status, 200, "{first:?}");
    let home = first.worker.clone().expect("worker header");
    for i in 1..6 {
        let r =
            stack.post("/v1/completions", &format!("p-{i}"), &completion(&format!("{system} Question {i}?"), 4)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.worker.as_deref(), Some(home.as_str()), "request p-{i} left the worker holding its prefix");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_400_and_an_empty_pool_gets_503() {
    let stack = Stack::start(2).await;
    let cases = [
        ("/v1/completions", "{not json", "not valid JSON"),
        ("/v1/completions", r#"{"prompt":"x"}"#, "`model` is required"),
        ("/v1/chat/completions", r#"{"model":"m","messages":"hi"}"#, "`messages` must be"),
        ("/v1/completions", "", "request body is empty"),
    ];
    for (i, (path, body, want)) in cases.iter().enumerate() {
        let r = stack.post(path, &format!("bad-{i}"), body).await;
        assert_eq!(r.status, 400, "{body:?}: {r:?}");
        assert!(r.body.starts_with("inference error: BadRequest - "), "{r:?}");
        assert!(r.body.contains(want), "{r:?}");
        assert!(r.worker.is_none(), "a rejected request must not reach a worker: {r:?}");
    }
    stack.write_endpoints(&[], &[]);
    let r = eventually(Duration::from_secs(10), "503 from an empty pool", || async {
        let r = stack.post("/v1/completions", "empty-pool", &completion("x", 4)).await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert!(r.body.starts_with("inference error: ServiceUnavailable - "), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_guide_envoy_config_works_unchanged() {
    let stack = Stack::start_with(2, EnvoyConfig::Guide, |_| {}).await;
    // The guide's Envoy health-checks the EPP on its ext_proc port.
    assert_eq!(health_status(stack.epp_port, epp::ext_proc::SERVICE_NAME).await.as_deref(), Some("SERVING"));
    let r = stack.post("/v1/completions", "guide-1", &completion("hello", 4)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_routed_as_picked(&stack, &r).await;
    let body = r#"{"model":"m","prompt":"stream","max_tokens":4,"stream":true}"#;
    let r = stack.post("/v1/completions", "guide-2", body).await;
    assert_eq!(r.status, 200);
    assert!(r.body.trim_end().ends_with("data: [DONE]"), "{r:?}");
}

/// A WebSocket upgrade through Envoy (the shipped configs enable upgrades): the client
/// sends nothing after its headers until it is answered, so the EPP routes at the headers.
/// Before, full-duplex mode waited for a body that never came, and the client hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_is_routed_not_left_waiting() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::start(2).await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.listener)).await.unwrap();
    let request = "GET /v1/realtime HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before a response: {:?}", String::from_utf8_lossy(&head));
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "no response within 10 s: the upgrade was left waiting for a body");
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    // The simulated worker speaks no WebSocket: it answers, and that answer comes back.
    assert!(head.contains("x-sim-worker"), "the request did not reach a worker: {head}");
}

/// A config whose extractor maps the workers' `gpu_temp` gauge to attribute `gpu.temp`
/// (`customMetrics`, as upstream) and whose profile keeps only workers below 85 degrees.
fn cool_workers_config(endpoints: &std::path::Path) -> String {
    format!(
        "{}- name: metrics-source
  type: metrics-data-source
- name: metrics-extractor
  type: core-metrics-extractor
  parameters:
    defaultEngine: vllm-with-temperature
    engineConfigs:
    - name: vllm-with-temperature
      queuedRequestsSpec: vllm:num_requests_waiting
      runningRequestsSpec: vllm:num_requests_running
      kvUsageSpec: vllm:kv_cache_usage_perc
      customMetrics:
      - {{attributeKey: gpu.temp, metricSpec: gpu_temp}}
- name: cool-enough
  type: endpoint-attribute-filter
  parameters:
    attribute: gpu.temp
    algorithm: {{type: threshold, threshold: {{operator: LessThan, value: 85}}}}
- type: endpoint-attribute-scorer
  parameters:
    attributeKey: gpu.temp
    algorithm: {{type: linear_lower_is_better}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: cool-enough
  - pluginRef: endpoint-attribute-scorer
  - pluginRef: max-score-picker
dataLayer:
  discovery: {{pluginRef: file-discovery}}
  sources:
  - pluginRef: metrics-source
    extractors:
    - pluginRef: metrics-extractor
",
        crate::common::config_head(&endpoints.display().to_string())
    )
}

/// Custom metrics end to end: each worker's `/metrics` carries a `gpu_temp` gauge, the
/// extractor reads it as an endpoint attribute, and the attribute filter and scorer route
/// by it, following live changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_metrics_route_by_an_endpoint_attribute() {
    let stack = Stack::start_config(3, EnvoyConfig::Ours, |_| {}, &[], cool_workers_config).await;
    let set = |temps: [Option<f64>; 3]| {
        for (i, t) in temps.into_iter().enumerate() {
            stack.worker_by_name(&format!("w{i}")).handle.set_extra_metric("gpu_temp", t);
        }
    };
    // w0 too hot, w2 without the gauge (kept: onMissing Pass; scored 0), w1 the coolest.
    set([Some(90.0), Some(60.0), None]);
    let only = |worker: &'static str| {
        let stack = &stack;
        move || async move {
            let replies = stack.fresh_questions(worker, 6).await;
            replies.iter().all(|r| r.status == 200 && r.worker.as_deref() == Some(worker)).then_some(())
        }
    };
    eventually(Duration::from_secs(10), "every request on w1, the only cool worker", only("w1")).await;
    // w0 cools down, w1 heats up: the next scrapes move the traffic.
    set([Some(50.0), Some(95.0), None]);
    eventually(Duration::from_secs(10), "every request on w0 once it is the coolest", only("w0")).await;
}
