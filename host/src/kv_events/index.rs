//! The precise prefix index: per endpoint, exactly the blocks its engine says it holds.
//!
//! Keys are our own, not the engine's: a block's key chains the previous block's key with
//! the block's token ids (XXH64), starting from a root of the LoRA adapter and cache salt.
//! A request's prompt, tokenized as the engine tokenizes it, gives the same keys, whatever
//! hash algorithm (and `PYTHONHASHSEED`) the engine uses. The engine's hash of each block is
//! kept only to resolve `parent_block_hash` and `BlockRemoved`.
//!
//! Only GPU-resident blocks of full-attention KV groups count. A store whose parent the index
//! does not know (events were lost before it) is skipped and counted; the next store of a
//! sequence start, or a replay, heals it. Memory is bounded by `max_blocks` per endpoint:
//! about 60 bytes a block (one key set entry, one engine→key entry), 6 MB per 100 000 blocks.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use xxhash_rust::xxh64::xxh64;

use super::decode::{Event, Stored};

/// KV-group kinds whose blocks serve prefix reuse (vLLM's names, as upstream accepts them).
const PREFIX_KINDS: &[&str] = &["full_attention", "mla_attention", "sink_full_attention"];

/// The chain's root for a LoRA adapter (None: the base model) and cache salt.
pub fn root(lora: Option<&str>, salt: Option<&str>) -> u64 {
    let mut seed = Vec::new();
    seed.extend_from_slice(lora.unwrap_or("").as_bytes());
    seed.push(0);
    seed.extend_from_slice(salt.unwrap_or("").as_bytes());
    xxh64(&seed, 0x6b76_2d65_7665_6e74)
}

/// The keys of the full `block_size`-token blocks of `tokens`, chained from `parent`.
pub fn chain(parent: u64, tokens: &[u32], block_size: usize) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut prev = parent;
    let mut buf = Vec::with_capacity(8 + 4 * block_size);
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            buf.clear();
            buf.extend_from_slice(&prev.to_le_bytes());
            for t in block {
                buf.extend_from_slice(&t.to_le_bytes());
            }
            prev = xxh64(&buf, 0);
            prev
        })
        .collect()
}

/// What applying events did, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub stored: u64,
    pub removed: u64,
    pub cleared: u64,
    /// Stores skipped: unknown parent, another tier or KV-group kind, not dense, index full.
    pub skipped: u64,
}

/// Hashes the `u64` keys of the index's tables with one multiply and a fold instead of
/// SipHash: the keys are themselves hashes (ours XXH64, the engine's its own) and come from
/// the operator's own workers, so they need no protection against crafted collisions (a
/// worker that wanted to harm routing could lie about its blocks anyway); a match walks a
/// request's chain against every candidate (6 400 lookups for 64 blocks × 100 endpoints),
/// where SipHash was most of the time. The multiply still spreads keys that are not uniform (an engine numbering its
/// blocks 1, 2, 3, …) over the table's buckets and control bytes.
#[derive(Default, Clone, Copy)]
struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        let m = u128::from(self.0) * 0x9E37_79B9_7F4A_7C15;
        (m as u64) ^ ((m >> 64) as u64)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

type Fold = BuildHasherDefault<FoldHasher>;

#[derive(Debug, Default)]
struct EndpointBlocks {
    /// Tokens per block, from the engine's events.
    block_size: u32,
    keys: HashSet<u64, Fold>,
    by_engine: HashMap<u64, u64, Fold>,
    /// KV cache groups whose stores are not indexed (sliding-window or mamba groups of a
    /// hybrid model). They share the per-request block hashes with the full-attention
    /// group, so their evictions must not remove its blocks.
    other_groups: HashSet<u32>,
}

/// Every endpoint's blocks.
#[derive(Debug)]
pub struct PreciseIndex {
    endpoints: HashMap<u32, EndpointBlocks>,
    max_blocks: usize,
}

impl PreciseIndex {
    pub fn new(max_blocks: usize) -> Self {
        PreciseIndex { endpoints: HashMap::new(), max_blocks: max_blocks.max(1) }
    }

    /// Applies one endpoint's events, in order.
    pub fn apply(&mut self, endpoint: u32, events: &[Event]) -> Applied {
        let mut out = Applied::default();
        let max = self.max_blocks;
        let e = self.endpoints.entry(endpoint).or_default();
        for event in events {
            match event {
                Event::Stored(s) => {
                    let n = store(e, s, max);
                    if n == 0 && !s.hashes.is_empty() {
                        out.skipped += 1;
                    }
                    out.stored += n;
                }
                Event::Removed { hashes, medium, group } => {
                    if medium.as_deref().is_some_and(|m| !m.eq_ignore_ascii_case("gpu")) {
                        continue;
                    }
                    if group.is_some_and(|g| e.other_groups.contains(&g)) {
                        continue;
                    }
                    for h in hashes {
                        if let Some(key) = e.by_engine.remove(h) {
                            e.keys.remove(&key);
                            out.removed += 1;
                        }
                    }
                }
                Event::Cleared => {
                    e.keys.clear();
                    e.by_engine.clear();
                    out.cleared += 1;
                }
            }
        }
        out
    }

    /// Forgets what `endpoint` holds (it restarted, or left the pool).
    pub fn forget(&mut self, endpoint: u32) {
        self.endpoints.remove(&endpoint);
    }

    /// An estimate of the heap the index takes, in bytes: every endpoint's hash tables at
    /// their capacity (one control byte a slot, at most 7/8 of the slots used).
    pub fn memory_bytes(&self) -> usize {
        let table = |capacity: usize, entry: usize| capacity * 8 / 7 * (entry + 1);
        self.endpoints
            .values()
            .map(|e| {
                table(e.keys.capacity(), std::mem::size_of::<u64>())
                    + table(e.by_engine.capacity(), 2 * std::mem::size_of::<u64>())
            })
            .sum()
    }

    /// Blocks held by `endpoint`.
    pub fn blocks(&self, endpoint: u32) -> usize {
        self.endpoints.get(&endpoint).map_or(0, |e| e.keys.len())
    }

    /// The block size `endpoint`'s engine uses, once an event told it.
    pub fn block_size(&self, endpoint: u32) -> Option<u32> {
        self.endpoints.get(&endpoint).map(|e| e.block_size).filter(|&b| b > 0)
    }

    /// How many of `keys` (a request's chain) `endpoint` holds, from the first.
    pub fn matched(&self, endpoint: u32, keys: &[u64]) -> usize {
        self.endpoints.get(&endpoint).map_or(0, |e| keys.iter().take_while(|k| e.keys.contains(k)).count())
    }
}

/// Adds a store's blocks; returns how many were added.
fn store(e: &mut EndpointBlocks, s: &Stored, max: usize) -> u64 {
    if s.medium.as_deref().is_some_and(|m| !m.eq_ignore_ascii_case("gpu")) {
        return 0;
    }
    if s.kind.as_deref().is_some_and(|k| !PREFIX_KINDS.contains(&k)) {
        if let Some(g) = s.group {
            e.other_groups.insert(g);
        }
        return 0;
    }
    let bs = s.block_size as usize;
    if s.tokens.len() != s.hashes.len() * bs {
        // Not dense (null blocks skipped) or a tier move without tokens: not ours to index.
        return 0;
    }
    let parent = match s.parent {
        Some(p) => match e.by_engine.get(&p) {
            Some(k) => *k,
            None => return 0,
        },
        None => {
            let salt = s.first_block_strings.iter().find(|x| Some(x.as_str()) != s.lora.as_deref());
            root(s.lora.as_deref(), salt.map(String::as_str))
        }
    };
    e.block_size = s.block_size;
    let mut added = 0;
    for (h, key) in s.hashes.iter().zip(chain(parent, &s.tokens, bs)) {
        if e.keys.len() >= max && !e.keys.contains(&key) {
            break;
        }
        e.by_engine.insert(*h, key);
        e.keys.insert(key);
        added += 1;
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fold_hasher_spreads_numbered_keys() {
        use std::hash::BuildHasher;
        // An engine numbering its blocks 0, 1, 2, …: the table's buckets (low bits) and its
        // control bytes (top 7 bits) must both see many values, not one.
        let hash = |k: u64| Fold::default().hash_one(k);
        let low: HashSet<u64> = (0..1024u64).map(|k| hash(k) & 1023).collect();
        let top: HashSet<u64> = (0..1024u64).map(|k| hash(k) >> 57).collect();
        assert!(low.len() > 600, "{} distinct buckets of 1024", low.len());
        assert!(top.len() > 100, "{} distinct control bytes of 128", top.len());
    }

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32]) -> Event {
        Event::Stored(Stored {
            hashes: hashes.to_vec(),
            parent,
            tokens: tokens.to_vec(),
            block_size: 2,
            lora: None,
            medium: Some("GPU".into()),
            first_block_strings: vec![],
            kind: None,
            group: None,
        })
    }

    /// A hybrid model stores the same block hashes in several KV cache groups; only the
    /// full-attention group is indexed, and evictions from the others leave it alone.
    #[test]
    fn evictions_from_groups_that_are_not_indexed_leave_the_index_alone() {
        let in_group = |group: u32, kind: &str| {
            let Event::Stored(mut s) = stored(&[901, 902], None, &[1, 2, 3, 4]) else { unreachable!() };
            (s.group, s.kind) = (Some(group), Some(kind.to_string()));
            Event::Stored(s)
        };
        let mut ix = PreciseIndex::new(100);
        let a = ix.apply(0, &[in_group(0, "full_attention"), in_group(1, "sliding_window")]);
        assert_eq!((a.stored, ix.blocks(0)), (2, 2));
        let keys = chain(root(None, None), &[1, 2, 3, 4], 2);
        let removed = |group| Event::Removed { hashes: vec![902], medium: None, group: Some(group) };
        assert_eq!(ix.apply(0, &[removed(1)]).removed, 0, "the sliding-window group's eviction");
        assert_eq!(ix.matched(0, &keys), 2);
        assert_eq!(ix.apply(0, &[removed(0)]).removed, 1, "the full-attention group's eviction");
        assert_eq!(ix.matched(0, &keys), 1);
    }

    #[test]
    fn a_request_matches_what_the_engine_stored_whatever_its_hashes() {
        let mut ix = PreciseIndex::new(100);
        let a = ix.apply(0, &[stored(&[901, 902], None, &[1, 2, 3, 4]), stored(&[903], Some(902), &[5, 6])]);
        assert_eq!(a, Applied { stored: 3, ..Default::default() });
        let keys = chain(root(None, None), &[1, 2, 3, 4, 5, 6, 7], 2);
        assert_eq!(keys.len(), 3, "full blocks only");
        assert_eq!(ix.matched(0, &keys), 3);
        assert_eq!(ix.matched(0, &chain(root(None, None), &[1, 2, 9, 9], 2)), 1);
        assert_eq!(ix.matched(0, &chain(root(Some("lora"), None), &[1, 2], 2)), 0, "adapters apart");
        assert_eq!(ix.matched(1, &keys), 0);
        // Evicting the middle block breaks the chain there.
        assert_eq!(ix.apply(0, &[Event::Removed { hashes: vec![902], medium: None, group: None }]).removed, 1);
        assert_eq!(ix.matched(0, &keys), 1);
        assert_eq!(ix.block_size(0), Some(2));
        ix.apply(0, &[Event::Cleared]);
        assert_eq!((ix.matched(0, &keys), ix.blocks(0)), (0, 0));
    }

    #[test]
    fn stores_that_cannot_be_placed_are_skipped() {
        let mut ix = PreciseIndex::new(3);
        // Unknown parent (its store was lost).
        assert_eq!(ix.apply(0, &[stored(&[5], Some(4), &[1, 2])]).skipped, 1);
        // Not dense.
        assert_eq!(ix.apply(0, &[stored(&[5, 6], None, &[1, 2, 3])]).skipped, 1);
        // CPU tier.
        let mut cpu = stored(&[5], None, &[1, 2]);
        if let Event::Stored(s) = &mut cpu {
            s.medium = Some("CPU".into());
        }
        assert_eq!(ix.apply(0, &[cpu]).skipped, 1);
        // Bounded: 4 blocks into room for 3.
        let a = ix.apply(0, &[stored(&[1, 2, 3, 4], None, &[1, 1, 2, 2, 3, 3, 4, 4])]);
        assert_eq!((a.stored, ix.blocks(0)), (3, 3));
    }
}
