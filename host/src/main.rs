//! The `epp` binary: parses the upstream EPP's flags, sets up logging and runs the server
//! until SIGTERM or Ctrl-C. Everything else lives in the library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use epp::server::{ConfigSource, Options};

/// mimalloc instead of the system allocator: the request path allocates and frees many small
/// buffers (gRPC frames, header strings, parsed bodies), and glibc's malloc spent about a
/// tenth of the process's CPU on them (docs/benchmarks.md, Findings §2).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The llm-d endpoint picker for deployments without Kubernetes, with WebAssembly plugins.
/// Without a subcommand it serves; `epp plugin …` is the plugin toolkit.
#[derive(Parser, Debug)]
#[command(name = "epp", version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Flags,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Write, check and benchmark plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// A/B experiments.
    #[command(subcommand)]
    Experiment(ExperimentCommand),
    /// Replay a workload on a simulated cluster in virtual time and compare policies.
    Replay(Box<epp::replay::ReplayArgs>),
}

#[derive(clap::Subcommand, Debug)]
enum ExperimentCommand {
    /// Compare the variants of a running (or recorded) experiment side by side.
    Report {
        /// The EPP's metrics endpoint, e.g. http://127.0.0.1:9090/metrics.
        #[arg(long, conflicts_with = "file")]
        url: Option<String>,
        /// A saved scrape of that endpoint.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(clap::Subcommand, Debug)]
enum PluginCommand {
    /// Scaffold a plugin crate that builds to a component.
    New {
        /// Crate name, e.g. `prefer-h100`.
        name: String,
        /// producer, filter, scorer or picker.
        #[arg(long, default_value = "scorer")]
        role: String,
        /// Where to create it (default: ./<name>).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Depend on this SDK checkout (default: write the SDK this binary carries beside
        /// the plugin, so it builds anywhere; `$LLMD_PLUGIN_SDK` also names a checkout).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Validate a component exactly as a reload would: contract, role, configure, probe.
    Check {
        file: PathBuf,
        /// The `parameters` it will get, as JSON.
        #[arg(long, default_value = "{}")]
        parameters: String,
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        #[arg(long, default_value_t = 50)]
        call_timeout_ms: u64,
    },
    /// Per-call latency at 8, 100 and 512 endpoints.
    Bench {
        file: PathBuf,
        #[arg(long, default_value = "{}")]
        parameters: String,
    },
}

#[derive(clap::Args, Debug)]
struct Flags {
    /// Port of the Envoy ext_proc gRPC service (also serves gRPC health).
    #[arg(long, default_value_t = 9002)]
    grpc_port: u16,
    /// Port of the gRPC health service.
    #[arg(long, default_value_t = 9003)]
    grpc_health_port: u16,
    /// Port of the Prometheus metrics endpoint.
    #[arg(long, default_value_t = 9090)]
    metrics_port: u16,
    /// How often each worker's /metrics is scraped (e.g. 50ms).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    refresh_metrics_interval: Duration,
    /// How often the pool-level Prometheus gauges are recomputed.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    refresh_prometheus_metrics_interval: Duration,
    /// Worker metrics older than this are unknown to the scorers.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    metrics_staleness_threshold: Duration,
    /// Address the metrics endpoint listens on (defaults to --bind-address; use 127.0.0.1
    /// to keep it local).
    #[arg(long)]
    metrics_bind_address: Option<IpAddr>,
    /// vLLM metric: requests waiting in the queue.
    #[arg(long, default_value = "vllm:num_requests_waiting")]
    total_queued_requests_metric: String,
    /// vLLM metric: requests running.
    #[arg(long, default_value = "vllm:num_requests_running")]
    total_running_requests_metric: String,
    /// vLLM metric: KV-cache usage in [0, 1] (older vLLM: vllm:gpu_cache_usage_perc, used as a fallback).
    #[arg(long, default_value = "vllm:kv_cache_usage_perc")]
    kv_cache_usage_percentage_metric: String,
    /// vLLM metric: LoRA adapters (labels max_lora, running_lora_adapters, waiting_lora_adapters).
    #[arg(long, default_value = "vllm:lora_requests_info")]
    lora_info_metric: String,
    /// vLLM metric: cache config (labels block_size, num_gpu_blocks).
    #[arg(long, default_value = "vllm:cache_config_info")]
    cache_info_metric: String,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    bind_address: IpAddr,
    /// EndpointPickerConfig file (YAML). Without it (and without --config-text) the built-in
    /// optimized baseline is used.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// EndpointPickerConfig as text.
    #[arg(long)]
    config_text: Option<String>,
    /// Serve ext_proc over TLS (self-signed unless --cert-path is given).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    secure_serving: bool,
    /// Folder holding tls.crt and tls.key for --secure-serving.
    #[arg(long)]
    cert_path: Option<PathBuf>,
    /// After SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Bind the listeners with SO_REUSEPORT, so a replacement EPP can start on the same
    /// ports while this one still serves (see docs/reliability.md, "Replacing the EPP").
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    reuse_port: bool,
    /// Share routing state (prefix index, LRU, in-flight load) with other EPP replicas
    /// through Redis: `redis://host:port[/db]` (default: this process only). Overrides
    /// the config's `stateStore`.
    #[arg(long)]
    state_store: Option<String>,
    /// Name of the pool (a label on logs and metrics here).
    #[arg(long, default_value = "epp")]
    pool_name: String,
    /// Namespace of the pool (a label on logs and metrics here).
    #[arg(long, default_value = "default")]
    pool_namespace: String,
    /// Accepted for compatibility: gRPC health is always served, on both gRPC ports.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    health_checking: bool,
    /// Keep compiled plugins in wasmtime's on-disk cache (faster restarts).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    wasm_compile_cache: bool,
    /// Requests in flight (routed, response not finished) beyond this get 429 at once.
    #[arg(long, default_value_t = epp::routing::DEFAULT_MAX_IN_FLIGHT)]
    max_inflight_requests: usize,
    /// Largest request body buffered, in bytes; larger requests get 413.
    #[arg(long, default_value_t = epp::ext_proc::DEFAULT_MAX_BODY_BYTES)]
    max_request_body_bytes: usize,
    /// Passive breaker: how long a streamed request may wait for its response headers
    /// before the endpoint counts as stalled (0 turns the breaker off).
    #[arg(long, default_value = "1s", value_parser = parse_duration_or_zero)]
    endpoint_stall_timeout: Duration,
    /// Passive breaker: stalled requests needed to take an endpoint out of routing.
    #[arg(long, default_value_t = 1)]
    endpoint_stall_requests: usize,
    /// Passive breaker: consecutive 5xx (or unanswered) responses that take an endpoint out.
    #[arg(long, default_value_t = 5)]
    endpoint_failure_threshold: u32,
    /// Passive breaker: first cool-down of an ejected endpoint (doubles on repeats, up to 10×).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    endpoint_ejection_cooldown: Duration,
    /// Log verbosity: 1 warnings, 2 info (default), 3-4 debug, 5+ trace. RUST_LOG overrides.
    #[arg(long = "v", default_value_t = 2)]
    verbosity: u8,
}

/// Errors are printed as one chain ("error: what failed: why"), never as a backtrace: the
/// reason (a port in use, a missing file) is what an operator needs, and with
/// `RUST_BACKTRACE` set a backtrace would push it out of view.
fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let flags = cli.serve;
    match cli.command {
        Some(Command::Plugin(cmd)) => {
            init_logging(flags.verbosity.min(1));
            let ok = plugin_command(cmd)?;
            std::process::exit(if ok { 0 } else { 1 });
        }
        Some(Command::Experiment(ExperimentCommand::Report { url, file })) => {
            init_logging(flags.verbosity.min(1));
            let text = match (url, file) {
                (Some(url), _) => {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    rt.block_on(async { reqwest::get(&url).await?.error_for_status()?.text().await })
                        .with_context(|| format!("cannot fetch {url}"))?
                }
                (None, Some(path)) => {
                    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?
                }
                (None, None) => bail!("give --url <metrics endpoint> or --file <saved scrape>"),
            };
            epp::experiment::report::report(&text, &mut std::io::stdout())?;
            return Ok(());
        }
        Some(Command::Replay(args)) => {
            init_logging(flags.verbosity.min(1));
            let ok = epp::replay::run_cli(*args, &mut std::io::stdout())?;
            std::process::exit(if ok { 0 } else { 1 });
        }
        None => {}
    }
    init_logging(flags.verbosity);
    let config = match (flags.config_file, flags.config_text) {
        (Some(_), Some(_)) => bail!("give either --config-file or --config-text, not both"),
        (Some(path), None) => ConfigSource::File(path),
        (None, Some(text)) => ConfigSource::Text(text),
        (None, None) => ConfigSource::Default,
    };
    let opts = Options {
        bind: flags.bind_address,
        grpc_port: flags.grpc_port,
        grpc_health_port: flags.grpc_health_port,
        metrics_port: flags.metrics_port,
        metrics_bind: flags.metrics_bind_address.unwrap_or(flags.bind_address),
        refresh_prometheus_interval: flags.refresh_prometheus_metrics_interval,
        refresh_metrics_interval: flags.refresh_metrics_interval.max(Duration::from_millis(1)),
        metrics_staleness: flags.metrics_staleness_threshold,
        metric_names: epp::metrics_scrape::MetricNames {
            waiting: flags.total_queued_requests_metric,
            running: flags.total_running_requests_metric,
            kv_usage: flags.kv_cache_usage_percentage_metric,
            lora: flags.lora_info_metric,
            cache: flags.cache_info_metric,
            ..Default::default()
        },
        config,
        max_body_bytes: flags.max_request_body_bytes,
        max_in_flight: flags.max_inflight_requests.max(1),
        wasm_disk_cache: flags.wasm_compile_cache,
        secure_serving: flags.secure_serving,
        cert_path: flags.cert_path,
        drain_timeout: flags.drain_timeout,
        reuse_port: flags.reuse_port,
        state_store: flags.state_store,
        pool_name: flags.pool_name,
        pool_namespace: flags.pool_namespace,
        health: epp::health::HealthConfig {
            stall_timeout: flags.endpoint_stall_timeout,
            stall_min: flags.endpoint_stall_requests.max(1),
            failure_threshold: flags.endpoint_failure_threshold.max(1),
            cooldown: flags.endpoint_ejection_cooldown,
            max_cooldown: flags.endpoint_ejection_cooldown.saturating_mul(10),
        },
    };
    if let Err(e) = opts.metric_names.check() {
        bail!("{e}");
    }
    // An engine config may leave a metric out; vLLM always has these two.
    for (flag, name) in [
        ("--total-queued-requests-metric", &opts.metric_names.waiting),
        ("--total-running-requests-metric", &opts.metric_names.running),
    ] {
        if name.trim().is_empty() {
            bail!("{flag} must name a metric");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async { epp::server::run(opts, shutdown_signal()).await.context("epp failed") })
}

fn plugin_command(cmd: PluginCommand) -> anyhow::Result<bool> {
    use epp::toolkit;
    let mut out = std::io::stdout();
    match cmd {
        PluginCommand::New { name, role, dir, sdk } => {
            let role = toolkit::parse_role(&role).map_err(anyhow::Error::msg)?;
            let cwd = std::env::current_dir()?;
            let dir = dir.unwrap_or_else(|| cwd.join(&name));
            let files = toolkit::scaffold(&name, role, &dir, &toolkit::sdk_source(sdk)).map_err(anyhow::Error::msg)?;
            for f in &files {
                println!("created {}", f.display());
            }
            println!(
                "build it:  cargo build --release --target wasm32-wasip2 --manifest-path {}/Cargo.toml",
                dir.display()
            );
            Ok(true)
        }
        PluginCommand::Check { file, parameters, memory_mib, call_timeout_ms } => {
            let sandbox =
                epp::wasm::Sandbox { memory_bytes: (memory_mib as usize) << 20, call_timeout_ms, ..Default::default() };
            Ok(toolkit::check(&mut out, &file, &parameters, sandbox)?)
        }
        PluginCommand::Bench { file, parameters } => {
            Ok(toolkit::bench(&mut out, &file, &parameters, epp::wasm::Sandbox::default())?)
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested");
}

/// A duration like `50ms`, `2s`, `1.5s` or `1m` (a bare number means seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    // A bare number of seconds is held to the same bound as `1m` and the like.
    let parsed = epp::config::parse_duration(s).or_else(|| {
        s.trim()
            .parse::<f64>()
            .ok()
            .and_then(|v| Duration::try_from_secs_f64(v).ok())
            .filter(|d| d.as_millis() <= u128::from(u32::MAX))
    });
    match parsed {
        Some(d) if !d.is_zero() => Ok(d),
        Some(_) => Err(format!("`{s}` must be positive")),
        None => Err(format!("`{s}` is not a duration like 50ms or 2s")),
    }
}

/// Like `parse_duration`, and `0` is allowed (turns the feature off).
fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches(['s', 'm']).trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

fn init_logging(v: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match v {
        0 | 1 => "warn",
        2 => "info",
        3 | 4 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{level},wasmtime=warn,cranelift=warn,h2=warn,tower=warn,hyper=warn"))
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi).init();
}
