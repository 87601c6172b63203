//! A/B experiments over scheduling profiles — our extension of EndpointPickerConfig: the
//! validated spec and the pure choice of a variant for a request. The YAML is parsed by
//! the host's config module.
//!
//! ```yaml
//! experiment:
//!   split: {by: percent}            # or {by: header, header: x-variant}
//!                                   # or {by: sticky, key: "header:x-session-id"} / "user"
//!   responseHeader: true            # answer with x-epp-variant: <name>
//!   variants:
//!     - {name: baseline, profile: default, percent: 50}
//!     - {name: queue-only, profile: queue-only, percent: 50}
//!     - {name: random-shadow, profile: random, shadow: true, sample: 0.5}
//! ```
//!
//! `Scheduler::decide` runs the chosen variant's profile; the shadows run off the request
//! path, by the caller.

/// Response header naming the variant that routed a request (when enabled).
pub const VARIANT_HEADER: &str = "x-epp-variant";

#[derive(Clone, Debug, PartialEq)]
pub enum Split {
    /// By a hash of the request id: each request independently.
    Percent,
    /// The header's value names the variant; requests without it fall back to percent.
    Header(String),
    /// By a hash of a stable key, so a user or session stays on one variant.
    Sticky(StickyKey),
}

#[derive(Clone, Debug, PartialEq)]
pub enum StickyKey {
    Header(String),
    /// The OpenAI `user` field of the body.
    User,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VariantSpec {
    pub name: String,
    pub profile: String,
    /// Share of traffic (0–100) for a routing variant.
    pub percent: f64,
    /// Scored on (a sample of) every request; its pick is recorded, never used.
    pub shadow: bool,
    /// Share of requests a shadow sees, 0–1.
    pub sample: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ExperimentSpec {
    pub split: Split,
    pub variants: Vec<VariantSpec>,
    pub response_header: bool,
}

impl ExperimentSpec {
    /// The routing (non-shadow) variants, in config order.
    pub fn routing(&self) -> impl Iterator<Item = &VariantSpec> {
        self.variants.iter().filter(|v| !v.shadow)
    }

    pub fn shadows(&self) -> impl Iterator<Item = &VariantSpec> {
        self.variants.iter().filter(|v| v.shadow)
    }

    /// Index (into `variants`) of the routing variant for a request. `header` reads request
    /// headers (lower-case names); `user` is the body's `user` field.
    pub fn choose(&self, request_id: &str, header: &dyn Fn(&str) -> Option<String>, user: Option<&str>) -> usize {
        let by_bucket = |key: &str| self.by_percent(bucket(key));
        match &self.split {
            Split::Percent => by_bucket(request_id),
            Split::Header(name) => match header(name) {
                Some(v) => {
                    self.variants.iter().position(|x| !x.shadow && x.name == v).unwrap_or_else(|| by_bucket(request_id))
                }
                None => by_bucket(request_id),
            },
            Split::Sticky(StickyKey::Header(name)) => match header(name) {
                Some(v) if !v.is_empty() => by_bucket(&v),
                _ => by_bucket(request_id),
            },
            Split::Sticky(StickyKey::User) => match user {
                Some(u) if !u.is_empty() => by_bucket(u),
                _ => by_bucket(request_id),
            },
        }
    }

    /// Whether shadow `index` sees this request (its `sample` share, by request id).
    pub fn samples(&self, index: usize, request_id: &str) -> bool {
        let Some(v) = self.variants.get(index) else { return false };
        let salted = format!("{}\0{request_id}", v.name);
        bucket(&salted) < v.sample * 100.0
    }

    fn by_percent(&self, point: f64) -> usize {
        let mut acc = 0.0;
        let mut last = 0;
        for (i, v) in self.variants.iter().enumerate().filter(|(_, v)| !v.shadow) {
            acc += v.percent;
            last = i;
            if point < acc {
                return i;
            }
        }
        last
    }
}

/// A stable point in [0, 100) for `key` (the same on every EPP, every reload, every run).
pub fn bucket(key: &str) -> f64 {
    let h = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
    (h >> 11) as f64 / (1u64 << 53) as f64 * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(split: Split, parts: &[(&str, f64, bool)]) -> ExperimentSpec {
        ExperimentSpec {
            split,
            variants: parts
                .iter()
                .map(|(n, p, s)| VariantSpec {
                    name: n.to_string(),
                    profile: "p".into(),
                    percent: *p,
                    shadow: *s,
                    sample: 0.5,
                })
                .collect(),
            response_header: false,
        }
    }

    #[test]
    fn a_fifty_fifty_split_lands_within_bounds() {
        let e = spec(Split::Percent, &[("a", 50.0, false), ("b", 50.0, false), ("s", 0.0, true)]);
        let n = 20_000;
        let a = (0..n).filter(|i| e.choose(&format!("req-{i}"), &|_| None, None) == 0).count();
        // 4 standard deviations of a fair coin over n trials.
        let sd = (n as f64 * 0.25).sqrt();
        assert!((a as f64 - n as f64 / 2.0).abs() < 4.0 * sd, "a got {a} of {n}");
        // The shadow is never chosen for routing, and sees about half the requests.
        assert!((0..n).all(|i| e.choose(&format!("r{i}"), &|_| None, None) != 2));
        let seen = (0..n).filter(|i| e.samples(2, &format!("r{i}"))).count();
        assert!((seen as f64 - n as f64 / 2.0).abs() < 4.0 * sd, "shadow saw {seen}");
    }

    #[test]
    fn sticky_keys_stay_on_one_variant_across_reloads() {
        let header = |v: &'static str| move |name: &str| (name == "x-session").then(|| v.to_string());
        let e = spec(Split::Sticky(StickyKey::Header("x-session".into())), &[("a", 30.0, false), ("b", 70.0, false)]);
        // A reload builds a new spec from the same config: the choice is a function of the key.
        let reloaded = e.clone();
        for key in ["alice", "bob", "carol", "dave"] {
            let first = e.choose("req-1", &header(key), None);
            for i in 0..50 {
                assert_eq!(reloaded.choose(&format!("req-{i}"), &header(key), None), first, "{key}");
            }
        }
        let by_user = spec(Split::Sticky(StickyKey::User), &[("a", 50.0, false), ("b", 50.0, false)]);
        let v = by_user.choose("x", &|_| None, Some("user-7"));
        assert!((0..20).all(|i| by_user.choose(&format!("r{i}"), &|_| None, Some("user-7")) == v));
    }

    #[test]
    fn header_split_names_the_variant() {
        let e = spec(Split::Header("x-variant".into()), &[("a", 100.0, false), ("b", 0.0, false)]);
        assert_eq!(e.choose("r", &|n| (n == "x-variant").then(|| "b".to_string()), None), 1);
        assert_eq!(e.choose("r", &|_| None, None), 0);
        assert_eq!(e.choose("r", &|_| Some("nope".into()), None), 0);
    }
}
