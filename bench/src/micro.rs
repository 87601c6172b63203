//! Part 1, the micro benchmark: the cost of one full scheduling decision of the optimized
//! baseline (producer, four scorers, picker and every plugin's `pre-request` hook) as
//! embedded wasm components and as the natively compiled twin, over pools of several sizes
//! and prompts of several lengths; the cost of each plugin call inside those decisions; and
//! the cost of parsing a request body.
//!
//! The wasm and native profiles are measured side by side: short batches alternate between
//! them, so drift on a noisy machine hits both alike and their ratio stays meaningful. Both
//! see identical inputs and evolve identical state, so their decisions are also compared.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use epp::config::PickerConfig;
use epp::request::{ApiKind, parse};
use epp::scheduler::native::NativePlugin;
use epp::scheduler::{FailurePolicy, PluginCore, PluginHandle, Role, SchedulerProfile, ScorerPlugin};
use epp::wasm::{Sandbox, WasmRuntime, embedded};
use llmd_plugin_sdk::{Column, Metrics, Request};

use crate::latency::{Latency, Summary};
use crate::native::{NativeError, native_profile};
use crate::workload;

/// Requests cycled through in one cell; they share `SHARED_PROMPTS` system prompts.
const RING: usize = 64;
const SHARED_PROMPTS: usize = 8;
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

/// The part of a decision outside the timed plugin calls: the `pre-request` hooks of every
/// plugin, copying the candidates, summing the weighted scores.
pub const HOOKS_AND_GLUE: &str = "pre-request hooks + profile glue";

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
}

/// What one build's decisions in one cell recorded.
#[derive(Default)]
struct Recorder {
    decision: Latency,
    /// Keyed by call order then name, so tables list plugins as the cycle calls them.
    plugins: BTreeMap<(usize, String), (Role, Latency)>,
    glue: Latency,
}

impl Recorder {
    fn run(&mut self, profile: &SchedulerProfile, req: &Request, metrics: &Metrics) -> Result<Vec<u32>, String> {
        let started = Instant::now();
        let decision = profile.schedule(req, metrics).map_err(|e| e.to_string())?;
        let elapsed = started.elapsed();
        self.decision.record(elapsed);
        let mut in_plugins = Duration::ZERO;
        for (i, t) in decision.timings.iter().enumerate() {
            in_plugins += t.elapsed;
            self.plugins.entry((i, t.plugin.clone())).or_insert_with(|| (t.role, Latency::new())).1.record(t.elapsed);
        }
        self.glue.record(elapsed.saturating_sub(in_plugins));
        Ok(decision.targets)
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
    Ok(results)
}

fn run_cell(
    runtime: &WasmRuntime,
    config: &PickerConfig,
    opts: &MicroOptions,
    n: usize,
    bytes: usize,
) -> Result<(Cell, Vec<PluginCost>), MicroError> {
    // Fresh profiles per cell, so the prefix index holds only this cell's prompts.
    let wasm = epp::loader::build_profile(runtime, config).map_err(|e| MicroError::Build(e.to_string()))?;
    let native = native_profile(config)?;
    let pool = workload::pool(n);
    wasm.pool_changed(1, &pool);
    native.pool_changed(1, &pool);
    let requests = workload::scheduler_requests(RING, bytes, SHARED_PROMPTS);
    let metrics = workload::busy_metrics(n);
    let fail = |build: &'static str| move |error: String| MicroError::Schedule { build, endpoints: n, error };

    // Warm-up pass: fills the prefix index and the caches, and checks the builds agree.
    let mut scratch = Recorder::default();
    let mut decisions_agree = true;
    for req in &requests {
        let a = scratch.run(&wasm, req, &metrics).map_err(fail("wasm"))?;
        let b = scratch.run(&native, req, &metrics).map_err(fail("native"))?;
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
        for is_wasm in order {
            for i in 0..BATCH {
                let req = &requests[(k + i) % RING];
                if is_wasm {
                    w.run(&wasm, req, &metrics).map_err(fail("wasm"))?;
                } else {
                    nat.run(&native, req, &metrics).map_err(fail("native"))?;
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
/// almost nothing else, so its wasm time is nearly all crossing cost.
const TRIVIAL_SCORER: &str = "kv-cache-utilization-scorer";

/// One trivial-scorer call per input shape, growing one input at a time, plus a bare
/// `pre-request` hook: where the fixed cost of a component call goes.
fn call_costs(runtime: &WasmRuntime, opts: &MicroOptions) -> Result<Vec<CallCost>, MicroError> {
    let bytes =
        embedded::find(TRIVIAL_SCORER).ok_or_else(|| MicroError::Build(format!("{TRIVIAL_SCORER} is not embedded")))?;
    let wasm = match runtime.load(TRIVIAL_SCORER, bytes, "{}", Sandbox::default(), FailurePolicy::FailOpen) {
        Ok(PluginHandle::Scorer(s)) => s,
        Ok(other) => return Err(MicroError::Build(format!("{TRIVIAL_SCORER} loaded as {other:?}"))),
        Err(e) => return Err(MicroError::Build(e.to_string())),
    };
    let native: std::sync::Arc<dyn ScorerPlugin> = std::sync::Arc::new(
        NativePlugin::<kv_cache_utilization_scorer::KvCacheUtilizationScorer>::new(TRIVIAL_SCORER, "{}")
            .map_err(|e| MicroError::Build(e.to_string()))?,
    );
    let columns = |n: usize| -> Vec<Column> {
        ["prefix-cache/matched-blocks", "prefix-cache/total-blocks", "prefix-cache/indexed-blocks"]
            .iter()
            .map(|name| Column { name: (*name).into(), values: vec![1.0; n] })
            .collect()
    };
    let request = |prompt_bytes: usize| Request {
        id: "req-0".into(),
        model: workload::MODEL.into(),
        prompt: workload::text(1, prompt_bytes).into_bytes(),
        ..Default::default()
    };
    let shapes: Vec<(String, Request, Metrics, Vec<Column>)> = vec![
        ("1 endpoint, empty prompt, no columns".into(), request(0), workload::busy_metrics(1), vec![]),
        ("100 endpoints, empty prompt, no columns".into(), request(0), workload::busy_metrics(100), vec![]),
        ("100 endpoints, empty prompt, 3 columns".into(), request(0), workload::busy_metrics(100), columns(100)),
        ("100 endpoints, 16 KB prompt, 3 columns".into(), request(16 << 10), workload::busy_metrics(100), columns(100)),
        (
            "100 endpoints, 200 KB prompt, 3 columns".into(),
            request(200 << 10),
            workload::busy_metrics(100),
            columns(100),
        ),
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
        let hook = |p: &dyn PluginCore| p.pre_request("req-0", &[0]).is_ok();
        let w = time(&|| hook(wasm.as_ref()))?;
        let n = time(&|| hook(native.as_ref()))?;
        out.push(CallCost { call: "pre-request hook (id + 1 target)".into(), wasm: w.summary(), native: n.summary() });
    }
    for (name, req, metrics, cols) in &shapes {
        let w = time(&|| wasm.score(req, metrics, cols).is_ok())?;
        let n = time(&|| native.score(req, metrics, cols).is_ok())?;
        out.push(CallCost { call: format!("score: {name}"), wasm: w.summary(), native: n.summary() });
    }
    Ok(out)
}
