//! One endpoint's event intake: a ZMQ SUB socket on its publisher, and a DEALER on its
//! replay socket for what was missed.
//!
//! Sequence numbers come with every message (8 bytes, big-endian, from 0 per publisher
//! process). On connecting, the replay socket is asked for the publisher's history (vLLM
//! keeps the last 10 000 batches); on a gap, for everything from the next missing number. A
//! number lower than the last one means the publisher restarted: the endpoint's blocks are
//! forgotten and its history replayed. A publisher that disconnects (its engine stopped)
//! has its blocks forgotten too, and its history replayed once it is back. A replay that
//! fails leaves the index to heal as new sequences are stored (stores whose parent is
//! unknown are skipped until then). A payload that does not decode is counted and dropped.
//! The connection is retried forever, with a pause.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tracing::{debug, info, warn};
use zeromq::{DealerSocket, Socket, SocketEvent, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use super::decode::decode_batch;
use super::{KvEvents, Source};

/// Pause before reconnecting after a failure.
const RETRY: Duration = Duration::from_secs(1);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A replay that says nothing for this long has failed.
const REPLAY_IDLE: Duration = Duration::from_secs(2);
/// How long connecting to a replay socket may take. A refused connection is retried by the
/// socket until this runs out, and the live stream waits meanwhile: kept short.
const REPLAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// After a replay socket could not be reached, replays are not tried for this long (vLLM
/// runs without one unless `replay_endpoint` is set).
const REPLAY_DOWN_FOR: Duration = Duration::from_secs(60);

/// Whether the replay socket is worth trying.
#[derive(Default)]
struct ReplayGate {
    down_until: Option<std::time::Instant>,
}

pub async fn run(hub: Arc<KvEvents>, id: u32, name: String, source: Source, topic: String) {
    // The last sequence seen on the live stream, and the highest applied (live or replayed).
    let mut last_live: Option<u64> = None;
    let mut applied: Option<u64> = None;
    let mut failing = false;
    let mut rejoining = false;
    let mut gate = ReplayGate::default();
    loop {
        let mut socket = SubSocket::new();
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(&source.events)).await;
        if !matches!(connected, Ok(Ok(()))) || socket.subscribe(&topic).await.is_err() {
            if !failing {
                warn!(endpoint = %name, events = %source.events, "cannot reach the KV event publisher; retrying (the approximate index stands in)");
                failing = true;
            }
            hub.set_live(id, false);
            tokio::time::sleep(RETRY).await;
            continue;
        }
        if failing {
            info!(endpoint = %name, "KV event publisher reached");
            failing = false;
        }
        if rejoining {
            // The publisher went away: most likely the engine stopped, and with it its cache.
            // What it holds now is whatever its replay buffer says.
            info!(endpoint = %name, "KV event publisher reconnected; forgetting the endpoint's blocks and replaying its history");
            hub.forget(id, &name);
            (last_live, applied) = (None, None);
        }
        // Join with the publisher's history, so blocks stored before (and events sent
        // while the socket was connecting) are known without waiting for new traffic.
        if let Some(r) = replay(&hub, id, &name, &source, 0, &mut gate).await {
            applied = Some(r);
            hub.set_live(id, true);
        }
        info!(endpoint = %name, events = %source.events, history_through = ?applied, "KV event stream joined");
        let mut monitor = socket.monitor();
        loop {
            let msg = tokio::select! {
                msg = socket.recv() => msg,
                event = monitor.next() => match event {
                    Some(SocketEvent::Disconnected(_)) | None => {
                        debug!(endpoint = %name, "KV event publisher disconnected; reconnecting");
                        rejoining = true;
                        break;
                    }
                    Some(_) => continue,
                },
            };
            let Ok(msg) = msg else {
                debug!(endpoint = %name, "KV event stream closed; reconnecting");
                break;
            };
            let frames = msg.into_vec();
            let Some((seq, payload)) = split(&frames) else {
                if let Some(t) = hub.telemetry() {
                    t.kv_events_malformed(&name);
                }
                continue;
            };
            if let Some(t) = hub.telemetry() {
                t.kv_events_message(&name);
            }
            if last_live.is_some_and(|l| seq <= l) {
                // The live stream went back: a new publisher (the engine restarted), whose
                // history starts over.
                info!(endpoint = %name, seq, "KV event publisher restarted; forgetting the endpoint's blocks");
                hub.forget(id, &name);
                applied = None;
            }
            last_live = Some(seq);
            let expected = applied.map_or(0, |a| a + 1);
            if seq > expected {
                // Missed some (or joined late: the engine may hold blocks stored before).
                if applied.is_some()
                    && let Some(t) = hub.telemetry()
                {
                    t.kv_events_gap(&name);
                }
                debug!(endpoint = %name, missing_from = expected, seq, "asking for a KV event replay");
                if let Some(r) = replay(&hub, id, &name, &source, expected, &mut gate).await {
                    applied = Some(applied.map_or(r, |a| a.max(r)));
                }
            }
            hub.set_live(id, true);
            if applied.is_some_and(|a| a >= seq) {
                continue; // already applied through the replay
            }
            apply(&hub, id, &name, payload);
            applied = Some(seq);
        }
        hub.set_live(id, false);
        tokio::time::sleep(RETRY).await;
    }
}

/// `[topic, seq, payload]` (or `[seq, payload]`) → (seq, payload).
fn split(frames: &[Bytes]) -> Option<(u64, &[u8])> {
    let (seq, payload) = match frames {
        [_, seq, payload] | [seq, payload] => (seq, payload),
        _ => return None,
    };
    let seq: [u8; 8] = seq.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(seq), payload))
}

fn apply(hub: &KvEvents, id: u32, name: &str, payload: &[u8]) {
    match decode_batch(payload) {
        Ok(batch) => {
            if !batch.unknown.is_empty() {
                debug!(endpoint = %name, kinds = ?batch.unknown, "KV events of unknown kinds skipped");
            }
            if let Some(t) = hub.telemetry() {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                t.kv_events_lag(name, (now - batch.ts).max(0.0));
            }
            hub.apply(id, name, &batch.events);
        }
        Err(e) => {
            if let Some(t) = hub.telemetry() {
                t.kv_events_malformed(name);
            }
            warn!(endpoint = %name, error = %e, "KV event payload dropped");
        }
    }
}

/// Asks `source`'s replay socket for every batch from `from`, applies them in order and
/// returns the last sequence applied (None when nothing was). A socket that could not be
/// reached is left alone for `REPLAY_DOWN_FOR` (`gate`).
async fn replay(hub: &KvEvents, id: u32, name: &str, source: &Source, from: u64, gate: &mut ReplayGate) -> Option<u64> {
    let endpoint = source.replay.as_deref()?;
    if gate.down_until.is_some_and(|until| std::time::Instant::now() < until) {
        return None;
    }
    let outcome = replay_inner(hub, id, name, endpoint, from).await;
    if let Some(t) = hub.telemetry() {
        t.kv_events_replay(name, if outcome.is_ok() { "ok" } else { "failed" });
    }
    match outcome {
        Ok(last) => {
            gate.down_until = None;
            last
        }
        Err(ReplayError::Unreachable(e)) => {
            if gate.down_until.is_none() {
                info!(endpoint = %name, replay = endpoint, error = %e, retry_s = REPLAY_DOWN_FOR.as_secs(), "KV event replay socket unreachable; replays skipped for a while");
            }
            gate.down_until = Some(std::time::Instant::now() + REPLAY_DOWN_FOR);
            None
        }
        Err(ReplayError::Failed(e)) => {
            debug!(endpoint = %name, replay = endpoint, error = %e, "KV event replay failed");
            None
        }
    }
}

enum ReplayError {
    /// The socket could not be connected to.
    Unreachable(String),
    Failed(String),
}

impl From<String> for ReplayError {
    fn from(e: String) -> Self {
        ReplayError::Failed(e)
    }
}

async fn replay_inner(
    hub: &KvEvents,
    id: u32,
    name: &str,
    endpoint: &str,
    from: u64,
) -> Result<Option<u64>, ReplayError> {
    let mut dealer = DealerSocket::new();
    tokio::time::timeout(REPLAY_CONNECT_TIMEOUT, dealer.connect(endpoint))
        .await
        .map_err(|_| ReplayError::Unreachable("connect timed out".to_string()))?
        .map_err(|e| ReplayError::Unreachable(e.to_string()))?;
    let request = ZmqMessage::try_from(vec![Bytes::new(), Bytes::copy_from_slice(&from.to_be_bytes())])
        .map_err(|e| e.to_string())?;
    dealer.send(request).await.map_err(|e| e.to_string())?;
    let mut last = None;
    loop {
        let msg = tokio::time::timeout(REPLAY_IDLE, dealer.recv())
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?;
        let mut frames = msg.into_vec();
        if frames.first().is_some_and(|f| f.is_empty()) {
            frames.remove(0);
        }
        // The end marker: an empty payload.
        if frames.last().is_none_or(|p| p.is_empty()) {
            return Ok(last);
        }
        let Some((seq, payload)) = split(&frames) else {
            return Err(ReplayError::Failed("a malformed replay message".into()));
        };
        if seq >= from && last.is_none_or(|l| seq > l) {
            apply(hub, id, name, payload);
            last = Some(seq);
        }
    }
}
