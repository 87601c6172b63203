//! Runs a natively compiled plugin crate behind the scheduler's traits. The same plugin
//! crates are built as wasm components; this adapter lets tests and benchmarks compare the
//! two builds call for call. Calls are serialised per instance, as for components.

use std::sync::Mutex;

use llmd_plugin_sdk::{Column, EndpointInfo, Metrics, Request, Usage};

use super::plugin::{FilterPlugin, PickerPlugin, PluginCore, PluginError, ProducerPlugin, ScorerPlugin};

pub struct NativePlugin<T> {
    name: String,
    inner: Mutex<T>,
}

impl<T: llmd_plugin_sdk::Plugin> NativePlugin<T> {
    /// Creates the plugin and configures it, as loading a component would.
    pub fn new(name: impl Into<String>, params_json: &str) -> Result<Self, PluginError> {
        let mut inner = T::default();
        inner.configure(params_json).map_err(PluginError::Configure)?;
        Ok(NativePlugin { name: name.into(), inner: Mutex::new(inner) })
    }

    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, PluginError> {
        let mut guard = self.inner.lock().map_err(|_| PluginError::Trap("native plugin panicked earlier".into()))?;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut guard)))
            .map_err(|_| PluginError::Trap("native plugin panicked".into()))
    }
}

impl<T: llmd_plugin_sdk::Plugin + Send> PluginCore for NativePlugin<T> {
    fn name(&self) -> &str {
        &self.name
    }
    fn pool_changed(&self, generation: u64, endpoints: &[EndpointInfo]) -> Result<(), PluginError> {
        self.with(|p| p.pool_changed(generation, endpoints))
    }
    fn pre_request(&self, request_id: &str, chosen: &[u32]) -> Result<(), PluginError> {
        self.with(|p| p.pre_request(request_id, chosen))
    }
    fn response_complete(&self, request_id: &str, endpoint: u32, usage: Usage) -> Result<(), PluginError> {
        self.with(|p| p.response_complete(request_id, endpoint, usage))
    }
}

impl<T: llmd_plugin_sdk::Producer + Send> ProducerPlugin for NativePlugin<T> {
    fn produce(&self, req: &Request, metrics: &Metrics) -> Result<Vec<Column>, PluginError> {
        self.with(|p| p.produce(req, metrics))
    }
}

impl<T: llmd_plugin_sdk::Filter + Send> FilterPlugin for NativePlugin<T> {
    fn filter(&self, req: &Request, metrics: &Metrics, columns: &[Column]) -> Result<Vec<u32>, PluginError> {
        self.with(|p| p.filter(req, metrics, columns))
    }
}

impl<T: llmd_plugin_sdk::Scorer + Send> ScorerPlugin for NativePlugin<T> {
    fn score(&self, req: &Request, metrics: &Metrics, columns: &[Column]) -> Result<Vec<f32>, PluginError> {
        self.with(|p| p.score(req, metrics, columns))
    }
}

impl<T: llmd_plugin_sdk::Picker + Send> PickerPlugin for NativePlugin<T> {
    fn pick(&self, req: &Request, metrics: &Metrics, scores: &[f32]) -> Result<Vec<u32>, PluginError> {
        self.with(|p| p.pick(req, metrics, scores))
    }
}
