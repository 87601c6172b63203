//! Precise prefix-cache routing from the engines' KV events (vLLM's `--kv-events-config`).
//!
//! When a profile uses `precise-prefix-cache-producer`, the host:
//! - subscribes to every endpoint's event publisher (ZMQ SUB, `subscriber.rs`), detects
//!   sequence gaps and publisher restarts and asks the replay socket for what it missed;
//! - keeps the index of what each engine holds (`index.rs`) from the decoded events
//!   (`decode.rs`);
//! - runs a host producer (`producer.rs`) before the component that tokenizes the request
//!   as the engine does (`tokenize.rs`) and writes, per candidate, the blocks it holds.
//!
//! Where events come from: `tcp://<endpoint address>:<socketPort>` (default 5557) and the
//! replay socket `tcp://<address>:<replaySocketPort>` (default 5558), from
//! `kvEventsConfig.podDiscoveryConfig` as upstream names them; an endpoint's labels
//! `kv-events-endpoint` / `kv-events-replay-endpoint` override both (full `tcp://` URLs).
//! `kvEventsConfig.topicFilter` subscribes to a topic prefix (default: everything).

pub mod decode;
pub mod index;
mod producer;
mod subscriber;
pub mod tokenize;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::Deserialize;
use tracing::{info, warn};

use crate::datastore::PoolSnapshot;
use crate::telemetry::Telemetry;
pub use producer::KvEventsProducer;
use tokenize::{Tokenizer, TokenizerParams};

/// The plugin type that turns this on.
pub const PRECISE_TYPE: &str = "precise-prefix-cache-producer";
/// The endpoint labels that name an endpoint's event and replay sockets.
pub const EVENTS_LABEL: &str = "kv-events-endpoint";
pub const REPLAY_LABEL: &str = "kv-events-replay-endpoint";
/// Default index bound per endpoint (about 120 MB per endpoint at the bound).
pub const DEFAULT_MAX_BLOCKS: usize = 2_000_000;

/// What the host reads of `precise-prefix-cache-producer`'s parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    tokenizer: Option<TokenizerParams>,
    token_processor_config: Option<TokenProcessor>,
    kv_events_config: Option<EventsConfig>,
    max_blocks_per_endpoint: Option<usize>,
    #[serde(flatten)]
    extra: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenProcessor {
    block_size: Option<u32>,
    block_size_tokens: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventsConfig {
    topic_filter: Option<String>,
    pod_discovery_config: Option<PodDiscovery>,
    /// Upstream's centralised mode: every engine publishes to this one socket.
    zmq_endpoint: Option<String>,
    discover_pods: Option<bool>,
    #[serde(flatten)]
    extra: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodDiscovery {
    socket_port: Option<u16>,
    replay_socket_port: Option<u16>,
}

/// What of an upstream config is not used here, one sentence each.
fn unused(p: &Params) -> Vec<String> {
    let mut out: Vec<String> = p
        .extra
        .keys()
        .filter(|k| k.as_str() != "indexerConfig")
        .map(|k| format!("parameter `{k}` is not known here and is ignored"))
        .collect();
    if let Some(events) = &p.kv_events_config {
        if events.discover_pods == Some(false) || events.zmq_endpoint.as_deref().is_some_and(|e| !e.is_empty()) {
            out.push(
                "a central event socket (`discoverPods: false`, `zmqEndpoint`) is not supported: each endpoint's \
                 events are read from its own address at podDiscoveryConfig.socketPort (or its `kv-events-endpoint` \
                 label); point vLLM's --kv-events-config endpoint there"
                    .into(),
            );
        }
        out.extend(events.extra.keys().map(|k| format!("kvEventsConfig.{k} is not known here and is ignored")));
    }
    out
}

/// The settings of a configured precise producer, made when a scheduler is built and
/// applied to the hub when that scheduler is installed (`KvEvents::sync`).
pub struct Settings {
    pub tokenizer: Tokenizer,
    /// Used for endpoints whose events have not said their block size yet.
    pub default_block_size: u32,
    pub socket_port: u16,
    pub replay_port: u16,
    pub topic: String,
    /// The index bound per endpoint (`maxBlocksPerEndpoint`).
    pub max_blocks: usize,
    /// What these settings were made from (parameters, folder, a hash of the files they
    /// read), so an unchanged entry reuses them and a replaced tokenizer is loaded again.
    source: (serde_json::Value, Option<PathBuf>, u64),
}

impl Settings {
    /// Reads the producer's `parameters` (`base` resolves the tokenizer's paths), loading
    /// the tokenizer; changes nothing until installed.
    pub fn from_params(params: &serde_json::Value, base: Option<&Path>) -> Result<Settings, String> {
        let p: Params = serde_json::from_value(params.clone()).map_err(|e| format!("invalid parameters: {e}"))?;
        if params.get("indexerConfig").is_some_and(|v| !v.is_null()) {
            // Upstream's indexer settings (tokenizer pool, index backend, metrics) name Go
            // components; accepted so an upstream config loads, and said to be unused.
            warn!(
                "precise-prefix-cache-producer: `indexerConfig` is accepted and not used: the index is in memory, \
                 bounded by `maxBlocksPerEndpoint`, and the tokenizer is set by `tokenizer`"
            );
        }
        for warning in unused(&p) {
            warn!("precise-prefix-cache-producer: {warning}");
        }
        let tokenizer = Tokenizer::load(&p.tokenizer.unwrap_or_default(), base)?;
        let tp = p.token_processor_config.unwrap_or_default();
        let default_block_size = tp.block_size_tokens.or(tp.block_size).unwrap_or(16);
        if default_block_size == 0 {
            return Err("tokenProcessorConfig.blockSize must be > 0".into());
        }
        let max_blocks = p.max_blocks_per_endpoint.unwrap_or(DEFAULT_MAX_BLOCKS);
        if max_blocks == 0 {
            return Err("maxBlocksPerEndpoint must be > 0".into());
        }
        let events = p.kv_events_config.unwrap_or_default();
        let discovery = events.pod_discovery_config.unwrap_or_default();
        Ok(Settings {
            tokenizer,
            default_block_size,
            socket_port: discovery.socket_port.unwrap_or(5557),
            replay_port: discovery.replay_socket_port.unwrap_or(5558),
            topic: events.topic_filter.unwrap_or_default(),
            max_blocks,
            source: (params.clone(), base.map(Path::to_path_buf), files_hash(params, base)),
        })
    }

    /// Whether these settings were made from `params` and `base`.
    pub fn made_from(&self, params: &serde_json::Value, base: Option<&Path>) -> bool {
        self.source.0 == *params && self.source.1.as_deref() == base && self.source.2 == files_hash(params, base)
    }
}

/// The files a precise producer's `parameters` make it read (the tokenizer and its chat
/// template), resolved against `base`.
pub fn files_read(params: &serde_json::Value, base: Option<&Path>) -> Vec<PathBuf> {
    let Ok(p) = serde_json::from_value::<Params>(params.clone()) else { return Vec::new() };
    let Some(t) = p.tokenizer else { return Vec::new() };
    let resolve = |p: &Path| match base {
        Some(b) if p.is_relative() => b.join(p),
        _ => p.to_path_buf(),
    };
    t.path.iter().chain(&t.chat_template).map(|p| resolve(p)).collect()
}

/// A hash of the contents of `files_read` (a missing file hashes as empty).
fn files_hash(params: &serde_json::Value, base: Option<&Path>) -> u64 {
    let mut h = 0u64;
    for f in files_read(params, base) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        h = xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, h);
    }
    h
}

/// One endpoint's event source.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Source {
    pub events: String,
    pub replay: Option<String>,
}

/// The hub: index, settings, subscriptions and counters, shared by the host producer, the
/// subscribers and the server.
pub struct KvEvents {
    index: RwLock<index::PreciseIndex>,
    settings: RwLock<Option<Arc<Settings>>>,
    /// Endpoints whose events are flowing.
    live: RwLock<HashSet<u32>>,
    /// Per endpoint id: its sockets, the subscriber task and the endpoint's name.
    subscriptions: Mutex<HashMap<u32, Subscription>>,
    telemetry: Option<Arc<Telemetry>>,
}

impl KvEvents {
    pub fn new(telemetry: Option<Arc<Telemetry>>) -> Arc<KvEvents> {
        Arc::new(KvEvents {
            index: RwLock::new(index::PreciseIndex::new(DEFAULT_MAX_BLOCKS)),
            settings: RwLock::new(None),
            live: RwLock::default(),
            subscriptions: Mutex::default(),
            telemetry,
        })
    }

    /// The settings in force (those of the installed scheduler), if any.
    pub fn settings(&self) -> Option<Arc<Settings>> {
        read(&self.settings).clone()
    }

    /// The endpoints whose events are flowing.
    pub fn live(&self) -> std::sync::RwLockReadGuard<'_, HashSet<u32>> {
        read(&self.live)
    }

    pub fn set_live(&self, endpoint: u32, live: bool) {
        let mut l = write(&self.live);
        if live {
            l.insert(endpoint)
        } else {
            l.remove(&endpoint)
        };
    }

    pub fn index(&self) -> std::sync::RwLockReadGuard<'_, index::PreciseIndex> {
        read(&self.index)
    }

    /// Applies one endpoint's decoded events (from a subscriber, or the replay's cluster).
    pub fn apply(&self, endpoint: u32, name: &str, events: &[decode::Event]) {
        let applied = write(&self.index).apply(endpoint, events);
        if let Some(t) = &self.telemetry {
            t.kv_index_blocks(name, self.index().blocks(endpoint));
            if applied.skipped > 0 {
                t.kv_events_skipped(name, applied.skipped);
            }
        }
    }

    /// Forgets `endpoint`'s blocks (its engine restarted, or it left the pool).
    pub fn forget(&self, endpoint: u32, name: &str) {
        write(&self.index).forget(endpoint);
        if let Some(t) = &self.telemetry {
            t.kv_index_blocks(name, 0);
        }
    }

    fn subscriptions(&self) -> MutexGuard<'_, HashMap<u32, Subscription>> {
        crate::routing::lock(&self.subscriptions)
    }

    /// Puts `settings` (the installed scheduler's; `None` when it routes without events)
    /// in force, subscribes to the events of every endpoint of `pool`, and drops the
    /// subscriptions (and index entries) of endpoints no longer in it. Settings that
    /// change the index bound start a new index; ones that change the topic resubscribe.
    pub fn sync(self: &Arc<Self>, settings: Option<&Arc<Settings>>, pool: &PoolSnapshot) {
        let mut subs = self.subscriptions();
        let previous = self.install(settings);
        // Routing without events, or on another topic: every subscription ends.
        if settings.is_none_or(|s| previous.as_ref().is_some_and(|p| p.topic != s.topic)) {
            for (id, sub) in subs.drain() {
                self.unsubscribe(id, sub);
            }
        }
        let Some(settings) = settings else { return };
        let mut wanted = HashMap::new();
        for e in &pool.endpoints {
            let label = |k: &str| e.spec.labels.get(k).cloned();
            let at = |port: u16| format!("tcp://{}", std::net::SocketAddr::new(e.spec.address, port));
            let source = Source {
                events: label(EVENTS_LABEL).unwrap_or_else(|| at(settings.socket_port)),
                replay: label(REPLAY_LABEL).or_else(|| Some(at(settings.replay_port))),
            };
            wanted.insert(e.id, (source, e.spec.name.clone()));
        }
        let gone: Vec<u32> = subs.keys().copied().filter(|id| !wanted.contains_key(id)).collect();
        for id in gone {
            if let Some(sub) = subs.remove(&id) {
                self.unsubscribe(id, sub);
            }
        }
        for (id, (source, name)) in wanted {
            if subs.get(&id).is_some_and(|s| s.source == source) {
                continue;
            }
            if let Some(old) = subs.remove(&id) {
                self.unsubscribe(id, old);
            }
            info!(endpoint = %name, events = %source.events, "subscribing to KV events");
            let task =
                tokio::spawn(subscriber::run(self.clone(), id, name.clone(), source.clone(), settings.topic.clone()));
            subs.insert(id, Subscription { source, task: task.abort_handle(), name });
        }
    }

    /// Puts `settings` in force without touching subscriptions (`epp replay` feeds the
    /// index itself); a changed index bound starts a new index. Returns the previous ones.
    pub fn install(&self, settings: Option<&Arc<Settings>>) -> Option<Arc<Settings>> {
        let previous = std::mem::replace(&mut *write(&self.settings), settings.cloned());
        if let Some(s) = settings
            && previous.as_ref().is_none_or(|p| p.max_blocks != s.max_blocks)
        {
            *write(&self.index) = index::PreciseIndex::new(s.max_blocks);
        }
        previous
    }

    /// Ends a subscription: its task stops and the endpoint's blocks are forgotten.
    fn unsubscribe(&self, id: u32, sub: Subscription) {
        sub.task.abort();
        self.set_live(id, false);
        self.forget(id, &sub.name);
    }

    fn telemetry(&self) -> Option<&Arc<Telemetry>> {
        self.telemetry.as_ref()
    }
}

struct Subscription {
    source: Source,
    task: tokio::task::AbortHandle,
    name: String,
}

/// The simulator's events as if decoded from its publisher (`epp replay` feeds the index
/// from its simulated engines directly, in virtual time).
pub fn from_sim(events: Vec<sim::kv_cache::KvEvent>, block_size: u32) -> Vec<decode::Event> {
    events
        .into_iter()
        .map(|e| match e {
            sim::kv_cache::KvEvent::Stored { hashes, parent, tokens } => decode::Event::Stored(decode::Stored {
                hashes,
                parent,
                tokens,
                block_size,
                lora: None,
                medium: None,
                first_block_strings: Vec::new(),
                kind: None,
                group: None,
            }),
            sim::kv_cache::KvEvent::Removed { hashes } => decode::Event::Removed { hashes, medium: None, group: None },
            sim::kv_cache::KvEvent::Cleared => decode::Event::Cleared,
        })
        .collect()
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upstream settings this EPP does not use are named, not silently dropped.
    #[test]
    fn unused_upstream_settings_are_named() {
        let params = serde_json::json!({
            "indexerConfig": {"tokenizersPoolConfig": {}},
            "kvEventsConfig": {"zmqEndpoint": "tcp://indexer:5557", "discoverPods": false, "engineType": "vllm",
                               "topicFilter": "kv@"},
            "tokenProcessorConfig": {"blockSize": 16},
            "speculativeIndexing": true,
        });
        let p: Params = serde_json::from_value(params).unwrap_or_else(|e| panic!("{e}"));
        let said = unused(&p).join("\n");
        assert!(said.contains("`speculativeIndexing`"), "{said}");
        assert!(said.contains("kvEventsConfig.engineType"), "{said}");
        assert!(said.contains("central event socket"), "{said}");
        assert!(!said.contains("indexerConfig") && !said.contains("topicFilter"), "{said}");
        let plain: Params = serde_json::from_value(serde_json::json!({"kvEventsConfig": {"topicFilter": "kv@"}}))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(unused(&plain).is_empty());
    }
}
