//! Builds every plugin crate under `plugins/` as a `wasm32-wasip2` component (one nested
//! cargo invocation, its own target dir so it never waits on the outer build's lock) and
//! tells the host where the `.wasm` files are (`EPP_PLUGIN_WASM_DIR`), so the default set
//! can be embedded with `include_bytes!` and tests can load the others.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "plugin";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("host/ sits in the workspace root").to_path_buf();
    for watched in ["plugins", "wit", "Cargo.lock", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let crates = plugin_crates(&root.join("plugins"));
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root.join(d) })
        .unwrap_or_else(|| root.join("target"))
        .join("plugin-wasm");

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root).args(["build", "--target", TARGET, "--profile", PROFILE, "--target-dir"]).arg(&target_dir);
    for name in &crates {
        cmd.args(["-p", name]);
    }
    // The outer build's settings (wrappers such as clippy-driver, flags, jobserver, target
    // dir) must not leak into the wasm build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let keep = key == "CARGO_HOME"
            || key.starts_with("CARGO_NET_")
            || key.starts_with("CARGO_HTTP_")
            || key.starts_with("CARGO_REGISTRIES_");
        if (key.starts_with("CARGO_") && !keep)
            || matches!(
                key.as_str(),
                "RUSTC"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "MAKEFLAGS"
                    | "MFLAGS"
            )
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("could not run cargo to build the plugins: {e}"));
    if !status.success() {
        panic!(
            "building the wasm plugins failed ({status}); if the error above says the target is \
             missing, run `rustup target add {TARGET}`"
        );
    }
    let out = target_dir.join(TARGET).join(PROFILE);
    for name in &crates {
        let file = out.join(format!("{}.wasm", name.replace('-', "_")));
        assert!(file.exists(), "expected plugin component {} after the build", file.display());
    }
    println!("cargo:rustc-env=EPP_PLUGIN_WASM_DIR={}", out.display());
}

/// Package names of the plugin crates: every `plugins/*/Cargo.toml` and
/// `plugins/{testing,examples}/*/Cargo.toml` except the SDK.
fn plugin_crates(plugins: &Path) -> Vec<String> {
    let mut dirs = Vec::new();
    for group in [plugins.to_path_buf(), plugins.join("testing"), plugins.join("examples")] {
        let Ok(entries) = fs::read_dir(&group) else {
            continue;
        };
        for entry in entries.flatten() {
            let manifest = entry.path().join("Cargo.toml");
            if manifest.exists() && entry.file_name() != "sdk" {
                dirs.push(manifest);
            }
        }
    }
    dirs.sort();
    dirs.iter()
        .map(|manifest| {
            let text = fs::read_to_string(manifest).unwrap_or_else(|e| panic!("reading {}: {e}", manifest.display()));
            text.lines()
                .find_map(|l| l.trim().strip_prefix("name = ").map(|v| v.trim_matches('"').to_string()))
                .unwrap_or_else(|| panic!("no package name in {}", manifest.display()))
        })
        .collect()
}
