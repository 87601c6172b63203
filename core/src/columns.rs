//! Per-candidate data of one cycle. `Candidates` is what the host hands in: the endpoint
//! ids and their scraped load (NaN = unknown). `Table` is what a profile works on: the
//! built-in columns, the endpoint attributes the profile reads, and a slot for every column
//! a producer of the profile writes, all index-aligned with the ids and narrowed together
//! when a filter drops candidates.

use llmd_plugin_sdk::columns::BUILT_IN;

/// The candidates of a cycle and their scraped load. Index i of every list is `ids[i]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Candidates {
    pub ids: Vec<u32>,
    pub waiting: Vec<f32>,
    pub running: Vec<f32>,
    pub kv_usage: Vec<f32>,
    /// Milliseconds since the endpoint's metrics were scraped (`f32::MAX`-ish when never).
    pub age_ms: Vec<f32>,
    /// Requests the EPP itself has in flight on each endpoint (routed, not finished), known
    /// at once rather than scraped. Empty when not known: every queued request then counts
    /// as someone else's (see `SaturationConfig::filter`).
    pub own_in_flight: Vec<f32>,
    /// Endpoint attributes (custom metrics the extractor's `customMetrics` name): each key
    /// with one value per candidate, NaN where unknown. Empty when none are configured.
    pub attributes: Vec<(std::sync::Arc<str>, Vec<f32>)>,
}

impl Candidates {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Attribute `key`'s values, one per candidate, if any candidate has it.
    pub fn attribute(&self, key: &str) -> Option<&[f32]> {
        self.attributes.iter().find(|(k, _)| &**k == key).map(|(_, v)| v.as_slice())
    }

    /// Keeps only the candidates at `positions` (ascending indices).
    pub fn select(&self, positions: &[usize]) -> Candidates {
        let pick = |col: &Vec<f32>| positions.iter().map(|&i| col.get(i).copied().unwrap_or(f32::NAN)).collect();
        Candidates {
            ids: positions.iter().filter_map(|&i| self.ids.get(i).copied()).collect(),
            waiting: pick(&self.waiting),
            running: pick(&self.running),
            kv_usage: pick(&self.kv_usage),
            age_ms: pick(&self.age_ms),
            own_in_flight: if self.own_in_flight.is_empty() { Vec::new() } else { pick(&self.own_in_flight) },
            attributes: self.attributes.iter().map(|(k, v)| (k.clone(), pick(v))).collect(),
        }
    }

    /// `n` idle candidates with ids `0..n` and fresh metrics (tests, probes).
    pub fn idle(n: u32) -> Candidates {
        let n_us = n as usize;
        Candidates {
            ids: (0..n).collect(),
            waiting: vec![0.0; n_us],
            running: vec![0.0; n_us],
            kv_usage: vec![0.0; n_us],
            age_ms: vec![10.0; n_us],
            own_in_flight: vec![0.0; n_us],
            attributes: Vec::new(),
        }
    }
}

/// The columns of one cycle: slot k holds column `names[k]`; the first slots are the
/// built-in ones, in `BUILT_IN` order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    ids: Vec<u32>,
    /// Invariant: every column is `ids.len()` long.
    cols: Vec<Vec<f32>>,
}

impl Table {
    /// A table of `slots` columns (at least the built-ins), the built-ins filled from
    /// `candidates`, the others NaN until a producer writes them.
    pub fn new(candidates: &Candidates, slots: usize) -> Table {
        let n = candidates.len();
        let fit = |col: &Vec<f32>| {
            let mut c = col.clone();
            c.resize(n, f32::NAN);
            c
        };
        let mut cols = Vec::with_capacity(slots.max(BUILT_IN.len()));
        cols.push(fit(&candidates.waiting));
        cols.push(fit(&candidates.running));
        cols.push(fit(&candidates.kv_usage));
        cols.push(fit(&candidates.age_ms));
        while cols.len() < slots {
            cols.push(vec![f32::NAN; n]);
        }
        Table { ids: candidates.ids.clone(), cols }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Column `slot` (empty if there is no such slot).
    pub fn column(&self, slot: usize) -> &[f32] {
        self.cols.get(slot).map(Vec::as_slice).unwrap_or_default()
    }

    /// Stores `values` (exactly `len()` long) in `slot`.
    pub fn set(&mut self, slot: usize, values: &[f32]) {
        if let Some(col) = self.cols.get_mut(slot) {
            col.clear();
            col.extend_from_slice(values);
            col.resize(self.ids.len(), f32::NAN);
        }
    }

    /// Appends the columns at `slots`, one after the other, to `out`.
    pub fn gather(&self, slots: &[usize], out: &mut Vec<f32>) {
        out.clear();
        out.reserve(slots.len() * self.ids.len());
        for &s in slots {
            match self.cols.get(s) {
                Some(col) => out.extend_from_slice(col),
                None => out.extend(std::iter::repeat_n(f32::NAN, self.ids.len())),
            }
        }
    }

    /// The positions (ascending) of the candidates whose id is in `kept`; ids not in the
    /// table are ignored. Filters return the ids they keep in candidate order, which one
    /// walk matches; any other order is matched through a sorted copy, so a filter's answer
    /// never costs candidates × kept comparisons (262 144 at 512 endpoints).
    pub fn positions_of(&self, kept: &[u32]) -> Vec<usize> {
        let mut positions = Vec::with_capacity(kept.len().min(self.ids.len()));
        let mut next = kept.iter().peekable();
        for (i, id) in self.ids.iter().enumerate() {
            if next.peek() == Some(&id) {
                positions.push(i);
                next.next();
            }
        }
        if next.peek().is_none() {
            return positions;
        }
        let mut sorted = kept.to_vec();
        sorted.sort_unstable();
        self.ids.iter().enumerate().filter(|(_, id)| sorted.binary_search(id).is_ok()).map(|(i, _)| i).collect()
    }

    /// Keeps only the candidates at `positions` (ascending indices), in every column.
    pub fn retain(&mut self, positions: &[usize]) {
        let pick = |v: &[f32]| positions.iter().map(|&i| v.get(i).copied().unwrap_or(f32::NAN)).collect();
        self.ids = positions.iter().filter_map(|&i| self.ids.get(i).copied()).collect();
        for col in &mut self.cols {
            *col = pick(col);
        }
    }

    /// The candidates' built-in columns (what a shadow variant or a retry starts from).
    pub fn candidates(&self) -> Candidates {
        Candidates {
            ids: self.ids.clone(),
            waiting: self.column(0).to_vec(),
            running: self.column(1).to_vec(),
            kv_usage: self.column(2).to_vec(),
            age_ms: self.column(3).to_vec(),
            own_in_flight: Vec::new(),
            attributes: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_matches_kept_ids_in_any_order() {
        let t = Table::new(&Candidates::idle(6), BUILT_IN.len());
        assert_eq!(t.positions_of(&[1, 3, 4]), vec![1, 3, 4]);
        assert_eq!(t.positions_of(&[4, 1, 3]), vec![1, 3, 4]);
        assert_eq!(t.positions_of(&[5, 9, 0, 5]), vec![0, 5]);
        assert_eq!(t.positions_of(&[]), Vec::<usize>::new());
        assert_eq!(t.positions_of(&[0, 1, 2, 3, 4, 5]), (0..6).collect::<Vec<_>>());
        let mut narrowed = t.clone();
        narrowed.retain(&[1, 4]);
        assert_eq!(narrowed.positions_of(&[4]), vec![1]);
        assert_eq!(narrowed.positions_of(&[4, 1]), vec![0, 1]);
    }

    #[test]
    fn retain_narrows_every_column_together() {
        let c = Candidates {
            ids: vec![7, 8, 9],
            waiting: vec![1.0, 2.0, 3.0],
            running: vec![0.0; 3],
            kv_usage: vec![0.1, 0.2, 0.3],
            age_ms: vec![5.0; 3],
            own_in_flight: Vec::new(),
            attributes: Vec::new(),
        };
        let mut t = Table::new(&c, 6);
        t.set(4, &[10.0, 20.0, 30.0]);
        assert!(t.column(5).iter().all(|v| v.is_nan()));
        t.retain(&[0, 2]);
        assert_eq!(t.ids(), [7, 9]);
        assert_eq!(t.column(0), [1.0, 3.0]);
        assert_eq!(t.column(4), [10.0, 30.0]);
        let mut out = Vec::new();
        t.gather(&[4, 2], &mut out);
        assert_eq!(out, [10.0, 30.0, 0.1, 0.3]);
        assert_eq!(t.candidates(), c.select(&[0, 2]));
    }
}
