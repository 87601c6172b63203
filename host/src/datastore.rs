//! The endpoint pool and each endpoint's latest metrics, shared by discovery (writer),
//! the metrics scrapers (writers of their endpoint's cell) and the request path (reader).
//!
//! Readers take an immutable `PoolSnapshot` (an `Arc` swapped atomically), so a request
//! never waits on discovery or scraping and sees one consistent pool for its whole cycle.
//! Endpoint ids are stable for an endpoint's identity — `namespace/name` at one address
//! and port — so plugin state keyed by id (the prefix index) survives relabelling, and an
//! endpoint that moves is a new endpoint. This module does no I/O.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use epp_core::{CacheInfo, Candidates, EndpointInfo};

use crate::discovery::{EndpointDiff, EndpointSpec, diff};

/// Latest scraped values of one endpoint. Written by its scraper, read by requests; each
/// value is an atomic so neither side ever blocks. NaN means unknown.
#[derive(Debug)]
pub struct MetricsCell {
    waiting: AtomicU32,
    running: AtomicU32,
    kv_usage: AtomicU32,
    /// Milliseconds since `Datastore::epoch` of the last successful scrape; 0 = never.
    updated_ms: AtomicU64,
    /// What the EPP itself knows at once: requests routed here since the last scrape
    /// (not yet in its queue figures), and requests (and their prompt tokens) in flight.
    routed_since_scrape: AtomicU32,
    in_flight: AtomicU32,
    in_flight_tokens: AtomicU64,
    /// The endpoint's attributes (custom metrics) as of the last scrape that read any.
    attributes: ArcSwap<Vec<(Arc<str>, f32)>>,
}

impl Default for MetricsCell {
    fn default() -> Self {
        MetricsCell {
            waiting: AtomicU32::new(f32::NAN.to_bits()),
            running: AtomicU32::new(f32::NAN.to_bits()),
            kv_usage: AtomicU32::new(f32::NAN.to_bits()),
            updated_ms: AtomicU64::new(0),
            routed_since_scrape: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            in_flight_tokens: AtomicU64::new(0),
            attributes: ArcSwap::from_pointee(Vec::new()),
        }
    }
}

/// The EPP's own count of one endpoint's load, from `MetricsCell::own_load`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OwnLoad {
    pub routed_since_scrape: u32,
    pub in_flight: u32,
    pub in_flight_tokens: u64,
}

/// One reading of an endpoint's load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    pub waiting: f32,
    pub running: f32,
    pub kv_usage: f32,
}

impl MetricsCell {
    /// A request with `tokens` prompt tokens was routed here.
    pub fn routed(&self, tokens: u64) {
        self.routed_since_scrape.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    /// A request routed here (with `tokens`) ended.
    pub fn ended(&self, tokens: u64) {
        let _ = self.in_flight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
        let _ = self
            .in_flight_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(tokens)));
    }

    pub fn own_load(&self) -> OwnLoad {
        OwnLoad {
            routed_since_scrape: self.routed_since_scrape.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            in_flight_tokens: self.in_flight_tokens.load(Ordering::Relaxed),
        }
    }

    fn load(&self) -> (Reading, u64) {
        let f = |a: &AtomicU32| f32::from_bits(a.load(Ordering::Relaxed));
        (
            Reading { waiting: f(&self.waiting), running: f(&self.running), kv_usage: f(&self.kv_usage) },
            self.updated_ms.load(Ordering::Acquire),
        )
    }
}

/// An endpoint of the current pool.
#[derive(Debug)]
pub struct PoolEndpoint {
    pub id: u32,
    pub spec: EndpointSpec,
    pub info: EndpointInfo,
    pub metrics: Arc<MetricsCell>,
}

impl PoolEndpoint {
    /// Where requests go.
    pub fn target(&self) -> SocketAddr {
        self.spec.target()
    }
}

/// The pool as one request sees it.
#[derive(Debug, Default)]
pub struct PoolSnapshot {
    /// Bumped on every published change; 0 = never loaded.
    pub generation: u64,
    pub endpoints: Vec<PoolEndpoint>,
}

impl PoolSnapshot {
    pub fn by_id(&self, id: u32) -> Option<&PoolEndpoint> {
        self.endpoints.iter().find(|e| e.id == id)
    }

    pub fn infos(&self) -> Vec<EndpointInfo> {
        self.endpoints.iter().map(|e| e.info.clone()).collect()
    }
}

pub struct Datastore {
    pool: ArcSwap<PoolSnapshot>,
    /// Serialises writers; readers never take it.
    write: Mutex<Ids>,
    epoch: Instant,
    /// Whether any endpoint ever had an attribute: until then requests skip them.
    attributes_seen: AtomicBool,
}

#[derive(Default)]
struct Ids {
    next: u32,
    /// (key, target) → id, for every endpoint ever seen while it stays in the pool.
    by_identity: HashMap<(String, SocketAddr), u32>,
}

impl Default for Datastore {
    fn default() -> Self {
        Datastore::new()
    }
}

impl Datastore {
    pub fn new() -> Self {
        Datastore {
            pool: ArcSwap::from_pointee(PoolSnapshot::default()),
            write: Mutex::new(Ids::default()),
            epoch: Instant::now(),
            attributes_seen: AtomicBool::new(false),
        }
    }

    /// The current pool (cheap: one atomic load and an `Arc` clone).
    pub fn snapshot(&self) -> Arc<PoolSnapshot> {
        self.pool.load_full()
    }

    /// Whether a pool was ever published (even an empty one).
    pub fn loaded(&self) -> bool {
        self.pool.load().generation > 0
    }

    /// Publishes `specs` as the whole new pool, keeping ids (and metrics) of endpoints that
    /// stay. Returns the new snapshot and what changed.
    pub fn set_pool(&self, specs: &[EndpointSpec]) -> (Arc<PoolSnapshot>, EndpointDiff) {
        let mut ids = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.pool.load_full();
        let old_specs: Vec<EndpointSpec> = old.endpoints.iter().map(|e| e.spec.clone()).collect();
        let change = diff(&old_specs, specs);
        let mut endpoints = Vec::with_capacity(specs.len());
        let mut keep: HashMap<(String, SocketAddr), u32> = HashMap::new();
        for spec in specs {
            let identity = (spec.key(), spec.target());
            let id = match ids.by_identity.get(&identity) {
                Some(&id) => id,
                None => {
                    ids.next = ids.next.wrapping_add(1);
                    ids.next
                }
            };
            keep.insert(identity, id);
            let previous = old.by_id(id);
            let metrics = previous.map(|p| p.metrics.clone()).unwrap_or_default();
            let mut info = endpoint_info(id, spec);
            if let Some(p) = previous {
                // Engine state comes from scraping, not from the file: keep it across reloads.
                EngineInfo::of(&p.info).apply(&mut info);
            }
            endpoints.push(PoolEndpoint { id, info, spec: spec.clone(), metrics });
        }
        ids.by_identity = keep;
        let generation = if change.is_empty() && old.generation > 0 { old.generation } else { old.generation + 1 };
        let snapshot = Arc::new(PoolSnapshot { generation, endpoints });
        // Invariant: after this store, no new request can see a removed endpoint.
        self.pool.store(snapshot.clone());
        (snapshot, change)
    }

    /// Records endpoint `id`'s engine state (LoRA adapters, cache geometry); when it
    /// changed, publishes a new snapshot (a new generation, so plugins are told) and
    /// returns it.
    pub fn set_engine(&self, id: u32, engine: &EngineInfo) -> Option<Arc<PoolSnapshot>> {
        let _writer = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.pool.load_full();
        let e = old.by_id(id)?;
        if EngineInfo::of(&e.info) == *engine {
            return None;
        }
        let endpoints = old
            .endpoints
            .iter()
            .map(|p| {
                let mut info = p.info.clone();
                if p.id == id {
                    engine.apply(&mut info);
                }
                PoolEndpoint { id: p.id, spec: p.spec.clone(), info, metrics: p.metrics.clone() }
            })
            .collect();
        let snapshot = Arc::new(PoolSnapshot { generation: old.generation + 1, endpoints });
        self.pool.store(snapshot.clone());
        Some(snapshot)
    }

    /// Whether `engine` differs from what the pool holds for endpoint `id` (false when the
    /// endpoint left). Cheap: one snapshot load, no lock.
    pub fn engine_differs(&self, id: u32, engine: &EngineInfo) -> bool {
        self.pool.load().by_id(id).is_some_and(|e| EngineInfo::of(&e.info) != *engine)
    }

    /// Records a scrape of endpoint `id` (ignored if it left the pool).
    pub fn record_metrics(&self, id: u32, reading: Reading) {
        if let Some(e) = self.pool.load().by_id(id) {
            let m = &e.metrics;
            m.waiting.store(reading.waiting.to_bits(), Ordering::Relaxed);
            m.running.store(reading.running.to_bits(), Ordering::Relaxed);
            m.kv_usage.store(reading.kv_usage.to_bits(), Ordering::Relaxed);
            let now = self.epoch.elapsed().as_millis() as u64;
            m.updated_ms.store(now.max(1), Ordering::Release);
            m.routed_since_scrape.store(0, Ordering::Relaxed);
        }
    }

    /// Records the attributes (custom metrics) a scrape of endpoint `id` read; an endpoint
    /// whose engine config maps none records nothing.
    pub fn record_attributes(&self, id: u32, attributes: Vec<(Arc<str>, f32)>) {
        if attributes.is_empty() && !self.attributes_seen.load(Ordering::Relaxed) {
            return;
        }
        if let Some(e) = self.pool.load().by_id(id)
            && **e.metrics.attributes.load() != attributes
        {
            e.metrics.attributes.store(Arc::new(attributes));
            self.attributes_seen.store(true, Ordering::Relaxed);
        }
    }

    /// Milliseconds since endpoint `e`'s last scrape (`u32::MAX` when never scraped).
    pub fn age_ms(&self, e: &PoolEndpoint) -> u32 {
        let updated = e.metrics.updated_ms.load(Ordering::Acquire);
        if updated == 0 {
            return u32::MAX;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        now.saturating_sub(updated).min(u32::MAX as u64) as u32
    }

    /// The scheduler's view of `endpoints` of `snapshot`: metrics columns, with values older
    /// than `max_age_ms` (or never scraped) reported as NaN.
    pub fn candidates(&self, endpoints: &[&PoolEndpoint], max_age_ms: u32) -> Candidates {
        let now = self.epoch.elapsed().as_millis() as u64;
        let mut m = Candidates {
            ids: Vec::with_capacity(endpoints.len()),
            waiting: Vec::with_capacity(endpoints.len()),
            running: Vec::with_capacity(endpoints.len()),
            kv_usage: Vec::with_capacity(endpoints.len()),
            age_ms: Vec::with_capacity(endpoints.len()),
            own_in_flight: Vec::with_capacity(endpoints.len()),
            attributes: Vec::new(),
        };
        let with_attributes = self.attributes_seen.load(Ordering::Relaxed);
        for (i, e) in endpoints.iter().enumerate() {
            let (r, updated) = e.metrics.load();
            let age = if updated == 0 { u32::MAX } else { now.saturating_sub(updated).min(u32::MAX as u64) as u32 };
            let fresh = age <= max_age_ms;
            let v = |x: f32| if fresh { x } else { f32::NAN };
            m.ids.push(e.id);
            m.waiting.push(v(r.waiting));
            m.running.push(v(r.running));
            m.kv_usage.push(v(r.kv_usage));
            m.age_ms.push(age as f32);
            m.own_in_flight.push(e.metrics.in_flight.load(Ordering::Relaxed) as f32);
            if with_attributes && fresh {
                for (key, value) in e.metrics.attributes.load().iter() {
                    let column = match m.attributes.iter().position(|(k, _)| k == key) {
                        Some(c) => c,
                        None => {
                            m.attributes.push((key.clone(), vec![f32::NAN; endpoints.len()]));
                            m.attributes.len() - 1
                        }
                    };
                    m.attributes[column].1[i] = *value;
                }
            }
        }
        m
    }
}

/// What scraping tells about an endpoint's engine beyond its load: LoRA adapters and the
/// KV-cache geometry. Pushed to plugins (with the pool) when it changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineInfo {
    pub max_lora: Option<u32>,
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
    pub cache: Option<CacheInfo>,
}

impl EngineInfo {
    fn of(info: &EndpointInfo) -> EngineInfo {
        EngineInfo {
            max_lora: info.max_lora,
            running_adapters: info.running_adapters.clone(),
            waiting_adapters: info.waiting_adapters.clone(),
            cache: info.cache,
        }
    }

    fn apply(&self, info: &mut EndpointInfo) {
        info.max_lora = self.max_lora;
        info.running_adapters.clone_from(&self.running_adapters);
        info.waiting_adapters.clone_from(&self.waiting_adapters);
        info.cache = self.cache;
    }
}

fn endpoint_info(id: u32, spec: &EndpointSpec) -> EndpointInfo {
    let labels: BTreeMap<&String, &String> = spec.labels.iter().collect();
    EndpointInfo {
        id,
        name: spec.name.clone(),
        namespace: spec.namespace.clone(),
        address: spec.address.to_string(),
        port: spec.port,
        labels: labels.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        max_lora: None,
        running_adapters: Vec::new(),
        waiting_adapters: Vec::new(),
        cache: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, port: u16, label: &str) -> EndpointSpec {
        EndpointSpec {
            name: name.into(),
            namespace: "default".into(),
            address: "127.0.0.1".parse().unwrap(),
            port,
            metrics_port: None,
            labels: [("tier".to_string(), label.to_string())].into(),
        }
    }

    fn ids(s: &PoolSnapshot) -> Vec<(String, u32)> {
        s.endpoints.iter().map(|e| (e.spec.name.clone(), e.id)).collect()
    }

    #[test]
    fn ids_survive_relabelling_but_not_moves() {
        let ds = Datastore::new();
        assert!(!ds.loaded());
        let (s1, c1) = ds.set_pool(&[spec("a", 1, "x"), spec("b", 2, "x")]);
        assert_eq!(c1.added.len(), 2);
        assert_eq!(s1.generation, 1);
        let (a, b) = (s1.endpoints[0].id, s1.endpoints[1].id);
        // Relabel a, move b: a keeps its id, b gets a new one.
        let (s2, c2) = ds.set_pool(&[spec("a", 1, "y"), spec("b", 3, "x")]);
        assert_eq!(ids(&s2)[0], ("a".to_string(), a));
        assert_ne!(ids(&s2)[1].1, b);
        assert_eq!(c2.changed, vec!["default/a".to_string(), "default/b".to_string()]);
        assert_eq!(s2.by_id(a).unwrap().info.labels, vec![("tier".to_string(), "y".to_string())]);
        // Same set again: no new generation.
        let (s3, c3) = ds.set_pool(&[spec("a", 1, "y"), spec("b", 3, "x")]);
        assert!(c3.is_empty());
        assert_eq!(s3.generation, s2.generation);
        // Removal: gone from the published snapshot at once.
        let (s4, c4) = ds.set_pool(&[spec("b", 3, "x")]);
        assert_eq!(c4.removed, vec!["default/a".to_string()]);
        assert!(ds.snapshot().by_id(a).is_none());
        assert_eq!(s4.endpoints.len(), 1);
        assert!(ds.loaded());
    }

    #[test]
    fn metrics_are_nan_until_scraped_and_when_stale() {
        let ds = Datastore::new();
        let (s, _) = ds.set_pool(&[spec("a", 1, "x"), spec("b", 2, "x")]);
        let (a, b) = (s.endpoints[0].id, s.endpoints[1].id);
        ds.record_metrics(a, Reading { waiting: 3.0, running: 1.0, kv_usage: 0.5 });
        let snap = ds.snapshot();
        let all: Vec<&PoolEndpoint> = snap.endpoints.iter().collect();
        let m = ds.candidates(&all, 10_000);
        assert_eq!(m.ids, vec![a, b]);
        assert_eq!(m.waiting[0], 3.0);
        assert!(m.waiting[1].is_nan() && m.kv_usage[1].is_nan());
        assert_eq!(m.age_ms[1], u32::MAX as f32);
        // A zero staleness budget makes any reading older than now unknown… but a reading
        // from this very millisecond may still count, so only check the never-scraped one.
        let m = ds.candidates(&all, 0);
        assert!(m.waiting[1].is_nan());
        // Metrics of an endpoint that stays survive a relabel.
        ds.set_pool(&[spec("a", 1, "z"), spec("b", 2, "x")]);
        let snap = ds.snapshot();
        let all: Vec<&PoolEndpoint> = snap.endpoints.iter().collect();
        assert_eq!(ds.candidates(&all, 10_000).waiting[0], 3.0);
    }

    #[test]
    fn attributes_are_columns_of_the_candidates_nan_where_missing() {
        let ds = Datastore::new();
        let (s, _) = ds.set_pool(&[spec("a", 1, "x"), spec("b", 2, "x"), spec("c", 3, "x")]);
        let (a, b, c) = (s.endpoints[0].id, s.endpoints[1].id, s.endpoints[2].id);
        let snap = ds.snapshot();
        let all: Vec<&PoolEndpoint> = snap.endpoints.iter().collect();
        // Nothing configured: no attribute columns at all.
        ds.record_attributes(a, Vec::new());
        assert!(ds.candidates(&all, 10_000).attributes.is_empty());
        for id in [a, b] {
            ds.record_metrics(id, Reading { waiting: 0.0, running: 0.0, kv_usage: 0.0 });
        }
        ds.record_attributes(a, vec![("temp".into(), 80.0), ("tier".into(), 1.0)]);
        ds.record_attributes(b, vec![("temp".into(), 60.0)]);
        // c's metrics were never scraped (stale): its attributes read as unknown, as its load.
        ds.record_attributes(c, vec![("temp".into(), 10.0)]);
        let m = ds.candidates(&all, 10_000);
        let temp = m.attribute("temp").expect("temp column");
        assert_eq!((temp[0], temp[1]), (80.0, 60.0));
        assert!(temp[2].is_nan(), "c's are stale: {temp:?}");
        let tier = m.attribute("tier").expect("tier column");
        assert!(tier[0] == 1.0 && tier[1].is_nan() && tier[2].is_nan(), "{tier:?}");
        assert!(m.attribute("other").is_none());
        // A later scrape replaces the endpoint's attributes; selecting keeps them aligned.
        ds.record_attributes(a, vec![("temp".into(), 70.0)]);
        let m = ds.candidates(&all, 10_000);
        assert!(m.attribute("tier").is_none(), "no endpoint has tier now");
        assert_eq!(m.select(&[1, 2]).attribute("temp").map(<[f32]>::to_vec).map(|t| t[0]), Some(60.0));
    }
}
