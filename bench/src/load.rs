//! The load generator: our own HTTP client (reqwest) sending OpenAI requests through an
//! Envoy listener, closed-loop (a fixed number of clients, each sending its next request
//! when the last one finished) or open-loop (a fixed arrival rate, whatever the latency).
//! Latencies go into HDR histograms; for streamed replies it also records the time to the
//! first body chunk (TTFT) and the prompt-cache usage the worker reports.
//!
//! Open-loop latency is measured from when a request was due, not when it was sent, so a
//! stalled client cannot hide queueing (no coordinated omission).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::latency::Latency;

/// Request `k`'s body. Called on the client's path, so it should be cheap (clone a prepared
/// body, or build a small one).
pub type BodyFn = Arc<dyn Fn(u64) -> String + Send + Sync>;

/// How the load is offered.
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    /// `clients` closed loops for `duration`.
    Clients { clients: usize, duration: Duration },
    /// Exactly `total` requests (k = 0..total) over `clients` closed loops.
    Requests { clients: usize, total: u64 },
    /// One request every 1/`per_sec` seconds for `duration`.
    Rate { per_sec: f64, duration: Duration },
}

/// Open-loop requests in flight beyond this are not sent (counted as errors): the system
/// under test is then far past saturation and the numbers would only measure the backlog.
const MAX_IN_FLIGHT: usize = 4096;

#[derive(Clone)]
pub struct Target {
    pub client: reqwest::Client,
    pub url: String,
    pub body: BodyFn,
    /// Streamed replies: record TTFT and read the usage from the SSE frames.
    pub stream: bool,
    /// Requests with k below this are sent but not recorded (warm-up).
    pub record_from: u64,
}

/// What one load run observed.
#[derive(Clone, Default)]
pub struct LoadResult {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the first request sent to the last reply read.
    pub elapsed: Duration,
    pub latency: Latency,
    pub ttft: Latency,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// Replies per worker (`x-sim-worker`).
    pub per_worker: BTreeMap<String, u64>,
}

impl LoadResult {
    /// Successful replies per second.
    pub fn throughput(&self) -> f64 {
        if self.elapsed.is_zero() { 0.0 } else { self.ok as f64 / self.elapsed.as_secs_f64() }
    }

    /// cached_tokens / prompt_tokens over the recorded replies.
    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prompt_tokens == 0 { f64::NAN } else { self.cached_tokens as f64 / self.prompt_tokens as f64 }
    }

    /// Adds `other`, run after this one: counts and histograms add, elapsed times add.
    pub fn merge(&mut self, other: &LoadResult) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.elapsed += other.elapsed;
        self.latency.merge(&other.latency);
        self.ttft.merge(&other.ttft);
        self.prompt_tokens += other.prompt_tokens;
        self.cached_tokens += other.cached_tokens;
        for (w, n) in &other.per_worker {
            *self.per_worker.entry(w.clone()).or_default() += n;
        }
    }

    fn record(&mut self, o: Outcome) {
        match o.error {
            Some(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(e);
                }
            }
            None => {
                self.ok += 1;
                self.latency.record(o.latency);
                if let Some(t) = o.ttft {
                    self.ttft.record(t);
                }
                if let Some((prompt, cached)) = o.usage {
                    self.prompt_tokens += u64::from(prompt);
                    self.cached_tokens += u64::from(cached);
                }
                if let Some(w) = o.worker {
                    *self.per_worker.entry(w).or_default() += 1;
                }
            }
        }
    }

    /// Merges the results of concurrent tasks (elapsed is set by the caller).
    fn absorb(&mut self, other: LoadResult) {
        let elapsed = self.elapsed;
        self.merge(&other);
        self.elapsed = elapsed;
    }
}

/// One request's outcome.
struct Outcome {
    latency: Duration,
    ttft: Option<Duration>,
    usage: Option<(u32, u32)>,
    worker: Option<String>,
    error: Option<String>,
}

impl Outcome {
    fn failed(error: String) -> Outcome {
        Outcome { latency: Duration::ZERO, ttft: None, usage: None, worker: None, error: Some(error) }
    }
}

/// A client for `clients` concurrent connections to one listener.
pub fn client(clients: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(clients.max(1))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()
        // Invariant: a builder with no TLS and no proxy settings cannot fail to build.
        .expect("http client")
}

/// Sends request `k` and reads the whole reply; latency counts from `due`.
async fn send(t: &Target, k: u64, due: Instant) -> Outcome {
    let body = (t.body)(k);
    let sent = t.client.post(&t.url).header("content-type", "application/json").body(body).send().await;
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => return Outcome::failed(format!("request {k}: {e}")),
    };
    let status = resp.status();
    let worker = resp.headers().get(sim::WORKER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut ttft = None;
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if ttft.is_none() {
                    ttft = Some(due.elapsed());
                }
                // Only streamed bodies are kept (for their usage); others are just drained.
                if t.stream || !status.is_success() {
                    body.extend_from_slice(&chunk);
                }
            }
            Ok(None) => break,
            Err(e) => return Outcome::failed(format!("request {k}: reading the body: {e}")),
        }
    }
    let latency = due.elapsed();
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return Outcome::failed(format!("request {k}: status {status}: {text}"));
    }
    let (ttft, usage) = if t.stream { (ttft, sse_usage(&body)) } else { (None, None) };
    Outcome { latency, ttft, usage, worker, error: None }
}

/// (prompt_tokens, cached_tokens) from the last SSE `data:` frame that carries `usage`.
pub fn sse_usage(body: &[u8]) -> Option<(u32, u32)> {
    let text = std::str::from_utf8(body).ok()?;
    // The usage frame is the last but one ([DONE] closes the stream): search from the end.
    text.lines()
        .rev()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            let u = v.get("usage").filter(|u| u.is_object())?;
            let prompt = u.get("prompt_tokens")?.as_u64()?;
            let cached = u.pointer("/prompt_tokens_details/cached_tokens").and_then(|c| c.as_u64()).unwrap_or(0);
            Some((u32::try_from(prompt).ok()?, u32::try_from(cached).ok()?))
        })
        .next()
}

/// Runs `shape` against `target`.
pub async fn run(target: &Target, shape: Shape) -> LoadResult {
    match shape {
        Shape::Clients { clients, duration } => closed_loop(target, clients, Some(duration), None).await,
        Shape::Requests { clients, total } => closed_loop(target, clients, None, Some(total)).await,
        Shape::Rate { per_sec, duration } => open_loop(target, per_sec, duration).await,
    }
}

async fn closed_loop(target: &Target, clients: usize, duration: Option<Duration>, total: Option<u64>) -> LoadResult {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = duration.map(|d| started + d);
    let mut tasks = JoinSet::new();
    for _ in 0..clients.max(1) {
        let (t, next) = (target.clone(), next.clone());
        tasks.spawn(async move {
            let mut r = LoadResult::default();
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let k = next.fetch_add(1, Ordering::Relaxed);
                if total.is_some_and(|n| k >= n) {
                    break;
                }
                let o = send(&t, k, Instant::now()).await;
                if k >= t.record_from {
                    r.record(o);
                }
            }
            r
        });
    }
    let mut result = LoadResult::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(r) => result.absorb(r),
            Err(e) => result.record(Outcome::failed(format!("client task failed: {e}"))),
        }
    }
    result.elapsed = started.elapsed();
    result
}

async fn open_loop(target: &Target, per_sec: f64, duration: Duration) -> LoadResult {
    let gap = Duration::from_secs_f64(1.0 / per_sec.max(1e-3));
    let started = Instant::now();
    let mut tasks: JoinSet<(u64, Outcome)> = JoinSet::new();
    let mut result = LoadResult::default();
    let mut k = 0u64;
    loop {
        let due = started + gap.mul_f64(k as f64);
        if due >= started + duration {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        while let Some(done) = tasks.try_join_next() {
            absorb_joined(&mut result, target.record_from, done);
        }
        if tasks.len() >= MAX_IN_FLIGHT {
            result.record(Outcome::failed(format!("request {k}: not sent, {MAX_IN_FLIGHT} requests in flight")));
        } else {
            let t = target.clone();
            tasks.spawn(async move { (k, send(&t, k, due).await) });
        }
        k += 1;
    }
    while let Some(done) = tasks.join_next().await {
        absorb_joined(&mut result, target.record_from, done);
    }
    result.elapsed = started.elapsed();
    result
}

fn absorb_joined(result: &mut LoadResult, record_from: u64, done: Result<(u64, Outcome), tokio::task::JoinError>) {
    match done {
        Ok((k, o)) if k >= record_from => result.record(o),
        Ok(_) => {}
        Err(e) => result.record(Outcome::failed(format!("request task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_comes_from_the_last_frame_that_has_it() {
        let body = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":120,\"completion_tokens\":4,",
            "\"prompt_tokens_details\":{\"cached_tokens\":96}}}\n\n",
            "data: [DONE]\n\n"
        );
        assert_eq!(sse_usage(body.as_bytes()), Some((120, 96)));
        assert_eq!(sse_usage(b"data: [DONE]\n\n"), None);
        assert_eq!(sse_usage(b"not sse at all"), None);
    }

    #[test]
    fn merged_results_add_up() {
        let mut a = LoadResult { ok: 2, elapsed: Duration::from_secs(1), prompt_tokens: 10, ..Default::default() };
        let b = LoadResult {
            ok: 4,
            errors: 1,
            first_error: Some("x".into()),
            elapsed: Duration::from_secs(1),
            cached_tokens: 5,
            ..Default::default()
        };
        a.merge(&b);
        assert_eq!((a.ok, a.errors, a.first_error.as_deref()), (6, 1, Some("x")));
        assert_eq!(a.throughput(), 3.0);
        assert_eq!(a.prefix_hit_rate(), 0.5);
    }
}
