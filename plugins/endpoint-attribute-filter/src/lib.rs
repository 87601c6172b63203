//! `endpoint-attribute-filter`: keeps the candidates whose numeric endpoint attribute
//! passes a threshold, as upstream's: a custom metric that `core-metrics-extractor`'s
//! `customMetrics` maps to `attribute` (the host hands it in as column `attribute/<key>`,
//! NaN where an endpoint has none or its metrics are stale).
//!
//! ```yaml
//! - type: endpoint-attribute-filter
//!   name: drop-loaded-endpoints
//!   parameters:
//!     attribute: custom.gpu_temperature
//!     onMissing: Pass          # or Fail: drop endpoints without the attribute
//!     fallbackOnEmpty: true    # keep everyone rather than no one
//!     algorithm:
//!       type: threshold
//!       threshold: {operator: LessThan, value: 85}
//! ```
//!
//! Operators: `LessThan`, `LessThanOrEqual`, `GreaterThan`, `GreaterThanOrEqual`, `Equal`,
//! `NotEqual`. Without `fallbackOnEmpty` it may keep no one, which fails the request with
//! 503 naming the filter, as any filter.

use llmd_plugin_sdk::columns::configured_attribute;
use llmd_plugin_sdk::{Cycle, Filter, Manifest, Plugin, params};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub attribute: String,
    pub producer: Option<String>,
    pub on_missing: String,
    pub fallback_on_empty: bool,
    pub algorithm: Algorithm,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Algorithm {
    #[serde(rename = "type")]
    pub kind: String,
    pub threshold: Option<Threshold>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub operator: Operator,
    pub value: f64,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub enum Operator {
    LessThan,
    LessThanOrEqual,
    GreaterThan,
    GreaterThanOrEqual,
    Equal,
    NotEqual,
}

impl Operator {
    fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Operator::LessThan => value < threshold,
            Operator::LessThanOrEqual => value <= threshold,
            Operator::GreaterThan => value > threshold,
            Operator::GreaterThanOrEqual => value >= threshold,
            Operator::Equal => value == threshold,
            Operator::NotEqual => value != threshold,
        }
    }
}

#[derive(Default)]
pub struct EndpointAttributeFilter {
    keep_missing: bool,
    fallback_on_empty: bool,
    threshold: Option<Threshold>,
}

impl Plugin for EndpointAttributeFilter {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        let column = configured_attribute("attribute", &p.attribute, p.producer.as_deref())?;
        self.keep_missing = match p.on_missing.as_str() {
            "" | "Pass" => true,
            "Fail" => false,
            other => return Err(format!("onMissing: expected Pass or Fail, got `{other}`")),
        };
        if p.algorithm.kind != "threshold" {
            return Err(format!("algorithm.type: expected threshold, got `{}`", p.algorithm.kind));
        }
        let Some(threshold) = p.algorithm.threshold else {
            return Err("algorithm.threshold: required with algorithm.type threshold ({operator, value})".into());
        };
        if !threshold.value.is_finite() {
            return Err(format!("algorithm.threshold.value: must be a finite number, got {}", threshold.value));
        }
        self.threshold = Some(threshold);
        self.fallback_on_empty = p.fallback_on_empty;
        Ok(Manifest { reads: vec![column], stateless: true, ..Default::default() })
    }
}

impl Filter for EndpointAttributeFilter {
    fn filter(&mut self, cycle: &Cycle) -> Vec<u32> {
        let Some(t) = self.threshold else { return cycle.ids.clone() };
        let values = cycle.column(0);
        let kept: Vec<u32> = cycle
            .ids
            .iter()
            .zip(values.iter())
            .filter(|&(_, &v)| if v.is_nan() { self.keep_missing } else { t.operator.holds(f64::from(v), t.value) })
            .map(|(&id, _)| id)
            .collect();
        if kept.is_empty() && self.fallback_on_empty { cycle.ids.clone() } else { kept }
    }
}

llmd_plugin_sdk::export_filter!(EndpointAttributeFilter);
