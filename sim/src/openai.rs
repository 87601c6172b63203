//! The OpenAI wire format as the simulated worker speaks it: request bodies parsed once into
//! a validated [`InferenceRequest`], and the JSON of replies, stream chunks and errors.
//!
//! It owns shapes only: no model, no HTTP server, no clock (timestamps and ids are passed
//! in). What a prompt *is* for the model is decided here: completions use the prompt text
//! (an array of strings is joined with newlines), chat and responses render messages with a
//! stand-in chat template (`<|role|>\ncontent\n` per message, then `<|assistant|>\n`) so a
//! conversation's earlier turns form a stable prefix, and embeddings join their inputs.
//! Generated text is a fixed cycle of short words: the content is irrelevant, the count is not.

use serde::Deserialize;
use serde_json::{Value, json};
use thiserror::Error;

use crate::model::Usage;

/// `max_tokens` when the request names none.
pub const DEFAULT_MAX_TOKENS: u32 = 16;
/// Length of the (fake) embedding vectors.
pub const EMBEDDING_DIMS: usize = 16;

/// The OpenAI endpoint a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
    Responses,
    Embeddings,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
            Api::Responses => "/v1/responses",
            Api::Embeddings => "/v1/embeddings",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Api::Completions => "cmpl",
            Api::Chat => "chatcmpl",
            Api::Responses => "resp",
            Api::Embeddings => "embd",
        }
    }
}

/// A request body, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceRequest {
    pub api: Api,
    /// The `model` field; vLLM serves its default model when it is absent.
    pub model: Option<String>,
    /// The text the model sees (see the module documentation).
    pub prompt: String,
    /// Embeddings: how many inputs (one vector each). Otherwise 1.
    pub inputs: usize,
    /// Tokens to generate, >= 1; 0 for embeddings.
    pub max_tokens: u32,
    pub stream: bool,
    /// Whether a streamed reply ends with a usage chunk.
    pub include_usage: bool,
    /// vLLM's `cache_salt`: requests with different salts never share cached prefixes.
    pub cache_salt: Option<String>,
}

#[derive(Debug, Error)]
pub enum RequestError {
    #[error("invalid request body: {0}")]
    Json(#[from] serde_json::Error),
    #[error("`{field}` {problem}")]
    Invalid { field: &'static str, problem: &'static str },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TextOrList {
    Text(String),
    List(Vec<String>),
}

impl TextOrList {
    fn into_parts(self) -> Vec<String> {
        match self {
            TextOrList::Text(t) => vec![t],
            TextOrList::List(l) => l,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ResponsesInput {
    Text(String),
    Items(Vec<Message>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Fields every endpoint accepts.
#[derive(Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    max_output_tokens: Option<u32>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    cache_salt: Option<String>,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: TextOrList,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<Message>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ResponsesBody {
    input: ResponsesInput,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct EmbeddingsBody {
    input: TextOrList,
    #[serde(flatten)]
    common: Common,
}

/// The token ids the simulated model sees for `prompt`: every four bytes one id (the bytes
/// read as a little-endian u32, the tail zero-padded), which is prefix-preserving and matches
/// the model's four-bytes-a-token accounting. Served by the render and tokenize endpoints
/// that cache-aware routers ask before routing.
pub fn pseudo_tokens(prompt: &str) -> Vec<u32> {
    prompt
        .as_bytes()
        .chunks(crate::kv_cache::BYTES_PER_TOKEN)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(b)
        })
        .collect()
}

/// vLLM's `/v1/*/render` answer: the prompt's token ids.
pub fn render_reply(tokens: &[u32]) -> Value {
    json!({ "token_ids": tokens })
}

/// vLLM's `/tokenize` answer.
pub fn tokenize_reply(tokens: &[u32], max_model_len: u64) -> Value {
    json!({ "count": tokens.len(), "max_model_len": max_model_len, "tokens": tokens })
}

/// Parses and validates a request body for `api`.
pub fn parse_request(api: Api, body: &[u8]) -> Result<InferenceRequest, RequestError> {
    let (prompt, inputs, common) = match api {
        Api::Completions => {
            let b: CompletionBody = serde_json::from_slice(body)?;
            (b.prompt.into_parts().join("\n"), 1, b.common)
        }
        Api::Chat => {
            let b: ChatBody = serde_json::from_slice(body)?;
            if b.messages.is_empty() {
                return Err(RequestError::Invalid { field: "messages", problem: "must not be empty" });
            }
            (render_chat(&b.messages), 1, b.common)
        }
        Api::Responses => {
            let b: ResponsesBody = serde_json::from_slice(body)?;
            let mut messages = Vec::new();
            if let Some(instructions) = b.instructions {
                messages.push(Message { role: "system".into(), content: Some(Content::Text(instructions)) });
            }
            match b.input {
                ResponsesInput::Text(t) => {
                    messages.push(Message { role: "user".into(), content: Some(Content::Text(t)) })
                }
                ResponsesInput::Items(items) => messages.extend(items),
            }
            if messages.is_empty() {
                return Err(RequestError::Invalid { field: "input", problem: "must not be empty" });
            }
            (render_chat(&messages), 1, b.common)
        }
        Api::Embeddings => {
            let b: EmbeddingsBody = serde_json::from_slice(body)?;
            let parts = b.input.into_parts();
            if parts.is_empty() {
                return Err(RequestError::Invalid { field: "input", problem: "must not be empty" });
            }
            (parts.join("\n"), parts.len(), b.common)
        }
    };
    let max_tokens = if api == Api::Embeddings {
        0
    } else {
        let requested = common.max_completion_tokens.or(common.max_tokens).or(common.max_output_tokens);
        match requested {
            Some(0) => return Err(RequestError::Invalid { field: "max_tokens", problem: "must be at least 1" }),
            Some(n) => n,
            None => DEFAULT_MAX_TOKENS,
        }
    };
    let stream = api != Api::Embeddings && common.stream.unwrap_or(false);
    // OpenAI sends the usage chunk only on request; we send it unless explicitly refused, as
    // the gateway under test wants usage from every streamed reply.
    let include_usage = common.stream_options.and_then(|o| o.include_usage).unwrap_or(true);
    Ok(InferenceRequest {
        api,
        model: common.model,
        prompt,
        inputs,
        max_tokens,
        stream,
        include_usage,
        cache_salt: common.cache_salt,
    })
}

fn render_chat(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|");
        out.push_str(&m.role);
        out.push_str("|>\n");
        match &m.content {
            Some(Content::Text(t)) => out.push_str(t),
            Some(Content::Parts(parts)) => {
                // Non-text parts (images, audio) carry no text this model can count.
                for p in parts.iter().filter(|p| p.kind.ends_with("text")) {
                    out.push_str(p.text.as_deref().unwrap_or_default());
                }
            }
            None => {}
        }
        out.push('\n');
    }
    out.push_str("<|assistant|>\n");
    out
}

/// The text of generated token `index`.
pub fn token_text(index: u32) -> &'static str {
    const WORDS: [&str; 8] = [" The", " sim", " says", " hi", " and", " then", " more", "."];
    WORDS[index as usize % WORDS.len()]
}

/// The whole generated text of `tokens` tokens.
pub fn generated_text(tokens: u32) -> String {
    (0..tokens).map(token_text).collect()
}

/// Identity of one reply: its id, creation time (unix seconds) and the model name it echoes.
#[derive(Debug, Clone)]
pub struct ReplyMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ReplyMeta {
    pub fn new(api: Api, serial: u64, worker: &str, created: u64, model: String) -> Self {
        ReplyMeta { id: format!("{}-{worker}-{serial}", api.id_prefix()), created, model }
    }
}

/// Chat/completions `usage`.
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": u.cached_tokens },
    })
}

/// Responses-API `usage`.
fn responses_usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": { "cached_tokens": u.cached_tokens },
        "output_tokens": u.completion_tokens,
        "output_tokens_details": { "reasoning_tokens": 0 },
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// Every generated reply runs to `max_tokens`, so it always stops for length.
const FINISH_REASON: &str = "length";

/// The non-streamed reply of a finished request.
pub fn final_reply(req: &InferenceRequest, meta: &ReplyMeta, usage: &Usage) -> Value {
    let text = generated_text(usage.completion_tokens);
    match req.api {
        Api::Completions => json!({
            "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{ "index": 0, "text": text, "logprobs": null, "finish_reason": FINISH_REASON }],
            "usage": usage_json(usage),
        }),
        Api::Chat => json!({
            "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "logprobs": null,
                "finish_reason": FINISH_REASON,
            }],
            "usage": usage_json(usage),
        }),
        Api::Responses => response_object(meta, "completed", &text, Some(usage)),
        Api::Embeddings => {
            let data: Vec<Value> = (0..req.inputs)
                .map(|i| json!({ "object": "embedding", "index": i, "embedding": embedding(&req.prompt, i) }))
                .collect();
            json!({
                "object": "list", "data": data, "model": meta.model,
                "usage": { "prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens },
            })
        }
    }
}

fn response_object(meta: &ReplyMeta, status: &str, text: &str, usage: Option<&Usage>) -> Value {
    let output = if usage.is_some() {
        json!([{
            "type": "message", "id": format!("msg-{}", meta.id), "status": "completed", "role": "assistant",
            "content": [{ "type": "output_text", "text": text, "annotations": [] }],
        }])
    } else {
        json!([])
    };
    json!({
        "id": meta.id, "object": "response", "created_at": meta.created, "status": status,
        "model": meta.model, "output": output,
        "usage": usage.map(responses_usage_json),
    })
}

/// A deterministic unit vector that differs per input.
fn embedding(prompt: &str, index: usize) -> Vec<f32> {
    let seed = xxhash_rust::xxh64::xxh64(prompt.as_bytes(), index as u64);
    let raw: Vec<f32> = (0..EMBEDDING_DIMS).map(|d| ((seed >> (d * 4)) & 0xf) as f32 - 7.5).collect();
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
    raw.into_iter().map(|x| x / norm).collect()
}

/// One server-sent event: an optional `event:` name and its JSON (or `[DONE]`) data.
#[derive(Debug, Clone, PartialEq)]
pub struct SseFrame {
    pub event: Option<&'static str>,
    pub data: String,
}

impl SseFrame {
    fn data(v: Value) -> Self {
        SseFrame { event: None, data: v.to_string() }
    }

    fn named(event: &'static str, v: Value) -> Self {
        SseFrame { event: Some(event), data: v.to_string() }
    }

    pub fn done() -> Self {
        SseFrame { event: None, data: "[DONE]".into() }
    }

    /// The frame on the wire.
    pub fn encode(&self) -> String {
        match self.event {
            Some(e) => format!("event: {e}\ndata: {}\n\n", self.data),
            None => format!("data: {}\n\n", self.data),
        }
    }
}

/// Frames sent before the first token.
pub fn stream_start(req: &InferenceRequest, meta: &ReplyMeta) -> Vec<SseFrame> {
    match req.api {
        Api::Responses => vec![SseFrame::named(
            "response.created",
            json!({ "type": "response.created", "response": response_object(meta, "in_progress", "", None) }),
        )],
        _ => Vec::new(),
    }
}

/// The frame carrying generated token `index`.
pub fn stream_token(req: &InferenceRequest, meta: &ReplyMeta, index: u32) -> SseFrame {
    let text = token_text(index);
    let finish = if index + 1 >= req.max_tokens { Value::from(FINISH_REASON) } else { Value::Null };
    match req.api {
        Api::Chat => {
            let delta =
                if index == 0 { json!({ "role": "assistant", "content": text }) } else { json!({ "content": text }) };
            SseFrame::data(json!({
                "id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
            }))
        }
        Api::Responses => SseFrame::named(
            "response.output_text.delta",
            json!({
                "type": "response.output_text.delta", "item_id": format!("msg-{}", meta.id),
                "output_index": 0, "content_index": 0, "delta": text,
            }),
        ),
        Api::Completions | Api::Embeddings => SseFrame::data(json!({
            "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }],
        })),
    }
}

/// Frames closing a stream: the usage chunk (if wanted) and `[DONE]`; for the responses API
/// the `response.completed` event, which always carries usage.
pub fn stream_end(req: &InferenceRequest, meta: &ReplyMeta, usage: &Usage) -> Vec<SseFrame> {
    if req.api == Api::Responses {
        let text = generated_text(usage.completion_tokens);
        let response = response_object(meta, "completed", &text, Some(usage));
        return vec![SseFrame::named(
            "response.completed",
            json!({ "type": "response.completed", "response": response }),
        )];
    }
    let mut frames = Vec::new();
    if req.include_usage {
        let object = if req.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
        frames.push(SseFrame::data(json!({
            "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
            "choices": [], "usage": usage_json(usage),
        })));
    }
    frames.push(SseFrame::done());
    frames
}

/// An OpenAI-style error body, as vLLM sends it.
pub fn error_body(status: u16, kind: &str, message: &str) -> Value {
    json!({ "error": { "message": message, "type": kind, "param": null, "code": status } })
}

/// `GET /v1/models`: the served model, then each LoRA adapter with the model as its parent.
pub fn models_list(base: &str, loras: &[String], created: u64) -> Value {
    let mut data = vec![json!({
        "id": base, "object": "model", "created": created, "owned_by": "vllm", "root": base, "parent": null,
    })];
    data.extend(loras.iter().map(
        |l| json!({ "id": l, "object": "model", "created": created, "owned_by": "vllm", "root": l, "parent": base }),
    ));
    json!({ "object": "list", "data": data })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        api: Api,
        body: &'static str,
        prompt: &'static str,
        max_tokens: u32,
        stream: bool,
        include_usage: bool,
    }

    #[test]
    fn parses_the_four_apis() {
        let cases = [
            Case {
                api: Api::Completions,
                body: r#"{"model":"m","prompt":"hello"}"#,
                prompt: "hello",
                max_tokens: DEFAULT_MAX_TOKENS,
                stream: false,
                include_usage: true,
            },
            Case {
                api: Api::Completions,
                body: r#"{"prompt":["a","b"],"max_tokens":3,"stream":true,"stream_options":{"include_usage":false}}"#,
                prompt: "a\nb",
                max_tokens: 3,
                stream: true,
                include_usage: false,
            },
            Case {
                api: Api::Chat,
                body: r#"{"model":"m","messages":[{"role":"system","content":"be brief"},
                          {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{}}]}],
                          "max_completion_tokens":5,"max_tokens":9,"stream":null}"#,
                prompt: "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n",
                max_tokens: 5,
                stream: false,
                include_usage: true,
            },
            Case {
                api: Api::Responses,
                body: r#"{"model":"m","input":"hi","instructions":"be brief","max_output_tokens":2}"#,
                prompt: "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n",
                max_tokens: 2,
                stream: false,
                include_usage: true,
            },
            Case {
                api: Api::Responses,
                body: r#"{"input":[{"role":"user","content":[{"type":"input_text","text":"yo"}]}],"stream":true}"#,
                prompt: "<|user|>\nyo\n<|assistant|>\n",
                max_tokens: DEFAULT_MAX_TOKENS,
                stream: true,
                include_usage: true,
            },
            Case {
                api: Api::Embeddings,
                body: r#"{"model":"m","input":["x","y"],"stream":true}"#,
                prompt: "x\ny",
                max_tokens: 0,
                stream: false,
                include_usage: true,
            },
        ];
        for c in cases {
            let r = parse_request(c.api, c.body.as_bytes()).unwrap_or_else(|e| panic!("{}: {e}", c.body));
            assert_eq!(r.prompt, c.prompt, "{}", c.body);
            assert_eq!(r.max_tokens, c.max_tokens, "{}", c.body);
            assert_eq!(r.stream, c.stream, "{}", c.body);
            assert_eq!(r.include_usage, c.include_usage, "{}", c.body);
        }
    }

    #[test]
    fn rejects_bad_bodies() {
        let cases: [(Api, &str, &str); 7] = [
            (Api::Completions, "{not json", "invalid request body"),
            (Api::Completions, r#"{"model":"m"}"#, "missing field `prompt`"),
            (Api::Completions, r#"{"prompt":"x","max_tokens":-1}"#, "invalid request body"),
            (Api::Completions, r#"{"prompt":"x","max_tokens":0}"#, "`max_tokens` must be at least 1"),
            (Api::Chat, r#"{"messages":[]}"#, "`messages` must not be empty"),
            (Api::Chat, r#"{"messages":"hi"}"#, "invalid request body"),
            (Api::Embeddings, r#"{"input":[]}"#, "`input` must not be empty"),
        ];
        for (api, body, want) in cases {
            let err = parse_request(api, body.as_bytes()).expect_err(body).to_string();
            assert!(err.contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn stream_frames_follow_openai_shapes() {
        let req =
            parse_request(Api::Chat, br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":2}"#).expect("valid");
        let meta = ReplyMeta::new(Api::Chat, 7, "w", 1, "m".into());
        let first: Value = serde_json::from_str(&stream_token(&req, &meta, 0).data).expect("json");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["choices"][0]["finish_reason"], Value::Null);
        let last: Value = serde_json::from_str(&stream_token(&req, &meta, 1).data).expect("json");
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        let usage = Usage { prompt_tokens: 4, completion_tokens: 2, cached_tokens: 0 };
        let end = stream_end(&req, &meta, &usage);
        assert_eq!(end.len(), 2);
        let u: Value = serde_json::from_str(&end[0].data).expect("json");
        assert_eq!(u["usage"]["total_tokens"], 6);
        assert_eq!(end[1].encode(), "data: [DONE]\n\n");
        assert_eq!(meta.id, "chatcmpl-w-7");
    }

    #[test]
    fn embeddings_are_unit_vectors() {
        let v = embedding("abc", 0);
        assert_eq!(v.len(), EMBEDDING_DIMS);
        let norm: f32 = v.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
        assert_ne!(v, embedding("abc", 1));
    }
}
