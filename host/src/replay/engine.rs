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
use sim::model::{AdmitError, EventKind, ModelParams, ModelRequest, ParamsError};

use super::cluster::{Cluster, WorkerEvent};
use super::policy::Policy;
use super::workload::Workload;
use crate::routing::DEFAULT_METRICS_STALENESS_MS;

/// The simulated cluster a run uses.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSetup {
    pub workers: usize,
    pub params: ModelParams,
    /// Seconds between two scrapes of a worker's metrics; 0 shows the scheduler the live state.
    pub scrape_interval: f64,
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
}

/// The request id the EPP and plugins see for request `index`.
pub fn request_id(index: usize) -> String {
    format!("replay-{index}")
}

/// Runs `policy` over `workload`; `tick(n)` reports `n` more requests routed (progress).
pub fn run(
    policy: &mut Policy,
    workload: &Workload,
    setup: &ClusterSetup,
    seed: u64,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<RunResult, ParamsError> {
    let mut cluster = Cluster::new(setup.workers, setup.params.clone(), setup.scrape_interval)?;
    let (generation, endpoints) = cluster.pool();
    policy.pool_changed(generation, endpoints);
    let mut records: Vec<Record> = workload
        .items
        .iter()
        .map(|i| Record { arrival: i.at, worker: None, outcome: Outcome::InFlight, first_token: None, variant: 0 })
        .collect();
    let mut result =
        RunResult { policy: policy.name.clone(), records: Vec::new(), imbalance_sum: 0.0, imbalance_samples: 0 };
    let mut events: Vec<WorkerEvent> = Vec::new();
    let mut pending_ticks = 0u64;
    for (index, item) in workload.items.iter().enumerate() {
        let now = item.at;
        if cluster.advance(now, &mut events) {
            let (generation, endpoints) = cluster.pool();
            policy.pool_changed(generation, endpoints);
        }
        deliver(policy, &mut events, &mut records);
        sample_imbalance(&cluster, &mut result);

        let mut prompt = Vec::with_capacity(item.prompt.len());
        item.prompt.write_to(&mut prompt);
        let model = item.requested_model();
        let id = request_id(index);
        let prompt = String::from_utf8_lossy(&prompt).into_owned();
        let req = Request {
            random_seed: xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), seed),
            id,
            model: model.to_string(),
            prompt_tokens: Request::estimate_tokens(prompt.len()),
            prompt,
            max_tokens: Some(item.output_tokens),
            cache_salt: item.cache_salt.as_deref().map(str::to_owned),
            headers: item.session.iter().map(|s| ("x-session-id".to_string(), s.to_string())).collect(),
            priority: item.priority,
            // Plugins see virtual time.
            now_ms: (now * 1000.0).max(0.0) as u64,
            user: None,
        };
        let candidates = cluster.metrics(now, DEFAULT_METRICS_STALENESS_MS);
        let record = &mut records[index];
        // Cycle ids are the request index + 1: unique and reproducible.
        let cycle = index as u64 + 1;
        match policy.route(cycle, &req, candidates) {
            Ok((worker, variant)) => {
                record.worker = Some(worker);
                record.variant = variant;
                let salt = item.cache_salt.as_deref().unwrap_or_default();
                let model_req = ModelRequest::from_prompt(
                    cluster.params(),
                    req.prompt.as_bytes(),
                    &[model.as_bytes(), salt.as_bytes()],
                    item.output_tokens,
                    item.lora.as_deref().map(str::to_owned),
                );
                match cluster.admit(worker, now, model_req, index) {
                    Ok(()) => {}
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
        pending_ticks += 1;
        if pending_ticks == 256 {
            tick(pending_ticks);
            pending_ticks = 0;
        }
    }
    tick(pending_ticks);
    cluster.drain(&mut events);
    deliver(policy, &mut events, &mut records);
    result.records = records;
    Ok(result)
}

/// Hands the events to the records and completions to the plugins, in time order.
fn deliver(policy: &mut Policy, events: &mut Vec<WorkerEvent>, records: &mut [Record]) {
    // Invariant: a total order, so runs are reproducible whatever order workers reported in.
    events.sort_by(|a, b| a.at.total_cmp(&b.at).then(a.worker.cmp(&b.worker)).then(a.request.cmp(&b.request)));
    for e in events.drain(..) {
        let Some(record) = records.get_mut(e.request) else { continue };
        let cycle = e.request as u64 + 1;
        match e.kind {
            EventKind::Token { index: 0 } => {
                record.first_token = Some(e.at);
                policy.first_chunk(record.variant, cycle, e.worker);
            }
            EventKind::Token { .. } => {}
            EventKind::Finished(u) => {
                let usage = Usage {
                    prompt_tokens: u.prompt_tokens,
                    cached_tokens: u.cached_tokens,
                    completion_tokens: u.completion_tokens,
                };
                // A prefill-only request's first (and only) answer is its end.
                let first_token = record.first_token.unwrap_or(e.at);
                record.outcome = Outcome::Completed { first_token, finished: e.at, usage };
                if record.first_token.is_none() {
                    policy.first_chunk(record.variant, cycle, e.worker);
                }
                let done = Completion {
                    endpoint: e.worker,
                    outcome: epp_core::Outcome::Completed,
                    status: 200,
                    usage: Some(usage),
                };
                policy.finished(record.variant, cycle, &done);
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
