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
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::Deserialize;
use tracing::info;

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodDiscovery {
    socket_port: Option<u16>,
    replay_socket_port: Option<u16>,
}

/// The settings of the configured precise producer.
pub struct Settings {
    pub tokenizer: Tokenizer,
    /// Used for endpoints whose events have not said their block size yet.
    pub default_block_size: u32,
    pub socket_port: u16,
    pub replay_port: u16,
    pub topic: String,
}

/// Counters of the event intake.
#[derive(Default)]
pub struct Stats {
    pub messages: AtomicU64,
    pub gaps: AtomicU64,
    pub replays: AtomicU64,
    pub restarts: AtomicU64,
    pub malformed: AtomicU64,
    pub skipped: AtomicU64,
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
    pub stats: Stats,
    telemetry: Option<Arc<Telemetry>>,
}

impl KvEvents {
    pub fn new(telemetry: Option<Arc<Telemetry>>) -> Arc<KvEvents> {
        Arc::new(KvEvents {
            index: RwLock::new(index::PreciseIndex::new(DEFAULT_MAX_BLOCKS)),
            settings: RwLock::new(None),
            live: RwLock::default(),
            subscriptions: Mutex::default(),
            stats: Stats::default(),
            telemetry,
        })
    }

    /// Configures from the producer's `parameters`; `base` resolves the tokenizer's paths.
    pub fn configure(&self, params: &serde_json::Value, base: Option<&Path>) -> Result<(), String> {
        let p: Params = serde_json::from_value(params.clone()).map_err(|e| format!("invalid parameters: {e}"))?;
        let tokenizer = Tokenizer::load(&p.tokenizer.unwrap_or_default(), base)?;
        let tp = p.token_processor_config.unwrap_or_default();
        let default_block_size = tp.block_size_tokens.or(tp.block_size).unwrap_or(16);
        if default_block_size == 0 {
            return Err("tokenProcessorConfig.blockSize must be > 0".into());
        }
        let events = p.kv_events_config.unwrap_or_default();
        let discovery = events.pod_discovery_config.unwrap_or_default();
        let settings = Settings {
            tokenizer,
            default_block_size,
            socket_port: discovery.socket_port.unwrap_or(5557),
            replay_port: discovery.replay_socket_port.unwrap_or(5558),
            topic: events.topic_filter.unwrap_or_default(),
        };
        if let Some(max) = p.max_blocks_per_endpoint {
            if max == 0 {
                return Err("maxBlocksPerEndpoint must be > 0".into());
            }
            let mut ix = write(&self.index);
            *ix = index::PreciseIndex::new(max);
        }
        *write(&self.settings) = Some(Arc::new(settings));
        Ok(())
    }

    pub fn settings(&self) -> Option<Arc<Settings>> {
        read(&self.settings).clone()
    }

    /// Whether `endpoint`'s events are flowing.
    pub fn is_live(&self, endpoint: u32) -> bool {
        read(&self.live).contains(&endpoint)
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
        self.stats.skipped.fetch_add(applied.skipped, Ordering::Relaxed);
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
        self.subscriptions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to the events of every endpoint of `pool` and drops subscriptions (and
    /// index entries) of endpoints no longer in it. A no-op until configured.
    pub fn sync_pool(self: &Arc<Self>, pool: &PoolSnapshot) {
        let Some(settings) = self.settings() else { return };
        let mut subs = self.subscriptions();
        let mut wanted = HashMap::new();
        for e in &pool.endpoints {
            let label = |k: &str| e.spec.labels.get(k).cloned();
            let host = match e.spec.address {
                std::net::IpAddr::V6(a) => format!("[{a}]"),
                a => a.to_string(),
            };
            let source = Source {
                events: label(EVENTS_LABEL).unwrap_or_else(|| format!("tcp://{host}:{}", settings.socket_port)),
                replay: label(REPLAY_LABEL).or_else(|| Some(format!("tcp://{host}:{}", settings.replay_port))),
            };
            wanted.insert(e.id, (source, e.spec.name.clone()));
        }
        let gone: Vec<u32> = subs.keys().copied().filter(|id| !wanted.contains_key(id)).collect();
        for id in gone {
            if let Some(sub) = subs.remove(&id) {
                sub.task.abort();
                self.set_live(id, false);
                self.forget(id, &sub.name);
            }
        }
        for (id, (source, name)) in wanted {
            if subs.get(&id).is_some_and(|s| s.source == source) {
                continue;
            }
            if let Some(old) = subs.remove(&id) {
                old.task.abort();
                self.forget(id, &old.name);
            }
            info!(endpoint = %name, events = %source.events, "subscribing to KV events");
            let task =
                tokio::spawn(subscriber::run(self.clone(), id, name.clone(), source.clone(), settings.topic.clone()));
            subs.insert(id, Subscription { source, task: task.abort_handle(), name });
        }
    }

    /// Stops every subscription.
    pub fn stop(&self) {
        for (_, sub) in self.subscriptions().drain() {
            sub.task.abort();
        }
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
            }),
            sim::kv_cache::KvEvent::Removed { hashes } => decode::Event::Removed { hashes, medium: None },
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
