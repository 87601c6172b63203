//! Turns a validated `PickerConfig` into a ready `SchedulerProfile`: for each plugin the
//! profile references, take its component (embedded for built-in types, or the `wasm:`
//! file), load it through the wasm runtime with its parameters, sandbox and failure policy,
//! and slot it into the profile by the role the component exports.
//!
//! Every newly loaded plugin must pass the probe (`probe.rs`), run on an instance of its
//! own, before a fresh instance is used. A plugin whose entry and component bytes are
//! unchanged since the previous build is reused, state and all (the prefix index survives
//! a reload that did not touch it).
//!
//! It reads plugin files and nothing else; it never touches a running scheduler (publishing
//! a new one is the caller's business), so a failed load changes nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::info;

use epp_core::scheduler::Admission;
use epp_core::{PluginHandle, ProfileError, Scheduler, SchedulerProfile, Variant, WeightedScorer};

use crate::config::{PickerConfig, PluginSpec, ProfileSpec};
use crate::kv_events::{KvEvents, Settings};
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
    #[error("plugin `{plugin}` failed its probe: {error}")]
    Probe { plugin: String, error: crate::probe::ProbeError },
    #[error("profile `{profile}` lists several pickers ({first}, {second}); a profile has exactly one")]
    SeveralPickers { profile: String, first: String, second: String },
    #[error(transparent)]
    Profile(Box<ProfileError>),
    #[error("plugin `{plugin}`: {error}")]
    Configure { plugin: String, error: String },
}

impl BuildError {
    /// A failure that may pass without any change to the files: a component that could not
    /// be read (being replaced) or a call past its time limit (a busy machine).
    pub fn transient(&self) -> bool {
        match self {
            BuildError::ReadWasm { .. } => true,
            BuildError::Probe { error, .. } => error.timed_out,
            BuildError::Load { error: LoadError::Plugin(epp_core::PluginError::Timeout(_)), .. } => true,
            _ => false,
        }
    }
}

impl From<ProfileError> for BuildError {
    fn from(e: ProfileError) -> Self {
        BuildError::Profile(Box::new(e))
    }
}

/// Loaded plugins by identity (entry + component bytes), for reuse across reloads.
#[derive(Clone, Default)]
pub struct PluginSet {
    by_key: HashMap<u64, PluginHandle>,
    /// The KV-event hub a precise prefix producer feeds from (the server's, kept across
    /// reloads; a standalone one is made when a build needs one and none is given).
    kv_events: Option<Arc<KvEvents>>,
    /// The settings of its precise prefix producer, put in force when its scheduler is
    /// installed (kept across builds while the entry does not change).
    precise: Option<Arc<Settings>>,
}

impl PluginSet {
    /// An empty set whose builds use `hub` for precise prefix routing.
    pub fn with_kv_events(hub: Arc<KvEvents>) -> PluginSet {
        PluginSet { by_key: HashMap::new(), kv_events: Some(hub), precise: None }
    }

    /// The settings of the set's precise prefix producer, when it has one.
    pub fn precise(&self) -> Option<&Arc<Settings>> {
        self.precise.as_ref()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// What a build produced.
pub struct Built {
    pub scheduler: Scheduler,
    /// Every plugin of the profile, for the next build to reuse.
    pub plugins: PluginSet,
    /// Names of the plugins loaded afresh (the others were reused).
    pub loaded: Vec<String>,
}

/// Identity of a loaded plugin: its owner (a profile, or a variant when several variants
/// run one profile: variants never share instances, so their state stays apart), its
/// entry, and its component bytes.
fn plugin_key(owner: &str, spec: &PluginSpec, bytes: &[u8]) -> u64 {
    let identity = format!(
        "{owner}\0{}\0{}\0{}\0{:?}\0{:?}\0{:x}",
        spec.name,
        spec.type_name,
        spec.parameters,
        spec.sandbox,
        spec.failure_policy,
        xxhash_rust::xxh3::xxh3_64(bytes)
    );
    xxhash_rust::xxh3::xxh3_64(identity.as_bytes())
}

/// The component bytes of a plugin entry: its `wasm:` file, or the embedded default.
pub fn component_bytes(spec: &PluginSpec) -> Result<std::borrow::Cow<'static, [u8]>, BuildError> {
    match &spec.wasm {
        Some(path) => std::fs::read(path).map(std::borrow::Cow::Owned).map_err(|e| BuildError::ReadWasm {
            plugin: spec.name.clone(),
            path: path.clone(),
            error: e.to_string(),
        }),
        None => embedded::find(&spec.type_name)
            .map(std::borrow::Cow::Borrowed)
            .ok_or_else(|| BuildError::NoComponent { plugin: spec.name.clone(), type_name: spec.type_name.clone() }),
    }
}

/// Loads one plugin (or reuses it from `previous`), probing anything new.
fn load_or_reuse(
    runtime: &WasmRuntime,
    owner: &str,
    spec: &PluginSpec,
    previous: &PluginSet,
    next: &mut PluginSet,
    loaded: &mut Vec<String>,
) -> Result<PluginHandle, BuildError> {
    let bytes = component_bytes(spec)?;
    let key = plugin_key(owner, spec, &bytes);
    if let Some(h) = previous.by_key.get(&key).or_else(|| next.by_key.get(&key)).cloned() {
        next.by_key.insert(key, h.clone());
        return Ok(h);
    }
    // The probe runs on an instance of its own: its made-up requests must leave nothing in
    // the state of the one that serves (a learned pace, indexed prompts, counts).
    let probed = load_plugin(runtime, spec)?;
    crate::probe::probe(&probed).map_err(|error| BuildError::Probe { plugin: spec.name.clone(), error })?;
    drop(probed);
    let handle = load_plugin(runtime, spec)?;
    loaded.push(spec.name.clone());
    next.by_key.insert(key, handle.clone());
    Ok(handle)
}

/// Loads one plugin's component and instantiates it (no probe).
pub fn load_plugin(runtime: &WasmRuntime, spec: &PluginSpec) -> Result<PluginHandle, BuildError> {
    let bytes = component_bytes(spec)?;
    let params = spec.parameters.to_string();
    runtime
        .load_as(&spec.name, &spec.type_name, &bytes, &params, spec.sandbox, spec.failure_policy)
        .map_err(|error| BuildError::Load { plugin: spec.name.clone(), error })
}

/// Builds everything the config runs (one profile, or every variant of its experiment),
/// reusing unchanged plugins from `previous`.
pub fn build(runtime: &WasmRuntime, config: &PickerConfig, previous: &PluginSet) -> Result<Built, BuildError> {
    let mut next = PluginSet { by_key: HashMap::new(), kv_events: previous.kv_events.clone(), precise: None };
    let mut loaded = Vec::new();
    let scheduler = match &config.experiment {
        None => {
            let primary = config.profile();
            let owner = format!("profile:{}", primary.name);
            Scheduler::single(build_one(runtime, config, primary, &owner, previous, &mut next, &mut loaded)?)
        }
        Some(experiment) => {
            let mut variants = Vec::new();
            let mut owned = std::collections::HashSet::new();
            for v in &experiment.variants {
                // Invariant: config validation checked that every variant names a profile.
                let Some(profile) = config.profile_named(&v.profile) else { continue };
                // The first variant of a profile owns its plugins as the profile alone would,
                // so starting, ending or renaming an experiment keeps their state (the prefix
                // index, the load in flight); another variant of the same profile gets its own.
                let owner = if owned.insert(profile.name.as_str()) {
                    format!("profile:{}", profile.name)
                } else {
                    format!("variant:{}", v.name)
                };
                let built = build_one(runtime, config, profile, &owner, previous, &mut next, &mut loaded)?;
                variants.push(Variant { name: v.name.clone(), profile: built, shadow: v.shadow });
            }
            Scheduler {
                variants,
                experiment: Some(experiment.clone()),
                saturation: config.saturation,
                admission: Admission::default(),
            }
        }
    };
    // With flow control on, saturation queues requests before scheduling instead of
    // shedding them in it.
    let admission = if config.flow.enabled { Admission::External } else { Admission::ShedSheddable };
    let scheduler = Scheduler { saturation: config.saturation, admission, ..scheduler };
    info!(
        variants = ?scheduler.variants.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        reloaded = ?loaded,
        "scheduler built"
    );
    Ok(Built { scheduler, plugins: next, loaded })
}

/// Builds one profile; its plugins are keyed under `owner` (the variant).
fn build_one(
    runtime: &WasmRuntime,
    config: &PickerConfig,
    spec_profile: &ProfileSpec,
    owner: &str,
    previous: &PluginSet,
    next: &mut PluginSet,
    loaded: &mut Vec<String>,
) -> Result<SchedulerProfile, BuildError> {
    let mut producers = Vec::new();
    let mut filters = Vec::new();
    let mut scorers = Vec::new();
    let mut picker: Option<(String, Arc<dyn epp_core::PickerPlugin>)> = None;
    for entry in &spec_profile.plugins {
        // Invariant: config validation guarantees every pluginRef names a plugin.
        let Some(spec) = config.plugin(&entry.plugin_ref) else {
            continue;
        };
        if spec.type_name == crate::kv_events::PRECISE_TYPE {
            // The host's side of precise routing runs first: it turns the engines' events
            // into the columns the component reads.
            let base = config.base_dir.as_deref();
            let made = |set: &PluginSet| set.precise.clone().filter(|s| s.made_from(&spec.parameters, base));
            let settings = match made(next).or_else(|| made(previous)) {
                Some(settings) => settings,
                None => Arc::new(
                    Settings::from_params(&spec.parameters, base)
                        .map_err(|error| BuildError::Configure { plugin: spec.name.clone(), error })?,
                ),
            };
            next.precise = Some(settings.clone());
            let hub = next.kv_events.get_or_insert_with(|| KvEvents::new(None)).clone();
            producers
                .push(Arc::new(crate::kv_events::KvEventsProducer::new(hub, settings))
                    as Arc<dyn epp_core::ProducerPlugin>);
        }
        if let Some(half) =
            spec.wasm.is_none().then(|| embedded::filtering_half(&spec.type_name, &spec.parameters)).flatten()
        {
            // Upstream's plugin filters as well as scores: its filtering half goes first,
            // under the entry's name, with the same parameters.
            let filter_spec = PluginSpec { type_name: half.to_string(), ..spec.clone() };
            match load_or_reuse(runtime, owner, &filter_spec, previous, next, loaded)? {
                PluginHandle::Filter(f) => filters.push(f),
                other => {
                    let error = LoadError::NoRole(format!("embedded {half} exports {}", other.role()));
                    return Err(BuildError::Load { plugin: spec.name.clone(), error });
                }
            }
        }
        match load_or_reuse(runtime, owner, spec, previous, next, loaded)? {
            PluginHandle::Producer(p) => producers.push(p),
            PluginHandle::Filter(f) => filters.push(f),
            PluginHandle::Scorer(s) => scorers.push(WeightedScorer { scorer: s, weight: entry.weight }),
            PluginHandle::Picker(p) => {
                if let Some((first, _)) = &picker {
                    return Err(BuildError::SeveralPickers {
                        profile: spec_profile.name.clone(),
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
            match load_or_reuse(runtime, owner, &spec, previous, next, loaded)? {
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
    let profile = SchedulerProfile::new(spec_profile.name.clone(), producers, filters, scorers, picker)?;
    info!(
        profile = %profile.name,
        plugins = ?profile.plugins().iter().map(|p| p.core().name().to_string()).collect::<Vec<_>>(),
        "scheduling profile built"
    );
    Ok(profile)
}
