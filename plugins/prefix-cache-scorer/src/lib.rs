//! `prefix-cache-scorer`: how much of the request's prefix each candidate likely holds,
//! read from a prefix producer's columns (`approx-prefix-cache-producer` by default,
//! `precise-prefix-cache-producer` with `prefixMatchInfoProducerName`). As upstream:
//!
//! `score = w × min(1, matched_tokens / matchLengthScaleTokens)² + (1 − w) × matched / total`
//!
//! with `w = matchLengthWeight` (default 0: the plain match ratio). A request with no block,
//! or a cycle whose producer failed, scores 0 everywhere. Stateless.
//!
//! For configs written for older EPPs, whose prefix scorer carried the index, the index
//! parameters (`blockSize`, `blockSizeTokens`, `maxPrefixBlocksToMatch`,
//! `lruCapacityPerServer`, `autoTune`, …) are accepted here: the host hands them to the
//! implicit producer it adds, and this plugin ignores them.

use llmd_plugin_sdk::columns::{prefix_block_tokens, prefix_matched, prefix_namespace, prefix_total};
use llmd_plugin_sdk::{Cycle, Manifest, Plugin, Scorer, params};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub prefix_match_info_producer_name: String,
    pub match_length_weight: f32,
    pub match_length_scale_tokens: u32,
    // Older index parameters, accepted and left to the producer.
    pub block_size: Option<serde_json::Value>,
    pub block_size_tokens: Option<serde_json::Value>,
    pub max_prefix_blocks_to_match: Option<serde_json::Value>,
    pub max_prefix_tokens_to_match: Option<serde_json::Value>,
    pub lru_capacity_per_server: Option<serde_json::Value>,
    pub auto_tune: Option<serde_json::Value>,
    pub hash_block_size: Option<serde_json::Value>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            prefix_match_info_producer_name: String::new(),
            match_length_weight: 0.0,
            match_length_scale_tokens: 8192,
            block_size: None,
            block_size_tokens: None,
            max_prefix_blocks_to_match: None,
            max_prefix_tokens_to_match: None,
            lru_capacity_per_server: None,
            auto_tune: None,
            hash_block_size: None,
        }
    }
}

#[derive(Default)]
pub struct PrefixCacheScorer {
    weight: f32,
    scale_tokens: f32,
}

impl Plugin for PrefixCacheScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        if !(0.0..=1.0).contains(&p.match_length_weight) {
            return Err(format!("matchLengthWeight must be in [0, 1], got {}", p.match_length_weight));
        }
        if p.match_length_weight > 0.0 && p.match_length_scale_tokens == 0 {
            return Err("matchLengthScaleTokens must be > 0 when matchLengthWeight is".into());
        }
        self.weight = p.match_length_weight;
        self.scale_tokens = p.match_length_scale_tokens as f32;
        let ns = prefix_namespace(&p.prefix_match_info_producer_name);
        let cols = [prefix_matched(ns), prefix_total(ns), prefix_block_tokens(ns)];
        Ok(Manifest::stateless(&cols.iter().map(String::as_str).collect::<Vec<_>>()))
    }
}

impl Scorer for PrefixCacheScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        (0..cycle.len())
            .map(|i| {
                let (m, t, b) = (cycle.value(0, i), cycle.value(1, i), cycle.value(2, i));
                if !(t > 0.0 && m.is_finite()) {
                    return 0.0;
                }
                let ratio = (m / t).clamp(0.0, 1.0);
                if self.weight > 0.0 && b > 0.0 {
                    let length = (m * b / self.scale_tokens).min(1.0);
                    self.weight * length * length + (1.0 - self.weight) * ratio
                } else {
                    ratio
                }
            })
            .collect()
    }
}

llmd_plugin_sdk::export_scorer!(PrefixCacheScorer);
