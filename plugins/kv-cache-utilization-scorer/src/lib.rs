//! `kv-cache-utilization-scorer`: score = 1 − KV-cache usage, so endpoints with free cache
//! win. Unknown (NaN: missing or stale) usage scores 0: an endpoint we know nothing about is
//! not preferred (upstream reads a missing metric as 0 usage, which scores best).

use llmd_plugin_sdk::columns::KV_USAGE;
use llmd_plugin_sdk::{Cycle, Manifest, Plugin, Scorer, params};

#[derive(Default)]
pub struct KvCacheUtilizationScorer;

impl Plugin for KvCacheUtilizationScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        params::parse::<params::NoParams>(params_json)?;
        Ok(Manifest::stateless(&[KV_USAGE]))
    }
}

impl Scorer for KvCacheUtilizationScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        cycle.column(0).iter().map(|&kv| if kv.is_finite() { (1.0 - kv).clamp(0.0, 1.0) } else { 0.0 }).collect()
    }
}

llmd_plugin_sdk::export_scorer!(KvCacheUtilizationScorer);
