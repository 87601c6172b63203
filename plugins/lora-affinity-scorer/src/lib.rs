//! `lora-affinity-scorer`: prefers endpoints that already serve the requested adapter (the
//! request's model name), in upstream's order of precedence: 1.0 when it is running there,
//! 0.8 when the endpoint has room for another adapter (its distinct running and waiting
//! adapters fewer than `max_lora`: vLLM lists an adapter in both while some of its requests
//! run and others wait, and it holds one slot), 0.6 when it is waiting to load there, else 0.
//! One difference, this EPP's: running there while another adapter waits for a slot scores
//! 0.7 (`DRAINING`), as new requests for a running adapter keep the waiting one out.
//!
//! Adapter state arrives with `pool-changed`; the plugin keeps the latest per endpoint and
//! nothing else, so it declares itself stateless (skipped when the filters leave one
//! candidate, served from several instances side by side).

use std::collections::HashMap;

use llmd_plugin_sdk::{Cycle, EndpointInfo, Manifest, Needs, Plugin, Scorer, params};

#[derive(Default)]
pub struct LoraAffinityScorer {
    endpoints: HashMap<u32, EndpointInfo>,
}

impl Plugin for LoraAffinityScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        params::parse::<params::NoParams>(params_json)?;
        Ok(Manifest {
            needs: Needs { model: true, pool: true, ..Default::default() },
            stateless: true,
            ..Default::default()
        })
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        self.endpoints = endpoints.iter().map(|e| (e.id, e.clone())).collect();
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
        cycle.ids.iter().map(|id| affinity(self.endpoints.get(id), adapter)).collect()
    }
}

llmd_plugin_sdk::export_scorer!(LoraAffinityScorer);
