//! End-to-end tests of the simulated worker over real HTTP on 127.0.0.1: reply shapes,
//! streaming, chunked request bodies, errors, metrics, faults, shutdown and the binary's
//! listening line. Every wait is bounded; nothing sleeps to synchronise.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use sim::{FaultMode, FaultUpdate, ModelParams, SimConfig, SimHandle, WORKER_HEADER};

const DEADLINE: Duration = Duration::from_secs(10);

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(DEADLINE).build().expect("client")
}

async fn instant_worker(name: &str) -> SimHandle {
    sim::spawn(SimConfig { name: name.into(), time_scale: 0.0, ..SimConfig::default() }).await.expect("spawn")
}

async fn post(sim: &SimHandle, path: &str, body: Value) -> reqwest::Response {
    client().post(format!("{}{path}", sim.url())).json(&body).send().await.expect("send")
}

fn worker_of(res: &reqwest::Response) -> String {
    res.headers().get(WORKER_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("<missing>").to_owned()
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|frame| frame.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_owned)
        .collect()
}

async fn metrics(sim: &SimHandle) -> String {
    let res = client().get(format!("{}/metrics", sim.url())).send().await.expect("scrape");
    assert_eq!(res.status(), 200);
    res.text().await.expect("body")
}

/// The value of the first sample of `name` on a metrics page.
fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in\n{page}"))
}

#[tokio::test]
async fn completions_report_usage_and_reuse_the_prefix_cache() {
    let sim = instant_worker("w1").await;
    assert_ne!(sim.addr().port(), 0, "the bound port is reported");
    let prompt = "You are a helpful assistant. Answer briefly and precisely. ".repeat(10);
    let body = json!({ "model": "m", "prompt": prompt, "max_tokens": 5 });
    let first = post(&sim, "/v1/completions", body.clone()).await;
    assert_eq!(first.status(), 200);
    assert_eq!(worker_of(&first), "w1");
    let first: Value = first.json().await.expect("json");
    assert_eq!(first["object"], "text_completion");
    assert_eq!(first["model"], "m");
    assert_eq!(first["choices"][0]["finish_reason"], "length");
    let usage = &first["usage"];
    assert_eq!(usage["prompt_tokens"], prompt.len().div_ceil(4));
    assert_eq!(usage["completion_tokens"], 5);
    assert_eq!(usage["total_tokens"], prompt.len().div_ceil(4) + 5);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);

    let second: Value = post(&sim, "/v1/completions", body).await.json().await.expect("json");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached tokens");
    assert_eq!(cached, (prompt.len() / 64 * 16) as u64, "all full blocks come from the cache");

    let page = metrics(&sim).await;
    assert_eq!(sample(&page, "vllm:prefix_cache_hits_total"), cached as f64);
    assert_eq!(sample(&page, "vllm:prefix_cache_queries_total"), 2.0 * prompt.len().div_ceil(4) as f64);
    assert_eq!(sample(&page, "vllm:request_success_total"), 2.0);
}

#[tokio::test]
async fn chat_streams_one_chunk_per_token_then_usage_and_done() {
    let sim = instant_worker("w2").await;
    let res = post(
        &sim,
        "/v1/chat/completions",
        json!({ "model": "m", "messages": [{ "role": "user", "content": "hello" }], "max_tokens": 3, "stream": true,
                "stream_options": { "include_usage": true } }),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(worker_of(&res), "w2");
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let data = sse_data(&res.text().await.expect("body"));
    assert_eq!(data.len(), 5, "3 tokens, usage, [DONE]: {data:?}");
    let chunks: Vec<Value> = data[..4].iter().map(|d| serde_json::from_str(d).expect("json chunk")).collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[3]["usage"]["completion_tokens"], 3);
    assert!(chunks[3]["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    assert_eq!(data[4], "[DONE]");
}

#[tokio::test]
async fn responses_and_embeddings_have_openai_shapes() {
    let sim = instant_worker("w3").await;
    let r: Value = post(&sim, "/v1/responses", json!({ "model": "m", "input": "hi", "max_output_tokens": 2 }))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["usage"]["output_tokens"], 2);
    assert!(r["output"][0]["content"][0]["text"].is_string());

    let res = post(&sim, "/v1/responses", json!({ "input": "hi", "max_output_tokens": 2, "stream": true })).await;
    let body = res.text().await.expect("body");
    assert!(body.starts_with("event: response.created\n"), "{body}");
    assert_eq!(body.matches("event: response.output_text.delta\n").count(), 2, "{body}");
    assert!(body.contains("event: response.completed\n"), "{body}");

    let e: Value =
        post(&sim, "/v1/embeddings", json!({ "model": "m", "input": ["a", "b"] })).await.json().await.expect("json");
    assert_eq!(e["object"], "list");
    assert_eq!(e["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(e["data"][1]["index"], 1);
    assert!(e["usage"]["prompt_tokens"].as_u64() > Some(0));
}

#[tokio::test]
async fn chunked_request_bodies_are_accepted() {
    let sim = instant_worker("w4").await;
    let parts: Vec<Result<&'static str, std::io::Error>> =
        vec![Ok(r#"{"model":"m","prompt":"#), Ok(r#""split across chunks","max_tokens":2}"#)];
    let res = client()
        .post(format!("{}/v1/completions", sim.url()))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(parts)))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.expect("json");
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn errors_are_openai_json_and_carry_the_worker_header() {
    let sim = sim::spawn(SimConfig {
        name: "strict".into(),
        served_model_name: Some("base".into()),
        loras: vec!["ad1".into(), "ad2".into()],
        time_scale: 0.0,
        ..SimConfig::default()
    })
    .await
    .expect("spawn");
    let url = sim.url();
    let http = client();
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (http.post(format!("{url}/v1/completions")).body("{oops"), 400, "BadRequestError"),
        (http.post(format!("{url}/v1/chat/completions")).json(&json!({ "model": "base" })), 400, "BadRequestError"),
        (
            http.post(format!("{url}/v1/completions")).json(&json!({ "model": "nope", "prompt": "x" })),
            404,
            "NotFoundError",
        ),
        (http.get(format!("{url}/no/such/path")), 404, "NotFoundError"),
        (
            http.post(format!("{url}/v1/completions")).json(&json!({ "prompt": "x", "max_tokens": 10_000_000 })),
            400,
            "BadRequestError",
        ),
    ];
    for (req, status, kind) in cases {
        let res = req.send().await.expect("send");
        assert_eq!(res.status(), status);
        assert_eq!(worker_of(&res), "strict");
        let v: Value = res.json().await.expect("error json");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert_eq!(v["error"]["code"], status);
        assert!(v["error"]["message"].is_string());
    }

    let lora: Value =
        post(&sim, "/v1/completions", json!({ "model": "ad2", "prompt": "x" })).await.json().await.expect("json");
    assert_eq!(lora["model"], "ad2");
    let models: Value = http.get(format!("{url}/v1/models")).send().await.expect("send").json().await.expect("json");
    let ids: Vec<&str> = models["data"].as_array().expect("list").iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["base", "ad1", "ad2"]);
    let health = http.get(format!("{url}/health")).send().await.expect("send");
    assert_eq!((health.status().as_u16(), worker_of(&health)), (200, "strict".to_owned()));
}

#[tokio::test]
async fn metrics_follow_the_model_in_real_time() {
    // 100 decode steps of 20 ms: the request runs for about two seconds.
    let model = ModelParams { decode_ms_base: 20.0, decode_ms_per_seq: 0.0, ..ModelParams::default() };
    let sim = sim::spawn(SimConfig { name: "slow".into(), model, ..SimConfig::default() }).await.expect("spawn");
    let page = metrics(&sim).await;
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "vllm:request_success_total",
    ] {
        assert!(page.contains(&format!("# TYPE {name} ")), "no TYPE for {name}:\n{page}");
    }
    assert!(page.contains(r#"vllm:cache_config_info{model_name="sim-model",block_size="16",num_gpu_blocks="2048"} 1"#));
    assert_eq!(sample(&page, "vllm:num_requests_running"), 0.0);

    let res =
        post(&sim, "/v1/completions", json!({ "prompt": "x".repeat(400), "max_tokens": 100, "stream": true })).await;
    let mut body = res.bytes_stream();
    let first = tokio::time::timeout(DEADLINE, body.next()).await.expect("first token in time");
    assert!(first.is_some_and(|c| c.is_ok()));
    let page = metrics(&sim).await;
    assert_eq!(sample(&page, "vllm:num_requests_running"), 1.0, "{page}");
    assert!(sample(&page, "vllm:kv_cache_usage_perc") > 0.0, "{page}");

    // The client goes away: the worker aborts the request within a step.
    drop(body);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let page = metrics(&sim).await;
        if sample(&page, "vllm:num_requests_running") == 0.0 {
            assert_eq!(sample(&page, "vllm:kv_cache_usage_perc"), 0.0);
            assert_eq!(sample(&page, "vllm:request_success_total"), 0.0, "an aborted request is no success");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "request not aborted:\n{page}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn faults_switch_at_runtime() {
    let sim = instant_worker("faulty").await;
    let url = sim.url();
    let http = client();
    let set = |body: Value| http.post(format!("{url}/admin/fault")).json(&body).send();

    let res = set(json!({ "metrics": "garbage" })).await.expect("send");
    assert_eq!(res.status(), 200);
    let state: Value = res.json().await.expect("json");
    assert_eq!(state, json!({ "metrics": "garbage", "requests": "ok" }));
    let page = metrics(&sim).await;
    assert!(!page.contains("# TYPE"), "garbage is not a metrics page: {page}");

    set(json!({ "metrics": "error" })).await.expect("send");
    let res = http.get(format!("{url}/metrics")).send().await.expect("send");
    assert_eq!((res.status().as_u16(), worker_of(&res)), (500, "faulty".to_owned()));

    set(json!({ "metrics": "hang" })).await.expect("send");
    let hung = http.get(format!("{url}/metrics")).timeout(Duration::from_millis(300)).send().await;
    assert!(hung.is_err_and(|e| e.is_timeout()), "a hung /metrics never answers");

    let res = set(json!({ "metrics": "sideways" })).await.expect("send");
    assert_eq!(res.status(), 400);

    sim.set_faults(FaultUpdate { metrics: Some(FaultMode::Ok), requests: Some(FaultMode::Error) });
    assert!(metrics(&sim).await.contains("vllm:num_requests_running"));
    let res = post(&sim, "/v1/completions", json!({ "prompt": "x" })).await;
    assert_eq!(res.status(), 500);
}

#[tokio::test]
async fn shutdown_ends_requests_in_flight() {
    // A thousand decode steps of 20 ms: far longer than the test may take.
    let model = ModelParams { decode_ms_base: 20.0, ..ModelParams::default() };
    let sim = sim::spawn(SimConfig { model, ..SimConfig::default() }).await.expect("spawn");
    let res = post(&sim, "/v1/completions", json!({ "prompt": "x", "max_tokens": 1000, "stream": true })).await;
    let mut body = res.bytes_stream();
    let first = tokio::time::timeout(DEADLINE, body.next()).await.expect("first token in time");
    assert!(first.is_some_and(|c| c.is_ok()), "the request is in flight");
    tokio::time::timeout(DEADLINE, sim.shutdown()).await.expect("shutdown in time").expect("clean shutdown");
    let rest: Vec<_> = tokio::time::timeout(DEADLINE, body.collect()).await.expect("the stream ends");
    let text: String =
        rest.into_iter().filter_map(Result::ok).map(|b| String::from_utf8_lossy(&b).into_owned()).collect();
    assert!(!text.contains("[DONE]"), "cut short, not completed");
}

#[tokio::test]
async fn the_binary_prints_its_address() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sim-worker"))
        .args(["--port", "0", "--name", "bin1", "--time-scale", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start sim-worker");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    tokio::time::timeout(DEADLINE, tokio::io::BufReader::new(stdout).read_line(&mut line))
        .await
        .expect("listening line in time")
        .expect("read");
    let addr = line.trim().strip_prefix("sim-worker bin1 listening on ").unwrap_or_else(|| panic!("line {line:?}"));
    let res = client().get(format!("http://{addr}/health")).send().await.expect("health");
    assert_eq!((res.status().as_u16(), worker_of(&res)), (200, "bin1".to_owned()));
    child.kill().await.expect("stop sim-worker");
}
