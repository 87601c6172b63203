//! `load-aware-scorer`: scores an endpoint by its waiting queue (`vllm:num_requests_waiting`)
//! on upstream's scale, which tops out at 0.5: an empty queue scores 0.5, a queue of
//! `threshold` (default 128) or more scores 0, linearly in between
//! (`0.5 × (1 − waiting / threshold)`). As upstream, a `threshold` of 0 or below means the
//! default. An endpoint whose queue is unknown (missing or stale metrics) scores 0, as in
//! `queue-scorer`, where upstream reads it as an empty queue.

use llmd_plugin_sdk::columns::WAITING;
use llmd_plugin_sdk::{Cycle, Manifest, Plugin, Scorer, params};
use serde::Deserialize;

pub const DEFAULT_THRESHOLD: i64 = 128;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    pub threshold: Option<i64>,
}

pub struct LoadAwareScorer {
    threshold: f32,
}

impl Default for LoadAwareScorer {
    fn default() -> Self {
        LoadAwareScorer { threshold: DEFAULT_THRESHOLD as f32 }
    }
}

impl Plugin for LoadAwareScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        let threshold = p.threshold.filter(|t| *t > 0).unwrap_or(DEFAULT_THRESHOLD);
        self.threshold = threshold as f32;
        Ok(Manifest::stateless(&[WAITING]))
    }
}

impl Scorer for LoadAwareScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        cycle
            .column(0)
            .iter()
            .map(|&w| if !w.is_finite() { 0.0 } else { 0.5 * (1.0 - w.clamp(0.0, self.threshold) / self.threshold) })
            .collect()
    }
}

llmd_plugin_sdk::export_scorer!(LoadAwareScorer);
