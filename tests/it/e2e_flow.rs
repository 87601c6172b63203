//! Flow control through the whole stack (real Envoy, the `epp` binary, simulated workers):
//! requests wait in the EPP while the pool is saturated and leave routed, by priority and
//! tenant; limits, TTLs, clients that leave, a config reload and SIGTERM each get their
//! answer, and nothing is lost.
//!
//! The pool is two workers and the `concurrency-detector` with `maxConcurrency: 1`: the
//! pool is saturated as soon as two requests are in flight, known at once (no scrape), so
//! every test controls exactly what waits.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::stack::{EnvoyConfig, Reply, Stack, eventually, question};

fn config(endpoints: &Path, ttl: &str, band: &str) -> String {
    format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
  - name: file-discovery
    type: file-discovery
    parameters: {{path: {}, watchFile: true}}
  - type: queue-scorer
  - type: max-score-picker
  - type: concurrency-detector
    parameters: {{maxConcurrency: 1}}
  - type: round-robin-fairness-policy
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue-scorer
      - pluginRef: max-score-picker
flowControl:
  defaultRequestTTL: {ttl}
  defaultPriorityBand: {band}
  defaultNegativePriorityBand: {{maxRequests: 2}}
  saturationDetector: {{pluginRef: concurrency-detector}}
",
        endpoints.display()
    )
}

const BAND: &str = "{maxRequests: 100, maxBytes: 1Mi, fairnessPolicyRef: round-robin-fairness-policy}";

fn standard(endpoints: &Path) -> String {
    config(endpoints, "30s", BAND)
}

fn short_ttl(endpoints: &Path) -> String {
    config(endpoints, "700ms", BAND)
}

async fn start(config: fn(&Path) -> String) -> Arc<Stack> {
    // Model time: 8 ms per decode step, so `max_tokens` sets how long a request holds its slot.
    // Room for the 600 KB prompts of the byte-limit test (150 000 tokens).
    let tune = |c: &mut sim::SimConfig| {
        c.time_scale = 1.0;
        c.model.num_gpu_blocks = 16_384;
    };
    let stack = Stack::start_config(2, EnvoyConfig::Ours, tune, &[], config).await;
    eventually(Duration::from_secs(10), "the pool to serve", || async {
        (stack.post("/v1/completions", "warm", &question("warm", 1)).await.status == 200).then_some(())
    })
    .await;
    Arc::new(stack)
}

/// Sends a request in the background; `headers` as (name, value).
fn send(
    stack: &Arc<Stack>,
    id: &str,
    max_tokens: u32,
    headers: &[(&'static str, &'static str)],
) -> tokio::task::JoinHandle<Reply> {
    let (stack, id, headers) = (stack.clone(), id.to_string(), headers.to_vec());
    tokio::spawn(async move { stack.post_with("/v1/completions", &id, &question(&id, max_tokens), &headers).await })
}

/// The tags of `replies` in the order the EPP logged their requests leaving the queue
/// (Envoy gives each request its own id; the reply carries it back).
fn dispatch_order(stack: &Stack, replies: &[(String, Reply)]) -> Vec<String> {
    let tag_of = |id: &str| replies.iter().find(|(_, r)| r.request_id == id).map(|(t, _)| t.clone());
    stack
        .epp_log()
        .lines()
        .filter(|l| l.contains("dispatched from the queue"))
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("request_id=")))
        .filter_map(tag_of)
        .collect()
}

/// The sum of every sample of `metric` whose line contains all of `labels`.
fn total(page: &str, metric: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(metric) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `n` requests are queued (from the EPP's metrics).
async fn queued(stack: &Stack, n: f64) {
    eventually(Duration::from_secs(10), &format!("{n} queued requests"), || async {
        let page = stack.epp_metrics().await;
        let total: f64 = page
            .lines()
            .filter(|l| l.starts_with("llm_d_epp_flow_control_queue_size{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (total == n).then_some(())
    })
    .await;
}

const SHEDDABLE: (&str, &str) = ("x-gateway-inference-objective", "sheddable");
const CRITICAL: (&str, &str) = ("x-llm-d-inference-objective", "critical");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_holds_requests_and_releases_them_by_priority() {
    let stack = start(standard).await;
    // Two long requests fill the pool.
    let blockers: Vec<_> = (0..2).map(|i| send(&stack, &format!("block-{i}"), 60, &[])).collect();
    queued(&stack, 0.0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Then, in this order: 4 sheddable (their band holds 2), 4 standard, 2 critical.
    let mut waiting = Vec::new();
    for (kind, n, headers) in [("shed", 4, &[SHEDDABLE][..]), ("std", 4, &[][..]), ("crit", 2, &[CRITICAL][..])] {
        for i in 0..n {
            waiting.push((format!("{kind}-{i}"), send(&stack, &format!("{kind}-{i}"), 5, headers)));
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
    let mut replies = Vec::new();
    for (id, task) in waiting {
        replies.push((id, task.await.expect("request task")));
    }
    for b in blockers {
        assert_eq!(b.await.expect("blocker").status, 200);
    }
    // The two sheddables over their band's limit were refused at once, as upstream says.
    let refused: Vec<&str> = replies.iter().filter(|(_, r)| r.status != 200).map(|(id, _)| id.as_str()).collect();
    assert_eq!(refused, ["shed-2", "shed-3"], "{replies:#?}");
    for (_, r) in replies.iter().filter(|(_, r)| r.status != 200) {
        assert_eq!(r.status, 429, "{r:?}");
        assert_eq!(r.dropped_reason.as_deref(), Some("rejected-saturated"), "{r:?}");
        assert!(
            r.body.contains("inference error: ResourceExhausted - request rejected pre-queue: queue at capacity"),
            "{r:?}"
        );
    }
    // Everything else waited (not 429) and left the queue critical first, sheddable last.
    let order = dispatch_order(&stack, &replies);
    let rank = |id: &str| match id.split('-').next() {
        Some("crit") => 0,
        Some("std") => 1,
        _ => 2,
    };
    let ranks: Vec<u8> = order.iter().map(|id| rank(id)).collect();
    assert_eq!(order.len(), 8, "{order:?}");
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "dispatch order {order:?}");
    let page = stack.epp_metrics().await;
    assert!(total(&page, "llm_d_epp_flow_control_requests_total", &["outcome=\"Dispatched\""]) >= 8.0, "{page}");
    assert_eq!(total(&page, "llm_d_epp_flow_control_requests_total", &["outcome=\"RejectedCapacity\""]), 2.0);
    queued(&stack, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_take_turns_under_round_robin_fairness() {
    let stack = start(standard).await;
    let blockers: Vec<_> = (0..2).map(|i| send(&stack, &format!("block-{i}"), 40, &[])).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The heavy tenant queues 12 requests, then the light one 3.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let tag = format!("heavy-{i}");
        tasks.push((tag.clone(), send(&stack, &tag, 3, &[("x-llm-d-inference-fairness-id", "heavy")])));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in 0..3 {
        let tag = format!("light-{i}");
        tasks.push((tag.clone(), send(&stack, &tag, 3, &[("x-llm-d-inference-fairness-id", "light")])));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut replies = Vec::new();
    for (tag, t) in tasks {
        let r = t.await.expect("request");
        assert_eq!(r.status, 200, "{r:?}");
        replies.push((tag, r));
    }
    for b in blockers {
        assert_eq!(b.await.expect("blocker").status, 200);
    }
    // Round robin: the light tenant's requests leave every other dispatch, not after the
    // heavy tenant's backlog.
    let order = dispatch_order(&stack, &replies);
    let light: Vec<usize> =
        order.iter().enumerate().filter(|(_, id)| id.starts_with("light")).map(|(i, _)| i).collect();
    assert_eq!(light.len(), 3, "{order:?}");
    assert!(light.iter().enumerate().all(|(k, &pos)| pos <= 2 * k + 2), "light tenant at {light:?} of {order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_and_clients_that_leave_are_answered_and_counted() {
    let stack = start(short_ttl).await;
    let blockers: Vec<_> = (0..2).map(|i| send(&stack, &format!("block-{i}"), 250, &[])).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Its TTL (700 ms) runs out while the blockers (2 s) hold the pool.
    let expired = send(&stack, "too-late", 1, &[]);
    // This client gives up after 200 ms: its request leaves the queue at once.
    let leaver = {
        let stack = stack.clone();
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(200), stack.post("/v1/completions", "leaver", &question("l", 1)))
                .await
        })
    };
    assert!(leaver.await.expect("task").is_err(), "the client timed out");
    let r = expired.await.expect("task");
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.dropped_reason.as_deref(), Some("rejected-ttl-expired"), "{r:?}");
    assert!(r.body.contains("request timed out in queue"), "{r:?}");
    let page = stack.epp_metrics().await;
    assert_eq!(total(&page, "llm_d_epp_flow_control_requests_total", &["outcome=\"EvictedTTL\""]), 1.0, "{page}");
    eventually(Duration::from_secs(5), "the cancelled request counted", || async {
        let page = stack.epp_metrics().await;
        (total(&page, "llm_d_epp_flow_control_requests_total", &["outcome=\"EvictedContextCancelled\""]) == 1.0)
            .then_some(())
    })
    .await;
    queued(&stack, 0.0).await;
    for b in blockers {
        assert_eq!(b.await.expect("blocker").status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_bytes_are_bounded_and_a_reload_keeps_the_queue() {
    let stack = start(standard).await;
    let blockers: Vec<_> = (0..2).map(|i| send(&stack, &format!("block-{i}"), 120, &[])).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // 600 KB bodies against a band of 1 MiB: one fits, the next is refused.
    let big = |id: &str| {
        let stack = stack.clone();
        let id = id.to_string();
        let body = serde_json::json!({"model": "m", "prompt": "x".repeat(600_000), "max_tokens": 1}).to_string();
        tokio::spawn(async move { stack.post("/v1/completions", &id, &body).await })
    };
    let first = big("big-1");
    queued(&stack, 1.0).await;
    let second = big("big-2").await.expect("task");
    assert_eq!((second.status, second.dropped_reason.as_deref()), (429, Some("rejected-saturated")), "{second:?}");
    // A reload with other band limits while a request waits: it keeps its place.
    let small = send(&stack, "small", 1, &[]);
    queued(&stack, 2.0).await;
    stack.write_config(&config(&stack.endpoints_path, "30s", "{maxRequests: 50, maxBytes: 2Mi}"));
    eventually(Duration::from_secs(20), "the reload", || {
        let log = stack.epp_log();
        async move { log.contains("config reloaded; new scheduler published").then_some(()) }
    })
    .await;
    let first = first.await.expect("task");
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(small.await.expect("task").status, 200);
    for b in blockers {
        assert_eq!(b.await.expect("blocker").status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_queued_requests_and_drains_the_rest() {
    let stack = start(standard).await;
    let blockers: Vec<_> = (0..2).map(|i| send(&stack, &format!("block-{i}"), 80, &[])).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let queued_tasks: Vec<_> = (0..3).map(|i| send(&stack, &format!("q-{i}"), 1, &[])).collect();
    queued(&stack, 3.0).await;
    stack.signal_epp();
    for t in queued_tasks {
        let r = t.await.expect("task");
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.dropped_reason.as_deref(), Some("rejected-shutting-down"), "{r:?}");
    }
    for b in blockers {
        assert_eq!(b.await.expect("blocker").status, 200, "routed requests drain");
    }
}
