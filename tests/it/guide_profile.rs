//! The upstream no-Kubernetes guide's config (`config/guide/epp-config.yaml`,
//! unchanged: the older optimized baseline) built from the embedded components, run over
//! hand-computed snapshots. Weights: queue 2, kv-cache 2, prefix 3, no-hit-lru 2.

use epp::config::PickerConfig;
use epp::loader::{PluginSet, build};
use epp_core::{Candidates, CycleResult, Request, ScheduleError, SchedulerProfile};

use crate::common::*;

const GUIDE_CONFIG: &str = include_str!("../../config/guide/epp-config.yaml");

/// The guide's profile, told a pool of `endpoints`; it owns a counter of cycle ids.
struct Guide {
    profile: SchedulerProfile,
    cycle: std::cell::Cell<u64>,
}

impl Guide {
    fn schedule(&self, req: &Request, m: &Candidates) -> Result<CycleResult, ScheduleError> {
        self.cycle.set(self.cycle.get() + 1);
        self.profile.schedule(self.cycle.get(), req, m)
    }
    fn plugins(&self) -> &[epp_core::PluginHandle] {
        self.profile.plugins()
    }
}

fn baseline(endpoints: u32) -> Guide {
    let config = PickerConfig::parse(GUIDE_CONFIG, None).expect("the guide's config parses");
    let mut scheduler = build(runtime(), &config, &PluginSet::default()).expect("the guide's profile builds").scheduler;
    let profile = scheduler.variants.remove(0).profile;
    profile.pool_changed(1, &pool(endpoints));
    Guide { profile, cycle: Default::default() }
}

#[test]
fn the_guide_profile_has_the_older_baseline_plugins() {
    let profile = baseline(1);
    let names: Vec<&str> = profile.plugins().iter().map(|p| p.core().name()).collect();
    assert_eq!(
        names,
        [
            "approx-prefix-cache-producer",
            "queue-scorer",
            "kv-cache-utilization-scorer",
            "prefix-cache-scorer",
            "no-hit-lru-scorer",
            "max-score-picker"
        ]
    );
    assert_eq!(profile.profile.weights(), [2.0, 2.0, 3.0, 2.0]);
}

#[test]
fn prefix_hit_wins_on_an_idle_pool() {
    let profile = baseline(3);
    let m = idle(3);
    let prompt = blocks_prompt('s', 6);
    // Cold, nobody used: queue 2 + kv 2 everywhere, no-hit-lru 2×[1, .5, 0] → endpoint 0.
    let d = profile.schedule(&request("r1", &prompt), &m).unwrap();
    assert_eq!(d.targets, vec![0]);
    assert_eq!(d.total_scores, vec![6.0, 5.0, 4.0]);
    // Warm: endpoint 0 holds the whole prefix: 2+2+3+1 = 8 against 2+2+0+1 = 5.
    let d = profile.schedule(&request("r2", &prompt), &m).unwrap();
    assert_eq!(d.targets, vec![0]);
    assert_eq!(d.total_scores, vec![8.0, 5.0, 5.0]);
}

#[test]
fn load_outweighs_a_prefix_hit_on_a_busy_endpoint() {
    let profile = baseline(3);
    let prompt = blocks_prompt('s', 6);
    assert_eq!(profile.schedule(&request("r1", &prompt), &idle(3)).unwrap().targets, vec![0]);
    // Endpoint 0 holds the prefix but has the longest queue and a nearly full cache:
    // 0 + 2×0.1 + 3 + 1 = 4.2; endpoint 1: 2×1 + 2×1 + 0 + 1 = 5; endpoint 2: 2×0.5 + 2 + 1 = 4.
    let busy = metrics(&[(0, 10.0, 4.0, 0.9), (1, 0.0, 0.0, 0.0), (2, 5.0, 1.0, 0.0)]);
    let d = profile.schedule(&request("r2", &prompt), &busy).unwrap();
    assert_eq!(d.targets, vec![1]);
    let want = [4.2f32, 5.0, 4.0];
    assert!(d.total_scores.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5), "{:?}", d.total_scores);
}

#[test]
fn cold_requests_spread_over_the_pool() {
    let profile = baseline(4);
    let m = idle(4);
    let picks: Vec<u32> = (0..4)
        .map(|i| {
            let prompt = blocks_prompt(char::from(b'a' + i as u8), 4);
            profile.schedule(&request(&format!("c{i}"), &prompt), &m).unwrap().targets[0]
        })
        .collect();
    let mut sorted = picks.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 1, 2, 3], "four cold prompts should land on four endpoints: {picks:?}");
    // Each prompt now sticks to where it landed.
    for i in 0..4u32 {
        let prompt = blocks_prompt(char::from(b'a' + i as u8), 4);
        let d = profile.schedule(&request(&format!("w{i}"), &prompt), &m).unwrap();
        assert_eq!(d.targets[0], picks[i as usize], "prompt {i}");
    }
}

#[test]
fn unknown_metrics_never_produce_bad_scores() {
    let profile = baseline(3);
    let m = metrics(&[(0, f32::NAN, f32::NAN, f32::NAN), (1, 1.0, 0.0, 0.5), (2, f32::NAN, 0.0, 0.2)]);
    let d = profile.schedule(&request("r", &blocks_prompt('x', 2)), &m).unwrap();
    assert!(d.total_scores.iter().all(|s| s.is_finite() && *s >= 0.0), "{:?}", d.total_scores);
    // Endpoint 1 is the only one with known queue and kv: 2 + 1 + 2×0.5(no-hit) → it wins.
    assert_eq!(d.targets, vec![1]);
}

#[test]
fn empty_candidates_is_a_scheduling_error() {
    let profile = baseline(0);
    let err = profile.schedule(&request("r", "x"), &idle(0)).unwrap_err();
    assert_eq!(err, ScheduleError::NoCandidates);
}
