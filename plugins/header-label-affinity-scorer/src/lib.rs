//! `header-label-affinity-scorer`: a soft preference, as upstream's, for the endpoints whose
//! label `labelKey` equals the value of request header `headerName`: they score 1, every
//! other candidate 0 (and stays eligible). No header, an empty one, or a value no endpoint
//! carries: 0 for everyone, so the other scorers decide. One entry per header-to-label
//! mapping, each with its own weight in the profile:
//!
//! ```yaml
//! - type: header-label-affinity-scorer
//!   name: zone-affinity
//!   parameters: {headerName: x-preferred-zone, labelKey: topology.kubernetes.io/zone}
//! ```
//!
//! Headers are matched by name without regard to case (HTTP's rule; upstream lower-cases
//! the name), values exactly.

use std::collections::HashMap;

use llmd_plugin_sdk::{Cycle, EndpointInfo, Manifest, Needs, Plugin, Scorer, params};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    /// The request header holding the preferred label value.
    pub header_name: String,
    /// The endpoint label compared with it.
    pub label_key: String,
}

#[derive(Default)]
pub struct HeaderLabelAffinityScorer {
    params: Params,
    /// Endpoint id → its value of `labelKey`, when it has the label.
    values: HashMap<u32, String>,
}

impl Plugin for HeaderLabelAffinityScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        if p.header_name.trim().is_empty() {
            return Err("headerName: required (the request header holding the preferred label value)".into());
        }
        if p.label_key.trim().is_empty() {
            return Err("labelKey: required (the endpoint label compared with the header)".into());
        }
        self.params = p;
        Ok(Manifest {
            needs: Needs { headers: true, pool: true, ..Default::default() },
            stateless: true,
            ..Default::default()
        })
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        let key = &self.params.label_key;
        self.values = endpoints.iter().filter_map(|e| Some((e.id, e.label(key)?.to_string()))).collect();
    }
}

impl Scorer for HeaderLabelAffinityScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        let wanted = cycle.request.header(&self.params.header_name).unwrap_or_default();
        cycle
            .ids
            .iter()
            .map(|id| {
                let matches = !wanted.is_empty() && self.values.get(id).is_some_and(|v| v == wanted);
                if matches { 1.0 } else { 0.0 }
            })
            .collect()
    }
}

llmd_plugin_sdk::export_scorer!(HeaderLabelAffinityScorer);
