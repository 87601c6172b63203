//! Decoding vLLM's KV-cache event payloads (`vllm/distributed/kv_events.py`, msgspec msgpack).
//!
//! A batch is `[ts, [event, ...], data_parallel_rank?]` — accepted as a map too. An event is
//! a tagged array `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
//! lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind, ...]` (vLLM ≤ 0.25)
//! or a map with the tag under `"type"` (vLLM ≥ 0.26); missing trailing fields take their
//! defaults. Block hashes are integers (vLLM's default: the digest's last 8 bytes) or raw
//! digests (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`), both read as the same `u64`: the last
//! 8 bytes, big-endian. Anything else is an error naming what was wrong; events of kinds not
//! known here are skipped and named.

use crate::metrics_scrape::MAX_BLOCK_SIZE;
use rmpv::Value;

/// One decoded batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub ts: f64,
    pub events: Vec<Event>,
    pub data_parallel_rank: Option<i64>,
    /// Tags of events skipped because this decoder does not know them.
    pub unknown: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Stored(Stored),
    /// `group`: the KV cache group (`group_idx`) the blocks were evicted from, when given.
    Removed {
        hashes: Vec<u64>,
        medium: Option<String>,
        group: Option<u32>,
    },
    Cleared,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub hashes: Vec<u64>,
    /// The hash of the block before the first one; None when they start a sequence.
    pub parent: Option<u64>,
    /// Every block's tokens, `block_size` each (empty for tier moves, e.g. CPU offload).
    pub tokens: Vec<u32>,
    pub block_size: u32,
    /// `lora_name`, or the deprecated `lora_id` as text.
    pub lora: Option<String>,
    /// `"GPU"`, `"CPU"`, … (None: GPU).
    pub medium: Option<String>,
    /// Strings among block 0's `extra_keys` (cache salt, LoRA name).
    pub first_block_strings: Vec<String>,
    /// `kv_cache_spec_kind` (`full_attention`, `sliding_window`, …) when given.
    pub kind: Option<String>,
    /// `group_idx`: the KV cache group (hybrid models have several), when given.
    pub group: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("not msgpack: {0}")]
    Msgpack(String),
    #[error("{0}")]
    Shape(String),
}

fn shape(msg: impl Into<String>) -> DecodeError {
    DecodeError::Shape(msg.into())
}

/// Decodes one payload.
pub fn decode_batch(mut bytes: &[u8]) -> Result<Batch, DecodeError> {
    let value = rmpv::decode::read_value(&mut bytes).map_err(|e| DecodeError::Msgpack(e.to_string()))?;
    if !bytes.is_empty() {
        return Err(shape(format!("{} bytes after the batch", bytes.len())));
    }
    let (ts, events, rank) = match &value {
        Value::Array(a) => (a.first(), a.get(1), a.get(2)),
        Value::Map(_) => (field(&value, "ts"), field(&value, "events"), field(&value, "data_parallel_rank")),
        other => return Err(shape(format!("a batch must be an array or a map, got {}", kind_of(other)))),
    };
    let ts = ts.and_then(number).ok_or_else(|| shape("the batch has no timestamp"))?;
    let Some(Value::Array(raw_events)) = events else {
        return Err(shape("the batch has no event list"));
    };
    let data_parallel_rank = match rank {
        None | Some(Value::Nil) => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| shape("data_parallel_rank is not an integer"))?),
    };
    let mut out = Batch { ts, events: Vec::with_capacity(raw_events.len()), data_parallel_rank, unknown: Vec::new() };
    for (i, e) in raw_events.iter().enumerate() {
        match event(e).map_err(|err| shape(format!("event {i}: {err}")))? {
            Ok(ev) => out.events.push(ev),
            Err(tag) => out.unknown.push(tag),
        }
    }
    Ok(out)
}

/// One event: Ok(Ok) decoded, Ok(Err(tag)) of an unknown kind.
fn event(v: &Value) -> Result<Result<Event, String>, DecodeError> {
    // Positional fields after the tag, or named fields.
    type Getter<'a> = Box<dyn Fn(usize, &str) -> Option<&'a Value> + 'a>;
    let (tag, get): (String, Getter<'_>) = match v {
        Value::Array(a) => {
            let tag =
                a.first().and_then(Value::as_str).ok_or_else(|| shape("an array event must start with its tag"))?;
            (tag.to_string(), Box::new(move |i: usize, _: &str| a.get(i + 1)))
        }
        Value::Map(_) => {
            let tag = field(v, "type").and_then(Value::as_str).ok_or_else(|| shape("a map event needs a `type`"))?;
            (tag.to_string(), Box::new(move |_: usize, name: &str| field(v, name)))
        }
        other => return Err(shape(format!("an event must be an array or a map, got {}", kind_of(other)))),
    };
    let text = |i: usize, name: &str| -> Result<Option<String>, DecodeError> {
        match get(i, name) {
            None | Some(Value::Nil) => Ok(None),
            Some(Value::String(s)) => Ok(s.as_str().map(str::to_string)),
            Some(Value::Integer(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(shape(format!("`{name}` is {}, not text", kind_of(other)))),
        }
    };
    Ok(Ok(match tag.as_str() {
        "BlockStored" => {
            let hashes = hash_list(get(0, "block_hashes"), "block_hashes")?;
            let parent = match get(1, "parent_block_hash") {
                None | Some(Value::Nil) => None,
                Some(h) => Some(hash(h).ok_or_else(|| shape("`parent_block_hash` is not a block hash"))?),
            };
            let tokens = match get(2, "token_ids") {
                None | Some(Value::Nil) => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| shape("`token_ids` holds something other than token ids"))?,
                Some(other) => return Err(shape(format!("`token_ids` is {}", kind_of(other)))),
            };
            let block_size = get(3, "block_size")
                .and_then(Value::as_u64)
                .and_then(|b| u32::try_from(b).ok())
                .filter(|&b| (1..=MAX_BLOCK_SIZE).contains(&b))
                .ok_or_else(|| shape(format!("`block_size` is missing or not an integer in 1..={MAX_BLOCK_SIZE}")))?;
            let lora_id = text(4, "lora_id")?;
            let medium = text(5, "medium")?;
            let lora_name = text(6, "lora_name")?;
            let first_block_strings = match get(7, "extra_keys") {
                Some(Value::Array(keys)) => match keys.first() {
                    Some(Value::Array(first)) => first.iter().filter_map(|k| k.as_str().map(str::to_string)).collect(),
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            let group = group_idx(get(8, "group_idx"))?;
            let kind = text(9, "kv_cache_spec_kind")?;
            Event::Stored(Stored {
                hashes,
                parent,
                tokens,
                block_size,
                lora: lora_name.or(lora_id),
                medium,
                first_block_strings,
                kind,
                group,
            })
        }
        "BlockRemoved" => Event::Removed {
            hashes: hash_list(get(0, "block_hashes"), "block_hashes")?,
            medium: text(1, "medium")?,
            group: group_idx(get(2, "group_idx"))?,
        },
        "AllBlocksCleared" => Event::Cleared,
        other => return Ok(Err(other.to_string())),
    }))
}

/// `group_idx`: absent or nil, or a small whole number.
fn group_idx(v: Option<&Value>) -> Result<Option<u32>, DecodeError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|g| u32::try_from(g).ok())
            .map(Some)
            .ok_or_else(|| shape("`group_idx` is not a whole number")),
    }
}

fn field<'a>(map: &'a Value, name: &str) -> Option<&'a Value> {
    match map {
        Value::Map(entries) => entries.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v),
        _ => None,
    }
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_i64().map(|i| i as f64)).or_else(|| v.as_u64().map(|u| u as f64))
}

/// A block hash as a `u64`: an unsigned or signed integer as is, a raw digest by its last
/// 8 bytes read big-endian (what vLLM's integer form keeps too).
pub fn hash(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(n) => n.as_u64().or_else(|| n.as_i64().map(|i| i as u64)),
        Value::Binary(b) => {
            let tail = &b[b.len().saturating_sub(8)..];
            let mut buf = [0u8; 8];
            buf[8 - tail.len()..].copy_from_slice(tail);
            Some(u64::from_be_bytes(buf))
        }
        _ => None,
    }
}

fn hash_list(v: Option<&Value>, name: &str) -> Result<Vec<u64>, DecodeError> {
    match v {
        Some(Value::Array(a)) => {
            a.iter().map(hash).collect::<Option<Vec<u64>>>().ok_or_else(|| shape(format!("`{name}` holds a non-hash")))
        }
        Some(other) => Err(shape(format!("`{name}` is {}, not a list", kind_of(other)))),
        None => Err(shape(format!("`{name}` is missing"))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a string",
        Value::Binary(_) => "binary",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch as vLLM ≤ 0.25 publishes it, written byte by byte from the msgpack spec:
    /// `[1.5, [["BlockStored", [0xfedcba9876543210, 7], None, [1, 2, 3, 4], 2, None, "GPU", None],
    ///        ["BlockRemoved", [7], "GPU"], ["AllBlocksCleared"]], 0]`.
    const V025: &[u8] = &[
        0x93, // array(3): the batch
        0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0,    // float64 1.5
        0x93, // array(3): the events
        0x98, // array(8): BlockStored
        0xab, b'B', b'l', b'o', b'c', b'k', b'S', b't', b'o', b'r', b'e', b'd', // fixstr(11)
        0x92, 0xcf, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10, 0x07, // [uint64, 7]
        0xc0, // parent: nil
        0x94, 0x01, 0x02, 0x03, 0x04, // token ids
        0x02, // block_size
        0xc0, // lora_id
        0xa3, b'G', b'P', b'U', // medium
        0xc0, // lora_name
        0x93, // array(3): BlockRemoved
        0xac, b'B', b'l', b'o', b'c', b'k', b'R', b'e', b'm', b'o', b'v', b'e', b'd', 0x91, 0x07, 0xa3, b'G', b'P',
        b'U', 0x91, // array(1): AllBlocksCleared
        0xb0, b'A', b'l', b'l', b'B', b'l', b'o', b'c', b'k', b's', b'C', b'l', b'e', b'a', b'r', b'e', b'd',
        0x00, // data_parallel_rank 0
    ];

    #[test]
    fn golden_vllm_array_layout() {
        let b = decode_batch(V025).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.ts, 1.5);
        assert_eq!(b.data_parallel_rank, Some(0));
        assert_eq!(
            b.events,
            vec![
                Event::Stored(Stored {
                    hashes: vec![0xfedc_ba98_7654_3210, 7],
                    parent: None,
                    tokens: vec![1, 2, 3, 4],
                    block_size: 2,
                    lora: None,
                    medium: Some("GPU".into()),
                    first_block_strings: vec![],
                    kind: None,
                    group: None,
                }),
                Event::Removed { hashes: vec![7], medium: Some("GPU".into()), group: None },
                Event::Cleared,
            ]
        );
    }

    /// vLLM 0.26's layout (events as maps), digests as raw bytes, a LoRA and a salt.
    #[test]
    fn golden_vllm_map_layout_with_binary_hashes() {
        let mut digest = vec![0u8; 24];
        digest.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        let event = Value::Map(vec![
            (Value::from("type"), Value::from("BlockStored")),
            (Value::from("block_hashes"), Value::Array(vec![Value::Binary(digest.clone())])),
            (Value::from("parent_block_hash"), Value::Binary(vec![0x01, 0x00])),
            (Value::from("token_ids"), Value::Array((0..16).map(Value::from).collect())),
            (Value::from("block_size"), Value::from(16)),
            (Value::from("lora_id"), Value::Nil),
            (Value::from("medium"), Value::from("GPU")),
            (Value::from("lora_name"), Value::from("sql-lora")),
            (
                Value::from("extra_keys"),
                Value::Array(vec![Value::Array(vec![Value::from("sql-lora"), Value::from("salt-1")])]),
            ),
            (Value::from("group_idx"), Value::from(0)),
            (Value::from("kv_cache_spec_kind"), Value::from("full_attention")),
        ]);
        let batch = Value::Array(vec![Value::F64(2.0), Value::Array(vec![event]), Value::from(1)]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &batch).unwrap_or_else(|e| panic!("{e}"));
        let b = decode_batch(&bytes).unwrap_or_else(|e| panic!("{e}"));
        let Event::Stored(s) = &b.events[0] else { panic!("{b:?}") };
        assert_eq!(s.hashes, vec![0x0102_0304_0506_0708]);
        assert_eq!(s.parent, Some(0x0100));
        assert_eq!((s.block_size, s.tokens.len()), (16, 16));
        assert_eq!(s.lora.as_deref(), Some("sql-lora"));
        assert_eq!(s.first_block_strings, vec!["sql-lora".to_string(), "salt-1".to_string()]);
        assert_eq!(s.kind.as_deref(), Some("full_attention"));
        assert_eq!(b.data_parallel_rank, Some(1));
    }

    #[test]
    fn the_simulators_payload_decodes() {
        let events = vec![
            sim::kv_cache::KvEvent::Stored { hashes: vec![u64::MAX, 3], parent: Some(9), tokens: vec![5; 32] },
            sim::kv_cache::KvEvent::Removed { hashes: vec![4] },
        ];
        let b = decode_batch(&sim::kv_publish::encode_batch(0.25, &events, 16, None)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.events.len(), 2);
        let Event::Stored(s) = &b.events[0] else { panic!("{b:?}") };
        assert_eq!((s.hashes.clone(), s.parent, s.block_size), (vec![u64::MAX, 3], Some(9), 16));
    }

    #[test]
    fn bad_payloads_are_errors_and_unknown_events_are_named() {
        let enc = |v: Value| {
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, &v).unwrap_or_else(|e| panic!("{e}"));
            out
        };
        assert!(matches!(decode_batch(&[0x92, 0x01]), Err(DecodeError::Msgpack(_))), "a truncated array");
        assert!(decode_batch(&[0xc1]).is_err());
        assert!(decode_batch(&enc(Value::from(3))).is_err());
        assert!(decode_batch(&enc(Value::Array(vec![Value::F64(1.0)]))).is_err());
        let stored_without_size = Value::Array(vec![
            Value::from("BlockStored"),
            Value::Array(vec![Value::from(1)]),
            Value::Nil,
            Value::Array(vec![]),
        ]);
        let e = decode_batch(&enc(Value::Array(vec![Value::F64(1.0), Value::Array(vec![stored_without_size])])))
            .unwrap_err()
            .to_string();
        assert!(e.contains("event 0") && e.contains("block_size"), "{e}");
        // A block size no engine has (it would size every request's hashing buffer).
        let huge = Value::Array(vec![
            Value::from("BlockStored"),
            Value::Array(vec![]),
            Value::Nil,
            Value::Array(vec![]),
            Value::from(u64::from(u32::MAX)),
        ]);
        let e =
            decode_batch(&enc(Value::Array(vec![Value::F64(1.0), Value::Array(vec![huge])]))).unwrap_err().to_string();
        assert!(e.contains("1..=4096"), "{e}");
        // vLLM's current layout: BlockRemoved carries the group after the medium.
        let removed = Value::Array(vec![
            Value::from("BlockRemoved"),
            Value::Array(vec![Value::from(5)]),
            Value::from("GPU"),
            Value::from(1),
        ]);
        let b = decode_batch(&enc(Value::Array(vec![Value::F64(1.0), Value::Array(vec![removed])])))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.events, vec![Event::Removed { hashes: vec![5], medium: Some("GPU".into()), group: Some(1) }]);
        let future = Value::Array(vec![Value::from("BlockMoved"), Value::Array(vec![])]);
        let b = decode_batch(&enc(Value::Array(vec![Value::F64(1.0), Value::Array(vec![future])])))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.unknown, vec!["BlockMoved".to_string()]);
    }
}
