//! Table-driven tests of every built-in plugin, run against both builds of the same crate:
//! the wasm component (through the host runtime) and the native library. Each case checks
//! the expected result (upstream's documented behaviour) and that the two builds agree bit
//! for bit.

use std::sync::Arc;

use active_request_scorer::ActiveRequestScorer;
use approx_prefix_cache_producer::PrefixIndexProducer;
use context_length_aware::ContextLengthAware;
use endpoint_attribute_filter::EndpointAttributeFilter;
use endpoint_attribute_scorer::EndpointAttributeScorer;
use epp_core::{
    CacheInfo, Candidates, Completion, Outcome, PickerPlugin, PluginCore, ProducerPlugin, Request, ScorerPlugin,
};
use epp_core::{FilterPlugin, PluginHandle};
use header_label_affinity_scorer::HeaderLabelAffinityScorer;
use inflight_load_producer::InflightLoadProducer;
use kv_cache_utilization_scorer::KvCacheUtilizationScorer;
use label_selector_filter::LabelSelectorFilter;
use llmd_plugin_sdk::EndpointInfo;
use llmd_plugin_sdk::columns::{
    INFLIGHT_REQUESTS, INFLIGHT_TOKENS, KV_EVENTS_BLOCK_TOKENS, KV_EVENTS_LIVE, KV_EVENTS_MATCHED, KV_EVENTS_TOTAL,
    PRECISE_PREFIX, PREFIX_BLOCK_TOKENS, PREFIX_MATCH_INTERVAL, PREFIX_MATCHED_BLOCKS, PREFIX_TOTAL_BLOCKS,
    REQUEST_UNCACHED_TOKENS, prefix_block_tokens, prefix_matched, prefix_total,
};
use load_aware_scorer::LoadAwareScorer;
use lora_affinity_scorer::LoraAffinityScorer;
use max_score_picker::MaxScorePicker;
use no_hit_lru_scorer::NoHitLruScorer;
use precise_prefix_cache_producer::PrecisePrefixProducer;
use prefix_cache_affinity_filter::PrefixCacheAffinityFilter;
use prefix_cache_scorer::PrefixCacheScorer;
use queue_scorer::QueueScorer;
use random_picker::RandomPicker;
use running_requests_size_scorer::RunningRequestsSizeScorer;
use session_affinity_filter::SessionAffinityFilter;
use session_affinity_scorer::SessionAffinityScorer;
use token_load_scorer::TokenLoadScorer;
use utilization_filter::UtilizationFilter;
use weighted_random_picker::WeightedRandomPicker;

use crate::common::*;

const NAN: f32 = f32::NAN;

/// Columns by name, for the plugins that read them.
type Named<'a> = Vec<(&'static str, &'a [f32])>;

/// The same plugin twice: native build and wasm component.
struct Twin<T: ?Sized> {
    native: Arc<T>,
    wasm: Arc<T>,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

impl<T: ?Sized + PluginCore> Twin<T> {
    fn pool_changed(&self, endpoints: &[EndpointInfo]) {
        self.native.pool_changed(1, endpoints).unwrap();
        self.wasm.pool_changed(1, endpoints).unwrap();
    }
    fn decided(&self, cycle: u64, endpoint: u32) -> Vec<(String, String)> {
        let a = self.native.decided(cycle, endpoint).unwrap();
        let b = self.wasm.decided(cycle, endpoint).unwrap();
        assert_eq!(a, b, "native vs wasm decided headers");
        a
    }
    fn first_chunk(&self, cycle: u64, endpoint: u32, now_ms: u64) {
        self.native.first_chunk(cycle, endpoint, now_ms).unwrap();
        self.wasm.first_chunk(cycle, endpoint, now_ms).unwrap();
    }
    fn finished(&self, cycle: u64, endpoint: u32) {
        self.ended(cycle, &Completion { endpoint, outcome: Outcome::Completed, status: 200, usage: None });
    }
    fn ended(&self, cycle: u64, c: &Completion) {
        self.native.finished(cycle, c).unwrap();
        self.wasm.finished(cycle, c).unwrap();
    }
    fn columns(&self, m: &Candidates, named: &[(&str, &[f32])]) -> Vec<f32> {
        assert_eq!(self.native.manifest(), self.wasm.manifest(), "native vs wasm manifest");
        columns_for(self.native.manifest(), m, named)
    }
}

impl Twin<dyn ScorerPlugin> {
    fn score(&self, cycle: u64, req: &Request, m: &Candidates, named: &[(&str, &[f32])]) -> Vec<f32> {
        let cols = self.columns(m, named);
        let a = self.native.score(&input(cycle, req, m, &cols)).expect("native score");
        let b = self.wasm.score(&input(cycle, req, m, &cols)).expect("wasm score");
        assert_eq!(bits(&a), bits(&b), "native {a:?} vs wasm {b:?}");
        for s in &a {
            assert!(s.is_finite() && (0.0..=1.0).contains(s), "score {s} out of [0,1] in {a:?}");
        }
        a
    }
}

impl Twin<dyn FilterPlugin> {
    fn filter(&self, cycle: u64, req: &Request, m: &Candidates, named: &[(&str, &[f32])]) -> Vec<u32> {
        let cols = self.columns(m, named);
        let a = self.native.filter(&input(cycle, req, m, &cols)).expect("native filter");
        let b = self.wasm.filter(&input(cycle, req, m, &cols)).expect("wasm filter");
        assert_eq!(a, b, "native vs wasm filter");
        a
    }
}

impl Twin<dyn PickerPlugin> {
    fn pick(&self, req: &Request, m: &Candidates, scores: &[f32]) -> Vec<u32> {
        let cols = self.columns(m, &[]);
        let a = self.native.pick(&input(1, req, m, &cols), scores).expect("native pick");
        let b = self.wasm.pick(&input(1, req, m, &cols), scores).expect("wasm pick");
        assert_eq!(a, b, "native vs wasm pick");
        a
    }
}

impl Twin<dyn ProducerPlugin> {
    /// The produced columns, by name.
    fn produce(&self, cycle: u64, req: &Request, m: &Candidates, named: &[(&str, &[f32])]) -> Vec<(String, Vec<f32>)> {
        let cols = self.columns(m, named);
        let a = self.native.produce(&input(cycle, req, m, &cols)).expect("native produce");
        let b = self.wasm.produce(&input(cycle, req, m, &cols)).expect("wasm produce");
        assert_eq!(bits(&a), bits(&b), "native {a:?} vs wasm {b:?}");
        let writes = &self.native.manifest().writes;
        assert_eq!(a.len(), writes.len() * m.len());
        writes.iter().enumerate().map(|(k, w)| (w.clone(), a[k * m.len()..(k + 1) * m.len()].to_vec())).collect()
    }
}

fn column(cols: &[(String, Vec<f32>)], name: &str) -> Vec<f32> {
    cols.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no column {name}"))
}

fn scorer<T: llmd_plugin_sdk::Scorer + Send + 'static>(type_name: &str, params: &str) -> Twin<dyn ScorerPlugin> {
    Twin { native: native::<T>(type_name, params), wasm: wasm_scorer(type_name, params) }
}

fn picker<T: llmd_plugin_sdk::Picker + Send + 'static>(type_name: &str, params: &str) -> Twin<dyn PickerPlugin> {
    Twin { native: native::<T>(type_name, params), wasm: wasm_picker(type_name, params) }
}

fn filter<T: llmd_plugin_sdk::Filter + Send + 'static>(type_name: &str, params: &str) -> Twin<dyn FilterPlugin> {
    let wasm = match wasm(type_name, params) {
        PluginHandle::Filter(f) => f,
        other => panic!("{type_name} is {other:?}"),
    };
    Twin { native: native::<T>(type_name, params), wasm }
}

fn producer<T: llmd_plugin_sdk::Producer + Send + 'static>(type_name: &str, params: &str) -> Twin<dyn ProducerPlugin> {
    Twin { native: native::<T>(type_name, params), wasm: wasm_producer(type_name, params) }
}

fn prefix_producer(params: &str) -> Twin<dyn ProducerPlugin> {
    producer::<PrefixIndexProducer>("approx-prefix-cache-producer", params)
}

fn approx(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

/// Every candidate with `total` prefix blocks of 64 tokens, `matched` of them held.
fn prefix<'a>(matched: &'a [f32], total: &'a [f32]) -> Named<'a> {
    vec![
        (PREFIX_MATCHED_BLOCKS, matched),
        (PREFIX_TOTAL_BLOCKS, total),
        (PREFIX_BLOCK_TOKENS, &[64.0; 8][..matched.len()]),
    ]
}

/// Loading a built-in type with `params` fails, naming `field`.
fn rejected(type_name: &str, params: &str, field: &str) {
    let bytes = epp::wasm::embedded::find(type_name).unwrap();
    let err = runtime()
        .load("p", bytes, params, Default::default(), Default::default())
        .err()
        .unwrap_or_else(|| panic!("{type_name}: {params} accepted"));
    let text = err.to_string();
    assert!(text.contains("configuration") && text.contains(field), "{type_name} {params}: {text}");
}

/// A parameter of the wrong type is named in the load error, as an unknown one is.
#[test]
fn a_parameter_of_the_wrong_type_is_named_at_load() {
    for (type_name, params, field) in [
        ("inflight-load-producer", r#"{"outputRatio": 1.5, "kvPressureThreshold": "half"}"#, "kvPressureThreshold"),
        ("token-load-scorer", r#"{"queueThresholdTokens": "many"}"#, "queueThresholdTokens"),
        ("prefix-cache-affinity-filter", r#"{"affinityThreshold": [0.8]}"#, "affinityThreshold"),
        ("active-request-scorer", r#"{"maxBusyScore": true}"#, "maxBusyScore"),
        (
            "session-affinity-scorer",
            r#"{"sessionIdConfig": {"evictionTtlSeconds": "1h"}}"#,
            "sessionIdConfig: invalid type",
        ),
        ("max-score-picker", r#"{"maxNumOfEndpoints": -2}"#, "maxNumOfEndpoints"),
    ] {
        rejected(type_name, params, field);
    }
}

#[test]
fn kv_cache_utilization_scorer_table() {
    let s = scorer::<KvCacheUtilizationScorer>("kv-cache-utilization-scorer", "{}");
    let req = request("r", "hello");
    let cases: &[(&[f32], &[f32])] = &[
        (&[0.0, 0.25, 1.0], &[1.0, 0.75, 0.0]),
        (&[NAN, 0.5], &[0.0, 0.5]),
        (&[1.5, -0.5, f32::INFINITY], &[0.0, 1.0, 0.0]),
        (&[0.3], &[0.7]),
        (&[], &[]),
    ];
    for (kv, want) in cases {
        let m = metrics(&kv.iter().enumerate().map(|(i, &k)| (i as u32, 0.0, 0.0, k)).collect::<Vec<_>>());
        let got = s.score(1, &req, &m, &[]);
        assert!(approx(&got, want), "kv {kv:?}: got {got:?}, want {want:?}");
    }
    rejected("kv-cache-utilization-scorer", r#"{"bogus": 1}"#, "bogus");
}

#[test]
fn queue_scorer_table() {
    let s = scorer::<QueueScorer>("queue-scorer", "{}");
    let req = request("r", "hello");
    let cases: &[(&[f32], &[f32])] = &[
        (&[0.0, 5.0, 10.0], &[1.0, 0.5, 0.0]),
        (&[3.0, 3.0], &[1.0, 1.0]),
        (&[NAN, 2.0, 4.0], &[0.0, 1.0, 0.0]),
        (&[NAN, NAN], &[0.0, 0.0]),
        (&[7.0], &[1.0]),
        (&[], &[]),
    ];
    for (q, want) in cases {
        let m = metrics(&q.iter().enumerate().map(|(i, &w)| (i as u32, w, 0.0, 0.0)).collect::<Vec<_>>());
        let got = s.score(1, &req, &m, &[]);
        assert!(approx(&got, want), "queue {q:?}: got {got:?}, want {want:?}");
    }
}

#[test]
fn running_requests_size_scorer_table() {
    let s = scorer::<RunningRequestsSizeScorer>("running-requests-size-scorer", "{}");
    let req = request("r", "hello");
    // (max − r)/(max − min); all equal → 1; unknown → 0 without moving the others.
    let cases: &[(&[f32], &[f32])] = &[
        (&[0.0, 4.0, 8.0], &[1.0, 0.5, 0.0]),
        (&[10.0, 30.0], &[1.0, 0.0]),
        (&[6.0, 6.0, 6.0], &[1.0, 1.0, 1.0]),
        (&[NAN, 1.0, 3.0], &[0.0, 1.0, 0.0]),
        (&[2.0], &[1.0]),
        (&[], &[]),
    ];
    for (running, want) in cases {
        // The waiting queue is the opposite way round: the scorer must not read it.
        let m =
            metrics(&running.iter().enumerate().map(|(i, &r)| (i as u32, 10.0 - i as f32, r, 0.0)).collect::<Vec<_>>());
        let got = s.score(1, &req, &m, &[]);
        assert!(approx(&got, want), "running {running:?}: got {got:?}, want {want:?}");
    }
    rejected("running-requests-size-scorer", r#"{"threshold": 3}"#, "threshold");
}

#[test]
fn load_aware_scorer_table() {
    let req = request("r", "hello");
    let score = |params: &str, waiting: &[f32]| {
        let s = scorer::<LoadAwareScorer>("load-aware-scorer", params);
        let m = metrics(&waiting.iter().enumerate().map(|(i, &w)| (i as u32, w, 0.0, 0.0)).collect::<Vec<_>>());
        s.score(1, &req, &m, &[])
    };
    // Empty queue 0.5; threshold (128) or more 0; linear between; unknown 0.
    let got = score("{}", &[0.0, 64.0, 128.0, 500.0, NAN]);
    assert!(approx(&got, &[0.5, 0.25, 0.0, 0.0, 0.0]), "{got:?}");
    let got = score(r#"{"threshold": 10}"#, &[0.0, 1.0, 5.0, 10.0]);
    assert!(approx(&got, &[0.5, 0.45, 0.25, 0.0]), "{got:?}");
    // As upstream, a threshold of 0 or below means the default.
    for params in [r#"{"threshold": 0}"#, r#"{"threshold": -4}"#] {
        let got = score(params, &[64.0]);
        assert!(approx(&got, &[0.25]), "{params}: {got:?}");
    }
    rejected("load-aware-scorer", r#"{"threshold": 2.5}"#, "threshold");
    rejected("load-aware-scorer", r#"{"queueThreshold": 10}"#, "queueThreshold");
}

#[test]
fn utilization_filter_table() {
    let req = request("r", "");
    // (waiting, running, kv usage) per endpoint; endpoint 3's metrics are unknown.
    let m = metrics(&[(0, 0.0, 10.0, 0.2), (1, 2.0, 50.0, 0.5), (2, 0.0, 30.0, 0.9), (3, NAN, NAN, NAN)]);
    let active: &[f32] = &[1.0, 0.0, 7.0, 3.0];
    let cases: &[(&str, &[u32])] = &[
        (r#"{"conditions": [{"metric": "running-requests", "maxValue": 40}]}"#, &[0, 2, 3]),
        (r#"{"conditions": [{"metric": "waiting-queue", "maxValue": 0}]}"#, &[0, 2, 3]),
        (r#"{"conditions": [{"metric": "kv-cache-utilization", "maxValue": 0.8}]}"#, &[0, 1, 3]),
        (r#"{"conditions": [{"metric": "active-requests", "maxValue": 3}]}"#, &[0, 1, 3]),
        // Every condition must hold: any one exceeded drops the endpoint.
        (
            r#"{"conditions": [{"metric": "running-requests", "maxValue": 40}, {"metric": "kv-cache-utilization", "maxValue": 0.8}]}"#,
            &[0, 3],
        ),
        (
            r#"{"conditions": [{"metric": "waiting-queue", "maxValue": 0}, {"metric": "waiting-queue", "maxValue": 5}]}"#,
            &[0, 2, 3],
        ),
        // Nobody left: empty, or everyone with fallbackOnEmpty.
        (
            r#"{"conditions": [{"metric": "active-requests", "maxValue": 0}, {"metric": "running-requests", "maxValue": 5}]}"#,
            &[],
        ),
        (
            r#"{"conditions": [{"metric": "active-requests", "maxValue": 0}, {"metric": "running-requests", "maxValue": 5}], "fallbackOnEmpty": true}"#,
            &[0, 1, 2, 3],
        ),
    ];
    for (params, want) in cases {
        let f = filter::<UtilizationFilter>("utilization-filter", params);
        // It asks only for the columns its conditions name.
        let reads = &f.native.manifest().reads;
        assert_eq!(reads.iter().any(|c| c == INFLIGHT_REQUESTS), params.contains("active-requests"), "{params}");
        assert_eq!(f.filter(1, &req, &m, &[(INFLIGHT_REQUESTS, active)]), *want, "{params}");
    }
    for (params, field) in [
        (r#"{}"#, "conditions"),
        (r#"{"conditions": []}"#, "conditions"),
        (r#"{"conditions": [{"metric": "gpu-temperature", "maxValue": 80}]}"#, "conditions[0].metric"),
        (r#"{"conditions": [{"metric": "waiting-queue"}]}"#, "conditions[0].maxValue is required"),
        (
            r#"{"conditions": [{"metric": "waiting-queue", "maxValue": 1}, {"metric": "running-requests", "maxValue": -1}]}"#,
            "conditions[1].maxValue",
        ),
        (r#"{"conditions": [{"metric": "kv-cache-utilization", "maxValue": 80}]}"#, "at most 1"),
        (r#"{"conditions": [{"metric": "waiting-queue", "max": 1}]}"#, "max"),
    ] {
        rejected("utilization-filter", params, field);
    }
}

#[test]
fn prefix_cache_scorer_table() {
    let s = scorer::<PrefixCacheScorer>("prefix-cache-scorer", "{}");
    let req = request("r", "hello");
    let m = idle(3);
    let cases: Vec<(Named, Vec<f32>)> = vec![
        (prefix(&[0.0, 2.0, 4.0], &[4.0, 4.0, 4.0]), vec![0.0, 0.5, 1.0]),
        (prefix(&[0.0, 0.0, 0.0], &[0.0, 0.0, 0.0]), vec![0.0, 0.0, 0.0]),
        (prefix(&[NAN, 9.0, 1.0], &[4.0, 4.0, 4.0]), vec![0.0, 1.0, 0.25]),
        (vec![], vec![0.0, 0.0, 0.0]),
    ];
    for (cols, want) in cases {
        let got = s.score(1, &req, &m, &cols);
        assert!(approx(&got, &want), "cols {cols:?}: got {got:?}, want {want:?}");
    }
    assert!(s.score(1, &req, &idle(0), &[]).is_empty());
    // Upstream's match-length term: w × min(1, matched tokens / scale)² + (1 − w) × ratio.
    let weighted = scorer::<PrefixCacheScorer>(
        "prefix-cache-scorer",
        r#"{"matchLengthWeight": 0.5, "matchLengthScaleTokens": 512}"#,
    );
    // 4 of 8 blocks of 64 tokens: ratio 0.5, length (256/512)² = 0.25 → 0.375; all 8: 1.0.
    let got = weighted.score(1, &req, &idle(2), &prefix(&[4.0, 8.0], &[8.0, 8.0]));
    assert!(approx(&got, &[0.375, 1.0]), "{got:?}");
    rejected("prefix-cache-scorer", r#"{"matchLengthWeight": 2}"#, "matchLengthWeight");
    // Older configs put the index's parameters here; they are accepted (the producer uses them).
    scorer::<PrefixCacheScorer>("prefix-cache-scorer", r#"{"lruCapacityPerServer": 192, "blockSize": 64}"#);
}

#[test]
fn lora_affinity_scorer_table() {
    let s = scorer::<LoraAffinityScorer>("lora-affinity-scorer", "{}");
    let mut eps = pool(5);
    eps[0].running_adapters = vec!["sql".into()];
    eps[1].waiting_adapters = vec!["sql".into()];
    eps[2].max_lora = Some(2);
    eps[2].running_adapters = vec!["chat".into()];
    eps[3].max_lora = Some(1);
    eps[3].running_adapters = vec!["chat".into()];
    // eps[4]: no LoRA information at all.
    s.pool_changed(&eps);
    let mut req = request("r", "hello");
    req.model = "sql".into();
    let mut m = idle(5);
    m.ids.push(99); // unknown to the pool
    m.waiting.push(0.0);
    m.running.push(0.0);
    m.kv_usage.push(0.0);
    m.age_ms.push(0.0);
    // Upstream's precedence: running 1.0, room for another adapter 0.8, waiting 0.6.
    assert_eq!(s.score(1, &req, &m, &[]), vec![1.0, 0.6, 0.8, 0.0, 0.0, 0.0]);
    // An adapter both running and waiting holds one slot, as upstream counts it: room left.
    eps[3].max_lora = Some(2);
    eps[3].waiting_adapters = vec!["chat".into()];
    s.pool_changed(&eps);
    assert_eq!(s.score(2, &req, &m, &[]), vec![1.0, 0.6, 0.8, 0.8, 0.0, 0.0]);
    // This EPP's draining rule: running the adapter where another adapter waits for a slot
    // (none free) scores 0.7, below room, so the waiting one gets its slot; the adapter's own
    // requests waiting beside its running ones hold no second slot and starve nobody.
    eps[2].max_lora = Some(1);
    eps[2].running_adapters = vec!["sql".into()];
    eps[2].waiting_adapters = vec!["chat".into()];
    eps[4].max_lora = Some(1);
    eps[4].running_adapters = vec!["sql".into()];
    eps[4].waiting_adapters = vec!["sql".into()];
    s.pool_changed(&eps);
    assert_eq!(s.score(3, &req, &m, &[]), vec![1.0, 0.6, 0.7, 0.8, 1.0, 0.0]);
    // The waiting adapter itself still reads "waiting" there.
    req.model = "chat".into();
    assert_eq!(s.score(4, &req, &m, &[]), vec![0.0, 0.0, 0.6, 1.0, 0.0, 0.0]);
}

#[test]
fn no_hit_lru_scorer_spreads_cold_requests() {
    let s = scorer::<NoHitLruScorer>("no-hit-lru-scorer", "{}");
    s.pool_changed(&pool(3));
    let m = idle(3);
    let cold = prefix(&[0.0, 0.0, 0.0], &[4.0, 4.0, 4.0]);
    // Nobody used yet: candidate order decides.
    assert!(approx(&s.score(1, &request("a", ""), &m, &cold), &[1.0, 0.5, 0.0]));
    s.decided(1, 1);
    // Endpoint 1 was used: never-used first (0, 2), then 1.
    assert!(approx(&s.score(2, &request("b", ""), &m, &cold), &[1.0, 0.0, 0.5]));
    s.decided(2, 0);
    // Never used: 2; then 1 (older), then 0 (newest).
    assert!(approx(&s.score(3, &request("c", ""), &m, &cold), &[0.0, 0.5, 1.0]));
    // A warm request is neutral, and its pick does not touch the LRU.
    let warm = prefix(&[0.0, 3.0, 0.0], &[4.0, 4.0, 4.0]);
    assert_eq!(s.score(4, &request("d", ""), &m, &warm), vec![0.5, 0.5, 0.5]);
    s.decided(4, 2);
    assert!(approx(&s.score(5, &request("e", ""), &m, &cold), &[0.0, 0.5, 1.0]));
    // One candidate always scores 1; no candidates, nothing.
    assert_eq!(s.score(6, &request("f", ""), &idle(1), &prefix(&[0.0], &[1.0])), vec![1.0]);
    assert!(s.score(7, &request("g", ""), &idle(0), &[]).is_empty());
    // Without the producer's columns (NaN) a request counts as cold.
    assert!(approx(&s.score(8, &request("h", ""), &m, &[]), &[0.0, 0.5, 1.0]));
}

#[test]
fn prefix_producer_matches_consecutive_blocks() {
    let p = prefix_producer(r#"{"autoTune": false}"#);
    p.pool_changed(&pool(3));
    let m = idle(3);
    let long = blocks_prompt('a', 8);
    // Cold index: nothing matched, 8 blocks of 64 tokens.
    let cols = p.produce(1, &request("r1", &long), &m, &[]);
    assert_eq!(column(&cols, PREFIX_MATCHED_BLOCKS), vec![0.0, 0.0, 0.0]);
    assert_eq!(column(&cols, PREFIX_TOTAL_BLOCKS), vec![8.0, 8.0, 8.0]);
    assert_eq!(column(&cols, PREFIX_BLOCK_TOKENS), vec![64.0, 64.0, 64.0]);
    p.decided(1, 2);
    // Same prompt: endpoint 2 holds all of it.
    assert_eq!(column(&p.produce(2, &request("r2", &long), &m, &[]), PREFIX_MATCHED_BLOCKS), vec![0.0, 0.0, 8.0]);
    // First half shared, then different: 4 blocks matched.
    let half = format!("{}{}", &long[..4 * 256], blocks_prompt('b', 4));
    assert_eq!(column(&p.produce(3, &request("r3", &half), &m, &[]), PREFIX_MATCHED_BLOCKS), vec![0.0, 0.0, 4.0]);
    // The last, partial block counts (as upstream); an empty prompt has no blocks.
    assert_eq!(column(&p.produce(4, &request("r4", &long[..300]), &m, &[]), PREFIX_TOTAL_BLOCKS), vec![2.0; 3]);
    assert_eq!(column(&p.produce(5, &request("r5", ""), &m, &[]), PREFIX_TOTAL_BLOCKS), vec![0.0; 3]);
    // Another model or cache salt shares nothing.
    let mut other_model = request("r6", &long);
    other_model.model = "other".into();
    assert_eq!(column(&p.produce(6, &other_model, &m, &[]), PREFIX_MATCHED_BLOCKS), vec![0.0; 3]);
    let mut salted = request("r7", &long);
    salted.cache_salt = Some("tenant-a".into());
    assert_eq!(column(&p.produce(7, &salted, &m, &[]), PREFIX_MATCHED_BLOCKS), vec![0.0; 3]);
    // Endpoint 2 leaves the pool: its entries are forgotten.
    p.pool_changed(&pool(2));
    assert_eq!(column(&p.produce(8, &request("r8", &long), &m, &[]), PREFIX_MATCHED_BLOCKS), vec![0.0; 3]);
}

/// How often a prefix is asked for, per candidate: requests routed between two uses of the
/// deepest block it holds, lately.
#[test]
fn prefix_producer_measures_how_often_a_prefix_is_asked_for() {
    let p = prefix_producer(r#"{"autoTune": false}"#);
    p.pool_changed(&pool(4));
    let m = idle(4);
    let system = blocks_prompt('s', 4);
    let history = blocks_prompt('h', 4);
    let mut cycle = 1;
    let mut route = |prompt: &str, endpoint: u32| {
        p.produce(cycle, &request("r", prompt), &m, &[]);
        p.decided(cycle, endpoint);
        cycle += 1;
    };
    // One conversation routed once to endpoint 3, then a system prompt (to endpoint 0) a
    // few times in quick succession: too few uses yet to call it hot on most pools.
    route(&history, 3);
    for k in 0..4 {
        route(&format!("{system}{k:0>256}"), 0);
    }
    let asked = |p: &Twin<dyn ProducerPlugin>, prompt: &str| {
        column(&p.produce(10_000, &request("r", &format!("{prompt}{:z>256}", "")), &m, &[]), PREFIX_MATCH_INTERVAL)
    };
    // Judged as if unused for 64 requests before its first use: (5 + 64) / 4, about 17,
    // not yet hot for one holder among 16 workers (that needs fewer than 16).
    let early = asked(&p, &system)[0];
    assert!((16.0..18.0).contains(&early), "4 uses in 5 requests: {early}");
    // Four more in a row: (9 + 64) / 8, about 9: hot for one holder among 16, as a prompt
    // every request asks for should be soon.
    for k in 4..8 {
        route(&format!("{system}{k:0>256}"), 0);
    }
    let soon = asked(&p, &system)[0];
    assert!((8.0..10.0).contains(&soon), "8 uses in 9 requests: {soon}");
    // Then every other request for 600 requests, between unique prompts (to endpoint 1).
    for k in 0..300 {
        route(&format!("{system}{k:0>256}"), 0);
        route(&format!("unique-{k:0>249}"), 1);
    }
    let interval = asked(&p, &system);
    assert!((interval[0] - 2.0).abs() < 0.2, "{interval:?}");
    assert!(interval[1..].iter().all(|v| v.is_infinite()), "no match: {interval:?}");
    // The conversation, asked for once 600 requests ago: cold.
    let conversation = asked(&p, &history)[3];
    assert!(conversation > 500.0, "{conversation}");
}

/// A prefix many endpoints hold (a popular system prompt on a large pool): each candidate
/// still gets its own depth, whatever the order of the candidates.
#[test]
fn prefix_producer_matches_a_prefix_many_endpoints_hold() {
    let p = prefix_producer(r#"{"autoTune": false}"#);
    p.pool_changed(&pool(40));
    let system = blocks_prompt('s', 4);
    // Endpoint e holds the system prompt followed by (e % 3) blocks of a conversation.
    let conversation = blocks_prompt('c', 2);
    for e in 0..40u32 {
        let own = format!("{system}{}", &conversation[..(e as usize % 3) * 256]);
        p.produce(u64::from(e) + 1, &request("w", &own), &idle(40), &[]);
        p.decided(u64::from(e) + 1, e);
    }
    let mut m = idle(40);
    m.ids.reverse();
    let cols = p.produce(100, &request("r", &format!("{system}{conversation}")), &m, &[]);
    let expected: Vec<f32> = m.ids.iter().map(|&e| (4 + e % 3) as f32).collect();
    assert_eq!(column(&cols, PREFIX_MATCHED_BLOCKS), expected);
}

#[test]
fn prefix_producer_limits_blocks_and_evicts() {
    let p = prefix_producer(
        r#"{"autoTune": false, "maxPrefixTokensToMatch": 0, "maxPrefixBlocksToMatch": 3, "lruCapacityPerServer": 4}"#,
    );
    p.pool_changed(&pool(2));
    let m = idle(2);
    let a = blocks_prompt('a', 10);
    assert_eq!(column(&p.produce(1, &request("r1", &a), &m, &[]), PREFIX_TOTAL_BLOCKS), vec![3.0, 3.0]);
    p.decided(1, 0);
    assert_eq!(column(&p.produce(2, &request("r2", &a), &m, &[]), PREFIX_MATCHED_BLOCKS), vec![3.0, 0.0]);
    // 3 new blocks on endpoint 0 push out 2 of the 3 old ones (capacity 4), tails first:
    // the head of `a` stays matchable.
    let b = blocks_prompt('b', 3);
    p.produce(3, &request("r3", &b), &m, &[]);
    p.decided(3, 0);
    assert_eq!(column(&p.produce(4, &request("r4", &a), &m, &[]), PREFIX_MATCHED_BLOCKS), vec![1.0, 0.0]);
    assert_eq!(column(&p.produce(5, &request("r5", &b), &m, &[]), PREFIX_MATCHED_BLOCKS), vec![3.0, 0.0]);
}

/// Fills the embedded prefix producer (autoTune off) in a sandbox of `mib` MiB the way
/// traffic does: 520 rounds of a new 16 KB prompt (65 blocks) routed to each of 20
/// endpoints, at upstream's default capacity of 31 250 blocks each (481 prompts fill one,
/// the others evict). Every call must succeed, and every endpoint must still match its
/// latest prompt in full. Returns the blocks each endpoint holds.
fn fill_prefix_index(mib: usize) -> Vec<f32> {
    let sandbox = epp::wasm::Sandbox { memory_bytes: mib << 20, ..Default::default() };
    let bytes = epp::wasm::embedded::find("approx-prefix-cache-producer").unwrap();
    let p = match runtime().load("p", bytes, r#"{"autoTune": false}"#, sandbox, Default::default()).unwrap() {
        PluginHandle::Producer(p) => p,
        other => panic!("{other:?}"),
    };
    let endpoints = 20u32;
    let n = endpoints as usize;
    p.pool_changed(1, &pool(endpoints)).unwrap();
    let candidates = idle(endpoints);
    let tail = "x".repeat(16 << 10);
    let prompt = |k: u64| request(&format!("r{k}"), &format!("[{k:016x}]{tail}"));
    let mut cycle = 0u64;
    for _ in 0..520 {
        for e in 0..endpoints {
            cycle += 1;
            let input = epp_core::CallInput { cycle, request: &prompt(cycle), ids: &candidates.ids, columns: &[] };
            p.produce(&input).unwrap_or_else(|err| panic!("cycle {cycle}: {err}"));
            p.decided(cycle, e).unwrap_or_else(|err| panic!("cycle {cycle}: {err}"));
        }
    }
    let mut held = Vec::new();
    for e in 0..endpoints {
        let last = cycle - u64::from(endpoints - 1 - e);
        let input =
            epp_core::CallInput { cycle: cycle + 1, request: &prompt(last), ids: &candidates.ids, columns: &[] };
        let out = p.produce(&input).unwrap();
        let want: Vec<f32> = (0..endpoints).map(|i| if i == e { 65.0 } else { 0.0 }).collect();
        assert_eq!(out[..n].to_vec(), want, "endpoint {e}'s latest prompt");
        held = out[3 * n..4 * n].to_vec();
    }
    held
}

/// A full index fits its sandbox: 20 endpoints at upstream's default capacity (625 000
/// pairs) in 64 MiB, kept full while the oldest blocks are evicted. (An index of ~150
/// bytes a pair ran out of the sandbox — and a map grown in one call past its deadline —
/// and its instance was rebuilt empty.)
#[test]
fn a_full_prefix_index_fits_its_sandbox() {
    assert_eq!(fill_prefix_index(64), vec![31_250.0; 20], "every endpoint holds its capacity");
}

/// An index larger than its sandbox keeps serving: the same index needs about 33 MiB; in
/// 16 MiB the sandbox refuses memory, and the index keeps what fits, shared evenly, with
/// every endpoint's latest prompt. (Before memory was refused rather than trapped, the
/// first refusal failed the call and the instance was rebuilt with an empty index, again
/// every time it refilled.)
#[test]
fn a_prefix_index_larger_than_its_sandbox_keeps_what_fits() {
    let held = fill_prefix_index(16);
    let total: f32 = held.iter().sum();
    assert!(total < 20.0 * 31_250.0 * 0.8, "the index should have been refused memory (it holds {total} pairs)");
    assert!(total > 20.0 * 65.0 * 50.0, "every endpoint keeps 50 prompts or more (the index holds {total} pairs)");
    let (least, most) = held.iter().fold((f32::MAX, 0.0f32), |(l, m), &h| (l.min(h), m.max(h)));
    assert!(most - least <= 70.0, "endpoints of equal capacity hold equal shares: {held:?}");
}

#[test]
fn prefix_producer_auto_tunes_each_endpoint_to_its_cache() {
    let p = prefix_producer("{}");
    // Endpoint 0 holds 4 × 16-token blocks = one 64-token index block; endpoint 1 reports
    // nothing (the configured capacity applies); endpoint 2 holds 64 blocks = 16 index blocks.
    let mut eps = pool(3);
    eps[0].cache = Some(CacheInfo { block_size: 16, num_gpu_blocks: 4 });
    eps[2].cache = Some(CacheInfo { block_size: 16, num_gpu_blocks: 64 });
    p.pool_changed(&eps);
    let m = idle(3);
    let a = blocks_prompt('a', 4);
    for (cycle, endpoint) in [(1, 0), (2, 1), (3, 2)] {
        p.produce(cycle, &request("r", &a), &m, &[]);
        p.decided(cycle, endpoint);
    }
    // Endpoint 0 kept only the first block (heads are forgotten last); 1 and 2 hold all four.
    assert_eq!(column(&p.produce(4, &request("r", &a), &m, &[]), PREFIX_MATCHED_BLOCKS), vec![1.0, 4.0, 4.0]);
    // Endpoint 2 restarts with a smaller cache (2 × 64 tokens, 2.5 with the slack): the
    // index shrinks at once to its two most recent blocks, which are the head.
    eps[2].cache = Some(CacheInfo { block_size: 16, num_gpu_blocks: 8 });
    p.pool_changed(&eps);
    assert_eq!(column(&p.produce(5, &request("r", &a), &m, &[]), PREFIX_MATCHED_BLOCKS), vec![1.0, 4.0, 2.0]);
    // Zero or missing geometry falls back to the configured capacity.
    eps[0].cache = Some(CacheInfo { block_size: 16, num_gpu_blocks: 0 });
    p.pool_changed(&eps);
    for endpoint in [0, 2] {
        p.produce(6 + u64::from(endpoint), &request("r", &a), &m, &[]);
        p.decided(6 + u64::from(endpoint), endpoint);
    }
    assert_eq!(column(&p.produce(9, &request("r", &a), &m, &[]), PREFIX_MATCHED_BLOCKS), vec![4.0, 4.0, 2.0]);
}

#[test]
fn prefix_producer_rejects_bad_parameters() {
    let cases = [
        (r#"{"autoTune": false, "blockSizeTokens": 0}"#, "blockSizeTokens"),
        (r#"{"lruCapacityPerServer": -1}"#, "lruCapacityPerServer"),
        (r#"{"maxPrefixTokensToMatch": -5}"#, "maxPrefixTokensToMatch"),
        (r#"{"bogus": 1}"#, "bogus"),
        ("[1,2]", "object"),
    ];
    for (params, field) in cases {
        rejected("approx-prefix-cache-producer", params, field);
    }
}

/// What the engines' events say, per candidate: matched and total blocks of 16 tokens,
/// and whether events flow.
fn engine_says<'a>(matched: &'a [f32], total: &'a [f32], live: &'a [f32]) -> Named<'a> {
    vec![
        (KV_EVENTS_MATCHED, matched),
        (KV_EVENTS_TOTAL, total),
        (KV_EVENTS_BLOCK_TOKENS, &[16.0; 8][..matched.len()]),
        (KV_EVENTS_LIVE, live),
    ]
}

#[test]
fn precise_producer_seeds_speculative_entries_for_their_ttl() {
    let long = blocks_prompt('a', 8);
    let at = |id: &str, now_ms: u64| Request { now_ms, ..request(id, &long) };
    let m = idle(3);
    let (matched, total, tokens) =
        (prefix_matched(PRECISE_PREFIX), prefix_total(PRECISE_PREFIX), prefix_block_tokens(PRECISE_PREFIX));
    // Events flow from endpoints 1 and 2 and say nothing is stored yet (they lag the
    // routing decision); endpoint 1's engine holds 3 of the 4 blocks of its own size.
    let lagging = engine_says(&[0.0, 3.0, 0.0], &[4.0, 4.0, 4.0], &[0.0, 1.0, 1.0]);

    // Off (upstream's default): an endpoint with events gets the engine's word only.
    let off = producer::<PrecisePrefixProducer>("precise-prefix-cache-producer", r#"{"autoTune": false}"#);
    off.pool_changed(&pool(3));
    off.produce(1, &at("r1", 1_000), &m, &lagging);
    off.decided(1, 2);
    let cols = off.produce(2, &at("r2", 1_100), &m, &lagging);
    assert_eq!(column(&cols, &matched), vec![0.0, 3.0, 0.0]);

    // On, 500 ms: the routed request's blocks count for endpoint 2 until the TTL is over.
    let on = producer::<PrecisePrefixProducer>(
        "precise-prefix-cache-producer",
        r#"{"autoTune": false, "speculativeIndexing": true, "speculativeTTL": "500ms"}"#,
    );
    on.pool_changed(&pool(3));
    on.produce(1, &at("r1", 1_000), &m, &lagging);
    on.decided(1, 2);
    let cols = on.produce(2, &at("r2", 1_400), &m, &lagging);
    // Endpoint 2: all 8 seeded blocks of 64 tokens; endpoint 1: its engine's 3 of 4 (a
    // larger share than nothing seeded); endpoint 0 (no events): the approximate index,
    // which never saw it chosen.
    assert_eq!(column(&cols, &matched), vec![0.0, 3.0, 8.0]);
    assert_eq!(column(&cols, &total), vec![8.0, 4.0, 8.0]);
    assert_eq!(column(&cols, &tokens), vec![64.0, 16.0, 64.0]);
    // Past the TTL only the engine's word counts.
    let cols = on.produce(3, &at("r3", 1_501), &m, &lagging);
    assert_eq!(column(&cols, &matched), vec![0.0, 3.0, 0.0]);
    // A decision renews the entries; an endpoint that leaves the pool loses them.
    on.decided(3, 2);
    assert_eq!(column(&on.produce(4, &at("r4", 1_900), &m, &lagging), &matched), vec![0.0, 3.0, 8.0]);
    on.pool_changed(&pool(2));
    assert_eq!(column(&on.produce(5, &at("r5", 1_950), &m, &lagging), &matched), vec![0.0, 3.0, 0.0]);
    // Where events do not flow, the approximate index (no TTL) answers.
    on.decided(5, 0);
    assert_eq!(column(&on.produce(6, &at("r6", 9_000), &m, &lagging), &matched), vec![8.0, 3.0, 0.0]);
}

#[test]
fn precise_producer_rejects_bad_parameters() {
    for (params, field) in [
        (r#"{"speculativeTTL": "soon"}"#, "speculativeTTL"),
        (r#"{"speculativeTTL": "0s"}"#, "speculativeTTL"),
        (r#"{"speculativeTTL": 5}"#, "speculativeTTL"),
        (r#"{"speculativeIndexing": "yes"}"#, "speculativeIndexing"),
        (r#"{"lruCapacityPerServer": -1}"#, "lruCapacityPerServer"),
        (r#"{"bogus": 1}"#, "bogus"),
    ] {
        rejected("precise-prefix-cache-producer", params, field);
    }
}

#[test]
fn inflight_load_producer_counts_until_released() {
    let p = producer::<InflightLoadProducer>("inflight-load-producer", "{}");
    p.pool_changed(&pool(2));
    let m = idle(2);
    let req = request("r", &"x".repeat(4000)); // 1000 tokens
    // Candidate 0 holds 10 of 16 blocks of 64 tokens: (16−10)×64 − (1024 − 1000) = 360 uncached.
    let cols = p.produce(1, &req, &m, &prefix(&[10.0, 0.0], &[16.0, 16.0]));
    assert_eq!(column(&cols, REQUEST_UNCACHED_TOKENS), vec![360.0, 1000.0]);
    assert_eq!(column(&cols, INFLIGHT_TOKENS), vec![0.0, 0.0]);
    p.decided(1, 0);
    let cols = p.produce(2, &req, &m, &[]);
    // Unknown prefix: the whole prompt would be new everywhere.
    assert_eq!(column(&cols, REQUEST_UNCACHED_TOKENS), vec![1000.0, 1000.0]);
    assert_eq!(column(&cols, INFLIGHT_TOKENS), vec![360.0, 0.0]);
    assert_eq!(column(&cols, INFLIGHT_REQUESTS), vec![1.0, 0.0]);
    p.decided(2, 1);
    // The first chunk releases the prompt tokens; the end releases the request.
    p.first_chunk(1, 0, 0);
    let cols = p.produce(3, &req, &m, &[]);
    assert_eq!(column(&cols, INFLIGHT_TOKENS), vec![0.0, 1000.0]);
    assert_eq!(column(&cols, INFLIGHT_REQUESTS), vec![1.0, 1.0]);
    p.finished(1, 0);
    p.finished(2, 1); // ended before its first chunk (cancelled): everything is released
    p.finished(2, 1); // a second end is ignored
    let cols = p.produce(4, &req, &m, &[]);
    assert_eq!(column(&cols, INFLIGHT_TOKENS), vec![0.0, 0.0]);
    assert_eq!(column(&cols, INFLIGHT_REQUESTS), vec![0.0, 0.0]);
    // With an output estimate (1.5 × prompt, capped by max_tokens), it stays until the end.
    let q = producer::<InflightLoadProducer>("inflight-load-producer", r#"{"addEstimatedOutputTokens": true}"#);
    q.pool_changed(&pool(1));
    let mut capped = request("r", &"x".repeat(400)); // 100 tokens → 150 estimated
    capped.max_tokens = Some(20);
    let cols = q.produce(1, &capped, &idle(1), &[]);
    assert_eq!(column(&cols, REQUEST_UNCACHED_TOKENS), vec![120.0]);
    q.decided(1, 0);
    q.first_chunk(1, 0, 0);
    assert_eq!(column(&q.produce(2, &capped, &idle(1), &[]), INFLIGHT_TOKENS), vec![20.0]);
    rejected("inflight-load-producer", r#"{"outputRatio": -1}"#, "outputRatio");
}

/// A request whose first chunk is its end (not streamed, or decided by a peer replica) has
/// its prompt tokens released when its prefill is estimated done: after the endpoint's
/// prompt tokens ahead of it and its own, at the pace streamed requests that completed
/// taught (per endpoint, else the pool's), the default pace before any did.
#[test]
fn inflight_load_producer_releases_unstreamed_prompts_by_estimate() {
    let p = producer::<InflightLoadProducer>("inflight-load-producer", "{}");
    p.pool_changed(&pool(2));
    let m = idle(2);
    let req =
        |tokens: usize, now_ms: u64, stream: bool| Request { now_ms, stream, ..request("r", &"x".repeat(4 * tokens)) };
    let mut cycle = 0;
    let mut send = |tokens: usize, now_ms: u64, stream: bool, endpoint: u32| {
        cycle += 1;
        p.produce(cycle, &req(tokens, now_ms, stream), &m, &[]);
        p.decided(cycle, endpoint);
        cycle
    };
    let load = |now_ms: u64| {
        let cols = p.produce(1_000_000 + now_ms, &req(1, now_ms, true), &m, &[]);
        (column(&cols, INFLIGHT_TOKENS), column(&cols, INFLIGHT_REQUESTS))
    };
    // Default pace, 0.1 ms a token: 1 000 tokens are done at 1 100; 500 more behind them
    // at 1 150.
    let a = send(1000, 1_000, false, 0);
    let b = send(500, 1_000, false, 0);
    assert_eq!(load(1_099), (vec![1500.0, 0.0], vec![2.0, 0.0]));
    assert_eq!(load(1_100), (vec![500.0, 0.0], vec![2.0, 0.0]));
    assert_eq!(load(1_150), (vec![0.0, 0.0], vec![2.0, 0.0]));
    // Their first chunk (the whole answer) and end release nothing twice.
    p.first_chunk(a, 0, 1_900);
    p.finished(a, 0);
    p.finished(b, 0);
    assert_eq!(load(2_000), (vec![0.0, 0.0], vec![0.0, 0.0]));
    // A streamed request holds its prompt until its first chunk, however long: 2 000 tokens
    // prefilled in 400 ms teach endpoint 1 a pace of 0.2 ms a token, and the pool too.
    let c = send(2000, 2_000, true, 1);
    assert_eq!(load(2_399), (vec![0.0, 2000.0], vec![0.0, 1.0]));
    p.first_chunk(c, 1, 2_400);
    assert_eq!(load(2_400), (vec![0.0, 0.0], vec![0.0, 1.0]));
    p.finished(c, 1);
    // A streamed request whose first bytes were an error (503 at once) teaches nothing.
    let g = send(3000, 2_500, true, 1);
    p.first_chunk(g, 1, 2_501);
    p.ended(g, &Completion { endpoint: 1, outcome: Outcome::Completed, status: 503, usage: None });
    let d = send(1000, 3_000, false, 1);
    let e = send(100, 3_000, false, 0);
    assert_eq!(load(3_019), (vec![100.0, 1000.0], vec![1.0, 1.0]));
    assert_eq!(load(3_020), (vec![0.0, 1000.0], vec![1.0, 1.0]));
    assert_eq!(load(3_199), (vec![0.0, 1000.0], vec![1.0, 1.0]));
    assert_eq!(load(3_200), (vec![0.0, 0.0], vec![1.0, 1.0]));
    // An end before the estimate releases everything at once, and the estimate later nothing.
    let f = send(1000, 4_000, false, 0);
    p.finished(f, 0);
    assert_eq!(load(4_001), (vec![0.0, 0.0], vec![1.0, 1.0]));
    p.finished(d, 1);
    p.finished(e, 0);
    assert_eq!(load(5_000), (vec![0.0, 0.0], vec![0.0, 0.0]));
}

/// `kvPressureThreshold`: what a worker's in-flight requests commit to its KV cache (uncached
/// prompt + output estimate, until they end) counts as load past that share of the cache.
#[test]
fn inflight_load_producer_counts_kv_commitments_past_the_threshold() {
    let p = producer::<InflightLoadProducer>("inflight-load-producer", r#"{"kvPressureThreshold": 0.5}"#);
    // Endpoint 0 holds 100 blocks of 16 tokens (1 600, so 800 before pressure); endpoint 1
    // reports no cache geometry.
    let mut endpoints = pool(2);
    endpoints[0].cache = Some(CacheInfo { block_size: 16, num_gpu_blocks: 100 });
    p.pool_changed(&endpoints);
    let m = idle(2);
    let mut req = request("r", &"x".repeat(1600)); // 400 tokens; output estimate min(600, 300)
    req.max_tokens = Some(300);
    let tokens = |cycle: u64| column(&p.produce(cycle, &req, &m, &[]), INFLIGHT_TOKENS);
    assert_eq!(tokens(1), vec![0.0, 0.0]);
    p.decided(1, 0);
    p.first_chunk(1, 0, 0);
    // 700 committed to endpoint 0: under 800, nothing added; its prompt is prefilled.
    assert_eq!(tokens(2), vec![0.0, 0.0]);
    p.decided(2, 0);
    p.first_chunk(2, 0, 0);
    assert_eq!(tokens(3), vec![600.0, 0.0]);
    // 1 400 committed to endpoint 0: 600 past the threshold. Endpoint 1, without a cache
    // geometry, has only its waiting prompt.
    p.decided(3, 1);
    assert_eq!(tokens(4), vec![600.0, 400.0]);
    p.finished(1, 0);
    assert_eq!(tokens(5), vec![0.0, 400.0]);
    // Without the parameter nothing is committed (upstream's behaviour).
    let q = producer::<InflightLoadProducer>("inflight-load-producer", "{}");
    q.pool_changed(&endpoints);
    for cycle in 1..=3 {
        q.produce(cycle, &req, &m, &[]);
        q.decided(cycle, 0);
        q.first_chunk(cycle, 0, 0);
    }
    assert_eq!(column(&q.produce(4, &req, &m, &[]), INFLIGHT_TOKENS), vec![0.0, 0.0]);
    for bad in ["0", "1.5", "-0.2"] {
        rejected("inflight-load-producer", &format!(r#"{{"kvPressureThreshold": {bad}}}"#), "kvPressureThreshold");
    }
}

#[test]
fn token_load_scorer_table() {
    let s = scorer::<TokenLoadScorer>("token-load-scorer", r#"{"queueThresholdTokens": 1000}"#);
    let req = request("r", "");
    let m = idle(4);
    // 1 − min(inflight + request, Q)/Q; ≤ 0 → 1; unknown → 0.
    let inflight = [0.0, 200.0, 900.0, NAN];
    let request_tokens = [0.0, 300.0, 300.0, 10.0];
    let got = s.score(1, &req, &m, &[(INFLIGHT_TOKENS, &inflight), (REQUEST_UNCACHED_TOKENS, &request_tokens)]);
    assert!(approx(&got, &[1.0, 0.5, 0.0, 0.0]), "{got:?}");
    // A threshold of 0 falls back to upstream's default (4 Mi tokens).
    let d = scorer::<TokenLoadScorer>("token-load-scorer", r#"{"queueThresholdTokens": 0}"#);
    let got = d.score(1, &req, &idle(1), &[(INFLIGHT_TOKENS, &[4_194_304.0 / 2.0]), (REQUEST_UNCACHED_TOKENS, &[0.0])]);
    assert!(approx(&got, &[0.5]), "{got:?}");
}

#[test]
fn active_request_scorer_table() {
    let s = scorer::<ActiveRequestScorer>("active-request-scorer", "{}");
    let req = request("r", "");
    let m = idle(4);
    // (max − n)/max, busiest 0; at or below idleThreshold (0) 1.0.
    let got = s.score(1, &req, &m, &[(INFLIGHT_REQUESTS, &[0.0, 2.0, 4.0, NAN])]);
    assert!(approx(&got, &[1.0, 0.5, 0.0, 0.0]), "{got:?}");
    let t = scorer::<ActiveRequestScorer>("active-request-scorer", r#"{"idleThreshold": 2, "maxBusyScore": 0.5}"#);
    let got = t.score(1, &req, &m, &[(INFLIGHT_REQUESTS, &[1.0, 2.0, 3.0, 6.0])]);
    assert!(approx(&got, &[1.0, 1.0, 0.25, 0.0]), "{got:?}");
    rejected("active-request-scorer", r#"{"maxBusyScore": 1.5}"#, "maxBusyScore");
}

#[test]
fn prefix_cache_affinity_filter_keeps_lora_slots() {
    let f = filter::<PrefixCacheAffinityFilter>("prefix-cache-affinity-filter", "{}");
    let matched = [9.0, 9.0, 0.0, 0.0]; // 0 and 1 hold the prompt
    let total = [10.0; 4];
    let idle_load = [0.0; 4];
    let quiet = metrics(&[(0, 0.0, 4.0, 0.1), (1, 0.0, 4.0, 0.1), (2, 0.0, 4.0, 0.1), (3, 0.0, 4.0, 0.1)]);
    let pick = |f: &Twin<dyn FilterPlugin>, model: &str| {
        let mut req = request("r", "");
        req.model = model.into();
        let mut cols = prefix(&matched, &total);
        cols.push((INFLIGHT_TOKENS, &idle_load));
        f.filter(1, &req, &quiet, &cols.iter().map(|(n, v)| (*n, *v)).collect::<Vec<_>>())
    };
    let slot = |running: &str, waiting: &[&str]| EndpointInfo {
        max_lora: Some(1),
        running_adapters: vec![running.into()],
        waiting_adapters: waiting.iter().map(|w| (*w).into()).collect(),
        ..Default::default()
    };
    let set = |f: &Twin<dyn FilterPlugin>, eps: [EndpointInfo; 4]| {
        let mut pool = pool(4);
        for (p, e) in pool.iter_mut().zip(eps) {
            (p.max_lora, p.running_adapters, p.waiting_adapters) = (e.max_lora, e.running_adapters, e.waiting_adapters);
        }
        f.pool_changed(&pool);
    };
    // Holder 0 runs `sql` while `chat` waits there for its one slot: sending it more `sql`
    // keeps `chat` waiting as long as `sql` keeps coming. Holder 1 runs `sql` freely.
    set(&f, [slot("sql", &["chat"]), slot("sql", &[]), slot("chat", &[]), slot("chat", &[])]);
    assert_eq!(pick(&f, "sql"), vec![1]);
    // Both holders starve `chat`: a worker with a free slot takes `sql` instead ...
    let mut room = slot("chat", &[]);
    room.max_lora = Some(2);
    set(&f, [slot("sql", &["chat"]), slot("sql", &["chat"]), slot("chat", &[]), room.clone()]);
    assert_eq!(pick(&f, "sql"), vec![3]);
    // ... or one running `sql` with nobody waiting (here not a holder).
    set(&f, [slot("sql", &["chat"]), slot("sql", &["chat"]), slot("sql", &[]), room]);
    assert_eq!(pick(&f, "sql"), vec![2, 3]);
    // Nobody can run it now: the holders keep it.
    set(&f, [slot("sql", &["chat"]), slot("sql", &["chat"]), slot("chat", &[]), slot("chat", &[])]);
    assert_eq!(pick(&f, "sql"), vec![0, 1]);
    // A holder where `sql` would wait for a slot is left for one that runs it now.
    set(&f, [slot("chat", &["sql"]), slot("sql", &[]), slot("chat", &[]), slot("chat", &[])]);
    assert_eq!(pick(&f, "sql"), vec![1]);
    // `chat` waits on both holders: workers running it take it; with none, the holders do.
    set(&f, [slot("sql", &["chat"]), slot("sql", &["chat"]), slot("chat", &[]), slot("x", &[])]);
    assert_eq!(pick(&f, "chat"), vec![2]);
    set(&f, [slot("sql", &["chat"]), slot("sql", &["chat"]), slot("x", &[]), slot("x", &[])]);
    assert_eq!(pick(&f, "chat"), vec![0, 1]);
    // The base model's requests take no slot: not moved.
    assert_eq!(pick(&f, "base-model"), vec![0, 1]);
    // `queueDepthThreshold: 0` turns this EPP's rules off, this one with them.
    let upstream = filter::<PrefixCacheAffinityFilter>("prefix-cache-affinity-filter", r#"{"queueDepthThreshold": 0}"#);
    set(&upstream, [slot("sql", &["chat"]), slot("sql", &["chat"]), slot("chat", &[]), slot("chat", &[])]);
    assert_eq!(pick(&upstream, "sql"), vec![0, 1]);
}

/// An adapter busier than the workers running it (one slot each, every other worker's
/// slot taken): once each of them is saturated and far behind the rest, its requests go
/// to the workers with short queues, where it loads, instead of queueing without end.
#[test]
fn an_outgrown_adapter_loads_elsewhere() {
    let f = filter::<PrefixCacheAffinityFilter>("prefix-cache-affinity-filter", "{}");
    let s = scorer::<LoraAffinityScorer>("lora-affinity-scorer", "{}");
    let matched = [9.0, 0.0, 0.0, 0.0]; // 0 holds the prompt
    let total = [10.0; 4];
    let idle_load = [0.0; 4];
    let mut eps = pool(4);
    for (e, adapter) in eps.iter_mut().zip(["sql", "chat", "x", "y"]) {
        (e.max_lora, e.running_adapters) = (Some(1), vec![adapter.into()]);
    }
    f.pool_changed(&eps);
    s.pool_changed(&eps);
    let mut req = request("r", "");
    req.model = "sql".into();
    let run = |queues: [f32; 4], req: &Request| {
        let m = metrics(&[
            (0, queues[0], 8.0, 0.9),
            (1, queues[1], 4.0, 0.5),
            (2, queues[2], 4.0, 0.5),
            (3, queues[3], 4.0, 0.5),
        ]);
        let mut cols = prefix(&matched, &total);
        cols.push((INFLIGHT_TOKENS, &idle_load));
        let named: Vec<(&str, &[f32])> = cols.iter().map(|(n, v)| (*n, *v)).collect();
        (f.filter(1, req, &m, &named), s.score(1, req, &m, &named))
    };
    // `sql` runs only on 0, 40 waiting there against 1–3 elsewhere (mean 2: 3 × 2 + 5 =
    // 11 ≤ 40): the workers below the saturation depth (5) take it, and where `sql` runs
    // no longer counts.
    let (kept, scores) = run([40.0, 1.0, 3.0, 7.0], &req);
    assert_eq!(kept, vec![1, 2]);
    assert_eq!(scores, vec![0.5; 4]);
    // A queue, but not far behind the others (10 < 3 × 2 + 5): sticky, as before.
    let (kept, scores) = run([10.0, 1.0, 3.0, 2.0], &req);
    assert_eq!(kept, vec![0]);
    assert_eq!(scores, vec![1.0, 0.0, 0.0, 0.0]);
    // Unknown queues elsewhere: nowhere known to be better.
    assert_eq!(run([40.0, NAN, NAN, NAN], &req).0, vec![0]);
    // Everybody saturated: nothing to gain; the holder keeps it.
    assert_eq!(run([90.0, 6.0, 6.0, 6.0], &req).0, vec![0]);
    // Another worker runs `sql` with a short queue: not outgrown.
    eps[3].running_adapters = vec!["sql".into()];
    f.pool_changed(&eps);
    s.pool_changed(&eps);
    assert_eq!(run([40.0, 1.0, 3.0, 2.0], &req).0, vec![0]);
    // The base model takes no slot: untouched.
    req.model = "base".into();
    assert_eq!(run([40.0, 1.0, 3.0, 7.0], &req).0, vec![0]);
    // Off with `queueDepthThreshold: 0` (upstream's filter) and `outgrownQueueDepth: 0`
    // (upstream's scorer).
    let upstream_f =
        filter::<PrefixCacheAffinityFilter>("prefix-cache-affinity-filter", r#"{"queueDepthThreshold": 0}"#);
    let upstream_s = scorer::<LoraAffinityScorer>("lora-affinity-scorer", r#"{"outgrownQueueDepth": 0}"#);
    eps[3].running_adapters = vec!["y".into()];
    upstream_f.pool_changed(&eps);
    upstream_s.pool_changed(&eps);
    req.model = "sql".into();
    let m = metrics(&[(0, 40.0, 8.0, 0.9), (1, 1.0, 4.0, 0.5), (2, 3.0, 4.0, 0.5), (3, 7.0, 4.0, 0.5)]);
    let mut cols = prefix(&matched, &total);
    cols.push((INFLIGHT_TOKENS, &idle_load));
    let named: Vec<(&str, &[f32])> = cols.iter().map(|(n, v)| (*n, *v)).collect();
    assert_eq!(upstream_f.filter(1, &req, &m, &named), vec![0]);
    assert_eq!(upstream_s.score(1, &req, &m, &named), vec![1.0, 0.0, 0.0, 0.0]);
    rejected("lora-affinity-scorer", r#"{"outgrownQueueDepth": -1}"#, "outgrownQueueDepth");
    rejected("lora-affinity-scorer", r#"{"maxLoras": 2}"#, "maxLoras");
}

#[test]
fn prefix_cache_affinity_filter_table() {
    let f = filter::<PrefixCacheAffinityFilter>("prefix-cache-affinity-filter", "{}");
    let req = request("r", "");
    let m = idle(4);
    let total = [10.0; 4];
    let idle_load = [0.0; 4];
    let with = |matched: &[f32], load: &[f32]| {
        let mut cols = prefix(matched, &total);
        cols.push((INFLIGHT_TOKENS, load));
        f.filter(1, &req, &m, &cols.iter().map(|(n, v)| (*n, *v)).collect::<Vec<_>>())
    };
    // At or over the threshold (0.8) are sticky; only they are kept.
    assert_eq!(with(&[8.0, 10.0, 7.9, 0.0], &idle_load), vec![0, 1]);
    // Nobody sticky: everybody stays.
    assert_eq!(with(&[1.0, 0.0, 7.0, 0.0], &idle_load), vec![0, 1, 2, 3]);
    // The best sticky one would start the request more than 18 s later than the best other
    // one (tokens ÷ 15928 tokens/s): stickiness is dropped.
    let slow = [400_000.0, 300_000.0, 1000.0, 0.0];
    assert_eq!(with(&[9.0, 9.0, 0.0, 0.0], &slow), vec![0, 1, 2, 3]);
    // Within the penalty: kept sticky.
    let fine = [200_000.0, 250_000.0, 1000.0, 0.0];
    assert_eq!(with(&[9.0, 9.0, 0.0, 0.0], &fine), vec![0, 1]);
    // One candidate, or a threshold of 0: no filtering.
    assert_eq!(f.filter(1, &req, &idle(1), &prefix(&[0.0], &[4.0])), vec![0]);
    let off = filter::<PrefixCacheAffinityFilter>("prefix-cache-affinity-filter", r#"{"affinityThreshold": 0}"#);
    assert_eq!(off.filter(1, &req, &m, &prefix(&[10.0, 0.0, 0.0, 0.0], &total)), vec![0, 1, 2, 3]);
    // Exploration keeps everyone on about its share of requests.
    let explore =
        filter::<PrefixCacheAffinityFilter>("prefix-cache-affinity-filter", r#"{"explorationProbability": 0.5}"#);
    let kept_all = (0..400u64)
        .filter(|&seed| {
            let mut r = request("r", "");
            r.random_seed = seed;
            explore.filter(seed, &r, &m, &prefix(&[10.0, 0.0, 0.0, 0.0], &total)).len() == 4
        })
        .count();
    assert!((140..=260).contains(&kept_all), "{kept_all} of 400");
    // Sticky until saturated: a holder whose queue reaches queueDepthThreshold (5) is left
    // out while another holder is not ...
    let sticky = [9.0, 9.0, 0.0, 0.0];
    let on_with = |f: &Twin<dyn FilterPlugin>, req: &Request, rows: &[(u32, f32, f32, f32)]| {
        let mut cols = prefix(&sticky, &total);
        cols.push((INFLIGHT_TOKENS, &idle_load));
        f.filter(1, req, &metrics(rows), &cols.iter().map(|(n, v)| (*n, *v)).collect::<Vec<_>>())
    };
    let on = |rows: &[(u32, f32, f32, f32)]| on_with(&f, &req, rows);
    assert_eq!(on(&[(0, 5.0, 32.0, 0.5), (1, 4.0, 32.0, 0.5), (2, 0.0, 0.0, 0.0), (3, 0.0, 0.0, 0.0)]), vec![1]);
    // ... and when every holder is saturated, the request goes to the workers with an empty
    // queue that run at most half what the least busy holder runs (here 16 of 32), which
    // then hold the prompt too.
    assert_eq!(on(&[(0, 5.0, 32.0, 0.5), (1, 9.0, 40.0, 0.5), (2, 0.0, 16.0, 0.3), (3, 0.0, 17.0, 0.1)]), vec![2]);
    assert_eq!(on(&[(0, 5.0, 32.0, 0.5), (1, 9.0, 32.0, 0.5), (2, 0.0, 0.0, 0.0), (3, 1.0, 1.0, 0.1)]), vec![2]);
    // No such worker (busy, queueing, or its metrics unknown): the holders keep it.
    assert_eq!(on(&[(0, 5.0, 32.0, 0.5), (1, 9.0, 32.0, 0.5), (2, 0.0, 20.0, 0.1), (3, NAN, NAN, NAN)]), vec![0, 1]);
    // A queue not known (stale metrics) is not a saturated one.
    assert_eq!(on(&[(0, NAN, NAN, NAN), (1, 9.0, 32.0, 0.5), (2, 0.0, 0.0, 0.0), (3, 0.0, 0.0, 0.0)]), vec![0]);
    // A request for a LoRA adapter spills only where the adapter runs or has room to load:
    // moving it elsewhere would evict another adapter.
    let mut eps = pool(4);
    eps[0].running_adapters = vec!["sql".into()];
    eps[1].running_adapters = vec!["sql".into()];
    for e in &mut eps[2..] {
        e.max_lora = Some(1);
        e.running_adapters = vec!["chat".into()];
    }
    eps[3].max_lora = Some(2);
    f.pool_changed(&eps);
    let mut sql = request("r", "");
    sql.model = "sql".into();
    let all_saturated = [(0, 5.0, 32.0, 0.5), (1, 9.0, 32.0, 0.5), (2, 0.0, 0.0, 0.0), (3, 0.0, 4.0, 0.1)];
    assert_eq!(on_with(&f, &sql, &all_saturated), vec![3], "worker 2 has no room for another adapter");
    // The base model (no endpoint lists it as an adapter) goes to either.
    assert_eq!(on_with(&f, &req, &all_saturated), vec![2, 3]);
    let narrow = filter::<PrefixCacheAffinityFilter>(
        "prefix-cache-affinity-filter",
        r#"{"queueDepthThreshold": 3, "spillRunningShare": 0}"#,
    );
    assert_eq!(
        on_with(&narrow, &req, &[(0, 2.0, 32.0, 0.5), (1, 3.0, 32.0, 0.5), (2, 0.0, 0.0, 0.0), (3, 0.0, 1.0, 0.1)]),
        vec![0],
        "threshold 3: a queue of 3 is saturated, one of 2 is not"
    );
    assert_eq!(
        on_with(&narrow, &req, &[(0, 3.0, 32.0, 0.5), (1, 3.0, 32.0, 0.5), (2, 0.0, 0.0, 0.0), (3, 0.0, 1.0, 0.1)]),
        vec![2],
        "share 0: only a worker running nothing takes the spill"
    );
    // Busy holders of a hot prefix: nobody queues, but the prefix is asked for more often
    // than its holders' share of the traffic (every 1.5 requests here: 4 / 1.5 workers'
    // worth, on 2 holders), and every holder runs at least busyRunningThreshold and more
    // than twice the other workers' mean: the request spills as from saturated holders.
    let busy_rule = filter::<PrefixCacheAffinityFilter>(
        "prefix-cache-affinity-filter",
        r#"{"busyRunningThreshold": 8, "busyRunningRatio": 2}"#,
    );
    let busy_with = |interval: [f32; 4], rows: &[(u32, f32, f32, f32)]| {
        let mut cols = prefix(&sticky, &total);
        cols.push((INFLIGHT_TOKENS, &idle_load));
        cols.push((PREFIX_MATCH_INTERVAL, &interval));
        busy_rule.filter(1, &req, &metrics(rows), &cols.iter().map(|(n, v)| (*n, *v)).collect::<Vec<_>>())
    };
    let hot = [1.5, 1.5, f32::INFINITY, f32::INFINITY];
    let busy_on = |rows: &[(u32, f32, f32, f32)]| busy_with(hot, rows);
    assert_eq!(
        busy_on(&[(0, 0.0, 20.0, 0.5), (1, 0.0, 24.0, 0.5), (2, 0.0, 2.0, 0.1), (3, 0.0, 9.0, 0.1)]),
        vec![2, 3]
    );
    // One holder below the threshold, or not twice the other workers' mean: they keep it.
    assert_eq!(busy_on(&[(0, 0.0, 7.0, 0.5), (1, 0.0, 24.0, 0.5), (2, 0.0, 0.0, 0.0), (3, 0.0, 0.0, 0.0)]), vec![0, 1]);
    assert_eq!(
        busy_on(&[(0, 0.0, 20.0, 0.5), (1, 0.0, 24.0, 0.5), (2, 0.0, 0.0, 0.0), (3, 0.0, 10.0, 0.1)]),
        vec![2, 3],
        "the mean of 0 and 10 is 5"
    );
    assert_eq!(
        busy_on(&[(0, 0.0, 20.0, 0.5), (1, 0.0, 24.0, 0.5), (2, 0.0, 10.0, 0.3), (3, 0.0, 12.0, 0.3)]),
        vec![0, 1]
    );
    // A busy holder beside a saturated one spills too; the other workers' queues must be empty.
    assert_eq!(busy_on(&[(0, 6.0, 32.0, 0.9), (1, 0.0, 24.0, 0.5), (2, 1.0, 2.0, 0.1), (3, 0.0, 3.0, 0.1)]), vec![3]);
    // Other workers' load unknown (stale metrics): nothing to compare with, no spill.
    assert_eq!(
        busy_on(&[(0, 0.0, 20.0, 0.5), (1, 0.0, 24.0, 0.5), (2, NAN, NAN, NAN), (3, NAN, NAN, NAN)]),
        vec![0, 1]
    );
    // A prefix asked for every 2 requests brings 2 workers' worth on 4: its 2 holders are
    // its fair share, as one conversation's history (asked for once in a while) is: no spill.
    let loaded = [(0, 0.0, 20.0, 0.5), (1, 0.0, 24.0, 0.5), (2, 0.0, 0.0, 0.0), (3, 0.0, 0.0, 0.0)];
    assert_eq!(busy_with([2.0, 2.0, f32::INFINITY, f32::INFINITY], &loaded), vec![0, 1]);
    assert_eq!(busy_with([300.0, 300.0, f32::INFINITY, f32::INFINITY], &loaded), vec![0, 1]);
    assert_eq!(busy_with([NAN; 4], &loaded), vec![0, 1], "not known: not hot");
    assert_eq!(busy_with([1.5, 300.0, f32::INFINITY, f32::INFINITY], &loaded), vec![2, 3], "the hottest holder counts");
    let no_busy = filter::<PrefixCacheAffinityFilter>("prefix-cache-affinity-filter", r#"{"busyRunningThreshold": 0}"#);
    let mut cols = prefix(&sticky, &total);
    cols.push((INFLIGHT_TOKENS, &idle_load));
    cols.push((PREFIX_MATCH_INTERVAL, &hot));
    assert_eq!(
        no_busy.filter(1, &req, &metrics(&loaded), &cols.iter().map(|(n, v)| (*n, *v)).collect::<Vec<_>>()),
        vec![0, 1],
        "busyRunningThreshold 0: only a queue spills"
    );
    // 0 turns the rule off: upstream's filter.
    let upstream = filter::<PrefixCacheAffinityFilter>("prefix-cache-affinity-filter", r#"{"queueDepthThreshold": 0}"#);
    let mut cols = prefix(&sticky, &total);
    cols.push((INFLIGHT_TOKENS, &idle_load));
    let busy = metrics(&[(0, 50.0, 32.0, 0.9), (1, 50.0, 32.0, 0.9), (2, 0.0, 0.0, 0.0), (3, 0.0, 0.0, 0.0)]);
    assert_eq!(upstream.filter(1, &req, &busy, &cols.iter().map(|(n, v)| (*n, *v)).collect::<Vec<_>>()), vec![0, 1]);
    rejected("prefix-cache-affinity-filter", r#"{"queueDepthThreshold": -1}"#, "queueDepthThreshold");
    rejected("prefix-cache-affinity-filter", r#"{"spillRunningShare": 1.5}"#, "spillRunningShare");
    rejected("prefix-cache-affinity-filter", r#"{"busyRunningThreshold": -1}"#, "busyRunningThreshold");
    rejected("prefix-cache-affinity-filter", r#"{"busyRunningRatio": 0.5}"#, "busyRunningRatio");
    rejected("prefix-cache-affinity-filter", r#"{"affinityThreshold": 1.5}"#, "affinityThreshold");
    rejected("prefix-cache-affinity-filter", r#"{"maxTTFTPenaltyMs": -1}"#, "maxTTFTPenaltyMs");
    rejected("prefix-cache-affinity-filter", r#"{"ttftSource": "latencyPredictor"}"#, "latencyPredictor");
}

#[test]
fn session_affinity_scorer_encodes_the_endpoint_in_a_header() {
    let s = scorer::<SessionAffinityScorer>("session-affinity-scorer", "{}");
    s.pool_changed(&pool(3));
    let m = idle(3);
    // No token: nobody is preferred; the response names the endpoint that served it.
    assert_eq!(s.score(1, &request("r", ""), &m, &[]), vec![0.0, 0.0, 0.0]);
    let headers = s.decided(1, 2);
    assert_eq!(headers, vec![("x-session-token".to_string(), "ZGVmYXVsdC9lcC0y".to_string())]);
    // The client sends it back: that endpoint scores 1.
    let mut follow = request("r2", "");
    follow.headers = headers.clone();
    assert_eq!(s.score(2, &follow, &m, &[]), vec![0.0, 0.0, 1.0]);
    // Garbage, or an endpoint that left, scores 0 everywhere.
    follow.headers = vec![("x-session-token".into(), "%%%".into())];
    assert_eq!(s.score(3, &follow, &m, &[]), vec![0.0, 0.0, 0.0]);
    follow.headers = headers;
    s.pool_changed(&pool(2));
    assert_eq!(s.score(4, &follow, &idle(2), &[]), vec![0.0, 0.0]);
}

#[test]
fn session_affinity_scorer_binds_session_ids() {
    let s = scorer::<SessionAffinityScorer>("session-affinity-scorer", r#"{"strategy": "session_id"}"#);
    s.pool_changed(&pool(3));
    let m = idle(3);
    let at = |id: &str, session: &str, now_ms: u64| {
        let mut r = request(id, "");
        r.headers = vec![("x-session-id".into(), session.into())];
        r.now_ms = now_ms;
        r
    };
    assert_eq!(s.score(1, &at("a", "alice", 0), &m, &[]), vec![0.0, 0.0, 0.0]);
    assert!(s.decided(1, 1).is_empty(), "no response header with session ids");
    assert_eq!(s.score(2, &at("b", "alice", 1_000), &m, &[]), vec![0.0, 1.0, 0.0]);
    s.decided(2, 0); // another scorer outweighed it: the binding stays (it was a candidate)
    assert_eq!(s.score(3, &at("c", "alice", 2_000), &m, &[]), vec![0.0, 1.0, 0.0]);
    // Unused for longer than the TTL (300 s): forgotten.
    assert_eq!(s.score(4, &at("d", "alice", 400_000), &m, &[]), vec![0.0, 0.0, 0.0]);
    rejected("session-affinity-scorer", r#"{"strategy": "cookie"}"#, "strategy");
    rejected(
        "session-affinity-scorer",
        r#"{"strategy": "session_id", "sessionIdConfig": {"evictionTtlSeconds": -1}}"#,
        "evictionTtlSeconds must be from 0",
    );

    // A blank session header is no session: it passes to the next source, and requests
    // without any do not share one session "". Fractional TTLs are seconds; 0 is the default.
    let params = r#"{"strategy": "session_id", "sessionIdConfig": {"sources": [{"header": "x-a"}, {"header": "x-b"}],
        "evictionTtlSeconds": 0.5, "evictionSweepSeconds": 0}}"#;
    let s = scorer::<SessionAffinityScorer>("session-affinity-scorer", params);
    s.pool_changed(&pool(3));
    let with = |headers: &[(&str, &str)], now_ms: u64| {
        let mut r = request("r", "");
        r.headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        r.now_ms = now_ms;
        r
    };
    s.score(10, &with(&[("x-a", "  "), ("x-b", "bob")], 0), &m, &[]);
    s.decided(10, 2);
    assert_eq!(s.score(11, &with(&[("x-b", "bob")], 100), &m, &[]), vec![0.0, 0.0, 1.0], "bound through x-b");
    s.score(12, &with(&[("x-a", "")], 200), &m, &[]);
    s.decided(12, 0);
    assert_eq!(s.score(13, &with(&[("x-a", "")], 300), &m, &[]), vec![0.0, 0.0, 0.0], "no shared blank session");
    assert_eq!(s.score(14, &with(&[("x-b", "bob")], 1_000), &m, &[]), vec![0.0, 0.0, 0.0], "0.5 s TTL passed");
}

#[test]
fn session_affinity_filter_pins_the_session_to_its_endpoint() {
    let req_with = |headers: &[(&str, &str)], now_ms: u64| {
        let mut r = request("r", "");
        r.headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        r.now_ms = now_ms;
        r
    };
    // Encoded header (default): the response names the endpoint; sent back, it is kept alone.
    let f = filter::<SessionAffinityFilter>("session-affinity-filter", "{}");
    f.pool_changed(&pool(3));
    let m = idle(3);
    assert_eq!(f.filter(1, &request("r", ""), &m, &[]), vec![0, 1, 2], "no session: everyone");
    let headers = f.decided(1, 2);
    assert_eq!(headers, vec![("x-session-token".to_string(), "ZGVmYXVsdC9lcC0y".to_string())]);
    let token = headers[0].1.clone();
    assert_eq!(f.filter(2, &req_with(&[("x-session-token", &token)], 0), &m, &[]), vec![2]);
    // Its endpoint not a candidate (filtered out before), or garbage: everyone, never none.
    let others = metrics(&[(0, 0.0, 0.0, 0.0), (1, 0.0, 0.0, 0.0)]);
    assert_eq!(f.filter(3, &req_with(&[("x-session-token", &token)], 0), &others, &[]), vec![0, 1]);
    assert_eq!(f.filter(4, &req_with(&[("x-session-token", "%%%")], 0), &m, &[]), vec![0, 1, 2]);

    // session_id: the first request binds, the next ones are pinned until the TTL passes.
    let f = filter::<SessionAffinityFilter>(
        "session-affinity-filter",
        r#"{"strategy": "session_id", "sessionIdConfig": {"evictionTtlSeconds": 60}}"#,
    );
    f.pool_changed(&pool(3));
    let alice = |now_ms| req_with(&[("x-session-id", "alice")], now_ms);
    assert_eq!(f.filter(1, &alice(0), &m, &[]), vec![0, 1, 2]);
    assert!(f.decided(1, 1).is_empty(), "no response header with session ids");
    assert_eq!(f.filter(2, &alice(1_000), &m, &[]), vec![1]);
    f.decided(2, 1);
    // The bound endpoint not a candidate: everyone, and the session moves where it went.
    let without_1 = metrics(&[(0, 0.0, 0.0, 0.0), (2, 0.0, 0.0, 0.0)]);
    assert_eq!(f.filter(3, &alice(2_000), &without_1, &[]), vec![0, 2]);
    f.decided(3, 2);
    assert_eq!(f.filter(4, &alice(3_000), &m, &[]), vec![2]);
    f.decided(4, 2);
    assert_eq!(f.filter(5, &alice(64_000), &m, &[]), vec![0, 1, 2], "60 s unused: forgotten");
    rejected("session-affinity-filter", r#"{"strategy": "sticky"}"#, "strategy");
    rejected(
        "session-affinity-filter",
        r#"{"strategy": "session_id", "sessionIdConfig": {"sources": [{"header": ""}]}}"#,
        "sources[0].header",
    );
}

/// A request whose estimated prompt is `tokens` long.
fn tokens_long(tokens: u32) -> Request {
    Request { prompt_tokens: tokens, ..request("r", "") }
}

/// Four endpoints: `0-2048`, `2048-8192`, no label, and a label that is not a range.
fn context_ranged_pool(label: &str) -> Vec<EndpointInfo> {
    let mut eps = pool(4);
    eps[0].labels.push((label.into(), "0-2048".into()));
    eps[1].labels.push((label.into(), "2048-8192".into()));
    eps[3].labels.push((label.into(), "8192".into()));
    eps
}

#[test]
fn context_length_aware_table() {
    let s = scorer::<ContextLengthAware>("context-length-aware", "{}");
    s.pool_changed(&context_ranged_pool("llm-d.ai/context-length-range"));
    let m = idle(4);
    let score = |tokens| s.score(1, &tokens_long(tokens), &m, &[]);
    // 1 000 tokens: in the narrow range (above 0.3), 1 048 under the wide one's floor.
    let short = score(1_000);
    let in_narrow = 0.3 + 0.7 * (0.7 / 1.2048 + 0.3 * 1_048.0 / 2_048.0);
    assert!((f64::from(short[0]) - in_narrow).abs() < 1e-6, "{short:?}");
    assert!((f64::from(short[1]) - 0.3 / 2.048).abs() < 1e-6, "{short:?}");
    assert_eq!((short[2], short[3]), (0.5, 0.0), "no label: neutral; not a range: 0");
    // 5 000 tokens: the long range in range, the short one 2 952 tokens away.
    let long = score(5_000);
    assert!(long[1] > 0.3 && long[0] < 0.3 && long[1] > long[2], "{long:?}");
    // 9 000 tokens: nobody's range; the nearer bound (8 192) wins.
    let over = score(9_000);
    assert!(over[1] > over[0] && over[1] < 0.3, "{over:?}");
    // A range of one length scores 1 at it; the label is a parameter.
    let s = scorer::<ContextLengthAware>("context-length-aware", r#"{"label": "ctx"}"#);
    let mut eps = pool(2);
    eps[0].labels.push(("ctx".into(), "100-100".into()));
    eps[1].labels.push(("llm-d.ai/context-length-range".into(), "100-100".into()));
    s.pool_changed(&eps);
    assert_eq!(s.score(1, &tokens_long(100), &idle(2), &[]), vec![1.0, 0.5]);

    // The filtering half: in range or unlabelled; a bad label is dropped.
    let f = filter::<ContextLengthAware>("context-length-aware-filter", r#"{"enableFiltering": true}"#);
    f.pool_changed(&context_ranged_pool("llm-d.ai/context-length-range"));
    assert_eq!(f.filter(1, &tokens_long(1_000), &m, &[]), vec![0, 2]);
    assert_eq!(f.filter(2, &tokens_long(2_048), &m, &[]), vec![0, 1, 2], "bounds are included");
    assert_eq!(f.filter(3, &tokens_long(9_000), &m, &[]), vec![2]);

    rejected("context-length-aware", r#"{"label": ""}"#, "label");
    rejected("context-length-aware", r#"{"enableFiltering": "yes"}"#, "enableFiltering");
    rejected("context-length-aware", r#"{"lable": "x"}"#, "lable");
}

#[test]
fn header_label_affinity_scorer_table() {
    let s = scorer::<HeaderLabelAffinityScorer>(
        "header-label-affinity-scorer",
        r#"{"headerName": "X-Preferred-Zone", "labelKey": "topology.kubernetes.io/zone"}"#,
    );
    let mut eps = pool(3);
    eps[0].labels.push(("topology.kubernetes.io/zone".into(), "a".into()));
    eps[1].labels.push(("topology.kubernetes.io/zone".into(), "b".into()));
    s.pool_changed(&eps);
    let m = idle(3);
    let with = |value: Option<&str>| {
        let mut r = request("r", "");
        r.headers = value.map(|v| vec![("x-preferred-zone".to_string(), v.to_string())]).unwrap_or_default();
        s.score(1, &r, &m, &[])
    };
    assert_eq!(with(Some("b")), vec![0.0, 1.0, 0.0], "the header's name in any case");
    assert_eq!(with(Some("a")), vec![1.0, 0.0, 0.0]);
    assert_eq!(with(Some("c")), vec![0.0, 0.0, 0.0], "a value nobody carries");
    assert_eq!(with(Some("")), vec![0.0, 0.0, 0.0], "an empty header");
    assert_eq!(with(None), vec![0.0, 0.0, 0.0], "no header");
    let needs = s.wasm.manifest().needs;
    assert!(needs.headers && needs.pool && !needs.prompt && !needs.decided, "{needs:?}");
    rejected("header-label-affinity-scorer", r#"{"labelKey": "zone"}"#, "headerName");
    rejected("header-label-affinity-scorer", r#"{"headerName": "x-zone"}"#, "labelKey");
    rejected("header-label-affinity-scorer", "{}", "headerName");
}

/// The config names one `context-length-aware` plugin, as upstream's does; with
/// `enableFiltering: true` the built profile filters with it as well as scoring.
#[test]
fn context_length_aware_filters_only_when_its_entry_asks() {
    let dir = TempDir::new("plugins", "ctx-len");
    let endpoints = dir.join("endpoints.yaml");
    std::fs::write(&endpoints, "endpoints: []\n").unwrap();
    let profile = |filtering: bool| {
        let yaml = format!(
            "{}- name: ctx
  type: context-length-aware
  parameters: {{enableFiltering: {filtering}}}
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: ctx
    weight: 1
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: max-score-picker
",
            config_head(&endpoints.display().to_string())
        );
        let config = epp::config::PickerConfig::parse(&yaml, None).expect("parses");
        let scheduler =
            epp::loader::build(runtime(), &config, &epp::loader::PluginSet::default()).expect("builds").scheduler;
        let failures = scheduler.pool_changed(1, &context_ranged_pool("llm-d.ai/context-length-range"));
        assert!(failures.is_empty(), "{failures:?}");
        scheduler
    };
    // The short-range endpoint idle, the others with a queue (short of saturation): the
    // queue outweighs the range when only scoring, not when filtering.
    let m = metrics(&[(0, 0.0, 0.0, 0.0), (1, 3.0, 0.0, 0.0), (2, 3.0, 0.0, 0.0), (3, 3.0, 0.0, 0.0)]);
    let scoring = profile(false);
    assert_eq!(scoring.decide(1, &tokens_long(5_000), m.clone()).expect("decides").primary(), 0);
    let filtering = profile(true);
    assert_eq!(filtering.decide(1, &tokens_long(5_000), m.clone()).expect("decides").primary(), 1);
    // A prompt no range holds goes to the unlabelled endpoint; with it gone, nothing is left
    // and the request fails naming the plugin.
    assert_eq!(filtering.decide(2, &tokens_long(9_000), m.clone()).expect("decides").primary(), 2);
    let no_unlabelled = metrics(&[(0, 0.0, 0.0, 0.0), (1, 0.0, 0.0, 0.0), (3, 0.0, 0.0, 0.0)]);
    let err = filtering.decide(3, &tokens_long(9_000), no_unlabelled).expect_err("nothing left");
    assert!(err.to_string().contains("ctx"), "{err}");
}

#[test]
fn endpoint_attribute_scorer_table() {
    let m = idle(4);
    let temp: &[f32] = &[40.0, 80.0, NAN, 60.0];
    let named: Named = vec![("attribute/temp", temp)];
    let score = |params: &str| {
        scorer::<EndpointAttributeScorer>("endpoint-attribute-scorer", params).score(1, &request("r", ""), &m, &named)
    };
    // Adaptive range over the candidates that have it (40..80); missing scores 0.
    let lower = score(r#"{"attributeKey": "temp", "algorithm": {"type": "linear_lower_is_better"}}"#);
    assert_eq!(lower, vec![1.0, 0.0, 0.0, 0.5]);
    let higher = score(r#"{"attributeKey": "temp", "algorithm": {"type": "linear_higher_is_better"}}"#);
    assert_eq!(higher, vec![0.0, 1.0, 0.0, 0.5]);
    // A fixed range clamps.
    let fixed = score(
        r#"{"attributeKey": "temp", "producer": "core-metrics-extractor",
            "algorithm": {"type": "linear_lower_is_better", "normalization": {"fixedRange": {"min": 50, "max": 70}}}}"#,
    );
    assert_eq!(fixed, vec![1.0, 0.0, 0.0, 0.5]);
    // Everyone with the attribute at one value: all 1 (missing still 0).
    let s = scorer::<EndpointAttributeScorer>(
        "endpoint-attribute-scorer",
        r#"{"attributeKey": "temp", "algorithm": {"type": "linear_higher_is_better", "normalization": {"adaptiveRange": {}}}}"#,
    );
    let level: &[f32] = &[7.0, 7.0, NAN, 7.0];
    assert_eq!(s.score(1, &request("r", ""), &m, &[("attribute/temp", level)]), vec![1.0, 1.0, 0.0, 1.0]);
    assert_eq!(s.wasm.manifest().reads, vec!["attribute/temp".to_string()]);

    let t = "endpoint-attribute-scorer";
    rejected(t, r#"{"algorithm": {"type": "linear_lower_is_better"}}"#, "attributeKey");
    rejected(t, r#"{"attributeKey": "temp"}"#, "algorithm.type");
    rejected(t, r#"{"attributeKey": "temp", "algorithm": {"type": "best"}}"#, "algorithm.type");
    rejected(t, r#"{"attributeKey": "a/b", "algorithm": {"type": "linear_lower_is_better"}}"#, "attributeKey");
    rejected(
        t,
        r#"{"attributeKey": "temp", "producer": "dcgm-extractor", "algorithm": {"type": "linear_lower_is_better"}}"#,
        "producer",
    );
    rejected(
        t,
        r#"{"attributeKey": "t", "algorithm": {"type": "linear_lower_is_better", "normalization": {"fixedRange": {"min": 1, "max": 1}}}}"#,
        "fixedRange",
    );
    rejected(
        t,
        r#"{"attributeKey": "t", "algorithm": {"type": "linear_lower_is_better",
            "normalization": {"fixedRange": {"min": 0, "max": 1}, "adaptiveRange": {}}}}"#,
        "normalization",
    );
}

#[test]
fn endpoint_attribute_filter_table() {
    let m = idle(4);
    let temp: &[f32] = &[40.0, 85.0, NAN, 90.0];
    let named: Named = vec![("attribute/temp", temp)];
    let keep = |params: &str| {
        filter::<EndpointAttributeFilter>("endpoint-attribute-filter", params).filter(1, &request("r", ""), &m, &named)
    };
    let with = |operator: &str, extra: &str| {
        keep(&format!(
            r#"{{"attribute": "temp", {extra} "algorithm": {{"type": "threshold", "threshold": {{"operator": "{operator}", "value": 85}}}}}}"#
        ))
    };
    assert_eq!(with("LessThan", ""), vec![0, 2], "missing passes by default");
    assert_eq!(with("LessThanOrEqual", ""), vec![0, 1, 2]);
    assert_eq!(with("GreaterThan", ""), vec![2, 3]);
    assert_eq!(with("GreaterThanOrEqual", r#""onMissing": "Fail","#), vec![1, 3]);
    assert_eq!(with("Equal", r#""onMissing": "Fail","#), vec![1]);
    assert_eq!(with("NotEqual", r#""onMissing": "Pass","#), vec![0, 2, 3]);
    let cold: &[f32] = &[40.0, 45.0, 50.0, 55.0];
    let none_hot = |extra: &str| {
        let params = format!(
            r#"{{"attribute": "temp", {extra} "algorithm": {{"type": "threshold", "threshold": {{"operator": "GreaterThan", "value": 85}}}}}}"#
        );
        filter::<EndpointAttributeFilter>("endpoint-attribute-filter", &params).filter(
            1,
            &request("r", ""),
            &m,
            &[("attribute/temp", cold)],
        )
    };
    assert_eq!(none_hot(""), Vec::<u32>::new(), "may keep no one");
    assert_eq!(none_hot(r#""fallbackOnEmpty": true,"#), vec![0, 1, 2, 3], "or everyone, when asked");

    let t = "endpoint-attribute-filter";
    let threshold = r#""algorithm": {"type": "threshold", "threshold": {"operator": "LessThan", "value": 1}}"#;
    rejected(t, &format!("{{{threshold}}}"), "attribute");
    rejected(t, &format!(r#"{{"attribute": "t", "onMissing": "Skip", {threshold}}}"#), "onMissing");
    rejected(t, r#"{"attribute": "t", "algorithm": {"type": "percentile"}}"#, "algorithm.type");
    rejected(t, r#"{"attribute": "t", "algorithm": {"type": "threshold"}}"#, "algorithm.threshold");
    rejected(
        t,
        r#"{"attribute": "t", "algorithm": {"type": "threshold", "threshold": {"operator": "Below", "value": 1}}}"#,
        "Below",
    );
    rejected(t, &format!(r#"{{"attribute": "gpu/temp", {threshold}}}"#), "attribute");
}

#[test]
fn label_selector_filter_table() {
    let mut eps = pool(4);
    let label = |e: &mut EndpointInfo, k: &str, v: &str| e.labels.push((k.into(), v.into()));
    label(&mut eps[0], "gpu", "H100");
    label(&mut eps[0], "model", "q");
    label(&mut eps[1], "gpu", "A100");
    label(&mut eps[1], "model", "q");
    label(&mut eps[2], "gpu", "H100");
    label(&mut eps[2], "draining", "true");
    label(&mut eps[3], "llm-d.ai/role", "decode");
    let m = idle(4);
    let req = request("r", "");
    let cases: &[(&str, &[u32])] = &[
        (r#"{}"#, &[0, 1, 2, 3]),
        (r#"{"matchLabels": {"model": "q"}}"#, &[0, 1]),
        (r#"{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["H100", "H200"]}]}"#, &[0, 2]),
        (r#"{"matchExpressions": [{"key": "gpu", "operator": "NotIn", "values": ["H100"]}]}"#, &[1, 3]),
        (
            r#"{"matchExpressions": [{"key": "draining", "operator": "DoesNotExist"}], "matchLabels": {"gpu": "H100"}}"#,
            &[0],
        ),
        (r#"{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}"#, &[0, 1, 2]),
        (r#"{"matchLabels": {"gpu": "T4"}}"#, &[]),
        (r#"{"matchLabels": {"llm-d.ai/role": "decode"}}"#, &[3]),
        (r#"{"matchExpressions": [{"key": "llm-d.ai/role", "operator": "In", "values": ["", "decode"]}]}"#, &[3]),
    ];
    for (params, want) in cases {
        for type_name in ["label-selector-filter", "by-label-selector"] {
            let f = filter::<LabelSelectorFilter>(type_name, params);
            f.pool_changed(&eps);
            assert_eq!(f.filter(1, &req, &m, &[]), *want, "{type_name} {params}");
        }
    }
    // Upstream's deprecated `by-label`: one label, its valid values, and maybe the unlabelled.
    let by_label: &[(&str, &[u32])] = &[
        (r#"{"label": "gpu", "validValues": ["H100"]}"#, &[0, 2]),
        (r#"{"label": "gpu", "validValues": ["A100", "T4"], "allowsNoLabel": true}"#, &[1, 3]),
        (r#"{"label": "draining", "allowsNoLabel": true}"#, &[0, 1, 3]),
        // As upstream, a missing label reads as "", which validValues may list.
        (r#"{"label": "draining", "validValues": [""]}"#, &[0, 1, 3]),
    ];
    for (params, want) in by_label {
        let f = filter::<LabelSelectorFilter>("by-label", params);
        f.pool_changed(&eps);
        assert_eq!(f.filter(1, &req, &m, &[]), *want, "by-label {params}");
    }
    for (params, field) in [
        (r#"{"label": "gpu"}"#, "validValues must list"),
        (r#"{"label": "gpu", "validValues": ["H100"], "matchLabels": {"model": "q"}}"#, "not both"),
        (r#"{"validValues": ["H100"]}"#, "need `label`"),
        (r#"{"label": "gpu type", "validValues": ["H100"]}"#, "label `gpu type`"),
        (r#"{"label": "gpu", "validValues": ["H 100"]}"#, "validValues[0]"),
    ] {
        rejected("by-label", params, field);
    }
    rejected("label-selector-filter", r#"{"matchExpressions": [{"key": "gpu", "operator": "Near"}]}"#, "operator");
    rejected("label-selector-filter", r#"{"matchExpressions": [{"key": "gpu", "operator": "In"}]}"#, "In");
    // Label syntax as Kubernetes selectors check it (a typo would otherwise match no one).
    for (params, field) in [
        (r#"{"matchLabels": {"model": "Qwen3 32B"}}"#, "matchLabels.model value"),
        (r#"{"matchLabels": {"gpu type": "H100"}}"#, "matchLabels key `gpu type`"),
        (r#"{"matchLabels": {"LLM_D.ai/role": "decode"}}"#, "prefix"),
        (r#"{"matchLabels": {"llm-d.ai/": "decode"}}"#, "needs a name"),
        (r#"{"matchLabels": {"gpu": "-H100"}}"#, "starting and ending"),
        (r#"{"matchExpressions": [{"key": "gpu=H100", "operator": "Exists"}]}"#, "matchExpressions[0].key"),
        (r#"{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["H100", "H 200"]}]}"#, "values[1]"),
    ] {
        rejected("label-selector-filter", params, field);
    }
    let long = "x".repeat(64);
    rejected("label-selector-filter", &format!(r#"{{"matchLabels": {{"gpu": "{long}"}}}}"#), "63 characters");
}

#[test]
fn max_score_picker_table() {
    let p = picker::<MaxScorePicker>("max-score-picker", "{}");
    let m = idle(4);
    let req = request("r", "");
    assert_eq!(p.pick(&req, &m, &[0.1, 0.9, 0.5, 0.2]), vec![1]);
    assert_eq!(p.pick(&req, &m, &[NAN, 0.0, 0.0, 3.0]), vec![3]);
    assert_eq!(p.pick(&req, &idle(1), &[0.0]), vec![0]);
    assert!(p.pick(&req, &idle(0), &[]).is_empty());
    // Ties are broken at random, reproducibly per seed, and all tied endpoints get chosen.
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let mut r = request("r", "");
        r.random_seed = seed;
        let got = p.pick(&r, &m, &[1.0, 0.2, 1.0, 1.0]);
        assert_eq!(got.len(), 1);
        assert!([0, 2, 3].contains(&got[0]), "{got:?}");
        seen.insert(got[0]);
    }
    assert_eq!(seen.len(), 3, "ties must be broken randomly: {seen:?}");

    let p2 = picker::<MaxScorePicker>("max-score-picker", r#"{"maxNumOfEndpoints": 3}"#);
    assert_eq!(p2.pick(&req, &m, &[0.1, 0.9, 0.5, 0.2]), vec![1, 2, 3]);
    assert_eq!(p2.pick(&req, &idle(2), &[0.3, 0.4]), vec![1, 0]);
}

#[test]
fn random_picker_is_uniform_and_seeded() {
    let p = picker::<RandomPicker>("random-picker", "{}");
    let m = idle(4);
    let mut counts = [0u32; 4];
    for seed in 0..400 {
        let mut r = request("r", "");
        r.random_seed = seed;
        let got = p.pick(&r, &m, &[0.0; 4]);
        assert_eq!(got.len(), 1);
        counts[got[0] as usize] += 1;
    }
    // Expected 100 each; ±50 is > 5 standard deviations.
    assert!(counts.iter().all(|&c| (50..=150).contains(&c)), "{counts:?}");
    let p3 = picker::<RandomPicker>("random-picker", r#"{"maxNumOfEndpoints": 3}"#);
    let got = p3.pick(&request("r", ""), &m, &[0.0; 4]);
    assert_eq!(got.len(), 3);
    assert!(p3.pick(&request("r", ""), &idle(0), &[]).is_empty());
}

#[test]
fn weighted_random_picker_follows_weights() {
    let p = picker::<WeightedRandomPicker>("weighted-random-picker", "{}");
    let m = idle(3);
    let scores = [1.0, 3.0, 0.0];
    let mut counts = [0u32; 3];
    for seed in 0..800 {
        let mut r = request("r", "");
        r.random_seed = seed;
        counts[p.pick(&r, &m, &scores)[0] as usize] += 1;
    }
    // Expected 200 / 600 / 0.
    assert_eq!(counts[2], 0, "zero weight must lose to any positive one: {counts:?}");
    assert!((130..=270).contains(&counts[0]), "{counts:?}");
    // All zero or NaN: still picks one of them.
    assert_eq!(p.pick(&request("r", ""), &m, &[0.0, NAN, 0.0]).len(), 1);
    let p3 = picker::<WeightedRandomPicker>("weighted-random-picker", r#"{"maxNumOfEndpoints": 3}"#);
    let got = p3.pick(&request("r", ""), &m, &scores);
    assert_eq!(got.last(), Some(&2), "zero weight comes last: {got:?}");
}

#[test]
fn pickers_reject_zero_endpoints_parameter() {
    for t in ["max-score-picker", "random-picker", "weighted-random-picker"] {
        rejected(t, r#"{"maxNumOfEndpoints": 0}"#, "maxNumOfEndpoints");
    }
}

#[test]
fn manifests_ask_only_for_what_each_plugin_uses() {
    // (type, reads the prompt, asks for decided) — scorers that never look at the prompt
    // must not be sent it.
    let cases = [
        ("approx-prefix-cache-producer", true, true),
        ("inflight-load-producer", false, true),
        ("prefix-cache-scorer", false, false),
        ("queue-scorer", false, false),
        ("kv-cache-utilization-scorer", false, false),
        ("no-hit-lru-scorer", false, true),
        ("token-load-scorer", false, false),
        ("active-request-scorer", false, false),
        ("prefix-cache-affinity-filter", false, false),
        ("max-score-picker", false, false),
        ("running-requests-size-scorer", false, false),
        ("load-aware-scorer", false, false),
        ("session-affinity-filter", false, true),
        ("context-length-aware", false, false),
        ("context-length-aware-filter", false, false),
    ];
    for (t, prompt, decided) in cases {
        let needs = wasm(t, "{}").core().manifest().needs;
        assert_eq!((needs.prompt, needs.decided), (prompt, decided), "{t}: {needs:?}");
    }
}
