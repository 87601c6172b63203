//! The operator toolkit behind `epp plugin …`: scaffold a plugin crate, check a component
//! exactly as a reload would (WIT version, role, configure, probe), and benchmark its calls.
//!
//! The scaffold is self-contained: the binary carries the plugin SDK and the WIT contract
//! and writes them beside the new crate, so a plugin builds from an empty folder with only
//! the `epp` binary and a Rust toolchain (crates come from crates.io).
//!
//! Each command writes a human-readable report to the given writer and returns whether the
//! plugin passed; `main` turns that into the exit status. No server is started.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use epp_core::{FailurePolicy, Role};

use crate::probe;
use crate::wasm::{Sandbox, WasmRuntime};

/// `epp plugin check`: loads, configures and probes `file`; true when it may be deployed.
pub fn check(out: &mut dyn Write, file: &Path, params_json: &str, sandbox: Sandbox) -> std::io::Result<bool> {
    writeln!(out, "checking {}", file.display())?;
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => return verdict(out, Err(format!("cannot read the file: {e}"))),
    };
    writeln!(out, "  size:       {} bytes", bytes.len())?;
    let runtime = match WasmRuntime::new() {
        Ok(r) => r,
        Err(e) => return verdict(out, Err(e.to_string())),
    };
    let started = Instant::now();
    let role = match runtime.compile(&bytes) {
        Ok((_, role)) => role,
        Err(e) => return verdict(out, Err(e.to_string())),
    };
    writeln!(out, "  contract:   {} (compiled in {})", crate::wasm::WIT_PACKAGE, ms(started.elapsed()))?;
    writeln!(out, "  role:       {role}")?;
    let started = Instant::now();
    let plugin = match runtime.load("checked", &bytes, params_json, sandbox, FailurePolicy::FailClosed) {
        Ok(p) => p,
        Err(e) => return verdict(out, Err(e.to_string())),
    };
    writeln!(out, "  configure:  ok with {params_json} ({})", ms(started.elapsed()))?;
    match probe::probe(&plugin) {
        Ok(calls) => {
            let slowest = calls.iter().max_by_key(|c| c.elapsed);
            writeln!(
                out,
                "  probe:      {} calls ok (0, 1 and 64 endpoints; fresh, unknown and stale metrics)",
                calls.len()
            )?;
            if let Some(c) = slowest {
                writeln!(out, "  slowest:    {} in {}", c.case, ms(c.elapsed))?;
            }
            verdict(out, Ok(()))
        }
        Err(e) => verdict(out, Err(e.to_string())),
    }
}

fn verdict(out: &mut dyn Write, result: Result<(), String>) -> std::io::Result<bool> {
    match result {
        Ok(()) => {
            writeln!(out, "verdict: OK — the plugin can be used in a config")?;
            Ok(true)
        }
        Err(reason) => {
            writeln!(out, "verdict: REJECTED — {reason}")?;
            Ok(false)
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// `epp plugin bench`: per-call latency of the plugin's role at 8, 100 and 512 endpoints.
pub fn bench(out: &mut dyn Write, file: &Path, params_json: &str, sandbox: Sandbox) -> std::io::Result<bool> {
    let loaded = std::fs::read(file).map_err(|e| e.to_string()).and_then(|bytes| {
        let runtime = WasmRuntime::new().map_err(|e| e.to_string())?;
        runtime.load("bench", &bytes, params_json, sandbox, FailurePolicy::FailClosed).map_err(|e| e.to_string())
    });
    let plugin = match loaded {
        Ok(p) => p,
        Err(reason) => {
            writeln!(out, "cannot load {}: {reason}", file.display())?;
            return Ok(false);
        }
    };
    writeln!(out, "{} ({}), 16 KB prompts, fresh metrics", file.display(), plugin.role())?;
    writeln!(out, "{:>9} {:>8} {:>10} {:>10} {:>10}", "endpoints", "calls", "p50 µs", "p99 µs", "mean µs")?;
    for n in [8u32, 100, 512] {
        let pool = probe::synthetic_pool(n);
        if let Err(e) = plugin.core().pool_changed(1, &pool) {
            writeln!(out, "pool-changed failed at {n} endpoints: {e}")?;
            return Ok(false);
        }
        let candidates = probe::synthetic_metrics(&pool, "fresh");
        let calls = match n {
            8 => 2_000,
            100 => 1_000,
            _ => 300,
        };
        let mut samples = Vec::with_capacity(calls);
        for i in 0..calls {
            let req = probe::synthetic_request(i, 16 << 10);
            let started = Instant::now();
            if let Err(reason) = probe::check_call(&plugin, i as u64, &req, &candidates, false) {
                writeln!(out, "call failed at {n} endpoints: {reason}")?;
                return Ok(false);
            }
            samples.push(started.elapsed());
        }
        samples.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let p = |q: f64| us(samples[((samples.len() - 1) as f64 * q) as usize]);
        let mean = samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64;
        writeln!(out, "{n:>9} {calls:>8} {:>10.1} {:>10.1} {mean:>10.1}", p(0.5), p(0.99))?;
    }
    Ok(true)
}

/// The SDK's sources, as this binary was built with them: written beside a new plugin.
const SDK_FILES: &[(&str, &str)] = &[
    ("build.rs", include_str!("../../plugins/sdk/build.rs")),
    ("src/lib.rs", include_str!("../../plugins/sdk/src/lib.rs")),
    ("src/types.rs", include_str!("../../plugins/sdk/src/types.rs")),
    ("src/columns.rs", include_str!("../../plugins/sdk/src/columns.rs")),
    ("src/params.rs", include_str!("../../plugins/sdk/src/params.rs")),
    ("src/pending.rs", include_str!("../../plugins/sdk/src/pending.rs")),
    ("src/rng.rs", include_str!("../../plugins/sdk/src/rng.rs")),
    ("src/score.rs", include_str!("../../plugins/sdk/src/score.rs")),
    ("wit/scheduler.wit", include_str!("../../wit/scheduler.wit")),
];

/// The vendored SDK's manifest: the workspace's versions, spelled out.
const SDK_MANIFEST: &str = r#"[package]
name = "llmd-plugin-sdk"
description = "Types, traits and export macros for writing llm-d endpoint-picker plugins as WebAssembly components"
version = "0.3.0"
edition = "2024"
license = "Apache-2.0"
publish = false

[dependencies]
serde = { version = "1", features = ["derive"] }
serde_json = "1"

[target.'cfg(target_family = "wasm")'.dependencies]
wit-bindgen = { version = "0.61", default-features = false, features = ["macros", "realloc"] }
"#;

/// Where the SDK a new plugin depends on comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum SdkSource {
    /// Write the SDK this binary carries beside the plugin (`<dir>/llmd-plugin-sdk`).
    Vendored,
    /// Depend on an SDK checkout at this path.
    Path(PathBuf),
}

/// `epp plugin new`: writes a plugin crate for `role` at `dir`, with the SDK from `sdk`.
/// Refuses to overwrite an existing folder. Returns the files written.
pub fn scaffold(name: &str, role: Role, dir: &Path, sdk: &SdkSource) -> Result<Vec<PathBuf>, String> {
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && !name.contains("--");
    if !valid || name == "llmd-plugin-sdk" {
        return Err(format!(
            "`{name}` is not a valid plugin name: start with a lower-case letter, then lower-case letters, digits \
             and single dashes"
        ));
    }
    // The name is also the crate's and (in CamelCase) its type's: no Rust keyword.
    const KEYWORDS: &[&str] = &[
        "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern", "false", "fn",
        "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return", "self",
        "static", "struct", "super", "trait", "true", "type", "unsafe", "use", "where", "while", "gen", "yield",
    ];
    if KEYWORDS.contains(&name) {
        return Err(format!("`{name}` is a Rust keyword; choose another plugin name"));
    }
    if dir.exists() {
        return Err(format!("{} already exists; choose another --dir", dir.display()));
    }
    let mut files = Vec::new();
    let sdk_dep = match sdk {
        SdkSource::Path(path) => {
            let sdk = std::fs::canonicalize(path).map_err(|e| format!("SDK not found at {}: {e}", path.display()))?;
            format!("{{ path = {:?} }}", sdk.display().to_string())
        }
        SdkSource::Vendored => {
            let sdk_dir = dir.join("llmd-plugin-sdk");
            let manifest = [("Cargo.toml", SDK_MANIFEST)];
            for (rel, text) in manifest.iter().chain(SDK_FILES) {
                files.push(write(&sdk_dir.join(rel), text)?);
            }
            r#"{ path = "llmd-plugin-sdk" }"#.to_string()
        }
    };
    let ty: String = name
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect();
    let cargo = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
llmd-plugin-sdk = {sdk_dep}
serde = {{ version = "1", features = ["derive"] }}

# A plugin builds on its own, outside any other workspace.
[workspace]

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
panic = "abort"
strip = "debuginfo"
"#
    );
    let (trait_name, manifest, body) = match role {
        Role::Scorer => (
            "Scorer",
            "// It reads the waiting-queue column, nothing else, and keeps no state.\n        Ok(Manifest::stateless(&[columns::WAITING]))",
            format!(
                r#"impl Scorer for {ty} {{
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {{
        // One score per candidate, in [0, 1]; NaN means "unknown".
        cycle.column(0).iter().map(|w| if w.is_finite() {{ 1.0 / (1.0 + self.params.weight * w) }} else {{ 0.0 }}).collect()
    }}
}}

llmd_plugin_sdk::export_scorer!({ty});"#
            ),
        ),
        Role::Filter => (
            "Filter",
            "// It reads the waiting-queue column, nothing else, and keeps no state.\n        Ok(Manifest::stateless(&[columns::WAITING]))",
            format!(
                r#"impl Filter for {ty} {{
    fn filter(&mut self, cycle: &Cycle) -> Vec<u32> {{
        // Keep the candidates whose queue is known and short.
        let waiting = cycle.column(0);
        (0..cycle.len()).filter(|&i| waiting[i] <= 10.0 * self.params.weight).map(|i| cycle.ids[i]).collect()
    }}
}}

llmd_plugin_sdk::export_filter!({ty});"#
            ),
        ),
        Role::Picker => (
            "Picker",
            "// It reads only the scores.\n        Ok(Manifest::stateless(&[]))",
            format!(
                r#"impl Picker for {ty} {{
    fn pick(&mut self, cycle: &Cycle, scores: &[f32]) -> Vec<u32> {{
        // The highest total score wins; ties go to the first.
        let best = (0..cycle.len()).max_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        best.map(|i| vec![cycle.ids[i]]).unwrap_or_default()
    }}
}}

llmd_plugin_sdk::export_picker!({ty});"#
            ),
        ),
        Role::Producer => (
            "Producer",
            "// It reads the running-batch column and writes one column of its own.\n        Ok(Manifest::stateless(&[columns::RUNNING]).writing(&[LOAD]))",
            format!(
                r#"/// The column this producer writes; other plugins read it by this name.
pub const LOAD: &str = "{name}/load";

impl Producer for {ty} {{
    fn produce(&mut self, cycle: &Cycle) -> Vec<f32> {{
        // One value per candidate for each written column, one column after the other.
        cycle.column(0).iter().map(|r| r * self.params.weight).collect()
    }}
}}

llmd_plugin_sdk::export_producer!({ty});"#
            ),
        ),
    };
    let lib = format!(
        r#"//! `{name}`: a {role} plugin for the endpoint picker. Describe here what it prefers and why.

use llmd_plugin_sdk::{{Cycle, Manifest, Plugin, {trait_name}, columns, params}};
use serde::Deserialize;

/// Parameters from the config entry's `parameters`.
#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {{
    pub weight: f32,
}}

impl Default for Params {{
    fn default() -> Self {{
        Params {{ weight: 1.0 }}
    }}
}}

#[derive(Default)]
pub struct {ty} {{
    params: Params,
}}

impl Plugin for {ty} {{
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {{
        self.params = params::parse(params_json)?;
        if !(self.params.weight.is_finite() && self.params.weight >= 0.0) {{
            return Err("weight must be a finite number >= 0".into());
        }}
        {manifest}
    }}
}}

{body}
"#
    );
    files.push(write(&dir.join("Cargo.toml"), &cargo)?);
    files.push(write(&dir.join("src/lib.rs"), &lib)?);
    Ok(files)
}

fn write(path: &Path, text: &str) -> Result<PathBuf, String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path.to_path_buf())
}

/// Environment variable naming an SDK checkout to depend on instead of the vendored copy.
pub const SDK_ENV: &str = "LLMD_PLUGIN_SDK";

/// The SDK a new plugin uses: `explicit` (`--sdk`), `$LLMD_PLUGIN_SDK`, else the copy this
/// binary carries.
pub fn sdk_source(explicit: Option<PathBuf>) -> SdkSource {
    match explicit.or_else(|| std::env::var_os(SDK_ENV).map(PathBuf::from)) {
        Some(path) => SdkSource::Path(path),
        None => SdkSource::Vendored,
    }
}

/// The role named on the command line.
pub fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "producer" => Ok(Role::Producer),
        "filter" => Ok(Role::Filter),
        "scorer" => Ok(Role::Scorer),
        "picker" => Ok(Role::Picker),
        other => Err(format!("unknown role `{other}`: use producer, filter, scorer or picker")),
    }
}
