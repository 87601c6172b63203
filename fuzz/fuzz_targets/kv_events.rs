//! Fuzzes the KV-event payload decoder and the precise index fed by what it accepts.
#![no_main]

use epp::kv_events::decode::decode_batch;
use epp::kv_events::index::PreciseIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = decode_batch(data) {
        let mut index = PreciseIndex::new(1024);
        let _ = index.apply(0, &batch.events);
    }
});
