//! `prefix-cache-affinity-filter`: "sticky until saturated", as upstream. Candidates whose
//! prefix score (matched ÷ total blocks, from the prefix producer) is at least
//! `affinityThreshold` are *sticky*; when any is, only they are kept — unless the least
//! loaded sticky candidate would start the request more than `maxTTFTPenaltyMs` later than
//! the least loaded other one, in which case stickiness is dropped and every candidate is
//! kept. A candidate's time to first token is estimated from the uncached prompt tokens
//! the EPP has in flight on it (`inflight/tokens`) at `peakPrefillThroughput` tokens/s.
//! With probability `explorationProbability` (from the request's seed) every candidate is
//! kept, so new placements keep being tried. It never returns an empty set.
//!
//! Saturation (this EPP's, not upstream's; `queueDepthThreshold`, default 5, 0 = off): a
//! sticky candidate whose queue (`vllm:num_requests_waiting`) has reached the threshold —
//! the utilization detector's measure of a saturated worker — is not kept while another
//! sticky one is not. When every sticky candidate is saturated, the request spills: the
//! candidates with an empty queue that run at most `spillRunningShare` (default 0.5) of
//! what the least busy sticky one runs are kept instead, when there are any, and hold the
//! prompt from then on. For a LoRA adapter (a model some endpoint lists as an adapter) only
//! the candidates running it or with room for another adapter take the spill: loading it
//! elsewhere would evict an adapter other requests use. A prompt too popular for its
//! holders thus spreads to workers with room, where upstream's filter keeps queueing it on
//! the holders (its TTFT override, estimated from prompt tokens in flight, does not see a
//! queue of cache hits). Unknown (stale) metrics count as neither saturated nor open.
//!
//! LoRA slots (this EPP's, on with the saturation rule): for a request naming an adapter,
//! a sticky candidate that cannot run it now — no adapter slot free, or running it while
//! another adapter waits there for a slot — is left out for a sticky one that can; when
//! none can, the other candidates that can are kept instead (none: the rule does nothing).
//! vLLM schedules a running adapter's new requests ahead of a waiting adapter, so a
//! worker fed one adapter without pause never lets another load. The other way round, an
//! adapter busier than its workers can serve never gets another worker while other
//! adapters hold every slot: when every worker running the request's adapter is saturated
//! and the shortest of their queues is at least three times the other candidates' mean
//! plus the threshold, the candidates that are not saturated — those with a free adapter
//! slot, when there are any — are kept instead, sticky or not, and the adapter loads there
//! (`Outgrown`).
//!
//! Hot prefixes (this EPP's; `busyRunningThreshold`, 0 = off): an engine with room for
//! many sequences (vLLM's default is 256) never queues a popular prompt; it runs it in ever
//! larger decode batches, each step slower for every sequence. So a sticky candidate is
//! also *busy* when the prefix it holds is hot — asked for so often that it brings more than
//! one worker's worth of traffic per holder (the producer's `match-interval`: asked for
//! every `m` requests among `n` candidates, held by `k`, and `k × m < n`) — and it runs at
//! least `busyRunningThreshold` requests and more than `busyRunningRatio` (default 2) times
//! the other candidates' mean. When every sticky candidate is busy or saturated, the
//! request spills as above. A conversation's history is asked for once a turn and never
//! hot, so this moves shared system prompts, not conversations. Only the built-in prefix
//! producers write `match-interval`; with another producer, or `queueDepthThreshold: 0`,
//! the rule is off.
//!
//! `ttftSource: latencyPredictor` (upstream's trained predictor) is not available here and
//! is rejected at load.

use llmd_plugin_sdk::columns::{
    APPROX_PREFIX, INFLIGHT_TOKENS, PRECISE_PREFIX, RUNNING, WAITING, prefix_match_interval, prefix_matched,
    prefix_namespace, prefix_total,
};
use llmd_plugin_sdk::rng::SplitMix64;
use std::collections::{HashMap, HashSet};

use llmd_plugin_sdk::{
    Cycle, EndpointInfo, Filter, Manifest, Needs, Plugin, adapter_outgrown, listed_adapters, params,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub affinity_threshold: f64,
    pub exploration_probability: f64,
    #[serde(rename = "maxTTFTPenaltyMs")]
    pub max_ttft_penalty_ms: f64,
    pub ttft_source: String,
    pub peak_prefill_throughput: f64,
    pub prefix_match_info_producer_name: String,
    pub latency_prediction_info_producer_name: String,
    pub in_flight_load_producer_name: String,
    /// A sticky endpoint whose queue (`vllm:num_requests_waiting`) reaches this is
    /// saturated (this EPP's, not upstream's; 0 turns it off).
    pub queue_depth_threshold: f64,
    /// When every sticky endpoint is saturated, an endpoint with an empty queue running at
    /// most this share of the least busy sticky one's running requests takes the request
    /// (this EPP's; 0: only an endpoint running nothing).
    pub spill_running_share: f64,
    /// A sticky endpoint holding a hot prefix and running at least this many requests, and
    /// more than `busyRunningRatio` times the other candidates' mean, is busy: when every sticky
    /// endpoint is busy or saturated, the request spills as from saturated ones (this
    /// EPP's; 0 turns it off).
    pub busy_running_threshold: f64,
    /// How many times the other candidates' mean running requests a busy endpoint runs.
    pub busy_running_ratio: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            affinity_threshold: 0.80,
            exploration_probability: 0.0,
            max_ttft_penalty_ms: 18_000.0,
            ttft_source: "prefillThroughput".into(),
            peak_prefill_throughput: 15_928.0,
            prefix_match_info_producer_name: String::new(),
            latency_prediction_info_producer_name: String::new(),
            in_flight_load_producer_name: String::new(),
            queue_depth_threshold: DEFAULT_QUEUE_DEPTH,
            spill_running_share: DEFAULT_SPILL_RUNNING_SHARE,
            busy_running_threshold: DEFAULT_BUSY_RUNNING,
            busy_running_ratio: DEFAULT_BUSY_RATIO,
        }
    }
}

/// Queue depth at which a sticky endpoint counts as saturated: the utilization detector's
/// default `queueDepthThreshold`, upstream's measure of a saturated worker.
pub const DEFAULT_QUEUE_DEPTH: f64 = 5.0;

/// How busy, as a share of the least busy saturated holder's running requests, a worker may
/// be to take a spilled request (the admission filter's idle-spill share).
pub const DEFAULT_SPILL_RUNNING_SHARE: f64 = 0.5;

/// Running requests from which a sticky holder of a hot prefix may count as busy.
pub const DEFAULT_BUSY_RUNNING: f64 = 2.0;

/// How many times the other candidates' mean running requests a busy holder runs.
pub const DEFAULT_BUSY_RATIO: f64 = 2.0;

pub struct PrefixCacheAffinityFilter {
    threshold: f32,
    exploration: f64,
    max_penalty_ms: f32,
    throughput: f32,
    queue_depth: f32,
    spill_share: f32,
    busy_running: f32,
    busy_ratio: f32,
    /// Where the columns this filter reads are in `cycle.columns` (the prefix columns are
    /// always 0 and 1).
    tokens_col: usize,
    waiting_col: usize,
    running_col: usize,
    interval_col: usize,
    /// Each endpoint's static data, adapters included (from `pool_changed`).
    endpoints: HashMap<u32, EndpointInfo>,
    /// Every adapter some endpoint runs or queues: a request naming one is a LoRA request.
    adapters: HashSet<String>,
}

impl Default for PrefixCacheAffinityFilter {
    fn default() -> Self {
        PrefixCacheAffinityFilter {
            threshold: 0.8,
            exploration: 0.0,
            max_penalty_ms: 18_000.0,
            throughput: 15_928.0,
            queue_depth: DEFAULT_QUEUE_DEPTH as f32,
            spill_share: DEFAULT_SPILL_RUNNING_SHARE as f32,
            busy_running: DEFAULT_BUSY_RUNNING as f32,
            busy_ratio: DEFAULT_BUSY_RATIO as f32,
            tokens_col: 2,
            waiting_col: 3,
            running_col: 4,
            interval_col: 5,
            endpoints: HashMap::new(),
            adapters: HashSet::new(),
        }
    }
}

/// What the filter decided, for tests and reports (upstream's outcome labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    NotApplicable,
    Exploration,
    NoMatch,
    LoadOverride,
    /// Every sticky candidate was saturated: the others with room were kept.
    Saturated,
    /// Every sticky candidate was busy or saturated, not all of them saturated: the others
    /// with room were kept.
    Busy,
    /// No sticky candidate could run the request's LoRA adapter now: the others that can
    /// were kept.
    Draining,
    /// The request's LoRA adapter has outgrown the workers running it: the candidates with
    /// a short queue were kept.
    Outgrown,
    Sticky,
}

impl PrefixCacheAffinityFilter {
    /// The kept positions and why.
    pub fn decide(&self, cycle: &Cycle) -> (Vec<usize>, Decision) {
        let n = cycle.len();
        let all = || (0..n).collect::<Vec<usize>>();
        if n <= 1 || self.threshold <= 0.0 {
            return (all(), Decision::NotApplicable);
        }
        if self.exploration > 0.0
            && SplitMix64::new(cycle.request.random_seed ^ 0xAFF1_41E7).next_f64() < self.exploration
        {
            return (all(), Decision::Exploration);
        }
        let score = |i: usize| {
            let (m, t) = (cycle.value(0, i), cycle.value(1, i));
            if t > 0.0 && m.is_finite() { (m / t).clamp(0.0, 1.0) } else { 0.0 }
        };
        if let Some(open) = self.outgrown(cycle) {
            return (open, Decision::Outgrown);
        }
        let (mut sticky, other): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| score(i) >= self.threshold);
        if sticky.is_empty() {
            return (all(), Decision::NoMatch);
        }
        if let Some(runs) = self.adapter_runnable(cycle) {
            // Slots before stickiness: a holder that cannot run the request's LoRA adapter
            // now would queue it, or, running it while another adapter waits for a slot
            // there, keep that one waiting; a candidate that can run it takes it instead.
            if !sticky.iter().all(|&i| runs[i]) {
                let runnable: Vec<usize> = sticky.iter().copied().filter(|&i| runs[i]).collect();
                if !runnable.is_empty() {
                    sticky = runnable;
                } else {
                    let open: Vec<usize> = other.iter().copied().filter(|&i| runs[i]).collect();
                    if !open.is_empty() {
                        return (open, Decision::Draining);
                    }
                }
            }
        }
        if self.queue_depth > 0.0 {
            // Sticky until saturated: a holder with a queue this deep adds waiting to every
            // request it gets, while a worker that must prefill the prompt once would start
            // it now and hold it from then on. Unknown (stale) queues count as empty.
            let saturated = |i: &usize| {
                let q = cycle.value(self.waiting_col, *i);
                q.is_finite() && q >= self.queue_depth
            };
            let running = |i: usize| cycle.value(self.running_col, i);
            // Busy: a holder of a hot prefix running well above the other candidates' mean
            // slows every decode step it runs; a prompt that popular is worth a copy
            // elsewhere before any holder queues.
            let others_mean = {
                let (sum, known) = other
                    .iter()
                    .map(|&i| running(i))
                    .filter(|r| r.is_finite())
                    .fold((0.0f32, 0u32), |(s, k), r| (s + r, k + 1));
                if known == 0 { f32::NAN } else { sum / known as f32 }
            };
            // Hot: the prefix the holders share brings more than their number of workers'
            // worth of traffic (asked for every `m` requests among `n` candidates: n / m).
            let hot = self.interval_col != usize::MAX && {
                let m = sticky.iter().map(|&i| cycle.value(self.interval_col, i)).fold(f32::INFINITY, f32::min);
                m.is_finite() && sticky.len() as f32 * m < n as f32
            };
            let busy = |i: &usize| {
                let r = running(*i);
                hot && r.is_finite()
                    && r >= self.busy_running
                    && others_mean.is_finite()
                    && r > self.busy_ratio * others_mean
            };
            let all_saturated = sticky.iter().all(saturated);
            if all_saturated || sticky.iter().all(|i| saturated(i) || busy(i)) {
                let least = sticky.iter().map(|&i| running(i)).fold(f32::INFINITY, f32::min);
                let cap = if least.is_finite() { least * self.spill_share } else { 0.0 };
                let model = cycle.request.model();
                let adapter = self.adapters.contains(model);
                let serves = |i: &usize| {
                    !adapter
                        || self
                            .endpoints
                            .get(&cycle.ids[*i])
                            .is_some_and(|e| e.has_adapter_room() || e.lists_adapter(model))
                };
                let has_room = |i: &usize| cycle.value(self.waiting_col, *i) == 0.0 && running(*i) <= cap && serves(i);
                let open: Vec<usize> = other.iter().copied().filter(has_room).collect();
                if !open.is_empty() {
                    return (open, if all_saturated { Decision::Saturated } else { Decision::Busy });
                }
            }
            if !all_saturated {
                sticky.retain(|i| !saturated(i));
            }
        }
        if self.max_penalty_ms > 0.0 && !other.is_empty() {
            // Unknown load counts as none, as upstream treats a missing attribute.
            let ttft = |i: usize| {
                let tokens = cycle.value(self.tokens_col, i);
                if tokens.is_finite() { tokens.max(0.0) / self.throughput * 1000.0 } else { 0.0 }
            };
            let best = |set: &[usize]| set.iter().map(|&i| ttft(i)).fold(f32::INFINITY, f32::min);
            if best(&sticky) - best(&other) > self.max_penalty_ms {
                return (all(), Decision::LoadOverride);
            }
        }
        (sticky, Decision::Sticky)
    }

    /// For a request naming a LoRA adapter that has outgrown the workers running it (every
    /// one of them saturated, far behind the others: `adapter_outgrown`), the candidates
    /// whose queue is known and below `queueDepthThreshold`. `None` when the rule does not
    /// apply, or every candidate is saturated.
    fn outgrown(&self, cycle: &Cycle) -> Option<Vec<usize>> {
        let model = cycle.request.model();
        if self.queue_depth <= 0.0 || !self.adapters.contains(model) {
            return None;
        }
        let waiting = |i: usize| cycle.value(self.waiting_col, i);
        let runs = |i: usize| self.endpoints.get(&cycle.ids[i]).is_some_and(|e| e.runs_adapter(model));
        if !adapter_outgrown(cycle.len(), self.queue_depth, waiting, runs) {
            return None;
        }
        let open: Vec<usize> = (0..cycle.len()).filter(|&i| waiting(i) < self.queue_depth).collect();
        // Where a slot is free the adapter starts at once; elsewhere it waits for one.
        let room: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| self.endpoints.get(&cycle.ids[i]).is_some_and(|e| e.has_adapter_room()))
            .collect();
        if !room.is_empty() { Some(room) } else { (!open.is_empty()).then_some(open) }
    }

    /// For a request naming a LoRA adapter (one some endpoint lists), whether each candidate
    /// can run it now: it has a free adapter slot, or runs the adapter with no other adapter
    /// waiting there for a slot. `None` for any other request, or with the rule off
    /// (`queueDepthThreshold: 0`, which also leaves the filter without the pool).
    fn adapter_runnable(&self, cycle: &Cycle) -> Option<Vec<bool>> {
        let model = cycle.request.model();
        if self.queue_depth <= 0.0 || !self.adapters.contains(model) {
            return None;
        }
        Some(cycle.ids.iter().map(|id| self.endpoints.get(id).is_some_and(|e| e.can_run_adapter_now(model))).collect())
    }
}

impl Plugin for PrefixCacheAffinityFilter {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        if p.affinity_threshold > 1.0 {
            return Err(format!("affinityThreshold must be ≤ 1, got {}", p.affinity_threshold));
        }
        if !(0.0..=1.0).contains(&p.exploration_probability) {
            return Err(format!("explorationProbability must be in [0, 1], got {}", p.exploration_probability));
        }
        if !(p.max_ttft_penalty_ms >= 0.0 && p.max_ttft_penalty_ms.is_finite()) {
            return Err(format!("maxTTFTPenaltyMs must be ≥ 0, got {}", p.max_ttft_penalty_ms));
        }
        match p.ttft_source.as_str() {
            "prefillThroughput" => {}
            "latencyPredictor" => {
                return Err("ttftSource `latencyPredictor` needs upstream's latency predictor, which this EPP does not have; use prefillThroughput".into());
            }
            other => return Err(format!("ttftSource `{other}`; expected prefillThroughput")),
        }
        if !(p.peak_prefill_throughput >= 0.0 && p.peak_prefill_throughput.is_finite()) {
            return Err(format!("peakPrefillThroughput must be ≥ 0, got {}", p.peak_prefill_throughput));
        }
        if p.max_ttft_penalty_ms > 0.0 && p.peak_prefill_throughput <= 0.0 {
            return Err("peakPrefillThroughput must be > 0 when maxTTFTPenaltyMs is".into());
        }
        if !(p.queue_depth_threshold >= 0.0 && p.queue_depth_threshold.is_finite()) {
            return Err(format!("queueDepthThreshold must be ≥ 0, got {}", p.queue_depth_threshold));
        }
        if !(p.busy_running_threshold >= 0.0 && p.busy_running_threshold.is_finite()) {
            return Err(format!("busyRunningThreshold must be ≥ 0, got {}", p.busy_running_threshold));
        }
        if !(p.busy_running_ratio >= 1.0 && p.busy_running_ratio.is_finite()) {
            return Err(format!("busyRunningRatio must be ≥ 1, got {}", p.busy_running_ratio));
        }
        if !(0.0..=1.0).contains(&p.spill_running_share) {
            return Err(format!("spillRunningShare must be in [0, 1], got {}", p.spill_running_share));
        }
        let ns = prefix_namespace(&p.prefix_match_info_producer_name);
        let (matched, total) = (prefix_matched(ns), prefix_total(ns));
        // The built-in producers write how often a prefix is asked for; another namespace's
        // producer may not, and the busy rule is then off.
        let interval = prefix_match_interval(ns);
        let busy_on = p.queue_depth_threshold > 0.0
            && p.busy_running_threshold > 0.0
            && [APPROX_PREFIX, PRECISE_PREFIX].contains(&ns);
        let mut reads = vec![matched.as_str(), total.as_str()];
        // Each column read only when its rule is on; its position in `reads` is its index.
        let mut read = |on: bool, name: &'static str| {
            if !on {
                return usize::MAX;
            }
            reads.push(name);
            reads.len() - 1
        };
        let tokens_col = read(p.max_ttft_penalty_ms > 0.0, INFLIGHT_TOKENS);
        let waiting_col = read(p.queue_depth_threshold > 0.0, WAITING);
        let running_col = read(p.queue_depth_threshold > 0.0, RUNNING);
        let interval_col = if busy_on {
            reads.push(interval.as_str());
            reads.len() - 1
        } else {
            usize::MAX
        };
        *self = PrefixCacheAffinityFilter {
            threshold: p.affinity_threshold as f32,
            exploration: p.exploration_probability,
            max_penalty_ms: p.max_ttft_penalty_ms as f32,
            throughput: p.peak_prefill_throughput as f32,
            queue_depth: p.queue_depth_threshold as f32,
            spill_share: p.spill_running_share as f32,
            busy_running: p.busy_running_threshold as f32,
            busy_ratio: p.busy_running_ratio as f32,
            tokens_col,
            waiting_col,
            running_col,
            interval_col,
            endpoints: HashMap::new(),
            adapters: HashSet::new(),
        };
        let mut manifest = Manifest::stateless(&reads);
        if self.queue_depth > 0.0 {
            manifest.needs = Needs { model: true, pool: true, ..Default::default() };
        }
        Ok(manifest)
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        self.endpoints = endpoints.iter().map(|e| (e.id, e.clone())).collect();
        self.adapters = listed_adapters(endpoints);
    }
}

impl Filter for PrefixCacheAffinityFilter {
    fn filter(&mut self, cycle: &Cycle) -> Vec<u32> {
        self.decide(cycle).0.into_iter().map(|i| cycle.ids[i]).collect()
    }
}

llmd_plugin_sdk::export_filter!(PrefixCacheAffinityFilter);
