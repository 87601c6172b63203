//! The process-wide wasm runtime: one `Engine` with epoch interruption (a ticker thread
//! advances the epoch every 5 ms, which is what per-call deadlines count), one
//! WASI linker, and a cache of compiled components keyed by a hash of their bytes, so a
//! reload only compiles what changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tracing::info;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine};

use epp_core::{FailurePolicy, PluginHandle, Role};

use super::instance::WasmPlugin;
use super::sandbox::{HostState, Sandbox, TICK};

/// The WIT package (name and version) this host speaks.
pub const WIT_PACKAGE: &str = "llmd:scheduler@0.3.0";
const WIT_NAMESPACE: &str = "llmd:scheduler/";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    #[error(
        "the component was built against WIT {found}, but this host speaks {expected}; rebuild it with the matching SDK"
    )]
    WitVersion { found: String, expected: String },
    #[error(
        "the component exports no scheduling role (expected one of llmd:scheduler/{{producer,filter,scorer,picker}}); its exports: {0}"
    )]
    NoRole(String),
    #[error("the component exports several roles ({0}); a plugin plays exactly one")]
    SeveralRoles(String),
    #[error(transparent)]
    Plugin(#[from] epp_core::PluginError),
}

#[derive(Clone)]
pub struct WasmRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
    cache: Mutex<HashMap<u64, Component>>,
}

impl WasmRuntime {
    /// A runtime without an on-disk compilation cache.
    pub fn new() -> Result<Self, LoadError> {
        WasmRuntime::build(false)
    }

    /// A runtime that keeps compiled components in wasmtime's on-disk cache (the user's
    /// cache folder), so a restart skips compiling unchanged plugins. If the cache cannot be
    /// set up, it runs without one and says so.
    pub fn with_disk_cache() -> Result<Self, LoadError> {
        WasmRuntime::build(true)
    }

    fn build(disk_cache: bool) -> Result<Self, LoadError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        if disk_cache {
            match wasmtime::Cache::new(wasmtime::CacheConfig::new()) {
                Ok(cache) => {
                    info!(dir = %cache.directory().display(), "wasm compilation cache enabled");
                    config.cache(Some(cache));
                }
                Err(e) => tracing::warn!(error = %e, "wasm compilation cache unavailable; compiling at every start"),
            }
        }
        let engine = Engine::new(&config).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                // Ends with the engine: the ticker must not keep it alive.
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| LoadError::Compile(format!("cannot start the epoch ticker: {e}")))?;
        Ok(WasmRuntime { inner: Arc::new(Inner { engine, linker, cache: Mutex::new(HashMap::new()) }) })
    }

    /// Compiles `bytes` (or takes the cached compilation) and checks the WIT contract.
    pub fn compile(&self, bytes: &[u8]) -> Result<(Component, Role), LoadError> {
        let key = xxhash_rust::xxh3::xxh3_64(bytes);
        let cached = self.inner.cache.lock().ok().and_then(|c| c.get(&key).cloned());
        let component = match cached {
            Some(c) => c,
            None => {
                let started = std::time::Instant::now();
                let c = Component::new(&self.inner.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
                info!(
                    bytes = bytes.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "compiled plugin component"
                );
                if let Ok(mut cache) = self.inner.cache.lock() {
                    cache.insert(key, c.clone());
                }
                c
            }
        };
        let role = self.role_of(&component)?;
        Ok((component, role))
    }

    /// Reads the role from the component's exports, rejecting other WIT versions by name.
    fn role_of(&self, component: &Component) -> Result<Role, LoadError> {
        let ty = component.component_type();
        let names: Vec<String> = ty.exports(&self.inner.engine).map(|(name, _)| name.to_string()).collect();
        let expected_version = WIT_PACKAGE.rsplit('@').next().unwrap_or_default();
        let mut roles = Vec::new();
        for name in &names {
            let Some(rest) = name.strip_prefix(WIT_NAMESPACE) else {
                continue;
            };
            let (iface, version) = rest.split_once('@').unwrap_or((rest, ""));
            if version != expected_version {
                return Err(LoadError::WitVersion {
                    found: format!("llmd:scheduler@{}", if version.is_empty() { "(unversioned)" } else { version }),
                    expected: WIT_PACKAGE.to_string(),
                });
            }
            let role = match iface {
                "producer" => Role::Producer,
                "filter" => Role::Filter,
                "scorer" => Role::Scorer,
                "picker" => Role::Picker,
                _ => continue,
            };
            roles.push(role);
        }
        match roles.as_slice() {
            [role] => Ok(*role),
            [] => Err(LoadError::NoRole(if names.is_empty() { "(none)".into() } else { names.join(", ") })),
            many => Err(LoadError::SeveralRoles(many.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", "))),
        }
    }

    /// Compiles, instantiates and configures a plugin; the result is ready to schedule.
    pub fn load(
        &self,
        name: &str,
        bytes: &[u8],
        params_json: &str,
        sandbox: Sandbox,
        policy: FailurePolicy,
    ) -> Result<PluginHandle, LoadError> {
        self.load_as(name, name, bytes, params_json, sandbox, policy)
    }

    /// [`load`](Self::load) for a config entry: `name` is its configured name, `type_name`
    /// its type (both label the plugin's metrics).
    pub fn load_as(
        &self,
        name: &str,
        type_name: &str,
        bytes: &[u8],
        params_json: &str,
        sandbox: Sandbox,
        policy: FailurePolicy,
    ) -> Result<PluginHandle, LoadError> {
        let (component, role) = self.compile(bytes)?;
        let plugin = WasmPlugin::new(
            name.to_string(),
            type_name.to_string(),
            role,
            &self.inner.engine,
            &self.inner.linker,
            &component,
            params_json.to_string(),
            sandbox,
            policy,
        )?;
        Ok(plugin.into_handle())
    }
}
