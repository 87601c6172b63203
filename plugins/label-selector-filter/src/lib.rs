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
//! which fails the request with 503 naming the filter. Keys and values are checked as
//! Kubernetes checks a selector's (a value with a space, say, stops the load naming it,
//! where it would otherwise match no endpoint).
//!
//! The same component serves upstream's deprecated `by-label` filter, whose parameters are
//! of another shape (`label`, `validValues`, `allowsNoLabel`: keep the endpoints whose
//! `label` has one of `validValues`, and those without the label when `allowsNoLabel`), and
//! the role filters built on it (`decode-filter`, `prefill-filter`, `encode-filter`, whose
//! parameters the host fills in). The two shapes cannot be mixed in one entry.

use std::collections::{BTreeMap, HashMap};

use llmd_plugin_sdk::{Cycle, EndpointInfo, Filter, Manifest, Needs, Plugin, params};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Expression>,
    /// `by-label`: the label to read…
    pub label: Option<String>,
    /// …the values kept…
    pub valid_values: Vec<String>,
    /// …and whether endpoints without the label are kept.
    pub allows_no_label: bool,
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
    by_label: Option<ByLabel>,
}

/// Upstream's `by-label` rule.
#[derive(Clone, Debug, PartialEq)]
struct ByLabel {
    key: String,
    values: Vec<String>,
    allows_no_label: bool,
}

impl Selector {
    /// Validates the parameters; errors name the offending expression.
    pub fn from(p: Params) -> Result<Selector, String> {
        if let Some(key) = p.label {
            if !p.match_labels.is_empty() || !p.match_expressions.is_empty() {
                return Err("label: give either `label`/`validValues`/`allowsNoLabel` (by-label) or \
                            `matchLabels`/`matchExpressions` (a label selector), not both"
                    .into());
            }
            label_key(&key).map_err(|why| format!("label `{key}`: {why}"))?;
            for (j, v) in p.valid_values.iter().enumerate() {
                label_value(v).map_err(|why| format!("validValues[{j}] `{v}`: {why}"))?;
            }
            if p.valid_values.is_empty() && !p.allows_no_label {
                return Err("validValues must list at least one value unless allowsNoLabel is true".into());
            }
            let by_label = ByLabel { key, values: p.valid_values, allows_no_label: p.allows_no_label };
            return Ok(Selector { by_label: Some(by_label), ..Default::default() });
        }
        if !p.valid_values.is_empty() || p.allows_no_label {
            return Err("validValues and allowsNoLabel need `label` (the label they are about)".into());
        }
        for (k, v) in &p.match_labels {
            label_key(k).map_err(|why| format!("matchLabels key `{k}`: {why}"))?;
            label_value(v).map_err(|why| format!("matchLabels.{k} value `{v}`: {why}"))?;
        }
        let mut expressions = Vec::new();
        for (i, e) in p.match_expressions.into_iter().enumerate() {
            if e.key.is_empty() {
                return Err(format!("matchExpressions[{i}].key is required"));
            }
            label_key(&e.key).map_err(|why| format!("matchExpressions[{i}].key `{}`: {why}", e.key))?;
            for (j, v) in e.values.iter().enumerate() {
                label_value(v).map_err(|why| format!("matchExpressions[{i}].values[{j}] `{v}`: {why}"))?;
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
        Ok(Selector { labels: p.match_labels.into_iter().collect(), expressions, by_label: None })
    }

    pub fn matches(&self, labels: &[(String, String)]) -> bool {
        let get = |k: &str| labels.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        if let Some(b) = &self.by_label {
            // As upstream: a missing label reads as "", which `validValues` may list.
            let value = get(&b.key);
            return (value.is_none() && b.allows_no_label) || b.values.iter().any(|v| v == value.unwrap_or(""));
        }
        self.labels.iter().all(|(k, v)| get(k) == Some(v.as_str()))
            && self.expressions.iter().all(|(k, op)| match op {
                Op::In(values) => get(k).is_some_and(|v| values.iter().any(|x| x == v)),
                Op::NotIn(values) => get(k).is_none_or(|v| !values.iter().any(|x| x == v)),
                Op::Exists => get(k).is_some(),
                Op::DoesNotExist => get(k).is_none(),
            })
    }
}

/// A label name or value as Kubernetes writes it: at most 63 characters, alphanumerics,
/// `-`, `_` and `.`, starting and ending with an alphanumeric.
fn label_name(s: &str, what: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let edges = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if s.len() > 63 {
        Err(format!("a label {what} has at most 63 characters"))
    } else if !s.chars().all(ok) || !edges(s.chars().next()) || !edges(s.chars().last()) {
        Err(format!("a label {what} is alphanumerics, `-`, `_` and `.`, starting and ending with an alphanumeric"))
    } else {
        Ok(())
    }
}

/// A label key: a name, optionally after a DNS-subdomain prefix and `/`, as Kubernetes
/// selectors accept them (upstream validates its selector the same way).
pub fn label_key(key: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            let label = |l: &str| {
                !l.is_empty()
                    && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            };
            if prefix.len() > 253 || !prefix.split('.').all(label) {
                return Err(
                    "its prefix (before `/`) must be a DNS subdomain: lower-case alphanumerics, `-` and `.`".into()
                );
            }
            name
        }
        None => key,
    };
    if name.is_empty() { Err("a label key needs a name".into()) } else { label_name(name, "name") }
}

/// A label value: empty, or a name (see `label_name`).
pub fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() { Ok(()) } else { label_name(value, "value") }
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
