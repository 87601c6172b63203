//! The operator toolkit (`epp plugin …`), run as a user would: the binary, real files.
//! Includes the walkthrough of docs/plugins.md, command for command.

use std::path::{Path, PathBuf};
use std::process::Command;

use epp::wasm::LoadError;

use crate::common::{TempDir, runtime, wasm_file_bytes};
use crate::stack::workspace_root;

fn temp_dir(name: &str) -> TempDir {
    TempDir::new("toolkit", name)
}

/// A copy of a component whose contract version reads `version` instead of 0.3.0 (same
/// length, so the binary stays well-formed).
fn other_wit_version(bytes: &[u8], version: &str) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for iface in ["plugin", "hooks", "types", "scorer"] {
        let from = format!("llmd:scheduler/{iface}@0.3.0").into_bytes();
        let to = format!("llmd:scheduler/{iface}@{version}").into_bytes();
        let mut i = 0;
        while let Some(pos) = out[i..].windows(from.len()).position(|w| w == from.as_slice()) {
            out[i + pos..i + pos + to.len()].copy_from_slice(&to);
            i += pos + to.len();
        }
    }
    out
}

fn check(file: &Path, params: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["plugin", "check"])
        .arg(file)
        .args(["--parameters", params])
        .output()
        .expect("run epp plugin check");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names that would make a crate Cargo refuses, or a type that is a keyword, are refused
/// before anything is written.
#[test]
fn plugin_names_that_cannot_make_a_crate_are_refused() {
    let dir = temp_dir("names");
    for bad in ["8b-filter", "self", "fn", "-x", "x-", "a--b", "Upper", "under_score", ""] {
        let target = dir.join(format!("p{}", bad.len()));
        let e = epp::toolkit::scaffold(bad, epp_core::Role::Scorer, &target, &epp::toolkit::SdkSource::Vendored)
            .expect_err(bad);
        assert!(e.contains(&format!("`{bad}`")), "{e}");
        assert!(!target.exists(), "{bad}: files written");
    }
    let ok = dir.join("ok");
    epp::toolkit::scaffold("b8-filter", epp_core::Role::Filter, &ok, &epp::toolkit::SdkSource::Vendored)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ok.join("Cargo.toml").exists());
}

#[test]
fn a_component_for_another_wit_version_is_refused_naming_both() {
    // 0.2.0 is the previous contract, 0.1.0 the one before; 0.9.0 one from the future.
    for version in ["0.2.0", "0.1.0", "0.9.0"] {
        let patched = other_wit_version(&wasm_file_bytes("queue_scorer"), version);
        let err = runtime().load("old", &patched, "{}", Default::default(), Default::default()).expect_err("refused");
        assert!(matches!(err, LoadError::WitVersion { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&format!("llmd:scheduler@{version}")) && text.contains("llmd:scheduler@0.3.0"), "{text}");
    }
}

#[test]
fn plugin_check_gives_a_verdict_for_every_kind_of_plugin() {
    let dir = temp_dir("check");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let bad = write("bad.wasm", &wasm_file_bytes("misbehaving_scorer"));
    let good = write("good.wasm", &wasm_file_bytes("label_affinity_scorer"));
    let cases: Vec<(PathBuf, &str, Option<&str>)> = vec![
        (good.clone(), r#"{"label":"gpu","scores":{"H100":1}}"#, None),
        (write("junk.wasm", b"definitely not wasm"), "{}", Some("not a valid WebAssembly component")),
        (write("core.wasm", b"\0asm\x01\0\0\0"), "{}", Some("not a valid WebAssembly component")),
        (
            write("old.wasm", &other_wit_version(&wasm_file_bytes("queue_scorer"), "0.2.0")),
            "{}",
            Some("llmd:scheduler@0.2.0"),
        ),
        (dir.join("missing.wasm"), "{}", Some("cannot read the file")),
        (bad.clone(), r#"{"mode":"trap"}"#, Some("plugin trapped")),
        (bad.clone(), r#"{"mode":"loop"}"#, Some("time limit")),
        (bad.clone(), r#"{"mode":"nan"}"#, Some("scores must be finite")),
        (bad.clone(), r#"{"mode":"short"}"#, Some("scores for")),
        (bad.clone(), r#"{"mode":"reject"}"#, Some("refuses every configuration")),
        (good, r#"{"scores":{}}"#, Some("parameter `label` is required")),
    ];
    for (file, params, reason) in cases {
        let (ok, out) = check(&file, params);
        match reason {
            None => assert!(ok && out.contains("verdict: OK"), "{}: {out}", file.display()),
            Some(r) => {
                assert!(!ok, "{} {params} passed: {out}", file.display());
                assert!(out.contains("verdict: REJECTED") && out.contains(r), "{} {params}: {out}", file.display());
            }
        }
    }
}

#[test]
fn the_docs_walkthrough_runs_as_written() {
    let doc = std::fs::read_to_string(workspace_root().join("docs/plugins.md")).unwrap();
    let block = doc.split("<!-- walkthrough").nth(1).and_then(|rest| rest.split("```sh").nth(1)).unwrap();
    let commands: Vec<&str> = block.split("```").next().unwrap().lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(commands.len(), 4, "{commands:?}");
    let dir = temp_dir("walkthrough");
    let epp_dir = Path::new(env!("CARGO_BIN_EXE_epp")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", epp_dir.display(), std::env::var("PATH").unwrap_or_default());
    for (i, command) in commands.iter().enumerate() {
        if command.starts_with("cargo build") {
            // Share compiled dependencies between runs: the crate's target dir is a link.
            let shared = workspace_root().join("target/walkthrough");
            std::fs::create_dir_all(&shared).unwrap();
            let _ = std::os::unix::fs::symlink(&shared, dir.join("prefer-short-queues/target"));
        }
        let out = Command::new("bash")
            .args(["-c", command])
            .current_dir(&dir)
            .env("PATH", &path)
            // As a new user would: no SDK checkout to point at, only the binary.
            .env_remove("LLMD_PLUGIN_SDK")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "step {i} `{command}` failed:\n{text}");
        if command.contains("plugin check") {
            assert!(text.contains("verdict: OK"), "{text}");
        }
        if command.contains("plugin bench") {
            assert!(text.contains("512"), "{text}");
        }
    }
    // And the scaffolded plugin loads from a config like the one in the docs.
    let config = format!(
        "apiVersion: llm-d.ai/v1\nplugins:\n- name: short-queues\n  type: prefer-short-queues\n  wasm: {}\n  parameters: {{weight: 0.5}}\n- type: max-score-picker\nschedulingProfiles:\n- name: default\n  plugins:\n  - {{pluginRef: short-queues, weight: 2}}\n  - {{pluginRef: max-score-picker}}\n",
        dir.join("prefer-short-queues/target/wasm32-wasip2/release/prefer_short_queues.wasm").display()
    );
    let config = epp::config::PickerConfig::parse(&config, None).unwrap();
    let built = epp::loader::build(runtime(), &config, &Default::default()).expect("the scaffolded plugin builds");
    let candidates = crate::common::metrics(&[(0, 9.0, 0.0, 0.0), (1, 0.0, 0.0, 0.0)]);
    let d = built.scheduler.decide(1, &crate::common::request("r", "x"), candidates).unwrap();
    assert_eq!(d.result.targets, vec![1], "the scaffolded scorer prefers the shorter queue");
}
