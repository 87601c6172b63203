//! One configured plugin backed by a component instance in its own `Store`.
//!
//! Calls are serialised per plugin (a mutex around the store): stateful plugins such as the
//! prefix index keep their state in the instance. Every call runs under the sandbox: a
//! memory cap enforced by a resource limiter and a wall-clock deadline counted in epoch
//! ticks. A trap — including a blown deadline or memory cap — poisons the instance: it is
//! dropped, the error is returned as a value, and the next call rebuilds a fresh instance
//! (configured again and told the last pool), so the host keeps serving.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use llmd_plugin_sdk::{Column, EndpointInfo, Metrics, Request, Usage};
use tracing::warn;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{filter, picker, producer, scorer};
use super::convert;
use super::runtime::{LoadError, TICK};
use crate::scheduler::{
    FailurePolicy, FilterPlugin, PickerPlugin, PluginCore, PluginError, PluginHandle, ProducerPlugin, Role,
    ScorerPlugin,
};

/// Per-plugin resource limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sandbox {
    /// Linear memory cap, in bytes.
    pub memory_bytes: usize,
    /// Wall-clock limit of one call, in milliseconds.
    pub call_timeout_ms: u64,
    /// Limit for instantiation plus `configure`, in milliseconds.
    pub setup_timeout_ms: u64,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox { memory_bytes: 256 << 20, call_timeout_ms: 50, setup_timeout_ms: 2_000 }
    }
}

/// Store data: a WASI context with no files, network, environment or arguments (the Rust
/// standard library of a guest imports WASI even when unused), plus the memory limiter.
pub(super) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryCap,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

struct MemoryCap {
    max_bytes: usize,
    exceeded: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.exceeded = true;
            return Err(wasmtime::Error::msg(format!("memory limit of {} bytes exceeded", self.max_bytes)));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

enum Exports {
    Producer(producer::ProducerPlugin),
    Filter(filter::FilterPlugin),
    Scorer(scorer::ScorerPlugin),
    Picker(picker::PickerPlugin),
}

enum Pre {
    Producer(producer::ProducerPluginPre<HostState>),
    Filter(filter::FilterPluginPre<HostState>),
    Scorer(scorer::ScorerPluginPre<HostState>),
    Picker(picker::PickerPluginPre<HostState>),
}

struct Live {
    store: Store<HostState>,
    exports: Exports,
}

struct State {
    live: Option<Live>,
    /// The last pool told to the plugin, replayed into a rebuilt instance.
    pool: Option<(u64, Vec<EndpointInfo>)>,
    breaker: Breaker,
}

/// Failures within `BREAKER_WINDOW` beyond this many take the plugin out.
const BREAKER_FAILURES: usize = 5;
const BREAKER_WINDOW: Duration = Duration::from_secs(10);
/// How long a tripped plugin stays out before it is tried again.
const BREAKER_COOLDOWN: Duration = Duration::from_secs(30);

/// A circuit breaker: a plugin that keeps failing is not called (its failure policy
/// applies at once) for a cooldown, instead of costing every request a deadline.
#[derive(Default)]
struct Breaker {
    recent: VecDeque<Instant>,
    open_until: Option<Instant>,
}

impl Breaker {
    /// `Some(remaining)` while the breaker is open.
    fn open_for(&mut self, now: Instant) -> Option<Duration> {
        match self.open_until {
            Some(until) if until > now => Some(until - now),
            Some(_) => {
                self.open_until = None;
                self.recent.clear();
                None
            }
            None => None,
        }
    }

    /// Records a failure; true when it trips the breaker.
    fn failed(&mut self, now: Instant) -> bool {
        self.recent.push_back(now);
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > BREAKER_WINDOW) {
            self.recent.pop_front();
        }
        if self.recent.len() > BREAKER_FAILURES {
            self.open_until = Some(now + BREAKER_COOLDOWN);
            return true;
        }
        false
    }
}

pub struct WasmPlugin {
    name: String,
    role: Role,
    engine: Engine,
    pre: Pre,
    params_json: String,
    sandbox: Sandbox,
    policy: FailurePolicy,
    state: Mutex<State>,
}

impl WasmPlugin {
    /// Prepares the component and builds (and configures) the first instance, so a bad
    /// plugin is rejected at load rather than on the first request.
    #[allow(clippy::too_many_arguments)] // reason: one call site, each argument distinct
    pub(super) fn new(
        name: String,
        role: Role,
        engine: &Engine,
        linker: &Linker<HostState>,
        component: &Component,
        params_json: String,
        sandbox: Sandbox,
        policy: FailurePolicy,
    ) -> Result<Self, LoadError> {
        let link_err = |e: wasmtime::Error| PluginError::Instantiate(format!("{e:#}"));
        let pre = linker.instantiate_pre(component).map_err(link_err)?;
        let pre = match role {
            Role::Producer => Pre::Producer(producer::ProducerPluginPre::new(pre).map_err(link_err)?),
            Role::Filter => Pre::Filter(filter::FilterPluginPre::new(pre).map_err(link_err)?),
            Role::Scorer => Pre::Scorer(scorer::ScorerPluginPre::new(pre).map_err(link_err)?),
            Role::Picker => Pre::Picker(picker::PickerPluginPre::new(pre).map_err(link_err)?),
        };
        let plugin = WasmPlugin {
            name,
            role,
            engine: engine.clone(),
            pre,
            params_json,
            sandbox,
            policy,
            state: Mutex::new(State { live: None, pool: None, breaker: Breaker::default() }),
        };
        let first = plugin.instantiate(None)?;
        plugin.lock().live = Some(first);
        Ok(plugin)
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub(super) fn into_handle(self) -> PluginHandle {
        let me = Arc::new(self);
        match me.role {
            Role::Producer => PluginHandle::Producer(me),
            Role::Filter => PluginHandle::Filter(me),
            Role::Scorer => PluginHandle::Scorer(me),
            Role::Picker => PluginHandle::Picker(me),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere while holding it; the state itself
        // (an optional instance) is still coherent, and a bad instance is rebuilt anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_store(&self) -> Store<HostState> {
        let state = HostState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limiter: MemoryCap { max_bytes: self.sandbox.memory_bytes, exceeded: false },
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store
    }

    /// Builds a fresh instance: instantiate, `configure`, and replay the last pool.
    fn instantiate(&self, pool: Option<&(u64, Vec<EndpointInfo>)>) -> Result<Live, PluginError> {
        let mut store = self.new_store();
        store.set_epoch_deadline(ticks(self.sandbox.setup_timeout_ms));
        let fail =
            |e: wasmtime::Error, store: &Store<HostState>| self.classify(e, store, self.sandbox.setup_timeout_ms);
        let exports = match &self.pre {
            Pre::Producer(p) => p.instantiate(&mut store).map(Exports::Producer),
            Pre::Filter(p) => p.instantiate(&mut store).map(Exports::Filter),
            Pre::Scorer(p) => p.instantiate(&mut store).map(Exports::Scorer),
            Pre::Picker(p) => p.instantiate(&mut store).map(Exports::Picker),
        };
        let exports = exports.map_err(|e| match fail(e, &store) {
            PluginError::Trap(m) => PluginError::Instantiate(m),
            other => other,
        })?;
        let configured = match &exports {
            Exports::Producer(x) => x.llmd_scheduler_plugin().call_configure(&mut store, &self.params_json),
            Exports::Filter(x) => x.llmd_scheduler_plugin().call_configure(&mut store, &self.params_json),
            Exports::Scorer(x) => x.llmd_scheduler_plugin().call_configure(&mut store, &self.params_json),
            Exports::Picker(x) => x.llmd_scheduler_plugin().call_configure(&mut store, &self.params_json),
        };
        configured.map_err(|e| fail(e, &store))?.map_err(PluginError::Configure)?;
        let mut live = Live { store, exports };
        if let Some((generation, endpoints)) = pool {
            live.store.set_epoch_deadline(ticks(self.sandbox.setup_timeout_ms));
            let eps: Vec<_> = endpoints.iter().map(convert::endpoint).collect();
            let told = match &live.exports {
                Exports::Producer(x) => x.llmd_scheduler_plugin().call_pool_changed(&mut live.store, *generation, &eps),
                Exports::Filter(x) => x.llmd_scheduler_plugin().call_pool_changed(&mut live.store, *generation, &eps),
                Exports::Scorer(x) => x.llmd_scheduler_plugin().call_pool_changed(&mut live.store, *generation, &eps),
                Exports::Picker(x) => x.llmd_scheduler_plugin().call_pool_changed(&mut live.store, *generation, &eps),
            };
            told.map_err(|e| fail(e, &live.store))?;
        }
        Ok(live)
    }

    /// Turns a wasmtime error into the scheduler's error kind.
    fn classify(&self, e: wasmtime::Error, store: &Store<HostState>, timeout_ms: u64) -> PluginError {
        if store.data().limiter.exceeded {
            return PluginError::MemoryLimit(self.sandbox.memory_bytes);
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return PluginError::Timeout(timeout_ms);
        }
        // The first line names the trap; the wasm backtrace after it is noise in logs.
        let text = format!("{e:#}");
        PluginError::Trap(text.lines().next().unwrap_or("trap").trim_end_matches(':').to_string())
    }

    /// Runs `f` on the live instance (building one if needed) under the call deadline.
    /// On any error the instance is dropped, to be rebuilt by the next call.
    fn call<R>(
        &self,
        f: impl FnOnce(&mut Store<HostState>, &Exports) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let mut state = self.lock();
        if let Some(remaining) = state.breaker.open_for(Instant::now()) {
            return Err(PluginError::Disabled(remaining.as_millis() as u64));
        }
        let mut live = match state.live.take() {
            Some(live) => live,
            None => match self.instantiate(state.pool.as_ref()) {
                Ok(live) => live,
                Err(e) => {
                    self.trip(&mut state);
                    return Err(e);
                }
            },
        };
        live.store.set_epoch_deadline(ticks(self.sandbox.call_timeout_ms));
        match f(&mut live.store, &live.exports) {
            Ok(r) => {
                state.live = Some(live);
                Ok(r)
            }
            Err(e) => {
                let err = self.classify(e, &live.store, self.sandbox.call_timeout_ms);
                warn!(plugin = %self.name, error = %err, "plugin call failed; its instance will be rebuilt");
                self.trip(&mut state);
                Err(err)
            }
        }
    }
}

impl WasmPlugin {
    fn trip(&self, state: &mut State) {
        if state.breaker.failed(Instant::now()) {
            warn!(
                plugin = %self.name,
                failures = BREAKER_FAILURES + 1,
                window_s = BREAKER_WINDOW.as_secs(),
                cooldown_s = BREAKER_COOLDOWN.as_secs(),
                "circuit breaker opened: plugin taken out after repeated failures"
            );
        }
    }
}

fn ticks(ms: u64) -> u64 {
    (ms / TICK.as_millis().max(1) as u64).max(1)
}

impl PluginCore for WasmPlugin {
    fn name(&self) -> &str {
        &self.name
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.policy
    }

    fn pool_changed(&self, generation: u64, endpoints: &[EndpointInfo]) -> Result<(), PluginError> {
        self.lock().pool = Some((generation, endpoints.to_vec()));
        let eps: Vec<_> = endpoints.iter().map(convert::endpoint).collect();
        self.call(|store, ex| match ex {
            Exports::Producer(x) => x.llmd_scheduler_plugin().call_pool_changed(store, generation, &eps),
            Exports::Filter(x) => x.llmd_scheduler_plugin().call_pool_changed(store, generation, &eps),
            Exports::Scorer(x) => x.llmd_scheduler_plugin().call_pool_changed(store, generation, &eps),
            Exports::Picker(x) => x.llmd_scheduler_plugin().call_pool_changed(store, generation, &eps),
        })
    }

    fn pre_request(&self, request_id: &str, chosen: &[u32]) -> Result<(), PluginError> {
        self.call(|store, ex| match ex {
            Exports::Producer(x) => x.llmd_scheduler_hooks().call_pre_request(store, request_id, chosen),
            Exports::Filter(x) => x.llmd_scheduler_hooks().call_pre_request(store, request_id, chosen),
            Exports::Scorer(x) => x.llmd_scheduler_hooks().call_pre_request(store, request_id, chosen),
            Exports::Picker(x) => x.llmd_scheduler_hooks().call_pre_request(store, request_id, chosen),
        })
    }

    fn response_complete(&self, request_id: &str, endpoint: u32, usage: Usage) -> Result<(), PluginError> {
        let u = convert::usage(usage);
        self.call(|store, ex| match ex {
            Exports::Producer(x) => x.llmd_scheduler_hooks().call_response_complete(store, request_id, endpoint, u),
            Exports::Filter(x) => x.llmd_scheduler_hooks().call_response_complete(store, request_id, endpoint, u),
            Exports::Scorer(x) => x.llmd_scheduler_hooks().call_response_complete(store, request_id, endpoint, u),
            Exports::Picker(x) => x.llmd_scheduler_hooks().call_response_complete(store, request_id, endpoint, u),
        })
    }
}

fn wrong_role(expected: Role) -> wasmtime::Error {
    wasmtime::Error::msg(format!("instance does not export the {expected} role"))
}

impl ProducerPlugin for WasmPlugin {
    fn produce(&self, req: &Request, metrics: &Metrics) -> Result<Vec<Column>, PluginError> {
        let (r, m) = (convert::request(req), convert::metrics(metrics));
        self.call(|store, ex| match ex {
            Exports::Producer(x) => x.llmd_scheduler_producer().call_produce(store, &r, &m),
            _ => Err(wrong_role(Role::Producer)),
        })
        .map(convert::columns_out)
    }
}

impl FilterPlugin for WasmPlugin {
    fn filter(&self, req: &Request, metrics: &Metrics, columns: &[Column]) -> Result<Vec<u32>, PluginError> {
        let (r, m, c) = (convert::request(req), convert::metrics(metrics), convert::columns_in(columns));
        self.call(|store, ex| match ex {
            Exports::Filter(x) => x.llmd_scheduler_filter().call_filter(store, &r, &m, &c),
            _ => Err(wrong_role(Role::Filter)),
        })
    }
}

impl ScorerPlugin for WasmPlugin {
    fn score(&self, req: &Request, metrics: &Metrics, columns: &[Column]) -> Result<Vec<f32>, PluginError> {
        let (r, m, c) = (convert::request(req), convert::metrics(metrics), convert::columns_in(columns));
        self.call(|store, ex| match ex {
            Exports::Scorer(x) => x.llmd_scheduler_scorer().call_score(store, &r, &m, &c),
            _ => Err(wrong_role(Role::Scorer)),
        })
    }
}

impl PickerPlugin for WasmPlugin {
    fn pick(&self, req: &Request, metrics: &Metrics, scores: &[f32]) -> Result<Vec<u32>, PluginError> {
        let (r, m) = (convert::request(req), convert::metrics(metrics));
        self.call(|store, ex| match ex {
            Exports::Picker(x) => x.llmd_scheduler_picker().call_pick(store, &r, &m, scores),
            _ => Err(wrong_role(Role::Picker)),
        })
    }
}
