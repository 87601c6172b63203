//! Workloads for the offline replay: the request list a run feeds to the simulated cluster,
//! read from a JSONL trace or made by one of the built-in generators.
//!
//! It owns the trace format (parsed once into validated [`WorkItem`]s; a bad line is an
//! error naming the line) and the generators (Poisson arrivals with shared system prompts,
//! multi-turn sessions whose prefixes grow, a LoRA mix, bursts), all deterministic for a
//! seed. Prompts are kept as segments and turned into bytes only when a request arrives, so
//! 100k requests cost little memory. It knows nothing of workers or policies.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use llmd_plugin_sdk::rng::SplitMix64;
use serde::Deserialize;

/// Bytes of prompt text per token, as the simulated worker and the prefix index count them.
pub const BYTES_PER_TOKEN: usize = sim::kv_cache::BYTES_PER_TOKEN;

/// The model name requests carry when a trace line names none.
pub const DEFAULT_MODEL: &str = sim::config::DEFAULT_MODEL_NAME;

/// A piece of a prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    /// Literal text (from a trace).
    Text(Arc<[u8]>),
    /// `len` bytes of pseudo-text drawn from `seed`. Equal seeds give equal bytes (a shorter
    /// segment is a prefix of a longer one): this is how requests share a prefix.
    Synthetic { seed: u64, len: u32 },
}

impl Segment {
    fn len(&self) -> usize {
        match self {
            Segment::Text(t) => t.len(),
            Segment::Synthetic { len, .. } => *len as usize,
        }
    }
}

/// A prompt as a list of segments, concatenated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prompt(pub Vec<Segment>);

/// Printable characters the synthetic text is drawn from (32, so a byte's low bits index it).
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz ,.'-\n";

impl Prompt {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.iter().map(Segment::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the prompt's bytes to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.reserve(self.len());
        for segment in &self.0 {
            match segment {
                Segment::Text(t) => out.extend_from_slice(t),
                Segment::Synthetic { seed, len } => {
                    let mut rng = SplitMix64::new(*seed);
                    let mut left = *len as usize;
                    while left > 0 {
                        let word = rng.next_u64().to_le_bytes();
                        let take = left.min(word.len());
                        out.extend(word[..take].iter().map(|b| ALPHABET[usize::from(b & 31)]));
                        left -= take;
                    }
                }
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }
}

/// One request of a workload.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkItem {
    /// Arrival time, seconds from the start of the run.
    pub at: f64,
    /// The base model's name.
    pub model: Arc<str>,
    /// The LoRA adapter asked for; the request's `model` field then names it, as OpenAI
    /// clients name adapters.
    pub lora: Option<Arc<str>>,
    pub prompt: Prompt,
    pub output_tokens: u32,
    /// Session or user key, sent as the `x-session-id` header.
    pub session: Option<Arc<str>>,
    /// Objective priority; negative is sheddable.
    pub priority: i32,
    pub cache_salt: Option<Arc<str>>,
    /// Tenant (fairness id), sent as `x-llm-d-inference-fairness-id`.
    pub tenant: Option<Arc<str>>,
}

impl WorkItem {
    /// The model name the request carries (the adapter for LoRA requests).
    pub fn requested_model(&self) -> &str {
        self.lora.as_deref().unwrap_or(&self.model)
    }

    /// The headers its request carries: the session (as `session-affinity-scorer` reads it
    /// by default) and the tenant (the fairness id). Its priority travels in the request
    /// itself in replay; a live client sends it as an objective header.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if let Some(s) = &self.session {
            headers.push((SESSION_HEADER, s.to_string()));
        }
        if let Some(t) = &self.tenant {
            headers.push((crate::flow::FAIRNESS_HEADERS[0], t.to_string()));
        }
        headers
    }
}

/// The header a work item's session travels in: what `session-affinity-scorer`'s
/// `session_id` strategy reads by default.
pub const SESSION_HEADER: &str = "x-session-id";

/// A workload: requests in arrival order.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// `shared-prefix`, … or the trace file's name.
    pub name: String,
    pub items: Vec<WorkItem>,
}

impl Workload {
    /// Keeps the first `n` requests.
    pub fn truncate(&mut self, n: usize) {
        self.items.truncate(n);
    }

    /// Arrival time of the last request.
    pub fn span(&self) -> f64 {
        self.items.last().map(|i| i.at).unwrap_or(0.0)
    }
}

/// The built-in generators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generator {
    SharedPrefix,
    MultiTurn,
    LoraMix,
    Bursts,
    Unique,
    /// Two tenants, one sending ten times the other's rate, over the pool's capacity.
    Tenants,
    /// One system prompt shared by every request (one application): the prompt must
    /// spread over the workers as its traffic grows, not stay on the first one.
    OnePrompt,
    /// Long generations (reasoning, agents): a few shared prompts, long and varied user
    /// parts and outputs, so a worker's load is mostly its running decodes.
    LongOutput,
}

impl Generator {
    pub const ALL: [Generator; 8] = [
        Generator::SharedPrefix,
        Generator::MultiTurn,
        Generator::LoraMix,
        Generator::Bursts,
        Generator::Unique,
        Generator::Tenants,
        Generator::OnePrompt,
        Generator::LongOutput,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Generator::SharedPrefix => "shared-prefix",
            Generator::MultiTurn => "multi-turn",
            Generator::LoraMix => "lora-mix",
            Generator::Bursts => "bursts",
            Generator::Unique => "unique",
            Generator::Tenants => "tenants",
            Generator::OnePrompt => "one-prompt",
            Generator::LongOutput => "long-output",
        }
    }

    /// Requests per second per worker when `--rate` is not given: about 70% of what a
    /// `small` worker serves with prefix-aware routing, so a naive policy queues visibly.
    pub fn default_rate_per_worker(self) -> f64 {
        match self {
            Generator::SharedPrefix | Generator::Bursts => 10.0,
            Generator::MultiTurn => 6.0,
            Generator::LoraMix | Generator::OnePrompt => 6.0,
            // A `small` worker holds about 18 of these requests' KV at once (1 800 tokens each on average).
            Generator::LongOutput => 1.5,
            Generator::Unique => 4.0,
            // Over capacity on purpose: queues form (in the workers, or in the EPP with flow control).
            Generator::Tenants => 7.0,
        }
    }
}

impl FromStr for Generator {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Generator::ALL.into_iter().find(|g| g.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Generator::ALL.iter().map(|g| g.name()).collect();
            format!("unknown generator `{s}`; expected one of {}", names.join(", "))
        })
    }
}

/// What a generator is asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenParams {
    pub requests: usize,
    /// Mean arrival rate, requests per second.
    pub rate: f64,
    pub seed: u64,
}

/// Distinct system prompts in the generated workloads. 48 prompts of 1024 tokens are 3072
/// KV blocks of 16 tokens: more than a `small` worker's 2048, so a worker that sees all of
/// them thrashes its prefix cache, while a policy that keeps each prompt on a few workers
/// fits them (12 per worker on 4 workers). The count does not depend on the cluster, so one
/// workload can be replayed on clusters of any size.
pub const SHARED_PROMPTS: usize = 48;
/// Tokens of a shared system prompt.
pub const SYSTEM_PROMPT_TOKENS: u32 = 1024;
/// Tokens of a user message: uniform in this range.
pub const USER_TOKENS: (u32, u32) = (64, 256);
/// Output tokens of a reply: uniform in this range.
pub const OUTPUT_TOKENS: (u32, u32) = (32, 160);
/// Multi-turn sessions: turns per session (uniform), pause between turns (seconds: fixed part
/// plus an exponential part with this mean), and the context at which a session stops.
pub const TURNS: (u32, u32) = (2, 8);
pub const TURN_GAP_S: (f64, f64) = (2.0, 8.0);
pub const MAX_CONTEXT_TOKENS: u32 = 6144;
/// LoRA mix: adapters `lora-0` … (popularity ∝ 1/(rank+1)) and the share of base-model requests.
pub const LORA_ADAPTERS: usize = 8;
pub const LORA_BASE_SHARE: f64 = 0.25;
/// Bursts: in every period the rate is `BURST_FACTOR ×` the mean for `BURST_S` seconds and
/// `CALM_FACTOR ×` the rest of the time (mean preserved); this share of requests is sheddable.
pub const BURST_PERIOD_S: f64 = 10.0;
pub const BURST_S: f64 = 2.0;
pub const BURST_FACTOR: f64 = 3.0;
pub const CALM_FACTOR: f64 = 0.5;
pub const SHEDDABLE_SHARE: f64 = 0.25;
/// Unique: no shared prefix at all; prompt and output lengths vary widely (log-uniform), so
/// a policy that ignores load piles long requests on one worker.
pub const UNIQUE_PROMPT_TOKENS: (u32, u32) = (32, 4096);
pub const UNIQUE_OUTPUT_TOKENS: (u32, u32) = (4, 512);
/// Long output: one of a few shared prompts, then a user part and an output of log-uniform
/// lengths. Most prompts match their shared part by less than upstream's affinity
/// threshold (0.8), so the prefix scorer, not the affinity filter, keeps them on its holders.
pub const LONG_OUTPUT_PROMPTS: usize = 8;
pub const LONG_OUTPUT_PREFIX_TOKENS: u32 = 512;
pub const LONG_OUTPUT_USER_TOKENS: (u32, u32) = (128, 2048);
pub const LONG_OUTPUT_TOKENS: (u32, u32) = (64, 2048);

/// Seeds of the parts a generator draws, kept apart so that e.g. the system prompts do not
/// change when the arrival process does.
#[derive(Clone, Copy)]
enum Stream {
    Arrivals = 1,
    SystemPrompt = 2,
    Unique = 3,
    Choices = 4,
}

fn stream_seed(seed: u64, stream: Stream, index: u64) -> u64 {
    let mut rng = SplitMix64::new(seed ^ (stream as u64).rotate_left(48) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    rng.next_u64()
}

fn uniform(rng: &mut SplitMix64, (lo, hi): (u32, u32)) -> u32 {
    lo + rng.below((hi - lo + 1) as usize) as u32
}

fn exponential(rng: &mut SplitMix64, mean: f64) -> f64 {
    // 1 - u is in (0, 1], so the logarithm is finite.
    -(1.0 - rng.next_f64()).ln() * mean
}

fn synthetic(seed: u64, tokens: u32) -> Segment {
    Segment::Synthetic { seed, len: tokens.saturating_mul(BYTES_PER_TOKEN as u32) }
}

/// Makes the workload of `generator`. Deterministic: equal parameters give equal workloads.
pub fn generate(generator: Generator, p: &GenParams) -> Workload {
    let items = match generator {
        Generator::SharedPrefix => {
            shared_prefix(p, &SYSTEM_PROMPTS, |rng, t| t + exponential(rng, 1.0 / p.rate), false)
        }
        Generator::OnePrompt => shared_prefix(
            p,
            &Shape { prompts: 1, ..SYSTEM_PROMPTS },
            |rng, t| t + exponential(rng, 1.0 / p.rate),
            false,
        ),
        Generator::Bursts => shared_prefix(p, &SYSTEM_PROMPTS, |rng, t| next_burst_arrival(rng, t, p.rate), true),
        Generator::MultiTurn => multi_turn(p),
        Generator::LoraMix => lora_mix(p),
        Generator::Unique => unique(p),
        Generator::Tenants => tenants(p),
        Generator::LongOutput => shared_prefix(p, &LONG_OUTPUT, |rng, t| t + exponential(rng, 1.0 / p.rate), false),
    };
    Workload { name: generator.name().to_string(), items }
}

/// The lengths of a shared-prompt workload: `prompts` prompts of `prefix_tokens`, then a
/// user part and an output drawn in these ranges, uniformly or log-uniformly.
struct Shape {
    prompts: usize,
    prefix_tokens: u32,
    user_tokens: (u32, u32),
    output_tokens: (u32, u32),
    log_uniform: bool,
}

const SYSTEM_PROMPTS: Shape = Shape {
    prompts: SHARED_PROMPTS,
    prefix_tokens: SYSTEM_PROMPT_TOKENS,
    user_tokens: USER_TOKENS,
    output_tokens: OUTPUT_TOKENS,
    log_uniform: false,
};

const LONG_OUTPUT: Shape = Shape {
    prompts: LONG_OUTPUT_PROMPTS,
    prefix_tokens: LONG_OUTPUT_PREFIX_TOKENS,
    user_tokens: LONG_OUTPUT_USER_TOKENS,
    output_tokens: LONG_OUTPUT_TOKENS,
    log_uniform: true,
};

/// Requests of one of the shape's prompts (chosen at random) and a user part of their own.
fn shared_prefix(
    p: &GenParams,
    shape: &Shape,
    mut next: impl FnMut(&mut SplitMix64, f64) -> f64,
    sheddable: bool,
) -> Vec<WorkItem> {
    let model: Arc<str> = Arc::from(DEFAULT_MODEL);
    let mut arrivals = SplitMix64::new(stream_seed(p.seed, Stream::Arrivals, 0));
    let mut choices = SplitMix64::new(stream_seed(p.seed, Stream::Choices, 0));
    let mut t = 0.0;
    (0..p.requests)
        .map(|i| {
            t = next(&mut arrivals, t);
            let group = choices.below(shape.prompts) as u64;
            let draw = if shape.log_uniform { log_uniform } else { uniform };
            let user = draw(&mut choices, shape.user_tokens);
            let output = draw(&mut choices, shape.output_tokens);
            let priority = if sheddable && choices.next_f64() < SHEDDABLE_SHARE { -1 } else { 0 };
            WorkItem {
                at: t,
                model: model.clone(),
                lora: None,
                prompt: Prompt(vec![
                    synthetic(stream_seed(p.seed, Stream::SystemPrompt, group), shape.prefix_tokens),
                    synthetic(stream_seed(p.seed, Stream::Unique, i as u64), user),
                ]),
                output_tokens: output,
                session: None,
                priority,
                cache_salt: None,
                tenant: None,
            }
        })
        .collect()
}

/// The next arrival after `t` of a Poisson process whose rate follows the burst pattern.
fn next_burst_arrival(rng: &mut SplitMix64, mut t: f64, rate: f64) -> f64 {
    loop {
        let in_period = t % BURST_PERIOD_S;
        let (factor, phase_end) = if in_period < BURST_S {
            (BURST_FACTOR, t - in_period + BURST_S)
        } else {
            (CALM_FACTOR, t - in_period + BURST_PERIOD_S)
        };
        let candidate = t + exponential(rng, 1.0 / (rate * factor));
        if candidate < phase_end {
            return candidate;
        }
        // Memorylessness: restarting at the phase boundary with the new rate is exact.
        t = phase_end;
    }
}

fn multi_turn(p: &GenParams) -> Vec<WorkItem> {
    let model: Arc<str> = Arc::from(DEFAULT_MODEL);
    let mean_turns = f64::from(TURNS.0 + TURNS.1) / 2.0;
    let session_rate = p.rate / mean_turns;
    let mut arrivals = SplitMix64::new(stream_seed(p.seed, Stream::Arrivals, 0));
    let mut choices = SplitMix64::new(stream_seed(p.seed, Stream::Choices, 0));
    let mut items = Vec::with_capacity(p.requests + TURNS.1 as usize);
    let mut start = 0.0;
    let mut session = 0u64;
    // Turn times not yet known to be among the first `requests` arrivals (as ordered bits:
    // for non-negative floats the bit patterns sort like the values).
    let mut unsettled: BinaryHeap<Reverse<u64>> = BinaryHeap::new();
    let mut settled = 0usize;
    // Sessions are made until the first `requests` arrivals are known: a session starting
    // at `start` adds nothing earlier. The list is then cut in arrival order, so late
    // sessions lose their last turns, as they would at the end of a real trace.
    while settled < p.requests {
        start += exponential(&mut arrivals, 1.0 / session_rate);
        while unsettled.peek().is_some_and(|Reverse(bits)| f64::from_bits(*bits) <= start) {
            unsettled.pop();
            settled += 1;
        }
        let key: Arc<str> = Arc::from(format!("session-{session}"));
        let group = choices.below(SHARED_PROMPTS) as u64;
        let mut segments = vec![synthetic(stream_seed(p.seed, Stream::SystemPrompt, group), SYSTEM_PROMPT_TOKENS)];
        let mut context = SYSTEM_PROMPT_TOKENS;
        let mut at = start;
        for turn in 0..uniform(&mut choices, TURNS) {
            let user = uniform(&mut choices, USER_TOKENS);
            let output = uniform(&mut choices, OUTPUT_TOKENS);
            if context + user + output > MAX_CONTEXT_TOKENS {
                break;
            }
            let unique = stream_seed(p.seed, Stream::Unique, (session << 16) | (u64::from(turn) << 1));
            segments.push(synthetic(unique, user));
            unsettled.push(Reverse(at.to_bits()));
            items.push(WorkItem {
                at,
                model: model.clone(),
                lora: None,
                prompt: Prompt(segments.clone()),
                output_tokens: output,
                session: Some(key.clone()),
                priority: 0,
                cache_salt: None,
                tenant: None,
            });
            // The reply becomes part of the next turn's prompt.
            let reply = stream_seed(p.seed, Stream::Unique, (session << 16) | (u64::from(turn) << 1) | 1);
            segments.push(synthetic(reply, output));
            context += user + output;
            at += TURN_GAP_S.0 + exponential(&mut arrivals, TURN_GAP_S.1);
        }
        session += 1;
    }
    items.sort_by(|a, b| a.at.total_cmp(&b.at));
    items.truncate(p.requests);
    items
}

/// Uniform on a log scale in `[lo, hi]`.
fn log_uniform(rng: &mut SplitMix64, (lo, hi): (u32, u32)) -> u32 {
    let (lo, hi) = (f64::from(lo.max(1)), f64::from(hi.max(lo.max(1))));
    (lo * (hi / lo).powf(rng.next_f64())).round() as u32
}

fn unique(p: &GenParams) -> Vec<WorkItem> {
    let model: Arc<str> = Arc::from(DEFAULT_MODEL);
    let mut arrivals = SplitMix64::new(stream_seed(p.seed, Stream::Arrivals, 0));
    let mut choices = SplitMix64::new(stream_seed(p.seed, Stream::Choices, 0));
    let mut t = 0.0;
    (0..p.requests)
        .map(|i| {
            t += exponential(&mut arrivals, 1.0 / p.rate);
            WorkItem {
                at: t,
                model: model.clone(),
                lora: None,
                prompt: Prompt(vec![synthetic(
                    stream_seed(p.seed, Stream::Unique, i as u64),
                    log_uniform(&mut choices, UNIQUE_PROMPT_TOKENS),
                )]),
                output_tokens: log_uniform(&mut choices, UNIQUE_OUTPUT_TOKENS),
                session: None,
                priority: 0,
                cache_salt: None,
                tenant: None,
            }
        })
        .collect()
}

/// The heavy tenant's share of the `tenants` workload's arrivals (ten times the light one's).
pub const HEAVY_TENANT_SHARE: f64 = 10.0 / 11.0;
pub const TENANTS: [&str; 2] = ["tenant-heavy", "tenant-light"];
/// Prompt and output tokens of the `tenants` workload: log-uniform in these ranges.
pub const TENANT_PROMPT_TOKENS: (u32, u32) = (64, 1024);
pub const TENANT_OUTPUT_TOKENS: (u32, u32) = (16, 256);

/// Unique prompts from two tenants sharing one pool, one of them sending ten times as much.
fn tenants(p: &GenParams) -> Vec<WorkItem> {
    let model: Arc<str> = Arc::from(DEFAULT_MODEL);
    let names: Vec<Arc<str>> = TENANTS.iter().map(|t| Arc::from(*t)).collect();
    let mut arrivals = SplitMix64::new(stream_seed(p.seed, Stream::Arrivals, 0));
    let mut choices = SplitMix64::new(stream_seed(p.seed, Stream::Choices, 0));
    let mut t = 0.0;
    (0..p.requests)
        .map(|i| {
            t += exponential(&mut arrivals, 1.0 / p.rate);
            let tenant = if choices.next_f64() < HEAVY_TENANT_SHARE { &names[0] } else { &names[1] };
            WorkItem {
                at: t,
                model: model.clone(),
                lora: None,
                prompt: Prompt(vec![synthetic(
                    stream_seed(p.seed, Stream::Unique, i as u64),
                    log_uniform(&mut choices, TENANT_PROMPT_TOKENS),
                )]),
                output_tokens: log_uniform(&mut choices, TENANT_OUTPUT_TOKENS),
                session: None,
                priority: 0,
                cache_salt: None,
                tenant: Some(tenant.clone()),
            }
        })
        .collect()
}

fn lora_mix(p: &GenParams) -> Vec<WorkItem> {
    let model: Arc<str> = Arc::from(DEFAULT_MODEL);
    let adapters: Vec<Arc<str>> = (0..LORA_ADAPTERS).map(|i| Arc::from(format!("lora-{i}"))).collect();
    let weights: Vec<f64> = (0..LORA_ADAPTERS).map(|i| 1.0 / (i + 1) as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut arrivals = SplitMix64::new(stream_seed(p.seed, Stream::Arrivals, 0));
    let mut choices = SplitMix64::new(stream_seed(p.seed, Stream::Choices, 0));
    let mut t = 0.0;
    (0..p.requests)
        .map(|i| {
            t += exponential(&mut arrivals, 1.0 / p.rate);
            let lora = if choices.next_f64() < LORA_BASE_SHARE {
                None
            } else {
                let mut x = choices.next_f64() * total;
                let mut pick = LORA_ADAPTERS - 1;
                for (k, w) in weights.iter().enumerate() {
                    if x < *w {
                        pick = k;
                        break;
                    }
                    x -= w;
                }
                adapters.get(pick).cloned()
            };
            let group = choices.below(SHARED_PROMPTS) as u64;
            WorkItem {
                at: t,
                model: model.clone(),
                lora,
                prompt: Prompt(vec![
                    synthetic(stream_seed(p.seed, Stream::SystemPrompt, group), SYSTEM_PROMPT_TOKENS),
                    synthetic(stream_seed(p.seed, Stream::Unique, i as u64), uniform(&mut choices, USER_TOKENS)),
                ]),
                output_tokens: uniform(&mut choices, OUTPUT_TOKENS),
                session: None,
                priority: 0,
                cache_salt: None,
                tenant: None,
            }
        })
        .collect()
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TraceError {
    #[error("cannot read trace {path}: {error}")]
    Read { path: String, error: String },
    #[error("trace line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("the trace has no requests")]
    Empty,
}

/// One line of a JSONL trace, as written. See docs/replay.md for the format.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceLine {
    at: f64,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    prompt_tokens: Option<u32>,
    #[serde(default)]
    prefix_group: Option<String>,
    #[serde(default)]
    prefix_tokens: Option<u32>,
    output_tokens: u32,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    lora: Option<String>,
    #[serde(default)]
    cache_salt: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
}

/// Reads a JSONL trace file.
pub fn read_trace(path: &Path) -> Result<Workload, TraceError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TraceError::Read { path: path.display().to_string(), error: e.to_string() })?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "trace".into());
    parse_trace(&name, &text)
}

/// Parses JSONL trace text: one request per non-blank line, sorted by arrival (stably, so
/// requests arriving together keep their order).
pub fn parse_trace(name: &str, text: &str) -> Result<Workload, TraceError> {
    let mut items = Vec::new();
    let mut models: Vec<Arc<str>> = Vec::new();
    let mut intern = |s: &str| -> Arc<str> {
        if let Some(m) = models.iter().find(|m| &***m == s) {
            return m.clone();
        }
        let m: Arc<str> = Arc::from(s);
        models.push(m.clone());
        m
    };
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let err = |message: String| TraceError::Line { line, message };
        let parsed: TraceLine = serde_json::from_str(raw).map_err(|e| err(e.to_string()))?;
        if !(parsed.at.is_finite() && parsed.at >= 0.0) {
            return Err(err(format!("`at` must be a finite number of seconds >= 0, got {}", parsed.at)));
        }
        let prompt = match (parsed.prompt, parsed.prompt_tokens) {
            (Some(_), Some(_)) => return Err(err("give `prompt` or `prompt_tokens`, not both".into())),
            (None, None) => return Err(err("missing `prompt` (text) or `prompt_tokens`".into())),
            (Some(text), None) => {
                if parsed.prefix_group.is_some() || parsed.prefix_tokens.is_some() {
                    return Err(err("`prefix_group`/`prefix_tokens` go with `prompt_tokens`, not `prompt`".into()));
                }
                Prompt(vec![Segment::Text(Arc::from(text.into_bytes()))])
            }
            (None, Some(tokens)) => synthetic_prompt(line, tokens, parsed.prefix_group, parsed.prefix_tokens)?,
        };
        let model = parsed.model.unwrap_or_else(|| DEFAULT_MODEL.to_string());
        if model.is_empty() {
            return Err(err("`model` is empty".into()));
        }
        if parsed.lora.as_deref() == Some("") {
            return Err(err("`lora` is empty".into()));
        }
        items.push(WorkItem {
            at: parsed.at,
            model: intern(&model),
            lora: parsed.lora.as_deref().map(&mut intern),
            prompt,
            output_tokens: parsed.output_tokens,
            session: parsed.session.map(Arc::from),
            priority: parsed.priority.unwrap_or(0),
            cache_salt: parsed.cache_salt.map(Arc::from),
            tenant: parsed.tenant.map(Arc::from),
        });
    }
    if items.is_empty() {
        return Err(TraceError::Empty);
    }
    items.sort_by(|a, b| a.at.total_cmp(&b.at));
    Ok(Workload { name: name.to_string(), items })
}

/// A prompt of `tokens` tokens whose first `prefix_tokens` are the text of `prefix_group`
/// (equal groups give equal prefixes) and the rest unique to the line.
fn synthetic_prompt(
    line: usize,
    tokens: u32,
    group: Option<String>,
    prefix_tokens: Option<u32>,
) -> Result<Prompt, TraceError> {
    let err = |message: String| TraceError::Line { line, message };
    if tokens == 0 {
        return Err(err("`prompt_tokens` must be at least 1".into()));
    }
    let max = u32::MAX / BYTES_PER_TOKEN as u32;
    if tokens > max {
        return Err(err(format!("`prompt_tokens` {tokens} is over the limit of {max}")));
    }
    let prefix = match (group, prefix_tokens) {
        (None, None) => None,
        (Some(g), Some(n)) if n <= tokens => Some((g, n)),
        (Some(_), Some(n)) => return Err(err(format!("`prefix_tokens` {n} exceeds `prompt_tokens` {tokens}"))),
        (Some(_), None) => return Err(err("`prefix_group` needs `prefix_tokens`".into())),
        (None, Some(_)) => return Err(err("`prefix_tokens` needs `prefix_group`".into())),
    };
    let mut segments = Vec::with_capacity(2);
    let mut rest = tokens;
    if let Some((group, n)) = prefix {
        segments.push(synthetic(xxhash_rust::xxh3::xxh3_64(group.as_bytes()), n));
        rest -= n;
    }
    if rest > 0 {
        // The unique part is seeded by the line, so a trace means the same prompts in every run.
        segments.push(synthetic(stream_seed(0, Stream::Unique, line as u64), rest));
    }
    Ok(Prompt(segments))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_travel_in_the_header_the_session_scorer_reads() {
        assert_eq!(SESSION_HEADER, session_affinity_scorer::DEFAULT_SESSION_HEADER);
    }

    fn params(requests: usize) -> GenParams {
        GenParams { requests, rate: 20.0, seed: 7 }
    }

    #[test]
    fn synthetic_segments_share_prefixes() {
        let long = Prompt(vec![Segment::Synthetic { seed: 5, len: 100 }]).to_bytes();
        let short = Prompt(vec![Segment::Synthetic { seed: 5, len: 37 }]).to_bytes();
        let other = Prompt(vec![Segment::Synthetic { seed: 6, len: 37 }]).to_bytes();
        assert_eq!(long.len(), 100);
        assert_eq!(&long[..37], &short[..]);
        assert_ne!(short, other);
        assert!(long.iter().all(|b| ALPHABET.contains(b)));
        let mixed = Prompt(vec![Segment::Text(Arc::from(&b"hi "[..])), Segment::Synthetic { seed: 5, len: 4 }]);
        assert_eq!(mixed.len(), 7);
        assert_eq!(&mixed.to_bytes()[..3], b"hi ");
    }

    #[test]
    fn generators_are_deterministic_and_sorted() {
        for generator in Generator::ALL {
            let a = generate(generator, &params(300));
            assert_eq!(a, generate(generator, &params(300)), "{generator:?}");
            assert_ne!(a, generate(generator, &GenParams { seed: 8, ..params(300) }), "{generator:?}");
            assert_eq!(a.items.len(), 300, "{generator:?}");
            assert!(a.items.windows(2).all(|w| w[0].at <= w[1].at), "{generator:?} not in arrival order");
            // Sessions ramp up over their length (tens of seconds), so a short multi-turn
            // workload runs below its long-run rate.
            let low = if generator == Generator::MultiTurn { 4.0 } else { 10.0 };
            let rate = a.items.len() as f64 / a.span();
            assert!((low..40.0).contains(&rate), "{generator:?}: rate {rate} for 20 asked");
        }
    }

    #[test]
    fn generators_have_their_shape() {
        let shared = generate(Generator::SharedPrefix, &params(200));
        let groups: std::collections::BTreeSet<_> =
            shared.items.iter().map(|i| i.prompt.0.first().cloned().map(|s| format!("{s:?}"))).collect();
        assert!(groups.len() <= SHARED_PROMPTS && groups.len() > 24, "{} groups", groups.len());

        let chat = generate(Generator::MultiTurn, &params(200));
        let first = chat.items.iter().find(|i| i.session.as_deref() == Some("session-0")).expect("session 0");
        let later: Vec<_> = chat.items.iter().filter(|i| i.session == first.session).collect();
        assert!(later.len() >= 2, "a session has several turns");
        let (a, b) = (later[0].prompt.to_bytes(), later[1].prompt.to_bytes());
        assert!(b.len() > a.len() && b.starts_with(&a), "the second turn extends the first");

        let lora = generate(Generator::LoraMix, &params(400));
        let with = lora.items.iter().filter(|i| i.lora.is_some()).count();
        assert!((200..380).contains(&with), "{with} LoRA requests of 400");
        assert!(lora.items.iter().any(|i| i.requested_model() == "lora-0"));

        let bursts = generate(Generator::Bursts, &GenParams { requests: 2000, ..params(0) });
        let in_burst = bursts.items.iter().filter(|i| i.at % BURST_PERIOD_S < BURST_S).count() as f64;
        let share = in_burst / 2000.0;
        assert!((0.45..0.75).contains(&share), "bursts carry 60% of the load, got {share}");
        assert!(bursts.items.iter().any(|i| i.priority < 0));

        let long = generate(Generator::LongOutput, &params(400));
        let prefixes: std::collections::BTreeSet<_> =
            long.items.iter().map(|i| i.prompt.0.first().cloned().map(|s| format!("{s:?}"))).collect();
        assert_eq!(prefixes.len(), LONG_OUTPUT_PROMPTS);
        let outputs: Vec<u32> = long.items.iter().map(|i| i.output_tokens).collect();
        let (lo, hi) = LONG_OUTPUT_TOKENS;
        assert!(outputs.iter().all(|o| (lo..=hi).contains(o)));
        // Log-uniform: as many outputs under the geometric mean (362) as over it, roughly.
        let short = outputs.iter().filter(|&&o| o < 362).count();
        assert!((140..260).contains(&short), "{short} of 400 outputs under 362 tokens");
        let user = long.items[0].prompt.to_bytes().len() / BYTES_PER_TOKEN - LONG_OUTPUT_PREFIX_TOKENS as usize;
        assert!((128..=2048).contains(&user), "user part of {user} tokens");
    }

    #[test]
    fn trace_lines_parse() {
        let text = concat!(
            r#"{"at": 0.5, "prompt": "hello world", "output_tokens": 4}"#,
            "\n\n",
            r#"{"at": 0.1, "model": "m", "prompt_tokens": 100, "prefix_group": "sys", "prefix_tokens": 64, "output_tokens": 8, "session": "u1", "priority": -1, "lora": "ad", "cache_salt": "s"}"#,
            "\n",
            r#"{"at": 0.2, "prompt_tokens": 100, "prefix_group": "sys", "prefix_tokens": 64, "output_tokens": 0}"#,
        );
        let w = parse_trace("t.jsonl", text).expect("valid");
        assert_eq!(w.items.len(), 3);
        let first = &w.items[0];
        assert_eq!(first.at, 0.1, "sorted by arrival");
        assert_eq!((&*first.model, first.requested_model(), first.priority), ("m", "ad", -1));
        assert_eq!(first.session.as_deref(), Some("u1"));
        assert_eq!(first.cache_salt.as_deref(), Some("s"));
        assert_eq!(first.prompt.len(), 400);
        let (a, b) = (w.items[0].prompt.to_bytes(), w.items[1].prompt.to_bytes());
        assert_eq!(a[..256], b[..256], "same group, same prefix");
        assert_ne!(a[256..], b[256..], "unique rest");
        assert_eq!(w.items[2].prompt.to_bytes(), b"hello world");
        assert_eq!(&*w.items[2].model, DEFAULT_MODEL);
    }

    #[test]
    fn bad_trace_lines_name_the_line() {
        let ok = r#"{"at": 0, "prompt": "x", "output_tokens": 1}"#;
        let cases: &[(&str, &str)] = &[
            ("{not json", "key must be a string"),
            (r#"{"at": 1, "output_tokens": 1}"#, "missing `prompt`"),
            (r#"{"at": 1, "prompt": "x"}"#, "missing field `output_tokens`"),
            (r#"{"at": -1, "prompt": "x", "output_tokens": 1}"#, "`at` must be"),
            (r#"{"at": 1, "prompt": "x", "prompt_tokens": 3, "output_tokens": 1}"#, "not both"),
            (r#"{"at": 1, "prompt": "x", "output_tokens": 1, "colour": 1}"#, "unknown field `colour`"),
            (r#"{"at": 1, "prompt_tokens": 0, "output_tokens": 1}"#, "at least 1"),
            (r#"{"at": 1, "prompt_tokens": 5, "prefix_group": "g", "output_tokens": 1}"#, "needs `prefix_tokens`"),
            (r#"{"at": 1, "prompt_tokens": 5, "prefix_tokens": 2, "output_tokens": 1}"#, "needs `prefix_group`"),
            (
                r#"{"at": 1, "prompt_tokens": 5, "prefix_group": "g", "prefix_tokens": 9, "output_tokens": 1}"#,
                "exceeds",
            ),
            (r#"{"at": 1, "prompt": "x", "prefix_group": "g", "output_tokens": 1}"#, "go with `prompt_tokens`"),
            (r#"{"at": 1, "prompt": "x", "output_tokens": -3}"#, "invalid value"),
            (r#"{"at": 1, "prompt": "x", "output_tokens": 1, "lora": ""}"#, "`lora` is empty"),
        ];
        for (bad, want) in cases {
            let text = format!("{ok}\n\n{bad}\n{ok}");
            match parse_trace("t", &text) {
                Err(TraceError::Line { line: 3, message }) => assert!(message.contains(want), "{bad}: {message}"),
                other => panic!("{bad}: expected an error on line 3, got {other:?}"),
            }
        }
        assert_eq!(parse_trace("t", "\n  \n"), Err(TraceError::Empty));
    }
}
