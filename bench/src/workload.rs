//! What the benchmarks feed the router: deterministic prompt text of a given size, OpenAI
//! request bodies, synthetic pools with varied load for the scheduler, and the shared-prefix
//! workload (a few system prompts, many users) of the routing-quality runs.
//!
//! Everything here is a pure function of its arguments and a seed, so two runs (and the
//! wasm and native halves of one run) see exactly the same inputs.

use epp_core::{Candidates, EndpointInfo, Request};
use llmd_plugin_sdk::rng::SplitMix64;

/// The model name every benchmark request names (the simulated workers serve any name).
pub const MODEL: &str = "sim-model";

/// Words the prompt text is made of: plain ASCII, so a body's size is its prompt's size
/// plus a few bytes of JSON, with nothing to escape.
const WORDS: [&str; 16] = [
    "the", "model", "routes", "every", "request", "to", "a", "worker", "whose", "cache", "holds", "its", "prefix",
    "when", "load", "allows",
];

/// `bytes` bytes of text, different for every `seed`.
pub fn text(seed: u64, bytes: usize) -> String {
    let mut rng = SplitMix64::new(seed);
    let mut out = String::with_capacity(bytes + 16);
    // A seed tag first, so two texts differ from their first block (prefix hashing sees
    // them as unrelated from the start).
    out.push_str(&format!("[{seed:016x}] "));
    while out.len() < bytes {
        out.push_str(WORDS[rng.below(WORDS.len())]);
        out.push(' ');
    }
    out.truncate(bytes);
    out
}

/// A `/v1/chat/completions` body with a system and a user message.
pub fn chat_body(system: &str, user: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ],
        "max_tokens": max_tokens,
        "stream": stream,
    })
    .to_string()
}

/// `n` endpoints with ids 0..n, as discovery would announce them.
pub fn pool(n: usize) -> Vec<EndpointInfo> {
    (0..n as u32)
        .map(|id| EndpointInfo {
            id,
            name: format!("ep-{id}"),
            address: "127.0.0.1".into(),
            port: 8000u16.wrapping_add(id as u16),
            ..Default::default()
        })
        .collect()
}

/// Candidates for `n` endpoints with spread-out queues and cache use, so that every scorer
/// has real work (an idle pool would let scores tie).
pub fn busy_metrics(n: usize) -> Candidates {
    let ids: Vec<u32> = (0..n as u32).collect();
    Candidates {
        waiting: ids.iter().map(|i| (i * 7 % 11) as f32).collect(),
        running: ids.iter().map(|i| (i % 5) as f32).collect(),
        kv_usage: ids.iter().map(|i| (i * 13 % 90) as f32 / 100.0).collect(),
        age_ms: ids.iter().map(|_| 10.0).collect(),
        attributes: Vec::new(),
        own_in_flight: Vec::new(),
        ids,
    }
}

/// Scheduler requests of about `prompt_bytes` each: `shared` system prompts followed by a
/// per-request tail, so the prefix index is exercised with hits as in production.
pub fn scheduler_requests(count: usize, prompt_bytes: usize, shared: usize) -> Vec<Request> {
    let tail = (prompt_bytes / 8).clamp(1, 1024);
    let systems: Vec<String> = (0..shared as u64).map(|s| text(s, prompt_bytes.saturating_sub(tail))).collect();
    (0..count)
        .map(|k| {
            let mut prompt = systems[k % shared.max(1)].clone();
            prompt.push_str(&text(1_000_000 + k as u64, tail));
            Request {
                id: format!("req-{k}"),
                model: MODEL.into(),
                prompt_tokens: Request::estimate_tokens(prompt.len()),
                prompt,
                random_seed: k as u64,
                // Streamed, as the end-to-end and quality runs send them.
                stream: true,
                ..Default::default()
            }
        })
        .collect()
}

/// A request with a prompt of `prompt_bytes` no other request of this module shares
/// (request `k` of a new conversation, as the scheduler sees it).
pub fn fresh_request(k: u64, prompt_bytes: usize) -> Request {
    let prompt = text(2_000_000 + k, prompt_bytes);
    Request {
        id: format!("fresh-{k}"),
        model: MODEL.into(),
        prompt_tokens: Request::estimate_tokens(prompt.len()),
        prompt,
        random_seed: k,
        stream: true,
        ..Default::default()
    }
}

/// A shared-prefix workload: `systems` system prompts of `system_bytes`; `users` users, each
/// bound to one system prompt (user u to prompt u mod systems), ask questions of `user_bytes`.
#[derive(Clone, Debug)]
pub struct SharedPrefix {
    systems: Vec<String>,
    users: usize,
    user_bytes: usize,
    max_tokens: u32,
}

impl SharedPrefix {
    pub fn new(systems: usize, system_bytes: usize, users: usize, user_bytes: usize, max_tokens: u32) -> Self {
        SharedPrefix {
            systems: (0..systems as u64).map(|s| text(0xC0FFEE + s, system_bytes)).collect(),
            users: users.max(1),
            user_bytes,
            max_tokens,
        }
    }

    /// The streamed chat body of request `k`: a user drawn at random (seeded by `k`) asks.
    pub fn body(&self, k: u64) -> String {
        let user = SplitMix64::new(k ^ 0x5EED).below(self.users);
        let system = &self.systems[user % self.systems.len()];
        let question = format!("user {user} question {k}: {}", text(k, self.user_bytes));
        chat_body(system, &question, self.max_tokens, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_the_size_asked_and_depends_on_the_seed() {
        for bytes in [30, 1024, 16 * 1024] {
            assert_eq!(text(1, bytes).len(), bytes);
        }
        assert_eq!(text(3, 500), text(3, 500));
        assert_ne!(text(3, 500)[..64], text(4, 500)[..64]);
    }

    #[test]
    fn scheduler_requests_share_system_prompts() {
        let reqs = scheduler_requests(4, 4096, 2);
        assert!(reqs.iter().all(|r| (4096..4096 + 16).contains(&r.prompt.len())), "sizes");
        assert_eq!(reqs[0].prompt[..3584], reqs[2].prompt[..3584]);
        assert_ne!(reqs[0].prompt[..64], reqs[1].prompt[..64]);
    }

    #[test]
    fn shared_prefix_bodies_are_streamed_chat_requests() {
        let w = SharedPrefix::new(2, 256, 10, 32, 4);
        let v: serde_json::Value = serde_json::from_str(&w.body(7)).expect("json");
        assert_eq!(v["stream"], true);
        assert_eq!(v["messages"][0]["content"].as_str().map(str::len), Some(256));
        assert_eq!(w.body(7), w.body(7));
    }

    #[test]
    fn busy_metrics_are_aligned_and_in_range() {
        let m = busy_metrics(100);
        assert_eq!((m.ids.len(), m.waiting.len(), m.running.len(), m.kv_usage.len()), (100, 100, 100, 100));
        assert!(m.kv_usage.iter().all(|k| (0.0..1.0).contains(k)));
    }
}
