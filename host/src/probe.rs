//! The probe a plugin must pass before it may serve traffic (at start-up, on every reload,
//! and in `epp plugin check`): calls over 0, 1 and 64 endpoints, with fresh, unknown (NaN)
//! and stale metrics, checking that outputs have the right shape and range and that every
//! call returns within the plugin's time limit.
//!
//! It talks to plugins only through the scheduler's traits; it never publishes anything.

use std::time::{Duration, Instant};

use llmd_plugin_sdk::{Column, EndpointInfo, Metrics, Request};

use crate::scheduler::{PluginError, PluginHandle};

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
}

fn fail(case: &str, reason: impl Into<String>) -> ProbeError {
    ProbeError { case: case.to_string(), reason: reason.into() }
}

/// A synthetic pool of `n` endpoints with labels and LoRA data.
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
        })
        .collect()
}

/// Metrics for `pool`: `kind` is "fresh", "unknown" (NaN everywhere) or "stale" (old).
pub fn synthetic_metrics(pool: &[EndpointInfo], kind: &str) -> Metrics {
    let n = pool.len();
    let (nan, age) = match kind {
        "unknown" => (true, u32::MAX),
        "stale" => (false, 60_000),
        _ => (false, 20),
    };
    let v = |i: usize, scale: f32| if nan { f32::NAN } else { (i % 7) as f32 * scale };
    Metrics {
        ids: pool.iter().map(|e| e.id).collect(),
        waiting: (0..n).map(|i| v(i, 1.0)).collect(),
        running: (0..n).map(|i| v(i, 2.0)).collect(),
        kv_usage: (0..n).map(|i| v(i, 0.1)).collect(),
        age_ms: vec![age; n],
    }
}

/// A request whose prompt is a few kilobytes of repeated text.
pub fn synthetic_request(i: usize, prompt_bytes: usize) -> Request {
    let text = "The quick brown fox jumps over the lazy dog. ";
    Request {
        id: format!("probe-request-{i}"),
        model: "lora-1".into(),
        prompt: text.bytes().cycle().take(prompt_bytes).collect(),
        cache_salt: None,
        headers: vec![("x-probe".into(), "1".into())],
        priority: 0,
        random_seed: i as u64,
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
        plugin.core().pool_changed(u64::from(n) + 1, &pool).map_err(|e| fail(&case, e.to_string()))?;
        calls.push(ProbeCall { case, elapsed: started.elapsed() });
        for kind in ["fresh", "unknown", "stale"] {
            i += 1;
            let case = format!("{}/{n}-endpoints/{kind}", plugin.role());
            let metrics = synthetic_metrics(&pool, kind);
            let req = synthetic_request(i, 4096);
            let started = Instant::now();
            check_call(plugin, &req, &metrics).map_err(|reason| fail(&case, reason))?;
            calls.push(ProbeCall { case, elapsed: started.elapsed() });
        }
    }
    Ok(calls)
}

/// One call of the plugin's role, with its output validated.
pub fn check_call(plugin: &PluginHandle, req: &Request, m: &Metrics) -> Result<(), String> {
    let n = m.len();
    let err = |e: PluginError| e.to_string();
    match plugin {
        PluginHandle::Producer(p) => {
            for col in p.produce(req, m).map_err(err)? {
                if col.values.len() != n {
                    return Err(format!("column {} has {} values for {n} endpoints", col.name, col.values.len()));
                }
            }
        }
        PluginHandle::Filter(f) => {
            let kept = f.filter(req, m, &probe_columns(n)).map_err(err)?;
            if let Some(bad) = kept.iter().find(|id| !m.ids.contains(id)) {
                return Err(format!("kept endpoint id {bad}, which was not a candidate"));
            }
        }
        PluginHandle::Scorer(s) => {
            let scores = s.score(req, m, &probe_columns(n)).map_err(err)?;
            if scores.len() != n {
                return Err(format!("returned {} scores for {n} endpoints", scores.len()));
            }
            if let Some(bad) = scores.iter().find(|s| !(s.is_finite() && (0.0..=1.0).contains(*s))) {
                return Err(format!("returned score {bad}; scores must be finite and in [0, 1]"));
            }
        }
        PluginHandle::Picker(p) => {
            let scores: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
            let picked = p.pick(req, m, &scores).map_err(err)?;
            if n > 0 && picked.is_empty() {
                return Err(format!("picked nothing out of {n} endpoints"));
            }
            if let Some(bad) = picked.iter().find(|id| !m.ids.contains(id)) {
                return Err(format!("picked endpoint id {bad}, which was not a candidate"));
            }
        }
    }
    Ok(())
}

/// The prefix columns a scorer may expect, filled with plausible values.
fn probe_columns(n: usize) -> Vec<Column> {
    use llmd_plugin_sdk::columns::{PREFIX_MATCHED_BLOCKS, PREFIX_TOTAL_BLOCKS};
    vec![
        Column { name: PREFIX_MATCHED_BLOCKS.into(), values: (0..n).map(|i| (i % 4) as f32).collect() },
        Column { name: PREFIX_TOTAL_BLOCKS.into(), values: vec![4.0; n] },
    ]
}
