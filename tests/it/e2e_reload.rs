//! Plugin hot-swap under steady load through real Envoy: the config is rewritten to add a
//! custom scorer from a `.wasm` file, change its parameters, push a broken, a trapping and a
//! looping component, then a good one again. No request may fail; bad versions are rejected
//! with reasons while the running scheduler keeps serving; good swaps change routing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::wasm_file_bytes;
use crate::stack::{Stack, eventually};

const BASE: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- name: file-discovery
  type: file-discovery
  parameters: {path: endpoints.yaml, watchFile: true}
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: no-hit-lru-scorer
- type: max-score-picker
";

fn config(extra_plugin: &str, extra_ref: &str) -> String {
    format!(
        "{BASE}{extra_plugin}schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: no-hit-lru-scorer, weight: 2}}
{extra_ref}  - {{pluginRef: max-score-picker}}
"
    )
}

/// The config with the label scorer (from `file`) preferring `gpu` value `prefer`.
fn with_label_scorer(file: &str, prefer: &str) -> String {
    config(
        &format!(
            "- name: prefer-gpu\n  type: label-affinity-scorer\n  wasm: {file}\n  parameters: {{label: gpu, scores: {{{prefer}: 1.0}}}}\n"
        ),
        "  - {pluginRef: prefer-gpu, weight: 20}\n",
    )
}

fn with_misbehaving(mode: &str) -> String {
    config(
        &format!("- name: bad\n  type: misbehaving-scorer\n  wasm: plugins/bad.wasm\n  parameters: {{mode: {mode}}}\n"),
        "  - {pluginRef: bad, weight: 1}\n",
    )
}

fn count(stack: &Stack, needle: &str) -> usize {
    stack.epp_log().matches(needle).count()
}

async fn logged(stack: &Stack, needle: &str, before: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count(stack, needle) <= before {
        if std::time::Instant::now() > deadline {
            let log = stack.epp_log();
            let tail: Vec<&str> = log.lines().filter(|l| !l.contains("request routed")).rev().take(30).collect();
            panic!("timed out waiting for `{needle}`; EPP log tail (newest first):\n{}", tail.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_swap_live_with_no_failed_request() {
    let stack = Arc::new(Stack::start(3).await);
    let h100: &[(&str, &str)] = &[("gpu", "H100")];
    let a100: &[(&str, &str)] = &[("gpu", "A100")];
    stack.write_endpoints_labelled(&[(0, h100), (1, a100), (2, a100)]);
    let plugins = stack.dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let write_wasm = |name: &str, bytes: &[u8]| {
        let tmp = plugins.join(format!("{name}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, plugins.join(name)).unwrap();
    };
    write_wasm("prefer.wasm", &wasm_file_bytes("label_affinity_scorer"));
    write_wasm("bad.wasm", &wasm_file_bytes("misbehaving_scorer"));
    let applied = "config reloaded; new scheduler published";
    let rejected = "config reload rejected";
    // The profile the steps below extend (the guide's scorers).
    let before = count(&stack, applied);
    stack.write_config(&config("", ""));
    logged(&stack, applied, before).await;

    // Steady load: two lanes of distinct prompts; every answer recorded.
    let seen: Arc<Mutex<Vec<(std::time::Instant, u16, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut lanes = Vec::new();
    for lane in 0..2 {
        let (stack, seen, stop) = (stack.clone(), seen.clone(), stop.clone());
        lanes.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = format!(r#"{{"model":"m","prompt":"lane {lane} request {i}","max_tokens":1}}"#);
                let started = std::time::Instant::now();
                let r = stack.post("/v1/completions", &format!("swap-{lane}-{i}"), &body).await;
                seen.lock().unwrap().push((started, r.status, r.worker.unwrap_or_default()));
                i += 1;
            }
        }));
    }
    // Where the next `n` requests started from now went (earlier ones may still be on
    // the previous scheduler: in-flight requests finish on the one they started with).
    let next = |n: usize| {
        let seen = seen.clone();
        async move {
            let mark = std::time::Instant::now();
            eventually(Duration::from_secs(20), "traffic", || {
                let got: Vec<String> =
                    seen.lock().unwrap().iter().filter(|(t, _, _)| *t > mark).map(|(_, _, w)| w.clone()).collect();
                async move { (got.len() >= n).then_some(got) }
            })
            .await
        }
    };

    // 1. Add the custom scorer preferring H100: traffic moves to w0.
    let before = count(&stack, applied);
    stack.write_config(&with_label_scorer("plugins/prefer.wasm", "H100"));
    logged(&stack, applied, before).await;
    let after = next(10).await;
    assert!(after.iter().all(|w| w == "w0"), "H100 preference not applied: {after:?}");
    // Only the new plugin was loaded: the others (and the prefix index) were kept.
    assert!(stack.epp_log().contains(r#"reloaded_plugins=["prefer-gpu"]"#), "unchanged plugins were rebuilt");

    // 2. Change its parameters: prefer A100 — traffic leaves w0.
    let before = count(&stack, applied);
    stack.write_config(&with_label_scorer("plugins/prefer.wasm", "A100"));
    logged(&stack, applied, before).await;
    let after = next(10).await;
    assert!(after.iter().all(|w| w == "w1" || w == "w2"), "A100 preference not applied: {after:?}");

    // 3. A broken component replaces the file: rejected, routing unchanged.
    let before = count(&stack, rejected);
    write_wasm("prefer.wasm", b"\0asm this is not a component");
    logged(&stack, rejected, before).await;
    let after = next(6).await;
    assert!(after.iter().all(|w| w == "w1" || w == "w2"), "the old scheduler must keep serving: {after:?}");

    // 4. and 5. A trapping and a looping scorer: both fail their probe.
    for mode in ["trap", "loop"] {
        let before = count(&stack, rejected);
        stack.write_config(&with_misbehaving(mode));
        logged(&stack, rejected, before).await;
        let after = next(4).await;
        assert!(after.iter().all(|w| w == "w1" || w == "w2"), "{mode}: {after:?}");
    }
    let log = stack.epp_log();
    assert!(log.contains("failed its probe"), "the reason of a rejection is not logged");

    // 6. A good component again (config points at it, preferring H100): back to w0.
    write_wasm("prefer2.wasm", &wasm_file_bytes("label_affinity_scorer"));
    let before = count(&stack, applied);
    stack.write_config(&with_label_scorer("plugins/prefer2.wasm", "H100"));
    logged(&stack, applied, before).await;
    let after = next(10).await;
    assert!(after.iter().all(|w| w == "w0"), "good swap not applied: {after:?}");

    stop.store(true, Ordering::Relaxed);
    for l in lanes {
        l.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    let failed: Vec<_> = seen.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), seen.len());
}
