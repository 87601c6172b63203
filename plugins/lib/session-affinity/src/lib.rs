//! Session affinity, as upstream's `session-affinity-scorer` and `session-affinity-filter`
//! share it: which endpoint a request's session belongs to.
//!
//! - `strategy: encoded_endpoint_header` (default): the response carries a header
//!   (`x-session-token` unless `encodedEndpointHeaderConfig.header` says otherwise) whose value
//!   is the serving endpoint's `namespace/name`, base64-encoded; a request that sends it back
//!   belongs to that endpoint. No state: the client carries it.
//! - `strategy: session_id`: the session id is read from the first present header of
//!   `sessionIdConfig.sources` (default `x-session-id`) that has a value (trimmed; a blank
//!   one passes to the next source); the plugin binds each session to
//!   the endpoint its first request went to (rebinding only when the bound endpoint was not
//!   a candidate) and forgets bindings unused for `evictionTtlSeconds`.
//!
//! The scorer scores that endpoint 1.0 and the others 0; the filter keeps only that
//! endpoint. A request without a session, or whose endpoint is not a candidate, gets no
//! preference: the scorer scores everyone 0, the filter keeps everyone.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use llmd_plugin_sdk::pending::Pending;
use llmd_plugin_sdk::{Cycle, EndpointInfo, Filter, Manifest, Needs, Plugin, Scorer, params};
use serde::Deserialize;

pub const DEFAULT_HEADER: &str = "x-session-token";
pub const DEFAULT_SESSION_HEADER: &str = "x-session-id";

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    pub strategy: Option<String>,
    pub profile_name: Option<String>,
    pub encoded_endpoint_header_config: Option<HeaderConfig>,
    pub session_id_config: Option<SessionIdConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderConfig {
    pub header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionIdConfig {
    pub sources: Option<Vec<Source>>,
    pub eviction_ttl_seconds: Option<f64>,
    pub eviction_sweep_seconds: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Source {
    pub header: Option<String>,
    pub attribute: Option<String>,
    pub producer: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
enum Strategy {
    Encoded { header: String },
    SessionId { headers: Vec<String>, ttl_ms: u64, sweep_ms: u64 },
}

struct Binding {
    endpoint: u32,
    last_seen_ms: u64,
}

/// What scoring a cycle learnt, for `decided`.
struct Seen {
    session: String,
    /// The bound endpoint was among the candidates.
    bound_present: bool,
}

/// The bindings and strategy of one session-affinity plugin.
pub struct SessionAffinity {
    strategy: Strategy,
    /// Endpoint id ↔ `namespace/name`.
    keys: HashMap<u32, String>,
    by_key: HashMap<String, u32>,
    bindings: HashMap<String, Binding>,
    last_sweep_ms: u64,
    /// The clock of the last scored cycle (the binding time of its `decided`).
    last_seen_now: u64,
    pending: Pending<Seen>,
}

impl Default for SessionAffinity {
    fn default() -> Self {
        SessionAffinity {
            strategy: Strategy::Encoded { header: DEFAULT_HEADER.into() },
            keys: HashMap::new(),
            by_key: HashMap::new(),
            bindings: HashMap::new(),
            last_sweep_ms: 0,
            last_seen_now: 0,
            pending: Pending::new(1024),
        }
    }
}

/// The session token naming endpoint `namespace/name`.
pub fn encode_token(key: &str) -> String {
    STANDARD.encode(key.as_bytes())
}

/// The endpoint key a token names, if it decodes.
pub fn decode_token(token: &str) -> Option<String> {
    STANDARD.decode(token.trim().as_bytes()).ok().and_then(|b| String::from_utf8(b).ok())
}

impl SessionAffinity {
    fn sweep(&mut self, now_ms: u64) {
        let Strategy::SessionId { ttl_ms, sweep_ms, .. } = self.strategy else { return };
        if now_ms.saturating_sub(self.last_sweep_ms) < sweep_ms {
            return;
        }
        self.last_sweep_ms = now_ms;
        self.bindings.retain(|_, b| now_ms.saturating_sub(b.last_seen_ms) <= ttl_ms);
    }
}

impl Plugin for SessionAffinity {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        let strategy = match p.strategy.as_deref().unwrap_or("encoded_endpoint_header") {
            "encoded_endpoint_header" => {
                let header = p
                    .encoded_endpoint_header_config
                    .and_then(|c| c.header)
                    .map(|h| h.trim().to_ascii_lowercase())
                    .unwrap_or_else(|| DEFAULT_HEADER.into());
                if header.is_empty() {
                    return Err("encodedEndpointHeaderConfig.header must not be empty".into());
                }
                Strategy::Encoded { header }
            }
            "session_id" => {
                let c = p.session_id_config.unwrap_or_default();
                let mut headers = Vec::new();
                for (i, s) in c.sources.unwrap_or_default().into_iter().enumerate() {
                    if s.attribute.is_some() || s.producer.is_some() {
                        return Err(format!(
                            "sessionIdConfig.sources[{i}]: only `header` sources are supported by this EPP"
                        ));
                    }
                    match s.header.map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()) {
                        Some(h) => headers.push(h),
                        None => return Err(format!("sessionIdConfig.sources[{i}].header is required")),
                    }
                }
                if headers.is_empty() {
                    headers.push(DEFAULT_SESSION_HEADER.into());
                }
                // Seconds, fractions allowed; 0 (or left out) means the default, as upstream.
                let seconds = |value: Option<f64>, default: f64, key: &str| match value {
                    None | Some(0.0) => Ok(default),
                    Some(v) if v.is_finite() && v > 0.0 && v <= 31_536_000.0 => Ok(v),
                    Some(v) => Err(format!("sessionIdConfig.{key} must be from 0 to 31536000 seconds, got {v}")),
                };
                let ttl = seconds(c.eviction_ttl_seconds, 300.0, "evictionTtlSeconds")?;
                let sweep = seconds(c.eviction_sweep_seconds, 10.0, "evictionSweepSeconds")?;
                let ms = |s: f64| ((s * 1000.0).round() as u64).max(1);
                Strategy::SessionId { headers, ttl_ms: ms(ttl), sweep_ms: ms(sweep) }
            }
            other => return Err(format!("strategy `{other}`; expected encoded_endpoint_header or session_id")),
        };
        *self = SessionAffinity { strategy, ..Default::default() };
        Ok(Manifest {
            needs: Needs { headers: true, pool: true, decided: true, ..Default::default() },
            ..Default::default()
        })
    }

    fn pool_changed(&mut self, _generation: u64, endpoints: &[EndpointInfo]) {
        self.keys = endpoints.iter().map(|e| (e.id, e.key())).collect();
        self.by_key = endpoints.iter().map(|e| (e.key(), e.id)).collect();
        let present: std::collections::HashSet<u32> = endpoints.iter().map(|e| e.id).collect();
        self.bindings.retain(|_, b| present.contains(&b.endpoint));
    }

    fn decided(&mut self, cycle: u64, endpoint: u32) -> Vec<(String, String)> {
        match &self.strategy {
            Strategy::Encoded { header } => match self.keys.get(&endpoint) {
                Some(key) => vec![(header.clone(), encode_token(key))],
                None => Vec::new(),
            },
            Strategy::SessionId { .. } => {
                if let Some(seen) = self.pending.take(cycle) {
                    let now = self.last_seen_now;
                    match self.bindings.get_mut(&seen.session) {
                        Some(b) if b.endpoint == endpoint || seen.bound_present => b.last_seen_ms = now,
                        _ => {
                            self.bindings.insert(seen.session, Binding { endpoint, last_seen_ms: now });
                        }
                    }
                }
                Vec::new()
            }
        }
    }
}

impl SessionAffinity {
    /// The endpoint this cycle's session belongs to, if any (a candidate or not); for
    /// `session_id`, remembers what `decided` needs to bind or refresh the session.
    pub fn target(&mut self, cycle: &Cycle) -> Option<u32> {
        match &self.strategy {
            Strategy::Encoded { header } => {
                cycle.request.header(header).and_then(decode_token).and_then(|key| self.by_key.get(&key).copied())
            }
            Strategy::SessionId { headers, ttl_ms, .. } => {
                let ttl = *ttl_ms;
                // The first source with a value: a blank one is no session id.
                let session = headers
                    .iter()
                    .find_map(|h| cycle.request.header(h).map(str::trim).filter(|v| !v.is_empty()))
                    .map(str::to_string);
                let now = cycle.now_ms;
                self.last_seen_now = now;
                self.sweep(now);
                match session {
                    Some(session) => {
                        // Past its TTL a binding is gone, swept yet or not.
                        let bound = self
                            .bindings
                            .get(&session)
                            .filter(|b| now.saturating_sub(b.last_seen_ms) <= ttl)
                            .map(|b| b.endpoint);
                        let present = bound.is_some_and(|b| cycle.ids.contains(&b));
                        self.pending.insert(cycle.id, Seen { session, bound_present: present });
                        bound
                    }
                    None => None,
                }
            }
        }
    }
}

/// Delegates the life-cycle calls of a wrapper to its `SessionAffinity`.
macro_rules! delegate_plugin {
    ($wrapper:ident) => {
        impl Plugin for $wrapper {
            fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
                self.0.configure(params_json)
            }
            fn pool_changed(&mut self, generation: u64, endpoints: &[EndpointInfo]) {
                self.0.pool_changed(generation, endpoints)
            }
            fn decided(&mut self, cycle: u64, endpoint: u32) -> Vec<(String, String)> {
                self.0.decided(cycle, endpoint)
            }
        }
    };
}

/// `session-affinity-scorer`: 1.0 for the session's endpoint, 0 elsewhere.
#[derive(Default)]
pub struct SessionAffinityScorer(pub SessionAffinity);
delegate_plugin!(SessionAffinityScorer);

impl Scorer for SessionAffinityScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        let target = self.0.target(cycle);
        cycle.ids.iter().map(|id| if Some(*id) == target { 1.0 } else { 0.0 }).collect()
    }
}

/// `session-affinity-filter`: only the session's endpoint when it is a candidate, every
/// candidate otherwise (never none).
#[derive(Default)]
pub struct SessionAffinityFilter(pub SessionAffinity);
delegate_plugin!(SessionAffinityFilter);

impl Filter for SessionAffinityFilter {
    fn filter(&mut self, cycle: &Cycle) -> Vec<u32> {
        match self.0.target(cycle) {
            Some(t) if cycle.ids.contains(&t) => vec![t],
            _ => cycle.ids.clone(),
        }
    }
}
