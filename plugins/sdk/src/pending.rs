//! Per-cycle state a plugin keeps between a call and the hooks of the same cycle (say, the
//! prefix hashes computed in `produce`, recorded for the endpoint named by `decided`).
//!
//! `Pending` is a bounded map keyed by cycle id: O(1) insert, lookup and removal, and the
//! oldest entries go first when it is full, so cycles whose hooks never come (a request
//! that failed before it was routed) cannot grow it without bound. Cycle ids only grow, so
//! "oldest" is "smallest id".

use std::collections::{HashMap, VecDeque};

/// At most `capacity` entries, keyed by cycle id.
#[derive(Debug)]
pub struct Pending<T> {
    capacity: usize,
    entries: HashMap<u64, T>,
    /// Insertion order; may hold ids already removed (skipped when evicting).
    order: VecDeque<u64>,
}

impl<T> Pending<T> {
    pub fn new(capacity: usize) -> Self {
        Pending { capacity: capacity.max(1), entries: HashMap::new(), order: VecDeque::new() }
    }

    /// Stores `value` for `cycle` (replacing an earlier value), evicting the oldest entries
    /// beyond the capacity.
    pub fn insert(&mut self, cycle: u64, value: T) {
        if self.entries.insert(cycle, value).is_none() {
            self.order.push_back(cycle);
        }
        while self.entries.len() > self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.entries.remove(&old);
                }
                None => break,
            }
        }
        // Removed entries leave ids behind in `order`; keep it from growing past twice the
        // live entries (not twice the capacity: a large table that is mostly empty would
        // let a million ids pile up, then compact them in one call). Each compaction drops
        // at least half of `order`, so its cost spreads over the removals before it.
        if self.order.len() > 2 * self.entries.len().max(64) {
            let entries = &self.entries;
            self.order.retain(|id| entries.contains_key(id));
        }
    }

    /// Takes the value of `cycle`, if it is still held.
    pub fn take(&mut self, cycle: u64) -> Option<T> {
        self.entries.remove(&cycle)
    }

    pub fn get(&self, cycle: u64) -> Option<&T> {
        self.entries.get(&cycle)
    }

    pub fn get_mut(&mut self, cycle: u64) -> Option<&mut T> {
        self.entries.get_mut(&cycle)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }

    /// Iterates over the held entries (in no particular order).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut T)> {
        self.entries.iter_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_oldest_first() {
        let mut p = Pending::new(3);
        for id in 0..5u64 {
            p.insert(id, id * 10);
        }
        assert_eq!(p.len(), 3);
        assert_eq!(p.take(0), None);
        assert_eq!(p.take(1), None);
        assert_eq!(p.take(3), Some(30));
        assert_eq!(p.take(3), None);
        p.insert(9, 90);
        assert_eq!(p.get(2), Some(&20));
        assert_eq!(p.get(9), Some(&90));
        // Taking many entries never lets the order queue grow without bound.
        for id in 10..1000u64 {
            p.insert(id, 0);
            p.take(id);
        }
        assert!(p.order.len() <= 128, "{}", p.order.len());
        // Nor when the capacity is large and few entries are live at a time.
        let mut big = Pending::new(1 << 20);
        for id in 0..10_000u64 {
            big.insert(id, ());
            big.take(id);
        }
        assert!(big.order.len() <= 128, "{} ids left behind", big.order.len());
    }
}
