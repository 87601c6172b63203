//! The probe a plugin must pass before it may serve traffic (at start-up, on every reload,
//! and in `epp plugin check`): calls over 0, 1 and 64 endpoints, with fresh, unknown (NaN)
//! and stale metrics, checking that outputs have the right shape and range, that the hooks
//! its manifest declares answer, and that every call returns within the plugin's time limit.
//!
//! It talks to plugins only through the scheduler's traits; it never publishes anything.
//! Columns a plugin reads from producers it is probed without are filled with plausible
//! values (and NaN in the "unknown" case), so a plugin is checked on its own.

use std::time::{Duration, Instant};

use epp_core::{CacheInfo, CallInput, Candidates, Completion, EndpointInfo, PluginError, PluginHandle, Request, Table};
use llmd_plugin_sdk::columns::BUILT_IN;

/// One probe call's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeCall {
    pub case: String,
    pub elapsed: Duration,
}

/// Why a plugin failed its probe.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("probe `{case}` failed: {reason}")]
pub struct ProbeError {
    pub case: String,
    pub reason: String,
    /// The call ran past the plugin's time limit: on a busy machine a retry may pass.
    pub timed_out: bool,
}

fn fail(case: &str, e: CallError) -> ProbeError {
    let timed_out = matches!(e, CallError::Plugin(PluginError::Timeout(_)));
    ProbeError { case: case.to_string(), reason: e.to_string(), timed_out }
}

/// Why one probed call failed: the plugin failed it, or its answer is not valid.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("{0}")]
    Invalid(String),
}

/// A synthetic pool of `n` endpoints with labels, LoRA data and cache geometry.
pub fn synthetic_pool(n: u32) -> Vec<EndpointInfo> {
    (0..n)
        .map(|i| EndpointInfo {
            id: 1_000 + i,
            name: format!("probe-{i}"),
            namespace: "probe".into(),
            address: format!("10.255.{}.{}", i / 250, i % 250 + 1),
            port: 8000,
            labels: vec![("gpu".into(), if i % 2 == 0 { "H100".into() } else { "A100".into() })],
            max_lora: Some(4),
            running_adapters: vec![format!("lora-{}", i % 3)],
            waiting_adapters: Vec::new(),
            cache: Some(CacheInfo { block_size: 16, num_gpu_blocks: 2048 + i }),
        })
        .collect()
}

/// The candidates of `pool`: `kind` is "fresh", "unknown" (NaN everywhere) or "stale".
pub fn synthetic_metrics(pool: &[EndpointInfo], kind: &str) -> Candidates {
    let n = pool.len();
    let (nan, age) = match kind {
        "unknown" => (true, f32::MAX),
        "stale" => (false, 60_000.0),
        _ => (false, 20.0),
    };
    let v = |i: usize, scale: f32| if nan { f32::NAN } else { (i % 7) as f32 * scale };
    Candidates {
        ids: pool.iter().map(|e| e.id).collect(),
        waiting: (0..n).map(|i| v(i, 1.0)).collect(),
        running: (0..n).map(|i| v(i, 2.0)).collect(),
        kv_usage: (0..n).map(|i| v(i, 0.1)).collect(),
        age_ms: vec![age; n],
        own_in_flight: Vec::new(),
        attributes: Vec::new(),
    }
}

/// A request whose prompt is `prompt_bytes` of repeated text.
pub fn synthetic_request(i: usize, prompt_bytes: usize) -> Request {
    let text = "The quick brown fox jumps over the lazy dog. ";
    let prompt: String = text.chars().cycle().take(prompt_bytes).collect();
    Request {
        id: format!("probe-request-{i}"),
        model: "lora-1".into(),
        prompt_tokens: Request::estimate_tokens(prompt.len()),
        prompt,
        max_tokens: Some(16),
        headers: vec![("x-probe".into(), "1".into()), ("x-session-token".into(), "cHJvYmUvcHJvYmUtMA==".into())],
        priority: 0,
        random_seed: i as u64,
        now_ms: 1_000 + i as u64,
        stream: true,
        ..Default::default()
    }
}

/// Runs the probe; on success returns each call's timing.
pub fn probe(plugin: &PluginHandle) -> Result<Vec<ProbeCall>, ProbeError> {
    let mut calls = Vec::new();
    let mut i = 0;
    for n in [0u32, 1, 64] {
        let pool = synthetic_pool(n);
        let case = format!("pool-changed/{n}");
        let started = Instant::now();
        plugin.core().pool_changed(u64::from(n) + 1, &pool).map_err(|e| fail(&case, e.into()))?;
        calls.push(ProbeCall { case, elapsed: started.elapsed() });
        for kind in ["fresh", "unknown", "stale"] {
            i += 1;
            let case = format!("{}/{n}-endpoints/{kind}", plugin.role());
            let candidates = synthetic_metrics(&pool, kind);
            let req = synthetic_request(i, 4096);
            let started = Instant::now();
            check_call(plugin, i as u64, &req, &candidates, kind == "unknown").map_err(|reason| fail(&case, reason))?;
            calls.push(ProbeCall { case, elapsed: started.elapsed() });
            if let Some(&first) = candidates.ids.first() {
                let case = format!("hooks/{n}-endpoints/{kind}");
                let started = Instant::now();
                check_hooks(plugin, i as u64, first).map_err(|reason| fail(&case, reason))?;
                calls.push(ProbeCall { case, elapsed: started.elapsed() });
            }
        }
    }
    Ok(calls)
}

/// The plugin's `reads` columns over `candidates`, gathered in manifest order: built-in
/// ones from the metrics, producer ones made up (NaN when `unknown`).
fn probe_columns(plugin: &PluginHandle, candidates: &Candidates, unknown: bool) -> Vec<f32> {
    let n = candidates.len();
    let table = Table::new(candidates, BUILT_IN.len());
    let mut out = Vec::new();
    for column in &plugin.core().manifest().reads {
        match BUILT_IN.iter().position(|b| b == column) {
            Some(slot) => out.extend_from_slice(table.column(slot)),
            None if unknown => out.extend(std::iter::repeat_n(f32::NAN, n)),
            None if column.ends_with("/total-blocks") => out.extend(std::iter::repeat_n(4.0, n)),
            None if column.ends_with("/block-tokens") => out.extend(std::iter::repeat_n(64.0, n)),
            None => out.extend((0..n).map(|i| (i % 5) as f32)),
        }
    }
    out
}

/// One call of the plugin's role (cycle `cycle`), with its output validated.
pub fn check_call(
    plugin: &PluginHandle,
    cycle: u64,
    req: &Request,
    candidates: &Candidates,
    unknown: bool,
) -> Result<(), CallError> {
    let n = candidates.len();
    let columns = probe_columns(plugin, candidates, unknown);
    let input = CallInput { cycle, request: req, ids: &candidates.ids, columns: &columns };
    match plugin {
        PluginHandle::Producer(p) => {
            let writes = p.manifest().writes.len();
            let values = p.produce(&input)?;
            if values.len() != n * writes {
                return Err(CallError::Invalid(format!(
                    "returned {} values for {writes} columns of {n} endpoints",
                    values.len()
                )));
            }
        }
        PluginHandle::Filter(f) => {
            let kept = f.filter(&input)?;
            if let Some(bad) = kept.iter().find(|id| !candidates.ids.contains(id)) {
                return Err(CallError::Invalid(format!("kept endpoint id {bad}, which was not a candidate")));
            }
        }
        PluginHandle::Scorer(s) => {
            let scores = s.score(&input)?;
            if scores.len() != n {
                return Err(CallError::Invalid(format!("returned {} scores for {n} endpoints", scores.len())));
            }
            if let Some(bad) = scores.iter().find(|s| !(s.is_finite() && (0.0..=1.0).contains(*s))) {
                return Err(CallError::Invalid(format!("returned score {bad}; scores must be finite and in [0, 1]")));
            }
        }
        PluginHandle::Picker(p) => {
            let scores: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
            let picked = p.pick(&input, &scores)?;
            if n > 0 && picked.is_empty() {
                return Err(CallError::Invalid(format!("picked nothing out of {n} endpoints")));
            }
            if let Some(bad) = picked.iter().find(|id| !candidates.ids.contains(id)) {
                return Err(CallError::Invalid(format!("picked endpoint id {bad}, which was not a candidate")));
            }
        }
    }
    Ok(())
}

/// The hooks the manifest declares, for a request of cycle `cycle` sent to `endpoint`.
fn check_hooks(plugin: &PluginHandle, cycle: u64, endpoint: u32) -> Result<(), CallError> {
    let p = plugin.core();
    let headers = p.decided(cycle, endpoint)?;
    if let Some((name, _)) = headers.iter().find(|(k, v)| !valid_header(k, v)) {
        return Err(CallError::Invalid(format!(
            "decided returned the header `{name}`, which is not a valid HTTP header"
        )));
    }
    p.first_chunk(cycle, endpoint, 1_000 + cycle)?;
    Ok(p.finished(cycle, &Completion { endpoint, status: 200, ..Default::default() })?)
}

/// A header a plugin may add to a response: a token name (lower case, not a pseudo-header
/// or hop-by-hop header) and a value without control characters.
pub fn valid_header(name: &str, value: &str) -> bool {
    let token = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b));
    let reserved = matches!(name, "content-length" | "transfer-encoding" | "connection" | "host" | "te" | "upgrade");
    token && !reserved && value.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}
