//! Fuzzes the Prometheus text parser and the vLLM extraction behind it.
#![no_main]

use epp::metrics_scrape::{MetricNames, extract, parse_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(samples) = parse_bytes(data) {
        let _ = extract(&samples, &MetricNames::default());
    }
});
