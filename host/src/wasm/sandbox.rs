//! The sandbox every plugin instance runs in: the limits (`Sandbox`), the store data (a WASI
//! context with no capabilities, and the memory cap), the epoch tick deadlines count in, and
//! how a wasmtime failure becomes the scheduler's `PluginError`. Shared by the runtime
//! (which creates stores) and the instances (which call into them).

use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use epp_core::PluginError;

/// The epoch tick; deadlines are expressed in ticks. Coarse on purpose: the ticker thread
/// wakes once a tick for the life of the process, and on a virtual machine each wake-up
/// costs tens of microseconds; a deadline needs no finer grain than this.
pub(super) const TICK: Duration = Duration::from_millis(5);

/// Per-plugin resource limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sandbox {
    /// Linear memory cap, in bytes.
    pub memory_bytes: usize,
    /// Wall-clock limit of one call, in milliseconds.
    pub call_timeout_ms: u64,
    /// Limit for instantiation plus `configure`, in milliseconds.
    pub setup_timeout_ms: u64,
    /// Whether a plugin that keeps failing is taken out for a while (a wall-clock
    /// breaker). `epp replay` turns it off: its runs must not depend on the machine's speed.
    pub breaker: bool,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox { memory_bytes: 256 << 20, call_timeout_ms: 50, setup_timeout_ms: 2_000, breaker: true }
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
        // Refused, not trapped: the guest's `memory.grow` returns -1 and the guest may cope
        // (the prefix index then holds less instead of losing everything). A guest that
        // aborts instead fails its call, reported as over its memory limit.
        if desired > self.max_bytes {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

impl Sandbox {
    /// A fresh store under this sandbox's memory cap.
    pub(super) fn store(&self, engine: &wasmtime::Engine) -> Store<HostState> {
        let state = HostState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limiter: MemoryCap { max_bytes: self.memory_bytes, exceeded: false },
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limiter);
        store
    }

    /// Turns a wasmtime error from a call that had `timeout_ms` into the scheduler's kind.
    pub(super) fn classify(&self, e: wasmtime::Error, store: &Store<HostState>, timeout_ms: u64) -> PluginError {
        if store.data().limiter.exceeded {
            return PluginError::MemoryLimit(self.memory_bytes);
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return PluginError::Timeout(timeout_ms);
        }
        // The first line names the trap; the wasm backtrace after it is noise in logs.
        let text = format!("{e:#}");
        PluginError::Trap(text.lines().next().unwrap_or("trap").trim_end_matches(':').to_string())
    }
}

/// Readies `store` for a call of at most `ms` milliseconds: its deadline, and no memory
/// refusal remembered from an earlier call (the guest may have coped with it).
pub(super) fn arm(store: &mut Store<HostState>, ms: u64) {
    store.data_mut().limiter.exceeded = false;
    store.set_epoch_deadline(ticks(ms));
}

/// A deadline of `ms` milliseconds, in epoch ticks: never earlier than `ms` (the current
/// tick may be about to end), at most one tick later.
pub(super) fn ticks(ms: u64) -> u64 {
    ms.div_ceil(TICK.as_millis().max(1) as u64) + 1
}
