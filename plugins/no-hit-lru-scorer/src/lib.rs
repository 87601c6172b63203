//! `no-hit-lru-scorer`: spreads *cold* requests (no candidate holds any of their prefix)
//! over the endpoints that have gone longest without a cold request, so that new prefixes
//! — and the cache they grow — land evenly across workers.
//!
//! Warm requests score 0.5 everywhere (neutral). For a cold request over n candidates,
//! endpoints that never received a cold request come first, the i-th of them (in candidate
//! order) scoring `1 − i/(n−1)`; then endpoints that did, oldest use first, at rank
//! `never_used + position` scoring `max(0, 1 − rank/(n−1))`. One candidate scores 1.0.
//! After a cold request is routed, its primary endpoint becomes the most recently used.
//!
//! Whether a request is cold comes from the prefix producer's columns; this plugin keeps
//! only the recency order.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;

use llmd_plugin_sdk::columns::PREFIX_MATCHED_BLOCKS;
use llmd_plugin_sdk::types::find_column;
use llmd_plugin_sdk::{Column, EndpointInfo, Metrics, Plugin, Request, Scorer, params};
use lru::LruCache;
use serde::Deserialize;

/// Cold/warm verdicts of scored-but-not-yet-routed requests are kept for at most this many.
const PENDING_REQUESTS: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub lru_size: usize,
    /// Accepted for config compatibility: the producer's columns are always read by name.
    pub prefix_plugin_name: Option<String>,
    pub prefix_plugin_type: Option<String>,
}

impl Default for Params {
    fn default() -> Self {
        Params { lru_size: 1024, prefix_plugin_name: None, prefix_plugin_type: None }
    }
}

pub struct NoHitLruScorer {
    /// Endpoint id → tick of its last cold request.
    used: LruCache<u32, u64>,
    tick: u64,
    pending_cold: HashMap<String, bool>,
    pending_order: VecDeque<String>,
}

impl Default for NoHitLruScorer {
    fn default() -> Self {
        NoHitLruScorer::with_capacity(Params::default().lru_size)
    }
}

impl NoHitLruScorer {
    fn with_capacity(capacity: usize) -> Self {
        NoHitLruScorer {
            used: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
            tick: 0,
            pending_cold: HashMap::new(),
            pending_order: VecDeque::new(),
        }
    }

    fn remember(&mut self, id: &str, cold: bool) {
        if self.pending_cold.insert(id.to_string(), cold).is_none() {
            self.pending_order.push_back(id.to_string());
        }
        while self.pending_order.len() > PENDING_REQUESTS {
            if let Some(old) = self.pending_order.pop_front() {
                self.pending_cold.remove(&old);
            }
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
    fn configure(&mut self, params_json: &str) -> Result<(), String> {
        let p: Params = params::parse(params_json)?;
        if p.lru_size == 0 {
            return Err("lruSize must be at least 1".into());
        }
        *self = NoHitLruScorer::with_capacity(p.lru_size);
        Ok(())
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        let gone: Vec<u32> =
            self.used.iter().map(|(id, _)| *id).filter(|id| !endpoints.iter().any(|e| e.id == *id)).collect();
        for id in gone {
            self.used.pop(&id);
        }
    }

    fn pre_request(&mut self, request_id: &str, chosen: &[u32]) {
        let Some(cold) = self.pending_cold.remove(request_id) else {
            return;
        };
        self.pending_order.retain(|id| id != request_id);
        if let (true, Some(&primary)) = (cold, chosen.first()) {
            self.tick += 1;
            self.used.put(primary, self.tick);
        }
    }
}

impl Scorer for NoHitLruScorer {
    fn score(&mut self, req: &Request, metrics: &Metrics, columns: &[Column]) -> Vec<f32> {
        let n = metrics.ids.len();
        let cold = match find_column(columns, PREFIX_MATCHED_BLOCKS) {
            Some(col) => !col.values.iter().any(|&m| m > 0.0),
            None => true,
        };
        self.remember(&req.id, cold);
        if !cold {
            return vec![0.5; n];
        }
        let last_use: Vec<Option<u64>> = metrics.ids.iter().map(|id| self.used.peek(id).copied()).collect();
        cold_scores(&last_use)
    }
}

llmd_plugin_sdk::export_scorer!(NoHitLruScorer);
