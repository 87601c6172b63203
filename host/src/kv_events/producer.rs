//! The host producer in front of `precise-prefix-cache-producer`: tokenizes the request as
//! the engine does, chains its blocks at each candidate's block size (and LoRA adapter) and
//! writes, per candidate, how many of them its engine holds (`kv-events/*` columns).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use epp_core::{CallInput, PluginCore, PluginError, ProducerPlugin};
use llmd_plugin_sdk::columns::{KV_EVENTS_BLOCK_TOKENS, KV_EVENTS_LIVE, KV_EVENTS_MATCHED, KV_EVENTS_TOTAL};
use llmd_plugin_sdk::{Completion, EndpointInfo, Manifest, Needs};

use super::index::{chain, root};
use super::{KvEvents, Settings};

/// The name it runs under in a profile.
pub const NAME: &str = "kv-events";

pub struct KvEventsProducer {
    hub: Arc<KvEvents>,
    /// Its entry's settings (tokenizer, default block size).
    settings: Arc<Settings>,
    manifest: Manifest,
    /// Adapters each endpoint runs or queues: a request naming one is an adapter request.
    adapters: RwLock<HashMap<u32, HashSet<String>>>,
}

impl KvEventsProducer {
    pub fn new(hub: Arc<KvEvents>, settings: Arc<Settings>) -> Self {
        let manifest = Manifest {
            needs: Needs { model: true, prompt: true, pool: true, ..Default::default() },
            reads: Vec::new(),
            writes: [KV_EVENTS_MATCHED, KV_EVENTS_TOTAL, KV_EVENTS_BLOCK_TOKENS, KV_EVENTS_LIVE]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            stateless: true,
        };
        KvEventsProducer { hub, settings, manifest, adapters: RwLock::default() }
    }
}

impl PluginCore for KvEventsProducer {
    fn name(&self) -> &str {
        NAME
    }

    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn pool_changed(&self, _generation: u64, endpoints: &[EndpointInfo]) -> Result<(), PluginError> {
        let map = endpoints
            .iter()
            .map(|e| (e.id, e.running_adapters.iter().chain(&e.waiting_adapters).cloned().collect()))
            .collect();
        *super::write(&self.adapters) = map;
        Ok(())
    }

    fn decided(&self, _cycle: u64, _endpoint: u32) -> Result<Vec<(String, String)>, PluginError> {
        Ok(Vec::new())
    }

    fn first_chunk(&self, _cycle: u64, _endpoint: u32, _now_ms: u64) -> Result<(), PluginError> {
        Ok(())
    }

    fn finished(&self, _cycle: u64, _completion: &Completion) -> Result<(), PluginError> {
        Ok(())
    }
}

impl ProducerPlugin for KvEventsProducer {
    fn produce(&self, input: &CallInput<'_>) -> Result<Vec<f32>, PluginError> {
        let n = input.ids.len();
        let mut out = vec![0.0f32; 4 * n];
        let req = input.request;
        let tokens = self.settings.tokenizer.encode(req);
        // Per candidate: its block size and whether the request is an adapter request there.
        let shapes: Vec<(u32, bool)> = {
            let adapters = super::read(&self.adapters);
            let index = self.hub.index();
            input
                .ids
                .iter()
                .map(|id| {
                    let block_size = index.block_size(*id).unwrap_or(self.settings.default_block_size);
                    (block_size, adapters.get(id).is_some_and(|a| a.contains(&req.model)))
                })
                .collect()
        };
        // Chains by (block size, adapter), hashed without holding the index (the event
        // intake writes to it): most pools share one.
        let mut chains: HashMap<(u32, bool), Vec<u64>> = HashMap::new();
        for &(block_size, adapter) in &shapes {
            chains.entry((block_size, adapter)).or_insert_with(|| {
                let lora = adapter.then_some(req.model.as_str());
                chain(root(lora, req.cache_salt.as_deref()), &tokens, block_size as usize)
            });
        }
        let index = self.hub.index();
        let live = self.hub.live();
        for (i, (&id, shape)) in input.ids.iter().zip(&shapes).enumerate() {
            let Some(keys) = chains.get(shape) else { continue };
            let live = live.contains(&id);
            out[i] = if live { index.matched(id, keys) as f32 } else { 0.0 };
            out[n + i] = keys.len() as f32;
            out[2 * n + i] = shape.0 as f32;
            out[3 * n + i] = if live { 1.0 } else { 0.0 };
        }
        Ok(out)
    }
}
