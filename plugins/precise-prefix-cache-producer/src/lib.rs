//! `precise-prefix-cache-producer`: prefix matches from what each engine says it holds.
//!
//! The host subscribes to every worker's KV-cache events (vLLM's ZMQ publisher), keeps the
//! index, tokenizes each request as the engine does, and hands this component, per
//! candidate, the blocks the engine holds (`kv-events/*` columns). This component publishes
//! them as the `precise-prefix-cache` prefix columns, which `prefix-cache-scorer` (with
//! `prefixMatchInfoProducerName: precise-prefix-cache-producer`) and the other prefix
//! readers use as they use the approximate producer's.
//!
//! A candidate whose events are not flowing (no publisher, not connected yet) gets the
//! approximate index's estimate instead: this component runs one, learning from its own
//! routing decisions, with the approximate producer's parameters and defaults.
//!
//! Speculative entries (`speculativeIndexing: true`, off by default, as upstream): when a
//! request is routed, its blocks are seeded for the chosen endpoint for `speculativeTTL`
//! (a Go duration, default `2s`, on the host's clock), covering the moment between a
//! routing decision and the engine's event for it. A candidate with events gets the larger
//! of its engine's match and its seeded match; once an entry expires only the engine's
//! word counts, so a block the engine evicted is not predicted past the TTL.
//!
//! Parameters: upstream's (`tokenProcessorConfig`, `indexerConfig`, `kvEventsConfig`,
//! `speculativeIndexing`, `speculativeTTL`), the host's `tokenizer` and
//! `maxBlocksPerEndpoint`, and the approximate index's (`autoTune`, `lruCapacityPerServer`,
//! `blockSizeTokens`, `maxPrefixBlocksToMatch`, `maxPrefixTokensToMatch`). The host reads
//! what concerns it; unknown names are errors.

use std::collections::HashMap;

use llmd_plugin_sdk::columns::{
    KV_EVENTS_BLOCK_TOKENS, KV_EVENTS_LIVE, KV_EVENTS_MATCHED, KV_EVENTS_TOTAL, PRECISE_PREFIX, prefix_block_tokens,
    prefix_match_interval, prefix_matched, prefix_total,
};
use llmd_plugin_sdk::{Cycle, EndpointInfo, Manifest, Plugin, Producer, params};
use prefix_index::{IdentityHasher, PrefixIndexProducer};

/// Parameters the host reads (checked there) and the approximate index's.
const HOST_KEYS: &[&str] =
    &["tokenizer", "tokenProcessorConfig", "indexerConfig", "kvEventsConfig", "maxBlocksPerEndpoint"];
const APPROX_KEYS: &[&str] =
    &["autoTune", "lruCapacityPerServer", "blockSizeTokens", "maxPrefixBlocksToMatch", "maxPrefixTokensToMatch"];

/// Upstream's default lifetime of a speculative entry.
pub const DEFAULT_SPECULATIVE_TTL_MS: u64 = 2_000;
/// Speculative entries one endpoint keeps at most; past it the oldest half goes (a long
/// TTL at a high request rate must not grow the component without bound).
const MAX_SEEDED_PER_ENDPOINT: usize = 1 << 20;

type Seeded = HashMap<u64, u64, std::hash::BuildHasherDefault<IdentityHasher>>;

pub struct PrecisePrefixProducer {
    fallback: PrefixIndexProducer,
    speculative: bool,
    ttl_ms: u64,
    /// Per endpoint: block hash → when its speculative entry expires (the cycles' clock).
    seeded: HashMap<u32, Seeded>,
    /// The newest cycle clock seen, and when expired entries are next swept.
    now_ms: u64,
    next_sweep_ms: u64,
}

impl Default for PrecisePrefixProducer {
    fn default() -> Self {
        PrecisePrefixProducer {
            fallback: PrefixIndexProducer::default(),
            speculative: false,
            ttl_ms: DEFAULT_SPECULATIVE_TTL_MS,
            seeded: HashMap::new(),
            now_ms: 0,
            next_sweep_ms: 0,
        }
    }
}

impl PrecisePrefixProducer {
    /// Leading blocks of `hashes` seeded for `endpoint` and not expired at `now`.
    fn seeded_depth(&self, endpoint: u32, hashes: &[u64], now: u64) -> usize {
        let Some(seeded) = self.seeded.get(&endpoint) else { return 0 };
        hashes.iter().take_while(|h| seeded.get(h).is_some_and(|&until| until > now)).count()
    }

    /// Seeds the blocks of `cycle` (if `produce` saw it) for `endpoint`.
    fn seed(&mut self, cycle: u64, endpoint: u32) {
        let now = self.now_ms;
        if now >= self.next_sweep_ms {
            for seeded in self.seeded.values_mut() {
                seeded.retain(|_, until| *until > now);
            }
            self.seeded.retain(|_, seeded| !seeded.is_empty());
            self.next_sweep_ms = now.saturating_add(self.ttl_ms.max(1));
        }
        let Some(hashes) = self.fallback.pending_hashes(cycle) else { return };
        let until = now.saturating_add(self.ttl_ms);
        let seeded = self.seeded.entry(endpoint).or_default();
        if seeded.len() + hashes.len() > MAX_SEEDED_PER_ENDPOINT {
            let mut expiries: Vec<u64> = seeded.values().copied().collect();
            let mid = expiries.len() / 2;
            let (_, &mut cut, _) = expiries.select_nth_unstable(mid);
            seeded.retain(|_, t| *t > cut);
        }
        for &h in hashes {
            seeded.insert(h, until);
        }
    }
}

/// The precise namespace's columns this producer writes, in order.
pub fn written() -> Vec<String> {
    vec![
        prefix_matched(PRECISE_PREFIX),
        prefix_total(PRECISE_PREFIX),
        prefix_block_tokens(PRECISE_PREFIX),
        format!("{PRECISE_PREFIX}/indexed-blocks"),
        prefix_match_interval(PRECISE_PREFIX),
    ]
}

impl Plugin for PrecisePrefixProducer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let params: serde_json::Map<String, serde_json::Value> = params::parse(params_json)?;
        let mut approx = serde_json::Map::new();
        let (mut speculative, mut ttl_ms) = (false, DEFAULT_SPECULATIVE_TTL_MS);
        for (k, v) in &params {
            if APPROX_KEYS.contains(&k.as_str()) {
                approx.insert(k.clone(), v.clone());
            } else if k == "speculativeIndexing" {
                speculative = v.as_bool().ok_or("speculativeIndexing must be true or false")?;
            } else if k == "speculativeTTL" {
                let text =
                    v.as_str().ok_or_else(|| format!("speculativeTTL must be a duration like \"2s\", got {v}"))?;
                let ttl = params::duration(text)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("speculativeTTL: `{text}` is not a positive duration like 2s or 500ms"))?;
                ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            } else if !HOST_KEYS.contains(&k.as_str()) {
                return Err(format!(
                    "invalid parameters: unknown field `{k}`, expected one of {}, speculativeIndexing, speculativeTTL, {}",
                    HOST_KEYS.join(", "),
                    APPROX_KEYS.join(", ")
                ));
            }
        }
        *self = PrecisePrefixProducer { speculative, ttl_ms, ..Default::default() };
        let inner = self.fallback.configure(&serde_json::Value::Object(approx).to_string())?;
        Ok(Manifest {
            needs: inner.needs,
            reads: [KV_EVENTS_MATCHED, KV_EVENTS_TOTAL, KV_EVENTS_BLOCK_TOKENS, KV_EVENTS_LIVE]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            writes: written(),
            stateless: false,
        })
    }

    fn pool_changed(&mut self, generation: u64, endpoints: &[EndpointInfo]) {
        self.seeded.retain(|id, _| endpoints.iter().any(|e| e.id == *id));
        self.fallback.pool_changed(generation, endpoints);
    }

    fn decided(&mut self, cycle: u64, endpoint: u32) -> Vec<(String, String)> {
        if self.speculative {
            self.seed(cycle, endpoint);
        }
        self.fallback.decided(cycle, endpoint)
    }
}

impl Producer for PrecisePrefixProducer {
    fn produce(&mut self, cycle: &Cycle) -> Vec<f32> {
        // The estimate for every candidate first (it also remembers the request's hashes
        // for `decided`), then the engines' own word where their events flow.
        let mut out = self.fallback.produce(cycle);
        self.now_ms = self.now_ms.max(cycle.now_ms);
        let hashes = if self.speculative { self.fallback.pending_hashes(cycle.id).unwrap_or_default() } else { &[] };
        let n = cycle.len();
        for i in 0..n {
            let live = cycle.value(3, i);
            if !(live.is_finite() && live > 0.5) {
                continue;
            }
            let (matched, total, tokens) = (cycle.value(0, i), cycle.value(1, i), cycle.value(2, i));
            if !(matched.is_finite() && total.is_finite() && tokens.is_finite()) {
                continue;
            }
            if !hashes.is_empty() {
                // The seeded match, in the approximate index's blocks (its columns already
                // hold that block count and size); compared as shares of the prompt.
                let depth = self.seeded_depth(cycle.ids[i], hashes, cycle.now_ms);
                let exact = if total > 0.0 { matched / total } else { 0.0 };
                if depth as f32 / hashes.len() as f32 > exact {
                    out[i] = depth as f32;
                    continue;
                }
            }
            out[i] = matched;
            out[n + i] = total;
            out[2 * n + i] = tokens;
        }
        out
    }
}

llmd_plugin_sdk::export_producer!(PrecisePrefixProducer);
