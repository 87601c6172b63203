//! Part 3, routing quality side by side: the same simulated workers (model time, a small KV
//! cache each) behind every router an operator could choose — Envoy + EPP with the default
//! profile, Envoy + EPP with the upstream guide's config (with and without autoTune, to show
//! what it brings), `sglang-router` and `vllm-router` (their default `cache_aware` policy,
//! from PyPI), Envoy + EPP on precise prefix matches (the workers publish their KV-cache
//! events as vLLM does), and Envoy round-robin — on the workloads of `epp replay` (the very same request
//! lists, sent open-loop at their arrival times): shared system prompts, multi-turn chat with
//! growing histories and more conversations than the caches hold, and unique prompts of
//! mixed lengths (pure load balancing) — and then some of them, at the same load per worker,
//! on other pools (16 workers; one slow worker in four) and with whole (non-streamed)
//! responses, with the default profile, the peers and round-robin.
//!
//! Per router and workload it reports the prefix-cache hit rate from the workers' own
//! counters (their ground truth, not what a router believes), TTFT (first streamed chunk;
//! in a non-streamed cell, or with `--no-stream`, the whole response) and latency percentiles, throughput, requests
//! per worker and errors. Every run gets fresh workers and a fresh router, so no router
//! inherits a warm cache. The same workloads are
//! then replayed in virtual time (`epp replay`, with the peers' algorithm modelled) so the
//! two can be compared.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use epp::replay::workload::{self, GenParams, Generator, WorkItem, Workload};
use epp_stack::peers::{Peer, PeerKind};
use epp_stack::{Bootstrap, Envoy, Epp, EppOptions, ReplicaSet, Scratch, Setup, StackError, Workers};
use tokio::task::JoinSet;

use crate::latency::Latency;

/// A cell of the comparison: a replay generator, its size and rate, the pool it runs on, and
/// whether its requests are streamed.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadSpec {
    pub generator: Generator,
    pub requests: usize,
    /// Requests per second over the pool.
    pub rate: f64,
    /// KV blocks per worker (16 tokens each): how much of the working set fits.
    pub num_gpu_blocks: usize,
    /// Simulated workers behind every router.
    pub workers: usize,
    /// How the workers differ (KV blocks, speed); empty: every worker alike.
    pub shape: sim::PoolShape,
    /// Requests ask for streamed responses (TTFT: the first chunk's); false: whole
    /// responses (TTFT: the whole response's).
    pub stream: bool,
    /// A cell beyond the main ones (on another pool than the main four workers, or with
    /// whole responses): only the default profile, the peers and round-robin run there, to
    /// keep the bench short.
    pub extra: bool,
}

/// Workers of the main cells.
const MAIN_WORKERS: usize = 4;

impl WorkloadSpec {
    /// A main cell: four workers alike.
    pub fn new(generator: Generator, requests: usize, rate: f64, num_gpu_blocks: usize) -> WorkloadSpec {
        WorkloadSpec {
            generator,
            requests,
            rate,
            num_gpu_blocks,
            workers: MAIN_WORKERS,
            shape: sim::PoolShape::default(),
            stream: true,
            extra: false,
        }
    }

    /// The same cell with whole (non-streamed) responses.
    fn whole_responses(self) -> WorkloadSpec {
        WorkloadSpec { stream: false, extra: true, ..self }
    }

    /// The same cell on `workers` workers shaped as `shape`, the arrival rate scaled so that
    /// every worker sees the load it sees in the main cell.
    fn on_pool(self, workers: usize, shape: sim::PoolShape) -> WorkloadSpec {
        WorkloadSpec { rate: self.rate * workers as f64 / self.workers as f64, workers, shape, extra: true, ..self }
    }

    /// Whether `router` runs on this cell.
    pub fn runs(&self, router: RouterKind) -> bool {
        router.runs_on(self.generator)
            && (!self.extra || matches!(router, RouterKind::EppDefault | RouterKind::Peer(_) | RouterKind::RoundRobin))
    }

    /// The cell's name in the report: the workload's, and the pool's when it is not the main one.
    pub fn name(&self) -> String {
        let generator = self.generator.name();
        let cell = match (self.workers, self.shape.describe().is_empty()) {
            (MAIN_WORKERS, true) => generator.to_string(),
            (n, true) => format!("{generator}, {n} workers"),
            (_, false) => format!("{generator}, mixed pool"),
        };
        if self.stream { cell } else { format!("{cell}, non-streamed") }
    }
}

#[derive(Clone, Debug)]
pub struct QualityOptions {
    /// Every worker's serving model (the replay's `small` profile).
    pub model: sim::ModelParams,
    pub workloads: Vec<WorkloadSpec>,
    pub routers: Vec<RouterKind>,
    pub seed: u64,
    /// The first requests (this share) warm the caches and are not recorded.
    pub warmup: f64,
    /// An EPP config to run in place of the default profile (`path: endpoints.yaml` in its
    /// discovery is pointed at the bench's workers), to compare it with the peers.
    pub default_config: Option<CustomConfig>,
}

/// An operator's EPP config, run in the default profile's row under its own name.
#[derive(Clone, Debug)]
pub struct CustomConfig {
    /// The file's name, shown as the row's router (`EPP, <name>`).
    pub name: String,
    pub text: String,
}

/// The discovery line of the project's configs that `epp_config` points at the bench's workers.
const ENDPOINTS_LINE: &str = "path: endpoints.yaml";
/// The same line in the upstream guide's config.
const GUIDE_ENDPOINTS_LINE: &str = "path: /etc/epp/endpoints.yaml";

impl CustomConfig {
    /// A config the bench can run: its file discovery must read `endpoints.yaml`.
    pub fn new(name: String, text: String) -> Result<CustomConfig, String> {
        if !text.contains(ENDPOINTS_LINE) {
            return Err(format!(
                "{name}: its file-discovery must read `{ENDPOINTS_LINE}`, which the bench points at its own workers"
            ));
        }
        Ok(CustomConfig { name, text })
    }
}

impl QualityOptions {
    pub fn full() -> QualityOptions {
        let shared = WorkloadSpec::new(Generator::SharedPrefix, 1200, 32.0, 2048);
        // About twice the conversations' working set the four caches hold together.
        let chat = WorkloadSpec::new(Generator::MultiTurn, 1200, 20.0, 1024);
        let unique = WorkloadSpec::new(Generator::Unique, 700, 14.0, 2048);
        // One prompt for every request: it must spread as its traffic grows.
        let one = WorkloadSpec::new(Generator::OnePrompt, 1200, 20.0, 2048);
        // Other pools, as an operator may run: four times the workers (where a new prompt's
        // first placement sets a worker's share of the traffic for long after), and one
        // worker in four at 0.4× speed (another GPU, a throttled one).
        let large = |s: &WorkloadSpec| s.clone().on_pool(16, sim::PoolShape::default());
        let slow = sim::PoolShape { blocks: Vec::new(), speed: vec![1.0, 1.0, 1.0, 0.4] };
        let mixed = |s: &WorkloadSpec| s.clone().on_pool(MAIN_WORKERS, slow.clone());
        let others = [
            large(&shared),
            large(&chat),
            mixed(&shared),
            mixed(&unique),
            // Clients that want the whole answer at once: a first chunk then tells a router
            // nothing of when the prefill ended.
            unique.clone().whole_responses(),
        ];
        QualityOptions {
            model: sim::ModelParams::default(),
            workloads: [shared, chat, unique, one].into_iter().chain(others).collect(),
            routers: RouterKind::ALL.to_vec(),
            seed: 1,
            warmup: 0.15,
            default_config: None,
        }
    }

    /// Keeps the main cells only (a run on the operator's own selection or pool).
    pub fn main_cells_only(&mut self) {
        self.workloads.retain(|w| !w.extra);
    }

    /// Sends whole (non-streamed) responses in every main cell (`--no-stream`; the extra
    /// cells are left out).
    pub fn whole_responses(&mut self) {
        self.main_cells_only();
        for w in &mut self.workloads {
            w.stream = false;
        }
    }

    /// Keeps only the named workloads (their main cells) and routers (all when a list is
    /// empty). A generator of `epp replay` that the full run does not include (bursts,
    /// lora-mix, tenants) is added at 80 % of its default replay rate with 2 048 KV blocks a
    /// worker.
    pub fn select(&mut self, workloads: &[String], routers: &[String]) -> Result<(), String> {
        if !workloads.is_empty() {
            self.main_cells_only();
        }
        for w in workloads {
            if self.workloads.iter().any(|s| s.generator.name() == w) {
                continue;
            }
            let generator: Generator = w.parse()?;
            // On the pool of the cells kept (set by `--workers`, `--worker-*`).
            let pool = self.workloads.first().map(|c| (c.workers, c.shape.clone()));
            let (workers, shape) = pool.unwrap_or((MAIN_WORKERS, sim::PoolShape::default()));
            let rate = 0.8 * generator.default_rate_per_worker() * workers as f64;
            self.workloads.push(WorkloadSpec { workers, shape, ..WorkloadSpec::new(generator, 1200, rate, 2048) });
        }
        for r in routers {
            if !RouterKind::ALL.iter().any(|k| k.key() == r) {
                let known: Vec<&str> = RouterKind::ALL.iter().map(|k| k.key()).collect();
                return Err(format!("unknown router `{r}`; known: {}", known.join(", ")));
            }
        }
        if !workloads.is_empty() {
            self.workloads.retain(|s| workloads.iter().any(|w| w == s.generator.name()));
        }
        if !routers.is_empty() {
            self.routers.retain(|k| routers.iter().any(|r| r == k.key()));
        }
        Ok(())
    }

    /// Runs every router of the main cells in front of `n` workers instead of four (the
    /// cells on other pools are left out); each workload's arrival rate scales with them,
    /// so each worker's share stays the same.
    pub fn set_workers(&mut self, n: usize) -> Result<(), String> {
        if n == 0 || n > 64 {
            return Err(format!("--workers must be 1..=64, got {n}"));
        }
        self.main_cells_only();
        for w in &mut self.workloads {
            w.rate *= n as f64 / w.workers as f64;
            w.workers = n;
        }
        Ok(())
    }

    /// Runs the main cells on a mixed pool (the cells on other pools are left out).
    pub fn set_shape(&mut self, shape: &sim::PoolShape) -> Result<(), String> {
        shape.validate()?;
        self.main_cells_only();
        for w in &mut self.workloads {
            w.shape = shape.clone();
        }
        Ok(())
    }

    /// Overrides the size, rate or KV blocks of every main cell (to try the comparison on
    /// shapes the full run does not show; the cells on other pools are left out).
    pub fn reshape(&mut self, requests: Option<usize>, rate: Option<f64>, num_gpu_blocks: Option<usize>) {
        if requests.is_none() && rate.is_none() && num_gpu_blocks.is_none() {
            return;
        }
        self.main_cells_only();
        for w in &mut self.workloads {
            w.requests = requests.unwrap_or(w.requests);
            w.rate = rate.unwrap_or(w.rate);
            w.num_gpu_blocks = num_gpu_blocks.unwrap_or(w.num_gpu_blocks);
        }
    }

    pub fn smoke() -> QualityOptions {
        let mut o = QualityOptions::full();
        for w in &mut o.workloads {
            w.requests = 60;
        }
        o
    }
}

/// A router in the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterKind {
    /// Envoy + EPP, default config.
    EppDefault,
    /// Envoy + EPP, the upstream guide's config unchanged (autoTune on, as upstream).
    EppGuide,
    /// The guide's config with autoTune off: the prefix index sized as before it existed.
    EppGuideNoAutoTune,
    /// Envoy + EPP on `config/precise.yaml`: the workers publish their KV-cache events.
    EppPrecise,
    /// Envoy (`config/envoy-replicas.yaml`) + two EPPs with the default profile, sharing
    /// routing state through a real redis-server (`shared`) or each on its own.
    EppReplicas {
        shared: bool,
    },
    Peer(PeerKind),
    /// Envoy round-robin, no EPP.
    RoundRobin,
}

impl RouterKind {
    pub const ALL: [RouterKind; 9] = [
        RouterKind::EppDefault,
        RouterKind::EppPrecise,
        RouterKind::EppReplicas { shared: true },
        RouterKind::EppReplicas { shared: false },
        RouterKind::EppGuide,
        RouterKind::EppGuideNoAutoTune,
        RouterKind::Peer(PeerKind::Sglang),
        RouterKind::Peer(PeerKind::Vllm),
        RouterKind::RoundRobin,
    ];

    /// The short name `--router` takes.
    pub fn key(self) -> &'static str {
        match self {
            RouterKind::EppDefault => "default",
            RouterKind::EppGuide => "guide",
            RouterKind::EppGuideNoAutoTune => "guide-no-autotune",
            RouterKind::EppPrecise => "precise",
            RouterKind::EppReplicas { shared: true } => "replicas-shared",
            RouterKind::EppReplicas { shared: false } => "replicas-local",
            RouterKind::Peer(PeerKind::Sglang) => "sglang",
            RouterKind::Peer(PeerKind::Vllm) => "vllm",
            RouterKind::RoundRobin => "round-robin",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            RouterKind::EppDefault => "EPP, default profile",
            RouterKind::EppGuide => "EPP, upstream guide config",
            RouterKind::EppGuideNoAutoTune => "EPP, guide config, autoTune off",
            RouterKind::EppPrecise => "EPP, precise (KV events)",
            RouterKind::EppReplicas { shared: true } => "EPP ×2 replicas, state shared (Redis)",
            RouterKind::EppReplicas { shared: false } => "EPP ×2 replicas, each its own state",
            RouterKind::Peer(PeerKind::Sglang) => "sglang-router cache_aware",
            RouterKind::Peer(PeerKind::Vllm) => "vllm-router cache_aware",
            RouterKind::RoundRobin => "Envoy round-robin",
        }
    }

    /// The replay policy that stands for it, when one does.
    pub fn replay_policy(self) -> Option<&'static str> {
        match self {
            RouterKind::EppDefault => Some("baseline"),
            RouterKind::EppGuide => Some("guide"),
            RouterKind::EppPrecise => Some("precise"),
            RouterKind::Peer(_) => Some("cache-aware"),
            RouterKind::RoundRobin => Some("round-robin"),
            RouterKind::EppGuideNoAutoTune | RouterKind::EppReplicas { .. } => None,
        }
    }

    /// Whether it runs on `workload` (the comparisons that only matter on multi-turn chat —
    /// autoTune off, replicas — run there only, to keep the bench short).
    pub fn runs_on(self, workload: Generator) -> bool {
        match self {
            RouterKind::EppGuideNoAutoTune | RouterKind::EppReplicas { .. } => workload == Generator::MultiTurn,
            _ => true,
        }
    }
}

/// The EPP config of `kind` reading `endpoints`.
pub fn epp_config(kind: RouterKind, endpoints: &std::path::Path, default: Option<&str>) -> Option<String> {
    let path = format!("path: {}", endpoints.display());
    match kind {
        RouterKind::EppDefault | RouterKind::EppReplicas { .. } => {
            Some(default.unwrap_or(epp::config::DEFAULT_CONFIG).replace(ENDPOINTS_LINE, &path))
        }
        RouterKind::EppGuide => Some(epp::config::GUIDE_CONFIG.replace(GUIDE_ENDPOINTS_LINE, &path)),
        RouterKind::EppPrecise => Some(epp::config::PRECISE_CONFIG.replace(ENDPOINTS_LINE, &path)),
        RouterKind::EppGuideNoAutoTune => epp_config(RouterKind::EppGuide, endpoints, default).map(|guide| {
            guide.replace(
                "  - type: prefix-cache-scorer\n",
                "  - type: prefix-cache-scorer\n    parameters: {autoTune: false}\n",
            )
        }),
        RouterKind::Peer(_) | RouterKind::RoundRobin => None,
    }
}

/// What one router did with one workload.
#[derive(Clone, Default)]
pub struct RouterRun {
    pub router: String,
    pub recorded: u64,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Prompt tokens served from the workers' caches ÷ prompt tokens, over the recorded part.
    pub hit_rate: f64,
    pub ttft: Latency,
    pub latency: Latency,
    /// Sorted TTFTs, ms (for the plot).
    pub ttft_ms: Vec<f64>,
    pub elapsed: Duration,
    pub per_worker: BTreeMap<String, u64>,
}

impl RouterRun {
    pub fn throughput(&self) -> f64 {
        if self.elapsed.is_zero() { 0.0 } else { self.ok as f64 / self.elapsed.as_secs_f64() }
    }
}

/// One workload's comparison.
#[derive(Clone)]
pub struct WorkloadRuns {
    pub spec: WorkloadSpec,
    pub runs: Vec<RouterRun>,
    /// The replay of the same workload: (policy, hit rate, TTFT p90 ms).
    pub replay: Vec<(String, f64, f64)>,
}

#[derive(Clone)]
pub struct QualityResults {
    pub options: QualityOptions,
    pub workloads: Vec<WorkloadRuns>,
    /// Routers that could not run (not installed) and why.
    pub skipped: Vec<(String, String)>,
}

pub async fn run(
    opts: &QualityOptions,
    setup: &Setup,
    progress: &mut dyn FnMut(String),
) -> Result<QualityResults, StackError> {
    let mut results = QualityResults { options: opts.clone(), workloads: Vec::new(), skipped: Vec::new() };
    let routers: Vec<RouterKind> = opts
        .routers
        .iter()
        .copied()
        .filter(|r| match r {
            RouterKind::Peer(p) if !p.available() => {
                results.skipped.push((r.label().into(), format!("{} is not installed", p.name())));
                false
            }
            _ => true,
        })
        .collect();
    for spec in &opts.workloads {
        let load = Arc::new(workload::generate(
            spec.generator,
            &GenParams { requests: spec.requests, rate: spec.rate, seed: opts.seed },
        ));
        let on_cell: Vec<RouterKind> = routers.iter().copied().filter(|&r| spec.runs(r)).collect();
        let mut runs = Vec::new();
        for &router in &on_cell {
            let run = run_one(opts, spec, router, &load, setup).await?;
            progress(format!(
                "quality: {}: {}: prefix hits {:.1} %, TTFT p50 {} p90 {}, {} ok, {} errors",
                spec.name(),
                run.router,
                100.0 * run.hit_rate,
                crate::latency::fmt_duration(run.ttft.summary().p50),
                crate::latency::fmt_duration(run.ttft.summary().p90),
                run.ok,
                run.errors
            ));
            runs.push(run);
        }
        let replay = replay_same(opts, spec, &on_cell)?;
        results.workloads.push(WorkloadRuns { spec: spec.clone(), runs, replay });
    }
    Ok(results)
}

/// The same workload in `epp replay`, with the policies standing for the routers.
fn replay_same(
    opts: &QualityOptions,
    spec: &WorkloadSpec,
    routers: &[RouterKind],
) -> Result<Vec<(String, f64, f64)>, StackError> {
    let mut flags: Vec<String> = vec![
        "--workload".into(),
        spec.generator.name().into(),
        "--requests".into(),
        spec.requests.to_string(),
        "--rate".into(),
        spec.rate.to_string(),
        "--workers".into(),
        spec.workers.to_string(),
        "--num-gpu-blocks".into(),
        spec.num_gpu_blocks.to_string(),
        "--seed".into(),
        opts.seed.to_string(),
        "--no-progress".into(),
    ];
    flags.extend(spec.shape.flags());
    if !spec.stream {
        flags.push("--no-stream".into());
    }
    let mut policies: Vec<String> = routers.iter().filter_map(|r| r.replay_policy()).map(String::from).collect();
    // An operator's config stands in for the default profile in replay too.
    let _scratch = match &opts.default_config {
        Some(custom) => {
            let scratch = Scratch::new("quality-replay")?;
            let path = scratch.write("custom.yaml", &custom.text)?;
            for p in policies.iter_mut().filter(|p| *p == "baseline") {
                *p = format!("{}={}", custom.name, path.display());
            }
            Some(scratch)
        }
        None => None,
    };
    policies.dedup();
    for p in policies {
        flags.push("--policy".into());
        flags.push(p);
    }
    let args = epp::replay::ReplayArgs::parse_flags(flags).map_err(|e| StackError::Setup(e.to_string()))?;
    let replay = epp::replay::run(&args, &indicatif::ProgressBar::hidden())
        .map_err(|e| StackError::Setup(format!("replay: {e}")))?;
    Ok(replay.reports.iter().map(|r| (r.policy.clone(), r.prefix_hit_rate, r.ttft_ms[1])).collect())
}

async fn run_one(
    opts: &QualityOptions,
    spec: &WorkloadSpec,
    router: RouterKind,
    load: &Arc<Workload>,
    setup: &Setup,
) -> Result<RouterRun, StackError> {
    let scratch = Scratch::new("quality")?;
    let model = sim::ModelParams { num_gpu_blocks: spec.num_gpu_blocks, ..opts.model.clone() };
    // The adapters the workload names are served as LoRA adapters, as in replay's cluster.
    let mut loras: Vec<String> = load.items.iter().filter_map(|i| i.lora.as_deref().map(str::to_owned)).collect();
    loras.sort();
    loras.dedup();
    let mut base = sim::SimConfig { time_scale: 1.0, model, loras, ..Default::default() };
    if router == RouterKind::EppPrecise {
        // Every worker publishes its events on ports of its own (named by endpoint labels).
        base.kv_events = Some(sim::KvEventsConfig { port: 0, replay_port: Some(0), topic: String::new() });
    }
    // The base model carries the workload's KV blocks; a shape's list overrides them.
    let workers = Workers::spawn_shaped(spec.workers, &base, &spec.shape).await?;
    let endpoints = scratch.write("endpoints.yaml", &workers.endpoints_yaml())?;
    let addrs: Vec<std::net::SocketAddr> = workers.handles.iter().map(|h| h.addr()).collect();
    // Keep every process alive for the whole run.
    let mut _epp = None;
    let mut _envoy = None;
    let mut _peer = None;
    let mut _replicas = None;
    // Empty for the routers that are not an EPP (their branches do not read it).
    let config =
        epp_config(router, &endpoints, opts.default_config.as_ref().map(|c| c.text.as_str())).unwrap_or_default();
    let url = match router {
        RouterKind::EppReplicas { shared } => {
            let opts = EppOptions { plaintext: true, ..Default::default() };
            let set = ReplicaSet::start(&setup.epp, &setup.envoy, &scratch, &config, shared, opts).await?;
            let url = set.envoy.url("/v1/completions");
            _replicas = Some(set);
            url
        }
        RouterKind::RoundRobin => {
            let envoy = Envoy::round_robin(setup, &scratch, &workers).await?;
            let url = envoy.url("/v1/completions");
            _envoy = Some(envoy);
            url
        }
        RouterKind::Peer(kind) => {
            let peer = Peer::start(kind, "cache_aware", &addrs, &scratch).await?;
            let url = peer.url("/v1/completions");
            _peer = Some(peer);
            url
        }
        _ => {
            let epp =
                Epp::start_with(&setup.epp, &scratch, &config, &EppOptions { plaintext: true, ..Default::default() })
                    .await?;
            let envoy = Envoy::ext_proc_with(&setup.envoy, &scratch, epp.grpc_port, Bootstrap::OursPlaintext).await?;
            let url = envoy.url("/v1/completions");
            _epp = Some(epp);
            _envoy = Some(envoy);
            url
        }
    };
    // The readiness requests went to some worker; let them finish before the clock starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counters = |w: &Workers| -> Vec<(u64, u64)> {
        w.handles
            .iter()
            .map(|h| {
                let c = h.stats().counters;
                (c.prefix_cache_queries, c.prefix_cache_hits)
            })
            .collect()
    };
    let warmup = ((load.items.len() as f64) * opts.warmup) as usize;
    let warm_at = load.items.get(warmup).map_or(0.0, |i| i.at);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .tcp_nodelay(true)
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| StackError::Setup(format!("http client: {e}")))?;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let mut baseline = None;
    for (k, item) in load.items.iter().enumerate() {
        let due = started + Duration::from_secs_f64(item.at);
        tokio::time::sleep_until(due.into()).await;
        if k == warmup {
            baseline = Some(counters(&workers));
        }
        let (client, url, body, headers) =
            (client.clone(), url.clone(), request_body(item, spec.stream), request_headers(item));
        let stream = spec.stream;
        tasks.spawn(async move { (k, send(&client, &url, body, &headers, due, stream).await) });
    }
    let label = match (&opts.default_config, router) {
        (Some(custom), RouterKind::EppDefault) => format!("EPP, {}", custom.name),
        _ => router.label().into(),
    };
    // Every worker has a row, so one that got no request shows as 0 rather than not at all.
    let per_worker = workers.handles.iter().map(|h| (h.name().to_string(), 0)).collect();
    let mut run = RouterRun { router: label, per_worker, ..Default::default() };
    let mut ttfts = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let Ok((k, outcome)) = joined else { continue };
        if k < warmup {
            continue;
        }
        run.recorded += 1;
        match outcome {
            Ok(o) => {
                run.ok += 1;
                run.ttft.record(o.ttft);
                run.latency.record(o.latency);
                ttfts.push(o.ttft.as_secs_f64() * 1e3);
                *run.per_worker.entry(o.worker).or_default() += 1;
            }
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert(e);
            }
        }
    }
    run.elapsed = started.elapsed().saturating_sub(Duration::from_secs_f64(warm_at));
    let end = counters(&workers);
    let start = baseline.unwrap_or_else(|| vec![(0, 0); end.len()]);
    let (queries, hits) = end
        .iter()
        .zip(&start)
        .fold((0u64, 0u64), |(q, h), (e, s)| (q + e.0.saturating_sub(s.0), h + e.1.saturating_sub(s.1)));
    run.hit_rate = if queries == 0 { 0.0 } else { hits as f64 / queries as f64 };
    ttfts.sort_by(f64::total_cmp);
    run.ttft_ms = ttfts;
    Ok(run)
}

/// The `/v1/completions` body for a work item (the prompt as plain text, so every router
/// and the replay see the same bytes), streamed with usage or not streamed.
fn request_body(item: &WorkItem, stream: bool) -> String {
    let prompt = String::from_utf8_lossy(&item.prompt.to_bytes()).into_owned();
    let mut body = serde_json::json!({
        "model": item.requested_model(),
        "prompt": prompt,
        "max_tokens": item.output_tokens,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    body.to_string()
}

/// The headers a work item's request carries: replay's (session, tenant) and its priority
/// as the objective header the EPP reads, so a live run sheds and queues what `epp replay`
/// does. Routers that do not know them ignore them.
fn request_headers(item: &WorkItem) -> Vec<(&'static str, String)> {
    let mut headers = item.headers();
    if item.priority != 0 {
        headers.push((epp::request::OBJECTIVE_HEADERS[0], item.priority.to_string()));
    }
    headers
}

struct Outcome {
    ttft: Duration,
    latency: Duration,
    worker: String,
}

/// Sends one request due at `due`; TTFT and latency are measured from `due` (so a stalled
/// client cannot hide queueing). Without streaming, the first chunk is the response's.
async fn send(
    client: &reqwest::Client,
    url: &str,
    body: String,
    headers: &[(&'static str, String)],
    due: Instant,
    stream: bool,
) -> Result<Outcome, String> {
    let mut req = client.post(url).header("content-type", "application/json").body(body);
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let mut r = req.send().await.map_err(|e| format!("send: {e}"))?;
    let status = r.status();
    let worker = r.headers().get(sim::WORKER_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("?").to_string();
    if !status.is_success() {
        let text = r.text().await.unwrap_or_default();
        return Err(format!("HTTP {status}: {}", text.chars().take(200).collect::<String>()));
    }
    let mut ttft = None;
    let mut tail = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| format!("read: {e}"))? {
        if ttft.is_none() && !chunk.is_empty() {
            ttft = Some(due.elapsed());
        }
        tail.extend_from_slice(&chunk);
        if tail.len() > 4096 {
            tail.drain(..tail.len() - 4096);
        }
    }
    let latency = due.elapsed();
    answered_in_full(&tail, stream)?;
    Ok(Outcome { ttft: ttft.unwrap_or(latency), latency, worker })
}

/// Whether a response's last bytes end it as it should: a stream with `[DONE]`, a whole
/// response with its JSON object's closing brace.
fn answered_in_full(tail: &[u8], stream: bool) -> Result<(), String> {
    let text = String::from_utf8_lossy(tail);
    match stream {
        true if text.contains("[DONE]") => Ok(()),
        true => Err("the stream ended without [DONE]".into()),
        false if text.trim_end().ends_with('}') => Ok(()),
        false => Err("the response ended before its JSON object did".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_generators_can_be_selected_and_every_workload_reshaped() {
        let mut o = QualityOptions::full();
        o.select(&["bursts".into(), "multi-turn".into()], &["default".into(), "sglang".into()]).expect("known names");
        let names: Vec<&str> = o.workloads.iter().map(|w| w.generator.name()).collect();
        assert_eq!(names, ["multi-turn", "bursts"]);
        let bursts = o.workloads[1].clone();
        assert_eq!((bursts.requests, bursts.num_gpu_blocks, bursts.workers), (1200, 2048, 4));
        assert!((bursts.rate - 0.8 * Generator::Bursts.default_rate_per_worker() * 4.0).abs() < 1e-9);
        assert_eq!(o.routers.len(), 2);
        // The multi-turn spec keeps its own shape until reshaped.
        assert_eq!((o.workloads[0].rate, o.workloads[0].num_gpu_blocks), (20.0, 1024));
        o.reshape(Some(300), None, Some(512));
        for w in &o.workloads {
            assert_eq!((w.requests, w.num_gpu_blocks), (300, 512));
        }
        assert_eq!(o.workloads[0].rate, 20.0);

        // More workers: the same load on each, and every workload chosen after scales too.
        let mut o = QualityOptions::full();
        o.set_workers(8).expect("a pool of 8");
        o.select(&["multi-turn".into(), "bursts".into()], &[]).expect("known names");
        assert_eq!(o.workloads[0].rate, 40.0);
        assert!((o.workloads[1].rate - 0.8 * Generator::Bursts.default_rate_per_worker() * 8.0).abs() < 1e-9);
        assert!(o.workloads.iter().all(|w| w.workers == 8 && !w.extra));
        let err = QualityOptions::full().set_workers(0).expect_err("no workers");
        assert!(err.contains("--workers"), "{err}");
        let mut o = QualityOptions::full();
        let slow = sim::PoolShape { blocks: Vec::new(), speed: vec![1.0, 0.0] };
        let err = o.set_shape(&slow).expect_err("a speed of 0");
        assert!(err.contains("--worker-speed"), "{err}");

        let err = QualityOptions::full().select(&["chat".into()], &[]).expect_err("unknown workload");
        assert!(err.contains("chat") && err.contains("bursts"), "{err}");
        let err = QualityOptions::full().select(&[], &["nginx".into()]).expect_err("unknown router");
        assert!(err.contains("nginx") && err.contains("sglang"), "{err}");
    }

    #[test]
    fn the_full_run_adds_extras_at_the_same_load_per_worker_with_fewer_routers() {
        let o = QualityOptions::full();
        let names: Vec<String> = o.workloads.iter().map(WorkloadSpec::name).collect();
        assert_eq!(
            names,
            [
                "shared-prefix",
                "multi-turn",
                "unique",
                "one-prompt",
                "shared-prefix, 16 workers",
                "multi-turn, 16 workers",
                "shared-prefix, mixed pool",
                "unique, mixed pool",
                "unique, non-streamed"
            ]
        );
        // Only the non-streamed cell sends whole responses; `--no-stream` turns the main
        // cells into whole responses and leaves the extra ones out.
        assert!(o.workloads.iter().all(|w| w.stream != w.name().ends_with("non-streamed")));
        let mut whole = QualityOptions::full();
        whole.whole_responses();
        assert_eq!(whole.workloads.len(), 4);
        assert!(whole.workloads.iter().all(|w| !w.stream && !w.extra && w.name().ends_with(", non-streamed")));
        for w in o.workloads.iter().filter(|w| w.extra) {
            let main = o.workloads.iter().find(|m| !m.extra && m.generator == w.generator).expect("a main cell");
            assert!((w.rate / w.workers as f64 - main.rate / main.workers as f64).abs() < 1e-9, "{}", w.name());
            assert_eq!((w.requests, w.num_gpu_blocks), (main.requests, main.num_gpu_blocks));
            assert!(w.runs(RouterKind::EppDefault) && w.runs(RouterKind::Peer(PeerKind::Sglang)));
            assert!(w.runs(RouterKind::RoundRobin) && !w.runs(RouterKind::EppGuide));
            assert!(!w.runs(RouterKind::EppPrecise) && !w.runs(RouterKind::EppReplicas { shared: true }));
        }
        let main = &o.workloads[1];
        assert!(main.runs(RouterKind::EppGuide) && main.runs(RouterKind::EppReplicas { shared: false }));
        // A run on the operator's own pool or selection keeps the main cells only.
        for change in [
            |o: &mut QualityOptions| o.set_workers(8).map(|_| ()),
            |o: &mut QualityOptions| o.set_shape(&sim::PoolShape { blocks: vec![2048, 512], speed: Vec::new() }),
            |o: &mut QualityOptions| o.select(&["unique".into()], &[]),
            |o: &mut QualityOptions| {
                o.reshape(None, Some(10.0), None);
                Ok(())
            },
        ] {
            let mut o = QualityOptions::full();
            change(&mut o).expect("a valid change");
            assert!(!o.workloads.is_empty() && o.workloads.iter().all(|w| !w.extra));
        }
        // Choosing routers keeps every cell.
        let mut o = QualityOptions::full();
        o.select(&[], &["default".into(), "sglang".into()]).expect("known routers");
        assert_eq!(o.workloads.len(), 9);
    }

    #[test]
    fn requests_carry_the_items_session_priority_and_tenant() {
        let items = workload::generate(Generator::Bursts, &GenParams { requests: 400, rate: 40.0, seed: 1 }).items;
        let sheddable = items.iter().find(|i| i.priority < 0).expect("bursts have sheddable requests");
        let headers = request_headers(sheddable);
        let pairs: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        assert_eq!(epp::request::priority(&pairs), sheddable.priority, "{headers:?}");
        let normal = items.iter().find(|i| i.priority == 0).expect("and normal ones");
        assert!(request_headers(normal).is_empty());

        let items = workload::generate(Generator::Tenants, &GenParams { requests: 50, rate: 40.0, seed: 1 }).items;
        let tenant = items[0].tenant.clone().expect("tenants name their tenant");
        let headers = request_headers(&items[0]);
        assert!(headers.contains(&(epp::flow::FAIRNESS_HEADERS[0], tenant.to_string())), "{headers:?}");

        let items = workload::generate(Generator::MultiTurn, &GenParams { requests: 20, rate: 4.0, seed: 1 }).items;
        let session = items[0].session.clone().expect("chat turns name their session");
        assert_eq!(request_headers(&items[0]), vec![("x-session-id", session.to_string())]);
    }

    #[test]
    fn requests_are_streamed_with_usage_or_whole_and_checked_for_their_end() {
        let items = workload::generate(Generator::Unique, &GenParams { requests: 1, rate: 1.0, seed: 1 }).items;
        let streamed: serde_json::Value = serde_json::from_str(&request_body(&items[0], true)).expect("json");
        assert_eq!((&streamed["stream"], &streamed["stream_options"]["include_usage"]), (&true.into(), &true.into()));
        assert_eq!(streamed["max_tokens"], items[0].output_tokens);
        let whole: serde_json::Value = serde_json::from_str(&request_body(&items[0], false)).expect("json");
        assert_eq!(whole["stream"], false);
        assert!(whole.get("stream_options").is_none(), "{whole}");
        assert_eq!(whole["prompt"], streamed["prompt"]);

        assert!(answered_in_full(b"data: {}\n\ndata: [DONE]\n\n", true).is_ok());
        assert!(answered_in_full(b"data: {}\n\n", true).is_err());
        assert!(answered_in_full(b"{\"choices\": []}\n", false).is_ok());
        assert!(answered_in_full(b"{\"choices\": [", false).is_err());
        assert!(answered_in_full(b"", false).is_err());
    }

    #[test]
    fn an_operators_config_replaces_the_default_profile_only() {
        let path = std::path::Path::new("/tmp/e.yaml");
        let mine = "plugins:\n  - type: file-discovery\n    parameters: {path: endpoints.yaml}\n";
        let text = epp_config(RouterKind::EppDefault, path, Some(mine)).expect("a config");
        assert_eq!(text, mine.replace("endpoints.yaml", "/tmp/e.yaml"));
        let guide = epp_config(RouterKind::EppGuide, path, Some(mine)).expect("a config");
        assert_eq!(Some(guide), epp_config(RouterKind::EppGuide, path, None));
        let err = CustomConfig::new("mine.yaml".into(), "plugins: []\n".into()).expect_err("no endpoints.yaml");
        assert!(err.contains("mine.yaml") && err.contains("path: endpoints.yaml"), "{err}");
        assert!(CustomConfig::new("mine.yaml".into(), mine.into()).is_ok());
    }

    #[test]
    fn every_epp_router_has_a_valid_config_reading_the_endpoints_given() {
        let path = std::path::Path::new("/tmp/e.yaml");
        for kind in
            [RouterKind::EppDefault, RouterKind::EppGuide, RouterKind::EppGuideNoAutoTune, RouterKind::EppPrecise]
        {
            let text = epp_config(kind, path, None).expect("an EPP config");
            let config = epp::config::PickerConfig::parse(&text, None).expect("parses");
            let discovery = config.discovery().expect("discovery");
            assert_eq!(discovery.parameters["path"], "/tmp/e.yaml", "{kind:?}");
            let auto_tune = config
                .plugins
                .iter()
                .find(|p| p.type_name == "approx-prefix-cache-producer")
                .map(|p| p.parameters.get("autoTune").cloned());
            if kind == RouterKind::EppPrecise {
                assert!(config.plugins.iter().any(|p| p.type_name == "precise-prefix-cache-producer"));
                continue;
            }
            let off = kind == RouterKind::EppGuideNoAutoTune;
            assert_eq!(auto_tune, Some(off.then_some(serde_json::json!(false))), "{kind:?}");
        }
    }
}
