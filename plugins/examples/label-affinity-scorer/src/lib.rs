//! `label-affinity-scorer`: an example custom scorer, not part of the default set. It
//! prefers endpoints by the value of one label — say `gpu: H100` over `gpu: A100` — with
//! the preference given in the config:
//!
//! ```yaml
//! - name: prefer-h100
//!   type: label-affinity-scorer
//!   wasm: label_affinity_scorer.wasm
//!   parameters: {label: gpu, scores: {H100: 1.0, A100: 0.5}, default: 0.0}
//! ```
//!
//! Endpoints without the label, or with a value not listed, score `default`. It shows the
//! whole plugin life cycle: parameters checked in `configure`, which also declares what the
//! plugin needs (the pool's labels, nothing per request), static data taken from
//! `pool_changed`, one score per candidate.

use std::collections::{BTreeMap, HashMap};

use llmd_plugin_sdk::{Cycle, EndpointInfo, Manifest, Needs, Plugin, Scorer, params};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The label to read.
    pub label: String,
    /// Score per label value, each in [0, 1].
    pub scores: BTreeMap<String, f32>,
    /// Score of endpoints without the label or with an unlisted value.
    pub default: f32,
}

#[derive(Default)]
pub struct LabelAffinityScorer {
    params: Params,
    /// Endpoint id → its score, recomputed when the pool changes.
    by_endpoint: HashMap<u32, f32>,
}

impl Plugin for LabelAffinityScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        if p.label.is_empty() {
            return Err("parameter `label` is required".into());
        }
        for (value, score) in p.scores.iter().chain([(&"default".to_string(), &p.default)]) {
            if !(0.0..=1.0).contains(score) {
                return Err(format!("score for `{value}` must be in [0, 1], got {score}"));
            }
        }
        self.params = p;
        // It reads no column and no part of the request; it only needs the pool's labels.
        Ok(Manifest { needs: Needs { pool: true, ..Default::default() }, stateless: true, ..Default::default() })
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        let p = &self.params;
        self.by_endpoint = endpoints
            .iter()
            .map(|e| (e.id, e.label(&p.label).and_then(|v| p.scores.get(v).copied()).unwrap_or(p.default)))
            .collect();
    }
}

impl Scorer for LabelAffinityScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        cycle.ids.iter().map(|id| self.by_endpoint.get(id).copied().unwrap_or(self.params.default)).collect()
    }
}

llmd_plugin_sdk::export_scorer!(LabelAffinityScorer);
