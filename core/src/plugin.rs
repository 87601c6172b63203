//! The traits through which the scheduler sees plugins, whatever runs them (a wasm
//! component, or a natively compiled plugin crate for comparison), what one call receives,
//! and the plugin error type.

use std::sync::Arc;

use llmd_plugin_sdk::{Completion, EndpointInfo, Manifest};

use crate::request::Request;

/// The role a plugin plays in a scheduling cycle (fixed by the WIT world it exports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Producer,
    Filter,
    Scorer,
    Picker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Filter => "filter",
            Role::Scorer => "scorer",
            Role::Picker => "picker",
        }
    }

    /// The extension point's name as upstream's metrics label it (`extension_point`).
    pub fn extension_point(self) -> &'static str {
        match self {
            Role::Producer => "DataProducer",
            Role::Filter => "Filter",
            Role::Scorer => "Scorer",
            Role::Picker => "Picker",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a request when a plugin fails during its cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// The plugin is skipped: a scorer contributes 0, a filter keeps every candidate,
    /// a producer's columns are unknown (NaN). A picker cannot be skipped and always fails
    /// closed.
    #[default]
    FailOpen,
    /// The request fails (503 with the plugin named).
    FailClosed,
}

/// Why a plugin call did not produce a usable result.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum PluginError {
    #[error("plugin trapped: {0}")]
    Trap(String),
    #[error("plugin exceeded its time limit of {0} ms")]
    Timeout(u64),
    #[error("plugin exceeded its memory limit of {0} bytes")]
    MemoryLimit(usize),
    #[error("plugin could not be instantiated: {0}")]
    Instantiate(String),
    #[error("plugin rejected its configuration: {0}")]
    Configure(String),
    #[error("plugin returned an invalid result: {0}")]
    InvalidOutput(String),
    #[error("plugin is taken out by its circuit breaker after repeated failures (for {0} ms more)")]
    Disabled(u64),
}

impl PluginError {
    /// A short stable name of the kind, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Trap(_) => "trap",
            PluginError::Timeout(_) => "timeout",
            PluginError::MemoryLimit(_) => "memory",
            PluginError::Instantiate(_) => "instantiate",
            PluginError::Configure(_) => "configure",
            PluginError::InvalidOutput(_) => "invalid_output",
            PluginError::Disabled(_) => "disabled",
        }
    }
}

/// What one plugin call receives: the cycle's request (of which the adapter passes only
/// what the plugin's manifest asks for), the candidates, and the plugin's `reads` columns,
/// gathered in manifest order, each `ids.len()` long.
#[derive(Clone, Copy, Debug)]
pub struct CallInput<'a> {
    pub cycle: u64,
    pub request: &'a Request,
    pub ids: &'a [u32],
    pub columns: &'a [f32],
}

/// Calls every plugin receives, whatever its role. Hooks are called only when the
/// plugin's manifest asks for them.
pub trait PluginCore: Send + Sync {
    /// The configured name (unique within a config).
    fn name(&self) -> &str;
    /// The plugin's type (`type:` in the config); the name when it has none of its own.
    fn type_name(&self) -> &str {
        self.name()
    }
    /// What `configure` declared.
    fn manifest(&self) -> &Manifest;
    fn failure_policy(&self) -> FailurePolicy {
        FailurePolicy::FailOpen
    }
    fn pool_changed(&self, generation: u64, endpoints: &[EndpointInfo]) -> Result<(), PluginError>;
    /// Returns headers to add to the client's response.
    fn decided(&self, cycle: u64, endpoint: u32) -> Result<Vec<(String, String)>, PluginError>;
    /// The first response bytes of the cycle's request arrived at `now_ms` (the clock of
    /// `Request::now_ms`).
    fn first_chunk(&self, cycle: u64, endpoint: u32, now_ms: u64) -> Result<(), PluginError>;
    fn finished(&self, cycle: u64, completion: &Completion) -> Result<(), PluginError>;
}

pub trait ProducerPlugin: PluginCore {
    /// The manifest's `writes` columns, one after the other, each `ids.len()` long.
    fn produce(&self, input: &CallInput<'_>) -> Result<Vec<f32>, PluginError>;
}

pub trait FilterPlugin: PluginCore {
    /// The ids kept.
    fn filter(&self, input: &CallInput<'_>) -> Result<Vec<u32>, PluginError>;
}

pub trait ScorerPlugin: PluginCore {
    /// One score per candidate, expected in [0, 1].
    fn score(&self, input: &CallInput<'_>) -> Result<Vec<f32>, PluginError>;
}

pub trait PickerPlugin: PluginCore {
    /// Ids, primary first, then fallbacks.
    fn pick(&self, input: &CallInput<'_>, scores: &[f32]) -> Result<Vec<u32>, PluginError>;
}

/// A loaded plugin of any role.
#[derive(Clone)]
pub enum PluginHandle {
    Producer(Arc<dyn ProducerPlugin>),
    Filter(Arc<dyn FilterPlugin>),
    Scorer(Arc<dyn ScorerPlugin>),
    Picker(Arc<dyn PickerPlugin>),
}

impl PluginHandle {
    pub fn role(&self) -> Role {
        match self {
            PluginHandle::Producer(_) => Role::Producer,
            PluginHandle::Filter(_) => Role::Filter,
            PluginHandle::Scorer(_) => Role::Scorer,
            PluginHandle::Picker(_) => Role::Picker,
        }
    }

    pub fn core(&self) -> &dyn PluginCore {
        match self {
            PluginHandle::Producer(p) => p.as_ref(),
            PluginHandle::Filter(p) => p.as_ref(),
            PluginHandle::Scorer(p) => p.as_ref(),
            PluginHandle::Picker(p) => p.as_ref(),
        }
    }
}

impl std::fmt::Debug for PluginHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.role(), self.core().name())
    }
}
