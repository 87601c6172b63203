//! Routing state shared between EPP replicas through Redis (`--state-store redis://…`).
//!
//! Each replica routes on its own plugins' state (prefix index, no-hit LRU, in-flight
//! load) and never waits on Redis to decide. After a pick it *publishes* the decision — the
//! request's model, prompt (its first 64 KB: more than any prefix index matches), prompt
//! tokens, `max_tokens`, cache salt and session token, and the worker chosen — and, when
//! the request ends, its end, as entries of one Redis stream per pool
//! (`epp:<pool>:decisions`, trimmed to about 100 000 entries). Every replica *reads* the
//! stream in the background and applies its peers' decisions as its own: the plugins decide
//! the request as a shadow does and then learn the real placement (`Router::mirror`), so
//! their prefix index, LRU and in-flight load match what the pool really got; the end
//! releases the load. Staleness is what it takes an entry to go through Redis
//! (sub-millisecond on a LAN; `epp_state_store_lag_seconds`).
//!
//! A fresh replica first replays the stream's newest 20 000 entries, then reports SERVING.
//! With Redis down or slow, publishing drops entries (counted) and reading retries with a
//! backoff; the replica keeps routing on its local state, logs once per change and sets
//! `epp_state_store_connected` to 0. When Redis is back, reading resumes where it stopped
//! (what the stream still holds). Peer requests whose end never comes (their replica died)
//! are released after five minutes.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use epp_core::{Completion, Outcome, Request};
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::routing::{DecisionSink, Mirrored, Router};
use crate::telemetry::Telemetry;

/// Stream length kept by Redis (approximate trimming).
const MAX_LEN: usize = 100_000;
/// Entries a fresh replica replays before serving.
const WARM_ENTRIES: usize = 20_000;
/// Prompt bytes shared per decision.
const PROMPT_CAP: usize = 64 * 1024;
/// The session header the session-affinity scorer reads.
const SESSION_HEADER: &str = "x-session-token";
/// Decisions waiting to be published; beyond it new ones are dropped (counted).
const QUEUE: usize = 8192;
/// Entries per pipeline or read.
const BATCH: usize = 256;
/// A peer's request without an end is released after this.
const MIRROR_TTL: Duration = Duration::from_secs(300);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How long a read may block waiting for new entries.
const READ_BLOCK_MS: u64 = 1000;
/// How long the follower waits for any reply: a blocking read's time and a margin.
const FOLLOW_RESPONSE_TIMEOUT: Duration = Duration::from_millis(READ_BLOCK_MS + 4000);

/// One replica's link to the store.
pub struct StateStore {
    tx: mpsc::Sender<Outgoing>,
    telemetry: Arc<Telemetry>,
    warmed: watch::Receiver<bool>,
}

enum Outgoing {
    Decided {
        cycle: u64,
        target: SocketAddr,
        /// What a peer needs of the request to decide it as this replica did.
        request: Shared,
    },
    Finished {
        cycle: u64,
        outcome: Outcome,
        status: u16,
    },
}

/// Whether Redis answers, logged once per change.
struct Link {
    /// 0 unknown, 1 up, 2 down.
    state: AtomicU8,
    telemetry: Arc<Telemetry>,
    url: String,
}

impl Link {
    fn up(&self) {
        if self.state.swap(1, Ordering::AcqRel) == 2 {
            info!(store = %self.url, "state store reachable again; sharing routing state");
        }
        self.telemetry.state_store_connected(true);
    }

    fn down(&self, error: &dyn std::fmt::Display) {
        if self.state.swap(2, Ordering::AcqRel) != 2 {
            warn!(store = %self.url, %error, "state store unreachable; routing on this replica's own state until it is back");
        }
        self.telemetry.state_store_connected(false);
    }
}

/// Checks a `--state-store` value: `redis://host:port[/db]`.
pub fn check_url(url: &str) -> Result<redis::Client, String> {
    if url.starts_with("rediss://") {
        return Err(format!("state store `{url}`: TLS (rediss://) is not supported; use redis://"));
    }
    if !url.starts_with("redis://") {
        return Err(format!("state store `{url}`: expected redis://host:port[/db]"));
    }
    let client = redis::Client::open(url).map_err(|e| format!("state store `{url}`: {e}"))?;
    // RESP3 changes the shape of stream replies, which are read as RESP2 lays them out.
    if client.get_connection_info().redis_settings().protocol() != redis::ProtocolVersion::RESP2 {
        return Err(format!("state store `{url}`: only RESP2 is supported; drop the `protocol` parameter"));
    }
    Ok(client)
}

fn replica_id() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0).hash(&mut h);
    format!("{:016x}", h.finish())
}

impl StateStore {
    /// Connects `router` to the store at `url` for pool `pool`: its decisions are published
    /// from now on, and its peers' applied. Returns at once; `warmed` tells when the history
    /// was replayed.
    pub fn start(
        url: &str,
        pool: &str,
        router: Arc<Router>,
        telemetry: Arc<Telemetry>,
    ) -> Result<Arc<StateStore>, String> {
        let client = check_url(url)?;
        let key = format!("epp:{pool}:decisions");
        let replica = replica_id();
        let (tx, rx) = mpsc::channel(QUEUE);
        let (warm_tx, warm_rx) = watch::channel(false);
        let link = Arc::new(Link { state: AtomicU8::new(0), telemetry: telemetry.clone(), url: url.to_string() });
        info!(store = %url, stream = %key, replica = %replica, "sharing routing state through Redis");
        tokio::spawn(publish(client.clone(), key.clone(), replica.clone(), rx, link.clone(), telemetry.clone()));
        tokio::spawn(follow(client, key, replica.clone(), router, link, telemetry.clone(), warm_tx));
        Ok(Arc::new(StateStore { tx, telemetry, warmed: warm_rx }))
    }

    /// Waits (up to `limit`) until the peers' history was replayed, or the store was found
    /// unreachable; whether it was replayed in time.
    pub async fn warmed(&self, limit: Duration) -> bool {
        let mut rx = self.warmed.clone();
        tokio::time::timeout(limit, rx.wait_for(|w| *w)).await.is_ok()
    }

    /// Queues what `make` builds for publishing, or counts it dropped when the queue is
    /// full (then nothing is built: a decision's entry copies up to 64 KB of prompt).
    fn enqueue(&self, make: impl FnOnce() -> Outgoing) {
        match self.tx.try_reserve() {
            Ok(slot) => slot.send(make()),
            Err(_) => self.telemetry.state_store_events("dropped", 1),
        }
    }
}

impl DecisionSink for StateStore {
    fn decided(&self, cycle: u64, target: SocketAddr, req: &Request) {
        self.enqueue(|| Outgoing::Decided { cycle, target, request: Shared::of(req) });
    }

    fn finished(&self, cycle: u64, completion: &Completion) {
        self.enqueue(|| Outgoing::Finished { cycle, outcome: completion.outcome, status: completion.status });
    }
}

/// What a decision entry carries of its request: what the plugins' `decided` and `finished`
/// hooks read (the prefix index, the no-hit LRU, the in-flight load and its output estimate,
/// session affinity). A field an older replica does not write reads as absent.
#[derive(Debug, Clone, PartialEq)]
struct Shared {
    model: String,
    /// The first 64 KB.
    prompt: String,
    prompt_tokens: u32,
    max_tokens: Option<u32>,
    cache_salt: Option<String>,
    session: Option<String>,
}

impl Shared {
    fn of(req: &Request) -> Shared {
        Shared {
            model: req.model.clone(),
            prompt: truncate(&req.prompt, PROMPT_CAP).to_string(),
            prompt_tokens: req.prompt_tokens,
            max_tokens: req.max_tokens,
            cache_salt: req.cache_salt.clone(),
            session: req.header(SESSION_HEADER).map(str::to_string),
        }
    }

    /// The entry's fields (beside kind, cycle and target).
    fn fields(self) -> Vec<(&'static str, String)> {
        let mut f = vec![("m", self.model), ("p", self.prompt), ("n", self.prompt_tokens.to_string())];
        f.extend(self.max_tokens.map(|n| ("mt", n.to_string())));
        f.extend(self.cache_salt.map(|s| ("s", s)));
        f.extend(self.session.map(|s| ("x", s)));
        f
    }

    /// The request a peer's decision entry describes.
    fn request(e: &Entry, id: String) -> Request {
        let prompt = e.get("p").unwrap_or_default().to_string();
        Request {
            id,
            model: e.get("m").unwrap_or_default().to_string(),
            prompt_tokens: e
                .get("n")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| Request::estimate_tokens(prompt.len())),
            prompt,
            max_tokens: e.get("mt").and_then(|n| n.parse().ok()),
            cache_salt: e.get("s").map(str::to_string),
            headers: e.get("x").map(|s| vec![(SESSION_HEADER.to_string(), s.to_string())]).unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes ending on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn connect(
    client: &redis::Client,
    response_timeout: Option<Duration>,
) -> redis::RedisResult<MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(response_timeout);
    client.get_multiplexed_async_connection_with_config(&config).await
}

fn outcome_code(o: Outcome) -> &'static str {
    match o {
        Outcome::Completed => "c",
        Outcome::Cancelled => "x",
        Outcome::Failed => "f",
    }
}

/// The publisher: batches queued entries into pipelined XADDs. Never blocks the request
/// path; with Redis down it drops (and counts) what it cannot send, retrying the connection
/// with a backoff.
async fn publish(
    client: redis::Client,
    key: String,
    replica: String,
    mut rx: mpsc::Receiver<Outgoing>,
    link: Arc<Link>,
    telemetry: Arc<Telemetry>,
) {
    let mut con: Option<MultiplexedConnection> = None;
    let mut retry_at = Instant::now();
    let mut backoff = RETRY_MIN;
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        if con.is_none() && Instant::now() >= retry_at {
            match connect(&client, Some(Duration::from_secs(1))).await {
                Ok(c) => {
                    con = Some(c);
                    backoff = RETRY_MIN;
                }
                Err(e) => {
                    link.down(&e);
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
        let Some(c) = con.as_mut() else {
            batch.clear();
            telemetry.state_store_events("dropped", n);
            continue;
        };
        let mut pipe = redis::pipe();
        for o in batch.drain(..) {
            pipe.cmd("XADD").arg(&key).arg("MAXLEN").arg("~").arg(MAX_LEN).arg("*").arg("r").arg(&replica);
            match o {
                Outgoing::Decided { cycle, target, request } => {
                    pipe.arg("k").arg("d").arg("c").arg(cycle).arg("t").arg(target.to_string());
                    for (field, value) in request.fields() {
                        pipe.arg(field).arg(value);
                    }
                }
                Outgoing::Finished { cycle, outcome, status } => {
                    pipe.arg("k").arg("f").arg("c").arg(cycle).arg("o").arg(outcome_code(outcome)).arg("h").arg(status);
                }
            }
            pipe.ignore();
        }
        match pipe.query_async::<()>(c).await {
            Ok(()) => {
                link.up();
                telemetry.state_store_events("published", n);
            }
            Err(e) => {
                link.down(&e);
                con = None;
                telemetry.state_store_events("dropped", n);
            }
        }
    }
}

/// One stream entry.
#[derive(Debug, Default, PartialEq)]
struct Entry {
    id: String,
    fields: HashMap<String, String>,
}

impl Entry {
    /// Milliseconds since the epoch at which Redis stored it (the id's first part).
    fn millis(&self) -> u64 {
        self.id.split('-').next().and_then(|m| m.parse().ok()).unwrap_or(0)
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.fields.get(k).map(String::as_str)
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `[id, [field, value, …]]`.
fn entry(v: &Value) -> Option<Entry> {
    let Value::Array(parts) = v else { return None };
    let id = text(parts.first()?)?;
    let Value::Array(kv) = parts.get(1)? else { return None };
    let fields = kv.chunks_exact(2).filter_map(|p| Some((text(&p[0])?, text(&p[1])?))).collect();
    Some(Entry { id, fields })
}

/// XRANGE / XREVRANGE: `[entry, …]`.
fn entries(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(list) => list.iter().filter_map(entry).collect(),
        _ => Vec::new(),
    }
}

/// XREAD: `[[key, [entry, …]], …]` (nil when nothing came).
fn read_reply(v: &Value) -> Vec<Entry> {
    let Value::Array(streams) = v else { return Vec::new() };
    streams
        .iter()
        .filter_map(|s| match s {
            Value::Array(pair) => pair.get(1).map(entries),
            _ => None,
        })
        .flatten()
        .collect()
}

fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Peer requests applied here and not ended yet: (replica, cycle) → (mirror, stored at ms).
type Mirrors = HashMap<(String, u64), (Mirrored, u64)>;

/// Applies peers' entries in order (on a blocking thread: the plugins run).
fn apply(router: &Router, me: &str, mirrors: &mut Mirrors, batch: Vec<Entry>, telemetry: &Telemetry) {
    let (mut applied, mut skipped) = (0u64, 0u64);
    let mut newest = 0;
    for e in batch {
        let (Some(replica), Some(kind), Some(cycle)) =
            (e.get("r"), e.get("k"), e.get("c").and_then(|c| c.parse().ok()))
        else {
            skipped += 1;
            continue;
        };
        if replica == me {
            continue;
        }
        newest = newest.max(e.millis());
        match kind {
            "d" => {
                let Some(target) = e.get("t").and_then(|t| t.parse::<SocketAddr>().ok()) else {
                    skipped += 1;
                    continue;
                };
                let req = Shared::request(&e, format!("peer-{replica}-{cycle}"));
                match router.mirror(req, target) {
                    Some(m) => {
                        mirrors.insert((replica.to_string(), cycle), (m, e.millis()));
                        applied += 1;
                    }
                    // A worker this replica does not know (yet): nothing to learn.
                    None => skipped += 1,
                }
            }
            "f" => {
                if let Some((m, _)) = mirrors.remove(&(replica.to_string(), cycle)) {
                    let outcome = match e.get("o") {
                        Some("x") => Outcome::Cancelled,
                        Some("f") => Outcome::Failed,
                        _ => Outcome::Completed,
                    };
                    let status = e.get("h").and_then(|h| h.parse().ok()).unwrap_or(0);
                    router.mirror_finished(m, outcome, status);
                    applied += 1;
                }
            }
            _ => skipped += 1,
        }
    }
    telemetry.state_store_events("applied", applied);
    if skipped > 0 {
        telemetry.state_store_events("skipped", skipped);
    }
    if newest > 0 {
        telemetry.state_store_lag(now_millis().saturating_sub(newest) as f64 / 1e3);
    }
}

/// Releases peer requests whose end never came.
fn sweep(router: &Router, mirrors: &mut Mirrors) {
    let horizon = now_millis().saturating_sub(MIRROR_TTL.as_millis() as u64);
    let stale: Vec<(String, u64)> =
        mirrors.iter().filter(|(_, (_, at))| *at < horizon).map(|(k, _)| k.clone()).collect();
    for k in stale {
        if let Some((m, _)) = mirrors.remove(&k) {
            router.mirror_finished(m, Outcome::Cancelled, 0);
        }
    }
}

/// The follower: replays the history once, then reads new entries as they come, applying
/// the peers' ones. Reconnects forever with a backoff, resuming after the last entry read.
async fn follow(
    client: redis::Client,
    key: String,
    me: String,
    router: Arc<Router>,
    link: Arc<Link>,
    telemetry: Arc<Telemetry>,
    warmed: watch::Sender<bool>,
) {
    let mirrors: Arc<Mutex<Mirrors>> = Arc::default();
    let mut last_id: Option<String> = None;
    let mut backoff = RETRY_MIN;
    let mut swept = Instant::now();
    let run = |batch: Vec<Entry>, sweep_too: bool| {
        let (router, me, mirrors, telemetry) = (router.clone(), me.clone(), mirrors.clone(), telemetry.clone());
        tokio::task::spawn_blocking(move || {
            let mut m = crate::routing::lock(&mirrors);
            apply(&router, &me, &mut m, batch, &telemetry);
            if sweep_too {
                sweep(&router, &mut m);
            }
        })
    };
    loop {
        // Every read answers within its block time: past it (and a margin), the store is
        // taken for gone (a crashed host or a cut network sends no reset) and reconnected.
        let mut con = match connect(&client, Some(FOLLOW_RESPONSE_TIMEOUT)).await {
            Ok(c) => c,
            Err(e) => {
                link.down(&e);
                // Serve on local state rather than wait for a store that is not there.
                warmed.send_replace(true);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        if last_id.is_none() {
            let history: redis::RedisResult<Value> = redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(WARM_ENTRIES)
                .query_async(&mut con)
                .await;
            match history {
                Ok(v) => {
                    link.up();
                    backoff = RETRY_MIN;
                    let mut batch = entries(&v);
                    batch.reverse();
                    let n = batch.len();
                    last_id = Some(batch.last().map(|e| e.id.clone()).unwrap_or_else(|| "0-0".into()));
                    let started = Instant::now();
                    let _ = run(batch, true).await;
                    info!(
                        entries = n,
                        took_ms = started.elapsed().as_millis() as u64,
                        "routing state replayed from the store"
                    );
                    warmed.send_replace(true);
                }
                Err(e) => {
                    // Loading, refused (NOAUTH, NOPERM) or timed out: try again later, not at once.
                    link.down(&e);
                    warmed.send_replace(true);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            }
        }
        loop {
            let from = last_id.clone().unwrap_or_else(|| "$".into());
            let read: redis::RedisResult<Value> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(BATCH)
                .arg("BLOCK")
                .arg(READ_BLOCK_MS)
                .arg("STREAMS")
                .arg(&key)
                .arg(&from)
                .query_async(&mut con)
                .await;
            let batch = match read {
                Ok(v) => {
                    link.up();
                    backoff = RETRY_MIN;
                    read_reply(&v)
                }
                Err(e) => {
                    link.down(&e);
                    break;
                }
            };
            if let Some(e) = batch.last() {
                last_id = Some(e.id.clone());
            }
            let sweep_too = swept.elapsed() > Duration::from_secs(10);
            if sweep_too {
                swept = Instant::now();
            }
            if !batch.is_empty() || sweep_too {
                let _ = run(batch, sweep_too).await;
            }
        }
        debug!("state store read failed; reconnecting");
        tokio::time::sleep(backoff).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn replies_parse_as_redis_lays_them_out() {
        let e =
            Value::Array(vec![bulk("1700000000123-0"), Value::Array(vec![bulk("k"), bulk("d"), bulk("c"), bulk("7")])]);
        let parsed = entry(&e).expect("an entry");
        assert_eq!(parsed.millis(), 1_700_000_000_123);
        assert_eq!((parsed.get("k"), parsed.get("c")), (Some("d"), Some("7")));
        let xread = Value::Array(vec![Value::Array(vec![bulk("epp:p:decisions"), Value::Array(vec![e.clone(), e])])]);
        assert_eq!(read_reply(&xread).len(), 2);
        assert!(read_reply(&Value::Nil).is_empty());
        assert!(entries(&Value::Array(vec![Value::Int(3)])).is_empty(), "garbage is skipped, not a panic");
    }

    #[test]
    fn a_decision_entry_gives_peers_what_the_plugins_read() {
        let req = Request {
            id: "r1".into(),
            model: "m".into(),
            prompt: "p".repeat(PROMPT_CAP + 10),
            prompt_tokens: 9000,
            max_tokens: Some(700),
            cache_salt: Some("salt".into()),
            headers: vec![(SESSION_HEADER.into(), "s1".into()), ("other".into(), "h".into())],
            ..Default::default()
        };
        let shared = Shared::of(&req);
        let entry = |fields: Vec<(&str, String)>| Entry {
            id: "1-0".into(),
            fields: fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        };
        let peer = Shared::request(&entry(shared.clone().fields()), "peer-a-1".into());
        assert_eq!(peer.id, "peer-a-1");
        assert_eq!(peer.prompt.len(), PROMPT_CAP, "the prompt is cut");
        assert_eq!((peer.model.as_str(), peer.prompt_tokens, peer.max_tokens), ("m", 9000, Some(700)));
        assert_eq!(peer.cache_salt.as_deref(), Some("salt"));
        assert_eq!(peer.headers, vec![(SESSION_HEADER.to_string(), "s1".to_string())]);
        assert_eq!(Shared::of(&peer), shared, "a peer's request shares as the original");
        // An entry written by an older replica (no max_tokens, no token count): absent, estimated.
        let old = Shared::request(&entry(vec![("m", "m".into()), ("p", "abcdefgh".into())]), "x".into());
        assert_eq!((old.max_tokens, old.prompt_tokens), (None, Request::estimate_tokens(8)));
    }

    #[test]
    fn urls_are_checked_and_prompts_cut_on_a_character() {
        assert!(check_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_url("rediss://h:1").unwrap_err().contains("TLS"));
        assert!(check_url("http://h:1").unwrap_err().contains("redis://"));
        assert!(check_url("redis://h:1/?protocol=resp3").unwrap_err().contains("RESP2"));
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
