//! The approximate prefix index behind `approx-prefix-cache-producer` (which exports it as
//! its component) and `precise-prefix-cache-producer` (which falls back on it). A library,
//! not a plugin: it exports no component entry points.
//!
//! `approx-prefix-cache-producer`: an approximate index of which endpoint holds which
//! prompt prefix, built from the EPP's own routing decisions, publishing per candidate how
//! many leading prefix blocks it likely holds (`prefix-cache/matched-blocks`, of
//! `prefix-cache/total-blocks` blocks of `prefix-cache/block-tokens` tokens).
//!
//! Blocks. A block is `B` tokens, about `4 × B` bytes of prompt (the estimate upstream
//! uses without a tokenizer). `B` is `blockSizeTokens`, or with `autoTune` the workers'
//! KV block size (`vllm:cache_config_info`), and at least 64 as upstream enforces. The last,
//! partial block counts (as upstream). At most `maxPrefixTokensToMatch` tokens (or
//! `maxPrefixBlocksToMatch` blocks when that is 0) are used. Block hashes are XXH64,
//! chained: each covers its bytes and the previous hash; the chain starts from the hash of
//! the model name and cache salt, so different models or salts never share entries.
//!
//! Index. Each endpoint keeps an LRU of block hashes; when a request is routed
//! (`decided`), its hashes are recorded for the endpoint, tail first, so a prefix's head
//! is forgotten last, as an engine evicts. The LRU's capacity follows what the endpoint can
//! really hold: with `autoTune` (default), its `num_gpu_blocks × block_size` tokens in index
//! blocks (with a slack of a quarter, see `TUNED_SLACK`), resized live when the worker
//! reports another size (a restart with other settings); without the metric,
//! `lruCapacityPerServer` blocks. Upstream sizes the LRU with `num_gpu_blocks` unconverted
//! (4× too large with vLLM's 16-token blocks), never resizes it, and records heads first;
//! an index close to the cache's size, forgetting in the engine's order, is what makes it
//! forget what the worker has evicted and only that.
//!
//! It owns the index only: turning matches into scores is the scorers' job.

mod store;

use std::collections::{HashMap, HashSet};

use llmd_plugin_sdk::columns::{
    PREFIX_BLOCK_TOKENS, PREFIX_INDEXED_BLOCKS, PREFIX_MATCH_INTERVAL, PREFIX_MATCHED_BLOCKS, PREFIX_TOTAL_BLOCKS,
};
use llmd_plugin_sdk::pending::Pending;
use llmd_plugin_sdk::{Cycle, EndpointInfo, Manifest, Needs, Plugin, Producer, params};
use serde::Deserialize;
use xxhash_rust::xxh64::{Xxh64, xxh64};

/// Hashes of cycles produced for but not yet routed are kept for at most this many cycles;
/// a request that is never routed (error, client gone) must not leak memory.
const PENDING_CYCLES: usize = 1024;
/// Upstream never hashes blocks smaller than this many tokens.
pub const MIN_BLOCK_TOKENS: usize = 64;
/// An auto-tuned index holds this much more than the cache (numerator, denominator). It
/// learns a prompt when the request is routed, while the engine refreshes a block's recency
/// when the request using it ends and keeps the blocks of running requests; an index of
/// exactly the cache's size forgets a little early. Measured in `epp replay` on multi-turn
/// chat with 768 to 2048 blocks per worker: 1.25 × gains up to 1.2 points of hit rate where
/// the caches are tight and is within 0.2 points elsewhere; 1.5 × and an unbounded index
/// lose (they predict hits on prefixes already evicted).
pub const TUNED_SLACK: (u64, u64) = (5, 4);
/// Bytes of prompt per estimated token.
pub const BYTES_PER_TOKEN: usize = 4;
/// Slots of the heat table (a power of two; 16 bytes each).
const HEAT_SLOTS: usize = 1 << 13;
/// The heat table's memory, in requests routed: a use counts `exp(-age / HEAT_HORIZON)`.
const HEAT_HORIZON: f32 = 512.0;
/// A block's rate is judged as if it had gone unused for this many requests before its first
/// use, a prior that fades as its own history grows (weighed as a use that long ago would
/// be): a prefix asked for once in 48 requests is not mistaken, from a few close uses, for
/// one asked for every 16 (a hot prefix on 16 workers), while one asked for by every request
/// reads as hot on 16 workers after five uses, on 4 after a few dozen.
const HEAT_PRIOR: f32 = 64.0;
/// The heat table follows the first blocks of a prompt and every `HEAT_STRIDE`th after
/// them; a match is judged by its deepest such block (four times fewer writes, so a warm
/// prefix is seldom overwritten by the traffic between two of its uses).
const HEAT_STRIDE: usize = 4;

/// Whether the block at `index` (from 0) is followed by the heat table.
fn heat_tracked(index: usize) -> bool {
    index < HEAT_STRIDE || (index + 1).is_multiple_of(HEAT_STRIDE)
}

/// The deepest followed block within a match of `depth` blocks (≥ 1).
fn heat_block(depth: usize) -> usize {
    if depth <= HEAT_STRIDE { depth - 1 } else { depth / HEAT_STRIDE * HEAT_STRIDE - 1 }
}

#[derive(Clone, Copy)]
struct HeatSlot {
    /// The hash's high half (its low bits chose the slot).
    tag: u32,
    /// The routing count when the block was first and last used (0: empty slot).
    first: u32,
    last: u32,
    /// Uses, each weighed by how long ago it was (as of `last`).
    uses: f32,
}

/// How often recently routed blocks are reused, in requests routed between two uses: a
/// direct-mapped table, so a block not reused for long is overwritten and reads as cold.
/// What tells a prompt shared by a large part of the traffic (one system prompt for every
/// user) from one conversation's history, which look alike to the index.
struct Heat {
    slots: Vec<HeatSlot>,
    routed: u32,
}

impl Heat {
    fn new() -> Self {
        Heat { slots: vec![HeatSlot { tag: 0, first: 0, last: 0, uses: 0.0 }; HEAT_SLOTS], routed: 0 }
    }

    fn slot(hash: u64) -> (usize, u32) {
        ((hash as usize) & (HEAT_SLOTS - 1), (hash >> 32) as u32)
    }

    /// What uses `since` requests ago weigh now; over a span of `age` requests, what a use
    /// at every request would add up to.
    fn decay(since: u32) -> f32 {
        (-(since as f32) / HEAT_HORIZON).exp()
    }
    fn window(age: u32) -> f32 {
        HEAT_HORIZON * (1.0 - Self::decay(age))
    }

    /// One request routed with these blocks.
    fn record(&mut self, hashes: &[u64]) {
        self.routed = self.routed.wrapping_add(1).max(1);
        let now = self.routed;
        for (_, &h) in hashes.iter().enumerate().filter(|(i, _)| heat_tracked(*i)) {
            let (i, tag) = Self::slot(h);
            let s = &mut self.slots[i];
            *s = if s.tag == tag && s.last != 0 {
                HeatSlot { last: now, uses: s.uses * Self::decay(now.wrapping_sub(s.last)) + 1.0, ..*s }
            } else {
                HeatSlot { tag, first: now, last: now, uses: 1.0 }
            };
        }
    }

    /// Requests routed between two uses of `hash`, lately; infinite when it is not in the
    /// table.
    fn interval(&self, hash: u64) -> f32 {
        let (i, tag) = Self::slot(hash);
        let s = &self.slots[i];
        if s.tag != tag || s.last == 0 {
            return f32::INFINITY;
        }
        let uses = s.uses * Self::decay(self.routed.wrapping_sub(s.last));
        let age = self.routed.wrapping_sub(s.first);
        let span = Self::window(age.wrapping_add(1));
        if uses > 0.0 { (span + HEAT_PRIOR * Self::decay(age)) / uses } else { f32::INFINITY }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub auto_tune: bool,
    /// Tokens per block when not auto-tuned (raised to 64).
    pub block_size_tokens: i64,
    /// Deprecated spelling of `blockSizeTokens` (upstream copies it over the default).
    pub block_size: Option<i64>,
    pub max_prefix_blocks_to_match: i64,
    pub max_prefix_tokens_to_match: i64,
    pub lru_capacity_per_server: i64,
    /// Accepted from configs written for older EPPs (prefix-cache-scorer parameters).
    pub hash_block_size: Option<i64>,
    pub prefix_match_info_producer_name: Option<String>,
    pub match_length_weight: Option<f64>,
    pub match_length_scale_tokens: Option<i64>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            auto_tune: true,
            block_size_tokens: 16,
            block_size: None,
            max_prefix_blocks_to_match: 2048,
            max_prefix_tokens_to_match: 131_072,
            lru_capacity_per_server: 31_250,
            hash_block_size: None,
            prefix_match_info_producer_name: None,
            match_length_weight: None,
            match_length_scale_tokens: None,
        }
    }
}

/// The validated parameters.
#[derive(Clone, Debug, PartialEq)]
struct Config {
    auto_tune: bool,
    block_tokens: usize,
    max_tokens: usize,
    max_blocks: usize,
    capacity: usize,
}

impl Config {
    fn from(p: &Params) -> Result<Config, String> {
        let mut block_tokens = p.block_size_tokens;
        if let Some(b) = p.block_size.filter(|&b| b > 0)
            && block_tokens == 16
        {
            block_tokens = b;
        }
        if !p.auto_tune && block_tokens <= 0 {
            return Err(format!("blockSizeTokens must be at least 1, got {block_tokens}"));
        }
        if p.max_prefix_tokens_to_match < 0 {
            return Err(format!("maxPrefixTokensToMatch must be ≥ 0, got {}", p.max_prefix_tokens_to_match));
        }
        if p.max_prefix_blocks_to_match < 0 {
            return Err(format!("maxPrefixBlocksToMatch must be ≥ 0, got {}", p.max_prefix_blocks_to_match));
        }
        if p.lru_capacity_per_server < 0 {
            return Err(format!("lruCapacityPerServer must be ≥ 0, got {}", p.lru_capacity_per_server));
        }
        let capacity = if p.lru_capacity_per_server > 0 { p.lru_capacity_per_server as usize } else { 31_250 };
        Ok(Config {
            auto_tune: p.auto_tune,
            block_tokens: (block_tokens.max(1) as usize).max(MIN_BLOCK_TOKENS),
            max_tokens: p.max_prefix_tokens_to_match as usize,
            max_blocks: p.max_prefix_blocks_to_match as usize,
            capacity,
        })
    }

    /// Blocks to hash at most for blocks of `block_tokens` (0 = unlimited).
    fn block_limit(&self, block_tokens: usize) -> usize {
        if self.max_tokens > 0 {
            self.max_tokens / block_tokens
        } else if self.max_blocks > 0 {
            self.max_blocks
        } else {
            usize::MAX
        }
    }
}

/// The chained block hashes of `prompt` in blocks of `block_bytes`, the last partial block
/// included, at most `max_blocks`.
pub fn block_hashes(
    model: &str,
    cache_salt: Option<&str>,
    prompt: &[u8],
    block_bytes: usize,
    max_blocks: usize,
) -> Vec<u64> {
    if block_bytes == 0 || prompt.is_empty() || max_blocks == 0 {
        return Vec::new();
    }
    // Each field is length-prefixed, and the salt flagged: model `a-b` without a salt and
    // model `a` with salt `-b` must not chain from one seed.
    let mut seed = Xxh64::new(0);
    seed.update(&(model.len() as u64).to_le_bytes());
    seed.update(model.as_bytes());
    if let Some(salt) = cache_salt {
        seed.update(&[1]);
        seed.update(&(salt.len() as u64).to_le_bytes());
        seed.update(salt.as_bytes());
    }
    let mut prev = seed.digest();
    let blocks = prompt.len().div_ceil(block_bytes).min(max_blocks);
    let mut out = Vec::with_capacity(blocks);
    let mut buf = Vec::with_capacity(block_bytes + 8);
    for block in prompt.chunks(block_bytes).take(blocks) {
        buf.clear();
        buf.extend_from_slice(block);
        buf.extend_from_slice(&prev.to_le_bytes());
        prev = xxh64(&buf, 0);
        out.push(prev);
    }
    out
}

/// Identity hasher for keys that already are hashes.
#[derive(Default, Clone, Copy)]
pub struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub struct PrefixIndexProducer {
    config: Config,
    /// Tokens per block in use; the index is cleared when it changes.
    block_tokens: usize,
    /// Which endpoints hold each block hash, and each endpoint's blocks in recency order.
    blocks: store::BlockStore,
    /// Holders of one block, reused by `produce`.
    scratch: Vec<u32>,
    /// Each endpoint's capacity in blocks, from its cache geometry (auto-tune).
    tuned: HashMap<u32, usize>,
    /// Hashes of cycles produced for but not yet routed.
    pending: Pending<Vec<u64>>,
    /// How often recently routed blocks are reused.
    heat: Heat,
}

impl Default for PrefixIndexProducer {
    fn default() -> Self {
        let config = Config::from(&Params::default()).unwrap_or(Config {
            auto_tune: true,
            block_tokens: MIN_BLOCK_TOKENS,
            max_tokens: 131_072,
            max_blocks: 2048,
            capacity: 31_250,
        });
        PrefixIndexProducer {
            block_tokens: config.block_tokens,
            config,
            blocks: store::BlockStore::new(),
            scratch: Vec::new(),
            tuned: HashMap::new(),
            pending: Pending::new(PENDING_CYCLES),
            heat: Heat::new(),
        }
    }
}

impl PrefixIndexProducer {
    /// Number of distinct block hashes in the index (for tests and introspection).
    pub fn indexed_blocks(&self) -> usize {
        self.blocks.distinct_blocks()
    }

    /// Blocks held for `endpoint`, and its capacity.
    pub fn endpoint_blocks(&self, endpoint: u32) -> Option<(usize, usize)> {
        self.blocks.endpoint_blocks(endpoint)
    }

    /// The block hashes `produce` computed for `cycle`, until `decided` takes them.
    pub fn pending_hashes(&self, cycle: u64) -> Option<&[u64]> {
        self.pending.get(cycle).map(Vec::as_slice)
    }

    /// Tokens per block in use.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    fn capacity_of(&self, endpoint: u32) -> usize {
        self.tuned.get(&endpoint).copied().unwrap_or(self.config.capacity)
    }

    fn record(&mut self, endpoint: u32, hashes: &[u64]) {
        let capacity = self.capacity_of(endpoint);
        // Tail first, so the head of the prefix is the most recent: an engine evicts a freed
        // sequence's blocks tail first (vLLM does), and a chain whose head is forgotten can
        // never match again, while its later blocks would still take room. Recording head
        // first forgot the heads of prefixes the workers still held (−1.6 points of hit
        // rate on multi-turn chat with tight caches in `epp replay`).
        for &h in hashes.iter().rev() {
            self.blocks.touch(endpoint, h, capacity);
        }
        self.heat.record(hashes);
    }

    fn forget_endpoint(&mut self, endpoint: u32) {
        self.blocks.forget(endpoint);
    }

    /// Shrinks (or grows) an endpoint's LRU to its capacity, dropping the oldest blocks.
    fn resize(&mut self, endpoint: u32) {
        let capacity = self.capacity_of(endpoint);
        self.blocks.set_capacity(endpoint, capacity);
    }

    fn clear(&mut self) {
        self.blocks.clear();
        self.pending.clear();
        self.heat = Heat::new();
    }
}

impl Plugin for PrefixIndexProducer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        let config = Config::from(&p)?;
        *self = PrefixIndexProducer { block_tokens: config.block_tokens, config, ..Default::default() };
        Ok(Manifest {
            needs: Needs { model: true, prompt: true, pool: true, decided: true, ..Default::default() },
            writes: [
                PREFIX_MATCHED_BLOCKS,
                PREFIX_TOTAL_BLOCKS,
                PREFIX_BLOCK_TOKENS,
                PREFIX_INDEXED_BLOCKS,
                PREFIX_MATCH_INTERVAL,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            ..Default::default()
        })
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        let present: HashSet<u32> = endpoints.iter().map(|e| e.id).collect();
        let gone: Vec<u32> = self.blocks.endpoint_ids().into_iter().filter(|id| !present.contains(id)).collect();
        for id in gone {
            self.forget_endpoint(id);
        }
        self.tuned.retain(|id, _| present.contains(id));
        if !self.config.auto_tune {
            return;
        }
        // Block size: the largest the workers use (an index block never spans less than a
        // worker's block), at least 64 tokens; the index starts over when it changes.
        let worker_block =
            endpoints.iter().filter_map(|e| e.cache).map(|c| c.block_size as usize).filter(|&b| b > 0).max();
        let block_tokens = worker_block.map_or(self.config.block_tokens, |b| b.max(MIN_BLOCK_TOKENS));
        if block_tokens != self.block_tokens {
            self.block_tokens = block_tokens;
            self.clear();
        }
        for e in endpoints {
            let capacity = e.cache.filter(|c| c.block_size > 0 && c.num_gpu_blocks > 0).map(|c| {
                ((c.tokens().saturating_mul(TUNED_SLACK.0) / TUNED_SLACK.1 / block_tokens as u64) as usize).max(1)
            });
            let before = self.tuned.get(&e.id).copied();
            match capacity {
                Some(c) => {
                    self.tuned.insert(e.id, c);
                }
                None => {
                    self.tuned.remove(&e.id);
                }
            }
            if self.tuned.get(&e.id).copied() != before {
                self.resize(e.id);
            }
        }
    }

    fn decided(&mut self, cycle: u64, endpoint: u32) -> Vec<(String, String)> {
        if let Some(hashes) = self.pending.take(cycle) {
            self.record(endpoint, &hashes);
        }
        Vec::new()
    }
}

impl Producer for PrefixIndexProducer {
    fn produce(&mut self, cycle: &Cycle) -> Vec<f32> {
        let r = &cycle.request;
        let block_tokens = self.block_tokens;
        let hashes = block_hashes(
            r.model(),
            r.cache_salt.as_deref(),
            r.prompt(),
            block_tokens * BYTES_PER_TOKEN,
            self.config.block_limit(block_tokens),
        );
        let n = cycle.len();
        let mut out = vec![0.0f32; 5 * n];
        // Walk the chain once, keeping the candidates that matched every block so far.
        let mut alive: Vec<usize> = (0..n).collect();
        let mut holders = std::mem::take(&mut self.scratch);
        for (depth, &h) in hashes.iter().enumerate() {
            holders.clear();
            if !self.blocks.holders(h, &mut holders) {
                break;
            }
            // A block many endpoints hold (a popular system prompt on a large pool) is
            // looked up in its sorted holders, not scanned once per candidate.
            if holders.len() > 16 {
                holders.sort_unstable();
                alive.retain(|&i| holders.binary_search(&cycle.ids[i]).is_ok());
            } else {
                alive.retain(|&i| holders.contains(&cycle.ids[i]));
            }
            if alive.is_empty() {
                break;
            }
            for &i in &alive {
                out[i] = (depth + 1) as f32;
            }
        }
        let mut heat: Vec<f32> = Vec::new();
        for (i, id) in cycle.ids.iter().enumerate() {
            out[n + i] = hashes.len() as f32;
            out[2 * n + i] = block_tokens as f32;
            out[3 * n + i] = self.blocks.endpoint_blocks(*id).map_or(0.0, |(len, _)| len as f32);
            let depth = out[i] as usize;
            out[4 * n + i] = if depth == 0 {
                f32::INFINITY
            } else {
                // Candidates share a few depths: each block's heat is read once.
                let b = heat_block(depth);
                if heat.is_empty() {
                    heat = vec![f32::NAN; hashes.len()];
                }
                if heat[b].is_nan() {
                    heat[b] = self.heat.interval(hashes[b]);
                }
                heat[b]
            };
        }
        self.scratch = holders;
        self.pending.insert(cycle.id, hashes);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::block_hashes;

    /// Model and salt are kept apart: no pair of them chains from another pair's seed.
    #[test]
    fn model_and_salt_never_run_together() {
        let h = |model, salt| block_hashes(model, salt, b"the same prompt", 4, 8);
        assert_ne!(h("sql-v2", None), h("sql", Some("-v2")));
        assert_ne!(h("sql", None), h("sql", Some("")));
        assert_ne!(h("sql", Some("a")), h("sqla", None));
        assert_eq!(h("sql", Some("a")), h("sql", Some("a")));
    }
}
