//! `lora-affinity-scorer`: prefers endpoints that already serve the requested adapter (the
//! request's model name), in upstream's order of precedence: 1.0 when it is running there,
//! 0.8 when the endpoint has room for another adapter (its distinct running and waiting
//! adapters fewer than `max_lora`: vLLM lists an adapter in both while some of its requests
//! run and others wait, and it holds one slot), 0.6 when it is waiting to load there, else 0.
//! One difference, this EPP's: running there while another adapter waits for a slot scores
//! 0.7 (`DRAINING`), as new requests for a running adapter keep the waiting one out.
//!
//! Another, this EPP's too: when the adapter has outgrown the workers running it — every
//! one of them has `outgrownQueueDepth` (default 5, the saturation detector's queue
//! depth) requests waiting, and their shortest queue is at least three times the other
//! candidates' mean plus that depth — every candidate scores 0.5: with one adapter slot per
//! worker (vLLM's default) the adapter would otherwise stay on workers that cannot keep up
//! while the others' slots are taken, so prefix and load decide where it loads next.
//! `outgrownQueueDepth: 0` turns it off (upstream's scorer).
//!
//! Adapter state arrives with `pool-changed`; the plugin keeps the latest per endpoint and
//! nothing else, so it declares itself stateless (skipped when the filters leave one
//! candidate, served from several instances side by side).

use std::collections::{HashMap, HashSet};

use llmd_plugin_sdk::columns::WAITING;
use llmd_plugin_sdk::{
    Cycle, EndpointInfo, Manifest, Needs, Plugin, Scorer, adapter_outgrown, listed_adapters, params,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    /// Requests waiting on each worker running the adapter from which it may have outgrown
    /// them (this EPP's; 0 turns the rule off).
    pub outgrown_queue_depth: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params { outgrown_queue_depth: DEFAULT_OUTGROWN_QUEUE_DEPTH }
    }
}

/// The utilization detector's default `queueDepthThreshold`, upstream's measure of a
/// saturated worker (also the affinity filter's).
pub const DEFAULT_OUTGROWN_QUEUE_DEPTH: f64 = 5.0;

#[derive(Default)]
pub struct LoraAffinityScorer {
    endpoints: HashMap<u32, EndpointInfo>,
    /// Every adapter some endpoint runs or queues: only a request naming one can have
    /// outgrown its workers.
    adapters: HashSet<String>,
    /// 0: the outgrown rule is off (and the queue column is not read).
    outgrown_depth: f32,
}

impl Plugin for LoraAffinityScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        if !(p.outgrown_queue_depth >= 0.0 && p.outgrown_queue_depth.is_finite()) {
            return Err(format!("outgrownQueueDepth must be ≥ 0, got {}", p.outgrown_queue_depth));
        }
        self.outgrown_depth = p.outgrown_queue_depth as f32;
        let reads = if self.outgrown_depth > 0.0 { vec![WAITING.to_string()] } else { Vec::new() };
        Ok(Manifest {
            needs: Needs { model: true, pool: true, ..Default::default() },
            reads,
            stateless: true,
            ..Default::default()
        })
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        self.endpoints = endpoints.iter().map(|e| (e.id, e.clone())).collect();
        self.adapters = listed_adapters(endpoints);
    }
}

/// Running the adapter where another adapter waits for its slot (this EPP's, not
/// upstream's): below an endpoint with room, so the adapter's requests start elsewhere and
/// the waiting adapter gets its slot, above one where the request would wait itself.
pub const DRAINING: f32 = 0.7;

/// The score of an endpoint for `adapter`.
pub fn affinity(info: Option<&EndpointInfo>, adapter: &str) -> f32 {
    let Some(info) = info else { return 0.0 };
    let running = info.runs_adapter(adapter);
    if running && !info.starves_an_adapter_besides(adapter) {
        1.0
    } else if info.has_adapter_room() {
        0.8
    } else if running {
        DRAINING
    } else if info.waiting_adapters.iter().any(|a| a == adapter) {
        0.6
    } else {
        0.0
    }
}

impl Scorer for LoraAffinityScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        let adapter = cycle.request.model();
        let runs = |i: usize| self.endpoints.get(&cycle.ids[i]).is_some_and(|e| e.runs_adapter(adapter));
        if self.adapters.contains(adapter)
            && adapter_outgrown(cycle.len(), self.outgrown_depth, |i| cycle.value(0, i), runs)
        {
            return vec![0.5; cycle.len()];
        }
        cycle.ids.iter().map(|id| affinity(self.endpoints.get(id), adapter)).collect()
    }
}

llmd_plugin_sdk::export_scorer!(LoraAffinityScorer);
