//! Runs a natively compiled plugin crate behind the scheduler's traits. The same plugin
//! crates are built as wasm components; this adapter lets tests and benchmarks compare the
//! two builds call for call. Like the component adapter it hands a plugin only what its
//! manifest asks for, and calls are serialised per instance.

use std::sync::Mutex;

use llmd_plugin_sdk::{Completion, Cycle, EndpointInfo, Manifest};

use crate::plugin::{CallInput, FilterPlugin, PickerPlugin, PluginCore, PluginError, ProducerPlugin, ScorerPlugin};

pub struct NativePlugin<T> {
    name: String,
    manifest: Manifest,
    inner: Mutex<T>,
}

impl<T: llmd_plugin_sdk::Plugin> NativePlugin<T> {
    /// Creates the plugin and configures it, as loading a component would.
    pub fn new(name: impl Into<String>, params_json: &str) -> Result<Self, PluginError> {
        let mut inner = T::default();
        let manifest = inner.configure(params_json).map_err(PluginError::Configure)?;
        Ok(NativePlugin { name: name.into(), manifest, inner: Mutex::new(inner) })
    }

    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, PluginError> {
        let mut guard = self.inner.lock().map_err(|_| PluginError::Trap("native plugin panicked earlier".into()))?;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut guard)))
            .map_err(|_| PluginError::Trap("native plugin panicked".into()))
    }

    /// The SDK's view of a call: what the manifest asks for, copied (as a component call
    /// copies it into the guest).
    fn cycle(&self, input: &CallInput<'_>) -> Cycle {
        sdk_cycle(&self.manifest, input)
    }
}

/// The SDK `Cycle` a plugin with `manifest` receives for `input`.
pub fn sdk_cycle(manifest: &Manifest, input: &CallInput<'_>) -> Cycle {
    let needs = manifest.needs;
    let r = input.request;
    Cycle {
        id: input.cycle,
        now_ms: r.now_ms,
        request: llmd_plugin_sdk::Request {
            model: needs.model.then(|| r.model.clone()),
            cache_salt: if needs.model { r.cache_salt.clone() } else { None },
            prompt: needs.prompt.then(|| r.prompt.as_bytes().to_vec()),
            headers: needs.headers.then(|| r.headers.clone()),
            prompt_tokens: r.prompt_tokens,
            max_tokens: r.max_tokens,
            stream: r.stream,
            priority: r.priority,
            random_seed: r.random_seed,
        },
        ids: input.ids.to_vec(),
        columns: input.columns.to_vec(),
    }
}

impl<T: llmd_plugin_sdk::Plugin + Send> PluginCore for NativePlugin<T> {
    fn name(&self) -> &str {
        &self.name
    }
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    fn pool_changed(&self, generation: u64, endpoints: &[EndpointInfo]) -> Result<(), PluginError> {
        self.with(|p| p.pool_changed(generation, endpoints))
    }
    fn decided(&self, cycle: u64, endpoint: u32) -> Result<Vec<(String, String)>, PluginError> {
        self.with(|p| p.decided(cycle, endpoint))
    }
    fn first_chunk(&self, cycle: u64, endpoint: u32, now_ms: u64) -> Result<(), PluginError> {
        self.with(|p| p.first_chunk(cycle, endpoint, now_ms))
    }
    fn finished(&self, cycle: u64, completion: &Completion) -> Result<(), PluginError> {
        self.with(|p| p.finished(cycle, completion))
    }
}

impl<T: llmd_plugin_sdk::Producer + Send> ProducerPlugin for NativePlugin<T> {
    fn produce(&self, input: &CallInput<'_>) -> Result<Vec<f32>, PluginError> {
        let cycle = self.cycle(input);
        self.with(|p| p.produce(&cycle))
    }
}

impl<T: llmd_plugin_sdk::Filter + Send> FilterPlugin for NativePlugin<T> {
    fn filter(&self, input: &CallInput<'_>) -> Result<Vec<u32>, PluginError> {
        let cycle = self.cycle(input);
        self.with(|p| p.filter(&cycle))
    }
}

impl<T: llmd_plugin_sdk::Scorer + Send> ScorerPlugin for NativePlugin<T> {
    fn score(&self, input: &CallInput<'_>) -> Result<Vec<f32>, PluginError> {
        let cycle = self.cycle(input);
        self.with(|p| p.score(&cycle))
    }
}

impl<T: llmd_plugin_sdk::Picker + Send> PickerPlugin for NativePlugin<T> {
    fn pick(&self, input: &CallInput<'_>, scores: &[f32]) -> Result<Vec<u32>, PluginError> {
        let cycle = self.cycle(input);
        self.with(|p| p.pick(&cycle, scores))
    }
}
