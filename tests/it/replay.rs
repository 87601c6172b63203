//! `epp replay` end to end in-process: the real plugins and scheduler over the simulated
//! cluster. On the built-in shared-prefix workload the optimized baseline must beat random
//! and round-robin on prefix-cache hits and median TTFT (the ordering, not the numbers);
//! equal seeds must give identical reports, other seeds a small variation; traces must parse
//! or fail naming the line; bursts and late scrapes must not cost the default profile its
//! prefix affinity; config policies with a `.wasm` plugin of one's own, CSV and the plot
//! must work.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use epp::replay::report::PolicyReport;
use epp::replay::workload::{TraceError, read_trace};
use epp::replay::{self, ReplayArgs, ReplayError};
use indicatif::ProgressBar;

use crate::common::{TempDir, wasm_file_bytes};

/// A small shared-prefix run: 1500 requests on 4 workers (seconds in a debug build).
fn shared_prefix(seed: u64) -> Vec<PolicyReport> {
    let seed = seed.to_string();
    let args = ReplayArgs::parse_flags(["--requests", "1500", "--workers", "4", "--seed", &seed, "--no-progress"])
        .expect("valid flags");
    replay::run(&args, &ProgressBar::hidden()).expect("replay runs").reports
}

fn seed_one() -> &'static [PolicyReport] {
    static REPORTS: OnceLock<Vec<PolicyReport>> = OnceLock::new();
    REPORTS.get_or_init(|| shared_prefix(1))
}

fn by_name(reports: &[PolicyReport]) -> BTreeMap<&str, &PolicyReport> {
    reports.iter().map(|r| (r.policy.as_str(), r)).collect()
}

/// Runs `epp replay` with these flags, without a progress bar.
fn replay_with(flags: &[&str]) -> epp::replay::Replay {
    let args = ReplayArgs::parse_flags(flags.iter().copied().chain(["--no-progress"])).expect("valid flags");
    replay::run(&args, &ProgressBar::hidden()).expect("replay runs")
}

/// Writes `config` into `dir` and returns the `--policy` value that runs it as `name`.
fn config_policy(dir: &TempDir, name: &str, config: &str) -> String {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).expect("write config");
    format!("{name}={}", path.display())
}

fn assert_baseline_wins(reports: &[PolicyReport]) {
    let r = by_name(reports);
    let baseline = r["baseline"];
    for other in ["random", "round-robin"] {
        let o = r[other];
        assert!(
            baseline.prefix_hit_rate > o.prefix_hit_rate + 0.1,
            "baseline hit rate {:.3} should clearly beat {other}'s {:.3}",
            baseline.prefix_hit_rate,
            o.prefix_hit_rate
        );
        assert!(
            baseline.ttft_ms[0] < 0.8 * o.ttft_ms[0],
            "baseline TTFT p50 {:.1} ms should clearly beat {other}'s {:.1} ms",
            baseline.ttft_ms[0],
            o.ttft_ms[0]
        );
    }
    for report in reports {
        assert_eq!(report.completed, report.requests, "{}: every request is served", report.policy);
    }
}

#[test]
fn baseline_beats_random_and_round_robin_on_shared_prefixes() {
    assert_baseline_wins(seed_one());
}

/// The default profile and the model of the peers' `cache_aware` on the workload and
/// cluster that `flags` describe.
fn baseline_and_cache_aware(flags: &[&str]) -> (PolicyReport, PolicyReport) {
    let all = flags.iter().copied().chain(["--policy", "baseline", "--policy", "cache-aware"]);
    let mut reports = replay_with(&all.collect::<Vec<_>>()).reports.into_iter();
    let (Some(baseline), Some(peers)) = (reports.next(), reports.next()) else {
        panic!("two policies, two reports");
    };
    assert_eq!((baseline.policy.as_str(), peers.policy.as_str()), ("baseline", "cache-aware"));
    assert!(
        baseline.prefix_hit_rate >= peers.prefix_hit_rate - 0.01,
        "baseline hit rate {:.3} vs cache-aware {:.3}",
        baseline.prefix_hit_rate,
        peers.prefix_hit_rate
    );
    (baseline, peers)
}

/// Bursts of shared-prompt traffic (3× the rate for 2 s in every 10) on 8 workers: queues
/// form at the workers holding each prompt. The default profile must keep those prompts
/// where they are cached, as the peers' cache-aware policy does (hit rate within a point),
/// at no worse a TTFT — leaving busy holders out on their scraped queue alone lost 9–11
/// points here.
#[test]
fn bursts_keep_prefix_affinity() {
    let flags = ["--workload", "bursts", "--requests", "1500", "--workers", "8", "--rate", "80"];
    let (baseline, peers) = baseline_and_cache_aware(&[&flags[..], &["--num-gpu-blocks", "1024"]].concat());
    assert!(
        baseline.ttft_ms[1] <= peers.ttft_ms[1],
        "baseline TTFT p90 {:.1} ms vs cache-aware {:.1} ms",
        baseline.ttft_ms[1],
        peers.ttft_ms[1]
    );
}

/// A busy engine answers `/metrics` late. Scrapes every 500 ms leave each worker's metrics
/// past the 200 ms staleness threshold most of the time; the default profile must still
/// keep conversations where their history is cached, within a point of `cache_aware`
/// (which reads no metrics) — leaving every late worker out took its hit rate from 0.49
/// to 0.22 here.
#[test]
fn late_scrapes_keep_prefix_affinity() {
    let flags = ["--workload", "multi-turn", "--requests", "1200", "--workers", "4", "--rate", "20"];
    baseline_and_cache_aware(&[&flags[..], &["--num-gpu-blocks", "1024", "--scrape-delay-ms", "500"]].concat());
}

#[test]
fn equal_seeds_give_identical_reports() {
    assert_eq!(shared_prefix(1), seed_one());
}

#[test]
fn other_seeds_vary_a_little() {
    let other = shared_prefix(2);
    assert_ne!(other, seed_one(), "a different seed is a different workload");
    assert_baseline_wins(&other);
    let (a, b) = (by_name(seed_one()), by_name(&other));
    for (name, x) in &a {
        let y = b[name];
        assert!(
            (x.prefix_hit_rate - y.prefix_hit_rate).abs() < 0.1,
            "{name}: hit rate {:.3} vs {:.3}",
            x.prefix_hit_rate,
            y.prefix_hit_rate
        );
        let (p, q) = (x.ttft_ms[0], y.ttft_ms[0]);
        assert!((p - q).abs() <= 0.35 * p.max(q), "{name}: TTFT p50 {p:.1} vs {q:.1} ms");
    }
}

/// Every request shares one 1 024-token system prompt (one application, the `one-prompt`
/// generator): the first worker to cache it must not keep all the traffic while the others
/// idle. The default profile keeps the prompt's affinity until that worker's queue is twice
/// the saturation threshold with another worker idle, so its TTFT stays near round-robin's;
/// before, the queue on the one holder grew without end (TTFT p50 of seconds here).
#[test]
fn one_shared_prompt_spreads_when_its_worker_saturates() {
    let flags = ["--workload", "one-prompt", "--requests", "1500", "--workers", "4", "--rate", "30"];
    let more = ["--num-gpu-blocks", "2048", "--policy", "baseline", "--policy", "round-robin"];
    let reports = replay_with(&[&flags[..], &more].concat()).reports;
    let r = by_name(&reports);
    let (baseline, rr) = (r["baseline"], r["round-robin"]);
    assert!(
        baseline.prefix_hit_rate >= rr.prefix_hit_rate - 0.01,
        "hit rate {:.3} vs round-robin {:.3}",
        baseline.prefix_hit_rate,
        rr.prefix_hit_rate
    );
    assert!(
        baseline.ttft_ms[0] <= 1.5 * rr.ttft_ms[0] && baseline.ttft_ms[1] < 1000.0,
        "baseline TTFT p50 {:.1} ms / p90 {:.1} ms vs round-robin's {:.1} / {:.1} ms",
        baseline.ttft_ms[0],
        baseline.ttft_ms[1],
        rr.ttft_ms[0],
        rr.ttft_ms[1]
    );
}

/// The same prompt on engines with room for 256 sequences (`8b-1gpu`), 16 of them: nothing
/// ever queues, so the saturation rule never fires, and the prompt's holders ran decode
/// batches several times larger than the others' (TTFT p90 3.8× round-robin's, median
/// latency 3×). The prompt is hot (asked for by every request: sixteen workers' worth of
/// traffic), so busy holders spill it until its traffic is spread.
#[test]
fn a_hot_prompt_spreads_before_anything_queues() {
    let flags = ["--workload", "one-prompt", "--requests", "3000", "--workers", "16", "--rate", "144"];
    let more = ["--model-profile", "8b-1gpu", "--policy", "baseline", "--policy", "round-robin"];
    let reports = replay_with(&[&flags[..], &more].concat()).reports;
    let r = by_name(&reports);
    let (baseline, rr) = (r["baseline"], r["round-robin"]);
    assert!(baseline.prefix_hit_rate >= rr.prefix_hit_rate - 0.01, "hits {:.3}", baseline.prefix_hit_rate);
    assert!(
        baseline.ttft_ms[1] <= 1.25 * rr.ttft_ms[1] && baseline.e2e_ms[0] <= 1.1 * rr.e2e_ms[0],
        "baseline TTFT p90 {:.1} ms, latency p50 {:.1} ms vs round-robin's {:.1} / {:.1} ms",
        baseline.ttft_ms[1],
        baseline.e2e_ms[0],
        rr.ttft_ms[1],
        rr.e2e_ms[0]
    );
}

/// Long generations on a few shared prompts (the `long-output` generator): a worker's load is
/// mostly its running decodes, which the prompt-token load signal (uncached prompt tokens,
/// released at the first token) does not see, so without more each prompt's holders fill
/// their KV cache and a tail of requests waits seconds. The default profile's
/// `kvPressureThreshold` (what requests commit to a worker's KV cache counts past that share
/// of it) and upstream's `addEstimatedOutputTokens` (an output estimate held until the
/// request ends) each keep the tail at round-robin's and the hits.
#[test]
fn long_generations_stay_off_full_workers_with_either_setting() {
    let dir = temp_dir("long-output");
    let pressure = "    parameters:\n      kvPressureThreshold: 0.6\n";
    assert!(epp::config::DEFAULT_CONFIG.contains(pressure), "the default profile sets the threshold");
    let with = |name: &str, params: &str| {
        let config = epp::config::DEFAULT_CONFIG.replace(pressure, params);
        config_policy(&dir, name, &config)
    };
    let (without_policy, outputs) =
        (with("without", ""), with("outputs", "    parameters:\n      addEstimatedOutputTokens: true\n"));
    let flags = ["--workload", "long-output", "--requests", "1500", "--workers", "4", "--rate", "6"];
    let policies =
        ["--policy", "baseline", "--policy", "round-robin", "--policy", &without_policy, "--policy", &outputs];
    let reports = replay_with(&[&flags[..], &["--num-gpu-blocks", "2048"], &policies].concat()).reports;
    let r = by_name(&reports);
    let (without, rr) = (r["without"], r["round-robin"]);
    let p99 = |x: &PolicyReport| x.ttft_ms[2];
    for name in ["baseline", "outputs"] {
        let x = r[name];
        assert!(
            p99(x) < 0.5 * p99(without) && p99(x) < 1.5 * p99(rr),
            "{name}: TTFT p99 {:.0} ms; without either {:.0} ms, round-robin {:.0} ms",
            p99(x),
            p99(without),
            p99(rr)
        );
        assert!(
            x.prefix_hit_rate > rr.prefix_hit_rate && x.prefix_hit_rate > without.prefix_hit_rate - 0.01,
            "{name}: hit rate {:.3}; without either {:.3}, round-robin {:.3}",
            x.prefix_hit_rate,
            without.prefix_hit_rate,
            rr.prefix_hit_rate
        );
    }
}

fn temp_dir(name: &str) -> TempDir {
    TempDir::new("replay", name)
}

#[test]
fn trace_files_parse_or_name_the_bad_line() {
    let dir = temp_dir("trace");
    let good = concat!(
        r#"{"at": 0.00, "prompt": "You are a helpful assistant. Hello!", "output_tokens": 8, "session": "u1"}"#,
        "\n",
        r#"{"at": 0.05, "prompt_tokens": 600, "prefix_group": "sys-a", "prefix_tokens": 512, "output_tokens": 16}"#,
        "\n\n",
        r#"{"at": 0.02, "model": "m", "lora": "ad-1", "prompt_tokens": 40, "output_tokens": 4, "priority": -1}"#,
        "\n",
    );
    // (file content, expected: Ok(requests) or Err(substring of the error))
    let cases: Vec<(&str, Result<usize, &str>)> = vec![
        (good, Ok(3)),
        ("", Err("no requests")),
        (r#"{"at": 1, "prompt": "x"}"#, Err("trace line 1: missing field `output_tokens`")),
        (
            concat!(r#"{"at": 1, "prompt": "x", "output_tokens": 1}"#, "\n", r#"{"at": "soon"}"#),
            Err("trace line 2: invalid type"),
        ),
        (r#"{"at": 1, "prompt_tokens": 9, "prefix_tokens": 4, "output_tokens": 1}"#, Err("line 1: `prefix_tokens`")),
    ];
    for (i, (content, want)) in cases.into_iter().enumerate() {
        let path = dir.join(format!("case-{i}.jsonl"));
        std::fs::write(&path, content).expect("write trace");
        match (read_trace(&path), want) {
            (Ok(w), Ok(n)) => assert_eq!(w.items.len(), n, "case {i}"),
            (Err(e), Err(text)) => assert!(e.to_string().contains(text), "case {i}: {e}"),
            (got, want) => panic!("case {i}: got {got:?}, want {want:?}"),
        }
    }
    let missing = read_trace(&dir.join("absent.jsonl"));
    assert!(matches!(missing, Err(TraceError::Read { .. })), "{missing:?}");

    // Through the command: the error reaches the caller with the line named.
    let path = dir.join("case-3.jsonl");
    let args = ReplayArgs::parse_flags(["--workload", path.to_str().expect("utf-8 path"), "--no-progress"])
        .expect("valid flags");
    match replay::run_cli(args, &mut Vec::new()) {
        Err(e @ ReplayError::Trace(_)) => assert!(e.to_string().contains("trace line 2"), "{e}"),
        other => panic!("expected a trace error, got {:?}", other.map_err(|e| e.to_string())),
    }
}

#[test]
fn a_trace_replays_with_a_custom_wasm_policy_csv_and_plot() {
    let dir = temp_dir("cli");
    let mut trace = String::new();
    for i in 0..60 {
        let group = ["sys-a", "sys-b", "sys-c"][i % 3];
        trace.push_str(&format!(
            "{{\"at\": {:.3}, \"prompt_tokens\": 700, \"prefix_group\": \"{group}\", \"prefix_tokens\": 512, \
             \"output_tokens\": 12, \"session\": \"user-{}\"}}\n",
            i as f64 * 0.05,
            i % 7
        ));
    }
    std::fs::write(dir.join("trace.jsonl"), trace).expect("write trace");
    let config = concat!(
        "apiVersion: llm-d.ai/v1alpha1\n",
        "kind: EndpointPickerConfig\n",
        "plugins:\n",
        "  - type: prefix-cache-scorer\n",
        "  - type: max-score-picker\n",
        "  - name: mine\n",
        "    type: label-affinity-scorer\n",
        "    wasm: mine.wasm\n",
        "    parameters: {label: gpu, scores: {h100: 1.0}}\n",
        "schedulingProfiles:\n",
        "  - name: p\n",
        "    plugins:\n",
        "      - pluginRef: prefix-cache-scorer\n",
        "      - pluginRef: mine\n",
        "      - pluginRef: max-score-picker\n",
    );
    std::fs::write(dir.join("prefix.yaml"), config).expect("write config");
    // A component from a file, as a user's own plugin would be.
    std::fs::write(dir.join("mine.wasm"), wasm_file_bytes("label_affinity_scorer")).expect("write component");
    let path = |name: &str| dir.join(name).to_str().expect("utf-8 path").to_string();
    let args = ReplayArgs::parse_flags([
        "--workload",
        &path("trace.jsonl"),
        "--workers",
        "3",
        "--policy",
        &format!("prefix-only={}", path("prefix.yaml")),
        "--policy",
        "round-robin",
        "--csv",
        &path("out.csv"),
        "--plot",
        &path("out.svg"),
        "--no-progress",
    ])
    .expect("valid flags");
    let mut out = Vec::new();
    let ok = replay::run_cli(args, &mut out).expect("replay runs");
    let text = String::from_utf8(out).expect("utf-8 output");
    assert!(ok, "{text}");
    for needle in ["workload trace.jsonl: 60 requests", "prefix-only", "round-robin", "ttft_p50_ms", "out.svg"] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let csv = std::fs::read_to_string(dir.join("out.csv")).expect("csv written");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows[1].starts_with("prefix-only,60,60,"), "{csv}");
    let svg = std::fs::read_to_string(dir.join("out.svg")).expect("plot written");
    assert!(svg.starts_with("<svg") && svg.contains("prefix-only"), "not an SVG with the policies");
}

/// `--per-worker`: one row per worker and policy, accounting for every routed request;
/// round-robin's shares are equal, and the LoRA adapters show where they were sent.
#[test]
fn the_per_worker_table_accounts_for_every_request() {
    let flags = ["--workload", "lora-mix", "--requests", "200", "--workers", "4", "--per-worker"];
    let args = ReplayArgs::parse_flags(flags.into_iter().chain([
        "--policy",
        "baseline",
        "--policy",
        "round-robin",
        "--no-progress",
    ]))
    .expect("valid flags");
    let mut out = Vec::new();
    assert!(replay::run_cli(args, &mut out).expect("replay runs"));
    let text = String::from_utf8(out).expect("utf-8 output");
    let header = text.lines().position(|l| l.starts_with("policy") && l.contains("busy_until_s")).expect(&text);
    let rows: Vec<Vec<&str>> = text.lines().skip(header + 1).take(8).map(|l| l.split_whitespace().collect()).collect();
    for policy in ["baseline", "round-robin"] {
        let mine: Vec<&Vec<&str>> = rows.iter().filter(|r| r[0] == policy).collect();
        let workers: Vec<&str> = mine.iter().map(|r| r[1]).collect();
        assert_eq!(workers, ["0", "1", "2", "3"], "{text}");
        let routed: usize = mine.iter().map(|r| r[2].parse::<usize>().expect("a count")).sum();
        assert_eq!(routed, 200, "every request on some worker:\n{text}");
    }
    let rr: Vec<&str> = rows.iter().filter(|r| r[0] == "round-robin").map(|r| r[3]).collect();
    assert_eq!(rr, ["25.0%"; 4], "{text}");
    assert!(rows.iter().any(|r| r.contains(&"lora-0")), "the adapters are listed:\n{text}");
}

/// The `tenants` workload over the pool's capacity: with flow control and round-robin
/// fairness the light tenant is served almost as in an idle pool while the heavy one
/// queues; without flow control both wait alike. Nothing is lost either way.
#[test]
fn flow_control_with_round_robin_fairness_shields_the_light_tenant() {
    let dir = temp_dir("flow");
    let fc = epp::config::DEFAULT_CONFIG
        .replace("path: endpoints.yaml", "path: /dev/null")
        .replace(
            "kind: EndpointPickerConfig\n",
            "kind: EndpointPickerConfig\nfeatureGates: [flowControl]\nflowControl:\n  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}\n",
        )
        .replace(
            "  - type: max-score-picker\n",
            "  - type: max-score-picker\n  - type: round-robin-fairness-policy\n  - type: utilization-detector\n    parameters: {queueDepthThreshold: 1}\n",
        );
    let policy = config_policy(&dir, "fc-rr", &fc);
    let flags = ["--workload", "tenants", "--requests", "2500", "--workers", "4", "--rate", "120"];
    let replay = replay_with(&[&flags[..], &["--policy", "baseline", "--policy", &policy]].concat());
    let tenants: Vec<_> = replay.runs.iter().flat_map(epp::replay::report::tenant_reports).collect();
    let get = |policy: &str, tenant: &str| {
        tenants.iter().find(|t| t.policy == policy && t.tenant == tenant).unwrap_or_else(|| panic!("{policy} {tenant}"))
    };
    let (base_light, fc_light) = (get("baseline", "tenant-light"), get("fc-rr", "tenant-light"));
    let fc_heavy = get("fc-rr", "tenant-heavy");
    assert!(
        fc_light.ttft_ms[0] * 10.0 < base_light.ttft_ms[0],
        "light tenant p50 TTFT: {:.0} ms with flow control vs {:.0} ms without",
        fc_light.ttft_ms[0],
        base_light.ttft_ms[0]
    );
    assert!(fc_heavy.ttft_ms[0] > 10.0 * fc_light.ttft_ms[0], "the heavy tenant is the one that waits");
    for t in &tenants {
        assert_eq!(t.completed + t.rejected, t.requests, "{t:?}: every request has an outcome");
    }
}
