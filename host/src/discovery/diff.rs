//! What changed between two endpoint sets, by endpoint key.
//!
//! Pure: it compares two slices and names the keys added, removed and changed (moved to
//! another address or port, or relabelled). Order in the file carries no meaning, so two
//! sets holding the same endpoints in another order are equal here. It decides nothing.

use std::collections::BTreeMap;
use std::fmt;

use super::EndpointSpec;

/// Keys (`namespace/name`) that differ between two sets, each list sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Present in both, with another address, port, metrics port or labels.
    pub changed: Vec<String>,
}

impl EndpointDiff {
    /// True when both sets hold the same endpoints.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl fmt::Display for EndpointDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no change");
        }
        let parts = [("added", &self.added), ("removed", &self.removed), ("changed", &self.changed)];
        let mut first = true;
        for (label, keys) in parts.into_iter().filter(|(_, keys)| !keys.is_empty()) {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{label} {}", keys.join(", "))?;
        }
        Ok(())
    }
}

/// Compares `old` and `new` by key. Keys are unique within a parsed file; were one
/// repeated, the last entry for it is the one compared.
pub fn diff(old: &[EndpointSpec], new: &[EndpointSpec]) -> EndpointDiff {
    let by_key = |set: &[EndpointSpec]| set.iter().map(|e| (e.key(), e.clone())).collect::<BTreeMap<_, _>>();
    let (old, new) = (by_key(old), by_key(new));
    let mut d = EndpointDiff::default();
    for (key, spec) in &new {
        match old.get(key) {
            None => d.added.push(key.clone()),
            Some(before) if before != spec => d.changed.push(key.clone()),
            Some(_) => {}
        }
    }
    d.removed = old.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, addr: &str, port: u16, labels: &[(&str, &str)]) -> EndpointSpec {
        EndpointSpec {
            name: name.into(),
            namespace: "default".into(),
            address: addr.parse().unwrap(),
            port,
            metrics_port: None,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn diff_table() {
        let a = ep("a", "10.0.0.1", 80, &[]);
        let b = ep("b", "10.0.0.2", 80, &[]);
        let a_moved = ep("a", "10.0.0.9", 80, &[]);
        let a_port = ep("a", "10.0.0.1", 81, &[]);
        let a_relabelled = ep("a", "10.0.0.1", 80, &[("model", "m")]);
        let mut a_metrics = a.clone();
        a_metrics.metrics_port = Some(9000);
        // (case, old, new, added, removed, changed, display)
        type Keys = &'static [&'static str];
        type Case = (&'static str, Vec<EndpointSpec>, Vec<EndpointSpec>, Keys, Keys, Keys, &'static str);
        let cases: Vec<Case> = vec![
            ("same", vec![a.clone(), b.clone()], vec![a.clone(), b.clone()], &[], &[], &[], "no change"),
            ("reordered", vec![a.clone(), b.clone()], vec![b.clone(), a.clone()], &[], &[], &[], "no change"),
            ("add", vec![a.clone()], vec![a.clone(), b.clone()], &["default/b"], &[], &[], "added default/b"),
            ("remove", vec![a.clone(), b.clone()], vec![b.clone()], &[], &["default/a"], &[], "removed default/a"),
            ("moved", vec![a.clone()], vec![a_moved], &[], &[], &["default/a"], "changed default/a"),
            ("port", vec![a.clone()], vec![a_port], &[], &[], &["default/a"], "changed default/a"),
            ("metrics port", vec![a.clone()], vec![a_metrics], &[], &[], &["default/a"], "changed default/a"),
            (
                "all three",
                vec![a.clone()],
                vec![a_relabelled, b.clone()],
                &["default/b"],
                &[],
                &["default/a"],
                "added default/b; changed default/a",
            ),
            (
                "to empty",
                vec![a.clone(), b.clone()],
                vec![],
                &[],
                &["default/a", "default/b"],
                &[],
                "removed default/a, default/b",
            ),
        ];
        for (case, old, new, added, removed, changed, display) in cases {
            let d = diff(&old, &new);
            assert_eq!(d.added, added, "{case}: added");
            assert_eq!(d.removed, removed, "{case}: removed");
            assert_eq!(d.changed, changed, "{case}: changed");
            assert_eq!(d.to_string(), display, "{case}");
            assert_eq!(d.is_empty(), display == "no change", "{case}");
        }
    }
}
