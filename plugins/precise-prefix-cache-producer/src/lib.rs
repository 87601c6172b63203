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
//! routing decisions, with the approximate producer's parameters and defaults. With
//! `speculativeIndexing: true` (upstream's name; off by default), a candidate with events
//! gets the larger of the two, covering the moment between a routing decision and the
//! engine's event for it.
//!
//! Parameters: upstream's (`tokenProcessorConfig`, `indexerConfig`, `kvEventsConfig`,
//! `speculativeIndexing`, `speculativeTTL`), the host's `tokenizer` and
//! `maxBlocksPerEndpoint`, and the approximate index's (`autoTune`, `lruCapacityPerServer`,
//! `blockSizeTokens`, `maxPrefixBlocksToMatch`, `maxPrefixTokensToMatch`). The host reads
//! what concerns it; unknown names are errors.

use llmd_plugin_sdk::columns::{
    KV_EVENTS_BLOCK_TOKENS, KV_EVENTS_LIVE, KV_EVENTS_MATCHED, KV_EVENTS_TOTAL, PRECISE_PREFIX, prefix_block_tokens,
    prefix_matched, prefix_total,
};
use llmd_plugin_sdk::{Cycle, EndpointInfo, Manifest, Plugin, Producer, params};
use prefix_index::PrefixIndexProducer;

/// Parameters the host reads (checked there) and the approximate index's.
const HOST_KEYS: &[&str] =
    &["tokenizer", "tokenProcessorConfig", "indexerConfig", "kvEventsConfig", "maxBlocksPerEndpoint", "speculativeTTL"];
const APPROX_KEYS: &[&str] =
    &["autoTune", "lruCapacityPerServer", "blockSizeTokens", "maxPrefixBlocksToMatch", "maxPrefixTokensToMatch"];

#[derive(Default)]
pub struct PrecisePrefixProducer {
    fallback: PrefixIndexProducer,
    speculative: bool,
}

/// The precise namespace's columns this producer writes, in order.
pub fn written() -> Vec<String> {
    vec![
        prefix_matched(PRECISE_PREFIX),
        prefix_total(PRECISE_PREFIX),
        prefix_block_tokens(PRECISE_PREFIX),
        format!("{PRECISE_PREFIX}/indexed-blocks"),
    ]
}

impl Plugin for PrecisePrefixProducer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let params: serde_json::Map<String, serde_json::Value> = params::parse(params_json)?;
        let mut approx = serde_json::Map::new();
        for (k, v) in &params {
            if APPROX_KEYS.contains(&k.as_str()) {
                approx.insert(k.clone(), v.clone());
            } else if k == "speculativeIndexing" {
                self.speculative = v.as_bool().ok_or("speculativeIndexing must be true or false")?;
            } else if !HOST_KEYS.contains(&k.as_str()) {
                return Err(format!(
                    "invalid parameters: unknown field `{k}`, expected one of {}, speculativeIndexing, {}",
                    HOST_KEYS.join(", "),
                    APPROX_KEYS.join(", ")
                ));
            }
        }
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
        self.fallback.pool_changed(generation, endpoints);
    }

    fn decided(&mut self, cycle: u64, endpoint: u32) -> Vec<(String, String)> {
        self.fallback.decided(cycle, endpoint)
    }
}

impl Producer for PrecisePrefixProducer {
    fn produce(&mut self, cycle: &Cycle) -> Vec<f32> {
        // The estimate for every candidate first (it also remembers the request's hashes
        // for `decided`), then the engines' own word where their events flow.
        let mut out = self.fallback.produce(cycle);
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
            let estimate = if out[n + i] > 0.0 { out[i] / out[n + i] } else { 0.0 };
            let exact = if total > 0.0 { matched / total } else { 0.0 };
            if self.speculative && estimate > exact {
                continue;
            }
            out[i] = matched;
            out[n + i] = total;
            out[2 * n + i] = tokens;
        }
        out
    }
}

llmd_plugin_sdk::export_producer!(PrecisePrefixProducer);
