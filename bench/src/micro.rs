//! Part 1, the micro benchmark: the cost of one full decision (`epp_core`'s
//! `Scheduler::decide`: admission, the profile's producers, filters, scorers and picker, and
//! the `decided` hooks the plugins ask for) of the default profile as embedded wasm
//! components and as the natively compiled twin, over pools of several sizes and prompts
//! of several lengths; the cost of each plugin call inside those decisions; what a
//! component call costs by input shape; and the cost of parsing a request body.
//!
//! The wasm and native profiles are measured side by side: short batches alternate between
//! them, so drift on a noisy machine hits both alike and their ratio stays meaningful. Both
//! see identical inputs and evolve identical state, so their decisions are also compared.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use epp::config::PickerConfig;
use epp::request::{ApiKind, parse};
use epp::wasm::{Sandbox, WasmRuntime, embedded};
use epp_core::native::NativePlugin;
use epp_core::{
    CallInput, Candidates, FailurePolicy, PluginCore, PluginHandle, Request, Role, Scheduler, ScorerPlugin,
};

use crate::latency::{Latency, Summary};
use crate::native::{NativeError, native_scheduler};
use crate::workload;

/// Requests cycled through in one cell; they share `SHARED_PROMPTS` system prompts.
/// Besides them, one request in `FRESH_EVERY` starts a new conversation (a prompt never
/// seen): a warm request's pick is settled by the affinity filter (one sticky candidate, the
/// stateless scorers and picker skipped), a new one is open (every candidate scored), and
/// a decision's cost is measured over that mix.
const RING: usize = 64;
const SHARED_PROMPTS: usize = 8;
const FRESH_EVERY: usize = 4;
/// Decisions per build before switching to the other build.
const BATCH: usize = 16;

#[derive(Clone, Debug)]
pub struct MicroOptions {
    pub endpoints: Vec<usize>,
    pub prompt_bytes: Vec<usize>,
    /// Wall time for one cell (both builds together).
    pub cell_budget: Duration,
    /// Decisions per build at least and at most in one cell.
    pub min_samples: usize,
    pub max_samples: usize,
    /// Wall time for parsing bodies of one size.
    pub parse_budget: Duration,
}

impl MicroOptions {
    pub fn full() -> MicroOptions {
        MicroOptions {
            endpoints: vec![8, 100, 512],
            prompt_bytes: vec![1024, 16 * 1024, 200 * 1024],
            cell_budget: Duration::from_secs(2),
            min_samples: 200,
            max_samples: 50_000,
            parse_budget: Duration::from_millis(700),
        }
    }

    /// A few decisions per cell: proves the harness works, measures nothing worth reading.
    pub fn smoke() -> MicroOptions {
        MicroOptions {
            cell_budget: Duration::from_millis(20),
            min_samples: BATCH,
            max_samples: 2 * BATCH,
            parse_budget: Duration::from_millis(10),
            ..MicroOptions::full()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MicroError {
    #[error("the wasm runtime: {0}")]
    Runtime(String),
    #[error("the default config: {0}")]
    Config(String),
    #[error("building the wasm profile: {0}")]
    Build(String),
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error("a scheduling decision failed ({build}, {endpoints} endpoints): {error}")]
    Schedule { build: &'static str, endpoints: usize, error: String },
    #[error("parsing a {0}-byte body failed: {1}")]
    Parse(usize, String),
    #[error("precise prefix costs: {0}")]
    Precise(String),
}

/// One (pool size, prompt size) cell: the whole decision in both builds.
#[derive(Clone, Debug)]
pub struct Cell {
    pub endpoints: usize,
    pub prompt_bytes: usize,
    pub wasm: Summary,
    pub native: Summary,
    /// Whether both builds chose the same targets for every request of the warm-up pass.
    pub decisions_agree: bool,
}

/// One plugin's calls within the decisions of one cell.
#[derive(Clone, Debug)]
pub struct PluginCost {
    pub endpoints: usize,
    pub prompt_bytes: usize,
    /// The plugin name, or `HOOKS_AND_GLUE` for the rest of the decision.
    pub plugin: String,
    pub role: Option<Role>,
    pub wasm: Summary,
    pub native: Summary,
}

/// The part of a decision outside the timed plugin calls: admission, the `decided` hooks of
/// the plugins that ask for them, building the column table, summing the weighted scores.
pub const HOOKS_AND_GLUE: &str = "decided hooks + admission and profile glue";

#[derive(Clone, Debug)]
pub struct ParseCost {
    pub body_bytes: usize,
    pub summary: Summary,
}

/// One call of a trivial scorer with a given input shape: what crossing the component
/// boundary costs apart from the plugin's own work.
#[derive(Clone, Debug)]
pub struct CallCost {
    pub call: String,
    pub wasm: Summary,
    pub native: Summary,
}

#[derive(Clone, Debug, Default)]
pub struct MicroResults {
    pub cells: Vec<Cell>,
    pub plugins: Vec<PluginCost>,
    pub calls: Vec<CallCost>,
    pub parse: Vec<ParseCost>,
    /// Precise prefix routing: tokenization, index lookup and memory.
    pub precise: Option<crate::precise::PreciseCosts>,
}

/// What one build's decisions in one cell recorded.
#[derive(Default)]
struct Recorder {
    decision: Latency,
    /// Keyed by profile position then name, so tables list plugins as the cycle calls them
    /// (a settled pick skips some; the others keep their place).
    plugins: BTreeMap<(usize, String), (Role, Latency)>,
    glue: Latency,
}

impl Recorder {
    fn run(
        &mut self,
        scheduler: &Scheduler,
        cycle: u64,
        req: &Request,
        candidates: &Candidates,
    ) -> Result<Vec<u32>, String> {
        let candidates = candidates.clone();
        let started = Instant::now();
        let decision = scheduler.decide(cycle, req, candidates).map_err(|e| e.to_string())?;
        let elapsed = started.elapsed();
        self.decision.record(elapsed);
        let plugins = scheduler.primary().plugins();
        let mut in_plugins = Duration::ZERO;
        for t in &decision.result.timings {
            in_plugins += t.elapsed;
            let Some(p) = plugins.get(t.plugin) else { continue };
            let key = (t.plugin, p.core().name().to_string());
            self.plugins.entry(key).or_insert_with(|| (p.role(), Latency::new())).1.record(t.elapsed);
        }
        self.glue.record(elapsed.saturating_sub(in_plugins));
        // A finished request releases what it holds (the in-flight load) as live traffic does.
        let done = epp_core::Completion { endpoint: decision.primary(), status: 200, ..Default::default() };
        scheduler.finished(&[decision.variant], cycle, &done);
        Ok(decision.result.targets)
    }
}

/// Runs the whole micro benchmark; `progress` hears one line per finished step.
pub fn run(opts: &MicroOptions, progress: &mut dyn FnMut(String)) -> Result<MicroResults, MicroError> {
    let runtime = WasmRuntime::new().map_err(|e| MicroError::Runtime(e.to_string()))?;
    let config = PickerConfig::default_config().map_err(|e| MicroError::Config(e.to_string()))?;
    let mut results = MicroResults::default();
    for &n in &opts.endpoints {
        for &bytes in &opts.prompt_bytes {
            let (cell, plugins) = run_cell(&runtime, &config, opts, n, bytes)?;
            progress(format!(
                "micro: {n} endpoints, {} prompt: wasm p50 {} / native p50 {} ({} samples)",
                crate::report::fmt_bytes(bytes),
                crate::latency::fmt_duration(cell.wasm.p50),
                crate::latency::fmt_duration(cell.native.p50),
                cell.wasm.count
            ));
            results.cells.push(cell);
            results.plugins.extend(plugins);
        }
    }
    results.calls = call_costs(&runtime, opts)?;
    progress(format!("micro: call overhead, {} input shapes", results.calls.len()));
    for &bytes in &opts.prompt_bytes {
        let cost = parse_cost(bytes, opts)?;
        progress(format!(
            "micro: parse {} body: p50 {}",
            crate::report::fmt_bytes(cost.body_bytes),
            crate::latency::fmt_duration(cost.summary.p50)
        ));
        results.parse.push(cost);
    }
    let precise = crate::precise::run(&opts.prompt_bytes, opts.parse_budget).map_err(MicroError::Precise)?;
    if let Some(big) = precise.tokenize.iter().max_by_key(|t| t.prompt_bytes) {
        progress(format!(
            "micro: precise: tokenize {} ({}): p50 {}",
            crate::report::fmt_bytes(big.prompt_bytes),
            big.tokenizer,
            crate::latency::fmt_duration(big.summary.p50)
        ));
    }
    results.precise = Some(precise);
    Ok(results)
}

fn run_cell(
    runtime: &WasmRuntime,
    config: &PickerConfig,
    opts: &MicroOptions,
    n: usize,
    bytes: usize,
) -> Result<(Cell, Vec<PluginCost>), MicroError> {
    // Fresh schedulers per cell, so the prefix index holds only this cell's prompts.
    let wasm = epp::loader::build(runtime, config, &Default::default())
        .map_err(|e| MicroError::Build(e.to_string()))?
        .scheduler;
    let native = native_scheduler(config)?;
    let pool = workload::pool(n);
    wasm.pool_changed(1, &pool);
    native.pool_changed(1, &pool);
    let requests = workload::scheduler_requests(RING, bytes, SHARED_PROMPTS);
    let metrics = workload::busy_metrics(n);
    let fail = |build: &'static str| move |error: String| MicroError::Schedule { build, endpoints: n, error };

    // Warm-up pass: fills the prefix index and the caches, and checks the builds agree.
    let mut scratch = Recorder::default();
    let mut decisions_agree = true;
    let mut cycle = 0u64;
    let warm_fresh: Vec<Request> =
        (0..RING / FRESH_EVERY).map(|j| workload::fresh_request(1_000_000 + j as u64, bytes)).collect();
    for req in requests.iter().chain(&warm_fresh) {
        cycle += 1;
        let a = scratch.run(&wasm, cycle, req, &metrics).map_err(fail("wasm"))?;
        let b = scratch.run(&native, cycle, req, &metrics).map_err(fail("native"))?;
        decisions_agree &= a == b;
    }

    let mut w = Recorder::default();
    let mut nat = Recorder::default();
    let started = Instant::now();
    let mut k = 0usize;
    let mut round = 0usize;
    loop {
        let samples = w.decision.count() as usize;
        let spent = started.elapsed() >= opts.cell_budget;
        if samples >= opts.max_samples || (spent && samples >= opts.min_samples) {
            break;
        }
        // Alternate which build goes first, so neither always runs on a warmer cache.
        let order: [bool; 2] = if round.is_multiple_of(2) { [true, false] } else { [false, true] };
        // This round's new conversations, the same for both builds (each has its own index).
        let fresh: Vec<Request> =
            (0..BATCH / FRESH_EVERY).map(|j| workload::fresh_request((round * BATCH + j) as u64, bytes)).collect();
        for is_wasm in order {
            for i in 0..BATCH {
                let req = if i % FRESH_EVERY == FRESH_EVERY - 1 {
                    &fresh[i / FRESH_EVERY]
                } else {
                    &requests[(k + i) % RING]
                };
                cycle += 1;
                if is_wasm {
                    w.run(&wasm, cycle, req, &metrics).map_err(fail("wasm"))?;
                } else {
                    nat.run(&native, cycle, req, &metrics).map_err(fail("native"))?;
                }
            }
        }
        k += BATCH;
        round += 1;
    }

    let cell = Cell {
        endpoints: n,
        prompt_bytes: bytes,
        wasm: w.decision.summary(),
        native: nat.decision.summary(),
        decisions_agree,
    };
    let mut plugins: Vec<PluginCost> = w
        .plugins
        .iter()
        .map(|(key, (role, lat))| PluginCost {
            endpoints: n,
            prompt_bytes: bytes,
            plugin: key.1.clone(),
            role: Some(*role),
            wasm: lat.summary(),
            native: nat.plugins.get(key).map(|(_, l)| l.summary()).unwrap_or_default(),
        })
        .collect();
    plugins.push(PluginCost {
        endpoints: n,
        prompt_bytes: bytes,
        plugin: HOOKS_AND_GLUE.into(),
        role: None,
        wasm: w.glue.summary(),
        native: nat.glue.summary(),
    });
    Ok((cell, plugins))
}

/// Parsing a chat-completions body whose prompt is `prompt_bytes` long.
fn parse_cost(prompt_bytes: usize, opts: &MicroOptions) -> Result<ParseCost, MicroError> {
    let body = workload::chat_body("You are a helpful assistant.", &workload::text(9, prompt_bytes), 64, true);
    let mut lat = Latency::new();
    let started = Instant::now();
    while lat.count() < opts.min_samples as u64 || started.elapsed() < opts.parse_budget {
        let t = Instant::now();
        let parsed = parse(ApiKind::ChatCompletions, body.as_bytes());
        lat.record(t.elapsed());
        let parsed = parsed.map_err(|e| MicroError::Parse(body.len(), e.to_string()))?;
        std::hint::black_box(parsed);
        if lat.count() >= opts.max_samples as u64 {
            break;
        }
    }
    Ok(ParseCost { body_bytes: body.len(), summary: lat.summary() })
}

/// The scorer whose calls measure the boundary: it reads one metrics column and does
/// almost nothing else, so its wasm time is nearly all crossing cost. Its manifest asks for
/// no prompt, so the prompt's size must not change what a call costs.
const TRIVIAL_SCORER: &str = "kv-cache-utilization-scorer";
/// A plugin that asks for the `decided` hook, to time a hook call.
const HOOKED_SCORER: &str = "no-hit-lru-scorer";

/// One trivial-scorer call per input shape, growing one input at a time, plus a bare
/// `decided` hook: where the fixed cost of a component call goes.
fn call_costs(runtime: &WasmRuntime, opts: &MicroOptions) -> Result<Vec<CallCost>, MicroError> {
    let load = |t: &str| -> Result<std::sync::Arc<dyn ScorerPlugin>, MicroError> {
        let bytes = embedded::find(t).ok_or_else(|| MicroError::Build(format!("{t} is not embedded")))?;
        match runtime.load(t, bytes, "{}", Sandbox::default(), FailurePolicy::FailOpen) {
            Ok(PluginHandle::Scorer(s)) => Ok(s),
            Ok(other) => Err(MicroError::Build(format!("{t} loaded as {other:?}"))),
            Err(e) => Err(MicroError::Build(e.to_string())),
        }
    };
    let wasm = load(TRIVIAL_SCORER)?;
    let native: std::sync::Arc<dyn ScorerPlugin> = std::sync::Arc::new(
        NativePlugin::<kv_cache_utilization_scorer::KvCacheUtilizationScorer>::new(TRIVIAL_SCORER, "{}")
            .map_err(|e| MicroError::Build(e.to_string()))?,
    );
    let hooked_wasm = load(HOOKED_SCORER)?;
    let hooked_native: std::sync::Arc<dyn ScorerPlugin> = std::sync::Arc::new(
        NativePlugin::<no_hit_lru_scorer::NoHitLruScorer>::new(HOOKED_SCORER, "{}")
            .map_err(|e| MicroError::Build(e.to_string()))?,
    );
    let request = |prompt_bytes: usize| {
        let prompt = workload::text(1, prompt_bytes);
        Request {
            id: "req-0".into(),
            model: workload::MODEL.into(),
            prompt_tokens: Request::estimate_tokens(prompt.len()),
            prompt,
            stream: true,
            ..Default::default()
        }
    };
    let shapes: Vec<(String, Request, Candidates)> = vec![
        ("1 endpoint, empty prompt".into(), request(0), workload::busy_metrics(1)),
        ("100 endpoints, empty prompt".into(), request(0), workload::busy_metrics(100)),
        ("100 endpoints, 16 KB prompt (not read)".into(), request(16 << 10), workload::busy_metrics(100)),
        ("100 endpoints, 200 KB prompt (not read)".into(), request(200 << 10), workload::busy_metrics(100)),
        ("512 endpoints, 200 KB prompt (not read)".into(), request(200 << 10), workload::busy_metrics(512)),
    ];
    let per_shape = (opts.max_samples / 4).max(opts.min_samples);
    let mut out = Vec::new();
    let time = |f: &dyn Fn() -> bool| -> Result<Latency, MicroError> {
        let mut lat = Latency::new();
        let started = Instant::now();
        while (lat.count() as usize) < per_shape
            && (started.elapsed() < opts.parse_budget || lat.count() < opts.min_samples as u64)
        {
            let t = Instant::now();
            let ok = f();
            lat.record(t.elapsed());
            if !ok {
                return Err(MicroError::Schedule {
                    build: "call",
                    endpoints: 0,
                    error: format!("{TRIVIAL_SCORER} call failed"),
                });
            }
        }
        Ok(lat)
    };
    {
        let hook = |p: &dyn PluginCore| p.decided(1, 0).is_ok();
        let w = time(&|| hook(hooked_wasm.as_ref()))?;
        let n = time(&|| hook(hooked_native.as_ref()))?;
        out.push(CallCost { call: "decided hook (cycle + endpoint)".into(), wasm: w.summary(), native: n.summary() });
    }
    for (name, req, candidates) in &shapes {
        // The one column it reads (kv-usage), gathered as the profile would.
        let cols = candidates.kv_usage.clone();
        let call = |s: &dyn ScorerPlugin| {
            let input = CallInput { cycle: 1, request: req, ids: &candidates.ids, columns: &cols };
            s.score(&input).is_ok()
        };
        let w = time(&|| call(wasm.as_ref()))?;
        let n = time(&|| call(native.as_ref()))?;
        out.push(CallCost { call: format!("score: {name}"), wasm: w.summary(), native: n.summary() });
    }
    Ok(out)
}
