//! Faults through the whole stack: dead and hanging workers, bad requests at the edge,
//! overload, and shutdown/restart. The EPP must stay up, keep serving what it can, and
//! answer everything else with a clear status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sim::{FaultMode, FaultUpdate};

use crate::stack::{EnvoyConfig, Stack, eventually, guide_config_with, health_status, question, sample};

async fn statuses(stack: &Stack, tag: &str, n: usize) -> Vec<(u16, String)> {
    stack.fresh_questions(tag, n).await.into_iter().map(|r| (r.status, r.worker.unwrap_or_default())).collect()
}

/// Peak resident memory of a process, in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_hanging_workers_are_routed_around() {
    let mut stack = Stack::start(3).await;
    eventually(Duration::from_secs(10), "first scrapes", || async {
        (statuses(&stack, "warm", 3).await.iter().all(|(s, _)| *s == 200)).then_some(())
    })
    .await;
    // w1 dies; w2 accepts connections but never answers, /metrics included.
    let dead = stack.workers.remove(1);
    let _ = dead.handle.shutdown().await;
    stack.workers[1].handle.set_faults(FaultUpdate { metrics: Some(FaultMode::Hang), requests: Some(FaultMode::Hang) });
    // Once they have not been scraped for a second both are left out: every request
    // is served by w0.
    let settled = eventually(Duration::from_secs(15), "traffic to settle on w0", || async {
        let mut client_ok = Vec::new();
        for i in 0..10 {
            let r = tokio::time::timeout(
                Duration::from_secs(3),
                stack.post("/v1/completions", &format!("after-{i}"), &question(&format!("after {i}"), 1)),
            )
            .await;
            match r {
                Ok(r) if r.status == 200 => client_ok.push(r.worker.unwrap_or_default()),
                _ => return None,
            }
        }
        Some(client_ok)
    })
    .await;
    assert!(settled.iter().all(|w| w == "w0"), "{settled:?}");
    assert_eq!(health_status(stack.health_port, "").await.as_deref(), Some("SERVING"), "the EPP must stay up");
    let log = stack.epp_log();
    assert!(log.contains("w1") && log.contains("w2"), "worker failures should be logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_at_the_edge_get_clear_4xx() {
    let stack = Stack::start_full(1, EnvoyConfig::Ours, |_| {}, &["--max-request-body-bytes", "65536"]).await;
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/v1/completions", big.into_bytes(), 413, "PayloadTooLarge"),
        ("/v1/completions", b"\xff\xfe\xfd".to_vec(), 400, "UTF-8"),
        ("/v1/completions", br#"{"model":"m","prompt":5.5}"#.to_vec(), 400, "`prompt` must be"),
        ("/v1/completions", br#"{"model":["m"],"prompt":"x"}"#.to_vec(), 400, "`model` must be a string"),
        ("/v1/chat/completions", br#"{"messages":[]}"#.to_vec(), 400, "`model` is required"),
        ("/v2/unknown", br#"{"model":"m"}"#.to_vec(), 404, "NotFound"),
    ];
    for (path, body, status, text) in cases {
        let r = stack
            .client
            .post(stack.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let got = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.starts_with("inference error: ") && body.contains(text), "{path}: {body}");
    }
    assert_eq!(statuses(&stack, "still-fine", 2).await.iter().filter(|(s, _)| *s == 200).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_not_queued_and_the_epp_recovers() {
    // Each request takes ~0.5 s of model time, so 40 at once far exceed the bound of 2.
    let stack = Arc::new(
        Stack::start_full(
            2,
            EnvoyConfig::Ours,
            |c| {
                c.time_scale = 1.0;
                c.model.max_num_seqs = 2;
            },
            &["--max-inflight-requests", "2"],
        )
        .await,
    );
    let mut tasks = Vec::new();
    for i in 0..40 {
        let stack = stack.clone();
        tasks.push(tokio::spawn(async move {
            stack.post("/v1/completions", &format!("burst-{i}"), &question(&format!("burst {i}"), 60)).await
        }));
    }
    let mut counts = std::collections::BTreeMap::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 429 {
            assert!(r.body.contains("too many requests in flight"), "{r:?}");
        }
        *counts.entry(r.status).or_insert(0) += 1;
    }
    assert!(counts.keys().all(|s| *s == 200 || *s == 429), "{counts:?}");
    assert!(counts.get(&429).copied().unwrap_or(0) > 0, "nothing was refused: {counts:?}");
    assert!(counts.get(&200).copied().unwrap_or(0) >= 2, "too little was served: {counts:?}");
    // Load gone: served again, once the EPP has seen the last responses end (a client may
    // read its whole answer a moment before the EPP processes the end of that stream).
    eventually(Duration::from_secs(10), "the EPP to serve again after the burst", || async {
        statuses(&stack, "calm", 3).await.iter().all(|(s, _)| *s == 200).then_some(())
    })
    .await;
    if let Some(kib) = stack.epp_pid().and_then(peak_rss_kib) {
        println!("epp peak RSS under the burst: {kib} KiB");
        assert!(kib < 1 << 20, "peak RSS {kib} KiB");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_and_a_restart_serves_again() {
    let mut stack = Stack::start_with(1, EnvoyConfig::Ours, |c| c.time_scale = 1.0).await;
    let body = r#"{"model":"m","prompt":"stream through a shutdown","max_tokens":60,"stream":true}"#;
    let r = stack
        .client
        .post(stack.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = stream.next().await.expect("first chunk").expect("chunk");
    assert!(!first.is_empty());
    // Mid-stream: SIGTERM. The stream must still complete.
    let terminating = std::thread::spawn({
        let pid = stack.epp_pid().expect("epp pid");
        move || std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()
    });
    let mut rest = Vec::from(first.as_ref());
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.expect("stream broke during drain"));
    }
    let _ = terminating.join();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.trim_end().ends_with("data: [DONE]"), "stream cut short: {text}");
    let status = stack.terminate_epp(Duration::from_secs(20)).expect("the EPP exits after draining");
    assert!(status.success(), "exit status {status:?}");
    assert!(stack.epp_log().contains("draining in-flight requests"));

    // Restart with the same files: NOT_SERVING never lies, SERVING comes back quickly.
    let started = Instant::now();
    stack.start_epp(EnvoyConfig::Ours).await;
    stack.wait_serving().await;
    let elapsed = started.elapsed();
    println!("restart to SERVING: {elapsed:?}");
    let ok = eventually(Duration::from_secs(20), "a request after the restart", || async {
        let r = stack.post("/v1/completions", "after-restart", &question("after restart", 1)).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(ok.worker.as_deref(), Some("w0"));
}

/// The documented single-EPP replace: a second EPP binds the same ports (`--reuse-port`),
/// warms up and reports SERVING; then the old one gets SIGTERM, stops accepting, tells
/// Envoy to go away (HTTP/2 GOAWAY) and drains. Envoy opens its next ext_proc connection
/// to the new process. Under steady load from four clients, no request may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_epp_under_load_fails_no_request() {
    let mut stack = Stack::start_full(2, EnvoyConfig::Ours, |_| {}, &["--reuse-port"]).await;
    let stack_url = stack.url("/v1/completions");
    let client = stack.client.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (client, url, stop) = (client.clone(), stack_url.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(question(&format!("client {c} request {i}"), 2))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        ok += 1;
                    }
                    Ok(r) => failed.push(format!("HTTP {}: {}", r.status(), r.text().await.unwrap_or_default())),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let old = stack.start_replacement_epp(EnvoyConfig::Ours).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut old_process = old.process;
    let status = tokio::task::spawn_blocking(move || old_process.terminate(Duration::from_secs(30)))
        .await
        .expect("join")
        .expect("the old EPP exits after draining");
    assert!(status.success(), "old EPP exit status {status:?}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await.expect("client task");
        ok += o;
        failed.extend(f);
    }
    println!("replace under load: {ok} requests served, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 50, "too little load to tell: {ok} requests");
    let served_by_new = stack.replacement_log().matches("request routed").count();
    assert!(served_by_new > 0, "the replacement EPP routed nothing");
}

/// A gray failure: w2 accepts requests and never answers, while its `/metrics` stays
/// healthy. The guide's config has no in-flight accounting, so only the passive breaker
/// can see it: after a handful of requests w2 is ejected, and once it heals (after the
/// cool-down, through a probe) it serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_answers_gets_a_handful_of_requests_then_none() {
    let stack = Stack::start_config(
        3,
        EnvoyConfig::Ours,
        |_| {},
        &["--endpoint-stall-timeout", "500ms", "--endpoint-ejection-cooldown", "2s"],
        guide_config_with,
    )
    .await;
    eventually(Duration::from_secs(10), "first scrapes", || async {
        (statuses(&stack, "warm", 3).await.iter().all(|(s, _)| *s == 200)).then_some(())
    })
    .await;
    let hung = stack.worker_by_name("w2").addr().to_string();
    stack.workers[2].handle.set_faults(FaultUpdate { metrics: None, requests: Some(FaultMode::Hang) });

    // 60 streamed requests at 20/s, each given up by its client after 2 s.
    let stack = Arc::new(stack);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let stack = stack.clone();
        tasks.spawn(async move {
            let body = serde_json::json!({
                "model": "m", "prompt": format!("gray {i}: a different question each time"),
                "max_tokens": 2, "stream": true
            })
            .to_string();
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                stack.post("/v1/completions", &format!("gray-{i}"), &body),
            )
            .await;
            match r {
                Ok(r) => (r.status, r.worker.unwrap_or_default()),
                Err(_) => (0, "timed out".to_string()),
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut outcomes = Vec::new();
    while let Some(r) = tasks.join_next().await {
        outcomes.push(r.expect("request task"));
    }
    let stuck = outcomes.iter().filter(|(s, _)| *s == 0).count();
    let served = outcomes.iter().filter(|(s, _)| *s == 200).count();
    eprintln!("gray failure: {stuck} of 60 requests reached the hung worker");
    assert!(stuck <= 6, "{stuck} of 60 requests went to the hung worker: {outcomes:?}");
    assert_eq!(stuck + served, 60, "{outcomes:?}");
    let page = stack.epp_metrics().await;
    let ejections = sample(&page, "epp_endpoint_ejections_total", &[&hung, "reason=\"stalled\""]);
    assert!(ejections.is_some_and(|n| n >= 1.0), "no stall ejection of {hung} in:\n{page}");
    assert!(stack.epp_log().contains("endpoint ejected from routing"), "the ejection should be logged");

    // Healed: after the cool-down a probe finds it answering, and it serves again.
    stack.workers[2].handle.set_faults(FaultUpdate { metrics: None, requests: Some(FaultMode::Ok) });
    let mut n = 0;
    eventually(Duration::from_secs(20), "the healed worker to serve again", || {
        n += 1;
        let stack = stack.clone();
        async move {
            let body = question(&format!("healed {n}"), 1);
            let r = stack.post("/v1/completions", &format!("healed-{n}"), &body).await;
            (r.worker.as_deref() == Some("w2")).then_some(())
        }
    })
    .await;
    let page = stack.epp_metrics().await;
    assert_eq!(sample(&page, "epp_endpoint_ejected", &[&hung]), Some(0.0), "{page}");
}
