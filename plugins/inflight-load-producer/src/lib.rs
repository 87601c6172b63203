//! `inflight-load-producer`: the load the EPP itself has put on each endpoint, known at once
//! rather than through a scrape: requests sent and not finished, and *uncached prompt
//! tokens* sent and not yet prefilled (released at the first response chunk, when the
//! worker has done the prefill; with `addEstimatedOutputTokens`, an output estimate stays
//! until the request finishes). Every decided request is released exactly once, however it
//! ends (the host calls `finished` for completions, client cancellations and resets alike).
//!
//! A request whose first chunk says nothing of its prefill — a non-streamed one, whose
//! first bytes are the whole answer, or one another replica decided (its chunks are seen
//! there) — has its prompt tokens released when its prefill is estimated done instead:
//! after the endpoint's prompt tokens ahead of it and its own, at the endpoint's prefill
//! pace (not upstream, which holds them until the end: a long answer would then count
//! as waiting prompt tokens for its whole decode). The pace is learned from streamed
//! requests, the time from decision to first chunk per prompt token ahead and own (a
//! moving average per endpoint, and one over the pool for endpoints without a sample
//! yet), counted only once the request completed with a 2xx status (an error's first
//! bytes come before any prefill); until a streamed request has taught it,
//! `DEFAULT_PREFILL_MS_PER_TOKEN`.
//!
//! Columns written: `inflight/tokens` and `inflight/requests` (per candidate, live), and
//! `inflight/request-tokens` — what *this* request would add to each candidate: its prompt
//! tokens minus the leading blocks the prefix producer thinks the candidate holds,
//! `max(0, prompt − matched × B)`, or the whole prompt when the prefix columns are unknown.
//! Semantics and parameters follow upstream's plugin of the same name; upstream computes
//! `(total − matched) × B + max(0, prompt − total × B)`, which counts the last, partial
//! block as full — the same but for that overcount.
//!
//! `kvPressureThreshold` (not upstream; off by default) makes running decodes count once
//! they press on a worker's KV cache. Each decided request commits its uncached prompt
//! tokens plus its output estimate (`max_tokens`, capped at `outputRatio` × the prompt and
//! `maxEstimatedOutputTokens`) to its endpoint until it finishes; what an endpoint's
//! commitments exceed past this share of its KV cache (`vllm:cache_config_info`) is added
//! to its `inflight/tokens`. Chat-sized traffic that sends `max_tokens` rarely commits that
//! much; long generations pile onto a prompt's holders until their cache is full, and this
//! keeps them off. Endpoints that report no cache geometry get nothing added. With replicas
//! sharing state, peers' requests commit theirs too: their decisions carry `max_tokens`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use llmd_plugin_sdk::columns::{
    INFLIGHT_REQUESTS, INFLIGHT_TOKENS, REQUEST_UNCACHED_TOKENS, prefix_block_tokens, prefix_matched, prefix_namespace,
    prefix_total,
};
use llmd_plugin_sdk::pending::Pending;
use llmd_plugin_sdk::{Completion, Cycle, EndpointInfo, Manifest, Needs, Outcome, Plugin, Producer, params};
use serde::Deserialize;

/// Per-candidate costs of cycles produced for but not yet decided.
const PENDING_CYCLES: usize = 1024;
/// Decided requests tracked at most (they are released by `finished`; this only bounds
/// memory if a host ever failed to report an end).
const MAX_IN_FLIGHT: usize = 1 << 20;
/// Prefill pace assumed before any streamed request measured one: 10 000 prompt tokens a
/// second, a single modern GPU's order for a mid-sized model.
pub const DEFAULT_PREFILL_MS_PER_TOKEN: f64 = 0.1;
/// A streamed request teaches the pace only when at least this many prompt tokens (ahead
/// and its own) were to prefill: below, fixed costs (the network, a decode step the prefill
/// waits for) dominate its time to first chunk.
const LEARN_MIN_TOKENS: i64 = 256;
/// Weight of a new sample in the moving averages of the pace.
const LEARN_WEIGHT: f64 = 0.2;
/// Bounds of a pace sample, ms per token: 10 million to 500 tokens a second. A clock
/// glitch, or a first chunk held up by something else than the prefill (a full batch),
/// must not stall or zero releases.
const PACE_BOUNDS: (f64, f64) = (1e-4, 2.0);

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub add_estimated_output_tokens: bool,
    pub output_ratio: Option<f64>,
    pub max_estimated_output_tokens: Option<i64>,
    pub prefix_match_info_producer_name: String,
    /// Accepted for config compatibility: replicas share load through the state store.
    pub sync_cross_replica_state: Option<bool>,
    /// Share of a worker's KV cache past which in-flight commitments count as load (off
    /// when unset; this EPP's, not upstream's).
    pub kv_pressure_threshold: Option<f64>,
}

/// One decided request's contribution to its endpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Entry {
    endpoint: u32,
    /// Prompt tokens not yet prefilled (released at the first chunk).
    prompt_tokens: i64,
    /// Estimated output tokens (released at the end).
    output_tokens: i64,
    /// KV tokens committed until the end (uncached prompt + output estimate).
    kv_tokens: i64,
    /// When it was decided (`now-ms` of its cycle).
    decided_ms: u64,
    /// Prompt tokens waiting on its endpoint before it, at the decision.
    ahead: i64,
    /// Released by the estimate at this time, not by the first chunk (a request whose
    /// first chunk is its end, or a peer replica's).
    release_at: Option<u64>,
    /// The pace its first chunk showed, learned if it completes with a 2xx status.
    sample: Option<f64>,
}

/// What `produce` keeps of a cycle until `decided`.
struct Produced {
    ids: Vec<u32>,
    /// Uncached prompt tokens per candidate.
    uncached: Vec<f32>,
    output_estimate: i64,
    now_ms: u64,
    stream: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    pub tokens: i64,
    pub requests: i64,
}

pub struct InflightLoadProducer {
    add_output: bool,
    output_ratio: f64,
    max_output: Option<i64>,
    /// `kvPressureThreshold`: the share of a KV cache past which commitments count.
    pressure_threshold: Option<f64>,
    /// KV tokens per endpoint (from its cache geometry), and those committed to it.
    capacity: HashMap<u32, i64>,
    committed: HashMap<u32, i64>,
    /// Live load per endpoint.
    load: HashMap<u32, Load>,
    /// Prompt tokens decided and not yet prefilled, per endpoint.
    prefill: HashMap<u32, i64>,
    /// Learned prefill pace (ms per token) per endpoint, and over the pool.
    pace: HashMap<u32, f64>,
    pool_pace: Option<f64>,
    /// Estimated releases: (due ms, cycle), soonest first.
    due: BinaryHeap<Reverse<(u64, u64)>>,
    pending: Pending<Produced>,
    in_flight: Pending<Entry>,
}

impl Default for InflightLoadProducer {
    fn default() -> Self {
        InflightLoadProducer {
            add_output: false,
            output_ratio: 1.5,
            max_output: None,
            pressure_threshold: None,
            capacity: HashMap::new(),
            committed: HashMap::new(),
            load: HashMap::new(),
            prefill: HashMap::new(),
            pace: HashMap::new(),
            pool_pace: None,
            due: BinaryHeap::new(),
            pending: Pending::new(PENDING_CYCLES),
            in_flight: Pending::new(MAX_IN_FLIGHT),
        }
    }
}

impl InflightLoadProducer {
    /// The live load of `endpoint`.
    pub fn load(&self, endpoint: u32) -> Load {
        self.load.get(&endpoint).copied().unwrap_or_default()
    }

    /// Requests decided and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn add(&mut self, endpoint: u32, tokens: i64, requests: i64) {
        let l = self.load.entry(endpoint).or_default();
        // Clamped at 0, as upstream: a release can never make load negative.
        l.tokens = (l.tokens + tokens).max(0);
        l.requests = (l.requests + requests).max(0);
    }

    /// The prefill pace of `endpoint`, ms per token: learned, else the pool's, else the
    /// default.
    pub fn pace(&self, endpoint: u32) -> f64 {
        self.pace.get(&endpoint).copied().or(self.pool_pace).unwrap_or(DEFAULT_PREFILL_MS_PER_TOKEN)
    }

    /// Releases the prompt tokens of in-flight request `cycle` (its prefill is done), once.
    fn release_prompt(&mut self, cycle: u64) -> Option<Entry> {
        let e = self.in_flight.get_mut(cycle)?;
        let before = *e;
        e.prompt_tokens = 0;
        if before.prompt_tokens != 0 {
            self.add(before.endpoint, -before.prompt_tokens, 0);
            if let Some(p) = self.prefill.get_mut(&before.endpoint) {
                *p = (*p - before.prompt_tokens).max(0);
            }
        }
        Some(before)
    }

    /// Releases the prompt tokens whose estimated prefill ended by `now_ms`.
    fn release_due(&mut self, now_ms: u64) {
        while let Some(&Reverse((at, cycle))) = self.due.peek() {
            if at > now_ms {
                break;
            }
            self.due.pop();
            // An entry that ended already, or was released by a chunk, is gone or zero.
            if self.in_flight.get(cycle).is_some_and(|e| e.release_at == Some(at)) {
                self.release_prompt(cycle);
            }
        }
    }

    /// The pace a streamed request's first chunk at `now_ms` shows: its time since the
    /// decision per prompt token that was to prefill on its endpoint.
    fn sample(e: &Entry, now_ms: u64) -> Option<f64> {
        let tokens = e.ahead + e.prompt_tokens;
        // No time between decision and chunk says nothing of a pace (a clock that did not
        // move), and would teach the smallest one.
        if e.release_at.is_some() || tokens < LEARN_MIN_TOKENS || now_ms <= e.decided_ms {
            return None;
        }
        Some(((now_ms - e.decided_ms) as f64 / tokens as f64).clamp(PACE_BOUNDS.0, PACE_BOUNDS.1))
    }

    /// Blends a completed request's sample into the pace of its endpoint and of the pool.
    fn learn(&mut self, endpoint: u32, sample: f64) {
        let blend = |old: Option<f64>| old.map_or(sample, |o| o + LEARN_WEIGHT * (sample - o));
        let paced = blend(self.pace.get(&endpoint).copied());
        self.pace.insert(endpoint, paced);
        self.pool_pace = Some(blend(self.pool_pace));
    }

    /// Load added to `endpoint` by KV commitments past `kvPressureThreshold` of its cache.
    fn pressure(&self, endpoint: u32) -> i64 {
        let Some(share) = self.pressure_threshold else { return 0 };
        let Some(&capacity) = self.capacity.get(&endpoint) else { return 0 };
        let committed = self.committed.get(&endpoint).copied().unwrap_or(0);
        (committed - (share * capacity as f64) as i64).max(0)
    }

    /// The share of the output estimate held as load: all of it with
    /// `addEstimatedOutputTokens`, none otherwise.
    fn held_output(&self, estimate: i64) -> i64 {
        if self.add_output { estimate } else { 0 }
    }

    /// `outputRatio` × the prompt, capped by `max_tokens` and `maxEstimatedOutputTokens`.
    fn estimate_output(&self, prompt_tokens: u32, max_tokens: Option<u32>) -> i64 {
        let mut estimate = (f64::from(prompt_tokens) * self.output_ratio).round() as i64;
        if let Some(cap) = max_tokens {
            estimate = estimate.min(i64::from(cap));
        }
        if let Some(cap) = self.max_output {
            estimate = estimate.min(cap);
        }
        estimate.max(0)
    }
}

/// The tokens a request of `prompt` tokens adds to an endpoint holding `matched` of its
/// `total` leading blocks of `block` tokens; the whole prompt when the match is unknown.
pub fn uncached_tokens(prompt: u32, matched: f32, total: f32, block: f32) -> f32 {
    let prompt = prompt as f32;
    if !(matched.is_finite() && total.is_finite() && block > 0.0) || total <= 0.0 {
        return prompt;
    }
    (prompt - matched.clamp(0.0, total) * block).clamp(0.0, prompt)
}

impl Plugin for InflightLoadProducer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        let ratio = p.output_ratio.unwrap_or(1.5);
        // Bounded so that an estimate (a prompt of up to u32::MAX tokens × the ratio) fits.
        if !(0.0..=1000.0).contains(&ratio) {
            return Err(format!("outputRatio must be a number in [0, 1000], got {ratio}"));
        }
        if let Some(m) = p.max_estimated_output_tokens
            && m < 0
        {
            return Err(format!("maxEstimatedOutputTokens must be ≥ 0, got {m}"));
        }
        if let Some(t) = p.kv_pressure_threshold
            && !(t > 0.0 && t <= 1.0)
        {
            return Err(format!("kvPressureThreshold must be in (0, 1], got {t}"));
        }
        *self = InflightLoadProducer {
            add_output: p.add_estimated_output_tokens,
            output_ratio: ratio,
            max_output: p.max_estimated_output_tokens,
            pressure_threshold: p.kv_pressure_threshold,
            ..Default::default()
        };
        let ns = prefix_namespace(&p.prefix_match_info_producer_name);
        Ok(Manifest {
            needs: Needs { pool: true, decided: true, first_chunk: true, finished: true, ..Default::default() },
            reads: vec![prefix_matched(ns), prefix_total(ns), prefix_block_tokens(ns)],
            writes: [INFLIGHT_TOKENS, INFLIGHT_REQUESTS, REQUEST_UNCACHED_TOKENS]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            stateless: false,
        })
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        // Counters of endpoints that left are dropped (requests still in flight to them are
        // released against nothing when they end).
        let live: HashSet<u32> = endpoints.iter().map(|e| e.id).collect();
        self.load.retain(|id, _| live.contains(id));
        self.prefill.retain(|id, _| live.contains(id));
        self.pace.retain(|id, _| live.contains(id));
        // Cache geometry and commitments serve `kvPressureThreshold` only.
        if self.pressure_threshold.is_none() {
            return;
        }
        self.committed.retain(|id, _| live.contains(id));
        self.capacity = endpoints
            .iter()
            .filter_map(|e| e.cache.filter(|c| c.tokens() > 0).map(|c| (e.id, c.tokens() as i64)))
            .collect();
    }

    fn decided(&mut self, cycle: u64, endpoint: u32) -> Vec<(String, String)> {
        let Some(p) = self.pending.take(cycle) else { return Vec::new() };
        let prompt = p.ids.iter().position(|&id| id == endpoint).and_then(|i| p.uncached.get(i)).copied();
        let prompt = prompt.unwrap_or(0.0).max(0.0) as i64;
        let estimate = p.output_estimate;
        let kv_tokens = if self.pressure_threshold.is_some() { prompt + estimate } else { 0 };
        let ahead = self.prefill.get(&endpoint).copied().unwrap_or(0);
        // Without a first chunk that marks the prefill's end, the estimate does.
        let release_at =
            (!p.stream).then(|| p.now_ms.saturating_add(((ahead + prompt) as f64 * self.pace(endpoint)).ceil() as u64));
        let entry = Entry {
            endpoint,
            prompt_tokens: prompt,
            output_tokens: self.held_output(estimate),
            kv_tokens,
            decided_ms: p.now_ms,
            ahead,
            release_at,
            sample: None,
        };
        if kv_tokens != 0 {
            *self.committed.entry(endpoint).or_default() += kv_tokens;
        }
        self.add(endpoint, entry.prompt_tokens + entry.output_tokens, 1);
        *self.prefill.entry(endpoint).or_default() += prompt;
        if let Some(at) = release_at
            && prompt > 0
        {
            self.due.push(Reverse((at, cycle)));
        }
        self.in_flight.insert(cycle, entry);
        Vec::new()
    }

    fn first_chunk(&mut self, cycle: u64, _endpoint: u32, now_ms: u64) {
        // The prefill is done: its tokens no longer wait on the endpoint.
        if let Some(e) = self.release_prompt(cycle)
            && e.prompt_tokens > 0
            && let Some(sample) = Self::sample(&e, now_ms)
            && let Some(held) = self.in_flight.get_mut(cycle)
        {
            held.sample = Some(sample);
        }
        self.release_due(now_ms);
    }

    fn finished(&mut self, cycle: u64, completion: &Completion) {
        if self.release_prompt(cycle).is_some()
            && let Some(e) = self.in_flight.take(cycle)
        {
            if let Some(sample) = e.sample
                && completion.outcome == Outcome::Completed
                && (200..300).contains(&completion.status)
            {
                self.learn(e.endpoint, sample);
            }
            if let Some(c) = self.committed.get_mut(&e.endpoint) {
                *c = (*c - e.kv_tokens).max(0);
            }
            self.add(e.endpoint, -e.output_tokens, -1);
        }
    }
}

impl Producer for InflightLoadProducer {
    fn produce(&mut self, cycle: &Cycle) -> Vec<f32> {
        self.release_due(cycle.now_ms);
        let n = cycle.len();
        let r = &cycle.request;
        let uncached: Vec<f32> = (0..n)
            .map(|i| uncached_tokens(r.prompt_tokens, cycle.value(0, i), cycle.value(1, i), cycle.value(2, i)))
            .collect();
        let estimate = self.estimate_output(r.prompt_tokens, r.max_tokens);
        let output = self.held_output(estimate);
        let mut out = Vec::with_capacity(3 * n);
        out.extend(cycle.ids.iter().map(|id| (self.load(*id).tokens + self.pressure(*id)) as f32));
        out.extend(cycle.ids.iter().map(|id| self.load(*id).requests as f32));
        out.extend(uncached.iter().map(|u| u + output as f32));
        let produced = Produced {
            ids: cycle.ids.clone(),
            uncached,
            output_estimate: estimate,
            now_ms: cycle.now_ms,
            stream: r.stream,
        };
        self.pending.insert(cycle.id, produced);
        out
    }
}

llmd_plugin_sdk::export_producer!(InflightLoadProducer);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncached_tokens_are_the_prompt_past_the_matched_blocks() {
        // (prompt, matched, total, block) → uncached
        let cases = [
            (1000, 0.0, 16.0, 64.0, 1000.0),
            (1000, 10.0, 16.0, 64.0, 360.0),
            (1000, 16.0, 16.0, 64.0, 0.0),
            (5000, 16.0, 16.0, 64.0, 5000.0 - 1024.0),
            (1000, f32::NAN, 16.0, 64.0, 1000.0),
            (1000, 3.0, 0.0, 64.0, 1000.0),
        ];
        for (prompt, m, t, b, want) in cases {
            let got = uncached_tokens(prompt, m, t, b);
            assert!((got - want).abs() < 1e-3, "{prompt} {m} {t} {b}: {got} vs {want}");
        }
    }
}
