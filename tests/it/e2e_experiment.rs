//! An A/B experiment on the live stack: the optimized baseline against a queue-only policy,
//! 50/50, with a random shadow and a trapping shadow. Every request must succeed, both
//! variants must route, shadows must be recorded, and `epp experiment report` must show
//! the baseline's higher prefix-cache hit rate on a shared-prefix workload.

use std::process::Command;
use std::time::Duration;

use crate::common::{config_head, wasm_file_bytes};
use crate::stack::{Stack, eventually};

fn config(endpoints: &std::path::Path) -> String {
    format!(
        "{}- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: no-hit-lru-scorer
- type: max-score-picker
- type: random-picker
- name: trap
  type: misbehaving-scorer
  wasm: plugins/bad.wasm
  parameters: {{mode: trap-after, after: 20}}
  failurePolicy: failClosed
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: no-hit-lru-scorer, weight: 2}}
  - {{pluginRef: max-score-picker}}
- name: queue-only
  plugins:
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: max-score-picker}}
- name: random
  plugins:
  - {{pluginRef: random-picker}}
- name: trapping
  plugins:
  - {{pluginRef: trap, weight: 1}}
  - {{pluginRef: max-score-picker}}
experiment:
  split: {{by: sticky, key: \"header:x-session\"}}
  responseHeader: true
  variants:
  - {{name: baseline, profile: default, percent: 50}}
  - {{name: queue-only, profile: queue-only, percent: 50}}
  - {{name: random-shadow, profile: random, shadow: true}}
  - {{name: trap-shadow, profile: trapping, shadow: true}}
",
        config_head(&endpoints.display().to_string())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_beats_queue_only_on_shared_prefixes() {
    let mut stack = Stack::start(4).await;
    std::fs::create_dir_all(stack.dir.join("plugins")).unwrap();
    std::fs::write(stack.dir.join("plugins/bad.wasm"), wasm_file_bytes("misbehaving_scorer")).unwrap();
    // Swap in the experiment config (a hot reload) and wait for it.
    stack.write_config(&config(&stack.endpoints_path));
    eventually(Duration::from_secs(20), "the experiment config", || {
        let log = stack.epp_log();
        async move { log.contains("config reloaded; new scheduler published").then_some(()) }
    })
    .await;

    // 6 system prompts (several prefix blocks each), sessions spread over both variants.
    let systems: Vec<String> = (0..6)
        .map(|g| (0..12).map(|i| format!("Group {g} rule {i}: answer carefully and cite sources. ")).collect())
        .collect();
    let mut variants = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..160 {
        let session = format!("session-{}", i % 40);
        let body = serde_json::json!({"model": "m", "max_tokens": 2,
            "prompt": format!("{} Question {i}?", systems[i % systems.len()])})
        .to_string();
        let r = stack
            .client
            .post(stack.url("/v1/completions"))
            .header("content-type", "application/json")
            .header("x-session", &session)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i} failed: a shadow must never fail a request");
        let v = r.headers().get("x-epp-variant").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        *variants.entry(v).or_default() += 1;
    }
    assert_eq!(variants.keys().cloned().collect::<Vec<_>>(), ["baseline", "queue-only"], "{variants:?}");

    // The report, from the live metrics endpoint, as an operator would run it.
    let url = format!("http://127.0.0.1:{}/metrics", stack.metrics_port);
    let report = eventually(Duration::from_secs(10), "shadow decisions in the metrics", || {
        let url = url.clone();
        async move {
            let out =
                Command::new(env!("CARGO_BIN_EXE_epp")).args(["experiment", "report", "--url", &url]).output().ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (out.status.success() && text.contains("shadow random-shadow") && text.contains("shadow trap-shadow"))
                .then_some(text)
        }
    })
    .await;
    println!("{report}");
    let hit = |name: &str| -> f64 {
        let line = report.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing:\n{report}"));
        let field = line.split_whitespace().find(|f| f.ends_with('%')).unwrap();
        field.trim_end_matches('%').parse().unwrap()
    };
    assert!(hit("baseline") > hit("queue-only"), "baseline should hit the prefix cache more:\n{report}");
    assert!(report.contains("queue-only vs baseline"), "{report}");
    let trap_line = report.lines().find(|l| l.contains("shadow trap-shadow")).unwrap();
    assert!(!trap_line.ends_with("errors 0"), "the trapping shadow's failures must be counted: {trap_line}");
    let _ = &mut stack;
}
