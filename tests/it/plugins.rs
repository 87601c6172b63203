//! Table-driven tests of every default plugin, run against both builds of the same crate:
//! the wasm component (through the host runtime) and the native library. Each case checks
//! the expected result and that the two builds agree bit for bit.

use std::sync::Arc;

use approx_prefix_cache_producer::PrefixIndexProducer;
use epp::scheduler::{PickerPlugin, PluginCore, ProducerPlugin, ScorerPlugin};
use kv_cache_utilization_scorer::KvCacheUtilizationScorer;
use llmd_plugin_sdk::columns::{PREFIX_MATCHED_BLOCKS, PREFIX_TOTAL_BLOCKS};
use llmd_plugin_sdk::{Column, EndpointInfo, Metrics, Request};
use lora_affinity_scorer::LoraAffinityScorer;
use max_score_picker::MaxScorePicker;
use no_hit_lru_scorer::NoHitLruScorer;
use prefix_cache_scorer::PrefixCacheScorer;
use queue_scorer::QueueScorer;
use random_picker::RandomPicker;
use weighted_random_picker::WeightedRandomPicker;

use crate::common::*;

const NAN: f32 = f32::NAN;

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
    fn pre_request(&self, id: &str, chosen: &[u32]) {
        self.native.pre_request(id, chosen).unwrap();
        self.wasm.pre_request(id, chosen).unwrap();
    }
}

impl Twin<dyn ScorerPlugin> {
    fn score(&self, req: &Request, m: &Metrics, cols: &[Column]) -> Vec<f32> {
        let a = self.native.score(req, m, cols).expect("native score");
        let b = self.wasm.score(req, m, cols).expect("wasm score");
        assert_eq!(bits(&a), bits(&b), "native {a:?} vs wasm {b:?}");
        for s in &a {
            assert!(s.is_finite() && (0.0..=1.0).contains(s), "score {s} out of [0,1] in {a:?}");
        }
        a
    }
}

impl Twin<dyn PickerPlugin> {
    fn pick(&self, req: &Request, m: &Metrics, scores: &[f32]) -> Vec<u32> {
        let a = self.native.pick(req, m, scores).expect("native pick");
        let b = self.wasm.pick(req, m, scores).expect("wasm pick");
        assert_eq!(a, b, "native vs wasm pick");
        a
    }
}

impl Twin<dyn ProducerPlugin> {
    fn produce(&self, req: &Request, m: &Metrics) -> Vec<Column> {
        let a = self.native.produce(req, m).expect("native produce");
        let b = self.wasm.produce(req, m).expect("wasm produce");
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.name, y.name);
            assert_eq!(bits(&x.values), bits(&y.values), "column {}", x.name);
        }
        a
    }
}

fn scorer<T: llmd_plugin_sdk::Scorer + Send + 'static>(type_name: &str, params: &str) -> Twin<dyn ScorerPlugin> {
    Twin { native: native::<T>(type_name, params), wasm: wasm_scorer(type_name, params) }
}

fn picker<T: llmd_plugin_sdk::Picker + Send + 'static>(type_name: &str, params: &str) -> Twin<dyn PickerPlugin> {
    Twin { native: native::<T>(type_name, params), wasm: wasm_picker(type_name, params) }
}

fn producer(params: &str) -> Twin<dyn ProducerPlugin> {
    let t = "approx-prefix-cache-producer";
    Twin { native: native::<PrefixIndexProducer>(t, params), wasm: wasm_producer(t, params) }
}

fn prefix_cols(matched: &[f32], total: &[f32]) -> Vec<Column> {
    vec![
        Column { name: PREFIX_MATCHED_BLOCKS.into(), values: matched.to_vec() },
        Column { name: PREFIX_TOTAL_BLOCKS.into(), values: total.to_vec() },
    ]
}

fn approx(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
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
        let got = s.score(&req, &m, &[]);
        assert!(approx(&got, want), "kv {kv:?}: got {got:?}, want {want:?}");
    }
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
        let got = s.score(&req, &m, &[]);
        assert!(approx(&got, want), "queue {q:?}: got {got:?}, want {want:?}");
    }
}

#[test]
fn prefix_cache_scorer_table() {
    let s = scorer::<PrefixCacheScorer>("prefix-cache-scorer", "{}");
    let req = request("r", "hello");
    let m = idle(3);
    let cases: Vec<(Vec<Column>, Vec<f32>)> = vec![
        (prefix_cols(&[0.0, 2.0, 4.0], &[4.0, 4.0, 4.0]), vec![0.0, 0.5, 1.0]),
        (prefix_cols(&[0.0, 0.0, 0.0], &[0.0, 0.0, 0.0]), vec![0.0, 0.0, 0.0]),
        (prefix_cols(&[NAN, 9.0, 1.0], &[4.0, 4.0, 4.0]), vec![0.0, 1.0, 0.25]),
        (vec![], vec![0.0, 0.0, 0.0]),
    ];
    for (cols, want) in cases {
        let got = s.score(&req, &m, &cols);
        assert!(approx(&got, &want), "cols {cols:?}: got {got:?}, want {want:?}");
    }
    assert!(s.score(&req, &idle(0), &prefix_cols(&[], &[])).is_empty());
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
    m.age_ms.push(0);
    assert_eq!(s.score(&req, &m, &[]), vec![1.0, 0.8, 0.6, 0.0, 0.0, 0.0]);
}

#[test]
fn no_hit_lru_scorer_spreads_cold_requests() {
    let s = scorer::<NoHitLruScorer>("no-hit-lru-scorer", "{}");
    s.pool_changed(&pool(3));
    let m = idle(3);
    let cold = prefix_cols(&[0.0, 0.0, 0.0], &[4.0, 4.0, 4.0]);
    // Nobody used yet: candidate order decides.
    assert!(approx(&s.score(&request("a", ""), &m, &cold), &[1.0, 0.5, 0.0]));
    s.pre_request("a", &[1]);
    // Endpoint 1 was used: never-used first (0, 2), then 1.
    assert!(approx(&s.score(&request("b", ""), &m, &cold), &[1.0, 0.0, 0.5]));
    s.pre_request("b", &[0]);
    // Never used: 2; then 1 (older), then 0 (newest).
    assert!(approx(&s.score(&request("c", ""), &m, &cold), &[0.0, 0.5, 1.0]));
    // A warm request is neutral, and its pick does not touch the LRU.
    let warm = prefix_cols(&[0.0, 3.0, 0.0], &[4.0, 4.0, 4.0]);
    assert_eq!(s.score(&request("d", ""), &m, &warm), vec![0.5, 0.5, 0.5]);
    s.pre_request("d", &[2]);
    assert!(approx(&s.score(&request("e", ""), &m, &cold), &[0.0, 0.5, 1.0]));
    // One candidate always scores 1; no candidates, nothing.
    assert_eq!(s.score(&request("f", ""), &idle(1), &prefix_cols(&[0.0], &[1.0])), vec![1.0]);
    assert!(s.score(&request("g", ""), &idle(0), &[]).is_empty());
    // Without the producer's columns a request counts as cold.
    assert!(approx(&s.score(&request("h", ""), &m, &[]), &[0.0, 0.5, 1.0]));
}

#[test]
fn prefix_producer_matches_consecutive_blocks() {
    let p = producer("{}");
    p.pool_changed(&pool(3));
    let m = idle(3);
    let long = blocks_prompt('a', 8);
    // Cold index: nothing matched, 8 full blocks.
    let cols = p.produce(&request("r1", &long), &m);
    assert_eq!(cols[0].name, PREFIX_MATCHED_BLOCKS);
    assert_eq!(cols[0].values, vec![0.0, 0.0, 0.0]);
    assert_eq!(cols[1].values, vec![8.0, 8.0, 8.0]);
    p.pre_request("r1", &[2, 0]); // only the primary records
    // Same prompt: endpoint 2 holds all of it.
    assert_eq!(p.produce(&request("r2", &long), &m)[0].values, vec![0.0, 0.0, 8.0]);
    // First half shared, then different: 4 blocks matched.
    let half = format!("{}{}", &long[..4 * 64], blocks_prompt('b', 4));
    assert_eq!(p.produce(&request("r3", &half), &m)[0].values, vec![0.0, 0.0, 4.0]);
    // A partial trailing block does not count; a prompt under one block has no blocks.
    assert_eq!(p.produce(&request("r4", &long[..100]), &m)[1].values, vec![1.0, 1.0, 1.0]);
    assert_eq!(p.produce(&request("r5", "short"), &m)[1].values, vec![0.0, 0.0, 0.0]);
    // Another model or cache salt shares nothing.
    let mut other_model = request("r6", &long);
    other_model.model = "other".into();
    assert_eq!(p.produce(&other_model, &m)[0].values, vec![0.0, 0.0, 0.0]);
    let mut salted = request("r7", &long);
    salted.cache_salt = Some("tenant-a".into());
    assert_eq!(p.produce(&salted, &m)[0].values, vec![0.0, 0.0, 0.0]);
    // Endpoint 2 leaves the pool: its entries are forgotten.
    p.pool_changed(&pool(2));
    assert_eq!(p.produce(&request("r8", &long), &m)[0].values, vec![0.0, 0.0, 0.0]);
}

#[test]
fn prefix_producer_limits_blocks_and_evicts() {
    let p = producer(r#"{"maxPrefixBlocksToMatch": 3, "lruCapacityPerServer": 4, "blockSizeTokens": 16}"#);
    p.pool_changed(&pool(2));
    let m = idle(2);
    let a = blocks_prompt('a', 10);
    assert_eq!(p.produce(&request("r1", &a), &m)[1].values, vec![3.0, 3.0]);
    p.pre_request("r1", &[0]);
    assert_eq!(p.produce(&request("r2", &a), &m)[0].values, vec![3.0, 0.0]);
    // 3 new blocks on endpoint 0 push out 2 of the 3 old ones (capacity 4): the chain breaks.
    let b = blocks_prompt('b', 3);
    p.produce(&request("r3", &b), &m);
    p.pre_request("r3", &[0]);
    assert_eq!(p.produce(&request("r4", &a), &m)[0].values, vec![0.0, 0.0]);
    assert_eq!(p.produce(&request("r5", &b), &m)[0].values, vec![3.0, 0.0]);
}

#[test]
fn prefix_producer_rejects_bad_parameters() {
    for params in [r#"{"blockSizeTokens": 0}"#, r#"{"lruCapacityPerServer": 0}"#, r#"{"bogus": 1}"#, "[1,2]"] {
        let bytes = epp::wasm::embedded::find("approx-prefix-cache-producer").unwrap();
        let err = runtime()
            .load("p", bytes, params, Default::default(), Default::default())
            .err()
            .unwrap_or_else(|| panic!("{params} accepted"));
        assert!(err.to_string().contains("configuration"), "{params}: {err}");
    }
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
    let bytes = epp::wasm::embedded::find("max-score-picker").unwrap();
    let err = runtime().load("p", bytes, r#"{"maxNumOfEndpoints": 0}"#, Default::default(), Default::default()).err();
    assert!(err.expect("rejected").to_string().contains("maxNumOfEndpoints"));
}
