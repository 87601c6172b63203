//! `label-selector-filter` (also accepted as `by-label-selector`, upstream's older name):
//! keeps the candidates whose endpoint labels match a Kubernetes-style label selector:
//!
//! ```yaml
//! parameters:
//!   matchLabels: {model: Qwen3-32B}
//!   matchExpressions:
//!     - {key: gpu, operator: In, values: [H100, H200]}
//!     - {key: draining, operator: DoesNotExist}
//! ```
//!
//! Every `matchLabels` pair and every expression must hold (`In`, `NotIn`, `Exists`,
//! `DoesNotExist`); an empty selector keeps everyone. Like upstream, it may keep no one,
//! which fails the request with 503 naming the filter.

use std::collections::{BTreeMap, HashMap};

use llmd_plugin_sdk::{Cycle, EndpointInfo, Filter, Manifest, Needs, Plugin, params};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Expression>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Expression {
    pub key: String,
    pub operator: String,
    pub values: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selector {
    labels: Vec<(String, String)>,
    expressions: Vec<(String, Op)>,
}

impl Selector {
    /// Validates the parameters; errors name the offending expression.
    pub fn from(p: Params) -> Result<Selector, String> {
        let mut expressions = Vec::new();
        for (i, e) in p.match_expressions.into_iter().enumerate() {
            if e.key.is_empty() {
                return Err(format!("matchExpressions[{i}].key is required"));
            }
            let op = match e.operator.as_str() {
                "In" | "NotIn" if e.values.is_empty() => {
                    return Err(format!("matchExpressions[{i}]: operator {} needs at least one value", e.operator));
                }
                "In" => Op::In(e.values),
                "NotIn" => Op::NotIn(e.values),
                "Exists" | "DoesNotExist" if !e.values.is_empty() => {
                    return Err(format!("matchExpressions[{i}]: operator {} takes no values", e.operator));
                }
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(format!(
                        "matchExpressions[{i}].operator `{other}`; expected In, NotIn, Exists or DoesNotExist"
                    ));
                }
            };
            expressions.push((e.key, op));
        }
        Ok(Selector { labels: p.match_labels.into_iter().collect(), expressions })
    }

    pub fn matches(&self, labels: &[(String, String)]) -> bool {
        let get = |k: &str| labels.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        self.labels.iter().all(|(k, v)| get(k) == Some(v.as_str()))
            && self.expressions.iter().all(|(k, op)| match op {
                Op::In(values) => get(k).is_some_and(|v| values.iter().any(|x| x == v)),
                Op::NotIn(values) => get(k).is_none_or(|v| !values.iter().any(|x| x == v)),
                Op::Exists => get(k).is_some(),
                Op::DoesNotExist => get(k).is_none(),
            })
    }
}

#[derive(Default)]
pub struct LabelSelectorFilter {
    selector: Selector,
    /// Endpoint id → whether it matches, recomputed when the pool changes.
    matching: HashMap<u32, bool>,
}

impl Plugin for LabelSelectorFilter {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        self.selector = Selector::from(p)?;
        Ok(Manifest { needs: Needs { pool: true, ..Default::default() }, stateless: true, ..Default::default() })
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        self.matching = endpoints.iter().map(|e| (e.id, self.selector.matches(&e.labels))).collect();
    }
}

impl Filter for LabelSelectorFilter {
    fn filter(&mut self, cycle: &Cycle) -> Vec<u32> {
        cycle.ids.iter().copied().filter(|id| self.matching.get(id).copied().unwrap_or(false)).collect()
    }
}

llmd_plugin_sdk::export_filter!(LabelSelectorFilter);
