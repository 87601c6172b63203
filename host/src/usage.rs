//! Finds the token `usage` in an OpenAI response as it streams past: a JSON body, or an SSE
//! stream whose final `data:` event carries usage. Bounded memory: a JSON body is kept only
//! up to a cap, and of an SSE stream only the current line.
//!
//! Pure; fed chunk by chunk by the wire code, it never blocks or fails the response.

use llmd_plugin_sdk::Usage;
use serde_json::Value;

/// JSON bodies larger than this are not inspected for usage.
const MAX_JSON_BODY: usize = 4 << 20;
/// An SSE line longer than this is skipped (usage chunks are small).
const MAX_SSE_LINE: usize = 256 << 10;

#[derive(Debug, Default)]
pub struct UsageTracker {
    sse: bool,
    buf: Vec<u8>,
    overflow: bool,
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
            if self.buf.len() + chunk.len() > MAX_JSON_BODY {
                self.overflow = true;
                self.buf.clear();
            }
            if !self.overflow {
                self.buf.extend_from_slice(chunk);
            }
            return;
        }
        for &b in chunk {
            if b == b'\n' {
                if !self.overflow {
                    self.sse_line();
                }
                self.buf.clear();
                self.overflow = false;
            } else if self.buf.len() < MAX_SSE_LINE {
                self.buf.push(b);
            } else {
                self.overflow = true;
            }
        }
    }

    fn sse_line(&mut self) {
        let line = self.buf.strip_suffix(b"\r").unwrap_or(&self.buf);
        let Some(data) = line.strip_prefix(b"data:") else { return };
        if let Some(u) = serde_json::from_slice::<Value>(data).ok().as_ref().and_then(usage_of) {
            self.usage = Some(u);
        }
    }

    /// The usage found, once the body is complete.
    pub fn finish(mut self) -> Option<Usage> {
        if self.sse {
            if !self.buf.is_empty() && !self.overflow {
                self.sse_line();
            }
            return self.usage;
        }
        if self.overflow {
            return None;
        }
        serde_json::from_slice::<Value>(&self.buf).ok().as_ref().and_then(usage_of)
    }
}

fn usage_of(v: &Value) -> Option<Usage> {
    // A streamed responses-API body carries it in its `response.completed` event, inside
    // `response`.
    let u = v.get("usage").or_else(|| v.get("response")?.get("usage"))?.as_object()?;
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
}
