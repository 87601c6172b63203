//! Part 2, end to end through a real Envoy on loopback: the same simulated workers (which
//! answer at once, so the router is what is measured) behind (a) Envoy → ext_proc → EPP
//! with the default config and (b) Envoy round-robin without ext_proc. Three load shapes:
//! one client (the added latency, uncontended), many clients (throughput), and a fixed rate
//! below saturation (latency at equal load). Each shape runs A, B, A, B in halves so drift
//! on a noisy machine hits both paths alike. CPU time per request of the EPP, of each Envoy
//! and of this process (client + workers) comes from /proc/<pid>/stat.

use std::sync::Arc;
use std::time::Duration;

use crate::load::{self, BodyFn, LoadResult, Shape, Target};
use crate::stack::{Envoy, Epp, Scratch, Setup, StackError, Workers, cpu_time};
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
        }
    }

    pub fn smoke() -> E2eOptions {
        E2eOptions { half: Duration::from_millis(400), warmup_requests: 20, clients: 4, ..E2eOptions::full() }
    }
}

/// One path's result for one load shape.
#[derive(Clone, Default)]
pub struct PathRun {
    pub load: LoadResult,
    /// CPU time of the EPP (None on the round-robin path, which has no EPP).
    pub epp_cpu: Option<Duration>,
    pub envoy_cpu: Duration,
    /// This process: the load generator and the simulated workers.
    pub bench_cpu: Duration,
}

impl PathRun {
    fn add(&mut self, load: &LoadResult, epp: Option<Duration>, envoy: Duration, bench: Duration) {
        self.load.merge(load);
        self.epp_cpu = match (self.epp_cpu, epp) {
            (Some(a), Some(b)) => Some(a + b),
            (None, b) => b,
            (a, None) => a,
        };
        self.envoy_cpu += envoy;
        self.bench_cpu += bench;
    }

    /// CPU time per successful request.
    pub fn per_request(&self, cpu: Duration) -> Duration {
        if self.load.ok == 0 { Duration::ZERO } else { cpu.div_f64(self.load.ok as f64) }
    }
}

#[derive(Clone)]
pub struct ShapeRun {
    pub name: String,
    pub epp: PathRun,
    pub round_robin: PathRun,
}

#[derive(Clone)]
pub struct E2eResults {
    pub options: E2eOptions,
    /// Whether Envoy reached the EPP over TLS.
    pub tls: bool,
    pub shapes: Vec<ShapeRun>,
}

/// Runs both paths over every shape; `progress` hears one line per shape.
pub async fn run(opts: &E2eOptions, setup: &Setup, progress: &mut dyn FnMut(String)) -> Result<E2eResults, StackError> {
    let scratch = Scratch::new("e2e")?;
    let base = sim::SimConfig { time_scale: 0.0, ..Default::default() };
    let workers = Workers::spawn(opts.workers, &base).await?;
    let endpoints = scratch.write("endpoints.yaml", &workers.endpoints_yaml())?;
    let config = epp::config::DEFAULT_CONFIG.replace("path: endpoints.yaml", &format!("path: {}", endpoints.display()));
    let epp = Epp::start(setup, &scratch, &config).await?;
    let via_epp = Envoy::ext_proc(setup, &scratch, epp.grpc_port).await?;
    let via_rr = Envoy::round_robin(setup, &scratch, &workers).await?;

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
    let target = |envoy: &Envoy, clients: usize| Target {
        client: load::client(clients),
        url: envoy.url("/v1/chat/completions"),
        body: body.clone(),
        stream: false,
        record_from: 0,
    };

    for envoy in [&via_epp, &via_rr] {
        let warm = Shape::Requests { clients: 4, total: opts.warmup_requests };
        let r = load::run(&target(envoy, 4), warm).await;
        if r.errors > 0 {
            return Err(StackError::Setup(format!("warm-up failed: {}", r.first_error.unwrap_or_default())));
        }
    }

    let mut shapes = Vec::new();
    let serial = Shape::Clients { clients: 1, duration: opts.half };
    shapes.push(run_shape("1 client (closed loop)", serial, 1, &epp, &via_epp, &via_rr, &target).await?);
    progress(describe(shapes.last()));
    let many = Shape::Clients { clients: opts.clients, duration: opts.half };
    let name = format!("{} clients (closed loop)", opts.clients);
    shapes.push(run_shape(&name, many, opts.clients, &epp, &via_epp, &via_rr, &target).await?);
    progress(describe(shapes.last()));
    let slower = shapes[1].epp.load.throughput().min(shapes[1].round_robin.load.throughput());
    let per_sec = (slower * opts.rate_fraction).max(10.0).round();
    let rate = Shape::Rate { per_sec, duration: opts.half };
    let name = format!("{per_sec:.0} req/s (open loop)");
    shapes.push(run_shape(&name, rate, opts.clients, &epp, &via_epp, &via_rr, &target).await?);
    progress(describe(shapes.last()));
    let tls = crate::stack::ext_proc_uses_tls() && !setup.plaintext_ext_proc;
    Ok(E2eResults { options: opts.clone(), tls, shapes })
}

fn describe(s: Option<&ShapeRun>) -> String {
    let Some(s) = s else { return String::new() };
    format!(
        "e2e: {}: EPP {:.0} req/s p50 {} | round-robin {:.0} req/s p50 {}",
        s.name,
        s.epp.load.throughput(),
        crate::latency::fmt_duration(s.epp.load.latency.summary().p50),
        s.round_robin.load.throughput(),
        crate::latency::fmt_duration(s.round_robin.load.latency.summary().p50),
    )
}

async fn run_shape(
    name: &str,
    shape: Shape,
    clients: usize,
    epp: &Epp,
    via_epp: &Envoy,
    via_rr: &Envoy,
    target: &impl Fn(&Envoy, usize) -> Target,
) -> Result<ShapeRun, StackError> {
    let mut run = ShapeRun { name: name.into(), epp: PathRun::default(), round_robin: PathRun::default() };
    let me = std::process::id();
    // One client per path for both halves: connections stay warm between them.
    let (t_epp, t_rr) = (target(via_epp, clients), target(via_rr, clients));
    for _half in 0..2 {
        let (e0, v0, b0) = (epp.process.cpu_time()?, via_epp.process.cpu_time()?, cpu_time(me)?);
        let r = load::run(&t_epp, shape).await;
        let (e1, v1, b1) = (epp.process.cpu_time()?, via_epp.process.cpu_time()?, cpu_time(me)?);
        run.epp.add(&r, Some(e1.saturating_sub(e0)), v1.saturating_sub(v0), b1.saturating_sub(b0));

        let (v0, b0) = (via_rr.process.cpu_time()?, cpu_time(me)?);
        let r = load::run(&t_rr, shape).await;
        let (v1, b1) = (via_rr.process.cpu_time()?, cpu_time(me)?);
        run.round_robin.add(&r, None, v1.saturating_sub(v0), b1.saturating_sub(b0));
    }
    Ok(run)
}
