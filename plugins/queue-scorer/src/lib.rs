//! `queue-scorer`: prefers short waiting queues, min-max normalised over the candidates:
//! `(max − q) / (max − min)`, and 1.0 for all when every known queue is equal. An endpoint
//! whose queue is unknown (NaN) scores 0 and does not move the min/max of the others.

use llmd_plugin_sdk::columns::WAITING;
use llmd_plugin_sdk::{Cycle, Manifest, Plugin, Scorer, params};

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
        let waiting = cycle.column(0);
        let queue = |i: usize| Some(waiting[i]).filter(|q| q.is_finite());
        let n = cycle.len();
        let (min, max) =
            (0..n).filter_map(queue).fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), q| (lo.min(q), hi.max(q)));
        (0..n)
            .map(|i| match queue(i) {
                None => 0.0,
                Some(_) if max <= min => 1.0,
                Some(q) => ((max - q) / (max - min)).clamp(0.0, 1.0),
            })
            .collect()
    }
}

llmd_plugin_sdk::export_scorer!(QueueScorer);
