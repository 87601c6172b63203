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
        }
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
        for &hash in hashes {
            self.reference(hash);
        }
        self.make_room(private);
        self.private += private;
        Some(Allocation { hashes: hashes.to_vec(), private, cached_blocks })
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
