//! Context-length ranges, as upstream's `context-length-aware` plugin reads them: each
//! endpoint may declare, in a label (default `llm-d.ai/context-length-range`), the prompt
//! lengths it is meant for as `"min-max"` tokens (`"0-2048"`, `"2048-8192"`). The plugin
//! always scores and, with `enableFiltering: true`, also filters; here the two halves are
//! two components built from this library (`context-length-aware`, a scorer, and
//! `context-length-aware-filter`, which the host adds in front of it when the entry asks
//! for filtering), so the config names one plugin as upstream's does.
//!
//! Scores, as upstream's:
//! - no label: 0.5 (neutral);
//! - the prompt's length within the range: above 0.3 and up to 1, higher for a narrower
//!   range (`1 / (1 + width / 10 000)`, weight 0.7) and for more room left above the prompt
//!   (`(max − length) / width`, weight 0.3), mapped onto (0.3, 1];
//! - outside it: below 0.3, by distance to the nearest bound (`0.3 / (1 + distance / 1 000)`),
//!   so a 9 000-token prompt prefers a `0-8192` endpoint to a `0-2048` one;
//! - a label that does not parse: 0 (and the filter drops the endpoint).
//!
//! The filter keeps the endpoints whose range holds the prompt and those without the label;
//! it may keep none, which fails the request with 503 naming it, as any filter.
//!
//! The prompt's length is the host's estimate of its tokens (`Request::prompt_tokens`, four
//! bytes a token), where upstream counts the tokens of its `token-producer` (itself an
//! estimate unless a tokenizer is configured).

use std::collections::HashMap;

use llmd_plugin_sdk::{Cycle, EndpointInfo, Filter, Manifest, Needs, Plugin, Scorer, params};
use serde::Deserialize;

/// Upstream's default label.
pub const DEFAULT_LABEL: &str = "llm-d.ai/context-length-range";

#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    /// The endpoint label carrying the `"min-max"` range.
    pub label: String,
    /// Also filter (the host adds the filtering component when true).
    pub enable_filtering: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params { label: DEFAULT_LABEL.into(), enable_filtering: false }
    }
}

/// A declared range, in tokens, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub min: u64,
    pub max: u64,
}

/// What an endpoint declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declared {
    NoLabel,
    Range(Range),
    /// A label that is not `"min-max"` with `min ≤ max`.
    Invalid,
}

/// Parses `"min-max"` (spaces around either number allowed).
pub fn parse_range(s: &str) -> Option<Range> {
    let (min, max) = s.split_once('-')?;
    let number = |t: &str| t.trim().parse::<u64>().ok();
    let range = Range { min: number(min)?, max: number(max)? };
    (range.min <= range.max).then_some(range)
}

/// Upstream's score for a prompt of `length` tokens on an endpoint declaring `declared`.
pub fn score(length: u64, declared: Declared) -> f32 {
    const FALLBACK_CEILING: f64 = 0.3;
    let r = match declared {
        Declared::NoLabel => return 0.5,
        Declared::Invalid => return 0.0,
        Declared::Range(r) => r,
    };
    if (r.min..=r.max).contains(&length) {
        let width = (r.max - r.min) as f64;
        if width == 0.0 {
            return 1.0;
        }
        let narrowness = 1.0 / (1.0 + width / 10_000.0);
        let room = (r.max - length) as f64 / width;
        let raw = 0.7 * narrowness + 0.3 * room;
        return (FALLBACK_CEILING + raw * (1.0 - FALLBACK_CEILING)) as f32;
    }
    let distance = if length > r.max { length - r.max } else { r.min - length };
    (FALLBACK_CEILING / (1.0 + distance as f64 / 1_000.0)) as f32
}

/// Whether the filter keeps an endpoint declaring `declared` for a prompt of `length`.
pub fn keeps(length: u64, declared: Declared) -> bool {
    match declared {
        Declared::NoLabel => true,
        Declared::Invalid => false,
        Declared::Range(r) => (r.min..=r.max).contains(&length),
    }
}

/// Both halves: the label's value per endpoint, read when the pool changes.
#[derive(Default)]
pub struct ContextLengthAware {
    label: String,
    declared: HashMap<u32, Declared>,
}

impl ContextLengthAware {
    fn declared(&self, id: u32) -> Declared {
        self.declared.get(&id).copied().unwrap_or(Declared::NoLabel)
    }
}

impl Plugin for ContextLengthAware {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        if p.label.trim().is_empty() {
            return Err("label: must name the endpoint label carrying the \"min-max\" range".into());
        }
        self.label = p.label;
        // The prompt's estimated length comes with every request; the labels with the pool.
        Ok(Manifest { needs: Needs { pool: true, ..Default::default() }, stateless: true, ..Default::default() })
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        self.declared = endpoints
            .iter()
            .map(|e| {
                let declared = match e.label(&self.label) {
                    None => Declared::NoLabel,
                    Some(v) => parse_range(v).map_or(Declared::Invalid, Declared::Range),
                };
                (e.id, declared)
            })
            .collect();
    }
}

impl Scorer for ContextLengthAware {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        let length = u64::from(cycle.request.prompt_tokens);
        cycle.ids.iter().map(|&id| score(length, self.declared(id))).collect()
    }
}

impl Filter for ContextLengthAware {
    fn filter(&mut self, cycle: &Cycle) -> Vec<u32> {
        let length = u64::from(cycle.request.prompt_tokens);
        cycle.ids.iter().copied().filter(|&id| keeps(length, self.declared(id))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_as_upstream_writes_them() {
        assert_eq!(parse_range("0-2048"), Some(Range { min: 0, max: 2048 }));
        assert_eq!(parse_range(" 2048 - 8192 "), Some(Range { min: 2048, max: 8192 }));
        assert_eq!(parse_range("4096-4096"), Some(Range { min: 4096, max: 4096 }));
        for bad in ["", "2048", "8192-2048", "a-b", "1-2-3", "-5", "5-"] {
            assert_eq!(parse_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn scores_follow_upstream_formula() {
        let r = |min, max| Declared::Range(Range { min, max });
        // In range, width 2048, 1000 tokens: 0.3 + 0.7 × (0.7 / 1.2048 + 0.3 × 1048 / 2048).
        let expect = 0.3 + 0.7 * (0.7 / 1.2048 + 0.3 * 1048.0 / 2048.0);
        assert!((score(1000, r(0, 2048)) as f64 - expect).abs() < 1e-6);
        assert_eq!(score(7, r(7, 7)), 1.0);
        // Narrower in-range beats wider in-range; every in-range beats every out-of-range.
        assert!(score(1000, r(0, 2048)) > score(1000, r(0, 131_072)));
        assert!(score(1000, r(0, 131_072)) > 0.3);
        assert!(score(9000, r(0, 8192)) > score(9000, r(0, 2048)));
        assert!(score(9000, r(0, 8192)) < 0.3);
        assert!((score(3000, r(0, 2000)) - 0.15).abs() < 1e-6, "1000 tokens away: 0.3 / 2");
        assert!((score(1000, r(2000, 4000)) - 0.15).abs() < 1e-6, "below the range, too");
        assert_eq!(score(1000, Declared::NoLabel), 0.5);
        assert_eq!(score(1000, Declared::Invalid), 0.0);
    }

    #[test]
    fn the_filter_keeps_in_range_and_unlabelled_endpoints() {
        let r = Declared::Range(Range { min: 2048, max: 8192 });
        assert!(keeps(2048, r) && keeps(8192, r) && !keeps(2047, r) && !keeps(8193, r));
        assert!(keeps(1, Declared::NoLabel));
        assert!(!keeps(1, Declared::Invalid));
    }
}
