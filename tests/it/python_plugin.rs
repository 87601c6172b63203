//! A second guest language: the label-affinity scorer written in Python, built with
//! componentize-py from the same WIT, must load through the same runtime, pass the probe,
//! and score exactly like the Rust plugin.

use std::process::Command;

use epp_core::{PluginCore, PluginHandle, ScorerPlugin};
use label_affinity_scorer::LabelAffinityScorer;
use llmd_plugin_sdk::EndpointInfo;

use crate::common::{columns_for, endpoint, idle, input, native, request, runtime};
use crate::stack::workspace_root;

fn componentize_py() -> std::path::PathBuf {
    let venv = workspace_root().join(".venv/bin/componentize-py");
    if venv.exists() {
        return venv;
    }
    panic!("componentize-py not found: run the tests with scripts/test.sh (it installs it into .venv)")
}

#[test]
fn the_python_scorer_agrees_with_the_rust_one() {
    let out_dir = std::env::temp_dir().join(format!("epp-py-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let wasm = out_dir.join("label_affinity_scorer_py.wasm");
    let root = workspace_root();
    let built = Command::new(componentize_py())
        .arg("-d")
        .arg(root.join("wit"))
        .args(["-w", "scorer-plugin", "componentize", "app", "-p"])
        .arg(root.join("plugins/examples/label-affinity-scorer-py"))
        .arg("-o")
        .arg(&wasm)
        .output()
        .expect("run componentize-py");
    assert!(built.status.success(), "componentize-py failed: {}", String::from_utf8_lossy(&built.stderr));

    let params = r#"{"label": "gpu", "scores": {"H100": 1.0, "A100": 0.5}, "default": 0.25}"#;
    let bytes = std::fs::read(&wasm).unwrap();
    let handle = runtime().load("py", &bytes, params, Default::default(), Default::default()).expect("loads");
    epp::probe::probe(&handle).expect("passes the probe");
    let PluginHandle::Scorer(py) = handle else { panic!("not a scorer") };
    let rust = native::<LabelAffinityScorer>("rust", params);

    let labelled = |id: u32, gpu: Option<&str>| EndpointInfo {
        labels: gpu.map(|g| vec![("gpu".to_string(), g.to_string())]).unwrap_or_default(),
        ..endpoint(id)
    };
    let pool = vec![labelled(0, Some("H100")), labelled(1, Some("A100")), labelled(2, Some("T4")), labelled(3, None)];
    for p in [py.as_ref(), rust.as_ref() as &dyn ScorerPlugin] {
        p.pool_changed(1, &pool).unwrap();
    }
    let req = request("r", "x");
    let candidates = idle(4);
    let score = |s: &dyn ScorerPlugin| {
        let cols = columns_for(s.manifest(), &candidates, &[]);
        s.score(&input(1, &req, &candidates, &cols)).unwrap()
    };
    assert_eq!(py.manifest(), rust.manifest(), "both declare the same needs");
    let a = score(py.as_ref());
    let b = score(rust.as_ref());
    assert_eq!(a, vec![1.0, 0.5, 0.25, 0.25]);
    assert_eq!(a, b);
    // Bad parameters are refused with the plugin's own message.
    let err =
        runtime().load("py", &bytes, r#"{"scores": {}}"#, Default::default(), Default::default()).expect_err("refused");
    assert!(err.to_string().contains("parameter `label` is required"), "{err}");
    let _ = std::fs::remove_dir_all(&out_dir);
}
