//! The index's storage: which endpoints hold each block hash, and each endpoint's blocks in
//! recency order, in one table of fixed-size entries.
//!
//! One entry per (block, endpoint) pair, 24 bytes, kept in chunks (no large reallocation
//! as the index grows) and reused through a free list. An entry is linked twice: into its
//! endpoint's recency list (newest to oldest, doubly linked, for eviction) and into the
//! list of its hash's other holders (singly linked, usually short). A map, split in
//! `SHARDS`, goes from a hash to the first of its holders. About 53 bytes per pair in all
//! (measured), where an LRU per endpoint plus a map of holder lists took about 150 in a
//! wasm guest, so an index of 100 endpoints × 31 250 blocks (upstream's default capacity)
//! stays well inside a plugin's 256 MiB sandbox.
//!
//! A larger index than its sandbox holds does not crash the plugin. The store takes a new
//! chunk only while `HEADROOM` more could still be allocated; when its sandbox refuses memory it keeps
//! 7/8 of the pairs it holds at that moment as its budget from then on, and shares that
//! budget among endpoints in proportion to their capacities (each evicting its own oldest
//! blocks). Without this, an allocation failure aborted the guest, and the host rebuilt the
//! instance with an empty index, again and again as it refilled.

use std::collections::HashMap;

use crate::IdentityHasher;

pub(crate) type BuildIdentity = std::hash::BuildHasherDefault<IdentityHasher>;

const NIL: u32 = u32::MAX;
/// Entries per chunk (96 KiB).
const CHUNK: usize = 4096;
/// The hash → first holder map is split in this many maps, by bits of the hash neither
/// the bucket index nor the control bytes of a map use: growing one rehashes a 1024th of
/// the index. One map of 1.8 million blocks took longer than a plugin call may (50 ms) to
/// grow in a wasm guest, and the instance was rebuilt with an empty index; with 64 maps,
/// a growing index still made one new conversation in fifty wait for a rehash of tens of
/// thousands of entries (the decision's p99).
const SHARDS: usize = 1024;
/// Memory the store leaves free in its sandbox for the plugin's other allocations (a
/// request's prompt and hashes, the columns it returns): it grows only while this much more
/// could still be allocated.
const HEADROOM: usize = 2 << 20;

/// Whether `bytes` more could be allocated now (tried, then given back).
fn room(bytes: usize) -> bool {
    Vec::<u8>::new().try_reserve_exact(bytes).is_ok()
}

fn shard(hash: u64) -> usize {
    ((hash >> 32) as usize) % SHARDS
}

/// Hasher for endpoint ids (small integers): one multiply spreads them over the bits the
/// map's buckets and control bytes use, where SipHash costs tens of nanoseconds a lookup
/// and a touch does three.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type BuildId = std::hash::BuildHasherDefault<IdHasher>;

#[derive(Clone, Copy)]
struct Entry {
    hash: u64,
    endpoint: u32,
    /// Recency list of `endpoint`: the next newer and next older entry.
    newer: u32,
    older: u32,
    /// The next holder of `hash` (for a free entry: the next free one).
    next_holder: u32,
}

const EMPTY: Entry = Entry { hash: 0, endpoint: 0, newer: NIL, older: NIL, next_holder: NIL };

/// One endpoint's recency list and capacity.
#[derive(Clone, Copy)]
struct Recency {
    newest: u32,
    oldest: u32,
    len: usize,
    capacity: usize,
}

pub(crate) struct BlockStore {
    chunks: Vec<Box<[Entry]>>,
    /// Entries handed out so far (free ones included).
    used: u32,
    free: u32,
    first_holder: Vec<HashMap<u64, u32, BuildIdentity>>,
    endpoints: HashMap<u32, Recency, BuildId>,
    /// (block, endpoint) pairs held.
    pairs: usize,
    /// The endpoints' capacities, summed.
    capacity_sum: usize,
    /// Pairs the store may hold in all: unbounded until its sandbox refuses memory.
    budget: usize,
    /// Chunks the store may allocate (a test's stand-in for a full sandbox).
    chunk_limit: usize,
}

impl BlockStore {
    pub(crate) fn new() -> Self {
        BlockStore {
            chunks: Vec::new(),
            used: 0,
            free: NIL,
            first_holder: (0..SHARDS).map(|_| HashMap::default()).collect(),
            endpoints: HashMap::default(),
            pairs: 0,
            capacity_sum: 0,
            budget: usize::MAX,
            chunk_limit: usize::MAX,
        }
    }

    #[cfg(test)]
    pub(crate) fn limit_chunks(&mut self, chunks: usize) {
        self.chunk_limit = chunks;
    }

    /// The blocks an endpoint of `capacity` may hold now: its capacity, or its share of
    /// the budget when the capacities add up to more.
    fn limit(&self, capacity: usize) -> usize {
        if self.capacity_sum <= self.budget {
            return capacity;
        }
        ((capacity as u128 * self.budget as u128 / self.capacity_sum as u128) as usize).max(1)
    }

    fn at(&self, i: u32) -> &Entry {
        &self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }

    fn at_mut(&mut self, i: u32) -> &mut Entry {
        &mut self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }

    /// Distinct block hashes held by any endpoint.
    pub(crate) fn distinct_blocks(&self) -> usize {
        self.first_holder.iter().map(HashMap::len).sum()
    }

    /// Blocks held for `endpoint`, and its capacity.
    pub(crate) fn endpoint_blocks(&self, endpoint: u32) -> Option<(usize, usize)> {
        self.endpoints.get(&endpoint).map(|r| (r.len, r.capacity))
    }

    pub(crate) fn endpoint_ids(&self) -> Vec<u32> {
        self.endpoints.keys().copied().collect()
    }

    /// Appends the endpoints holding `hash` to `out`; false when none does.
    pub(crate) fn holders(&self, hash: u64, out: &mut Vec<u32>) -> bool {
        let Some(&first) = self.first_holder[shard(hash)].get(&hash) else { return false };
        let mut i = first;
        while i != NIL {
            let e = self.at(i);
            out.push(e.endpoint);
            i = e.next_holder;
        }
        true
    }

    /// The entry of (`hash`, `endpoint`), if held.
    fn find(&self, hash: u64, endpoint: u32) -> Option<u32> {
        let mut i = *self.first_holder[shard(hash)].get(&hash)?;
        while i != NIL {
            let e = self.at(i);
            if e.endpoint == endpoint {
                return Some(i);
            }
            i = e.next_holder;
        }
        None
    }

    /// Records that `endpoint` holds `hash`, as its newest block: an entry it already holds
    /// is moved to the front; a new one evicts the endpoint's oldest when it is at
    /// `capacity` (the capacity its list is created with; `set_capacity` changes it).
    pub(crate) fn touch(&mut self, endpoint: u32, hash: u64, capacity: usize) {
        let r = match self.endpoints.get(&endpoint) {
            Some(r) => *r,
            None => {
                let r = Recency { newest: NIL, oldest: NIL, len: 0, capacity: capacity.max(1) };
                self.endpoints.insert(endpoint, r);
                self.capacity_sum += r.capacity;
                self.enforce();
                r
            }
        };
        if let Some(i) = self.find(hash, endpoint) {
            if r.newest != i {
                self.unlink_recency(i);
                self.push_newest(endpoint, i);
            }
            return;
        }
        for attempt in 0..2 {
            let limit = self.limit(r.capacity);
            // `r.len` is current until a refusal has evicted.
            if attempt > 0 || r.len >= limit {
                self.shrink_to(endpoint, limit - 1);
            }
            if self.insert(endpoint, hash) {
                return;
            }
            if attempt == 0 {
                self.refused();
            }
        }
        // Refused twice: this block goes unrecorded (the index holds what it can).
    }

    /// Links a new entry for (`hash`, `endpoint`) as the endpoint's newest; false when the
    /// memory it needs is refused.
    fn insert(&mut self, endpoint: u32, hash: u64) -> bool {
        // A map grows by a few KiB at a time, and only until the budget is set (then as many
        // pairs leave as come): no headroom asked, or the first refusal (less than the
        // headroom left) would refuse every growth after it and shrink the budget each time.
        let map = &mut self.first_holder[shard(hash)];
        if map.len() == map.capacity() && !map.contains_key(&hash) && map.try_reserve(1).is_err() {
            return false;
        }
        let Some(i) = self.alloc(Entry { hash, endpoint, ..EMPTY }) else { return false };
        let head = self.first_holder[shard(hash)].entry(hash).or_insert(NIL);
        let next = *head;
        *head = i;
        self.at_mut(i).next_holder = next;
        self.push_newest(endpoint, i);
        true
    }

    /// The sandbox refused memory: from now on the store holds at most 7/8 of what it
    /// holds now (what it frees serves new blocks), shared among endpoints by capacity.
    fn refused(&mut self) {
        self.budget = self.budget.min(self.pairs - self.pairs / 8).max(1);
        self.enforce();
    }

    /// Evicts every endpoint's oldest blocks beyond its share of the budget.
    fn enforce(&mut self) {
        if self.capacity_sum <= self.budget {
            return;
        }
        let endpoints: Vec<(u32, usize)> = self.endpoints.iter().map(|(&id, r)| (id, r.capacity)).collect();
        for (id, capacity) in endpoints {
            let limit = self.limit(capacity);
            self.shrink_to(id, limit);
        }
    }

    /// Sets `endpoint`'s capacity, evicting its oldest blocks beyond it.
    pub(crate) fn set_capacity(&mut self, endpoint: u32, capacity: usize) {
        let capacity = capacity.max(1);
        let Some(r) = self.endpoints.get_mut(&endpoint) else { return };
        self.capacity_sum = self.capacity_sum - r.capacity + capacity;
        r.capacity = capacity;
        let limit = self.limit(capacity);
        self.shrink_to(endpoint, limit);
        self.enforce();
    }

    /// Drops every block of `endpoint`.
    pub(crate) fn forget(&mut self, endpoint: u32) {
        self.shrink_to(endpoint, 0);
        if let Some(r) = self.endpoints.remove(&endpoint) {
            self.capacity_sum -= r.capacity;
        }
    }

    /// Evicts `endpoint`'s oldest blocks until it holds at most `keep`.
    fn shrink_to(&mut self, endpoint: u32, keep: usize) {
        while let Some(r) = self.endpoints.get(&endpoint)
            && r.len > keep
            && r.oldest != NIL
        {
            self.remove(r.oldest);
        }
    }

    /// Drops every block; the budget stays (the sandbox is the same).
    pub(crate) fn clear(&mut self) {
        let (budget, chunk_limit) = (self.budget, self.chunk_limit);
        *self = BlockStore { budget, chunk_limit, ..BlockStore::new() };
    }

    /// A free entry holding `entry`; None when a new chunk is needed and refused.
    fn alloc(&mut self, entry: Entry) -> Option<u32> {
        if self.free != NIL {
            let i = self.free;
            self.free = self.at(i).next_holder;
            *self.at_mut(i) = entry;
            self.pairs += 1;
            return Some(i);
        }
        let i = self.used;
        if i as usize == self.chunks.len() * CHUNK {
            let mut chunk = Vec::new();
            if self.chunks.len() >= self.chunk_limit
                || !room(HEADROOM + CHUNK * std::mem::size_of::<Entry>())
                || chunk.try_reserve_exact(CHUNK).is_err()
                || self.chunks.try_reserve(1).is_err()
            {
                return None;
            }
            chunk.resize(CHUNK, EMPTY);
            self.chunks.push(chunk.into_boxed_slice());
        }
        self.used += 1;
        *self.at_mut(i) = entry;
        self.pairs += 1;
        Some(i)
    }

    /// Unlinks entry `i` from both its lists and frees it.
    fn remove(&mut self, i: u32) {
        self.unlink_recency(i);
        let Entry { hash, next_holder, .. } = *self.at(i);
        let map = &mut self.first_holder[shard(hash)];
        match map.get(&hash).copied() {
            Some(first) if first == i => {
                if next_holder == NIL {
                    map.remove(&hash);
                } else {
                    map.insert(hash, next_holder);
                }
            }
            Some(first) => {
                let mut prev = first;
                while prev != NIL {
                    let next = self.at(prev).next_holder;
                    if next == i {
                        self.at_mut(prev).next_holder = next_holder;
                        break;
                    }
                    prev = next;
                }
            }
            None => {}
        }
        *self.at_mut(i) = Entry { next_holder: self.free, ..EMPTY };
        self.free = i;
        self.pairs -= 1;
    }

    /// Takes entry `i` out of its endpoint's recency list.
    fn unlink_recency(&mut self, i: u32) {
        let Entry { endpoint, newer, older, .. } = *self.at(i);
        if newer != NIL {
            self.at_mut(newer).older = older;
        }
        if older != NIL {
            self.at_mut(older).newer = newer;
        }
        if let Some(r) = self.endpoints.get_mut(&endpoint) {
            if r.newest == i {
                r.newest = older;
            }
            if r.oldest == i {
                r.oldest = newer;
            }
            r.len = r.len.saturating_sub(1);
        }
        let e = self.at_mut(i);
        e.newer = NIL;
        e.older = NIL;
    }

    /// Puts unlinked entry `i` at the front of `endpoint`'s list.
    fn push_newest(&mut self, endpoint: u32, i: u32) {
        let Some(r) = self.endpoints.get_mut(&endpoint) else { return };
        let previous = r.newest;
        r.newest = i;
        if r.oldest == NIL {
            r.oldest = i;
        }
        r.len += 1;
        self.at_mut(i).older = previous;
        if previous != NIL {
            self.at_mut(previous).newer = i;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmd_plugin_sdk::rng::SplitMix64;

    /// The same index, kept the plain way: per endpoint its hashes newest first.
    #[derive(Default)]
    struct Model {
        lists: HashMap<u32, (Vec<u64>, usize)>,
    }

    impl Model {
        fn touch(&mut self, endpoint: u32, hash: u64, capacity: usize) {
            let (list, cap) = self.lists.entry(endpoint).or_insert((Vec::new(), capacity.max(1)));
            if let Some(pos) = list.iter().position(|&h| h == hash) {
                list.remove(pos);
            } else if list.len() >= *cap {
                list.pop();
            }
            list.insert(0, hash);
        }

        fn set_capacity(&mut self, endpoint: u32, capacity: usize) {
            if let Some((list, cap)) = self.lists.get_mut(&endpoint) {
                *cap = capacity.max(1);
                list.truncate(*cap);
            }
        }

        fn holders(&self, hash: u64) -> Vec<u32> {
            let mut v: Vec<u32> = self.lists.iter().filter(|(_, (l, _))| l.contains(&hash)).map(|(&e, _)| e).collect();
            v.sort();
            v
        }

        fn distinct(&self) -> usize {
            let mut all: Vec<u64> = self.lists.values().flat_map(|(l, _)| l.iter().copied()).collect();
            all.sort();
            all.dedup();
            all.len()
        }
    }

    /// The store's recency order of `endpoint`, newest first, walked both ways.
    fn order(s: &BlockStore, endpoint: u32) -> Vec<u64> {
        let Some(r) = s.endpoints.get(&endpoint) else { return Vec::new() };
        let mut forward = Vec::new();
        let mut i = r.newest;
        while i != NIL {
            forward.push(s.at(i).hash);
            i = s.at(i).older;
        }
        let mut backward = Vec::new();
        let mut i = r.oldest;
        while i != NIL {
            backward.push(s.at(i).hash);
            i = s.at(i).newer;
        }
        backward.reverse();
        assert_eq!(forward, backward, "the two directions of endpoint {endpoint}'s list disagree");
        assert_eq!(forward.len(), r.len, "endpoint {endpoint}'s length");
        forward
    }

    #[test]
    fn agrees_with_a_plain_lru_per_endpoint_under_random_operations() {
        let mut rng = SplitMix64::new(11);
        let mut store = BlockStore::new();
        let mut model = Model::default();
        for step in 0..20_000 {
            let endpoint = rng.below(5) as u32;
            match rng.below(100) {
                0..=89 => {
                    let (hash, capacity) = (rng.below(60) as u64, 1 + rng.below(12));
                    store.touch(endpoint, hash, capacity);
                    model.touch(endpoint, hash, capacity);
                }
                90..=96 => {
                    let capacity = rng.below(12);
                    store.set_capacity(endpoint, capacity);
                    model.set_capacity(endpoint, capacity);
                }
                _ if step % 7 == 0 => {
                    store.clear();
                    model.lists.clear();
                }
                _ => {
                    store.forget(endpoint);
                    model.lists.remove(&endpoint);
                }
            }
            for e in 0..5 {
                let want = model.lists.get(&e).map(|(l, c)| (l.clone(), *c));
                let got = store.endpoint_blocks(e).map(|(_, c)| (order(&store, e), c));
                assert_eq!(got, want, "step {step}, endpoint {e}");
            }
            for h in 0..60 {
                let mut got = Vec::new();
                let held = store.holders(h, &mut got);
                got.sort();
                assert_eq!(got, model.holders(h), "step {step}, holders of {h}");
                assert_eq!(held, !got.is_empty());
            }
            assert_eq!(store.distinct_blocks(), model.distinct(), "step {step}");
        }
    }

    /// Hashes of `endpoint`'s blocks, newest first.
    fn newest(s: &BlockStore, endpoint: u32, n: usize) -> Vec<u64> {
        order(s, endpoint).into_iter().take(n).collect()
    }

    #[test]
    fn a_store_refused_memory_shares_a_budget_by_capacity() {
        let mut store = BlockStore::new();
        store.limit_chunks(2); // room for 8 192 pairs
        // Every touch records a new hash; `latest` keeps each endpoint's, newest first.
        let mut latest: HashMap<u32, Vec<u64>> = HashMap::new();
        let mut next = 0u64;
        fn touch(store: &mut BlockStore, latest: &mut HashMap<u32, Vec<u64>>, next: &mut u64, e: u32, capacity: usize) {
            *next += 1;
            store.touch(e, *next, capacity);
            latest.entry(e).or_default().insert(0, *next);
        }
        // Four endpoints of 10 000 blocks each outgrow the store's two chunks.
        for _ in 0..5_000 {
            for e in 0..4 {
                touch(&mut store, &mut latest, &mut next, e, 10_000);
            }
        }
        let budget = store.budget;
        assert_eq!(budget, 8_192 - 8_192 / 8, "7/8 of what it held when refused");
        assert!(store.pairs <= budget && store.used as usize <= 2 * CHUNK);
        for e in 0..4 {
            let (len, capacity) = store.endpoint_blocks(e).unwrap();
            assert_eq!(capacity, 10_000, "the capacity stays as configured");
            assert_eq!(len, budget / 4, "endpoint {e} holds its share");
            assert_eq!(order(&store, e), latest[&e][..len], "endpoint {e} keeps its newest blocks");
        }
        // A newcomer three times as large gets three shares; the others give up theirs.
        for _ in 0..6_000 {
            touch(&mut store, &mut latest, &mut next, 9, 30_000);
        }
        let share = |c: usize| c * budget / 70_000;
        assert_eq!(store.endpoint_blocks(9).unwrap().0, share(30_000));
        for e in 0..4 {
            assert_eq!(store.endpoint_blocks(e).unwrap().0, share(10_000), "endpoint {e}");
            assert_eq!(newest(&store, e, 3), latest[&e][..3]);
        }
        assert!(store.pairs <= budget);
        // An endpoint that leaves gives its share back to the others (it is not refilled by
        // itself: growing is lazy), and clearing keeps the budget.
        store.forget(9);
        for _ in 0..3_000 {
            touch(&mut store, &mut latest, &mut next, 0, 10_000);
        }
        assert_eq!(store.endpoint_blocks(0).unwrap().0, budget / 4);
        store.clear();
        assert_eq!(store.budget, budget);
        assert_eq!(store.endpoint_blocks(0), None);
    }

    #[test]
    fn freed_entries_are_reused() {
        let mut store = BlockStore::new();
        for h in 0..1000 {
            store.touch(0, h, 100);
        }
        assert_eq!(store.endpoint_blocks(0), Some((100, 100)));
        assert_eq!(store.used, 100, "eviction reuses the evicted entry");
        store.forget(0);
        for h in 0..100 {
            store.touch(1, h, 100);
        }
        assert_eq!(store.used, 100, "a forgotten endpoint's entries serve the next");
        assert_eq!(store.chunks.len(), 1);
    }
}
