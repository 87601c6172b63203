//! `lora-affinity-scorer`: prefers endpoints that already serve the requested adapter
//! (the request's model name): 1.0 when it is running there, 0.8 when it is waiting to
//! load, 0.6 when the endpoint has room for another adapter (`max_lora`), else 0.
//!
//! Adapter state arrives with `pool-changed`; the plugin keeps the latest per endpoint.

use std::collections::HashMap;

use llmd_plugin_sdk::{Column, EndpointInfo, Metrics, Plugin, Request, Scorer};

#[derive(Default)]
pub struct LoraAffinityScorer {
    endpoints: HashMap<u32, EndpointInfo>,
}

impl Plugin for LoraAffinityScorer {
    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        self.endpoints = endpoints.iter().map(|e| (e.id, e.clone())).collect();
    }
}

fn affinity(info: Option<&EndpointInfo>, adapter: &str) -> f32 {
    let Some(info) = info else { return 0.0 };
    if info.running_adapters.iter().any(|a| a == adapter) {
        1.0
    } else if info.waiting_adapters.iter().any(|a| a == adapter) {
        0.8
    } else if info.max_lora.is_some_and(|max| info.running_adapters.len() + info.waiting_adapters.len() < max as usize)
    {
        0.6
    } else {
        0.0
    }
}

impl Scorer for LoraAffinityScorer {
    fn score(&mut self, req: &Request, metrics: &Metrics, _columns: &[Column]) -> Vec<f32> {
        metrics.ids.iter().map(|id| affinity(self.endpoints.get(id), &req.model)).collect()
    }
}

llmd_plugin_sdk::export_scorer!(LoraAffinityScorer);
