//! `queue-scorer`: prefers short waiting queues, min-max normalised over the candidates:
//! `(max − q) / (max − min)`, and 1.0 for all when every known queue is equal. An endpoint
//! whose queue is unknown (NaN) scores 0 and does not move the min/max of the others.

use llmd_plugin_sdk::{Column, Metrics, Plugin, Request, Scorer};

#[derive(Default)]
pub struct QueueScorer;

impl Plugin for QueueScorer {}

impl Scorer for QueueScorer {
    fn score(&mut self, _req: &Request, metrics: &Metrics, _columns: &[Column]) -> Vec<f32> {
        let n = metrics.ids.len();
        let queue = |i: usize| metrics.waiting.get(i).copied().filter(|q| q.is_finite());
        let known = (0..n).filter_map(queue);
        let (min, max) = known.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), q| (lo.min(q), hi.max(q)));
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
