//! Endpoint churn under a steady request loop, through real Envoy: the endpoints file is
//! rewritten (atomic renames) to remove, relabel and re-add workers, then made invalid,
//! then fixed. No request may fail, and none may reach a worker after the EPP applied its
//! removal.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::stack::{Stack, eventually};

struct Sent {
    started: Instant,
    status: u16,
    worker: Option<String>,
}

/// Waits until the EPP log holds more than `before` lines containing `needle`.
async fn logged(stack: &Stack, needle: &str, before: usize) -> Instant {
    eventually(Duration::from_secs(10), needle, || {
        let n = stack.epp_log().matches(needle).count();
        async move { (n > before).then(Instant::now) }
    })
    .await
}

fn count(stack: &Stack, needle: &str) -> usize {
    stack.epp_log().matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_loses_no_request_and_never_uses_a_removed_worker() {
    let stack = Arc::new(Stack::start(3).await);
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loops = Vec::new();
    for lane in 0..2 {
        let (stack, sent, stop) = (stack.clone(), sent.clone(), stop.clone());
        loops.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let body = format!(r#"{{"model":"m","prompt":"churn {lane} {i}","max_tokens":2}}"#);
                let r = stack.post("/v1/completions", &format!("churn-{lane}-{i}"), &body).await;
                sent.lock().unwrap().push(Sent { started, status: r.status, worker: r.worker });
                i += 1;
            }
        }));
    }
    let traffic = || tokio::time::sleep(Duration::from_millis(400));
    let published = "endpoint pool published";

    traffic().await;
    // Remove w2.
    let before = count(&stack, published);
    stack.write_endpoints(&[0, 1], &[]);
    let removed_at = logged(&stack, published, before).await;
    traffic().await;
    // Relabel the remaining two.
    let before = count(&stack, published);
    stack.write_endpoints(&[0, 1], &[("tier", "gold")]);
    logged(&stack, published, before).await;
    traffic().await;
    let readded_written = Instant::now();
    // An invalid file and a truncated one: both ignored, the last good set stays.
    let rejected = "endpoints file rejected";
    let before = count(&stack, rejected);
    stack.write_endpoints_text("endpoints: [\n  - name: broken\n");
    logged(&stack, rejected, before).await;
    traffic().await;
    let before = count(&stack, rejected);
    stack.write_endpoints_text("");
    logged(&stack, rejected, before).await;
    traffic().await;
    // Every kind of bad file is reported exactly once, with its reason.
    let w = |i: usize| stack.workers[i].addr().port();
    let bad_files = [
        (
            "all entries invalid (bad ports)",
            "endpoints:\n  - name: a\n    address: 127.0.0.1\n    port: \"0\"\n  - name: b\n    address: 127.0.0.1\n    port: \"99999\"\n"
                .to_string(),
        ),
        ("a hostname", "endpoints:\n  - name: a\n    address: worker.example\n    port: \"8000\"\n".to_string()),
        ("not a list", "endpoints: 7\n".to_string()),
    ];
    for (what, text) in &bad_files {
        let before = count(&stack, rejected);
        stack.write_endpoints_text(text);
        logged(&stack, rejected, before).await;
        traffic().await;
        assert_eq!(count(&stack, rejected), before + 1, "{what}: reported more than once");
    }
    // Duplicates and one bad port among good entries: the good ones apply, the rest are
    // skipped with a reason. Written in place (not renamed), as a careless editor would.
    let before = count(&stack, published);
    let text = format!(
        "endpoints:\n  - name: w0\n    address: 127.0.0.1\n    port: \"{}\"\n  - name: w0\n    address: 127.0.0.1\n    port: \"{}\"\n  - name: w1\n    address: 127.0.0.1\n    port: \"{}\"\n  - name: bad\n    address: 127.0.0.1\n    port: \"http\"\n",
        w(0),
        w(2),
        w(1)
    );
    std::fs::write(&stack.endpoints_path, text).unwrap();
    logged(&stack, published, before).await;
    traffic().await;
    let log = stack.epp_log();
    assert!(log.contains("endpoint skipped"), "skipped entries must be logged with a reason");
    // Fixed: all three again.
    let before = count(&stack, published);
    stack.write_endpoints(&[0, 1, 2], &[]);
    logged(&stack, published, before).await;
    traffic().await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    let sent = sent.lock().unwrap();
    assert!(sent.len() > 20, "too little traffic to mean anything: {}", sent.len());
    let failed: Vec<_> = sent.iter().filter(|s| s.status != 200).map(|s| s.status).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), sent.len());
    let leaked = sent
        .iter()
        .filter(|s| s.started > removed_at && s.started < readded_written && s.worker.as_deref() == Some("w2"))
        .count();
    assert_eq!(leaked, 0, "requests reached w2 after its removal was applied");
    let log = stack.epp_log();
    assert!(log.contains("endpoints file changed, reloading"), "reload not logged");
}
