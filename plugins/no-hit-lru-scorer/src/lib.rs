//! `no-hit-lru-scorer`: spreads *cold* requests (no candidate holds any of their prefix)
//! over the endpoints that have gone longest without a cold request, so that new prefixes
//! — and the cache they grow — land evenly across workers.
//!
//! Warm requests score 0.5 everywhere (neutral). For a cold request over n candidates,
//! endpoints that never received a cold request come first, the i-th of them (in candidate
//! order) scoring `1 − i/(n−1)`; then endpoints that did, oldest use first, at rank
//! `never_used + position` scoring `max(0, 1 − rank/(n−1))`. One candidate scores 1.0.
//! After a cold request is routed (`decided`), its endpoint becomes the most recently used.
//!
//! Whether a request is cold comes from the prefix producer's matched-blocks column; this
//! plugin keeps only the recency order.

use std::num::NonZeroUsize;

use llmd_plugin_sdk::columns::{prefix_matched, prefix_namespace};
use llmd_plugin_sdk::pending::Pending;
use llmd_plugin_sdk::{Cycle, EndpointInfo, Manifest, Needs, Plugin, Scorer, params};
use lru::LruCache;
use serde::Deserialize;

/// Cold verdicts of scored-but-not-yet-routed cycles are kept for at most this many.
const PENDING_CYCLES: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub lru_size: i64,
    pub prefix_match_info_producer_name: String,
    /// Accepted for config compatibility; never used (upstream deprecated them too).
    pub prefix_plugin_name: Option<String>,
    pub prefix_plugin_type: Option<String>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            lru_size: 1024,
            prefix_match_info_producer_name: String::new(),
            prefix_plugin_name: None,
            prefix_plugin_type: None,
        }
    }
}

pub struct NoHitLruScorer {
    /// Endpoint id → tick of its last cold request.
    used: LruCache<u32, u64>,
    tick: u64,
    cold: Pending<bool>,
}

impl Default for NoHitLruScorer {
    fn default() -> Self {
        NoHitLruScorer::with_capacity(1024)
    }
}

impl NoHitLruScorer {
    fn with_capacity(capacity: usize) -> Self {
        NoHitLruScorer {
            used: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
            tick: 0,
            cold: Pending::new(PENDING_CYCLES),
        }
    }
}

/// Scores for a cold request; `last_use[i]` is candidate i's last cold tick, if any.
pub fn cold_scores(last_use: &[Option<u64>]) -> Vec<f32> {
    let n = last_use.len();
    if n == 1 {
        return vec![1.0];
    }
    let denom = (n.saturating_sub(1)).max(1) as f32;
    let mut scores = vec![0.0f32; n];
    let mut rank = 0usize;
    for (i, lu) in last_use.iter().enumerate() {
        if lu.is_none() {
            scores[i] = 1.0 - rank as f32 / denom;
            rank += 1;
        }
    }
    let mut used: Vec<(u64, usize)> = last_use.iter().enumerate().filter_map(|(i, lu)| lu.map(|t| (t, i))).collect();
    used.sort_unstable();
    for (_, i) in used {
        scores[i] = (1.0 - rank as f32 / denom).max(0.0);
        rank += 1;
    }
    scores
}

impl Plugin for NoHitLruScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        // As upstream: a size of 0 or less falls back to the default.
        let size = if p.lru_size > 0 { p.lru_size as usize } else { Params::default().lru_size as usize };
        *self = NoHitLruScorer::with_capacity(size);
        let matched = prefix_matched(prefix_namespace(&p.prefix_match_info_producer_name));
        Ok(Manifest {
            needs: Needs { pool: true, decided: true, ..Default::default() },
            reads: vec![matched],
            ..Default::default()
        })
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        let gone: Vec<u32> =
            self.used.iter().map(|(id, _)| *id).filter(|id| !endpoints.iter().any(|e| e.id == *id)).collect();
        for id in gone {
            self.used.pop(&id);
        }
    }

    fn decided(&mut self, cycle: u64, endpoint: u32) -> Vec<(String, String)> {
        if self.cold.take(cycle) == Some(true) {
            self.tick += 1;
            self.used.put(endpoint, self.tick);
        }
        Vec::new()
    }
}

impl Scorer for NoHitLruScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        let n = cycle.len();
        // Unknown (NaN, the producer failed) counts as no hit, as a missing attribute does.
        let cold = !cycle.column(0).iter().any(|&m| m > 0.0);
        self.cold.insert(cycle.id, cold);
        if !cold {
            return vec![0.5; n];
        }
        let last_use: Vec<Option<u64>> = cycle.ids.iter().map(|id| self.used.peek(id).copied()).collect();
        cold_scores(&last_use)
    }
}

llmd_plugin_sdk::export_scorer!(NoHitLruScorer);
