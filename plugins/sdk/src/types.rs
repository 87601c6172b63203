//! Plain Rust mirror of the WIT `types` interface (`wit/scheduler.wit`). The export macros
//! move the generated bindings' values into these types (no copy of the lists), so a plugin
//! only ever sees these. Helpers here are pure and allocation-light.

/// What a plugin asks of the host; everything not asked for is left out or not called.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// `Request::model` and `Request::cache_salt`.
    pub model: bool,
    /// `Request::prompt`.
    pub prompt: bool,
    /// `Request::headers`.
    pub headers: bool,
    /// `Plugin::pool_changed` calls.
    pub pool: bool,
    /// The `Plugin::decided` hook.
    pub decided: bool,
    /// The `Plugin::first_chunk` hook.
    pub first_chunk: bool,
    /// The `Plugin::finished` hook.
    pub finished: bool,
}

/// What `Plugin::configure` returns: what the plugin needs and which columns it reads and
/// writes. The host resolves column names once, when the scheduler is built.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    pub needs: Needs,
    /// Columns read, in the order `Cycle::column(k)` returns them.
    pub reads: Vec<String>,
    /// Producers: the columns `produce` returns, in this order.
    pub writes: Vec<String>,
    /// No state between calls (beyond configuration and pool data): the host may run
    /// several instances side by side, and skips a stateless scorer or picker when the
    /// filters leave one candidate.
    pub stateless: bool,
}

impl Manifest {
    /// A stateless plugin reading `columns` and needing nothing else.
    pub fn stateless(columns: &[&str]) -> Manifest {
        Manifest { reads: names(columns), stateless: true, ..Default::default() }
    }

    /// Replaces the columns read.
    pub fn reading(mut self, columns: &[&str]) -> Manifest {
        self.reads = names(columns);
        self
    }

    /// Replaces the columns written (producers).
    pub fn writing(mut self, columns: &[&str]) -> Manifest {
        self.writes = names(columns);
        self
    }
}

fn names(columns: &[&str]) -> Vec<String> {
    columns.iter().map(|c| c.to_string()).collect()
}

/// KV-cache geometry a worker reports (`vllm:cache_config_info`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheInfo {
    /// Tokens per KV block.
    pub block_size: u32,
    /// KV blocks on the GPU.
    pub num_gpu_blocks: u32,
}

impl CacheInfo {
    /// How many tokens the worker's KV cache holds.
    pub fn tokens(&self) -> u64 {
        u64::from(self.block_size) * u64::from(self.num_gpu_blocks)
    }
}

/// Static data of one endpoint, pushed when the pool changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointInfo {
    pub id: u32,
    pub name: String,
    pub namespace: String,
    pub address: String,
    pub port: u16,
    pub labels: Vec<(String, String)>,
    pub max_lora: Option<u32>,
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
    pub cache: Option<CacheInfo>,
}

impl EndpointInfo {
    /// The value of label `key`, if set.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Whether the endpoint runs or queues adapter `name`.
    pub fn lists_adapter(&self, name: &str) -> bool {
        self.running_adapters.iter().chain(&self.waiting_adapters).any(|a| a == name)
    }

    /// Whether it has a slot for another adapter: fewer distinct running and waiting
    /// adapters than `max_lora` (vLLM lists an adapter in both while some of its requests
    /// run and others wait, and it holds one slot); never when `max_lora` is unknown.
    pub fn has_adapter_room(&self) -> bool {
        let distinct = self.running_adapters.len()
            + self.waiting_adapters.iter().filter(|w| !self.running_adapters.contains(w)).count();
        self.max_lora.is_some_and(|max| distinct < max as usize)
    }

    /// Whether the endpoint runs adapter `name` (some of its requests are running).
    pub fn runs_adapter(&self, name: &str) -> bool {
        self.running_adapters.iter().any(|a| a == name)
    }

    /// Whether a request for adapter `name` can start there now without keeping another
    /// adapter waiting: a slot is free, or it runs the adapter and starves nobody.
    pub fn can_run_adapter_now(&self, name: &str) -> bool {
        self.has_adapter_room() || (self.runs_adapter(name) && !self.starves_an_adapter_besides(name))
    }

    /// Whether an adapter other than `adapter` is queued there for a slot it cannot get:
    /// listed as waiting, not running, and no slot free. vLLM's scheduler skips such a
    /// request while the running adapters' requests keep being scheduled, so it waits until
    /// every running adapter's requests are done: requests for a running adapter sent
    /// there keep it waiting.
    pub fn starves_an_adapter_besides(&self, adapter: &str) -> bool {
        !self.running_adapters.is_empty()
            && !self.has_adapter_room()
            && self.waiting_adapters.iter().any(|w| w != adapter && !self.running_adapters.contains(w))
    }

    /// `namespace/name`, the endpoint's identity as upstream writes it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The parts of the request a plugin asked for (`None` when it did not ask).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    pub model: Option<String>,
    pub cache_salt: Option<String>,
    pub prompt: Option<Vec<u8>>,
    pub headers: Option<Vec<(String, String)>>,
    /// Estimated prompt length in tokens (always present).
    pub prompt_tokens: u32,
    /// The client's cap on generated tokens, when it gave one.
    pub max_tokens: Option<u32>,
    /// The client asked for a streamed response; when false, `first_chunk` comes with the
    /// whole answer (also false for a request another replica decided).
    pub stream: bool,
    /// Negative priority means sheddable.
    pub priority: i32,
    /// Per-request randomness: use `rng::SplitMix64::new(random_seed)`.
    pub random_seed: u64,
}

impl Request {
    /// The value of header `name` (case-insensitive), if headers were asked for and present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.as_ref()?.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The prompt bytes, empty when not asked for.
    pub fn prompt(&self) -> &[u8] {
        self.prompt.as_deref().unwrap_or_default()
    }

    /// The model name, empty when not asked for.
    pub fn model(&self) -> &str {
        self.model.as_deref().unwrap_or_default()
    }
}

/// One call's view of a scheduling cycle: the candidates and the columns the plugin reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cycle {
    /// Identifies the cycle in the hooks that follow.
    pub id: u64,
    /// The host's clock in milliseconds (monotonic; virtual time in `epp replay`).
    pub now_ms: u64,
    pub request: Request,
    /// The candidates.
    pub ids: Vec<u32>,
    /// The manifest's `reads`, each `ids.len()` long, one after the other.
    pub columns: Vec<f32>,
}

impl Cycle {
    /// Number of candidates.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The `k`-th column of the manifest's `reads` (NaN-filled if the host sent fewer).
    pub fn column(&self, k: usize) -> std::borrow::Cow<'_, [f32]> {
        let n = self.ids.len();
        match self.columns.get(k * n..(k + 1) * n) {
            Some(values) => std::borrow::Cow::Borrowed(values),
            None => std::borrow::Cow::Owned(vec![f32::NAN; n]),
        }
    }

    /// Candidate `i`'s value in column `k`, NaN when unknown.
    pub fn value(&self, k: usize, i: usize) -> f32 {
        self.columns.get(k * self.ids.len() + i).copied().unwrap_or(f32::NAN)
    }
}

/// Every adapter some endpoint of `endpoints` runs or queues: a request naming one is a
/// LoRA request.
pub fn listed_adapters(endpoints: &[EndpointInfo]) -> std::collections::HashSet<String> {
    endpoints.iter().flat_map(|e| e.running_adapters.iter().chain(&e.waiting_adapters)).cloned().collect()
}

/// How many times the other candidates' mean queue (plus the saturation depth) the
/// shortest queue among an adapter's workers must reach for the adapter to have outgrown
/// them ([`adapter_outgrown`]).
pub const OUTGROWN_QUEUE_RATIO: f32 = 3.0;

/// Whether the requests for a LoRA adapter have outgrown the workers running it (this
/// EPP's rule): some candidates run it (`runs(i)`), every one of them has at least
/// `queue_depth` requests waiting (`waiting(i)`, NaN when unknown), and the shortest of
/// those queues is at least [`OUTGROWN_QUEUE_RATIO`] times the other candidates' mean queue
/// plus `queue_depth`. With one adapter slot per worker (vLLM's default `--max-loras 1`)
/// an adapter busier than its workers can serve never gets another one while other
/// adapters hold every slot; past this point its requests should go where the queues are
/// short and load the adapter there. False when `queue_depth` is 0 or no other candidate
/// has a known queue.
pub fn adapter_outgrown(
    n: usize,
    queue_depth: f32,
    waiting: impl Fn(usize) -> f32,
    runs: impl Fn(usize) -> bool,
) -> bool {
    if queue_depth <= 0.0 {
        return false;
    }
    let (mut shortest, mut runners) = (f32::INFINITY, 0usize);
    let (mut others_sum, mut others) = (0.0f32, 0usize);
    for i in 0..n {
        let q = waiting(i);
        if runs(i) {
            // An unknown queue is not a saturated one.
            if !(q.is_finite() && q >= queue_depth) {
                return false;
            }
            shortest = shortest.min(q);
            runners += 1;
        } else if q.is_finite() {
            others_sum += q;
            others += 1;
        }
    }
    runners > 0 && others > 0 && shortest >= OUTGROWN_QUEUE_RATIO * (others_sum / others as f32) + queue_depth
}

/// Token usage reported by the worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub completion_tokens: u32,
}

/// How a routed request ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// The worker answered in full (any HTTP status).
    #[default]
    Completed,
    /// The client went away, or the request was reset before it completed.
    Cancelled,
    /// The worker could not be reached or broke the response.
    Failed,
}

/// The end of a routed request, as the `finished` hook learns it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    pub endpoint: u32,
    pub outcome: Outcome,
    /// The worker's HTTP status, 0 when none arrived.
    pub status: u16,
    pub usage: Option<Usage>,
}
