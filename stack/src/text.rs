//! Text for tests and benchmarks of precise prefix routing: synthetic prose, and a byte-level
//! BPE tokenizer trained on it the way model tokenizers are built (no download at run time).

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

/// Synthetic text of `bytes` bytes: words of random syllables, so a trained BPE vocabulary
/// splits it about as a model tokenizer splits prose (3–5 bytes a token).
pub fn prose(seed: u64, bytes: usize) -> String {
    const ONSETS: [&str; 16] = ["b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "st", "tr"];
    const NUCLEI: [&str; 6] = ["a", "e", "i", "o", "u", "ou"];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let mut out = String::with_capacity(bytes + 16);
    while out.len() < bytes {
        for _ in 0..1 + next(3) {
            out.push_str(ONSETS[next(ONSETS.len())]);
            out.push_str(NUCLEI[next(NUCLEI.len())]);
        }
        out.push_str(match next(12) {
            0 => ". ",
            1 => ", ",
            _ => " ",
        });
    }
    out.truncate(bytes);
    out
}

/// A byte-level BPE tokenizer with an 8k vocabulary trained on `prose`, as the text of a
/// `tokenizer.json`.
pub fn trained_bpe_json() -> Result<String, String> {
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::default()));
    tok.with_decoder(Some(ByteLevel::default()));
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(8192)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let corpus: Vec<String> = (0..64).map(|i| prose(i, 16 * 1024)).collect();
    tok.train(&mut trainer, corpus.iter()).map_err(|e| format!("training the tokenizer: {e}"))?;
    tok.to_string(false).map_err(|e| format!("serializing the tokenizer: {e}"))
}
