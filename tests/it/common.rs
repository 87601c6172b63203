//! Shared fixtures: one wasm runtime for the whole binary, loaders for embedded and
//! test-only components, native plugin twins, and builders for requests and metrics.

use std::sync::{Arc, OnceLock};

use epp::scheduler::native::NativePlugin;
use epp::scheduler::{PickerPlugin, PluginHandle, ProducerPlugin, ScorerPlugin};
use epp::wasm::{Sandbox, WasmRuntime, embedded};
use llmd_plugin_sdk::{EndpointInfo, Metrics, Request};

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

/// Metrics rows: (id, waiting, running, kv_usage, age_ms).
pub fn metrics(rows: &[(u32, f32, f32, f32)]) -> Metrics {
    Metrics {
        ids: rows.iter().map(|r| r.0).collect(),
        waiting: rows.iter().map(|r| r.1).collect(),
        running: rows.iter().map(|r| r.2).collect(),
        kv_usage: rows.iter().map(|r| r.3).collect(),
        age_ms: rows.iter().map(|_| 10).collect(),
    }
}

/// `n` idle endpoints with ids 0..n.
pub fn idle(n: u32) -> Metrics {
    metrics(&(0..n).map(|i| (i, 0.0, 0.0, 0.0)).collect::<Vec<_>>())
}

pub fn request(id: &str, prompt: &str) -> Request {
    Request {
        id: id.into(),
        model: "m".into(),
        prompt: prompt.as_bytes().to_vec(),
        random_seed: 7,
        ..Default::default()
    }
}

pub fn endpoint(id: u32) -> EndpointInfo {
    EndpointInfo {
        id,
        name: format!("ep-{id}"),
        address: "127.0.0.1".into(),
        port: 8000 + id as u16,
        ..Default::default()
    }
}

pub fn pool(n: u32) -> Vec<EndpointInfo> {
    (0..n).map(endpoint).collect()
}

/// A prompt of `blocks` 64-byte blocks (16 tokens × 4 bytes), block i filled with `tag`+i.
pub fn blocks_prompt(tag: char, blocks: usize) -> String {
    (0..blocks).map(|i| format!("{tag}{i:0>63}")).collect()
}
