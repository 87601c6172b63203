//! `token-load-scorer`: prefers endpoints with less prompt work waiting, counting the
//! request itself, as upstream: `T = inflight tokens + this request's uncached tokens` on
//! the endpoint (from `inflight-load-producer`), score `1 − min(T, Q) / Q` with
//! `Q = queueThresholdTokens`, and 1.0 when `T ≤ 0`. Because the request's own tokens
//! exclude what the endpoint has cached, the score is cache-aware. Unknown load scores 0.
//! Stateless.

use llmd_plugin_sdk::columns::{INFLIGHT_TOKENS, REQUEST_UNCACHED_TOKENS};
use llmd_plugin_sdk::{Cycle, Manifest, Plugin, Scorer, params};
use serde::Deserialize;

/// 128 requests × 32K tokens, upstream's default.
pub const DEFAULT_QUEUE_THRESHOLD_TOKENS: i64 = 4_194_304;

#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub queue_threshold_tokens: i64,
    /// Accepted for config compatibility: the columns are always the default producer's.
    pub in_flight_load_producer_name: String,
    /// Weight of non-text (multimodal) tokens; text-only here, accepted and unused.
    pub non_text_token_weight: Option<f64>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            queue_threshold_tokens: DEFAULT_QUEUE_THRESHOLD_TOKENS,
            in_flight_load_producer_name: String::new(),
            non_text_token_weight: None,
        }
    }
}

pub struct TokenLoadScorer {
    threshold: f32,
}

impl Default for TokenLoadScorer {
    fn default() -> Self {
        TokenLoadScorer { threshold: DEFAULT_QUEUE_THRESHOLD_TOKENS as f32 }
    }
}

impl Plugin for TokenLoadScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        // As upstream: a threshold of 0 or less falls back to the default.
        let t = if p.queue_threshold_tokens > 0 { p.queue_threshold_tokens } else { DEFAULT_QUEUE_THRESHOLD_TOKENS };
        self.threshold = t as f32;
        Ok(Manifest::stateless(&[INFLIGHT_TOKENS, REQUEST_UNCACHED_TOKENS]))
    }
}

impl Scorer for TokenLoadScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        (0..cycle.len())
            .map(|i| {
                let tokens = cycle.value(0, i) + cycle.value(1, i);
                if !tokens.is_finite() {
                    0.0
                } else if tokens <= 0.0 {
                    1.0
                } else {
                    1.0 - tokens.min(self.threshold) / self.threshold
                }
            })
            .collect()
    }
}

llmd_plugin_sdk::export_scorer!(TokenLoadScorer);
