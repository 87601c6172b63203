//! One configured plugin backed by component instances, each in its own `Store`.
//!
//! A stateful plugin (the prefix index) has one instance and its calls are serialised by a
//! mutex. A plugin whose manifest says `stateless` is served from a small pool of instances
//! (one per core), so concurrent requests do not queue on one lock. Every call runs under
//! the sandbox: a memory cap enforced by a resource limiter (growth past it is refused: the
//! guest's allocation fails, and a guest that cannot cope aborts) and a wall-clock deadline
//! counted in epoch ticks. A trap — including a blown deadline or an abort — poisons the instance:
//! it is dropped, the error is returned as a value, and the next call rebuilds a fresh
//! instance (configured again and told the last pool), so the host keeps serving.
//!
//! Calls pass only what the manifest asks for: the request's model, prompt and headers are
//! `none` unless declared, hooks not declared are never called, and the columns arrive
//! gathered in the manifest's order by the profile.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use epp_core::{
    CallInput, Completion, EndpointInfo, FailurePolicy, FilterPlugin, Manifest, Needs, Outcome, PickerPlugin,
    PluginCore, PluginError, PluginHandle, ProducerPlugin, Role, ScorerPlugin,
};
use tracing::warn;
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

use super::bindings::{filter, picker, producer, scorer, types as wit};
use super::sandbox::{HostState, Sandbox, arm};

enum Exports {
    Producer(producer::ProducerPlugin),
    Filter(filter::FilterPlugin),
    Scorer(scorer::ScorerPlugin),
    Picker(picker::PickerPlugin),
}

/// Calls the `plugin` or `hooks` interface of whatever role `$exports` is.
macro_rules! on_any {
    ($exports:expr, $x:ident => $call:expr) => {
        match $exports {
            Exports::Producer($x) => $call,
            Exports::Filter($x) => $call,
            Exports::Scorer($x) => $call,
            Exports::Picker($x) => $call,
        }
    };
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
    type_name: String,
    role: Role,
    engine: Engine,
    pre: Pre,
    params_json: String,
    sandbox: Sandbox,
    policy: FailurePolicy,
    manifest: Manifest,
    /// One instance for a stateful plugin, one per core for a stateless one; each built on
    /// first use and rebuilt after a failure.
    slots: Vec<Mutex<Option<Live>>>,
    next_slot: AtomicUsize,
    breaker: Mutex<Breaker>,
    /// Set while the breaker is open, so a healthy plugin's call skips its lock and clock.
    breaker_open: AtomicBool,
    /// The last pool told to the plugin, replayed into a rebuilt instance.
    pool: Mutex<Option<Arc<Pool>>>,
}

/// A pool generation and its endpoints.
type Pool = (u64, Vec<EndpointInfo>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere while holding it; the state itself (an
    // optional instance, counters) is still coherent, and a bad instance is rebuilt anyway.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WasmPlugin {
    /// Prepares the component and builds (and configures) the first instance, so a bad
    /// plugin is rejected at load rather than on the first request.
    #[allow(clippy::too_many_arguments)] // reason: one call site, each argument distinct
    pub(super) fn new(
        name: String,
        type_name: String,
        role: Role,
        engine: &Engine,
        linker: &Linker<HostState>,
        component: &Component,
        params_json: String,
        sandbox: Sandbox,
        policy: FailurePolicy,
    ) -> Result<Self, PluginError> {
        let link_err = |e: wasmtime::Error| PluginError::Instantiate(format!("{e:#}"));
        let pre = linker.instantiate_pre(component).map_err(link_err)?;
        let pre = match role {
            Role::Producer => Pre::Producer(producer::ProducerPluginPre::new(pre).map_err(link_err)?),
            Role::Filter => Pre::Filter(filter::FilterPluginPre::new(pre).map_err(link_err)?),
            Role::Scorer => Pre::Scorer(scorer::ScorerPluginPre::new(pre).map_err(link_err)?),
            Role::Picker => Pre::Picker(picker::PickerPluginPre::new(pre).map_err(link_err)?),
        };
        let mut plugin = WasmPlugin {
            name,
            type_name,
            role,
            engine: engine.clone(),
            pre,
            params_json,
            sandbox,
            policy,
            manifest: Manifest::default(),
            slots: vec![Mutex::new(None)],
            next_slot: AtomicUsize::new(0),
            breaker: Mutex::default(),
            breaker_open: AtomicBool::new(false),
            pool: Mutex::new(None),
        };
        let (first, manifest) = plugin.instantiate(None)?;
        if manifest.stateless {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
            plugin.slots = (0..cores).map(|_| Mutex::new(None)).collect();
        }
        plugin.manifest = manifest;
        *lock(&plugin.slots[0]) = Some(first);
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

    /// Builds a fresh instance: instantiate, `configure` (whose manifest is returned), and
    /// replay the last pool.
    fn instantiate(&self, pool: Option<&Pool>) -> Result<(Live, Manifest), PluginError> {
        let mut store = self.sandbox.store(&self.engine);
        let setup = self.sandbox.setup_timeout_ms;
        arm(&mut store, setup);
        let exports = match &self.pre {
            Pre::Producer(p) => p.instantiate(&mut store).map(Exports::Producer),
            Pre::Filter(p) => p.instantiate(&mut store).map(Exports::Filter),
            Pre::Scorer(p) => p.instantiate(&mut store).map(Exports::Scorer),
            Pre::Picker(p) => p.instantiate(&mut store).map(Exports::Picker),
        };
        let exports = exports.map_err(|e| match self.sandbox.classify(e, &store, setup) {
            PluginError::Trap(m) => PluginError::Instantiate(m),
            other => other,
        })?;
        let configured =
            on_any!(&exports, x => x.llmd_scheduler_plugin().call_configure(&mut store, &self.params_json));
        let manifest =
            configured.map_err(|e| self.sandbox.classify(e, &store, setup))?.map_err(PluginError::Configure)?;
        let manifest = manifest_of(manifest);
        let mut live = Live { store, exports };
        if let Some((generation, endpoints)) = pool
            && manifest.needs.pool
        {
            arm(&mut live.store, setup);
            let told = pool_changed(&mut live, *generation, endpoints);
            told.map_err(|e| self.sandbox.classify(e, &live.store, setup))?;
        }
        Ok((live, manifest))
    }

    /// Runs `f` on an instance (building one if needed) under the call deadline. On any
    /// error the instance is dropped, to be rebuilt by the next call.
    fn call<R>(&self, f: impl FnOnce(&mut Live) -> wasmtime::Result<R>) -> Result<R, PluginError> {
        if self.breaker_open.load(Ordering::Acquire) {
            let mut breaker = lock(&self.breaker);
            match breaker.open_for(Instant::now()) {
                Some(remaining) => return Err(PluginError::Disabled(remaining.as_millis() as u64)),
                None => self.breaker_open.store(false, Ordering::Release),
            }
        }
        let mut slot = self.slot();
        let mut live = match slot.take() {
            Some(live) => live,
            None => {
                let pool = lock(&self.pool).clone();
                match self.instantiate(pool.as_deref()) {
                    Ok((live, _)) => live,
                    Err(e) => {
                        self.trip();
                        return Err(e);
                    }
                }
            }
        };
        let timeout = self.sandbox.call_timeout_ms;
        arm(&mut live.store, timeout);
        match f(&mut live) {
            Ok(r) => {
                *slot = Some(live);
                Ok(r)
            }
            Err(e) => {
                let err = self.sandbox.classify(e, &live.store, timeout);
                warn!(plugin = %self.name, error = %err, "plugin call failed; its instance will be rebuilt");
                self.trip();
                Err(err)
            }
        }
    }

    /// The instance to call: the only one of a stateful plugin; for a stateless one the
    /// first free one of the pool, or (all busy) the next in turn.
    fn slot(&self) -> MutexGuard<'_, Option<Live>> {
        if self.slots.len() == 1 {
            return lock(&self.slots[0]);
        }
        let start = self.next_slot.fetch_add(1, Ordering::Relaxed);
        for k in 0..self.slots.len() {
            if let Ok(guard) = self.slots[(start + k) % self.slots.len()].try_lock() {
                return guard;
            }
        }
        lock(&self.slots[start % self.slots.len()])
    }

    fn trip(&self) {
        if !self.sandbox.breaker {
            return;
        }
        let mut breaker = lock(&self.breaker);
        if breaker.failed(Instant::now()) {
            self.breaker_open.store(true, Ordering::Release);
            drop(breaker);
            warn!(
                plugin = %self.name,
                failures = BREAKER_FAILURES + 1,
                window_s = BREAKER_WINDOW.as_secs(),
                cooldown_s = BREAKER_COOLDOWN.as_secs(),
                "circuit breaker opened: plugin taken out after repeated failures"
            );
        }
    }

    /// A call's view of the cycle: only what the manifest asks for.
    fn lower<R>(&self, input: &CallInput<'_>, f: impl FnOnce(wit::Cycle<'_>) -> R) -> R {
        let needs = self.manifest.needs;
        let r = input.request;
        let headers: Vec<(&str, &str)> =
            if needs.headers { r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect() } else { Vec::new() };
        let cycle = wit::Cycle {
            id: input.cycle,
            now_ms: r.now_ms,
            request: wit::Request {
                model: needs.model.then_some(r.model.as_str()),
                cache_salt: if needs.model { r.cache_salt.as_deref() } else { None },
                prompt: needs.prompt.then_some(r.prompt.as_bytes()),
                headers: needs.headers.then_some(headers.as_slice()),
                prompt_tokens: r.prompt_tokens,
                max_tokens: r.max_tokens,
                streamed: r.stream,
                priority: r.priority,
                random_seed: r.random_seed,
            },
            ids: input.ids,
            columns: input.columns,
        };
        f(cycle)
    }
}

fn manifest_of(m: wit::Manifest) -> Manifest {
    let n = m.needs;
    Manifest {
        needs: Needs {
            model: n.model,
            prompt: n.prompt,
            headers: n.headers,
            pool: n.pool,
            decided: n.decided,
            first_chunk: n.first_chunk,
            finished: n.finished,
        },
        reads: m.reads,
        writes: m.writes,
        stateless: m.stateless,
    }
}

fn pool_changed(live: &mut Live, generation: u64, endpoints: &[EndpointInfo]) -> wasmtime::Result<()> {
    let labels: Vec<Vec<(&str, &str)>> =
        endpoints.iter().map(|e| e.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()).collect();
    let running: Vec<Vec<&str>> =
        endpoints.iter().map(|e| e.running_adapters.iter().map(String::as_str).collect()).collect();
    let waiting: Vec<Vec<&str>> =
        endpoints.iter().map(|e| e.waiting_adapters.iter().map(String::as_str).collect()).collect();
    let eps: Vec<wit::EndpointInfo<'_>> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| wit::EndpointInfo {
            id: e.id,
            name: &e.name,
            namespace: &e.namespace,
            address: &e.address,
            port: e.port,
            labels: &labels[i],
            max_lora: e.max_lora,
            running_adapters: &running[i],
            waiting_adapters: &waiting[i],
            cache: e.cache.map(|c| wit::CacheInfo { block_size: c.block_size, num_gpu_blocks: c.num_gpu_blocks }),
        })
        .collect();
    let store = &mut live.store;
    on_any!(&live.exports, x => x.llmd_scheduler_plugin().call_pool_changed(&mut *store, generation, &eps))
}

impl PluginCore for WasmPlugin {
    fn name(&self) -> &str {
        &self.name
    }

    fn type_name(&self) -> &str {
        &self.type_name
    }

    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.policy
    }

    fn pool_changed(&self, generation: u64, endpoints: &[EndpointInfo]) -> Result<(), PluginError> {
        *lock(&self.pool) = Some(Arc::new((generation, endpoints.to_vec())));
        if !self.manifest.needs.pool {
            return Ok(());
        }
        // Every live instance learns the pool; instances built later get it replayed. One
        // that fails is dropped (rebuilt with the pool on its next call) and the others are
        // still told: the first error is returned once all were.
        let mut first_error = None;
        for slot in &self.slots {
            let mut guard = lock(slot);
            let Some(mut live) = guard.take() else { continue };
            arm(&mut live.store, self.sandbox.call_timeout_ms);
            match pool_changed(&mut live, generation, endpoints) {
                Ok(()) => *guard = Some(live),
                Err(e) => {
                    let err = self.sandbox.classify(e, &live.store, self.sandbox.call_timeout_ms);
                    self.trip();
                    first_error.get_or_insert(err);
                }
            }
        }
        if let Some(err) = first_error {
            return Err(err);
        }
        Ok(())
    }

    fn decided(&self, cycle: u64, endpoint: u32) -> Result<Vec<(String, String)>, PluginError> {
        if !self.manifest.needs.decided {
            return Ok(Vec::new());
        }
        self.call(
            |live| on_any!(&live.exports, x => x.llmd_scheduler_hooks().call_decided(&mut live.store, cycle, endpoint)),
        )
    }

    fn first_chunk(&self, cycle: u64, endpoint: u32, now_ms: u64) -> Result<(), PluginError> {
        if !self.manifest.needs.first_chunk {
            return Ok(());
        }
        self.call(|live| {
            on_any!(&live.exports, x => x.llmd_scheduler_hooks().call_first_chunk(&mut live.store, cycle, endpoint, now_ms))
        })
    }

    fn finished(&self, cycle: u64, completion: &Completion) -> Result<(), PluginError> {
        if !self.manifest.needs.finished {
            return Ok(());
        }
        let c = wit::Completion {
            endpoint: completion.endpoint,
            outcome: match completion.outcome {
                Outcome::Completed => wit::Outcome::Completed,
                Outcome::Cancelled => wit::Outcome::Cancelled,
                Outcome::Failed => wit::Outcome::Failed,
            },
            status: completion.status,
            usage: completion.usage.map(|u| wit::Usage {
                prompt_tokens: u.prompt_tokens,
                cached_tokens: u.cached_tokens,
                completion_tokens: u.completion_tokens,
            }),
        };
        self.call(|live| on_any!(&live.exports, x => x.llmd_scheduler_hooks().call_finished(&mut live.store, cycle, c)))
    }
}

fn wrong_role(expected: Role) -> wasmtime::Error {
    wasmtime::Error::msg(format!("instance does not export the {expected} role"))
}

impl ProducerPlugin for WasmPlugin {
    fn produce(&self, input: &CallInput<'_>) -> Result<Vec<f32>, PluginError> {
        self.lower(input, |cycle| {
            self.call(|live| match &live.exports {
                Exports::Producer(x) => x.llmd_scheduler_producer().call_produce(&mut live.store, cycle),
                _ => Err(wrong_role(Role::Producer)),
            })
        })
    }
}

impl FilterPlugin for WasmPlugin {
    fn filter(&self, input: &CallInput<'_>) -> Result<Vec<u32>, PluginError> {
        self.lower(input, |cycle| {
            self.call(|live| match &live.exports {
                Exports::Filter(x) => x.llmd_scheduler_filter().call_filter(&mut live.store, cycle),
                _ => Err(wrong_role(Role::Filter)),
            })
        })
    }
}

impl ScorerPlugin for WasmPlugin {
    fn score(&self, input: &CallInput<'_>) -> Result<Vec<f32>, PluginError> {
        self.lower(input, |cycle| {
            self.call(|live| match &live.exports {
                Exports::Scorer(x) => x.llmd_scheduler_scorer().call_score(&mut live.store, cycle),
                _ => Err(wrong_role(Role::Scorer)),
            })
        })
    }
}

impl PickerPlugin for WasmPlugin {
    fn pick(&self, input: &CallInput<'_>, scores: &[f32]) -> Result<Vec<u32>, PluginError> {
        self.lower(input, |cycle| {
            self.call(|live| match &live.exports {
                Exports::Picker(x) => x.llmd_scheduler_picker().call_pick(&mut live.store, cycle, scores),
                _ => Err(wrong_role(Role::Picker)),
            })
        })
    }
}
