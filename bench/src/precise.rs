//! What precise prefix routing costs the EPP: turning a prompt into token ids (a byte-level
//! BPE tokenizer trained here on synthetic text, as model tokenizers are built; and the
//! simulator's), hashing them into block keys, matching a request against the index, and
//! the index's memory per 100 000 blocks.

use std::time::{Duration, Instant};

use epp::kv_events::decode::{Event, Stored};
use epp::kv_events::index::{PreciseIndex, chain, root};
use epp::kv_events::tokenize::Tokenizer;
use epp_core::Request;
use epp_stack::text::{prose, trained_bpe_json};

use crate::latency::{Latency, Summary};

/// Tokens per KV block (vLLM's default).
const BLOCK: usize = 16;
/// The blocks whose memory is measured.
const INDEX_BLOCKS: usize = 100_000;

#[derive(Clone, Debug)]
pub struct TokenizeCost {
    pub tokenizer: &'static str,
    pub prompt_bytes: usize,
    pub tokens: usize,
    /// Tokenizing and hashing into block keys.
    pub summary: Summary,
}

#[derive(Clone, Debug, Default)]
pub struct PreciseCosts {
    pub tokenize: Vec<TokenizeCost>,
    /// Heap the index takes for `index_blocks` blocks, bytes (its hash tables at capacity).
    pub index_bytes: Option<u64>,
    pub index_blocks: usize,
    /// Matching a 64-block chain against 100 endpoints' blocks.
    pub lookup: Option<Summary>,
}

/// The trained BPE tokenizer of `epp_stack::text`, loaded as the EPP loads a model's.
fn trained_tokenizer() -> Result<Tokenizer, String> {
    Tokenizer::from_json(&trained_bpe_json()?)
}

fn request(prompt: String) -> Request {
    Request { prompt_tokens: Request::estimate_tokens(prompt.len()), prompt, ..Default::default() }
}

fn time(budget: Duration, min: u64, mut f: impl FnMut()) -> Summary {
    let mut lat = Latency::new();
    let started = Instant::now();
    while lat.count() < min || started.elapsed() < budget {
        let t = Instant::now();
        f();
        lat.record(t.elapsed());
        if lat.count() >= 10_000 {
            break;
        }
    }
    lat.summary()
}

/// A store event of full 16-token blocks, from the start of a sequence.
fn stored(hashes: Vec<u64>, tokens: Vec<u32>) -> Stored {
    Stored {
        hashes,
        parent: None,
        tokens,
        block_size: BLOCK as u32,
        lora: None,
        medium: None,
        first_block_strings: Vec::new(),
        kind: None,
        group: None,
    }
}

pub fn run(prompt_bytes: &[usize], budget: Duration) -> Result<PreciseCosts, String> {
    let mut out = PreciseCosts { index_blocks: INDEX_BLOCKS, ..Default::default() };
    let bpe = trained_tokenizer()?;
    for (name, tokenizer) in [("byte-level BPE, 8k vocab", &bpe), ("simulator (4 bytes a token)", &Tokenizer::Sim)] {
        for &bytes in prompt_bytes {
            let req = request(prose(1000 + bytes as u64, bytes));
            let tokens = tokenizer.encode(&req).len();
            let summary = time(budget, 5, || {
                let ids = tokenizer.encode(&req);
                std::hint::black_box(chain(root(None, None), &ids, BLOCK));
            });
            out.tokenize.push(TokenizeCost { tokenizer: name, prompt_bytes: bytes, tokens, summary });
        }
    }

    // 100 000 blocks: 1 000 sequences of 100 blocks on one endpoint, stored as an engine
    // reports them (one event per sequence, engine hashes of its own).
    let mut index = PreciseIndex::new(INDEX_BLOCKS);
    let mut engine_hash = 1u64;
    for s in 0..(INDEX_BLOCKS / 100) as u32 {
        let tokens: Vec<u32> = (0..(100 * BLOCK) as u32).map(|t| s.wrapping_mul(7919).wrapping_add(t)).collect();
        let hashes: Vec<u64> = (0..100)
            .map(|_| {
                engine_hash += 1;
                engine_hash
            })
            .collect();
        index.apply(0, &[Event::Stored(stored(hashes, tokens))]);
    }
    out.index_blocks = index.blocks(0);
    out.index_bytes = Some(index.memory_bytes() as u64);
    drop(index);

    // Lookup: 100 endpoints holding 1 000 blocks each; a request's 64-block chain against all.
    let mut index = PreciseIndex::new(INDEX_BLOCKS);
    let tokens: Vec<u32> = (0..(64 * BLOCK) as u32).collect();
    for e in 0..100u32 {
        index.apply(e, &[Event::Stored(stored((0..64).map(|h| u64::from(e) << 32 | h).collect(), tokens.clone()))]);
    }
    let keys = chain(root(None, None), &tokens, BLOCK);
    out.lookup = Some(time(budget, 100, || {
        let total: usize = (0..100).map(|e| index.matched(e, &keys)).sum();
        std::hint::black_box(total);
    }));
    Ok(out)
}
