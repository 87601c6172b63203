//! Fuzzes the OpenAI request parser with arbitrary bodies for every API kind.
#![no_main]

use epp::request::{ApiKind, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for kind in [ApiKind::Completions, ApiKind::ChatCompletions, ApiKind::Responses, ApiKind::Embeddings] {
        let _ = parse(kind, data);
    }
});
