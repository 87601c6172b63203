//! `prefix-cache-scorer`: score = prefix blocks the endpoint likely holds ÷ blocks in the
//! request, read from the columns of `approx-prefix-cache-producer`. A request with no full
//! block, or a cycle without the producer's columns, scores 0 everywhere.
//!
//! It keeps no state: the index lives in the producer.

use llmd_plugin_sdk::columns::{PREFIX_MATCHED_BLOCKS, PREFIX_TOTAL_BLOCKS};
use llmd_plugin_sdk::types::find_column;
use llmd_plugin_sdk::{Column, Metrics, Plugin, Request, Scorer};

#[derive(Default)]
pub struct PrefixCacheScorer;

impl Plugin for PrefixCacheScorer {}

impl Scorer for PrefixCacheScorer {
    fn score(&mut self, _req: &Request, metrics: &Metrics, columns: &[Column]) -> Vec<f32> {
        let n = metrics.ids.len();
        let (Some(matched), Some(total)) =
            (find_column(columns, PREFIX_MATCHED_BLOCKS), find_column(columns, PREFIX_TOTAL_BLOCKS))
        else {
            return vec![0.0; n];
        };
        (0..n)
            .map(|i| {
                let m = matched.values.get(i).copied().unwrap_or(0.0);
                let t = total.values.get(i).copied().unwrap_or(0.0);
                if t > 0.0 && m.is_finite() { (m / t).clamp(0.0, 1.0) } else { 0.0 }
            })
            .collect()
    }
}

llmd_plugin_sdk::export_scorer!(PrefixCacheScorer);
