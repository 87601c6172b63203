//! `kv-cache-utilization-scorer`: score = 1 − KV-cache usage, so endpoints with free cache
//! win. Unknown (NaN) usage scores 0: an endpoint we know nothing about is not preferred.

use llmd_plugin_sdk::{Column, Metrics, Plugin, Request, Scorer};

#[derive(Default)]
pub struct KvCacheUtilizationScorer;

impl Plugin for KvCacheUtilizationScorer {}

impl Scorer for KvCacheUtilizationScorer {
    fn score(&mut self, _req: &Request, metrics: &Metrics, _columns: &[Column]) -> Vec<f32> {
        (0..metrics.ids.len())
            .map(|i| match metrics.kv_usage.get(i) {
                Some(&kv) if kv.is_finite() => (1.0 - kv).clamp(0.0, 1.0),
                _ => 0.0,
            })
            .collect()
    }
}

llmd_plugin_sdk::export_scorer!(KvCacheUtilizationScorer);
