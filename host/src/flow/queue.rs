//! The queues of flow control, as plain state: priority bands, each holding one queue per
//! flow (fairness id), with upstream's limits, fairness and ordering policies and TTLs. No
//! clock and no I/O: callers pass the time (seconds on any monotonic clock — wall time in
//! the EPP, virtual time in `epp replay`), so the same code runs live and offline.
//!
//! Bands for priorities not configured are provisioned on first use from the templates
//! (`defaultNegativePriorityBand` for negative priorities when set, else
//! `defaultPriorityBand`): here priorities come from request headers, not from
//! InferenceObjective resources, so there is no control plane to declare them beforehand.
//! Such bands are dropped again after they have been empty for `IDLE_BAND_S`.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::config::flow::{BandSpec, Fairness, FlowSpec, Ordering};

/// A queued request's handle.
pub type ItemId = u64;

/// Seconds an on-demand band may stay empty before it is dropped.
pub const IDLE_BAND_S: f64 = 600.0;

/// What flow control knows of a queued request.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    /// The fairness id (tenant).
    pub flow: String,
    pub priority: i32,
    /// Its body size, counted against `maxBytes`.
    pub bytes: u64,
    /// When it was queued (seconds).
    pub enqueued: f64,
}

/// Why a request was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Over a band's or the global limits while the pool has endpoints.
    Capacity,
    /// Over the limits while the pool is empty.
    NoEndpoints,
}

/// Why a queued request left without being dispatched (besides cancellation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Its `defaultRequestTTL` ran out while the pool had endpoints.
    Ttl,
    /// Its `noEndpointRequestTTL` ran out while the pool was empty.
    NoEndpoints,
}

struct Entry<T> {
    id: ItemId,
    meta: Meta,
    /// EDF key: enqueue time + TTL (infinite without a TTL).
    deadline: f64,
    payload: T,
}

struct Band<T> {
    spec: BandSpec,
    /// Non-empty flow queues by fairness id (ordered: round-robin walks them in id order).
    flows: BTreeMap<String, VecDeque<Entry<T>>>,
    bytes: u64,
    len: u64,
    /// Round-robin: the flow served last.
    cursor: Option<String>,
    /// Configured (kept while empty) or provisioned on demand.
    configured: bool,
    empty_since: f64,
}

impl<T> Band<T> {
    fn new(spec: BandSpec, configured: bool, now: f64) -> Self {
        Band { spec, flows: BTreeMap::new(), bytes: 0, len: 0, cursor: None, configured, empty_since: now }
    }

    fn insert(&mut self, e: Entry<T>) {
        self.bytes += e.meta.bytes;
        self.len += 1;
        let q = self.flows.entry(e.meta.flow.clone()).or_default();
        match self.spec.ordering {
            Ordering::Fcfs => q.push_back(e),
            Ordering::Edf => {
                // Sorted by (deadline, enqueue time, id); new items usually go last.
                let key = |x: &Entry<T>| (x.deadline, x.meta.enqueued, x.id);
                let at = q.partition_point(|x| key(x).partial_cmp(&key(&e)) == Some(std::cmp::Ordering::Less));
                q.insert(at, e);
            }
        }
    }

    /// The flow to serve next, by the band's fairness policy.
    fn next_flow(&self) -> Option<String> {
        match self.spec.fairness {
            Fairness::GlobalStrict => {
                let key = |e: &Entry<T>| match self.spec.ordering {
                    Ordering::Fcfs => (e.meta.enqueued, 0.0, e.id),
                    Ordering::Edf => (e.deadline, e.meta.enqueued, e.id),
                };
                self.flows
                    .iter()
                    .filter_map(|(f, q)| q.front().map(|e| (f, key(e))))
                    .min_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))
                    .map(|(f, _)| f.clone())
            }
            Fairness::RoundRobin => {
                let after = self.cursor.as_ref().and_then(|c| {
                    self.flows
                        .range::<String, _>((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                        .next()
                        .map(|(f, _)| f.clone())
                });
                after.or_else(|| self.flows.keys().next().cloned())
            }
        }
    }

    fn pop(&mut self, now: f64) -> Option<Entry<T>> {
        let flow = self.next_flow()?;
        let q = self.flows.get_mut(&flow)?;
        let e = q.pop_front()?;
        if q.is_empty() {
            self.flows.remove(&flow);
        }
        self.cursor = Some(flow);
        self.account_out(&e, now);
        Some(e)
    }

    fn remove(&mut self, id: ItemId, flow: &str, now: f64) -> Option<Entry<T>> {
        let q = self.flows.get_mut(flow)?;
        let at = q.iter().position(|e| e.id == id)?;
        let e = q.remove(at)?;
        if q.is_empty() {
            self.flows.remove(flow);
        }
        self.account_out(&e, now);
        Some(e)
    }

    fn account_out(&mut self, e: &Entry<T>, now: f64) {
        self.bytes -= e.meta.bytes;
        self.len -= 1;
        if self.len == 0 {
            self.empty_since = now;
        }
    }
}

/// Occupancy of one band, for metrics and tests.
#[derive(Clone, Debug, PartialEq)]
pub struct BandStats {
    pub priority: i32,
    pub requests: u64,
    pub bytes: u64,
    pub max_requests: u64,
    pub max_bytes: u64,
}

/// Every band and its queues.
pub struct FlowQueues<T> {
    spec: FlowSpec,
    /// By priority; dispatch walks them from the highest.
    bands: BTreeMap<i32, Band<T>>,
    /// Where each queued item is: (priority, flow).
    index: HashMap<ItemId, (i32, String)>,
    bytes: u64,
    len: u64,
    next_id: ItemId,
    pool_empty: bool,
    /// When the pool last became empty or non-empty: TTL budgets restart then.
    regime_since: f64,
}

impl<T> FlowQueues<T> {
    pub fn new(spec: FlowSpec, now: f64) -> Self {
        let mut q = FlowQueues {
            spec: FlowSpec::default(),
            bands: BTreeMap::new(),
            index: HashMap::new(),
            bytes: 0,
            len: 0,
            next_id: 0,
            pool_empty: false,
            regime_since: now,
        };
        q.reconfigure(spec, now);
        q
    }

    pub fn spec(&self) -> &FlowSpec {
        &self.spec
    }

    /// Applies new settings, keeping every queued request: configured bands take their new
    /// limits and policies, requests of bands no longer configured move to on-demand
    /// bands from the templates. Limits apply to new arrivals (nothing queued is dropped).
    pub fn reconfigure(&mut self, spec: FlowSpec, now: f64) {
        let old = std::mem::take(&mut self.bands);
        self.spec = spec;
        for b in &self.spec.bands {
            self.bands.insert(b.priority, Band::new(b.clone(), true, now));
        }
        let mut entries: Vec<Entry<T>> =
            old.into_values().flat_map(|b| b.flows.into_values().flat_map(VecDeque::into_iter)).collect();
        entries.sort_by(|a, b| a.meta.enqueued.total_cmp(&b.meta.enqueued).then(a.id.cmp(&b.id)));
        for e in entries {
            let ttl = self.ttl();
            let band = self.band_mut(e.meta.priority, now);
            let deadline = ttl.map_or(f64::INFINITY, |t| e.meta.enqueued + t);
            band.insert(Entry { deadline, ..e });
        }
    }

    fn ttl(&self) -> Option<f64> {
        self.spec.request_ttl.map(|d| d.as_secs_f64())
    }

    fn band_mut(&mut self, priority: i32, now: f64) -> &mut Band<T> {
        let spec = &self.spec;
        self.bands.entry(priority).or_insert_with(|| Band::new(spec.band_for(priority), false, now))
    }

    /// Tells whether the pool has endpoints (TTL budgets restart on every change).
    pub fn set_pool_empty(&mut self, empty: bool, now: f64) {
        if empty != self.pool_empty {
            self.pool_empty = empty;
            self.regime_since = now;
        }
    }

    pub fn pool_empty(&self) -> bool {
        self.pool_empty
    }

    /// Queues a request, or refuses it (handing the payload back) when a limit is reached.
    pub fn enqueue(&mut self, meta: Meta, payload: T, now: f64) -> Result<ItemId, (Rejection, T)> {
        let over_global = (self.spec.max_bytes > 0 && self.bytes + meta.bytes > self.spec.max_bytes)
            || (self.spec.max_requests > 0 && self.len + 1 > self.spec.max_requests);
        let empty = self.pool_empty;
        let band = self.band_mut(meta.priority, now);
        let over_band = band.bytes + meta.bytes > band.spec.max_bytes || band.len + 1 > band.spec.max_requests;
        if over_global || over_band {
            return Err((if empty { Rejection::NoEndpoints } else { Rejection::Capacity }, payload));
        }
        self.next_id += 1;
        let id = self.next_id;
        let deadline = self.ttl().map_or(f64::INFINITY, |t| meta.enqueued + t);
        self.index.insert(id, (meta.priority, meta.flow.clone()));
        self.bytes += meta.bytes;
        self.len += 1;
        self.band_mut(meta.priority, now).insert(Entry { id, meta, deadline, payload });
        Ok(id)
    }

    /// The next request to dispatch while the pool's `saturation` is below the usage
    /// limit: the highest band first; within it, by its fairness and ordering policies.
    pub fn pop(&mut self, saturation: f64, now: f64) -> Option<(ItemId, Meta, T)> {
        if self.len == 0 || saturation >= self.spec.usage_limit {
            return None;
        }
        let band = self.bands.values_mut().rev().find(|b| b.len > 0)?;
        let e = band.pop(now)?;
        self.take_out(&e);
        Some((e.id, e.meta, e.payload))
    }

    /// Removes a queued request (its client left); None when it is no longer queued.
    pub fn cancel(&mut self, id: ItemId, now: f64) -> Option<(Meta, T)> {
        let (priority, flow) = self.index.get(&id)?.clone();
        let e = self.bands.get_mut(&priority)?.remove(id, &flow, now)?;
        self.take_out(&e);
        Some((e.meta, e.payload))
    }

    fn take_out(&mut self, e: &Entry<T>) {
        self.index.remove(&e.id);
        self.bytes -= e.meta.bytes;
        self.len -= 1;
    }

    /// Takes out the requests whose queue-wait budget ran out: `defaultRequestTTL` while
    /// the pool has endpoints, `noEndpointRequestTTL` while it is empty, counted from when
    /// they were queued or the pool last changed regime, whichever is later. Also drops
    /// on-demand bands idle for `IDLE_BAND_S`.
    pub fn expire(&mut self, now: f64) -> Vec<(ItemId, Meta, T, Expiry)> {
        let (budget, why) = if self.pool_empty {
            (self.spec.no_endpoint_ttl, Expiry::NoEndpoints)
        } else {
            (self.spec.request_ttl, Expiry::Ttl)
        };
        let mut out = Vec::new();
        if let Some(budget) = budget.map(|d| d.as_secs_f64()) {
            let since = self.regime_since;
            let due: Vec<(ItemId, i32, String)> = self
                .bands
                .iter()
                .flat_map(|(p, b)| {
                    b.flows.iter().flat_map(move |(f, q)| {
                        q.iter()
                            .filter(move |e| now - e.meta.enqueued.max(since) >= budget)
                            .map(move |e| (e.id, *p, f.clone()))
                    })
                })
                .collect();
            for (id, p, f) in due {
                if let Some(e) = self.bands.get_mut(&p).and_then(|b| b.remove(id, &f, now)) {
                    self.take_out(&e);
                    out.push((e.id, e.meta, e.payload, why));
                }
            }
        }
        self.bands.retain(|_, b| b.configured || b.len > 0 || now - b.empty_since < IDLE_BAND_S);
        out
    }

    /// Takes out every queued request (shutdown), oldest first.
    pub fn drain(&mut self) -> Vec<(ItemId, Meta, T)> {
        let mut all: Vec<Entry<T>> = Vec::with_capacity(self.len as usize);
        for b in self.bands.values_mut() {
            for (_, q) in std::mem::take(&mut b.flows) {
                all.extend(q);
            }
            b.len = 0;
            b.bytes = 0;
        }
        self.index.clear();
        self.len = 0;
        self.bytes = 0;
        all.sort_by(|a, b| a.meta.enqueued.total_cmp(&b.meta.enqueued).then(a.id.cmp(&b.id)));
        all.into_iter().map(|e| (e.id, e.meta, e.payload)).collect()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Per band, highest priority first.
    pub fn band_stats(&self) -> Vec<BandStats> {
        self.bands
            .values()
            .rev()
            .map(|b| BandStats {
                priority: b.spec.priority,
                requests: b.len,
                bytes: b.bytes,
                max_requests: b.spec.max_requests,
                max_bytes: b.spec.max_bytes,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn meta(flow: &str, priority: i32, at: f64) -> Meta {
        Meta { flow: flow.into(), priority, bytes: 100, enqueued: at }
    }

    fn spec() -> FlowSpec {
        FlowSpec { enabled: true, ..FlowSpec::default() }
    }

    fn drain_order<T: Clone>(q: &mut FlowQueues<T>) -> Vec<T> {
        std::iter::from_fn(|| q.pop(0.0, 100.0).map(|(_, _, t)| t)).collect()
    }

    #[test]
    fn higher_bands_go_first_and_fcfs_within_a_band() {
        let mut q = FlowQueues::new(spec(), 0.0);
        for (i, p) in [0, -1, 1, 0, 1].into_iter().enumerate() {
            q.enqueue(meta("a", p, i as f64), i, i as f64).unwrap_or_else(|_| panic!("queued"));
        }
        assert_eq!(drain_order(&mut q), vec![2, 4, 0, 3, 1]);
        assert!(q.is_empty());
    }

    #[test]
    fn nothing_is_dispatched_at_or_over_the_usage_limit() {
        let mut q = FlowQueues::new(spec(), 0.0);
        q.enqueue(meta("a", 0, 0.0), 1, 0.0).unwrap_or_else(|_| panic!("queued"));
        assert!(q.pop(1.0, 0.0).is_none());
        assert!(q.pop(1.7, 0.0).is_none());
        assert_eq!(q.pop(0.99, 0.0).map(|x| x.2), Some(1));
    }

    #[test]
    fn round_robin_serves_flows_in_turn_and_global_strict_by_arrival() {
        let mut rr = spec();
        for b in &mut rr.bands {
            b.fairness = Fairness::RoundRobin;
        }
        // Heavy tenant "h" queues 6 before light tenant "l" queues 2.
        let arrivals = [("h", 0.0), ("h", 1.0), ("h", 2.0), ("h", 3.0), ("h", 4.0), ("h", 5.0), ("l", 6.0), ("l", 7.0)];
        let mut q = FlowQueues::new(rr, 0.0);
        let mut strict = FlowQueues::new(spec(), 0.0);
        for (i, (f, at)) in arrivals.iter().enumerate() {
            q.enqueue(meta(f, 0, *at), i, *at).unwrap_or_else(|_| panic!("queued"));
            strict.enqueue(meta(f, 0, *at), i, *at).unwrap_or_else(|_| panic!("queued"));
        }
        assert_eq!(drain_order(&mut q), vec![0, 6, 1, 7, 2, 3, 4, 5]);
        assert_eq!(drain_order(&mut strict), vec![0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn edf_orders_by_deadline() {
        let mut s = spec();
        for b in &mut s.bands {
            b.ordering = Ordering::Edf;
        }
        let mut q = FlowQueues::new(s, 0.0);
        // Enqueued out of order (same TTL): the earliest enqueue time has the first deadline.
        for (i, at) in [5.0, 1.0, 3.0].into_iter().enumerate() {
            q.enqueue(meta("a", 0, at), i, at).unwrap_or_else(|_| panic!("queued"));
        }
        assert_eq!(drain_order(&mut q), vec![1, 2, 0]);
    }

    #[test]
    fn limits_refuse_new_arrivals_and_say_whether_the_pool_is_empty() {
        let mut s = spec();
        s.bands[0].max_requests = 2;
        s.max_bytes = 250;
        let mut q = FlowQueues::new(s, 0.0);
        assert!(q.enqueue(meta("a", 0, 0.0), 1, 0.0).is_ok());
        assert!(q.enqueue(meta("a", 0, 0.0), 2, 0.0).is_ok());
        assert_eq!(q.enqueue(meta("a", 0, 0.0), 3, 0.0).map_err(|e| e.0), Err(Rejection::Capacity));
        // Band 5 (on demand, default template) has room, the global byte cap does not.
        assert_eq!(q.enqueue(meta("a", 5, 0.0), 4, 0.0).map_err(|e| e.0), Err(Rejection::Capacity));
        q.set_pool_empty(true, 1.0);
        assert_eq!(q.enqueue(meta("a", 0, 1.0), 5, 1.0).map_err(|e| e.0), Err(Rejection::NoEndpoints));
        assert_eq!((q.len(), q.bytes()), (2, 200));
    }

    #[test]
    fn negative_priorities_use_their_template() {
        let mut s = spec();
        s.default_negative_band = Some(BandSpec { max_requests: 1, ..s.default_band.clone() });
        let mut q = FlowQueues::new(s, 0.0);
        assert!(q.enqueue(meta("a", -1, 0.0), 1, 0.0).is_ok());
        assert!(q.enqueue(meta("a", -1, 0.0), 2, 0.0).is_err());
        assert!(q.enqueue(meta("a", -2, 0.0), 3, 0.0).is_ok(), "each priority is its own band");
        assert!(q.enqueue(meta("a", 0, 0.0), 4, 0.0).is_ok());
    }

    #[test]
    fn ttls_expire_by_regime_and_cancel_frees_room_at_once() {
        let mut s = spec();
        s.request_ttl = Some(Duration::from_secs(10));
        s.no_endpoint_ttl = Some(Duration::from_secs(30));
        s.bands[0].max_requests = 3;
        let mut q = FlowQueues::new(s, 0.0);
        let a = q.enqueue(meta("a", 0, 0.0), 'a', 0.0).unwrap_or_else(|_| panic!("queued"));
        q.enqueue(meta("a", 0, 5.0), 'b', 5.0).unwrap_or_else(|_| panic!("queued"));
        q.enqueue(meta("a", 0, 6.0), 'c', 6.0).unwrap_or_else(|_| panic!("queued"));
        assert_eq!(q.cancel(a, 7.0).map(|x| x.1), Some('a'));
        assert!(q.cancel(a, 7.0).is_none(), "only once");
        q.enqueue(meta("a", 0, 7.0), 'd', 7.0).unwrap_or_else(|_| panic!("room again"));
        let gone: Vec<(char, Expiry)> = q.expire(15.5).into_iter().map(|x| (x.2, x.3)).collect();
        assert_eq!(gone, vec![('b', Expiry::Ttl)]);
        // The pool empties at 16: the no-endpoint budget (30 s) counts from then.
        q.set_pool_empty(true, 16.0);
        assert!(q.expire(45.0).is_empty());
        let gone: Vec<(char, Expiry)> = q.expire(46.0).into_iter().map(|x| (x.2, x.3)).collect();
        assert_eq!(gone, vec![('c', Expiry::NoEndpoints), ('d', Expiry::NoEndpoints)]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_reconfiguration_keeps_what_is_queued() {
        let mut q = FlowQueues::new(spec(), 0.0);
        for (i, p) in [0, 3, 3].into_iter().enumerate() {
            q.enqueue(meta("a", p, i as f64), i, i as f64).unwrap_or_else(|_| panic!("queued"));
        }
        let mut s = spec();
        s.bands.push(BandSpec { priority: 3, max_requests: 1, ..s.default_band.clone() });
        q.reconfigure(s, 5.0);
        assert_eq!(q.len(), 3, "over the new limit, but nothing queued is dropped");
        assert!(q.enqueue(meta("a", 3, 6.0), 9, 6.0).is_err(), "the new limit applies to arrivals");
        assert_eq!(drain_order(&mut q), vec![1, 2, 0]);
    }

    #[test]
    fn drain_hands_back_everything_oldest_first() {
        let mut q = FlowQueues::new(spec(), 0.0);
        for (i, (f, p)) in [("a", 0), ("b", 1), ("a", -1)].into_iter().enumerate() {
            q.enqueue(meta(f, p, i as f64), i, i as f64).unwrap_or_else(|_| panic!("queued"));
        }
        let all: Vec<usize> = q.drain().into_iter().map(|x| x.2).collect();
        assert_eq!(all, vec![0, 1, 2]);
        assert_eq!((q.len(), q.bytes()), (0, 0));
    }
}
