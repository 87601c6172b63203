//! Finds the token `usage` in an OpenAI response as it streams past: a JSON body, or an SSE
//! stream whose final `data:` event carries usage. Bounded memory: a JSON body is kept only
//! up to a cap, and of an SSE stream only the current line; past the cap only the last
//! `TAIL` bytes are kept, where `usage` is found (it comes last or nearly so: a long
//! `logprobs` body, a Responses API `response.completed` event echoing a long output).
//!
//! Pure; fed chunk by chunk by the wire code, it never blocks or fails the response.

use llmd_plugin_sdk::Usage;
use serde::Deserialize;
use serde_json::Value;

/// JSON bodies larger than this are not inspected for usage.
const MAX_JSON_BODY: usize = 4 << 20;
/// An SSE line longer than this is only searched in its tail.
const MAX_SSE_LINE: usize = 256 << 10;
/// What is kept of a body or line past its cap.
const TAIL: usize = 64 << 10;

#[derive(Debug, Default)]
pub struct UsageTracker {
    sse: bool,
    buf: Vec<u8>,
    overflow: bool,
    /// Past the cap: the last bytes seen (at most `2 * TAIL`).
    tail: Vec<u8>,
    usage: Option<Usage>,
}

impl UsageTracker {
    /// `content_type` is the response's Content-Type header, if any.
    pub fn new(content_type: Option<&str>) -> Self {
        let sse = content_type.is_some_and(|c| c.to_ascii_lowercase().contains("text/event-stream"));
        UsageTracker { sse, ..Default::default() }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.sse {
            self.push(chunk, MAX_JSON_BODY);
            return;
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            let (part, newline) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            rest = if newline { &rest[part.len() + 1..] } else { &[] };
            self.push(part, MAX_SSE_LINE);
            if newline {
                self.end_line();
            }
        }
    }

    /// Appends `bytes` to the body or line kept whole, up to `cap`; past it, to the tail.
    fn push(&mut self, bytes: &[u8], cap: usize) {
        if !self.overflow && self.buf.len() + bytes.len() > cap {
            self.overflow = true;
            let kept = std::mem::take(&mut self.buf);
            self.keep_tail(&kept);
        }
        if self.overflow {
            self.keep_tail(bytes);
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Appends to the kept tail, trimming it to its last `TAIL` bytes now and then.
    fn keep_tail(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(TAIL)..];
        if self.tail.len() + bytes.len() > 2 * TAIL {
            let drop = self.tail.len() + bytes.len() - TAIL;
            self.tail.drain(..drop.min(self.tail.len()));
        }
        self.tail.extend_from_slice(bytes);
    }

    fn end_line(&mut self) {
        if self.overflow {
            if let Some(u) = usage_in_tail(&self.tail) {
                self.usage = Some(u);
            }
        } else {
            self.sse_line();
        }
        self.buf.clear();
        self.tail.clear();
        self.overflow = false;
    }

    fn sse_line(&mut self) {
        let line = self.buf.strip_suffix(b"\r").unwrap_or(&self.buf);
        let Some(data) = line.strip_prefix(b"data:") else { return };
        if let Some(u) = usage_in_json(data) {
            self.usage = Some(u);
        }
    }

    /// The usage found, once the body is complete.
    pub fn finish(mut self) -> Option<Usage> {
        if self.sse {
            if !self.buf.is_empty() || self.overflow {
                self.end_line();
            }
            return self.usage;
        }
        if self.overflow {
            return usage_in_tail(&self.tail);
        }
        usage_in_json(&self.buf)
    }
}

/// What is read of a response body or SSE event: `usage`, at the top or (a Responses API
/// `response.completed` event) inside `response`. Everything else (the choices, the output
/// text) is skipped without being built.
#[derive(Deserialize)]
struct Envelope {
    usage: Option<Value>,
    response: Option<Inner>,
}

#[derive(Deserialize)]
struct Inner {
    usage: Option<Value>,
}

/// The usage in a whole JSON body or event. Most events of a stream (one per token) carry
/// none and are not parsed at all: they do not contain the key.
fn usage_in_json(json: &[u8]) -> Option<Usage> {
    memchr::memmem::find(json, b"\"usage\"")?;
    let envelope: Envelope = serde_json::from_slice(json).ok()?;
    let usage = envelope.usage.or_else(|| envelope.response?.usage)?;
    usage_fields(usage.as_object()?)
}

/// The last `"usage": {…}` object in `tail` (the end of a body too large to keep whole).
/// A `"usage"` inside a JSON string has its quotes escaped, so it is not taken for the key.
fn usage_in_tail(tail: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(at) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        end = at;
        let after = &tail[at + KEY.len()..];
        let after = after.trim_ascii_start();
        let Some(after) = after.strip_prefix(b":") else { continue };
        let mut values = serde_json::Deserializer::from_slice(after.trim_ascii_start()).into_iter::<Value>();
        if let Some(Ok(Value::Object(object))) = values.next()
            && let Some(u) = usage_fields(&object)
        {
            return Some(u);
        }
    }
    None
}

/// The counts of a `usage` object.
fn usage_fields(u: &serde_json::Map<String, Value>) -> Option<Usage> {
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).map(|x| x.min(u32::MAX as u64) as u32);
    // Chat/completions name them prompt/completion; the responses API input/output.
    let prompt = n(u.get("prompt_tokens")).or(n(u.get("input_tokens")))?;
    let completion = n(u.get("completion_tokens")).or(n(u.get("output_tokens"))).unwrap_or(0);
    let details = u.get("prompt_tokens_details").or(u.get("input_tokens_details"));
    let cached = n(details.and_then(|d| d.get("cached_tokens"))).unwrap_or(0);
    Some(Usage { prompt_tokens: prompt, cached_tokens: cached, completion_tokens: completion })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(content_type: Option<&str>, chunks: &[&str]) -> Option<Usage> {
        let mut t = UsageTracker::new(content_type);
        for c in chunks {
            t.feed(c.as_bytes());
        }
        t.finish()
    }

    #[test]
    fn json_and_sse() {
        let u = |p, c, o| Some(Usage { prompt_tokens: p, cached_tokens: c, completion_tokens: o });
        let cases: &[(Option<&str>, &[&str], Option<Usage>)] = &[
            (
                Some("application/json"),
                &[
                    r#"{"id":"x","usage":{"prompt_tokens":10,"#,
                    r#""completion_tokens":3,"prompt_tokens_details":{"cached_tokens":8}}}"#,
                ],
                u(10, 8, 3),
            ),
            (None, &[r#"{"usage":{"input_tokens":4,"output_tokens":2}}"#], u(4, 0, 2)),
            (None, &[r#"{"no":"usage"}"#], None),
            (None, &[r#"{"choices":[{"text":"the \"usage\": {\"prompt_tokens\": 1}"}]}"#], None),
            (None, &[r#"{"usage":5}"#], None),
            (None, &[r#"{"usage":{"prompt_tokens":3,"completion_tokens":"many"}}"#], u(3, 0, 0)),
            (None, &[r#"{"response":{"usage":null},"usage":{"prompt_tokens":2}}"#], u(2, 0, 0)),
            (None, &["not json"], None),
            (
                Some("text/event-stream; charset=utf-8"),
                &[
                    "data: {\"choices\":[]}\n\nda",
                    "ta: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\r\n\n",
                    "data: [DONE]\n\n",
                ],
                u(5, 0, 1),
            ),
            (Some("text/event-stream"), &["data: {\"usage\":null}\n\ndata: [DONE]"], None),
            (
                Some("text/event-stream"),
                &[
                    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n",
                    "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",",
                    "\"usage\":{\"input_tokens\":7,\"input_tokens_details\":{\"cached_tokens\":4},\"output_tokens\":2}}}\n\n",
                ],
                u(7, 4, 2),
            ),
        ];
        for (ct, chunks, want) in cases {
            assert_eq!(run(*ct, chunks), *want, "{chunks:?}");
        }
    }

    /// Bodies and lines past their caps: the usage at their end is still found, in pieces
    /// of any size, and a `"usage"` quoted inside a string is not taken for it.
    #[test]
    fn usage_at_the_end_of_a_body_or_line_past_its_cap_is_found() {
        let u = Some(Usage { prompt_tokens: 9, cached_tokens: 4, completion_tokens: 5000 });
        let logprobs = "{\"token\":\"x\",\"logprob\":-0.1},".repeat(MAX_JSON_BODY / 20);
        let body = format!(
            r#"{{"choices":[{{"logprobs":[{logprobs}{{}}],"text":"the \"usage\": {{\"prompt_tokens\": 1}}"}}],"usage":{{"prompt_tokens":9,"completion_tokens":5000,"prompt_tokens_details":{{"cached_tokens":4}}}}}}"#
        );
        assert!(body.len() > MAX_JSON_BODY);
        let output = "word ".repeat(MAX_SSE_LINE / 4);
        let completed = format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"output\":[{{\"text\":\"{output}\"}}],\"usage\":{{\"input_tokens\":9,\"input_tokens_details\":{{\"cached_tokens\":4}},\"output_tokens\":5000}},\"user\":null}}}}\n\n"
        );
        assert!(completed.len() > MAX_SSE_LINE);
        for piece in [1 << 10, 16 << 10, 1 << 20] {
            let chunks: Vec<&str> = body.as_bytes().chunks(piece).map(|c| std::str::from_utf8(c).unwrap()).collect();
            assert_eq!(run(Some("application/json"), &chunks), u, "JSON in {piece}-byte pieces");
            let stream = format!("data: {{\"choices\":[]}}\n\n{completed}");
            let chunks: Vec<&str> = stream.as_bytes().chunks(piece).map(|c| std::str::from_utf8(c).unwrap()).collect();
            assert_eq!(run(Some("text/event-stream"), &chunks), u, "SSE in {piece}-byte pieces");
        }
        // The same event without its usage: nothing is made up from the quoted text.
        let no_usage = body.replace(r#","usage":{"prompt_tokens":9"#, r#","other":{"prompt_tokens":9"#);
        assert_eq!(run(None, &[no_usage.as_str()]), None);
    }
}
