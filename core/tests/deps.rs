//! Keeps the decision pure: `epp-core` must not depend, even transitively, on an async
//! runtime, an RPC stack or a wasm engine. Reads Cargo's own view of the dependency graph.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

const FORBIDDEN: &[&str] = &["tokio", "tonic", "wasmtime", "hyper", "axum", "envoy-types", "prometheus", "mio"];

#[test]
fn epp_core_depends_on_no_runtime_rpc_or_wasm_engine() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--manifest-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ])
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata is JSON");
    let packages: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    let nodes = meta["resolve"]["nodes"].as_array().expect("resolve graph");
    let deps_of = |id: &str| -> Vec<(String, bool)> {
        let Some(node) = nodes.iter().find(|n| n["id"] == id) else { return Vec::new() };
        node["deps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| {
                let pkg = d["pkg"].as_str()?.to_string();
                // Dev-dependencies (tests only) do not count; normal and build ones do.
                let normal = d["dep_kinds"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|k| k["kind"].is_null() || k["kind"] == "build"));
                Some((pkg, normal))
            })
            .collect()
    };
    let root = packages.iter().find(|(_, name)| **name == "epp-core").map(|(id, _)| id.to_string()).expect("epp-core");
    let mut seen = BTreeSet::new();
    let mut stack = vec![(root, vec!["epp-core".to_string()])];
    while let Some((id, path)) = stack.pop() {
        for (dep, normal) in deps_of(&id) {
            if !normal || !seen.insert(dep.clone()) {
                continue;
            }
            let name = packages.get(dep.as_str()).copied().unwrap_or("?");
            let mut p = path.clone();
            p.push(name.to_string());
            assert!(!FORBIDDEN.contains(&name), "epp-core must stay pure, but depends on {}", p.join(" → "));
            stack.push((dep, p));
        }
    }
    assert!(seen.len() > 1, "the dependency graph was read (saw {} crates)", seen.len());
}
