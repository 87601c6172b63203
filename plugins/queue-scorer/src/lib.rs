//! `queue-scorer`: prefers short waiting queues, min-max normalised over the candidates:
//! `(max − q) / (max − min)`, and 1.0 for all when every known queue is equal. An endpoint
//! whose queue is unknown (NaN) scores 0 and does not move the min/max of the others.

use llmd_plugin_sdk::columns::WAITING;
use llmd_plugin_sdk::{Cycle, Manifest, Plugin, Scorer, params, score};

#[derive(Default)]
pub struct QueueScorer;

impl Plugin for QueueScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        params::parse::<params::NoParams>(params_json)?;
        Ok(Manifest::stateless(&[WAITING]))
    }
}

impl Scorer for QueueScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        score::fewer_is_better(&cycle.column(0))
    }
}

llmd_plugin_sdk::export_scorer!(QueueScorer);
