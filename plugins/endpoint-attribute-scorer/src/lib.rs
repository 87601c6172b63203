//! `endpoint-attribute-scorer`: scores each candidate by one numeric endpoint attribute, as
//! upstream's: a custom metric that `core-metrics-extractor`'s `customMetrics` maps to
//! `attributeKey` (the host hands it in as column `attribute/<key>`, NaN where an endpoint
//! has none or its metrics are stale).
//!
//! ```yaml
//! - type: endpoint-attribute-scorer
//!   name: queue-depth-attribute
//!   parameters:
//!     attributeKey: custom.queue_depth
//!     algorithm:
//!       type: linear_lower_is_better          # or linear_higher_is_better
//!       normalization: {fixedRange: {min: 0, max: 1}}   # or adaptiveRange (the default)
//! ```
//!
//! The value is normalised linearly over `[min, max]`, inverted for `linear_lower_is_better`.
//! `adaptiveRange` (the default) takes the range over the candidates that have the
//! attribute, and scores them all 1 when they share one value; `fixedRange` uses the
//! configured bounds and clamps. An endpoint without the attribute scores 0 (and does not
//! count in an adaptive range).

use llmd_plugin_sdk::columns::configured_attribute;
use llmd_plugin_sdk::{Cycle, Manifest, Plugin, Scorer, params};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub attribute_key: String,
    pub producer: Option<String>,
    pub algorithm: Algorithm,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Algorithm {
    #[serde(rename = "type")]
    pub kind: String,
    pub normalization: Normalization,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Normalization {
    pub fixed_range: Option<FixedRange>,
    pub adaptive_range: Option<AdaptiveRange>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedRange {
    pub min: f64,
    pub max: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveRange {}

#[derive(Default)]
pub struct EndpointAttributeScorer {
    lower_is_better: bool,
    /// `None`: adaptive.
    fixed: Option<FixedRange>,
}

impl Plugin for EndpointAttributeScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        let column = configured_attribute("attributeKey", &p.attribute_key, p.producer.as_deref())?;
        self.lower_is_better = match p.algorithm.kind.as_str() {
            "linear_lower_is_better" => true,
            "linear_higher_is_better" => false,
            other => {
                return Err(format!(
                    "algorithm.type: expected linear_lower_is_better or linear_higher_is_better, got `{other}`"
                ));
            }
        };
        let n = p.algorithm.normalization;
        if n.fixed_range.is_some() && n.adaptive_range.is_some() {
            return Err("algorithm.normalization: give at most one of fixedRange and adaptiveRange".into());
        }
        if let Some(r) = n.fixed_range
            && !(r.min.is_finite() && r.max.is_finite() && r.min < r.max)
        {
            return Err(format!(
                "algorithm.normalization.fixedRange: min must be below max, got {} and {}",
                r.min, r.max
            ));
        }
        self.fixed = n.fixed_range;
        Ok(Manifest { reads: vec![column], stateless: true, ..Default::default() })
    }
}

impl Scorer for EndpointAttributeScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        let values = cycle.column(0);
        let (min, max) = match self.fixed {
            Some(r) => (r.min, r.max),
            None => values
                .iter()
                .filter(|v| v.is_finite())
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(f64::from(v)), hi.max(f64::from(v)))),
        };
        values
            .iter()
            .map(|&v| {
                if !v.is_finite() {
                    return 0.0;
                }
                if max == min {
                    return 1.0;
                }
                let x = ((f64::from(v) - min) / (max - min)).clamp(0.0, 1.0);
                (if self.lower_is_better { 1.0 - x } else { x }) as f32
            })
            .collect()
    }
}

llmd_plugin_sdk::export_scorer!(EndpointAttributeScorer);
