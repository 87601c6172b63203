//! Fuzzes the endpoints-file parser (YAML or JSON).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = epp::discovery::parse_endpoints(text);
    }
});
