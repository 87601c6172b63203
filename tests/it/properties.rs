//! Property tests: whatever bytes arrive — request bodies, worker metrics pages, endpoints
//! files — the parsers return a value or an error, never panic, and what they accept holds
//! their invariants. (The same entry points have cargo-fuzz targets under `fuzz/`.)

use epp::request::{self, ApiKind};
use proptest::prelude::*;

const KINDS: [ApiKind; 4] = [ApiKind::Completions, ApiKind::ChatCompletions, ApiKind::Responses, ApiKind::Embeddings];

/// JSON-ish text: often valid-looking, often broken.
fn jsonish() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\{\"model\":\"[a-z]{0,5}\",\"(prompt|messages|input)\":(\"[^\"]{0,20}\"|\\[[^\\]]{0,30}\\]|[0-9]{1,3}|null|\\{\\})(,\"stream\":(true|false|1))?\\}",
        prop::collection::vec(
            prop_oneof![
                Just("{"),
                Just("}"),
                Just("["),
                Just("]"),
                Just("\""),
                Just(":"),
                Just(","),
                Just("model"),
                Just("prompt"),
                Just("1")
            ],
            0..40
        )
        .prop_map(|v| v.concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn request_parser_never_panics(body in jsonish(), raw in prop::collection::vec(any::<u8>(), 0..200), k in 0usize..4) {
        let kind = KINDS[k];
        for bytes in [body.as_bytes(), raw.as_slice()] {
            if let Ok(r) = request::parse(kind, bytes) {
                prop_assert!(!r.model.is_empty());
                prop_assert_eq!(r.kind, kind);
            }
        }
    }

    #[test]
    fn metrics_parser_never_panics(lines in prop::collection::vec(
        prop_oneof![
            any::<String>(),
            "vllm:[a-z_]{1,20}(\\{[a-z_]{1,8}=\"[^\"\\\\]{0,8}\"(,[a-z]{1,4}=\"[a-z]{0,4}\")?\\})? (-?[0-9]{1,4}(\\.[0-9]{1,3})?|NaN|\\+Inf)( [0-9]{1,13})?",
            "# (HELP|TYPE) vllm:[a-z_]{1,10} [a-z ]{0,20}",
        ],
        0..20,
    )) {
        let text = lines.join("\n") + "\n";
        if let Ok(samples) = epp::metrics_scrape::parse(&text) {
            let names = epp::metrics_scrape::MetricNames::default();
            if let Ok(m) = epp::metrics_scrape::extract(&samples, &names) {
                prop_assert!(m.waiting >= 0.0 && m.running >= 0.0 && m.kv_usage >= 0.0);
            }
        }
    }

    #[test]
    fn endpoints_parser_never_panics(text in prop_oneof![
        any::<String>(),
        "endpoints:\n(  - name: [a-z0-9-]{0,6}\n    address: [0-9.a-z:]{0,16}\n    port: (\"[0-9a-z]{0,6}\"|[0-9]{0,6})\n){0,4}",
    ]) {
        if let Ok(parsed) = epp::discovery::parse_endpoints(&text) {
            for e in &parsed.endpoints {
                prop_assert!(e.port >= 1);
                prop_assert!(!e.name.is_empty());
            }
        }
    }

    #[test]
    fn kv_event_decoder_never_panics(
        raw in prop::collection::vec(any::<u8>(), 0..300),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        hashes in prop::collection::vec(any::<u64>(), 0..4),
        parent in any::<Option<u64>>(),
        tokens in 0usize..80,
    ) {
        use epp::kv_events::decode::{Event, decode_batch};
        use epp::kv_events::index::PreciseIndex;
        use sim::kv_cache::KvEvent;
        // A well-formed payload as the simulator (and vLLM) lays it out, then damaged.
        let events = vec![
            KvEvent::Stored { hashes: hashes.clone(), parent, tokens: vec![7; tokens] },
            KvEvent::Removed { hashes: hashes.clone() },
            KvEvent::Cleared,
        ];
        let good = sim::kv_publish::encode_batch(1.0, &events, 16, None);
        prop_assert!(decode_batch(&good).is_ok());
        let mut damaged = good.clone();
        for (at, byte) in &flips {
            let i = at.index(damaged.len());
            damaged[i] = *byte;
        }
        let truncated = &good[..cut.index(good.len())];
        let mut index = PreciseIndex::new(64);
        for bytes in [raw.as_slice(), damaged.as_slice(), truncated] {
            if let Ok(batch) = decode_batch(bytes) {
                for e in &batch.events {
                    if let Event::Stored(s) = e {
                        prop_assert!(s.block_size > 0 || s.tokens.is_empty());
                    }
                }
                let _ = index.apply(3, &batch.events);
                prop_assert!(index.blocks(3) <= 64, "the index is bounded");
            }
        }
    }
}
