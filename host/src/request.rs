//! Parses an OpenAI-style request (chosen by its path) once into an `InferenceRequest`:
//! the model, the text used for prefix hashing, the cache salt and the streaming flag.
//!
//! Pure: bytes and a path in, a validated value or a `RequestError` out. It knows nothing
//! of Envoy or of scheduling; every rejection here becomes a 4xx in `routing`.

use serde_json::Value;

/// The API a request speaks, from its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiKind {
    Completions,
    ChatCompletions,
    Responses,
    Embeddings,
}

impl ApiKind {
    /// The API of `path` (query string ignored), if it is one we parse.
    pub fn from_path(path: &str) -> Option<ApiKind> {
        let path = path.split(['?', '#']).next().unwrap_or_default().trim_end_matches('/');
        match path {
            "/v1/completions" => Some(ApiKind::Completions),
            "/v1/chat/completions" => Some(ApiKind::ChatCompletions),
            "/v1/responses" => Some(ApiKind::Responses),
            "/v1/embeddings" => Some(ApiKind::Embeddings),
            _ => None,
        }
    }
}

/// What the scheduler needs to know of one inference request.
#[derive(Clone, Debug, PartialEq)]
pub struct InferenceRequest {
    pub kind: ApiKind,
    pub model: String,
    /// The prompt as text, in a stable form per API (what prefix matching hashes).
    pub prompt: String,
    pub cache_salt: Option<String>,
    pub stream: bool,
    /// The OpenAI `user` field (a sticky key for experiments).
    pub user: Option<String>,
    /// The client's cap on generated tokens (`max_tokens`, `max_completion_tokens` or
    /// `max_output_tokens`).
    pub max_tokens: Option<u32>,
    /// Chat requests: the `messages` array as sent (JSON), when asked for
    /// (`parse_keeping_messages`).
    pub messages: Option<std::sync::Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("request body is empty")]
    EmptyBody,
    #[error("request trailers are not supported: end the request with its body")]
    Trailers,
    #[error("request body is not valid UTF-8")]
    NotUtf8,
    #[error("request body is not valid JSON: {0}")]
    Json(String),
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("field `{0}` is required")]
    Missing(&'static str),
    #[error("field `{field}` must be {expected}")]
    WrongType { field: &'static str, expected: &'static str },
}

/// The headers naming a request's objective (upstream: an InferenceObjective), upstream's
/// current name first, then its older one.
pub const OBJECTIVE_HEADERS: [&str; 2] = ["x-llm-d-inference-objective", "x-gateway-inference-objective"];
/// The older objective header, still accepted.
pub const OBJECTIVE_HEADER: &str = OBJECTIVE_HEADERS[1];

/// A request's priority from its objective header: an integer, or one of the names
/// `sheddable` (-1), `standard` / `default` (0), `critical` (1). Absent or unknown → 0.
/// Negative priorities are sheddable: refused with 429 when the pool is saturated.
pub fn priority(headers: &[(String, String)]) -> i32 {
    let found = OBJECTIVE_HEADERS.iter().find_map(|h| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(h)));
    let Some((_, v)) = found else { return 0 };
    let v = v.trim();
    if let Ok(p) = v.parse::<i32>() {
        return p;
    }
    match v.to_ascii_lowercase().as_str() {
        "sheddable" => -1,
        "critical" => 1,
        _ => 0,
    }
}

/// Parses `body` as a request of `kind`.
pub fn parse(kind: ApiKind, body: &[u8]) -> Result<InferenceRequest, RequestError> {
    parse_body(kind, body, false)
}

/// The same, also keeping a chat request's `messages` as sent, for a tokenizer that renders
/// the model's chat template. Writing them out again costs more than parsing the body, so
/// only a scheduler with such a tokenizer asks for them.
pub fn parse_keeping_messages(kind: ApiKind, body: &[u8]) -> Result<InferenceRequest, RequestError> {
    parse_body(kind, body, true)
}

fn parse_body(kind: ApiKind, body: &[u8], keep_messages: bool) -> Result<InferenceRequest, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::EmptyBody);
    }
    let text = std::str::from_utf8(body).map_err(|_| RequestError::NotUtf8)?;
    let value: Value = serde_json::from_str(text).map_err(|e| RequestError::Json(e.to_string()))?;
    let obj = value.as_object().ok_or(RequestError::NotAnObject)?;
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => return Err(RequestError::Missing("model")),
        Some(_) => return Err(RequestError::WrongType { field: "model", expected: "a string" }),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(RequestError::WrongType { field: "stream", expected: "a boolean" }),
    };
    let cache_salt = match obj.get("cache_salt") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(RequestError::WrongType { field: "cache_salt", expected: "a string" }),
    };
    let prompt = match kind {
        ApiKind::Completions => prompt_text("prompt", obj.get("prompt"))?,
        ApiKind::ChatCompletions => messages_text("messages", obj.get("messages"))?,
        ApiKind::Embeddings => prompt_text("input", obj.get("input"))?,
        ApiKind::Responses => {
            let mut text = match obj.get("instructions") {
                Some(Value::String(s)) => format!("system: {s}\n"),
                _ => String::new(),
            };
            match obj.get("input") {
                Some(Value::Array(_)) => text.push_str(&messages_text("input", obj.get("input"))?),
                other => text.push_str(&prompt_text("input", other)?),
            }
            text
        }
    };
    let user = obj.get("user").and_then(Value::as_str).map(str::to_string);
    let max_tokens = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_u64))
        .map(|n| n.min(u64::from(u32::MAX)) as u32);
    // Chat messages as sent, for a tokenizer that renders the model's chat template.
    let messages = match kind {
        ApiKind::ChatCompletions if keep_messages => obj.get("messages").map(|m| std::sync::Arc::from(m.to_string())),
        _ => None,
    };
    Ok(InferenceRequest { kind, model, prompt, cache_salt, stream, user, max_tokens, messages })
}

/// The scheduler's view of a request: its id, headers (lower-case names) and, when it had
/// a body this EPP parses, the parsed body. A body-less request (e.g. `GET /v1/models`) has
/// no model and no prompt. The prompt's token count is estimated (about four bytes a token).
pub fn for_scheduling(id: &str, headers: &[(String, String)], parsed: Option<InferenceRequest>) -> epp_core::Request {
    let priority = priority(headers);
    let random_seed = xxhash_rust::xxh3::xxh3_64(id.as_bytes());
    let base = epp_core::Request {
        id: id.to_string(),
        headers: headers.to_vec(),
        priority,
        random_seed,
        ..Default::default()
    };
    match parsed {
        None => base,
        Some(r) => epp_core::Request {
            model: r.model,
            cache_salt: r.cache_salt,
            prompt_tokens: epp_core::Request::estimate_tokens(r.prompt.len()),
            prompt: r.prompt,
            max_tokens: r.max_tokens,
            user: r.user,
            stream: r.stream,
            messages: r.messages,
            ..base
        },
    }
}

/// A completions-style prompt: a string, a list of strings, or token ids (kept as their
/// decimal text, which is stable and prefix-preserving).
fn prompt_text(field: &'static str, v: Option<&Value>) -> Result<String, RequestError> {
    const EXPECTED: &str = "a string, a list of strings or a list of token ids";
    match v {
        None | Some(Value::Null) => Err(RequestError::Missing(field)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(items)) => {
            let mut out = String::new();
            for item in items {
                match item {
                    Value::String(s) => out.push_str(s),
                    Value::Number(n) => {
                        out.push_str(&n.to_string());
                        out.push(' ');
                    }
                    Value::Array(tokens) if tokens.iter().all(Value::is_number) => {
                        for t in tokens {
                            out.push_str(&t.to_string());
                            out.push(' ');
                        }
                    }
                    _ => return Err(RequestError::WrongType { field, expected: EXPECTED }),
                }
            }
            Ok(out)
        }
        Some(_) => Err(RequestError::WrongType { field, expected: EXPECTED }),
    }
}

/// Chat messages flattened to `role: content` lines; content may be a string or a list of
/// parts, of which the text parts count.
fn messages_text(field: &'static str, v: Option<&Value>) -> Result<String, RequestError> {
    const EXPECTED: &str = "a list of messages with `role` and `content`";
    let items = match v {
        None | Some(Value::Null) => return Err(RequestError::Missing(field)),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(RequestError::WrongType { field, expected: EXPECTED }),
    };
    let mut out = String::new();
    for item in items {
        let msg = item.as_object().ok_or(RequestError::WrongType { field, expected: EXPECTED })?;
        let role = msg.get("role").and_then(Value::as_str).unwrap_or("user");
        out.push_str(role);
        out.push_str(": ");
        match msg.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Array(parts)) => {
                for part in parts {
                    match part {
                        Value::String(s) => out.push_str(s),
                        Value::Object(p) => {
                            if let Some(t) = p.get("text").and_then(Value::as_str) {
                                out.push_str(t);
                            }
                        }
                        _ => return Err(RequestError::WrongType { field, expected: EXPECTED }),
                    }
                }
            }
            Some(_) => return Err(RequestError::WrongType { field, expected: EXPECTED }),
        }
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let cases = [
            ("/v1/completions", Some(ApiKind::Completions)),
            ("/v1/chat/completions?x=1", Some(ApiKind::ChatCompletions)),
            ("/v1/responses/", Some(ApiKind::Responses)),
            ("/v1/embeddings", Some(ApiKind::Embeddings)),
            ("/v1/models", None),
            ("/", None),
        ];
        for (path, want) in cases {
            assert_eq!(ApiKind::from_path(path), want, "{path}");
        }
    }

    #[test]
    fn good_requests() {
        use ApiKind::*;
        let cases: &[(ApiKind, &str, &str, bool, Option<&str>)] = &[
            (Completions, r#"{"model":"m","prompt":"hello"}"#, "hello", false, None),
            (Completions, r#"{"model":"m","prompt":["a","b"],"stream":true}"#, "ab", true, None),
            (Completions, r#"{"model":"m","prompt":[1,2,3]}"#, "1 2 3 ", false, None),
            (Completions, r#"{"model":"m","prompt":"x","cache_salt":"s"}"#, "x", false, Some("s")),
            (
                ChatCompletions,
                r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#,
                "system: be brief\nuser: hi\n",
                false,
                None,
            ),
            (
                ChatCompletions,
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{}},{"type":"text","text":"b"}]}]}"#,
                "user: ab\n",
                false,
                None,
            ),
            (Responses, r#"{"model":"m","input":"hi","instructions":"be brief"}"#, "system: be brief\nhi", false, None),
            (Responses, r#"{"model":"m","input":[{"role":"user","content":"hi"}]}"#, "user: hi\n", false, None),
            (Embeddings, r#"{"model":"m","input":["x","y"]}"#, "xy", false, None),
        ];
        for (kind, body, prompt, stream, salt) in cases {
            let r = parse(*kind, body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(r.model, "m");
            assert_eq!(r.prompt, *prompt, "{body}");
            assert_eq!(r.stream, *stream, "{body}");
            assert_eq!(r.cache_salt.as_deref(), *salt, "{body}");
            assert_eq!(r.messages, None, "{body}: messages are kept only when asked for");
            let kept = parse_keeping_messages(*kind, body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(kept.prompt, r.prompt, "{body}");
            let full: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body}: {e}"));
            match kind {
                ChatCompletions => {
                    let messages = kept.messages.unwrap_or_else(|| panic!("{body}: messages not kept"));
                    let messages: Value = serde_json::from_str(&messages).unwrap_or_else(|e| panic!("{body}: {e}"));
                    assert_eq!(messages, full["messages"], "{body}");
                }
                _ => assert_eq!(kept.messages, None, "{body}: only chat requests carry messages"),
            }
        }
    }

    #[test]
    fn priorities() {
        let h = |v: &str| vec![(OBJECTIVE_HEADER.to_string(), v.to_string())];
        for (v, want) in [("-5", -5), ("2", 2), ("sheddable", -1), ("Critical", 1), ("standard", 0), ("x", 0)] {
            assert_eq!(priority(&h(v)), want, "{v}");
        }
        assert_eq!(priority(&[]), 0);
    }

    #[test]
    fn bad_requests() {
        use ApiKind::*;
        let cases: &[(ApiKind, &[u8], &str)] = &[
            (Completions, b"", "empty"),
            (Completions, b"  \n", "empty"),
            (Completions, b"\xff\xfe{}", "UTF-8"),
            (Completions, b"{\"model\":", "not valid JSON"),
            (Completions, b"[1]", "JSON object"),
            (Completions, br#"{"prompt":"x"}"#, "`model` is required"),
            (Completions, br#"{"model":"","prompt":"x"}"#, "`model` is required"),
            (Completions, br#"{"model":7,"prompt":"x"}"#, "`model` must be a string"),
            (Completions, br#"{"model":"m"}"#, "`prompt` is required"),
            (Completions, br#"{"model":"m","prompt":{"a":1}}"#, "`prompt` must be"),
            (Completions, br#"{"model":"m","prompt":"x","stream":"yes"}"#, "`stream` must be a boolean"),
            (Completions, br#"{"model":"m","prompt":"x","cache_salt":1}"#, "`cache_salt` must be a string"),
            (ChatCompletions, br#"{"model":"m","messages":"hi"}"#, "`messages` must be"),
            (ChatCompletions, br#"{"model":"m","messages":[1]}"#, "`messages` must be"),
            (ChatCompletions, br#"{"model":"m"}"#, "`messages` is required"),
            (Embeddings, br#"{"model":"m"}"#, "`input` is required"),
        ];
        for (kind, body, want) in cases {
            let err = parse(*kind, body).expect_err(&String::from_utf8_lossy(body));
            assert!(err.to_string().contains(want), "{}: {err}", String::from_utf8_lossy(body));
        }
    }
}
