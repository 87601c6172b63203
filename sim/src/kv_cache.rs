//! The KV cache of one simulated worker: a fixed number of blocks, with prefix reuse keyed by
//! chained block hashes, and the hashing that turns a prompt into those keys.
//!
//! It owns block accounting only: which hashed blocks exist, who references them, which
//! unreferenced ones go first when space is needed (least recently released), and how many
//! unhashed ("private") blocks are held. It has no clock and makes no scheduling decision: the
//! serving model (`model.rs`) decides when to allocate and when to release.
//!
//! A block is `block_size` tokens; with about four bytes a token, a block is `4 × block_size`
//! bytes of prompt text. Hashes are chained like the EPP's approximate prefix index (so the
//! two agree on what a shared prefix is): the chain starts from the hash of a namespace (model
//! name, cache salt), and each full block's hash covers its bytes followed by the previous
//! hash in little-endian. Only full blocks are hashed; the partial tail and generated tokens
//! live in private blocks that are never shared.

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh64::{Xxh64, xxh64};

/// Bytes of prompt text counted as one token (the usual rule of thumb for English text).
pub const BYTES_PER_TOKEN: usize = 4;

/// The chained hashes of the full `block_bytes`-sized blocks of `prompt`, in prompt order.
///
/// `namespace` parts seed the chain, so different models (or cache salts) never share blocks.
pub fn block_hashes(prompt: &[u8], block_bytes: usize, namespace: &[&[u8]]) -> Vec<u64> {
    if block_bytes == 0 {
        return Vec::new();
    }
    let mut seed = Xxh64::new(0);
    for part in namespace {
        seed.update(part);
    }
    let mut prev = seed.digest();
    let mut buf = Vec::with_capacity(block_bytes + 8);
    prompt
        .chunks_exact(block_bytes)
        .map(|block| {
            buf.clear();
            buf.extend_from_slice(block);
            buf.extend_from_slice(&prev.to_le_bytes());
            prev = xxh64(&buf, 0);
            prev
        })
        .collect()
}

/// What happened to the cache, as vLLM publishes it (`vllm/distributed/kv_events.py`):
/// recorded when [`KvCache::record_events`] is on, drained with [`KvCache::drain_events`].
#[derive(Clone, Debug, PartialEq)]
pub enum KvEvent {
    /// New full blocks of one sequence, chained: `parent` is the hash of the block before the
    /// first one (None at the start of a sequence); `tokens` are all their tokens.
    Stored { hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32> },
    /// Evicted blocks.
    Removed { hashes: Vec<u64> },
    /// Everything evicted (a reset).
    Cleared,
}

/// The token ids of `prompt`'s full blocks as the simulator counts tokens: each 4 bytes, read
/// little-endian, are one token (what the simulated `/tokenize` answers).
pub fn pseudo_tokens(prompt: &[u8], full_blocks: usize, block_bytes: usize) -> Vec<u32> {
    let end = (full_blocks * block_bytes).min(prompt.len());
    prompt[..end].chunks_exact(BYTES_PER_TOKEN).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Blocks held by one sequence; give it back with [`KvCache::release`].
///
/// Not `Clone`: one allocation is released exactly once.
#[derive(Debug)]
pub struct Allocation {
    hashes: Vec<u64>,
    private: usize,
    cached_blocks: usize,
}

impl Allocation {
    /// Leading prompt blocks that were already cached when the allocation was made.
    pub fn cached_blocks(&self) -> usize {
        self.cached_blocks
    }

    /// All blocks this allocation holds.
    pub fn blocks(&self) -> usize {
        self.hashes.len() + self.private
    }
}

#[derive(Debug)]
struct Entry {
    refs: u32,
    /// Release stamp; meaningful only while `refs == 0` (then it keys `evictable`).
    stamp: u64,
}

/// Block accounting with an LRU of unreferenced cached blocks.
#[derive(Debug)]
pub struct KvCache {
    capacity: usize,
    entries: HashMap<u64, Entry>,
    /// Unreferenced entries by release stamp, oldest (first to evict) first.
    evictable: BTreeMap<u64, u64>,
    /// Entries with `refs > 0`.
    referenced: usize,
    /// Unhashed blocks held by sequences.
    private: usize,
    next_stamp: u64,
    /// Events since the last drain, when recording.
    events: Option<Vec<KvEvent>>,
}

// Invariant: entries.len() + private <= capacity, and every entry with refs == 0 is in
// `evictable` under its stamp (and no other entry is).
impl KvCache {
    pub fn new(capacity: usize) -> Self {
        KvCache {
            capacity,
            entries: HashMap::new(),
            evictable: BTreeMap::new(),
            referenced: 0,
            private: 0,
            next_stamp: 0,
            events: None,
        }
    }

    /// Starts (or stops) recording what is stored and evicted.
    pub fn record_events(&mut self, on: bool) {
        self.events = on.then(Vec::new);
    }

    /// The events since the last drain (none when not recording).
    pub fn drain_events(&mut self) -> Vec<KvEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks held by live sequences (cached-but-unreferenced blocks are free).
    pub fn used_blocks(&self) -> usize {
        self.referenced + self.private
    }

    /// Fraction of blocks held by live sequences, in [0, 1].
    pub fn usage(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        self.used_blocks() as f64 / self.capacity as f64
    }

    /// Hashed blocks currently cached, referenced or not.
    pub fn cached_blocks(&self) -> usize {
        self.entries.len()
    }

    /// How many leading `hashes` are cached right now.
    pub fn matched_prefix(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.entries.contains_key(h)).count()
    }

    /// Takes the prompt blocks `hashes` (sharing cached ones) plus `private` fresh blocks, or
    /// returns `None` and changes nothing when they do not fit.
    pub fn allocate(&mut self, hashes: &[u64], private: usize) -> Option<Allocation> {
        self.allocate_tokens(hashes, &[], private)
    }

    /// Like `allocate`; `tokens` are the tokens of the `hashes` blocks (all of the same
    /// size), reported in the `Stored` events of the blocks this allocation adds.
    pub fn allocate_tokens(&mut self, hashes: &[u64], tokens: &[u32], private: usize) -> Option<Allocation> {
        let cached_blocks = self.matched_prefix(hashes);
        // A block costs one free block unless some live sequence already references it.
        // A hash repeated within `hashes` is counted twice: conservative, and harmless.
        let shared = hashes.iter().filter(|h| self.entries.get(h).is_some_and(|e| e.refs > 0)).count();
        let cost = hashes.len() - shared + private;
        if cost > self.capacity - self.used_blocks() {
            return None;
        }
        // Leading hits are referenced before anything is inserted, so making room for the
        // new blocks can never evict the prefix this allocation is reusing.
        let fresh: Vec<bool> = hashes.iter().map(|h| !self.entries.contains_key(h)).collect();
        for &hash in hashes {
            self.reference(hash);
        }
        if self.events.is_some() {
            self.record_stored(hashes, &fresh, tokens);
        }
        self.make_room(private);
        self.private += private;
        Some(Allocation { hashes: hashes.to_vec(), private, cached_blocks })
    }

    /// One `Stored` event per run of consecutive blocks this allocation added.
    fn record_stored(&mut self, hashes: &[u64], fresh: &[bool], tokens: &[u32]) {
        let per_block = if hashes.is_empty() { 0 } else { tokens.len() / hashes.len() };
        let mut i = 0;
        while i < hashes.len() {
            if !fresh[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < hashes.len() && fresh[i] {
                i += 1;
            }
            let event = KvEvent::Stored {
                hashes: hashes[start..i].to_vec(),
                parent: start.checked_sub(1).map(|p| hashes[p]),
                tokens: tokens.get(start * per_block..i * per_block).map(<[u32]>::to_vec).unwrap_or_default(),
            };
            if let Some(events) = self.events.as_mut() {
                events.push(event);
            }
        }
    }

    /// Gives blocks back. Hashed blocks stay cached (and reusable) until evicted; the tail of
    /// a prompt is released first so it is evicted before the prefix that others may share.
    pub fn release(&mut self, allocation: Allocation) {
        for hash in allocation.hashes.iter().rev() {
            let Some(entry) = self.entries.get_mut(hash) else {
                debug_assert!(false, "released block {hash:x} is not cached");
                continue;
            };
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                entry.stamp = self.next_stamp;
                self.next_stamp += 1;
                self.evictable.insert(entry.stamp, *hash);
                self.referenced -= 1;
            }
        }
        self.private = self.private.saturating_sub(allocation.private);
    }

    fn reference(&mut self, hash: u64) {
        if let Some(entry) = self.entries.get_mut(&hash) {
            if entry.refs == 0 {
                self.evictable.remove(&entry.stamp);
                self.referenced += 1;
            }
            entry.refs += 1;
            return;
        }
        self.make_room(1);
        self.entries.insert(hash, Entry { refs: 1, stamp: 0 });
        self.referenced += 1;
    }

    /// Evicts least recently released blocks until `blocks` more fit.
    fn make_room(&mut self, blocks: usize) {
        while self.entries.len() + self.private + blocks > self.capacity {
            // The caller checked the free count, so an evictable block exists; if not (a bug),
            // over-committing is better than looping forever.
            let Some((_, victim)) = self.evictable.pop_first() else {
                debug_assert!(false, "no evictable block although the free count allowed it");
                return;
            };
            self.entries.remove(&victim);
            if let Some(events) = self.events.as_mut() {
                events.push(KvEvent::Removed { hashes: vec![victim] });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(tag: u64, n: usize) -> Vec<u64> {
        (0..n as u64).map(|i| tag * 1000 + i).collect()
    }

    #[test]
    fn hashes_are_chained_and_namespaced() {
        let prompt = vec![b'a'; 64 * 3 + 10];
        let h = block_hashes(&prompt, 64, &[b"m"]);
        assert_eq!(h.len(), 3, "only full blocks are hashed");
        assert_ne!(h[0], h[1], "identical block bytes differ by their position in the chain");
        let other_model = block_hashes(&prompt, 64, &[b"n"]);
        assert!(h.iter().all(|x| !other_model.contains(x)), "namespaces never share blocks");
        let mut longer = prompt.clone();
        longer.extend_from_slice(&[b'b'; 64]);
        assert_eq!(block_hashes(&longer, 64, &[b"m"])[..3], h[..], "a shared prefix shares hashes");
        assert!(block_hashes(&prompt, 0, &[]).is_empty());
    }

    #[test]
    fn events_report_stores_with_their_parent_and_tokens_and_evictions() {
        let mut kv = KvCache::new(4);
        kv.record_events(true);
        let a = kv.allocate_tokens(&[1, 2], &[10, 11, 20, 21], 0).expect("fits");
        kv.release(a);
        // Block 1 is cached: 3 and 4 are new, with 1 as their parent; then room for the
        // private block is made by evicting the least recently released block (2).
        let b = kv.allocate_tokens(&[1, 3, 4], &[10, 11, 30, 31, 40, 41], 1).expect("fits");
        assert_eq!(
            kv.drain_events(),
            vec![
                KvEvent::Stored { hashes: vec![1, 2], parent: None, tokens: vec![10, 11, 20, 21] },
                KvEvent::Stored { hashes: vec![3, 4], parent: Some(1), tokens: vec![30, 31, 40, 41] },
                KvEvent::Removed { hashes: vec![2] },
            ]
        );
        kv.release(b);
        assert!(kv.drain_events().is_empty());
        let mut quiet = KvCache::new(4);
        quiet.allocate(&[1], 0);
        assert!(quiet.drain_events().is_empty(), "nothing recorded unless asked");
        assert_eq!(
            pseudo_tokens(b"abcdefgh-x", 1, 8),
            vec![u32::from_le_bytes(*b"abcd"), u32::from_le_bytes(*b"efgh")]
        );
    }

    #[test]
    fn reuse_counts_the_leading_cached_blocks() {
        let mut kv = KvCache::new(10);
        let a = kv.allocate(&chain(1, 3), 1).expect("fits");
        assert_eq!(a.cached_blocks(), 0);
        kv.release(a);
        assert_eq!(kv.used_blocks(), 0, "released blocks are free");
        assert_eq!(kv.cached_blocks(), 3, "but stay cached");
        let mut longer = chain(1, 3);
        longer.push(77);
        let b = kv.allocate(&longer, 0).expect("fits");
        assert_eq!(b.cached_blocks(), 3);
        assert_eq!(kv.used_blocks(), 4);
    }

    #[test]
    fn shared_blocks_cost_nothing_extra() {
        let mut kv = KvCache::new(4);
        let a = kv.allocate(&chain(1, 3), 0).expect("fits");
        let b = kv.allocate(&chain(1, 3), 1).expect("shares three blocks, needs one");
        assert_eq!(kv.used_blocks(), 4);
        assert!(kv.allocate(&[], 1).is_none(), "full");
        kv.release(a);
        assert_eq!(kv.used_blocks(), 4, "still referenced by b");
        kv.release(b);
        assert_eq!(kv.used_blocks(), 0);
    }

    #[test]
    fn evicts_least_recently_released_first() {
        let mut kv = KvCache::new(4);
        let a = kv.allocate(&chain(1, 2), 0).expect("fits");
        kv.release(a);
        let b = kv.allocate(&chain(2, 2), 0).expect("fits");
        kv.release(b);
        let c = kv.allocate(&chain(3, 2), 0).expect("fits by evicting a");
        assert_eq!(kv.matched_prefix(&chain(1, 2)), 0, "a was released first, so evicted");
        assert_eq!(kv.matched_prefix(&chain(2, 2)), 2, "b survives");
        assert!(kv.cached_blocks() <= kv.capacity());
        kv.release(c);
    }

    #[test]
    fn tail_blocks_are_evicted_before_the_prefix() {
        let mut kv = KvCache::new(3);
        let a = kv.allocate(&chain(1, 3), 0).expect("fits");
        kv.release(a);
        let b = kv.allocate(&[], 1).expect("evicts one block");
        assert_eq!(kv.matched_prefix(&chain(1, 3)), 2, "the last block went, the prefix stays");
        kv.release(b);
    }

    #[test]
    fn referenced_blocks_are_never_evicted() {
        let mut kv = KvCache::new(3);
        let a = kv.allocate(&chain(1, 2), 0).expect("fits");
        assert!(kv.allocate(&chain(2, 2), 0).is_none(), "only one free block");
        assert_eq!(kv.matched_prefix(&chain(1, 2)), 2, "a failed allocation changes nothing");
        assert_eq!(kv.used_blocks(), 2);
        kv.release(a);
    }
}
