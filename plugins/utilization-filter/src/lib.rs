//! `utilization-filter`: drops the candidates whose load exceeds a cap, as upstream:
//!
//! ```yaml
//! parameters:
//!   conditions:
//!     - {metric: running-requests, maxValue: 40}
//!     - {metric: waiting-queue, maxValue: 0}
//!   fallbackOnEmpty: true
//! ```
//!
//! An endpoint is kept when every condition holds (`value ≤ maxValue`), so several
//! conditions drop it when any one is exceeded. Metrics: `active-requests` (the requests the
//! EPP has in flight on it, from `inflight-load-producer`, which a profile with this filter
//! gets when a condition names it), `running-requests`, `waiting-queue` and
//! `kv-cache-utilization` (a fraction, `maxValue` ≤ 1) from the worker's metrics. A value
//! that is unknown (metrics missing or stale) counts as 0, as upstream. When no one is
//! left, `fallbackOnEmpty: true` keeps every candidate; otherwise the request fails with
//! 503 naming the filter. Stateless.

use llmd_plugin_sdk::columns::{INFLIGHT_REQUESTS, KV_USAGE, RUNNING, WAITING};
use llmd_plugin_sdk::{Cycle, Filter, Manifest, Plugin, params};
use serde::Deserialize;

/// (metric name in the config, column it reads).
const METRICS: [(&str, &str); 4] = [
    ("active-requests", INFLIGHT_REQUESTS),
    ("running-requests", RUNNING),
    ("waiting-queue", WAITING),
    ("kv-cache-utilization", KV_USAGE),
];

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub conditions: Vec<Condition>,
    pub fallback_on_empty: bool,
    /// Which in-flight producer to read; there is one, so any name reads it.
    pub in_flight_load_producer_name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub metric: String,
    pub max_value: Option<f64>,
}

#[derive(Default)]
pub struct UtilizationFilter {
    /// (column position in the manifest's reads, cap), one per condition.
    caps: Vec<(usize, f32)>,
    fallback_on_empty: bool,
}

impl Plugin for UtilizationFilter {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        if p.conditions.is_empty() {
            return Err("conditions: at least one condition is required".into());
        }
        let mut reads: Vec<&str> = Vec::new();
        let mut caps = Vec::new();
        for (i, c) in p.conditions.iter().enumerate() {
            let Some(&(_, column)) = METRICS.iter().find(|(name, _)| *name == c.metric) else {
                let names: Vec<&str> = METRICS.iter().map(|(n, _)| *n).collect();
                return Err(format!("conditions[{i}].metric `{}`: expected one of {}", c.metric, names.join(", ")));
            };
            let max = c.max_value.ok_or_else(|| format!("conditions[{i}].maxValue is required"))?;
            if !max.is_finite() || max < 0.0 {
                return Err(format!("conditions[{i}].maxValue must be a number ≥ 0, got {max}"));
            }
            if column == KV_USAGE && max > 1.0 {
                return Err(format!(
                    "conditions[{i}].maxValue for kv-cache-utilization is a fraction and must be at most 1, got {max}"
                ));
            }
            let k = reads.iter().position(|r| *r == column).unwrap_or_else(|| {
                reads.push(column);
                reads.len() - 1
            });
            caps.push((k, max as f32));
        }
        *self = UtilizationFilter { caps, fallback_on_empty: p.fallback_on_empty };
        Ok(Manifest::stateless(&reads))
    }
}

impl Filter for UtilizationFilter {
    fn filter(&mut self, cycle: &Cycle) -> Vec<u32> {
        let within = |i: usize| {
            self.caps.iter().all(|&(k, max)| {
                let v = cycle.value(k, i);
                (if v.is_finite() { v } else { 0.0 }) <= max
            })
        };
        let kept: Vec<u32> = (0..cycle.len()).filter(|&i| within(i)).map(|i| cycle.ids[i]).collect();
        if kept.is_empty() && self.fallback_on_empty { cycle.ids.clone() } else { kept }
    }
}

llmd_plugin_sdk::export_filter!(UtilizationFilter);
