//! The serving model of one simulated vLLM worker, in virtual time.
//!
//! It owns continuous batching (at most `max_num_seqs` running sequences, a FIFO waiting
//! queue, at most `max_loras` distinct LoRA adapters running), engine-step timing (prefill of
//! uncached prompt tokens plus one decode token for every running sequence), the KV cache
//! with prefix reuse (`kv_cache.rs`), and vLLM-style counters. It is pure: every call carries
//! the current time `now` in seconds and nothing here reads a clock, sleeps or does I/O, so
//! the HTTP front end (real time, `engine.rs`) and an offline replay tool (virtual time)
//! drive the same code.
//!
//! Engine steps run back to back while there is work. A step starting at `s` first admits
//! waiting requests (FIFO; a request that does not fit in the KV cache blocks the queue, one
//! whose LoRA adapter cannot be loaded is skipped, as vLLM's scheduler does), then lasts
//! `prefill_us_per_token × uncached prompt tokens of the admitted + decode_ms_base +
//! decode_ms_per_seq × running`. At its end every running sequence has one more token; the
//! ones that reached `max_tokens` finish and free their blocks. A request arriving during a
//! step waits for the next one (one arriving at the very instant a step starts joins it).
//! A sequence reserves the blocks for its whole length (prompt
//! plus `max_tokens`) when admitted, so nothing is ever preempted; vLLM allocates lazily and
//! preempts under pressure, which this model does not reproduce.

use std::collections::{BTreeSet, VecDeque};

use thiserror::Error;

use crate::kv_cache::{Allocation, BYTES_PER_TOKEN, KvCache, KvEvent, block_hashes, pseudo_tokens};

/// Parameters of the serving model. Defaults resemble a small model on one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelParams {
    /// Running sequences at most (vLLM `--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Distinct LoRA adapters running at once at most (vLLM `--max-loras`).
    pub max_loras: usize,
    /// Tokens per KV block (vLLM `--block-size`).
    pub block_size: usize,
    /// KV blocks on the GPU.
    pub num_gpu_blocks: usize,
    /// Prefill cost of one uncached prompt token, microseconds.
    pub prefill_us_per_token: f64,
    /// Fixed cost of one decode step, milliseconds.
    pub decode_ms_base: f64,
    /// Extra cost of one decode step per running sequence, milliseconds.
    pub decode_ms_per_seq: f64,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams {
            max_num_seqs: 32,
            max_loras: 1,
            block_size: 16,
            num_gpu_blocks: 2048,
            prefill_us_per_token: 50.0,
            decode_ms_base: 8.0,
            decode_ms_per_seq: 0.25,
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum ParamsError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{0} must be a finite number >= 0")]
    NotFiniteNonNegative(&'static str),
}

/// A pool whose workers differ: each worker's KV blocks and speed, taken in turn from
/// these lists (worker `w` gets entry `w % len`); an empty list leaves that parameter as
/// the base has it. Speed 0.5 doubles a worker's prefill and decode times.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolShape {
    pub blocks: Vec<usize>,
    pub speed: Vec<f64>,
}

impl PoolShape {
    /// Worker `w`'s parameters: `base` with its blocks and speed.
    pub fn worker(&self, base: &ModelParams, w: usize) -> ModelParams {
        let mut p = base.clone();
        if !self.blocks.is_empty() {
            p.num_gpu_blocks = self.blocks[w % self.blocks.len()];
        }
        if !self.speed.is_empty() {
            let s = self.speed[w % self.speed.len()];
            p.prefill_us_per_token /= s;
            p.decode_ms_base /= s;
            p.decode_ms_per_seq /= s;
        }
        p
    }

    /// The `--worker-blocks` / `--worker-speed` flags that give this shape (none when empty).
    pub fn flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if !self.blocks.is_empty() {
            flags.extend(["--worker-blocks".into(), join(&self.blocks, ",")]);
        }
        if !self.speed.is_empty() {
            flags.extend(["--worker-speed".into(), join(&self.speed, ",")]);
        }
        flags
    }

    /// Rejects zero blocks and speeds that are not positive numbers, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.blocks.contains(&0) {
            return Err("--worker-blocks: every entry must be at least 1".into());
        }
        if let Some(s) = self.speed.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(format!("--worker-speed: every entry must be a positive number, got {s}"));
        }
        Ok(())
    }

    /// How the pool differs, for report headers ("" when uniform): e.g.
    /// "KV blocks 2048/512, speed 1/0.5 (in turn)".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.blocks.len() > 1 {
            parts.push(format!("KV blocks {}", join(&self.blocks, "/")));
        }
        if self.speed.iter().any(|&s| s != 1.0) {
            parts.push(format!("speed {}", join(&self.speed, "/")));
        }
        if parts.is_empty() { String::new() } else { format!("{} (worker by worker, in turn)", parts.join(", ")) }
    }
}

fn join<T: std::fmt::Display>(values: &[T], sep: &str) -> String {
    values.iter().map(T::to_string).collect::<Vec<_>>().join(sep)
}

impl ModelParams {
    pub fn validate(&self) -> Result<(), ParamsError> {
        for (name, value) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_loras", self.max_loras),
            ("block_size", self.block_size),
            ("num_gpu_blocks", self.num_gpu_blocks),
        ] {
            if value == 0 {
                return Err(ParamsError::Zero(name));
            }
        }
        for (name, value) in [
            ("prefill_us_per_token", self.prefill_us_per_token),
            ("decode_ms_base", self.decode_ms_base),
            ("decode_ms_per_seq", self.decode_ms_per_seq),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(ParamsError::NotFiniteNonNegative(name));
            }
        }
        Ok(())
    }

    /// Prompt bytes per KV block.
    pub fn block_bytes(&self) -> usize {
        self.block_size * BYTES_PER_TOKEN
    }

    /// Duration of one engine step, seconds.
    fn step_seconds(&self, prefill_tokens: u64, running: usize) -> f64 {
        prefill_tokens as f64 * self.prefill_us_per_token / 1e6
            + (self.decode_ms_base + self.decode_ms_per_seq * running as f64) / 1e3
    }
}

/// What the model needs to know about a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    pub prompt_tokens: u32,
    /// Chained hashes of the prompt's full blocks (see `kv_cache::block_hashes`).
    pub block_hashes: Vec<u64>,
    /// The tokens of those blocks (`kv_cache::pseudo_tokens`), for KV events.
    pub block_tokens: std::sync::Arc<[u32]>,
    /// Tokens to generate; 0 for a prefill-only request (embeddings).
    pub max_tokens: u32,
    pub lora: Option<String>,
}

impl ModelRequest {
    /// Builds a request from prompt text: about four bytes a token (at least one token), and
    /// block hashes seeded by `namespace` (the model name and cache salt).
    pub fn from_prompt(
        params: &ModelParams,
        prompt: &[u8],
        namespace: &[&[u8]],
        max_tokens: u32,
        lora: Option<String>,
    ) -> Self {
        let tokens = prompt.len().div_ceil(BYTES_PER_TOKEN).max(1);
        let block_hashes = block_hashes(prompt, params.block_bytes(), namespace);
        let block_tokens = pseudo_tokens(prompt, block_hashes.len(), params.block_bytes()).into();
        ModelRequest {
            prompt_tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
            block_hashes,
            block_tokens,
            max_tokens,
            lora,
        }
    }
}

/// Identifies a request inside one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Model time of the event, seconds.
    pub at: f64,
    pub id: RequestId,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// Output token `index` (0-based) was generated.
    Token { index: u32 },
    /// The request finished; no more events follow for it.
    Finished(Usage),
}

#[derive(Debug, Error, PartialEq)]
pub enum AdmitError {
    #[error("request needs {needed} KV blocks ({tokens} tokens) but the cache holds only {capacity}")]
    TooLarge { needed: usize, tokens: u64, capacity: usize },
}

/// Cumulative counters, vLLM-style (token counters count tokens, not requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub request_success: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
}

/// A point-in-time view for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelStats {
    pub waiting: usize,
    pub running: usize,
    /// Fraction of KV blocks held by running requests, in [0, 1].
    pub kv_usage: f64,
    /// Distinct adapters of running / waiting requests, sorted.
    pub running_loras: Vec<String>,
    pub waiting_loras: Vec<String>,
    pub counters: Counters,
}

#[derive(Debug)]
struct Seq {
    id: RequestId,
    req: ModelRequest,
    generated: u32,
    cached_tokens: u32,
    /// Present exactly while the sequence is running.
    blocks: Option<Allocation>,
}

/// The serving model; see the module documentation.
#[derive(Debug)]
pub struct Model {
    params: ModelParams,
    kv: KvCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// The step in flight; `None` when idle.
    step: Option<Step>,
    /// Model time up to which steps have been processed.
    clock: f64,
    /// Events produced while catching up inside `admit`/`abort`, handed out by `advance`.
    outbox: Vec<Event>,
    next_id: u64,
    counters: Counters,
}

#[derive(Debug, Clone, Copy)]
struct Step {
    start: f64,
    end: f64,
    prefill_tokens: u64,
}

// Invariant: when `step` is None, `running` and `waiting` are empty. A step is started as
// soon as work arrives, and an idle engine can always admit the queue head: every request
// fits in an empty cache (checked by `admit`) and no adapter is loaded.
impl Model {
    pub fn new(params: ModelParams) -> Result<Self, ParamsError> {
        params.validate()?;
        Ok(Model {
            kv: KvCache::new(params.num_gpu_blocks),
            params,
            waiting: VecDeque::new(),
            running: Vec::new(),
            step: None,
            clock: 0.0,
            outbox: Vec::new(),
            next_id: 0,
            counters: Counters::default(),
        })
    }

    /// Starts recording the KV cache's stores and evictions (see `drain_kv_events`).
    pub fn record_kv_events(&mut self, on: bool) {
        self.kv.record_events(on);
    }

    /// What the KV cache stored and evicted since the last call.
    pub fn drain_kv_events(&mut self) -> Vec<KvEvent> {
        self.kv.drain_events()
    }

    pub fn params(&self) -> &ModelParams {
        &self.params
    }

    /// Model time up to which the model has advanced.
    pub fn now(&self) -> f64 {
        self.clock
    }

    /// Queues a request arriving at `now`. Steps ending at or before `now` are processed
    /// first; their events come out of the next [`Model::advance`].
    pub fn admit(&mut self, now: f64, req: ModelRequest) -> Result<RequestId, AdmitError> {
        let now = self.catch_up(now);
        let tokens = u64::from(req.prompt_tokens) + u64::from(req.max_tokens);
        let needed = self.blocks_for(&req);
        if needed > self.kv.capacity() {
            return Err(AdmitError::TooLarge { needed, tokens, capacity: self.kv.capacity() });
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.waiting.push_back(Seq { id, req, generated: 0, cached_tokens: 0, blocks: None });
        match self.step {
            None => self.start_step(now),
            Some(step) if step.start == now => self.join_step(step),
            Some(_) => {}
        }
        Ok(id)
    }

    /// Drops a request (client gone): it leaves the queue or the batch and frees its blocks.
    /// Returns whether it was known.
    pub fn abort(&mut self, now: f64, id: RequestId) -> bool {
        self.catch_up(now);
        if let Some(pos) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(pos);
            return true;
        }
        if let Some(pos) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.swap_remove(pos);
            if let Some(blocks) = seq.blocks {
                self.kv.release(blocks);
            }
            return true;
        }
        false
    }

    /// Processes every step ending at or before `now` and returns the events since the last
    /// call, in time order.
    pub fn advance(&mut self, now: f64) -> Vec<Event> {
        self.catch_up(now);
        std::mem::take(&mut self.outbox)
    }

    /// Model time of the next event (the end of the step in flight), if any.
    pub fn next_event_time(&self) -> Option<f64> {
        self.step.map(|s| s.end)
    }

    /// Runs until no work is left and returns all events; the clock ends at the last one.
    pub fn run_until_idle(&mut self) -> Vec<Event> {
        while let Some(step) = self.step {
            self.finish_step(step.end);
        }
        std::mem::take(&mut self.outbox)
    }

    /// Sequences in the batch right now; unlike [`Model::stats`] it allocates nothing, for
    /// callers that sample the load at every request (the offline replay).
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Requests in the waiting queue right now (allocation-free, like [`Model::running`]).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn stats(&self) -> ModelStats {
        let loras = |seqs: &mut dyn Iterator<Item = &Seq>| -> Vec<String> {
            let set: BTreeSet<&str> = seqs.filter_map(|s| s.req.lora.as_deref()).collect();
            set.into_iter().map(str::to_owned).collect()
        };
        ModelStats {
            waiting: self.waiting.len(),
            running: self.running.len(),
            kv_usage: self.kv.usage(),
            running_loras: loras(&mut self.running.iter()),
            waiting_loras: loras(&mut self.waiting.iter()),
            counters: self.counters,
        }
    }

    fn blocks_for(&self, req: &ModelRequest) -> usize {
        let tokens = u64::from(req.prompt_tokens) + u64::from(req.max_tokens);
        let blocks = tokens.div_ceil(self.params.block_size as u64);
        // The hashed blocks are part of the prompt, so `blocks >= block_hashes.len()` for any
        // request built by `from_prompt`; `max` keeps a hand-built one from under-counting.
        usize::try_from(blocks).unwrap_or(usize::MAX).max(req.block_hashes.len())
    }

    /// Processes steps ending at or before `now`; returns the time the clock now shows.
    fn catch_up(&mut self, now: f64) -> f64 {
        // Time never runs backwards; a NaN or stale `now` means "no time has passed".
        let now = if now >= self.clock { now } else { self.clock };
        while let Some(step) = self.step {
            if step.end > now {
                break;
            }
            self.finish_step(step.end);
        }
        self.clock = now;
        now
    }

    fn start_step(&mut self, start: f64) {
        let prefill_tokens = self.schedule();
        self.step = if self.running.is_empty() {
            debug_assert!(self.waiting.is_empty(), "an idle engine left requests waiting");
            None
        } else {
            let end = start + self.params.step_seconds(prefill_tokens, self.running.len());
            Some(Step { start, end, prefill_tokens })
        };
    }

    /// Admits into the step that starts right now, which then lasts longer.
    fn join_step(&mut self, step: Step) {
        let prefill_tokens = step.prefill_tokens + self.schedule();
        let end = step.start + self.params.step_seconds(prefill_tokens, self.running.len());
        self.step = Some(Step { end, prefill_tokens, ..step });
    }

    /// Moves waiting requests into the batch; returns the prompt tokens they must prefill.
    fn schedule(&mut self) -> u64 {
        let mut prefill = 0u64;
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.params.max_num_seqs {
            let Some(seq) = self.waiting.get(i) else { break };
            if !self.lora_fits(seq.req.lora.as_deref()) {
                i += 1;
                continue;
            }
            let private = self.blocks_for(&seq.req).saturating_sub(seq.req.block_hashes.len());
            let Some(blocks) = self.kv.allocate_tokens(&seq.req.block_hashes, &seq.req.block_tokens, private) else {
                break; // FIFO: the head waits for space, and so does everyone behind it.
            };
            let Some(mut seq) = self.waiting.remove(i) else { break };
            let block_size = u32::try_from(self.params.block_size).unwrap_or(u32::MAX);
            let cached = u32::try_from(blocks.cached_blocks()).unwrap_or(u32::MAX).saturating_mul(block_size);
            // Like vLLM, the last prompt token is always computed, even on a full hit.
            seq.cached_tokens = cached.min(seq.req.prompt_tokens.saturating_sub(1));
            seq.blocks = Some(blocks);
            self.counters.prefix_cache_queries += u64::from(seq.req.prompt_tokens);
            self.counters.prefix_cache_hits += u64::from(seq.cached_tokens);
            prefill += u64::from(seq.req.prompt_tokens - seq.cached_tokens);
            self.running.push(seq);
        }
        prefill
    }

    fn lora_fits(&self, lora: Option<&str>) -> bool {
        let Some(lora) = lora else { return true };
        let mut loaded = BTreeSet::new();
        for seq in &self.running {
            if let Some(l) = seq.req.lora.as_deref() {
                if l == lora {
                    return true;
                }
                loaded.insert(l);
            }
        }
        loaded.len() < self.params.max_loras
    }

    fn finish_step(&mut self, end: f64) {
        let mut still_running = Vec::with_capacity(self.running.len());
        for mut seq in std::mem::take(&mut self.running) {
            if seq.generated < seq.req.max_tokens {
                self.outbox.push(Event { at: end, id: seq.id, kind: EventKind::Token { index: seq.generated } });
                seq.generated += 1;
                self.counters.generation_tokens += 1;
            }
            if seq.generated < seq.req.max_tokens {
                still_running.push(seq);
                continue;
            }
            if let Some(blocks) = seq.blocks.take() {
                self.kv.release(blocks);
            }
            self.counters.request_success += 1;
            self.counters.prompt_tokens += u64::from(seq.req.prompt_tokens);
            let usage = Usage {
                prompt_tokens: seq.req.prompt_tokens,
                completion_tokens: seq.generated,
                cached_tokens: seq.cached_tokens,
            };
            self.outbox.push(Event { at: end, id: seq.id, kind: EventKind::Finished(usage) });
        }
        self.running = still_running;
        self.clock = self.clock.max(end);
        self.start_step(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ModelParams {
        ModelParams {
            max_num_seqs: 4,
            max_loras: 1,
            block_size: 16,
            num_gpu_blocks: 64,
            prefill_us_per_token: 100.0,
            decode_ms_base: 10.0,
            decode_ms_per_seq: 1.0,
        }
    }

    #[test]
    fn a_pool_shape_gives_each_worker_its_blocks_and_speed_in_turn() {
        let shape = PoolShape { blocks: vec![2048, 512], speed: vec![1.0, 1.0, 0.5] };
        let w = |i| shape.worker(&params(), i);
        assert_eq!((w(0).num_gpu_blocks, w(1).num_gpu_blocks, w(2).num_gpu_blocks), (2048, 512, 2048));
        assert_eq!(w(0).prefill_us_per_token, 100.0);
        let slow = w(2);
        assert_eq!((slow.prefill_us_per_token, slow.decode_ms_base, slow.decode_ms_per_seq), (200.0, 20.0, 2.0));
        let fifth = w(5);
        assert_eq!((fifth.num_gpu_blocks, fifth.prefill_us_per_token), (512, 200.0), "lists cycle independently");
        assert_eq!(PoolShape::default().worker(&params(), 3), params(), "an empty shape changes nothing");
        assert!(PoolShape::default().flags().is_empty());
        assert_eq!(shape.flags(), ["--worker-blocks", "2048,512", "--worker-speed", "1,1,0.5"]);
        assert_eq!(shape.describe(), "KV blocks 2048/512, speed 1/1/0.5 (worker by worker, in turn)");
        assert!(PoolShape { blocks: vec![0], speed: vec![] }.validate().unwrap_err().contains("--worker-blocks"));
        assert!(PoolShape { blocks: vec![], speed: vec![-1.0] }.validate().unwrap_err().contains("--worker-speed"));
        assert!(shape.validate().is_ok());
    }

    fn req(p: &ModelParams, prompt: &str, max_tokens: u32) -> ModelRequest {
        ModelRequest::from_prompt(p, prompt.as_bytes(), &[b"m"], max_tokens, None)
    }

    fn lora_req(p: &ModelParams, lora: &str) -> ModelRequest {
        ModelRequest::from_prompt(p, b"hello", &[lora.as_bytes()], 4, Some(lora.to_owned()))
    }

    /// Finish time and usage of `id` among `events`.
    fn finished(events: &[Event], id: RequestId) -> (f64, Usage) {
        events
            .iter()
            .find_map(|e| match e.kind {
                EventKind::Finished(u) if e.id == id => Some((e.at, u)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{id:?} did not finish in {events:?}"))
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn rejects_invalid_params() {
        let cases: Vec<(ModelParams, ParamsError)> = vec![
            (ModelParams { max_num_seqs: 0, ..params() }, ParamsError::Zero("max_num_seqs")),
            (ModelParams { num_gpu_blocks: 0, ..params() }, ParamsError::Zero("num_gpu_blocks")),
            (ModelParams { decode_ms_base: f64::NAN, ..params() }, ParamsError::NotFiniteNonNegative("decode_ms_base")),
            (
                ModelParams { prefill_us_per_token: -1.0, ..params() },
                ParamsError::NotFiniteNonNegative("prefill_us_per_token"),
            ),
        ];
        for (p, want) in cases {
            assert_eq!(Model::new(p).err(), Some(want));
        }
        assert!(Model::new(ModelParams::default()).is_ok());
    }

    #[test]
    fn latency_is_prefill_plus_decode_steps() {
        let p = params();
        let mut m = Model::new(p.clone()).expect("valid");
        // 400 bytes = 100 tokens: 10 ms of prefill; each step decodes one sequence: 11 ms.
        let id = m.admit(1.0, req(&p, &"x".repeat(400), 3)).expect("fits");
        let events = m.run_until_idle();
        let tokens: Vec<_> = events.iter().filter(|e| matches!(e.kind, EventKind::Token { .. })).collect();
        assert_eq!(tokens.len(), 3);
        assert!(close(tokens[0].at, 1.0 + 0.010 + 0.011), "first token after prefill: {}", tokens[0].at);
        let (at, usage) = finished(&events, id);
        assert!(close(at, 1.0 + 0.010 + 3.0 * 0.011), "finish at {at}");
        assert_eq!(usage, Usage { prompt_tokens: 100, completion_tokens: 3, cached_tokens: 0 });
        assert_eq!(m.next_event_time(), None, "idle again");
    }

    #[test]
    fn prefix_reuse_reduces_prefill() {
        let p = params();
        let mut m = Model::new(p.clone()).expect("valid");
        let prompt = "a shared system prompt, long enough to span several blocks. ".repeat(8);
        let first = m.admit(0.0, req(&p, &prompt, 1)).expect("fits");
        let events = m.run_until_idle();
        let (end1, u1) = finished(&events, first);
        let second = m.admit(10.0, req(&p, &prompt, 1)).expect("fits");
        let events = m.run_until_idle();
        let (end2, u2) = finished(&events, second);
        assert_eq!(u1.cached_tokens, 0);
        let full_blocks = (prompt.len() / p.block_bytes()) as u32;
        assert_eq!(u2.cached_tokens, full_blocks * 16, "every full block is reused");
        assert!(end2 - 10.0 < end1, "cached prefill is faster: {} vs {end1}", end2 - 10.0);
        let c = m.stats().counters;
        assert_eq!(c.prefix_cache_queries, 2 * u64::from(u1.prompt_tokens));
        assert_eq!(c.prefix_cache_hits, u64::from(u2.cached_tokens));
    }

    #[test]
    fn a_fully_cached_prompt_still_computes_one_token() {
        let p = params();
        let mut m = Model::new(p.clone()).expect("valid");
        let prompt = "y".repeat(p.block_bytes() * 2);
        m.admit(0.0, req(&p, &prompt, 1)).expect("fits");
        m.run_until_idle();
        let id = m.admit(5.0, req(&p, &prompt, 1)).expect("fits");
        let (_, usage) = finished(&m.run_until_idle(), id);
        assert_eq!(usage.cached_tokens, usage.prompt_tokens - 1);
    }

    #[test]
    fn queues_when_slots_are_full() {
        let p = ModelParams { max_num_seqs: 2, ..params() };
        let mut m = Model::new(p.clone()).expect("valid");
        let ids: Vec<_> = (0..3).map(|_| m.admit(0.0, req(&p, "hi", 2)).expect("fits")).collect();
        let s = m.stats();
        assert_eq!((s.running, s.waiting), (2, 1));
        let events = m.run_until_idle();
        let (end0, _) = finished(&events, ids[0]);
        let (end2, _) = finished(&events, ids[2]);
        assert!(end2 > end0, "the third request runs after a slot frees");
        let s = m.stats();
        assert_eq!((s.running, s.waiting, s.counters.request_success), (0, 0, 3));
    }

    #[test]
    fn arrivals_during_a_step_wait_for_the_next() {
        let p = params();
        let mut m = Model::new(p.clone()).expect("valid");
        m.admit(0.0, req(&p, "first", 50)).expect("fits");
        let step_end = m.next_event_time().expect("busy");
        m.admit(step_end / 2.0, req(&p, "second", 1)).expect("fits");
        assert_eq!(m.stats().waiting, 1, "not admitted mid-step");
        m.advance(step_end);
        assert_eq!((m.stats().running, m.stats().waiting), (2, 0));
    }

    #[test]
    fn decode_slows_down_with_batch_size() {
        let p = params();
        let step = |n: usize| {
            let mut m = Model::new(p.clone()).expect("valid");
            for _ in 0..n {
                m.admit(0.0, req(&p, "z", 3)).expect("fits");
            }
            let events = m.run_until_idle();
            let ats: Vec<f64> =
                events.iter().filter(|e| e.kind == EventKind::Token { index: 1 }).map(|e| e.at).collect();
            let firsts: Vec<f64> =
                events.iter().filter(|e| e.kind == EventKind::Token { index: 0 }).map(|e| e.at).collect();
            ats[0] - firsts[0]
        };
        assert!(close(step(1), 0.011));
        assert!(close(step(4), 0.014));
    }

    #[test]
    fn kv_usage_stays_within_bounds_and_drains() {
        let p = ModelParams { num_gpu_blocks: 20, ..params() };
        let mut m = Model::new(p.clone()).expect("valid");
        let mut max_usage: f64 = 0.0;
        for i in 0..12 {
            let prompt = format!("{i} ").repeat(40 + i * 10);
            m.admit(i as f64 * 0.005, req(&p, &prompt, 8)).expect("fits");
            let s = m.stats();
            assert!((0.0..=1.0).contains(&s.kv_usage), "usage {}", s.kv_usage);
            max_usage = max_usage.max(s.kv_usage);
        }
        while let Some(t) = m.next_event_time() {
            m.advance(t);
            let s = m.stats();
            assert!((0.0..=1.0).contains(&s.kv_usage), "usage {}", s.kv_usage);
            assert!(s.running <= p.max_num_seqs);
        }
        assert!(max_usage > 0.5, "the workload should pressure the cache: {max_usage}");
        assert_eq!(m.stats().kv_usage, 0.0, "all blocks are free when idle");
        assert_eq!(m.stats().counters.request_success, 12);
    }

    #[test]
    fn too_large_requests_are_rejected() {
        let p = ModelParams { num_gpu_blocks: 4, ..params() };
        let mut m = Model::new(p.clone()).expect("valid");
        let err = m.admit(0.0, req(&p, &"q".repeat(300), 1)).expect_err("76 tokens need 5 blocks");
        assert_eq!(err, AdmitError::TooLarge { needed: 5, tokens: 76, capacity: 4 });
        assert_eq!(m.next_event_time(), None);
    }

    #[test]
    fn lora_adapters_beyond_max_loras_wait_without_blocking_others() {
        let p = params();
        let mut m = Model::new(p.clone()).expect("valid");
        let a = m.admit(0.0, lora_req(&p, "a")).expect("fits");
        m.admit(0.0, lora_req(&p, "b")).expect("fits");
        m.admit(0.0, req(&p, "base", 4)).expect("fits");
        let s = m.stats();
        assert_eq!((s.running, s.waiting), (2, 1));
        assert_eq!(s.running_loras, vec!["a".to_owned()]);
        assert_eq!(s.waiting_loras, vec!["b".to_owned()]);
        let events = m.advance(100.0);
        let (end_a, _) = finished(&events, a);
        let b_first = events.iter().find(|e| e.id == RequestId(1)).expect("b ran").at;
        assert!(b_first > end_a, "b starts only after a unloads");
    }

    #[test]
    fn abort_frees_slots_and_blocks() {
        let p = params();
        let mut m = Model::new(p.clone()).expect("valid");
        let id = m.admit(0.0, req(&p, &"w".repeat(200), 100)).expect("fits");
        assert!(m.stats().kv_usage > 0.0);
        assert!(m.abort(0.001, id));
        let s = m.stats();
        assert_eq!((s.running, s.kv_usage, s.counters.request_success), (0, 0.0, 0));
        assert!(!m.abort(0.002, id), "already gone");
        m.run_until_idle();
        assert_eq!(m.next_event_time(), None);
    }

    #[test]
    fn prefill_only_requests_finish_without_tokens() {
        let p = params();
        let mut m = Model::new(p.clone()).expect("valid");
        let id = m.admit(0.0, req(&p, "embed me", 0)).expect("fits");
        let events = m.run_until_idle();
        assert_eq!(events.len(), 1);
        assert_eq!(finished(&events, id).1.completion_tokens, 0);
    }
}
