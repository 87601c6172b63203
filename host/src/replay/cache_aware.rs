//! A model of the `cache_aware` policy of the routers operators install beside Envoy
//! (`sglang-router`, `vllm-router`), written from their documented algorithm, so that `epp
//! replay` can compare the EPP with them on clusters too large for one machine. The live
//! benchmark runs the real routers on the same workloads; the two are checked to agree.
//!
//! The algorithm: the router counts its own requests in flight per worker. When the load is
//! imbalanced — `max − min > balance_abs_threshold` and `max > min × balance_rel_threshold`
//! — it sends the request to the least loaded worker. Otherwise it finds the worker whose
//! approximate prefix tree (the text of the requests it was sent) shares the longest prefix
//! with the request; if that covers more than `cache_threshold` of the request, the request
//! goes there, else to the worker with the smallest tree. The chosen worker's tree learns
//! the request. Trees are bounded at `max_tree_size` characters (2^26: not reached here).
//!
//! The trees are modelled at the granularity of 16-byte chunks (chained hashes), which
//! rounds a shared prefix down by at most 15 characters.

use std::collections::{HashMap, HashSet};

/// The peers' defaults (both routers).
pub const CACHE_THRESHOLD: f64 = 0.3;
pub const BALANCE_ABS_THRESHOLD: usize = 64;
pub const BALANCE_REL_THRESHOLD: f64 = 1.5;
/// Characters per modelled tree chunk.
const CHUNK: usize = 16;

#[derive(Debug, Default)]
pub struct CacheAware {
    /// Per worker: the chained chunk hashes of every request sent to it.
    trees: HashMap<u32, HashSet<u64>>,
    /// Requests in flight per worker (routed, not finished).
    in_flight: HashMap<u32, usize>,
}

fn chunk_hashes(prompt: &[u8]) -> Vec<u64> {
    let mut prev = 0u64;
    prompt
        .chunks_exact(CHUNK)
        .map(|c| {
            let mut buf = [0u8; CHUNK + 8];
            buf[..CHUNK].copy_from_slice(c);
            buf[CHUNK..].copy_from_slice(&prev.to_le_bytes());
            prev = xxhash_rust::xxh3::xxh3_64(&buf);
            prev
        })
        .collect()
}

impl CacheAware {
    /// The worker for a request with `prompt` among `workers` (ids in pool order).
    pub fn route(&mut self, prompt: &[u8], workers: &[u32]) -> Option<u32> {
        let load = |w: &u32| self.in_flight.get(w).copied().unwrap_or(0);
        let (min, max) = workers.iter().fold((usize::MAX, 0), |(lo, hi), w| (lo.min(load(w)), hi.max(load(w))));
        let imbalanced =
            max.saturating_sub(min) > BALANCE_ABS_THRESHOLD && max as f64 > min as f64 * BALANCE_REL_THRESHOLD;
        let hashes = chunk_hashes(prompt);
        let pick = if imbalanced {
            workers.iter().copied().min_by_key(|w| load(w))?
        } else {
            let matched = |w: &u32| {
                let tree = self.trees.get(w);
                hashes.iter().take_while(|h| tree.is_some_and(|t| t.contains(h))).count()
            };
            let best = workers.iter().copied().max_by_key(|w| (matched(w), std::cmp::Reverse(*w)))?;
            let rate = if prompt.is_empty() { 0.0 } else { (matched(&best) * CHUNK) as f64 / prompt.len() as f64 };
            if rate > CACHE_THRESHOLD {
                best
            } else {
                let size = |w: &u32| self.trees.get(w).map_or(0, HashSet::len);
                workers.iter().copied().min_by_key(|w| (size(w), *w))?
            }
        };
        self.trees.entry(pick).or_default().extend(hashes);
        *self.in_flight.entry(pick).or_default() += 1;
        Some(pick)
    }

    /// A request sent to `worker` finished.
    pub fn finished(&mut self, worker: u32) {
        if let Some(n) = self.in_flight.get_mut(&worker) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefixes_stick_and_new_ones_go_to_the_smallest_tree() {
        let mut r = CacheAware::default();
        let workers = [0, 1, 2];
        let a = "a".repeat(400).into_bytes();
        let b = "b".repeat(400).into_bytes();
        let first = r.route(&a, &workers).unwrap();
        assert_eq!(first, 0, "empty trees: the first worker");
        assert_eq!(r.route(&b, &workers), Some(1), "a new prefix goes to a worker with the smallest tree");
        let mut a2 = a.clone();
        a2.extend_from_slice(b"follow-up question");
        assert_eq!(r.route(&a2, &workers), Some(0), "a shared prefix sticks");
        // Heavy imbalance overrides affinity: once worker 0 has more than
        // BALANCE_ABS_THRESHOLD requests beyond the least loaded, that one gets the next.
        let mut picks = Vec::new();
        for _ in 0..BALANCE_ABS_THRESHOLD + 2 {
            picks.push(r.route(&a, &workers).unwrap_or(u32::MAX));
        }
        let moved = picks.iter().position(|&w| w != 0).unwrap_or_else(|| panic!("never moved: {picks:?}"));
        assert_eq!(moved, BALANCE_ABS_THRESHOLD - 1, "worker 0 held 2 + {moved} = 65 > 64 + 0 when it moved");
        assert_eq!(picks[moved], 2, "to the least loaded worker");
        for _ in 0..200 {
            r.finished(0);
        }
        assert_eq!(r.route(&a, &workers), Some(0));
    }
}
