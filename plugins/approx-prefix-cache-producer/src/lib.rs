//! `approx-prefix-cache-producer`: an approximate index of which endpoint holds which
//! prompt prefix, publishing per candidate how many leading prefix blocks it likely holds.
//!
//! The prompt is cut into blocks of `blockSizeTokens × 4` bytes (about four characters a
//! token). Block hashes are XXH64, chained: each block's hash covers its bytes followed by
//! the previous hash (little-endian); the chain starts from the hash of the model name and
//! cache salt, so different models or salts never share entries. At most
//! `maxPrefixBlocksToMatch` blocks are used. Each endpoint keeps an LRU of at most
//! `lruCapacityPerServer` block hashes; when a request is routed (`pre-request`), its
//! hashes are recorded for the primary endpoint.
//!
//! It owns the index only: turning matches into scores is the scorers' job.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;

use llmd_plugin_sdk::columns::{PREFIX_INDEXED_BLOCKS, PREFIX_MATCHED_BLOCKS, PREFIX_TOTAL_BLOCKS};
use llmd_plugin_sdk::{Column, EndpointInfo, Metrics, Plugin, Producer, Request, params};
use lru::LruCache;
use serde::Deserialize;
use xxhash_rust::xxh64::{Xxh64, xxh64};

/// Hashes of requests scored but not yet routed are kept for at most this many requests;
/// a request that is never routed (error, client gone) must not leak memory.
const PENDING_REQUESTS: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    /// Tokens per block; a block is `4 ×` this many bytes of prompt.
    pub block_size_tokens: usize,
    /// Older spelling: block size in characters (bytes). Wins over `blockSizeTokens`.
    pub block_size: Option<usize>,
    pub max_prefix_blocks_to_match: usize,
    pub lru_capacity_per_server: usize,
    /// Accepted for config compatibility; tuning from worker cache config is not applied.
    pub auto_tune: Option<bool>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            block_size_tokens: 16,
            block_size: None,
            max_prefix_blocks_to_match: 256,
            lru_capacity_per_server: 31_250,
            auto_tune: None,
        }
    }
}

impl Params {
    fn block_bytes(&self) -> usize {
        self.block_size.unwrap_or(self.block_size_tokens * 4)
    }
}

/// Computes the chained block hashes of a prompt (only full blocks count).
pub fn block_hashes(req: &Request, block_bytes: usize, max_blocks: usize) -> Vec<u64> {
    if block_bytes == 0 {
        return Vec::new();
    }
    let mut seed = Xxh64::new(0);
    seed.update(req.model.as_bytes());
    if let Some(salt) = &req.cache_salt {
        seed.update(salt.as_bytes());
    }
    let mut prev = seed.digest();
    let blocks = (req.prompt.len() / block_bytes).min(max_blocks);
    let mut out = Vec::with_capacity(blocks);
    let mut buf = Vec::with_capacity(block_bytes + 8);
    for block in req.prompt.chunks_exact(block_bytes).take(blocks) {
        buf.clear();
        buf.extend_from_slice(block);
        buf.extend_from_slice(&prev.to_le_bytes());
        prev = xxh64(&buf, 0);
        out.push(prev);
    }
    out
}

#[derive(Default)]
pub struct PrefixIndexProducer {
    params: Params,
    /// Which endpoints hold each block hash.
    holders: HashMap<u64, Vec<u32>>,
    /// Per endpoint, its block hashes in recency order; eviction updates `holders`.
    per_endpoint: HashMap<u32, LruCache<u64, ()>>,
    /// Hashes of requests produced for but not yet routed, oldest first.
    pending: HashMap<String, Vec<u64>>,
    pending_order: VecDeque<String>,
}

impl PrefixIndexProducer {
    /// Number of distinct block hashes in the index (for tests and introspection).
    pub fn indexed_blocks(&self) -> usize {
        self.holders.len()
    }

    fn remember_pending(&mut self, id: &str, hashes: Vec<u64>) {
        if self.pending.insert(id.to_string(), hashes).is_none() {
            self.pending_order.push_back(id.to_string());
        }
        while self.pending_order.len() > PENDING_REQUESTS {
            if let Some(old) = self.pending_order.pop_front() {
                self.pending.remove(&old);
            }
        }
    }

    fn record(&mut self, endpoint: u32, hashes: &[u64]) {
        let capacity = NonZeroUsize::new(self.params.lru_capacity_per_server).unwrap_or(NonZeroUsize::MIN);
        let lru = self.per_endpoint.entry(endpoint).or_insert_with(|| LruCache::new(capacity));
        for &h in hashes {
            if lru.get(&h).is_some() {
                continue;
            }
            if let Some((evicted, ())) = lru.push(h, ())
                && evicted != h
            {
                drop_holder(&mut self.holders, evicted, endpoint);
            }
            let holders = self.holders.entry(h).or_default();
            if !holders.contains(&endpoint) {
                holders.push(endpoint);
            }
        }
    }

    fn forget_endpoint(&mut self, endpoint: u32) {
        if let Some(lru) = self.per_endpoint.remove(&endpoint) {
            for (h, ()) in lru.iter() {
                drop_holder(&mut self.holders, *h, endpoint);
            }
        }
    }
}

fn drop_holder(holders: &mut HashMap<u64, Vec<u32>>, hash: u64, endpoint: u32) {
    if let Some(list) = holders.get_mut(&hash) {
        list.retain(|&e| e != endpoint);
        if list.is_empty() {
            holders.remove(&hash);
        }
    }
}

impl Plugin for PrefixIndexProducer {
    fn configure(&mut self, params_json: &str) -> Result<(), String> {
        let p: Params = params::parse(params_json)?;
        if p.block_bytes() == 0 {
            return Err("blockSizeTokens (or blockSize) must be at least 1".into());
        }
        if p.max_prefix_blocks_to_match == 0 {
            return Err("maxPrefixBlocksToMatch must be at least 1".into());
        }
        if p.lru_capacity_per_server == 0 {
            return Err("lruCapacityPerServer must be at least 1".into());
        }
        self.params = p;
        Ok(())
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        let gone: Vec<u32> =
            self.per_endpoint.keys().copied().filter(|id| !endpoints.iter().any(|e| e.id == *id)).collect();
        for id in gone {
            self.forget_endpoint(id);
        }
    }

    fn pre_request(&mut self, request_id: &str, chosen: &[u32]) {
        let Some(hashes) = self.pending.remove(request_id) else {
            return;
        };
        self.pending_order.retain(|id| id != request_id);
        if let Some(&primary) = chosen.first() {
            self.record(primary, &hashes);
        }
    }
}

impl Producer for PrefixIndexProducer {
    fn produce(&mut self, req: &Request, metrics: &Metrics) -> Vec<Column> {
        let hashes = block_hashes(req, self.params.block_bytes(), self.params.max_prefix_blocks_to_match);
        let n = metrics.ids.len();
        let mut matched = vec![0.0f32; n];
        // Walk the chain once, keeping the candidates that matched every block so far.
        let mut alive: Vec<usize> = (0..n).collect();
        for (depth, h) in hashes.iter().enumerate() {
            let Some(holders) = self.holders.get(h) else {
                break;
            };
            alive.retain(|&i| holders.contains(&metrics.ids[i]));
            if alive.is_empty() {
                break;
            }
            for &i in &alive {
                matched[i] = (depth + 1) as f32;
            }
        }
        let total = vec![hashes.len() as f32; n];
        let indexed = metrics.ids.iter().map(|id| self.per_endpoint.get(id).map_or(0.0, |l| l.len() as f32)).collect();
        self.remember_pending(&req.id, hashes);
        vec![
            Column { name: PREFIX_MATCHED_BLOCKS.to_string(), values: matched },
            Column { name: PREFIX_TOTAL_BLOCKS.to_string(), values: total },
            Column { name: PREFIX_INDEXED_BLOCKS.to_string(), values: indexed },
        ]
    }
}

llmd_plugin_sdk::export_producer!(PrefixIndexProducer);
