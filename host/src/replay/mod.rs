//! `epp replay`: offline evaluation of routing policies. A workload (a JSONL trace or a
//! built-in generator) is replayed in virtual time on a simulated cluster of vLLM workers —
//! the `sim` crate's serving model, the same one the live `sim-worker` runs — once per
//! policy, each policy being the EPP's own admission and scheduler with the same WASM
//! plugins as in production (or the built-in round-robin). Out come a table per policy,
//! optionally CSV and an SVG plot.
//!
//! This file owns the command line (`ReplayArgs`), the orchestration (policies run in
//! parallel threads, each on its own cluster and plugin instances) and the progress bar.
//! `workload` makes requests, `cluster` simulates the pool, `policy` routes, `engine` runs
//! the event loop, `report` and `plot` present. Nothing here opens a socket or reads a clock
//! that influences results: the wall clock only times the run for the operator.

pub mod cache_aware;
pub mod cluster;
pub mod engine;
pub mod plot;
pub mod policy;
pub mod report;
pub mod workload;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use sim::model::{ModelParams, ParamsError, PoolShape};

use self::engine::{ClusterSetup, RunResult};
use self::policy::{Policy, PolicyError, PolicySpec};
use self::report::PolicyReport;
use self::workload::{GenParams, Generator, TraceError, Workload};
use crate::wasm::{LoadError, WasmRuntime};

/// Requests a generator makes when `--requests` is not given.
pub const DEFAULT_REQUESTS: usize = 10_000;

/// Where the requests come from.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkloadSource {
    Generator(Generator),
    Trace(PathBuf),
}

impl FromStr for WorkloadSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(g) = s.parse::<Generator>() {
            return Ok(WorkloadSource::Generator(g));
        }
        if s.ends_with(".jsonl") || s.ends_with(".json") || s.contains('/') {
            return Ok(WorkloadSource::Trace(PathBuf::from(s)));
        }
        let names: Vec<&str> = Generator::ALL.iter().map(|g| g.name()).collect();
        Err(format!("`{s}` is neither a generator ({}) nor a .jsonl trace file", names.join(", ")))
    }
}

fn model_profile(s: &str) -> Result<String, String> {
    match cluster::profile(s) {
        Some(_) => Ok(s.to_string()),
        None => {
            let names: Vec<&str> = cluster::PROFILES.iter().map(|(n, _)| *n).collect();
            Err(format!("unknown model profile `{s}`; expected one of {}", names.join(", ")))
        }
    }
}

/// Flags of `epp replay`.
#[derive(Clone, Debug, clap::Args)]
pub struct ReplayArgs {
    /// shared-prefix, multi-turn, lora-mix, bursts, unique, tenants, one-prompt, long-output, or a JSONL trace file (docs/replay.md).
    #[arg(long, default_value = "shared-prefix")]
    pub workload: WorkloadSource,
    /// Requests to replay (generators default to 10000; a trace is cut to its first N).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Simulated workers.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Mean arrival rate of a generator, requests/s (default: a per-worker rate × workers).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seed of the generators and of random pickers; equal seeds give equal reports.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How often the EPP scrapes each worker, ms: the scheduler sees metrics up to this old
    /// (0 shows it the live state).
    #[arg(long, default_value_t = 50.0)]
    pub scrape_delay_ms: f64,
    /// A policy: baseline (the default config), guide (the upstream guide's config), random,
    /// round-robin, cache-aware (a model of the peer routers' policy), name=config.yaml, or a
    /// config path (repeatable; default: baseline, random and round-robin).
    #[arg(long = "policy")]
    pub policies: Vec<PolicySpec>,
    /// Also print each worker's share of every policy's run: requests, prefix hits, TTFT,
    /// when it finished its last request, the models it was sent most.
    #[arg(long)]
    pub per_worker: bool,
    /// Also write the table as CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Also draw an SVG here: TTFT CDF and prefix-cache hit rate per policy.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Worker model parameters: small or 8b-1gpu (docs/replay.md); the flags below override.
    #[arg(long, default_value = "small", value_parser = model_profile)]
    pub model_profile: String,
    /// Override: running sequences at most per worker.
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Override: LoRA adapters running at once at most per worker.
    #[arg(long)]
    pub max_loras: Option<usize>,
    /// Override: KV blocks per worker.
    #[arg(long)]
    pub num_gpu_blocks: Option<usize>,
    /// Override: tokens per KV block.
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Override: prefill cost per uncached prompt token, µs.
    #[arg(long)]
    pub prefill_us_per_token: Option<f64>,
    /// Override: fixed cost of a decode step, ms.
    #[arg(long)]
    pub decode_ms_base: Option<f64>,
    /// Override: extra cost of a decode step per running sequence, ms.
    #[arg(long)]
    pub decode_ms_per_seq: Option<f64>,
    /// A mixed pool: each worker's KV blocks, in turn (e.g. `2048,512`: workers 0, 2, …
    /// get 2 048 and workers 1, 3, … 512).
    #[arg(long, value_delimiter = ',')]
    pub worker_blocks: Vec<usize>,
    /// A mixed pool: each worker's speed, in turn (e.g. `1,1,1,0.5`: every fourth worker
    /// takes twice as long to prefill and decode).
    #[arg(long, value_delimiter = ',')]
    pub worker_speed: Vec<f64>,
    /// No progress bar (it is drawn on stderr, and only when stderr is a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Requests ask for whole (non-streamed) responses: the first response bytes, and so
    /// the `first-chunk` hook and the TTFT columns, come with the last token.
    #[arg(long)]
    pub no_stream: bool,
}

#[derive(clap::Parser)]
#[command(name = "epp replay")]
struct Flags {
    #[command(flatten)]
    args: ReplayArgs,
}

impl ReplayArgs {
    /// Parses flags as `epp replay` takes them (without the program and subcommand names).
    pub fn parse_flags<I, T>(flags: I) -> Result<ReplayArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser;
        let argv = std::iter::once(std::ffi::OsString::from("epp replay")).chain(flags.into_iter().map(Into::into));
        Flags::try_parse_from(argv).map(|f| f.args)
    }

    /// The worker parameters: the profile with the overrides applied, validated.
    pub fn model_params(&self) -> Result<ModelParams, ReplayError> {
        let mut p = cluster::profile(&self.model_profile)
            .ok_or_else(|| ReplayError::Args(format!("unknown model profile `{}`", self.model_profile)))?;
        p.max_num_seqs = self.max_num_seqs.unwrap_or(p.max_num_seqs);
        p.max_loras = self.max_loras.unwrap_or(p.max_loras);
        p.num_gpu_blocks = self.num_gpu_blocks.unwrap_or(p.num_gpu_blocks);
        p.block_size = self.block_size.unwrap_or(p.block_size);
        p.prefill_us_per_token = self.prefill_us_per_token.unwrap_or(p.prefill_us_per_token);
        p.decode_ms_base = self.decode_ms_base.unwrap_or(p.decode_ms_base);
        p.decode_ms_per_seq = self.decode_ms_per_seq.unwrap_or(p.decode_ms_per_seq);
        p.validate()?;
        Ok(p)
    }

    /// The policies to compare, defaults filled in; names must be unique.
    pub fn policy_specs(&self) -> Result<Vec<PolicySpec>, ReplayError> {
        let specs = if self.policies.is_empty() { PolicySpec::defaults() } else { self.policies.clone() };
        for (i, s) in specs.iter().enumerate() {
            if specs[..i].iter().any(|t| t.name == s.name) {
                return Err(ReplayError::Args(format!("policy name `{}` is given twice", s.name)));
            }
        }
        Ok(specs)
    }

    /// The workload, generated or read.
    pub fn workload(&self) -> Result<Workload, ReplayError> {
        if self.requests == Some(0) {
            return Err(ReplayError::Args("--requests must be at least 1".into()));
        }
        match &self.workload {
            WorkloadSource::Trace(path) => {
                let mut w = workload::read_trace(path)?;
                if let Some(n) = self.requests {
                    w.truncate(n);
                }
                Ok(w)
            }
            WorkloadSource::Generator(g) => {
                let rate = self.rate.unwrap_or(g.default_rate_per_worker() * self.workers as f64);
                if !(rate.is_finite() && rate > 0.0) {
                    return Err(ReplayError::Args(format!("--rate must be a positive number, got {rate}")));
                }
                let params = GenParams { requests: self.requests.unwrap_or(DEFAULT_REQUESTS), rate, seed: self.seed };
                Ok(workload::generate(*g, &params))
            }
        }
    }

    fn cluster_setup(&self) -> Result<ClusterSetup, ReplayError> {
        if self.workers == 0 {
            return Err(ReplayError::Args("--workers must be at least 1".into()));
        }
        if !(self.scrape_delay_ms.is_finite() && self.scrape_delay_ms >= 0.0) {
            return Err(ReplayError::Args(format!("--scrape-delay-ms must be >= 0, got {}", self.scrape_delay_ms)));
        }
        let shape = PoolShape { blocks: self.worker_blocks.clone(), speed: self.worker_speed.clone() };
        shape.validate().map_err(ReplayError::Args)?;
        Ok(ClusterSetup {
            workers: self.workers,
            params: self.model_params()?,
            shape,
            scrape_interval: self.scrape_delay_ms / 1000.0,
            stream: !self.no_stream,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    Args(String),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("worker model parameters: {0}")]
    Params(#[from] ParamsError),
    #[error("wasm runtime: {0}")]
    Runtime(#[from] LoadError),
    #[error("cannot write {path}: {error}")]
    Write { path: PathBuf, error: String },
    #[error("{0}")]
    Plot(String),
    #[error("the run of policy `{0}` panicked")]
    Panicked(String),
    #[error("cannot print the report: {0}")]
    Output(#[from] std::io::Error),
}

/// Everything a replay produced.
pub struct Replay {
    pub workload: String,
    pub requests: usize,
    /// Arrival of the last request, seconds.
    pub span: f64,
    pub setup: ClusterSetup,
    /// One per policy, in the order given.
    pub runs: Vec<RunResult>,
    pub reports: Vec<PolicyReport>,
    /// Wall-clock time of the policy runs (not of building the workload).
    pub elapsed: Duration,
}

/// Runs every policy of `args` over the workload; `progress` counts routed requests.
pub fn run(args: &ReplayArgs, progress: &ProgressBar) -> Result<Replay, ReplayError> {
    let setup = args.cluster_setup()?;
    let specs = args.policy_specs()?;
    let workload = args.workload()?;
    let runtime = WasmRuntime::new()?;
    progress.set_length((workload.items.len() * specs.len()) as u64);
    let started = Instant::now();
    let runs = run_policies(&specs, &runtime, &workload, &setup, args.seed, progress)?;
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    let reports = runs.iter().map(PolicyReport::from_run).collect();
    Ok(Replay {
        workload: workload.name.clone(),
        requests: workload.items.len(),
        span: workload.span(),
        setup,
        runs,
        reports,
        elapsed,
    })
}

/// Runs the policies on up to as many threads as there are cores; results keep `specs`' order.
fn run_policies(
    specs: &[PolicySpec],
    runtime: &WasmRuntime,
    workload: &Workload,
    setup: &ClusterSetup,
    seed: u64,
    progress: &ProgressBar,
) -> Result<Vec<RunResult>, ReplayError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(specs.len()).max(1);
    let next = AtomicUsize::new(0);
    let tick = |n: u64| progress.inc(n);
    let mut slots: Vec<Option<Result<RunResult, ReplayError>>> = (0..specs.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(spec) = specs.get(i) else { break };
                        let result = Policy::build(spec, runtime).map_err(ReplayError::from).and_then(|mut policy| {
                            engine::run(&mut policy, workload, setup, seed, &tick).map_err(ReplayError::from)
                        });
                        done.push((i, result));
                    }
                    done
                })
            })
            .collect();
        for handle in workers {
            // A panicking thread loses its results; the slots left empty report it below.
            if let Ok(done) = handle.join() {
                for (i, result) in done {
                    slots[i] = Some(result);
                }
            }
        }
    });
    slots
        .into_iter()
        .zip(specs)
        .map(|(slot, spec)| slot.unwrap_or_else(|| Err(ReplayError::Panicked(spec.name.clone()))))
        .collect()
}

/// `epp replay`: runs, prints the table to `out`, writes the CSV and plot if asked. Returns
/// false when some policy completed no request at all (a broken policy, not a slow one).
pub fn run_cli(args: ReplayArgs, out: &mut dyn Write) -> Result<bool, ReplayError> {
    let progress = if args.no_progress || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(0);
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} replay [{bar:30}] {human_pos}/{human_len} requests, eta {eta}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    };
    let replay = run(&args, &progress)?;
    let s = &replay.setup;
    writeln!(
        out,
        "workload {}: {} requests over {:.1} s ({:.1} req/s); {} workers ({}), scrape every {} ms, seed {}",
        replay.workload,
        replay.requests,
        replay.span,
        if replay.span > 0.0 { replay.requests as f64 / replay.span } else { 0.0 },
        s.workers,
        args.model_profile,
        args.scrape_delay_ms,
        args.seed,
    )?;
    let mixed = s.shape.describe();
    if !mixed.is_empty() {
        writeln!(out, "mixed pool: {mixed}")?;
    }
    writeln!(out)?;
    write!(out, "{}", report::table(&replay.reports))?;
    if let Some(tenants) = report::tenant_table(&replay.runs) {
        writeln!(out)?;
        write!(out, "{tenants}")?;
    }
    if args.per_worker {
        writeln!(out)?;
        write!(out, "{}", report::worker_table(&replay.runs, s.workers))?;
    }
    writeln!(out)?;
    if let Some(path) = &args.csv {
        write_file(path, report::csv(&replay.reports).as_bytes())?;
        writeln!(out, "csv:  {}", path.display())?;
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "{} — {} requests, {} workers ({}), scrape {} ms, seed {}",
            replay.workload, replay.requests, s.workers, args.model_profile, args.scrape_delay_ms, args.seed
        );
        let ttfts: Vec<Vec<f64>> = replay.runs.iter().map(report::ttfts_ms).collect();
        let series: Vec<plot::Series<'_>> =
            replay.reports.iter().zip(&ttfts).map(|(report, ttft)| plot::Series { report, ttft_ms: ttft }).collect();
        let svg = plot::svg(&title, &series).map_err(ReplayError::Plot)?;
        write_file(path, svg.as_bytes())?;
        writeln!(out, "plot: {}", path.display())?;
    }
    writeln!(
        out,
        "replayed {} requests × {} policies in {:.1} s",
        replay.requests,
        replay.reports.len(),
        replay.elapsed.as_secs_f64()
    )?;
    Ok(replay.reports.iter().all(|r| r.completed > 0))
}

fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), ReplayError> {
    std::fs::write(path, bytes).map_err(|e| ReplayError::Write { path: path.to_path_buf(), error: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_defaults() {
        let args = ReplayArgs::parse_flags(["--requests", "50", "--policy", "baseline", "--policy", "rr=round-robin"])
            .expect("valid flags");
        assert_eq!(args.workload, WorkloadSource::Generator(Generator::SharedPrefix));
        assert_eq!((args.requests, args.workers, args.seed, args.scrape_delay_ms), (Some(50), 8, 1, 50.0));
        let names: Vec<String> = args.policy_specs().expect("valid").into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["baseline", "rr"]);
        assert_eq!(args.model_params().expect("valid"), ModelParams::default());
    }

    #[test]
    fn bad_flags_are_refused() {
        let cases: &[&[&str]] =
            &[&["--workload", "chaos"], &["--model-profile", "70b"], &["--policy", "fancy"], &["--workers", "-1"]];
        for flags in cases {
            assert!(ReplayArgs::parse_flags(flags.iter()).is_err(), "{flags:?}");
        }
        let parsed = |flags: &[&str]| ReplayArgs::parse_flags(flags.iter()).expect("parses");
        assert!(parsed(&["--policy", "a=baseline", "--policy", "a=random"]).policy_specs().is_err());
        assert!(parsed(&["--max-num-seqs", "0"]).model_params().is_err());
        assert!(parsed(&["--workers", "0"]).cluster_setup().is_err());
        assert!(parsed(&["--scrape-delay-ms=-5"]).cluster_setup().is_err());
        assert!(parsed(&["--rate", "0"]).workload().is_err());
        assert!(parsed(&["--requests", "0"]).workload().is_err());
        let overridden = parsed(&["--model-profile", "8b-1gpu", "--num-gpu-blocks", "100"]).model_params();
        assert_eq!(overridden.expect("valid").num_gpu_blocks, 100);
        let err = |flags: &[&str]| parsed(flags).cluster_setup().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(&["--worker-speed", "1,0"]).contains("--worker-speed"));
        assert!(err(&["--worker-blocks", "512,0"]).contains("--worker-blocks"));
        let mixed = parsed(&["--worker-blocks", "2048,512", "--worker-speed", "1,1,0.5"]).cluster_setup();
        let shape = mixed.expect("valid").shape;
        assert_eq!((shape.blocks, shape.speed), (vec![2048, 512], vec![1.0, 1.0, 0.5]));
    }

    #[test]
    fn workload_sources() {
        let cases = [
            ("bursts", Ok(WorkloadSource::Generator(Generator::Bursts))),
            ("traces/a.jsonl", Ok(WorkloadSource::Trace("traces/a.jsonl".into()))),
            ("a.jsonl", Ok(WorkloadSource::Trace("a.jsonl".into()))),
            ("poisson", Err(())),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<WorkloadSource>().map_err(|_| ()), want, "{text}");
        }
    }
}
