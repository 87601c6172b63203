//! `active-request-scorer`: prefers endpoints with fewer requests the EPP has in flight on
//! them (from `inflight-load-producer`), as upstream: 1.0 at or below `idleThreshold`,
//! otherwise `(max − count) / max × maxBusyScore` where `max` is the busiest candidate's
//! count, so the busiest scores 0. Unknown counts score 0. Stateless.

use llmd_plugin_sdk::columns::INFLIGHT_REQUESTS;
use llmd_plugin_sdk::{Cycle, Manifest, Plugin, Scorer, params};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub idle_threshold: i64,
    pub max_busy_score: Option<f64>,
    /// Deprecated upstream and ignored.
    pub request_timeout: Option<String>,
    pub in_flight_load_producer_name: String,
}

pub struct ActiveRequestScorer {
    idle: f32,
    max_busy: f32,
}

impl Default for ActiveRequestScorer {
    fn default() -> Self {
        ActiveRequestScorer { idle: 0.0, max_busy: 1.0 }
    }
}

impl Plugin for ActiveRequestScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        if let Some(s) = p.max_busy_score
            && !(0.0..=1.0).contains(&s)
        {
            return Err(format!("maxBusyScore must be in [0, 1], got {s}"));
        }
        if p.idle_threshold < 0 {
            return Err(format!("idleThreshold must be ≥ 0, got {}", p.idle_threshold));
        }
        self.idle = p.idle_threshold as f32;
        self.max_busy = p.max_busy_score.unwrap_or(1.0) as f32;
        Ok(Manifest::stateless(&[INFLIGHT_REQUESTS]))
    }
}

impl Scorer for ActiveRequestScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        let counts = cycle.column(0);
        let max = counts.iter().copied().filter(|c| c.is_finite()).fold(0.0f32, f32::max);
        counts
            .iter()
            .map(|&c| {
                if !c.is_finite() {
                    0.0
                } else if c <= self.idle {
                    1.0
                } else if max > 0.0 {
                    ((max - c) / max * self.max_busy).clamp(0.0, 1.0)
                } else {
                    1.0
                }
            })
            .collect()
    }
}

llmd_plugin_sdk::export_scorer!(ActiveRequestScorer);
