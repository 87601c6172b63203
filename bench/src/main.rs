//! `epp-bench`: runs the benchmarks (micro, e2e, quality, or all), prints their progress and
//! the report, and writes the report as markdown (docs/benchmarks.md via scripts/bench.sh).
//! A thin shell over the `bench` library; all measuring lives there.

use std::path::PathBuf;

use anyhow::Context;
use bench::e2e::{self, E2eOptions};
use bench::micro::{self, MicroOptions};
use bench::quality::{self, QualityOptions};
use bench::report::{Machine, Report};
use bench::stack;
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    /// Scheduling cost: wasm vs native, per plugin, request parsing.
    Micro,
    /// End to end through Envoy: EPP path vs round-robin.
    E2e,
    /// Routing quality on a shared-prefix workload.
    Quality,
    /// All three.
    All,
}

#[derive(Debug, Parser)]
#[command(name = "epp-bench", about = "Benchmarks of the EPP: scheduling cost, end-to-end overhead, routing quality")]
struct Flags {
    #[arg(value_enum, default_value_t = Part::All)]
    part: Part,
    /// A few seconds of each part: proves the harness works, measures nothing.
    #[arg(long)]
    smoke: bool,
    /// Write the markdown report here (e.g. docs/benchmarks.md).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The `epp` binary (default: built with cargo in this build's target folder).
    #[arg(long)]
    epp_bin: Option<PathBuf>,
    /// The Envoy binary (default: $ENVOY_BIN, .venv/bin/envoy, PATH).
    #[arg(long)]
    envoy_bin: Option<PathBuf>,
    /// Plaintext gRPC between Envoy and the EPP instead of the default TLS (to measure TLS).
    #[arg(long)]
    plaintext_ext_proc: bool,
    /// Micro: only these pool sizes (repeatable; for profiling one cell).
    #[arg(long = "endpoints")]
    endpoints: Vec<usize>,
    /// Micro: only these prompt sizes in KB (repeatable).
    #[arg(long = "prompt-kb")]
    prompt_kb: Vec<usize>,
    /// Micro: wall time per cell in milliseconds (longer for profiling).
    #[arg(long)]
    cell_ms: Option<u64>,
    /// Quality: only these workloads (repeatable: shared-prefix, multi-turn, unique, one-prompt, or
    /// another `epp replay` generator: bursts, lora-mix, tenants, long-output).
    #[arg(long = "workload")]
    workloads: Vec<String>,
    /// Quality: requests of every selected workload (default: each workload's own).
    #[arg(long)]
    requests: Option<usize>,
    /// Quality: arrival rate over the pool, requests/s (default: each workload's own).
    #[arg(long)]
    rate: Option<f64>,
    /// Quality: KV blocks per worker (default: each workload's own).
    #[arg(long)]
    num_gpu_blocks: Option<usize>,
    /// Quality: a mixed pool, each worker's KV blocks in turn (e.g. `2048,512`; overrides
    /// `--num-gpu-blocks`).
    #[arg(long, value_delimiter = ',')]
    worker_blocks: Vec<usize>,
    /// Quality: a mixed pool, each worker's speed in turn (e.g. `1,1,1,0.5`: every fourth
    /// worker prefills and decodes at half speed).
    #[arg(long, value_delimiter = ',')]
    worker_speed: Vec<f64>,
    /// Quality: the workloads' seed (default 1).
    #[arg(long)]
    seed: Option<u64>,
    /// Quality: send whole (non-streamed) requests in every main cell instead of streamed
    /// ones (the extra cells are left out); TTFT is then the whole response's time.
    #[arg(long)]
    no_stream: bool,
    /// Quality: simulated workers behind every router (default 4). Each workload's own
    /// rate scales with it, so every worker sees the same load; `--rate` overrides. Like
    /// the other quality flags that choose workloads or shapes, it leaves out the full run's
    /// cells on other pools.
    #[arg(long)]
    workers: Option<usize>,
    /// Quality: run this EPP config in the default profile's place (its `path:
    /// endpoints.yaml` is pointed at the bench's workers).
    #[arg(long)]
    epp_config: Option<PathBuf>,
    /// Quality: only these routers (repeatable: default, guide, guide-no-autotune, sglang,
    /// vllm, round-robin).
    #[arg(long = "router")]
    routers: Vec<String>,
    /// Internal (the end-to-end benchmark starts it): serve the null ext_proc on this port.
    #[arg(long, hide = true)]
    serve_null_ext_proc: Option<u16>,
    /// Internal: the workers the null ext_proc sends to, in turn (`host:port,…`).
    #[arg(long, hide = true, value_delimiter = ',')]
    null_destinations: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    if let Some(port) = flags.serve_null_ext_proc {
        // One runtime thread per core, as the EPP runs.
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
        return rt.block_on(bench::null_ext_proc::serve(port, flags.null_destinations));
    }
    if cfg!(debug_assertions) && !flags.smoke {
        eprintln!("warning: a debug build measures nothing useful; use `cargo run --release -p bench`");
    }
    let machine = Machine::detect();
    let wants = |p: Part| flags.part == p || flags.part == Part::All;
    let mut progress = |line: String| eprintln!("{line}");

    let micro = if wants(Part::Micro) {
        let mut opts = if flags.smoke { MicroOptions::smoke() } else { MicroOptions::full() };
        if !flags.endpoints.is_empty() {
            opts.endpoints.clone_from(&flags.endpoints);
        }
        if let Some(ms) = flags.cell_ms {
            opts.cell_budget = std::time::Duration::from_millis(ms);
            opts.max_samples = usize::MAX;
        }
        if !flags.prompt_kb.is_empty() {
            opts.prompt_bytes = flags.prompt_kb.iter().map(|kb| kb * 1024).collect();
        }
        Some(micro::run(&opts, &mut progress).context("micro benchmark")?)
    } else {
        None
    };

    let (mut e2e_results, mut quality_results) = (None, None);
    if wants(Part::E2e) || wants(Part::Quality) {
        let epp_bin = stack::locate_epp(flags.epp_bin.as_deref()).context("the epp binary")?;
        let envoy_bin = stack::locate_envoy(flags.envoy_bin.as_deref()).context("the Envoy binary")?;
        eprintln!("using {} and {}", epp_bin.display(), envoy_bin.display());
        let setup = stack::Setup { epp: epp_bin, envoy: envoy_bin, plaintext_ext_proc: flags.plaintext_ext_proc };
        // Two worker threads, like the machine: the load generator and the simulated workers
        // share them (their CPU time is reported).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("tokio runtime")?;
        if wants(Part::E2e) {
            let opts = if flags.smoke { E2eOptions::smoke() } else { E2eOptions::full() };
            let r = rt.block_on(e2e::run(&opts, &setup, &mut progress)).context("end-to-end benchmark")?;
            e2e_results = Some(r);
        }
        if wants(Part::Quality) {
            let mut opts = if flags.smoke { QualityOptions::smoke() } else { QualityOptions::full() };
            if let Some(n) = flags.workers {
                opts.set_workers(n).map_err(anyhow::Error::msg)?;
            }
            opts.select(&flags.workloads, &flags.routers).map_err(anyhow::Error::msg)?;
            opts.reshape(flags.requests, flags.rate, flags.num_gpu_blocks);
            opts.seed = flags.seed.unwrap_or(opts.seed);
            if flags.no_stream {
                opts.whole_responses();
            }
            let shape = sim::PoolShape { blocks: flags.worker_blocks.clone(), speed: flags.worker_speed.clone() };
            if shape != sim::PoolShape::default() {
                opts.set_shape(&shape).map_err(anyhow::Error::msg)?;
            }
            if let Some(path) = &flags.epp_config {
                let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
                let name = path.file_name().map_or_else(|| "custom".into(), |n| n.to_string_lossy().into_owned());
                opts.default_config = Some(quality::CustomConfig::new(name, text).map_err(anyhow::Error::msg)?);
            }
            let r = rt.block_on(quality::run(&opts, &setup, &mut progress)).context("routing-quality benchmark")?;
            quality_results = Some(r);
        }
    }

    let command =
        std::env::args().skip(1).fold(String::from("cargo run --release -p bench --"), |acc, a| format!("{acc} {a}"));
    let report = Report {
        machine: &machine,
        command,
        smoke: flags.smoke,
        micro: micro.as_ref(),
        e2e: e2e_results.as_ref(),
        quality: quality_results.as_ref(),
    };
    let markdown = report.markdown();
    println!("{markdown}");
    if let Some(out) = &flags.out {
        std::fs::write(out, &markdown).with_context(|| format!("write {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
