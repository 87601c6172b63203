//! The native twin of a configured profile: the same plugin crates the embedded components
//! are built from, compiled into this binary and run through the host's `NativePlugin`
//! adapter, with the same names, parameters, weights and order as `loader` gives the wasm
//! profile. Comparing the two isolates what the component boundary costs.
//!
//! Only the types of the optimized baseline are known here; any other type is an error, so
//! a config the twin cannot mirror is never benchmarked half-native.

use std::sync::Arc;

use epp::config::{PickerConfig, PluginSpec};
use epp::loader::DEFAULT_PICKER;
use epp_core::native::NativePlugin;
use epp_core::{PluginError, PluginHandle, ProfileError, Scheduler, SchedulerProfile, WeightedScorer};

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("plugin `{0}`: type {1} has no native twin in the benchmark")]
    UnknownType(String, String),
    #[error("plugin `{0}`: {1}")]
    Configure(String, PluginError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

fn make<T>(spec_name: &str, params: &str) -> Result<Arc<NativePlugin<T>>, NativeError>
where
    T: llmd_plugin_sdk::Plugin,
{
    NativePlugin::<T>::new(spec_name, params).map(Arc::new).map_err(|e| NativeError::Configure(spec_name.into(), e))
}

/// Instantiates the native build of one configured plugin.
fn native_plugin(name: &str, type_name: &str, params: &str) -> Result<PluginHandle, NativeError> {
    Ok(match type_name {
        "approx-prefix-cache-producer" => {
            PluginHandle::Producer(make::<approx_prefix_cache_producer::PrefixIndexProducer>(name, params)?)
        }
        "queue-scorer" => PluginHandle::Scorer(make::<queue_scorer::QueueScorer>(name, params)?),
        "kv-cache-utilization-scorer" => {
            PluginHandle::Scorer(make::<kv_cache_utilization_scorer::KvCacheUtilizationScorer>(name, params)?)
        }
        "prefix-cache-scorer" => PluginHandle::Scorer(make::<prefix_cache_scorer::PrefixCacheScorer>(name, params)?),
        "no-hit-lru-scorer" => PluginHandle::Scorer(make::<no_hit_lru_scorer::NoHitLruScorer>(name, params)?),
        "max-score-picker" => PluginHandle::Picker(make::<max_score_picker::MaxScorePicker>(name, params)?),
        "inflight-load-producer" => {
            PluginHandle::Producer(make::<inflight_load_producer::InflightLoadProducer>(name, params)?)
        }
        "prefix-cache-affinity-filter" => {
            PluginHandle::Filter(make::<prefix_cache_affinity_filter::PrefixCacheAffinityFilter>(name, params)?)
        }
        "token-load-scorer" => PluginHandle::Scorer(make::<token_load_scorer::TokenLoadScorer>(name, params)?),
        "active-request-scorer" => {
            PluginHandle::Scorer(make::<active_request_scorer::ActiveRequestScorer>(name, params)?)
        }
        "lora-affinity-scorer" => PluginHandle::Scorer(make::<lora_affinity_scorer::LoraAffinityScorer>(name, params)?),
        other => return Err(NativeError::UnknownType(name.into(), other.into())),
    })
}

/// The native twin of `config`'s scheduler (its primary profile), as `loader::build` makes
/// the wasm one: same plugins, order, weights and admission thresholds.
pub fn native_scheduler(config: &PickerConfig) -> Result<Scheduler, NativeError> {
    let mut s = Scheduler::single(native_profile(config)?);
    s.saturation = config.saturation;
    Ok(s)
}

/// The native twin of `config`'s profile, built in the order `loader::build` uses.
pub fn native_profile(config: &PickerConfig) -> Result<SchedulerProfile, NativeError> {
    let mut producers = Vec::new();
    let mut filters = Vec::new();
    let mut scorers = Vec::new();
    let mut picker = None;
    for entry in &config.profile().plugins {
        let Some(spec) = config.plugin(&entry.plugin_ref) else { continue };
        match native_of(spec)? {
            PluginHandle::Producer(p) => producers.push(p),
            PluginHandle::Filter(f) => filters.push(f),
            PluginHandle::Scorer(s) => scorers.push(WeightedScorer { scorer: s, weight: entry.weight }),
            PluginHandle::Picker(p) => picker = Some(p),
        }
    }
    let picker = match picker {
        Some(p) => p,
        None => match native_plugin(DEFAULT_PICKER, DEFAULT_PICKER, "{}")? {
            PluginHandle::Picker(p) => p,
            _ => return Err(NativeError::UnknownType(DEFAULT_PICKER.into(), "non-picker".into())),
        },
    };
    Ok(SchedulerProfile::new(config.profile().name.clone(), producers, filters, scorers, picker)?)
}

fn native_of(spec: &PluginSpec) -> Result<PluginHandle, NativeError> {
    native_plugin(&spec.name, &spec.type_name, &spec.parameters.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_twin_has_the_loaders_plugins_in_order() {
        let config = PickerConfig::default_config().expect("default config");
        let profile = native_profile(&config).expect("native twin");
        let names: Vec<&str> = profile.plugins().iter().map(|p| p.core().name()).collect();
        assert_eq!(
            names,
            [
                "approx-prefix-cache-producer",
                "inflight-load-producer",
                "prefix-cache-affinity-filter",
                "prefix-cache-scorer",
                "token-load-scorer",
                "lora-affinity-scorer",
                "active-request-scorer",
                "no-hit-lru-scorer",
                "max-score-picker"
            ]
        );
        assert_eq!(profile.weights(), [1.0, 1.0, 1.0, 0.02, 0.0001]);
        // The guide's config has a twin too.
        let guide = native_profile(&PickerConfig::guide_config().expect("guide config")).expect("guide twin");
        assert_eq!(guide.weights(), [2.0, 2.0, 3.0, 2.0]);
    }

    #[test]
    fn a_type_without_twin_is_named() {
        let err = native_plugin("x", "session-affinity-scorer", "{}").err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("plugin `x`: type session-affinity-scorer has no native twin in the benchmark")
        );
    }
}
