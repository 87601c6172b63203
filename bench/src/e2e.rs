//! Part 2, end to end on loopback: the same simulated workers (which answer at once, so the
//! router is what is measured) behind (a) Envoy (config/envoy.yaml) → ext_proc over TLS →
//! EPP with the default config, (b) the same EPP behind the upstream guide's Envoy config
//! (full duplex both ways, plaintext), (c) that Envoy config in front of the null ext_proc
//! (`null_ext_proc`: the path's floor), (d) Envoy round-robin without ext_proc, and (e) the
//! peer routers `sglang-router` and `vllm-router` (`cache_aware`) when installed. Three
//! load shapes: one client (the added latency, uncontended), many clients (throughput), and
//! a fixed rate below saturation (latency at equal load). Each shape runs every path in
//! turn, twice, so drift on a noisy machine hits all alike. CPU time per request of the
//! router process, of Envoy and of this process (client + workers) comes from
//! /proc/<pid>/stat.

use std::sync::Arc;
use std::time::Duration;

use crate::load::{self, BodyFn, LoadResult, Shape, Target};
use crate::stack::peers::{Peer, PeerKind};
use crate::stack::{Bootstrap, Envoy, Epp, EppOptions, Process, Scratch, Setup, StackError, Workers, cpu_time};
use crate::workload;

#[derive(Clone, Debug)]
pub struct E2eOptions {
    pub workers: usize,
    pub prompt_bytes: usize,
    pub max_tokens: u32,
    /// Clients of the throughput shape.
    pub clients: usize,
    /// Length of one half of a shape on one path (each path gets two halves).
    pub half: Duration,
    /// The fixed rate is this fraction of the slower path's closed-loop throughput.
    pub rate_fraction: f64,
    pub warmup_requests: u64,
    /// Also run `sglang-router` and `vllm-router` (when installed) on the same workers.
    pub peers: bool,
}

impl E2eOptions {
    pub fn full() -> E2eOptions {
        E2eOptions {
            workers: 4,
            prompt_bytes: 1024,
            max_tokens: 16,
            clients: 16,
            half: Duration::from_secs(4),
            rate_fraction: 0.5,
            warmup_requests: 300,
            peers: true,
        }
    }

    pub fn smoke() -> E2eOptions {
        E2eOptions {
            half: Duration::from_millis(400),
            warmup_requests: 20,
            clients: 4,
            peers: false,
            ..E2eOptions::full()
        }
    }
}

/// One path's result for one load shape.
#[derive(Clone, Default)]
pub struct PathRun {
    pub load: LoadResult,
    /// CPU time of the routing process: the EPP, or the peer router (None for Envoy
    /// round-robin, which has none).
    pub router_cpu: Option<Duration>,
    /// CPU time of Envoy (None for the peers, which have no Envoy in front).
    pub envoy_cpu: Option<Duration>,
    /// This process: the load generator and the simulated workers.
    pub bench_cpu: Duration,
}

fn add_opt(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (None, b) => b,
        (a, None) => a,
    }
}

impl PathRun {
    fn add(&mut self, load: &LoadResult, router: Option<Duration>, envoy: Option<Duration>, bench: Duration) {
        self.load.merge(load);
        self.router_cpu = add_opt(self.router_cpu, router);
        self.envoy_cpu = add_opt(self.envoy_cpu, envoy);
        self.bench_cpu += bench;
    }

    /// CPU time per successful request.
    pub fn per_request(&self, cpu: Duration) -> Duration {
        if self.load.ok == 0 { Duration::ZERO } else { cpu.div_f64(self.load.ok as f64) }
    }
}

/// The paths compared, in the order they run within a half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// Envoy (config/envoy.yaml) → ext_proc over TLS → EPP.
    EppOurs,
    /// Envoy (the upstream guide's envoy.yaml: full duplex both ways, plaintext) → EPP.
    EppGuide,
    /// The same Envoy config → an ext_proc server that decides nothing (the path's floor).
    NullExtProc,
    RoundRobin,
    Peer(PeerKind),
}

impl PathKind {
    pub fn label(self) -> &'static str {
        match self {
            PathKind::EppOurs => "EPP, config/envoy.yaml",
            PathKind::EppGuide => "EPP, guide's envoy.yaml",
            PathKind::NullExtProc => "null ext_proc, guide's envoy.yaml",
            PathKind::RoundRobin => "Envoy round-robin",
            PathKind::Peer(PeerKind::Sglang) => "sglang-router cache_aware",
            PathKind::Peer(PeerKind::Vllm) => "vllm-router cache_aware",
        }
    }
}

#[derive(Clone)]
pub struct ShapeRun {
    pub name: String,
    pub paths: Vec<(PathKind, PathRun)>,
}

impl ShapeRun {
    pub fn path(&self, kind: PathKind) -> Option<&PathRun> {
        self.paths.iter().find(|(k, _)| *k == kind).map(|(_, r)| r)
    }

    /// `kind`'s throughput over round-robin's.
    pub fn throughput_ratio(&self, kind: PathKind) -> Option<f64> {
        let (a, b) = (self.path(kind)?, self.path(PathKind::RoundRobin)?);
        Some(a.load.throughput() / b.load.throughput())
    }
}

#[derive(Clone)]
pub struct E2eResults {
    pub options: E2eOptions,
    /// Whether Envoy reached the EPP over TLS with our config.
    pub tls: bool,
    pub shapes: Vec<ShapeRun>,
    /// Peers that could not run (not installed) and why.
    pub skipped: Vec<String>,
}

/// A running path: where to send, and the processes whose CPU counts.
struct Path<'a> {
    kind: PathKind,
    url: String,
    router: Option<&'a Process>,
    envoy: Option<&'a Process>,
}

/// Runs every path over every shape; `progress` hears one line per shape.
pub async fn run(opts: &E2eOptions, setup: &Setup, progress: &mut dyn FnMut(String)) -> Result<E2eResults, StackError> {
    let scratch = Scratch::new("e2e")?;
    let base = sim::SimConfig { time_scale: 0.0, ..Default::default() };
    let workers = Workers::spawn(opts.workers, &base).await?;
    let endpoints = scratch.write("endpoints.yaml", &workers.endpoints_yaml())?;
    let config = epp::config::DEFAULT_CONFIG.replace("path: endpoints.yaml", &format!("path: {}", endpoints.display()));
    let epp = Epp::start(setup, &scratch, &config).await?;
    let via_epp = Envoy::ext_proc(setup, &scratch, epp.grpc_port).await?;
    // The guide runs the EPP with --secure-serving=false behind its own Envoy config.
    let guide_scratch = Scratch::new("e2e-guide")?;
    let epp_plain =
        Epp::start_with(&setup.epp, &guide_scratch, &config, &EppOptions { plaintext: true, ..Default::default() })
            .await?;
    let via_guide = Envoy::ext_proc_with(&setup.envoy, &guide_scratch, epp_plain.grpc_port, Bootstrap::Guide).await?;
    let null_server = start_null_ext_proc(&guide_scratch, &workers).await?;
    let via_null = Envoy::ext_proc_with(&setup.envoy, &guide_scratch, null_server.1, Bootstrap::Guide).await?;
    let via_rr = Envoy::round_robin(setup, &scratch, &workers).await?;
    let addrs: Vec<std::net::SocketAddr> = workers.handles.iter().map(|h| h.addr()).collect();
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    if opts.peers {
        for kind in PeerKind::ALL {
            if !kind.available() {
                skipped.push(format!("{} is not installed", kind.name()));
                continue;
            }
            peers.push(Peer::start(kind, "cache_aware", &addrs, &scratch).await?);
        }
    }
    let path = "/v1/chat/completions";
    let mut paths = vec![
        Path {
            kind: PathKind::EppOurs,
            url: via_epp.url(path),
            router: Some(&epp.process),
            envoy: Some(&via_epp.process),
        },
        Path {
            kind: PathKind::EppGuide,
            url: via_guide.url(path),
            router: Some(&epp_plain.process),
            envoy: Some(&via_guide.process),
        },
        Path {
            kind: PathKind::NullExtProc,
            url: via_null.url(path),
            router: Some(&null_server.0),
            envoy: Some(&via_null.process),
        },
        Path { kind: PathKind::RoundRobin, url: via_rr.url(path), router: None, envoy: Some(&via_rr.process) },
    ];
    for p in &peers {
        paths.push(Path { kind: PathKind::Peer(p.kind), url: p.url(path), router: Some(&p.process), envoy: None });
    }

    // Distinct prompts over a few shared system prompts, as real traffic: identical
    // prompts would all stick to one worker through the prefix scorer.
    let bodies: Arc<Vec<String>> = Arc::new(
        (0..64u64)
            .map(|k| {
                let system = workload::text(k % 8, opts.prompt_bytes * 3 / 4);
                let user = workload::text(10_000 + k, opts.prompt_bytes / 4);
                workload::chat_body(&system, &user, opts.max_tokens, false)
            })
            .collect(),
    );
    let body: BodyFn = {
        let bodies = bodies.clone();
        Arc::new(move |k| bodies[(k % bodies.len() as u64) as usize].clone())
    };
    let target = |url: &str, clients: usize| Target {
        client: load::client(clients),
        url: url.to_string(),
        body: body.clone(),
        stream: false,
        record_from: 0,
    };

    for p in &paths {
        let warm = Shape::Requests { clients: 4, total: opts.warmup_requests };
        let r = load::run(&target(&p.url, 4), warm).await;
        if r.errors > 0 {
            return Err(StackError::Setup(format!(
                "warm-up of {} failed: {}",
                p.kind.label(),
                r.first_error.unwrap_or_default()
            )));
        }
    }

    let mut shapes = Vec::new();
    let serial = Shape::Clients { clients: 1, duration: opts.half };
    shapes.push(run_shape("1 client (closed loop)", serial, 1, &paths, &target).await?);
    progress(describe(shapes.last()));
    let many = Shape::Clients { clients: opts.clients, duration: opts.half };
    let name = format!("{} clients (closed loop)", opts.clients);
    shapes.push(run_shape(&name, many, opts.clients, &paths, &target).await?);
    progress(describe(shapes.last()));
    let slower = shapes[1].paths.iter().map(|(_, r)| r.load.throughput()).fold(f64::INFINITY, f64::min);
    let per_sec = (slower * opts.rate_fraction).max(10.0).round();
    let rate = Shape::Rate { per_sec, duration: opts.half };
    let name = format!("{per_sec:.0} req/s (open loop)");
    shapes.push(run_shape(&name, rate, opts.clients, &paths, &target).await?);
    progress(describe(shapes.last()));
    let tls = crate::stack::ext_proc_uses_tls() && !setup.plaintext_ext_proc;
    Ok(E2eResults { options: opts.clone(), tls, shapes, skipped })
}

/// Starts this binary as the null ext_proc server (its own process, so that its CPU time is
/// measured as the EPP's is), sending to `workers` in turn; the process and its port.
async fn start_null_ext_proc(scratch: &Scratch, workers: &Workers) -> Result<(Process, u16), StackError> {
    let exe = std::env::current_exe().map_err(|e| StackError::Setup(format!("this binary's path: {e}")))?;
    let port = crate::stack::free_port()?;
    let destinations: Vec<String> = workers.handles.iter().map(|h| h.addr().to_string()).collect();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--serve-null-ext-proc").arg(port.to_string()).arg("--null-destinations").arg(destinations.join(","));
    let mut process = Process::spawn("null ext_proc", &mut cmd, scratch.log("null-ext-proc.log"))?;
    crate::stack::wait_until(&mut process, "the null ext_proc's port", Duration::from_secs(30), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await?;
    Ok((process, port))
}

fn describe(s: Option<&ShapeRun>) -> String {
    let Some(s) = s else { return String::new() };
    let parts: Vec<String> = s
        .paths
        .iter()
        .map(|(k, r)| {
            format!(
                "{} {:.0} req/s p50 {}",
                k.label(),
                r.load.throughput(),
                crate::latency::fmt_duration(r.load.latency.summary().p50)
            )
        })
        .collect();
    format!("e2e: {}: {}", s.name, parts.join(" | "))
}

async fn run_shape(
    name: &str,
    shape: Shape,
    clients: usize,
    paths: &[Path<'_>],
    target: &impl Fn(&str, usize) -> Target,
) -> Result<ShapeRun, StackError> {
    let mut run = ShapeRun { name: name.into(), paths: paths.iter().map(|p| (p.kind, PathRun::default())).collect() };
    let me = std::process::id();
    // One client per path for both halves: connections stay warm between them.
    let targets: Vec<Target> = paths.iter().map(|p| target(&p.url, clients)).collect();
    let cpu = |p: Option<&Process>| -> Result<Option<Duration>, StackError> { p.map(|p| p.cpu_time()).transpose() };
    for _half in 0..2 {
        for (i, p) in paths.iter().enumerate() {
            let (r0, e0, b0) = (cpu(p.router)?, cpu(p.envoy)?, cpu_time(me)?);
            let r = load::run(&targets[i], shape).await;
            let (r1, e1, b1) = (cpu(p.router)?, cpu(p.envoy)?, cpu_time(me)?);
            let diff = |a: Option<Duration>, b: Option<Duration>| a.zip(b).map(|(a, b)| b.saturating_sub(a));
            run.paths[i].1.add(&r, diff(r0, r1), diff(e0, e1), b1.saturating_sub(b0));
        }
    }
    Ok(run)
}
