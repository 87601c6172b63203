//! `running-requests-size-scorer`: prefers endpoints with few requests in their running
//! batch (`vllm:num_requests_running`), min-max normalised over the candidates as upstream:
//! `(max − r) / (max − min)`, 1.0 for all when every known count is equal. An endpoint whose
//! count is unknown (missing or stale metrics) scores 0, as in `queue-scorer`. No
//! parameters.

use llmd_plugin_sdk::columns::RUNNING;
use llmd_plugin_sdk::{Cycle, Manifest, Plugin, Scorer, params, score};

#[derive(Default)]
pub struct RunningRequestsSizeScorer;

impl Plugin for RunningRequestsSizeScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        params::parse::<params::NoParams>(params_json)?;
        Ok(Manifest::stateless(&[RUNNING]))
    }
}

impl Scorer for RunningRequestsSizeScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        score::fewer_is_better(&cycle.column(0))
    }
}

llmd_plugin_sdk::export_scorer!(RunningRequestsSizeScorer);
