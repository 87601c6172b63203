//! Shared fixtures: one wasm runtime for the whole binary, loaders for embedded and
//! test-only components, native plugin twins, and builders for requests, candidates and
//! the columns a plugin reads.

use std::sync::{Arc, OnceLock};

use epp::wasm::{Sandbox, WasmRuntime, embedded};
use epp_core::native::NativePlugin;
use epp_core::{
    CallInput, Candidates, EndpointInfo, Manifest, PickerPlugin, PluginHandle, ProducerPlugin, Request, ScorerPlugin,
};
use llmd_plugin_sdk::columns::BUILT_IN;

/// A fresh folder under the system's temp dir, removed when dropped — unless the test is
/// failing (panicking), so what it wrote can be looked at.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// `epp-<suite>-<pid>-<name>`, emptied if it exists.
    pub fn new(suite: &str, name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("epp-{suite}-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn runtime() -> &'static WasmRuntime {
    static RT: OnceLock<WasmRuntime> = OnceLock::new();
    RT.get_or_init(|| WasmRuntime::new().expect("wasm runtime"))
}

/// Loads the embedded component of built-in plugin `type_name`.
pub fn wasm(type_name: &str, params: &str) -> PluginHandle {
    let bytes = embedded::find(type_name).unwrap_or_else(|| panic!("{type_name} is not embedded"));
    runtime().load(type_name, bytes, params, Sandbox::default(), Default::default()).expect("load embedded plugin")
}

/// Reads a component built by build.rs that is not embedded (e.g. test plugins).
pub fn wasm_file_bytes(file_stem: &str) -> Vec<u8> {
    let path = std::path::Path::new(embedded::PLUGIN_WASM_DIR).join(format!("{file_stem}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub fn wasm_scorer(type_name: &str, params: &str) -> Arc<dyn ScorerPlugin> {
    match wasm(type_name, params) {
        PluginHandle::Scorer(s) => s,
        other => panic!("{type_name} is {other:?}, not a scorer"),
    }
}

pub fn wasm_picker(type_name: &str, params: &str) -> Arc<dyn PickerPlugin> {
    match wasm(type_name, params) {
        PluginHandle::Picker(p) => p,
        other => panic!("{type_name} is {other:?}, not a picker"),
    }
}

pub fn wasm_producer(type_name: &str, params: &str) -> Arc<dyn ProducerPlugin> {
    match wasm(type_name, params) {
        PluginHandle::Producer(p) => p,
        other => panic!("{type_name} is {other:?}, not a producer"),
    }
}

pub fn native<T: llmd_plugin_sdk::Plugin>(name: &str, params: &str) -> Arc<NativePlugin<T>> {
    Arc::new(NativePlugin::<T>::new(name, params).expect("configure native plugin"))
}

/// Candidates from rows (id, waiting, running, kv_usage), scraped 10 ms ago.
pub fn metrics(rows: &[(u32, f32, f32, f32)]) -> Candidates {
    Candidates {
        ids: rows.iter().map(|r| r.0).collect(),
        waiting: rows.iter().map(|r| r.1).collect(),
        running: rows.iter().map(|r| r.2).collect(),
        kv_usage: rows.iter().map(|r| r.3).collect(),
        age_ms: rows.iter().map(|_| 10.0).collect(),
        attributes: Vec::new(),
        own_in_flight: Vec::new(),
    }
}

/// `n` idle endpoints with ids 0..n.
pub fn idle(n: u32) -> Candidates {
    Candidates::idle(n)
}

pub fn request(id: &str, prompt: &str) -> Request {
    Request {
        id: id.into(),
        model: "m".into(),
        prompt: prompt.into(),
        prompt_tokens: Request::estimate_tokens(prompt.len()),
        random_seed: 7,
        stream: true,
        ..Default::default()
    }
}

pub fn endpoint(id: u32) -> EndpointInfo {
    EndpointInfo {
        id,
        name: format!("ep-{id}"),
        namespace: "default".into(),
        address: "127.0.0.1".into(),
        port: 8000 + id as u16,
        ..Default::default()
    }
}

pub fn pool(n: u32) -> Vec<EndpointInfo> {
    (0..n).map(endpoint).collect()
}

/// A prompt of `blocks` 256-byte blocks (64 tokens × 4 bytes, the index's smallest block),
/// block i filled with `tag` and i.
pub fn blocks_prompt(tag: char, blocks: usize) -> String {
    (0..blocks).map(|i| format!("{tag}{i:0>255}")).collect()
}

/// The columns a plugin with `manifest` reads, in its order: built-in ones from
/// `candidates`, others from `named` (NaN when not given).
pub fn columns_for(manifest: &Manifest, candidates: &Candidates, named: &[(&str, &[f32])]) -> Vec<f32> {
    let n = candidates.len();
    let mut out = Vec::new();
    for column in &manifest.reads {
        let builtin = match BUILT_IN.iter().position(|b| b == column) {
            Some(0) => Some(&candidates.waiting),
            Some(1) => Some(&candidates.running),
            Some(2) => Some(&candidates.kv_usage),
            Some(_) => Some(&candidates.age_ms),
            None => None,
        };
        match (builtin, named.iter().find(|(name, _)| name == column)) {
            (Some(values), _) => out.extend_from_slice(values),
            (None, Some((_, values))) => out.extend_from_slice(values),
            (None, None) => out.extend(std::iter::repeat_n(f32::NAN, n)),
        }
    }
    out
}

/// A call's input over `candidates` with the gathered `columns`.
pub fn input<'a>(cycle: u64, req: &'a Request, candidates: &'a Candidates, columns: &'a [f32]) -> CallInput<'a> {
    CallInput { cycle, request: req, ids: &candidates.ids, columns }
}

/// The start of a config: its header and a watched file discovery of `endpoints`; the
/// plugins that follow are appended by the caller.
pub fn config_head(endpoints: &str) -> String {
    format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- name: file-discovery
  type: file-discovery
  parameters: {{path: {endpoints}, watchFile: true}}
"
    )
}
