//! The request as the scheduler sees it, built once per request by the host (from the
//! parsed body and the headers) and borrowed by every plugin call of its cycles.

/// The parts of an inference request scheduling may look at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    /// The request id (`x-request-id`): logs, experiment choice, the random seed.
    pub id: String,
    pub model: String,
    pub cache_salt: Option<String>,
    /// The prompt text (flattened chat messages for chat APIs), what prefix matching hashes.
    pub prompt: String,
    /// Estimated prompt length in tokens.
    pub prompt_tokens: u32,
    /// The client's cap on generated tokens, when it gave one.
    pub max_tokens: Option<u32>,
    /// Header names are lower case.
    pub headers: Vec<(String, String)>,
    /// Negative priority means sheddable.
    pub priority: i32,
    /// Seeds plugins' random choices (reproducible runs).
    pub random_seed: u64,
    /// When the request is scheduled, in milliseconds of the host's clock (monotonic, or
    /// virtual time in a replay); plugins see it as `cycle.now_ms`.
    pub now_ms: u64,
    /// The OpenAI `user` field (a sticky key for experiments).
    pub user: Option<String>,
    /// The client asked for a streamed response (its headers come at once).
    pub stream: bool,
    /// Chat requests: the `messages` array as sent (JSON), for the host's tokenizer, which
    /// renders the model's chat template as the engine does.
    pub messages: Option<std::sync::Arc<str>>,
}

/// Bytes counted as one token when no tokenizer is configured (the usual rule of thumb for
/// English text, and upstream's estimate).
pub const BYTES_PER_TOKEN: usize = 4;

impl Request {
    /// The value of header `name` (lower case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The token estimate of a prompt of `bytes` bytes without a tokenizer.
    pub fn estimate_tokens(bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(BYTES_PER_TOKEN)).unwrap_or(u32::MAX)
    }
}
