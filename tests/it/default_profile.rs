//! The default config (upstream's current optimized baseline, plus the prefix and LoRA
//! scorers) built from the embedded components and driven through `Scheduler::decide` with
//! its hooks, over hand-made snapshots: sticky until saturated.

use epp::config::PickerConfig;
use epp::loader::{PluginSet, build};
use epp_core::{CacheInfo, Candidates, Completion, Decision, Outcome, Request, Scheduler};

use crate::common::*;

struct Default {
    scheduler: Scheduler,
    cycle: std::cell::Cell<u64>,
}

impl Default {
    fn new(endpoints: u32) -> Default {
        let config = PickerConfig::default_config().expect("the default config parses");
        let scheduler = build(runtime(), &config, &PluginSet::default()).expect("it builds").scheduler;
        let mut eps = pool(endpoints);
        for e in &mut eps {
            // Roomy caches: 4096 blocks of 16 tokens each.
            e.cache = Some(CacheInfo { block_size: 16, num_gpu_blocks: 4096 });
        }
        scheduler.pool_changed(1, &eps);
        Default { scheduler, cycle: std::cell::Cell::new(0) }
    }

    /// Decides, then finishes the request at once (its load released) unless `keep`.
    fn route(&self, req: &Request, m: &Candidates, keep: bool) -> Decision {
        self.cycle.set(self.cycle.get() + 1);
        let cycle = self.cycle.get();
        let d = self.scheduler.decide(cycle, req, m.clone()).expect("decides");
        if !keep {
            let done = Completion { endpoint: d.primary(), outcome: Outcome::Completed, status: 200, usage: None };
            self.scheduler.finished(&[d.variant], cycle, &done);
        }
        d
    }
}

#[test]
fn the_default_profile_is_the_sticky_baseline() {
    let d = Default::new(1);
    let names: Vec<&str> = d.scheduler.primary().plugins().iter().map(|p| p.core().name()).collect();
    assert_eq!(
        names,
        [
            "approx-prefix-cache-producer",
            "inflight-load-producer",
            "prefix-cache-affinity-filter",
            "prefix-cache-scorer",
            "token-load-scorer",
            "lora-affinity-scorer",
            "active-request-scorer",
            "no-hit-lru-scorer",
            "max-score-picker"
        ]
    );
}

#[test]
fn a_prefix_sticks_to_the_worker_that_holds_it() {
    let d = Default::new(3);
    let m = idle(3);
    let prompt = blocks_prompt('s', 8);
    let first = d.route(&request("r1", &prompt), &m, false).primary();
    for i in 0..10 {
        let follow_up = format!("{prompt}{}", blocks_prompt(char::from(b'a' + i), 1));
        assert_eq!(d.route(&request("r", &follow_up), &m, false).primary(), first, "turn {i}");
    }
}

#[test]
fn cold_requests_go_to_the_worker_with_the_least_prompt_work_in_flight() {
    let d = Default::new(3);
    let m = idle(3);
    // Two long requests in flight (not finished) on two workers.
    let a = d.route(&request("a", &blocks_prompt('a', 16)), &m, true).primary();
    let b = d.route(&request("b", &blocks_prompt('b', 16)), &m, true).primary();
    assert_ne!(a, b, "the second cold request avoids the first one's worker");
    let c = d.route(&request("c", &blocks_prompt('c', 4)), &m, true).primary();
    assert!(c != a && c != b, "the third goes to the idle worker: {a} {b} {c}");
}

#[test]
fn cold_requests_that_load_cannot_separate_spread_over_the_workers() {
    let d = Default::new(4);
    let m = idle(4);
    // Each finishes before the next arrives: no load anywhere, so only the tie-breaker speaks.
    let picks: std::collections::BTreeSet<u32> = (0..4)
        .map(|i| d.route(&request(&format!("c{i}"), &blocks_prompt(char::from(b'k' + i), 4)), &m, false).primary())
        .collect();
    assert_eq!(picks.len(), 4, "four new prefixes on four idle workers: {picks:?}");
}

#[test]
fn a_full_queue_breaks_stickiness_and_unknown_load_is_never_preferred() {
    let d = Default::new(3);
    let prompt = blocks_prompt('s', 8);
    let holder = d.route(&request("r1", &prompt), &idle(3), false).primary();
    // The holder's queue is over the threshold (5): it is left out, the prefix goes elsewhere.
    let rows: Vec<(u32, f32, f32, f32)> = (0..3).map(|i| (i, if i == holder { 9.0 } else { 0.0 }, 0.0, 0.1)).collect();
    let moved = d.route(&request("r2", &prompt), &metrics(&rows), false).primary();
    assert_ne!(moved, holder);
    // A busy KV cache alone does not: affinity holds (both workers now hold the prefix).
    let rows: Vec<(u32, f32, f32, f32)> = (0..3).map(|i| (i, 0.0, 0.0, if i == holder { 0.95 } else { 0.1 })).collect();
    for _ in 0..8 {
        let pick = d.route(&request("r3", &prompt), &metrics(&rows), false).primary();
        assert!(pick == holder || pick == moved, "{pick} holds no prefix ({holder}, {moved} do)");
    }
    // Stale metrics everywhere but one worker: only it is admitted.
    let mut m = idle(3);
    m.age_ms = vec![60_000.0, 10.0, 60_000.0];
    assert_eq!(d.route(&request("r4", &blocks_prompt('z', 2)), &m, false).primary(), 1);
}

#[test]
fn lora_requests_prefer_workers_running_their_adapter() {
    let d = Default::new(3);
    let mut eps = pool(3);
    eps[2].running_adapters = vec!["sql-lora".into()];
    eps[0].max_lora = Some(1);
    eps[0].running_adapters = vec!["chat-lora".into()];
    eps[1].max_lora = Some(1);
    eps[1].running_adapters = vec!["other".into()];
    d.scheduler.pool_changed(2, &eps);
    let mut req = request("r", &blocks_prompt('q', 2));
    req.model = "sql-lora".into();
    assert_eq!(d.route(&req, &idle(3), false).primary(), 2);
}

/// When one candidate is left after the filters the pick is settled: scorers and the picker
/// that declare no state are not called, a scorer that keeps state still is, and the pick is
/// that candidate. With more candidates every plugin runs.
#[test]
fn a_settled_pick_skips_the_stateless_scorers_and_picker() {
    use epp_core::{SchedulerProfile, Weight, WeightedScorer};
    let profile = SchedulerProfile::new(
        "settled",
        vec![],
        vec![],
        vec![
            WeightedScorer { scorer: wasm_scorer("queue-scorer", "{}"), weight: Weight::ONE },
            WeightedScorer { scorer: wasm_scorer("lora-affinity-scorer", "{}"), weight: Weight::ONE },
            WeightedScorer { scorer: wasm_scorer("session-affinity-scorer", "{}"), weight: Weight::ONE },
        ],
        wasm_picker("max-score-picker", "{}"),
    )
    .expect("a valid profile");
    profile.pool_changed(1, &pool(3));
    let names = |timings: &[epp_core::PluginTiming]| -> Vec<String> {
        timings.iter().map(|t| profile.plugins()[t.plugin].core().name().to_string()).collect()
    };
    let req = request("r", "hello");
    let one = metrics(&[(2, 0.0, 0.0, 0.0)]);
    let settled = profile.schedule(1, &req, &one).expect("schedules");
    assert_eq!(settled.targets, vec![2]);
    assert_eq!(names(&settled.timings), vec!["session-affinity-scorer"]);
    let three = metrics(&[(0, 3.0, 0.0, 0.0), (1, 0.0, 0.0, 0.0), (2, 1.0, 0.0, 0.0)]);
    let open = profile.schedule(2, &req, &three).expect("schedules");
    assert_eq!(open.targets[0], 1);
    assert_eq!(
        names(&open.timings),
        vec!["queue-scorer", "lora-affinity-scorer", "session-affinity-scorer", "max-score-picker"]
    );
}

/// A non-streamed request shows no first chunk: its prompt tokens are held as load for as
/// long as a prefill at the default pace takes (10 000 tokens a second until streamed
/// requests teach another). Nothing made up at load may teach one: the probe's requests,
/// first chunk in the same millisecond as the decision, once set a pace of 0.1 µs a token,
/// which released such a request's load at once.
#[test]
fn a_non_streamed_requests_prompt_load_is_held_at_the_default_pace() {
    let d = Default::new(2);
    let m = idle(2);
    let mut long = request("long", &blocks_prompt('l', 64));
    (long.stream, long.now_ms) = (false, 1_000);
    let busy = d.route(&long, &m, true).primary();
    // The other worker runs two streamed requests whose prompts are done (first chunk
    // seen): more requests in flight there, but no prompt work.
    for (i, tag) in ['s', 't'].into_iter().enumerate() {
        let mut short = request(&format!("short-{i}"), &blocks_prompt(tag, 2));
        short.now_ms = 1_001;
        let dec = d.route(&short, &m, true);
        assert_ne!(dec.primary(), busy, "a cold request joined the long prefill");
        d.scheduler.first_chunk(&[dec.variant], d.cycle.get(), dec.primary(), 1_003);
    }
    // 50 ms after the long one was sent its 4 096 prompt tokens are still being prefilled.
    let mut cold = request("cold", &blocks_prompt('c', 2));
    cold.now_ms = 1_050;
    assert_ne!(d.route(&cold, &m, false).primary(), busy, "the long prefill's load was released early");
}
