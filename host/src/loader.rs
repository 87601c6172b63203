//! Turns a validated `PickerConfig` into a ready `SchedulerProfile`: for each plugin the
//! profile references, take its component (embedded for built-in types, or the `wasm:`
//! file), load it through the wasm runtime with its parameters, sandbox and failure policy,
//! and slot it into the profile by the role the component exports.
//!
//! It reads plugin files and nothing else; it never touches a running scheduler (publishing
//! a new one is the caller's business), so a failed load changes nothing.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::info;

use crate::config::{PickerConfig, PluginSpec};
use crate::scheduler::{PluginHandle, SchedulerProfile, WeightedScorer};
use crate::wasm::{LoadError, WasmRuntime, embedded};

/// The picker used when a profile lists none.
pub const DEFAULT_PICKER: &str = "max-score-picker";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("plugin `{plugin}`: cannot read {path}: {error}")]
    ReadWasm { plugin: String, path: PathBuf, error: String },
    #[error("plugin `{plugin}` (type {type_name}) has no embedded component; give `wasm: <path>`")]
    NoComponent { plugin: String, type_name: String },
    #[error("plugin `{plugin}`: {error}")]
    Load { plugin: String, error: LoadError },
    #[error("profile `{profile}` lists several pickers ({first}, {second}); a profile has exactly one")]
    SeveralPickers { profile: String, first: String, second: String },
}

/// Loads one plugin's component and instantiates it.
pub fn load_plugin(runtime: &WasmRuntime, spec: &PluginSpec) -> Result<PluginHandle, BuildError> {
    let owned;
    let bytes: &[u8] = match &spec.wasm {
        Some(path) => {
            owned = std::fs::read(path).map_err(|e| BuildError::ReadWasm {
                plugin: spec.name.clone(),
                path: path.clone(),
                error: e.to_string(),
            })?;
            &owned
        }
        None => embedded::find(&spec.type_name)
            .ok_or_else(|| BuildError::NoComponent { plugin: spec.name.clone(), type_name: spec.type_name.clone() })?,
    };
    let params = spec.parameters.to_string();
    runtime
        .load(&spec.name, bytes, &params, spec.sandbox, spec.failure_policy)
        .map_err(|error| BuildError::Load { plugin: spec.name.clone(), error })
}

/// Builds the config's one scheduling profile.
pub fn build_profile(runtime: &WasmRuntime, config: &PickerConfig) -> Result<SchedulerProfile, BuildError> {
    let mut producers = Vec::new();
    let mut filters = Vec::new();
    let mut scorers = Vec::new();
    let mut picker: Option<(String, Arc<dyn crate::scheduler::PickerPlugin>)> = None;
    for entry in &config.profile.plugins {
        // Invariant: config validation guarantees every pluginRef names a plugin.
        let Some(spec) = config.plugin(&entry.plugin_ref) else {
            continue;
        };
        match load_plugin(runtime, spec)? {
            PluginHandle::Producer(p) => producers.push(p),
            PluginHandle::Filter(f) => filters.push(f),
            PluginHandle::Scorer(s) => scorers.push(WeightedScorer { scorer: s, weight: entry.weight }),
            PluginHandle::Picker(p) => {
                if let Some((first, _)) = &picker {
                    return Err(BuildError::SeveralPickers {
                        profile: config.profile.name.clone(),
                        first: first.clone(),
                        second: spec.name.clone(),
                    });
                }
                picker = Some((spec.name.clone(), p));
            }
        }
    }
    let picker = match picker {
        Some((_, p)) => p,
        None => {
            let spec = PluginSpec {
                name: DEFAULT_PICKER.into(),
                type_name: DEFAULT_PICKER.into(),
                kind: crate::config::PluginKind::Scheduling,
                parameters: serde_json::json!({}),
                wasm: None,
                failure_policy: Default::default(),
                sandbox: Default::default(),
                implicit: true,
            };
            match load_plugin(runtime, &spec)? {
                PluginHandle::Picker(p) => p,
                other => {
                    return Err(BuildError::Load {
                        plugin: spec.name,
                        error: LoadError::NoRole(format!("embedded default picker exports {}", other.role())),
                    });
                }
            }
        }
    };
    let profile = SchedulerProfile::new(config.profile.name.clone(), producers, filters, scorers, picker);
    info!(
        profile = %profile.name,
        plugins = ?profile.plugins().iter().map(|p| p.core().name().to_string()).collect::<Vec<_>>(),
        "scheduling profile built"
    );
    Ok(profile)
}
