//! Publishes the simulated KV cache's events as vLLM does (`vllm/distributed/kv_events.py`,
//! `ZmqEventPublisher`), so the EPP's precise prefix routing runs against the simulator:
//!
//! - a ZMQ PUB socket sends one multipart message per engine step with events:
//!   `[topic, sequence (8 bytes, big-endian, from 0), payload]`;
//! - the payload is msgpack of the array-like batch `[ts, [event, ...], data_parallel_rank]`,
//!   each event a tagged array: `["BlockStored", block_hashes, parent_block_hash, token_ids,
//!   block_size, lora_id, medium, lora_name]`, `["BlockRemoved", block_hashes, medium]`,
//!   `["AllBlocksCleared"]`;
//! - a ZMQ ROUTER replay socket answers `[identity, "", start_seq]` with every buffered batch
//!   from `start_seq` on, as `[identity, "", topic, seq, payload]`, then the end marker
//!   `[identity, "", "", 0xffffffffffffffff, ""]` (vLLM ≥ 0.26's layout).

use std::collections::VecDeque;

use bytes::Bytes;
use rmpv::Value;
use tokio::sync::{mpsc, watch};
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::kv_cache::KvEvent;

/// Batches kept for replay (vLLM's `buffer_steps` default).
pub const BUFFER_STEPS: usize = 10_000;
/// The sequence number that ends a replay.
pub const END_SEQ: [u8; 8] = [0xff; 8];

/// One engine step's events, with the wall-clock time (Unix seconds) they were sent at.
pub struct Batch {
    pub ts: f64,
    pub events: Vec<KvEvent>,
}

/// Where the publisher listens and what it says.
#[derive(Clone, Debug)]
pub struct PublishConfig {
    /// e.g. `tcp://127.0.0.1:5557`.
    pub endpoint: String,
    /// e.g. `tcp://127.0.0.1:5558`; none: no replay.
    pub replay_endpoint: Option<String>,
    pub topic: String,
    /// Tokens per KV block (the `block_size` field of `BlockStored`).
    pub block_size: u32,
}

/// The msgpack payload of one batch, as vLLM lays it out.
pub fn encode_batch(ts: f64, events: &[KvEvent], block_size: u32, lora: Option<&str>) -> Vec<u8> {
    let hashes = |h: &[u64]| Value::Array(h.iter().map(|x| Value::from(*x)).collect());
    let events: Vec<Value> = events
        .iter()
        .map(|e| match e {
            KvEvent::Stored { hashes: h, parent, tokens } => Value::Array(vec![
                Value::from("BlockStored"),
                hashes(h),
                parent.map_or(Value::Nil, Value::from),
                Value::Array(tokens.iter().map(|t| Value::from(*t)).collect()),
                Value::from(block_size),
                Value::Nil,
                Value::from("GPU"),
                lora.map_or(Value::Nil, Value::from),
            ]),
            KvEvent::Removed { hashes: h } => {
                Value::Array(vec![Value::from("BlockRemoved"), hashes(h), Value::from("GPU")])
            }
            KvEvent::Cleared => Value::Array(vec![Value::from("AllBlocksCleared")]),
        })
        .collect();
    let batch = Value::Array(vec![Value::F64(ts), Value::Array(events), Value::from(0)]);
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &batch);
    out
}

/// Binds the sockets and publishes every batch received on `batches` until `shutdown`.
/// Returns the bound ports (PUB, replay): binding errors surface at once, so a worker
/// fails to start visibly.
pub async fn start(
    config: PublishConfig,
    mut batches: mpsc::UnboundedReceiver<Batch>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(u16, Option<u16>)> {
    let port_of = |ep: &zeromq::Endpoint| match ep {
        zeromq::Endpoint::Tcp(_, port) => *port,
        _ => 0,
    };
    let mut publisher = PubSocket::new();
    let bound = publisher.bind(&config.endpoint).await?;
    let pub_port = port_of(&bound);
    let mut replay_port = None;
    let mut replay = match &config.replay_endpoint {
        Some(ep) => {
            let mut r = RouterSocket::new();
            replay_port = Some(port_of(&r.bind(ep).await?));
            Some(r)
        }
        None => None,
    };
    tokio::spawn(async move {
        let topic = Bytes::from(config.topic.clone().into_bytes());
        let mut seq: u64 = 0;
        let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::new();
        loop {
            let request = async {
                match replay.as_mut() {
                    Some(r) => r.recv().await.ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                batch = batches.recv() => {
                    let Some(batch) = batch else { break };
                    if batch.events.is_empty() {
                        continue;
                    }
                    let payload = Bytes::from(encode_batch(batch.ts, &batch.events, config.block_size, None));
                    let frames = vec![topic.clone(), Bytes::copy_from_slice(&seq.to_be_bytes()), payload.clone()];
                    if let Ok(msg) = ZmqMessage::try_from(frames) {
                        let _ = publisher.send(msg).await;
                    }
                    buffer.push_back((seq, payload));
                    if buffer.len() > BUFFER_STEPS {
                        buffer.pop_front();
                    }
                    seq += 1;
                }
                req = request => {
                    let (Some(req), Some(r)) = (req, replay.as_mut()) else { continue };
                    let frames = req.into_vec();
                    // [identity, "", start_seq]; anything else is ignored, as vLLM does.
                    let [id, empty, start] = frames.as_slice() else { continue };
                    if !empty.is_empty() || start.len() != 8 {
                        continue;
                    }
                    let from = u64::from_be_bytes(start[..8].try_into().unwrap_or([0; 8]));
                    for (s, payload) in buffer.iter().filter(|(s, _)| *s >= from) {
                        let reply = vec![id.clone(), Bytes::new(), topic.clone(), Bytes::copy_from_slice(&s.to_be_bytes()), payload.clone()];
                        if let Ok(msg) = ZmqMessage::try_from(reply) {
                            let _ = r.send(msg).await;
                        }
                    }
                    let end = vec![id.clone(), Bytes::new(), Bytes::new(), Bytes::copy_from_slice(&END_SEQ), Bytes::new()];
                    if let Ok(msg) = ZmqMessage::try_from(end) {
                        let _ = r.send(msg).await;
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
    });
    Ok((pub_port, replay_port))
}
