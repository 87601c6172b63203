//! Live worker metrics through the whole stack: the EPP scrapes the simulated workers,
//! routes away from a loaded or stale one, sheds sheddable requests when the pool is
//! saturated, and reports itself on its own Prometheus endpoint.

use std::time::Duration;

use sim::{FaultMode, FaultUpdate};

use crate::stack::{Stack, eventually, question, sample};

/// Sends `n` requests through Envoy, each with a prompt never sent before (so prefix
/// affinity plays no part); returns the workers that answered.
async fn spread(stack: &Stack, tag: &str, n: usize) -> Vec<String> {
    let replies = stack.fresh_questions(tag, n).await;
    for r in &replies {
        assert_eq!(r.status, 200, "{r:?}");
    }
    replies.into_iter().map(|r| r.worker.unwrap_or_default()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loaded_worker_is_avoided() {
    // One sequence at a time, model time: requests sent straight to w0 pile up in its queue.
    let stack = Stack::start_with(3, crate::stack::EnvoyConfig::Ours, |c| {
        c.time_scale = 1.0;
        c.model.max_num_seqs = 1;
    })
    .await;
    let w0 = format!("http://{}/v1/completions", stack.workers[0].addr());
    let mut hogs = Vec::new();
    for i in 0..8 {
        let (client, url) = (stack.client.clone(), w0.clone());
        let body = serde_json::json!({"model": "m", "prompt": format!("hog {i}"), "max_tokens": 4000}).to_string();
        hogs.push(tokio::spawn(async move {
            let _ = client.post(url).header("content-type", "application/json").body(body).send().await;
        }));
    }
    // The EPP must see the queue: its per-endpoint gauge shows it.
    eventually(Duration::from_secs(15), "the EPP to see w0's queue", || async {
        let page = stack.epp_metrics().await;
        sample(&page, "inference_pool_per_pod_queue_size", &["model_server_pod=\"w0\""]).filter(|q| *q >= 6.0)
    })
    .await;
    let workers = spread(&stack, "away", 12).await;
    assert!(!workers.iter().any(|w| w == "w0"), "requests went to the loaded worker: {workers:?}");
    for h in hogs {
        h.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_worker_stops_being_preferred_and_recovers() {
    let stack = Stack::start(3).await;
    eventually(Duration::from_secs(10), "all workers scraped", || async {
        let page = stack.epp_metrics().await;
        sample(&page, "inference_pool_ready_pods", &[]).filter(|n| *n >= 3.0)
    })
    .await;
    stack.workers[1].handle.set_faults(FaultUpdate { metrics: Some(FaultMode::Garbage), requests: None });
    // Once its metrics are stale, w1 is filtered out while others are fresh.
    let workers = eventually(Duration::from_secs(10), "w1 to be avoided", || async {
        let w = spread(&stack, "stale", 10).await;
        (!w.iter().any(|x| x == "w1")).then_some(w)
    })
    .await;
    assert_eq!(workers.len(), 10);
    let page = stack.epp_metrics().await;
    let errors = sample(&page, "epp_scrape_errors_total", &["default/w1"]).unwrap_or(0.0);
    assert!(errors >= 1.0, "scrape errors of w1 not counted:\n{page}");
    // Healthy again: it is scraped and used again.
    stack.workers[1].handle.set_faults(FaultUpdate { metrics: Some(FaultMode::Ok), requests: None });
    eventually(Duration::from_secs(15), "w1 to be used again", || async {
        let w = spread(&stack, "back", 6).await;
        w.iter().any(|x| x == "w1").then_some(())
    })
    .await;
    let log = stack.epp_log();
    assert!(log.contains("w1"), "scrape state changes of w1 not logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_sheds_sheddable_requests_only() {
    let stack = Stack::start(2).await;
    // Unknown load counts as saturation: every worker's /metrics fails.
    for w in &stack.workers {
        w.handle.set_faults(FaultUpdate { metrics: Some(FaultMode::Error), requests: None });
    }
    let shed = eventually(Duration::from_secs(10), "a 429 for a sheddable request", || async {
        let r = stack
            .client
            .post(stack.url("/v1/completions"))
            .header("content-type", "application/json")
            .header("x-gateway-inference-objective", "sheddable")
            .body(question("shed me", 1))
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        (status == 429).then_some(body)
    })
    .await;
    assert!(shed.starts_with("inference error: ResourceExhausted - "), "{shed}");
    // A normal request is still served.
    let r = stack.post("/v1/completions", "normal", &question("serve me", 1)).await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epp_reports_its_metrics() {
    let stack = Stack::start(2).await;
    // Long enough for several prefix blocks (64 bytes each), so the prefix index fills.
    let body = serde_json::json!({"model": "m", "max_tokens": 3, "messages": [
        {"role": "system", "content": "You are a careful assistant who counts tokens and explains the count in detail."},
        {"role": "user", "content": "count my tokens"}]})
    .to_string();
    let body = body.as_str();
    for i in 0..5 {
        let r = stack.post("/v1/chat/completions", &format!("m-{i}"), body).await;
        assert_eq!(r.status, 200);
    }
    let bad = stack.post("/v1/completions", "m-bad", "{").await;
    assert_eq!(bad.status, 400);
    let page = eventually(Duration::from_secs(10), "pool gauges", || async {
        let page = stack.epp_metrics().await;
        sample(&page, "inference_pool_ready_pods", &[]).filter(|n| *n >= 2.0).map(|_| page)
    })
    .await;
    type Expectation<'a> = (&'a str, &'a [&'a str], fn(f64) -> bool);
    let expect: &[Expectation] = &[
        ("inference_objective_request_total", &["model_name=\"m\""], |v| v >= 5.0),
        ("inference_objective_request_error_total", &["error_code=\"BadRequest\""], |v| v >= 1.0),
        ("inference_objective_request_duration_seconds_count", &["model_name=\"m\""], |v| v >= 5.0),
        ("inference_objective_input_tokens_count", &["model_name=\"m\""], |v| v >= 5.0),
        ("inference_objective_output_tokens_sum", &["model_name=\"m\""], |v| v >= 15.0),
        ("inference_objective_running_requests", &["model_name=\"m\""], |v| v == 0.0),
        ("inference_pool_average_kv_cache_utilization", &[], |v| (0.0..=1.0).contains(&v)),
        ("inference_pool_average_queue_size", &[], |v| v >= 0.0),
        ("inference_pool_ready_pods", &[], |v| v == 2.0),
        ("inference_pool_per_pod_queue_size", &["model_server_pod=\"w0\""], |v| v >= 0.0),
        ("inference_extension_scheduler_e2e_duration_seconds_count", &[], |v| v >= 5.0),
        // Filters run in every cycle; a stateless scorer only when the pick is not settled.
        // Labelled as upstream: the extension point, the plugin's type, its configured name.
        (
            "inference_extension_plugin_duration_seconds_count",
            &[
                "extension_point=\"Filter\"",
                "plugin_type=\"prefix-cache-affinity-filter\"",
                "plugin_name=\"prefix-cache-affinity-filter\"",
            ],
            |v| v >= 5.0,
        ),
        (
            "inference_extension_plugin_duration_seconds_count",
            &["extension_point=\"DataProducer\"", "plugin_type=\"inflight-load-producer\""],
            |v| v >= 5.0,
        ),
        (
            "inference_extension_plugin_duration_seconds_count",
            &["extension_point=\"Scorer\"", "plugin_name=\"token-load-scorer\""],
            |v| v >= 1.0,
        ),
        ("inference_extension_prefix_indexer_size", &[], |v| v >= 1.0),
        ("inference_extension_prefix_indexer_hit_ratio_count", &[], |v| v >= 1.0),
        ("epp_discovery_reloads_total", &["result=\"applied\""], |v| v >= 0.0),
        ("epp_pool_saturation", &[], |v| (0.0..=1.0).contains(&v)),
    ];
    for (metric, labels, ok) in expect {
        let v = sample(&page, metric, labels).unwrap_or_else(|| panic!("{metric}{labels:?} missing:\n{page}"));
        assert!(ok(v), "{metric}{labels:?} = {v}");
    }
}

/// Each worker's page is read with its engine's names (the `llm-d.ai/engine-type` label): a
/// worker that speaks SGLang's metric names, unlabelled, is read with vLLM's and fails;
/// labelled `sglang` it is read; labelled with an engine no config names it is read as the
/// default engine (vLLM), as upstream, and the label is warned about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_read_with_its_engines_metric_names() {
    let stack = Stack::start_with(2, crate::stack::EnvoyConfig::Ours, |c| {
        if c.name == "w1" {
            c.metrics_names = sim::MetricsNames::Sglang;
        }
    })
    .await;
    let scrape_errors = |page: &str| sample(page, "epp_scrape_errors_total", &["default/w1"]).unwrap_or(0.0);
    eventually(Duration::from_secs(10), "w1's scrapes to fail with vLLM's names", || async {
        let page = stack.epp_metrics().await;
        (scrape_errors(&page) >= 2.0).then_some(())
    })
    .await;
    assert!(stack.epp_log().contains("no sample of `vllm:num_requests_waiting`"), "{}", stack.epp_log());
    stack.write_endpoints_labelled(&[(0, &[]), (1, &[("llm-d.ai/engine-type", "sglang")])]);
    // Read with SGLang's names: both workers fresh, w1's queue reported from its own gauge.
    eventually(Duration::from_secs(15), "w1 read with SGLang's names", || async {
        let page = stack.epp_metrics().await;
        let before = scrape_errors(&page);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let page = stack.epp_metrics().await;
        let ready = sample(&page, "inference_pool_ready_pods", &[]).unwrap_or(0.0);
        let queue = sample(&page, "inference_pool_per_pod_queue_size", &["model_server_pod=\"w1\""]);
        (scrape_errors(&page) == before && ready >= 2.0 && queue.is_some()).then_some(())
    })
    .await;
    let before = scrape_errors(&stack.epp_metrics().await);
    stack.write_endpoints_labelled(&[(0, &[]), (1, &[("llm-d.ai/engine-type", "sglng")])]);
    eventually(Duration::from_secs(10), "the unknown engine named in the log", || async {
        stack
            .epp_log()
            .contains("label llm-d.ai/engine-type=sglng names no engine config (known: atom, sglang")
            .then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "w1 read with vLLM's names again, and failing", || async {
        (scrape_errors(&stack.epp_metrics().await) > before).then_some(())
    })
    .await;
}
