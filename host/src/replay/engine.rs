//! The discrete-event loop of one policy over one workload: requests arrive in order; before
//! each arrival the cluster is brought to its time (scrapes taken, completions delivered to
//! the plugins' `response-complete` hooks in time order), then the policy routes the request
//! on the scraped metrics and the chosen worker's model admits it. After the last arrival
//! the workers run dry. The outcome is one record per request.
//!
//! Deterministic for a workload and seed: there is no wall clock here, events are ordered
//! by (time, worker, request), and each request's random seed is derived from its id and
//! the run seed. It computes no statistics (that is `report.rs`).

use epp_core::{Completion, Request, Usage};
use sim::model::{AdmitError, EventKind, ModelParams, ModelRequest, ParamsError, PoolShape};

use std::collections::VecDeque;

use super::cluster::{Cluster, WorkerEvent};
use super::policy::Policy;
use super::workload::Workload;
use crate::flow::Dropped;
use crate::flow::detector::{self, EndpointLoad};
use crate::flow::queue::{Expiry, FlowQueues, Meta, Rejection};
use crate::routing::{DEFAULT_METRICS_STALENESS_MS, RouteError};

/// The simulated cluster a run uses.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSetup {
    pub workers: usize,
    pub params: ModelParams,
    /// How workers differ from `params` (KV blocks, speed); empty for a uniform pool.
    pub shape: PoolShape,
    /// Seconds between two scrapes of a worker's metrics; 0 shows the scheduler the live state.
    pub scrape_interval: f64,
    /// Requests ask for streamed responses; when false the first response bytes come with
    /// the whole answer (the `first-chunk` hook then, and the TTFT is the whole response's).
    pub stream: bool,
}

/// What became of a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    /// Still in a worker (only while running).
    InFlight,
    /// Served: first token and finish time (seconds), with the worker's usage.
    Completed { first_token: f64, finished: f64, usage: Usage },
    /// Answered by the EPP with this HTTP status (429 shed, 503 no endpoint, …).
    Rejected(u16),
    /// Refused by the worker: prompt plus output exceed its KV cache (vLLM answers 400).
    TooLarge,
}

/// One request's record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Record {
    pub arrival: f64,
    pub worker: Option<u32>,
    pub outcome: Outcome,
    /// Set by the first token event, moved into `Completed` at the finish.
    first_token: Option<f64>,
    /// The variant that routed it (its plugins get the request's hooks).
    variant: usize,
}

impl Record {
    /// A record with a known outcome (no worker): for callers building results by hand.
    pub fn new(arrival: f64, outcome: Outcome) -> Record {
        Record { arrival, worker: None, outcome, first_token: None, variant: 0 }
    }
}

/// Everything a run produced.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    pub policy: String,
    pub records: Vec<Record>,
    /// Sum and count of `max/mean running` samples, one per arrival when any worker runs.
    pub imbalance_sum: f64,
    pub imbalance_samples: u64,
    /// Per record, its tenant (index into `tenant_names`), when the workload has tenants.
    pub tenants: Vec<Option<u16>>,
    pub tenant_names: Vec<String>,
    /// Per record, the model it asked for (index into `model_names`: the base model or a
    /// LoRA adapter).
    pub models: Vec<u16>,
    pub model_names: Vec<String>,
}

/// The request id the EPP and plugins see for request `index`.
pub fn request_id(index: usize) -> String {
    format!("replay-{index}")
}

/// Virtual seconds as the milliseconds plugins see (`now-ms`).
fn ms(seconds: f64) -> u64 {
    (seconds * 1000.0).max(0.0) as u64
}

/// Runs `policy` over `workload`; `tick(n)` reports `n` more requests routed (progress).
///
/// With flow control in the policy's config, a request that finds the pool saturated (or
/// others queued) waits in a model of the EPP's queues; the queues are checked for room
/// every `FLOW_STEP_S` of virtual time and on every arrival, as the EPP's dispatcher wakes
/// on its ticker and on arrivals.
pub fn run(
    policy: &mut Policy,
    workload: &Workload,
    setup: &ClusterSetup,
    seed: u64,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<RunResult, ParamsError> {
    let mut cluster = Cluster::new(setup.workers, setup.params.clone(), &setup.shape, setup.scrape_interval)?;
    if let Some(hub) = &policy.kv_events {
        cluster.record_kv_events();
        for w in 0..cluster.len() {
            hub.set_live(w as u32, true);
        }
    }
    let (generation, endpoints) = cluster.pool();
    policy.pool_changed(generation, endpoints);
    let records: Vec<Record> = workload
        .items
        .iter()
        .map(|i| Record { arrival: i.at, worker: None, outcome: Outcome::InFlight, first_token: None, variant: 0 })
        .collect();
    let tenants: Vec<String> = {
        let mut names: Vec<String> =
            workload.items.iter().filter_map(|i| i.tenant.as_deref().map(str::to_owned)).collect();
        names.sort();
        names.dedup();
        names
    };
    let queues = policy.flow.clone().map(|spec| FlowQueues::new(spec, 0.0));
    let mut run = Run {
        workload,
        seed,
        stream: setup.stream,
        in_flight: vec![0; cluster.len()],
        routed_at: vec![VecDeque::new(); cluster.len()],
        cluster,
        records,
        events: Vec::new(),
        queues,
        result: RunResult {
            policy: policy.name.clone(),
            records: Vec::new(),
            imbalance_sum: 0.0,
            imbalance_samples: 0,
            tenants: Vec::new(),
            tenant_names: Vec::new(),
            models: Vec::new(),
            model_names: Vec::new(),
        },
    };
    let mut pending_ticks = 0u64;
    let mut clock = 0.0f64;
    for (index, item) in workload.items.iter().enumerate() {
        let now = item.at;
        if run.queues.is_some() {
            // Dispatch opportunities between arrivals.
            while clock + FLOW_STEP_S < now {
                clock += FLOW_STEP_S;
                run.advance(policy, clock);
                run.flow_cycle(policy, clock);
            }
        }
        clock = clock.max(now);
        run.advance(policy, now);
        sample_imbalance(&run.cluster, &mut run.result);
        if run.queues.is_some() {
            run.flow_cycle(policy, now);
            run.submit(policy, index, now);
        } else {
            run.route(policy, index, now);
        }
        pending_ticks += 1;
        if pending_ticks == 256 {
            tick(pending_ticks);
            pending_ticks = 0;
        }
    }
    tick(pending_ticks);
    // What is still queued leaves as the workers free up (or by its TTL).
    let give_up = clock + MAX_DRAIN_S;
    while run.queues.as_ref().is_some_and(|q| !q.is_empty()) && clock < give_up {
        clock += FLOW_STEP_S;
        run.advance(policy, clock);
        run.flow_cycle(policy, clock);
    }
    if let Some(q) = run.queues.as_mut() {
        for (_, _, index) in q.drain() {
            run.records[index].outcome =
                Outcome::Rejected(RouteError::FlowControl(Dropped::ShuttingDown).reply().status);
        }
    }
    run.cluster.drain(&mut run.events);
    deliver(policy, &mut run.events, &mut run.records, &mut run.in_flight, run.stream);
    run.result.records = run.records;
    run.result.tenants = workload
        .items
        .iter()
        .map(|i| i.tenant.as_deref().and_then(|t| tenants.iter().position(|n| n == t)).map(|k| k as u16))
        .collect();
    run.result.tenant_names = tenants;
    let model_names: Vec<String> = workload
        .items
        .iter()
        .map(|i| i.requested_model())
        .collect::<std::collections::BTreeSet<&str>>()
        .into_iter()
        .map(str::to_owned)
        .collect();
    run.result.models = workload
        .items
        .iter()
        .map(|i| {
            let k = model_names.binary_search_by(|n| n.as_str().cmp(i.requested_model())).unwrap_or(0);
            u16::try_from(k).unwrap_or(u16::MAX)
        })
        .collect();
    run.result.model_names = model_names;
    Ok(run.result)
}

/// Virtual seconds between two dispatch checks of the modelled flow control.
pub const FLOW_STEP_S: f64 = 0.005;
/// After the last arrival, queued requests get this long to be dispatched.
const MAX_DRAIN_S: f64 = 3600.0;

/// One policy's run in progress.
struct Run<'a> {
    workload: &'a Workload,
    seed: u64,
    /// `ClusterSetup::stream`.
    stream: bool,
    cluster: Cluster,
    records: Vec<Record>,
    events: Vec<WorkerEvent>,
    /// Requests admitted to each worker and not finished (the EPP's own count).
    in_flight: Vec<u32>,
    /// When requests were routed to each worker lately (to count those since its scrape).
    routed_at: Vec<VecDeque<f64>>,
    /// The modelled flow-control queues (request indices), when the policy has them.
    queues: Option<FlowQueues<usize>>,
    result: RunResult,
}

impl Run<'_> {
    /// Brings the cluster to `now` and hands its events to the records and plugins.
    fn advance(&mut self, policy: &mut Policy, now: f64) {
        if self.cluster.advance(now, &mut self.events) {
            let (generation, endpoints) = self.cluster.pool();
            policy.pool_changed(generation, endpoints);
        }
        if let Some(hub) = &policy.kv_events {
            let block_size = u32::try_from(self.cluster.params().block_size).unwrap_or(u32::MAX);
            for w in 0..self.cluster.len() {
                let events = self.cluster.drain_kv_events(w);
                if !events.is_empty() {
                    hub.apply(w as u32, "", &crate::kv_events::from_sim(events, block_size));
                }
            }
        }
        deliver(policy, &mut self.events, &mut self.records, &mut self.in_flight, self.stream);
    }

    /// The pool's saturation by the flow spec's detector, as the EPP computes it.
    fn saturation(&mut self, spec: &crate::config::flow::FlowSpec, now: f64) -> f64 {
        let m = self.cluster.metrics(now, u32::MAX);
        let loads: Vec<EndpointLoad> = (0..m.len())
            .map(|w| {
                let scraped_at = now - f64::from(m.age_ms[w]) / 1000.0;
                let recent = &mut self.routed_at[w];
                while recent.front().is_some_and(|&t| t < now - 5.0) {
                    recent.pop_front();
                }
                EndpointLoad {
                    waiting: m.waiting[w],
                    kv_usage: m.kv_usage[w],
                    age_ms: m.age_ms[w] as u32,
                    routed_since_scrape: recent.iter().filter(|&&t| t >= scraped_at).count() as u32,
                    in_flight: self.in_flight[w],
                    in_flight_tokens: 0,
                }
            })
            .collect();
        detector::saturation(&spec.detector, &loads)
    }

    /// Expires what ran out of time, then dispatches while the pool has room.
    fn flow_cycle(&mut self, policy: &mut Policy, now: f64) {
        let Some(spec) = self.queues.as_ref().map(|q| q.spec().clone()) else { return };
        let Some(q) = self.queues.as_mut() else { return };
        for (_, _, index, why) in q.expire(now) {
            let dropped = match why {
                Expiry::Ttl => Dropped::Ttl,
                Expiry::NoEndpoints => Dropped::TtlNoEndpoints,
            };
            self.records[index].outcome = Outcome::Rejected(RouteError::FlowControl(dropped).reply().status);
        }
        loop {
            let sat = self.saturation(&spec, now);
            let Some((_, _, index)) = self.queues.as_mut().and_then(|q| q.pop(sat, now)) else { break };
            self.route(policy, index, now);
        }
    }

    /// An arrival under flow control: routed now when nothing waits and there is room,
    /// else queued (or refused over the limits).
    fn submit(&mut self, policy: &mut Policy, index: usize, now: f64) {
        let Some(spec) = self.queues.as_ref().map(|q| q.spec().clone()) else { return };
        let idle = self.queues.as_ref().is_some_and(|q| q.is_empty());
        if idle && self.saturation(&spec, now) < spec.usage_limit {
            self.route(policy, index, now);
            return;
        }
        let item = &self.workload.items[index];
        let meta = Meta {
            flow: item.tenant.as_deref().unwrap_or(crate::flow::DEFAULT_FLOW).to_string(),
            priority: item.priority,
            bytes: item.prompt.len() as u64,
            enqueued: now,
        };
        let Some(q) = self.queues.as_mut() else { return };
        if let Err((why, _)) = q.enqueue(meta, index, now) {
            let dropped = match why {
                Rejection::Capacity => Dropped::Capacity,
                Rejection::NoEndpoints => Dropped::CapacityNoEndpoints,
            };
            self.records[index].outcome = Outcome::Rejected(RouteError::FlowControl(dropped).reply().status);
        }
    }

    /// Routes request `index` at `now` and admits it to the chosen worker.
    fn route(&mut self, policy: &mut Policy, index: usize, now: f64) {
        let item = &self.workload.items[index];
        let mut prompt = Vec::with_capacity(item.prompt.len());
        item.prompt.write_to(&mut prompt);
        let model = item.requested_model();
        let id = request_id(index);
        let prompt = String::from_utf8_lossy(&prompt).into_owned();
        let headers: Vec<(String, String)> = item.headers().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let req = Request {
            random_seed: xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), self.seed),
            id,
            model: model.to_string(),
            prompt_tokens: Request::estimate_tokens(prompt.len()),
            prompt,
            max_tokens: Some(item.output_tokens),
            cache_salt: item.cache_salt.as_deref().map(str::to_owned),
            headers,
            priority: item.priority,
            // Plugins see virtual time.
            now_ms: ms(now),
            user: None,
            stream: self.stream,
            messages: None,
        };
        let candidates = self.cluster.metrics(now, DEFAULT_METRICS_STALENESS_MS);
        let record = &mut self.records[index];
        // Cycle ids are the request index + 1: unique and reproducible.
        let cycle = index as u64 + 1;
        match policy.route(cycle, &req, candidates) {
            Ok((worker, variant)) => {
                record.worker = Some(worker);
                record.variant = variant;
                let salt = item.cache_salt.as_deref().unwrap_or_default();
                let model_req = ModelRequest::from_prompt(
                    self.cluster.params(),
                    req.prompt.as_bytes(),
                    &[model.as_bytes(), salt.as_bytes()],
                    item.output_tokens,
                    item.lora.as_deref().map(str::to_owned),
                );
                match self.cluster.admit(worker, now, model_req, index) {
                    Ok(()) => {
                        if let Some(n) = self.in_flight.get_mut(worker as usize) {
                            *n += 1;
                        }
                        if let Some(r) = self.routed_at.get_mut(worker as usize) {
                            r.push_back(now);
                        }
                    }
                    Err(AdmitError::TooLarge { .. }) => {
                        record.outcome = Outcome::TooLarge;
                        let failed = Completion {
                            endpoint: worker,
                            outcome: epp_core::Outcome::Failed,
                            status: 400,
                            usage: None,
                        };
                        policy.finished(variant, cycle, &failed);
                    }
                }
            }
            Err(e) => record.outcome = Outcome::Rejected(e.reply().status),
        }
    }
}

/// Hands the events to the records and completions to the plugins, in time order.
/// Without `stream`, a request's first response bytes are its whole answer.
fn deliver(
    policy: &mut Policy,
    events: &mut Vec<WorkerEvent>,
    records: &mut [Record],
    in_flight: &mut [u32],
    stream: bool,
) {
    // Invariant: a total order, so runs are reproducible whatever order workers reported in.
    events.sort_by(|a, b| a.at.total_cmp(&b.at).then(a.worker.cmp(&b.worker)).then(a.request.cmp(&b.request)));
    for e in events.drain(..) {
        let Some(record) = records.get_mut(e.request) else { continue };
        let cycle = e.request as u64 + 1;
        match e.kind {
            EventKind::Token { index: 0 } if stream => {
                record.first_token = Some(e.at);
                policy.first_chunk(record.variant, cycle, e.worker, ms(e.at));
            }
            EventKind::Token { .. } => {}
            EventKind::Finished(u) => {
                let usage = Usage {
                    prompt_tokens: u.prompt_tokens,
                    cached_tokens: u.cached_tokens,
                    completion_tokens: u.completion_tokens,
                };
                // A prefill-only or non-streamed request's first (and only) answer is its end.
                let first_token = record.first_token.unwrap_or(e.at);
                record.outcome = Outcome::Completed { first_token, finished: e.at, usage };
                if record.first_token.is_none() {
                    policy.first_chunk(record.variant, cycle, e.worker, ms(e.at));
                }
                let done = Completion {
                    endpoint: e.worker,
                    outcome: epp_core::Outcome::Completed,
                    status: 200,
                    usage: Some(usage),
                };
                policy.finished(record.variant, cycle, &done);
                if let Some(n) = in_flight.get_mut(e.worker as usize) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }
}

/// Samples `max/mean` of the running sequences across workers. Arrivals of a Poisson
/// process see time averages (PASTA), so the mean of these samples is the time-averaged
/// imbalance for the generated workloads.
fn sample_imbalance(cluster: &Cluster, result: &mut RunResult) {
    let (mut max, mut sum) = (0usize, 0usize);
    for r in cluster.running() {
        max = max.max(r);
        sum += r;
    }
    if sum > 0 {
        let mean = sum as f64 / cluster.len() as f64;
        result.imbalance_sum += max as f64 / mean;
        result.imbalance_samples += 1;
    }
}
