//! Misbehaving plugins: a trap, an endless loop and a runaway allocation each come back as
//! an error value within the deadline, the instance is rebuilt, and scheduling goes on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use epp::wasm::{LoadError, Sandbox};
use epp_core::{
    Candidates, FailurePolicy, PluginError, PluginHandle, ScheduleError, SchedulerProfile, ScorerPlugin, Weight,
    WeightedScorer,
};

use crate::common::*;

/// Generous bound for "returned promptly": the deadline is 50 ms, this only catches hangs.
const PROMPT: Duration = Duration::from_secs(5);

fn sandbox(mode: &str) -> Sandbox {
    // Filling 64 MiB can take longer than 50 ms on a loaded machine: give the allocating
    // plugin a long deadline so that the memory cap, not the clock, is what stops it. The
    // trapping one gets it too: it traps at once, and a busy CI machine that deschedules a
    // call for 50 ms must not turn an expected trap into a timeout.
    let call_timeout_ms = if matches!(mode, "alloc" | "trap") { 3_000 } else { 50 };
    Sandbox { memory_bytes: 64 << 20, call_timeout_ms, setup_timeout_ms: 2_000, breaker: true }
}

fn misbehaving(mode: &str, policy: FailurePolicy) -> Result<Arc<dyn ScorerPlugin>, LoadError> {
    let bytes = wasm_file_bytes("misbehaving_scorer");
    let params = format!(r#"{{"mode": "{mode}"}}"#);
    match runtime().load(&format!("misbehaving-{mode}"), &bytes, &params, sandbox(mode), policy)? {
        PluginHandle::Scorer(s) => Ok(s),
        other => panic!("unexpected role {other:?}"),
    }
}

fn profile_with(bad: Arc<dyn ScorerPlugin>) -> SchedulerProfile {
    let queue = wasm_scorer("queue-scorer", "{}");
    SchedulerProfile::new(
        "test",
        vec![],
        vec![],
        vec![
            WeightedScorer { scorer: queue, weight: Weight::ONE },
            WeightedScorer { scorer: bad, weight: Weight::new(5.0).unwrap() },
        ],
        wasm_picker("max-score-picker", "{}"),
    )
    .expect("a valid profile")
}

/// One call of `s` over `candidates`.
fn score(s: &dyn ScorerPlugin, candidates: &Candidates) -> Result<Vec<f32>, PluginError> {
    let req = request("r", "");
    let cols = columns_for(s.manifest(), candidates, &[]);
    s.score(&input(1, &req, candidates, &cols))
}

fn busy_metrics() -> Candidates {
    metrics(&[(0, 4.0, 0.0, 0.0), (1, 0.0, 0.0, 0.0), (2, 8.0, 0.0, 0.0)])
}

#[test]
fn failures_come_back_as_errors_within_the_deadline() {
    type IsExpected = fn(&PluginError) -> bool;
    let cases: &[(&str, IsExpected)] = &[
        ("trap", |e| matches!(e, PluginError::Trap(_))),
        ("loop", |e| matches!(e, PluginError::Timeout(50))),
        ("alloc", |e| matches!(e, PluginError::MemoryLimit(_))),
    ];
    for (mode, expected) in cases {
        let bad = misbehaving(mode, FailurePolicy::FailOpen).expect("loads");
        for attempt in 0..3 {
            let started = Instant::now();
            let err = score(bad.as_ref(), &idle(3)).expect_err("must fail");
            assert!(expected(&err), "{mode} attempt {attempt}: unexpected error {err:?}");
            assert!(started.elapsed() < PROMPT, "{mode}: took {:?}", started.elapsed());
        }
    }
}

#[test]
fn the_host_keeps_serving_around_a_failing_scorer() {
    for mode in ["trap", "loop", "alloc", "nan", "short"] {
        let profile = profile_with(misbehaving(mode, FailurePolicy::FailOpen).unwrap());
        for i in 0..3 {
            let d = profile.schedule(i, &request(&format!("r{i}"), ""), &busy_metrics()).unwrap();
            // The bad scorer contributes nothing; the queue scorer decides.
            assert_eq!(d.targets, vec![1], "{mode}");
            assert_eq!(d.total_scores, vec![0.5, 1.0, 0.0], "{mode}");
        }
    }
}

#[test]
fn fail_closed_turns_a_failure_into_a_scheduling_error() {
    let profile = profile_with(misbehaving("trap", FailurePolicy::FailClosed).unwrap());
    match profile.schedule(1, &request("r", ""), &busy_metrics()) {
        Err(ScheduleError::PluginFailed { plugin, error: PluginError::Trap(_) }) => {
            assert_eq!(plugin, "misbehaving-trap")
        }
        other => panic!("expected a plugin failure, got {other:?}"),
    }
}

#[test]
fn a_well_behaved_twin_scores_after_a_neighbour_traps() {
    // The same component, configured differently, is an independent instance.
    let ok = misbehaving("ok", FailurePolicy::FailOpen).unwrap();
    let bad = misbehaving("trap", FailurePolicy::FailOpen).unwrap();
    assert!(score(bad.as_ref(), &idle(2)).is_err());
    assert_eq!(score(ok.as_ref(), &idle(2)).unwrap(), vec![0.5, 0.5]);
}

#[test]
fn bad_components_are_rejected_at_load_with_a_reason() {
    let err = misbehaving("reject", FailurePolicy::FailOpen).err().expect("rejected");
    assert!(err.to_string().contains("refuses every configuration"), "{err}");

    let err = runtime().load("junk", b"not wasm at all", "{}", sandbox("junk"), FailurePolicy::FailOpen).err().unwrap();
    assert!(matches!(err, LoadError::Compile(_)), "{err}");

    // A core module (not a component) is not a plugin either.
    let core_module = b"\0asm\x01\0\0\0";
    let err = runtime().load("core", core_module, "{}", sandbox("core"), FailurePolicy::FailOpen).err().unwrap();
    assert!(matches!(err, LoadError::Compile(_)), "{err}");
}

#[test]
fn a_plugin_that_keeps_failing_is_taken_out_by_its_breaker() {
    let bad = misbehaving("trap", FailurePolicy::FailOpen).unwrap();
    let mut kinds = Vec::new();
    for _ in 0..8 {
        kinds.push(score(bad.as_ref(), &idle(2)).expect_err("fails").kind());
    }
    // Six failures within the window trip it; later calls are refused without running.
    assert_eq!(kinds[..6], ["trap"; 6], "{kinds:?}");
    assert_eq!(kinds[6..], ["disabled"; 2], "{kinds:?}");
    // With fail-open the request is still scheduled around it.
    let profile = profile_with(bad);
    assert_eq!(profile.schedule(9, &request("x", ""), &busy_metrics()).unwrap().targets, vec![1]);
    // Without the breaker (as `epp replay` runs plugins) every call runs, however many fail.
    let bytes = wasm_file_bytes("misbehaving_scorer");
    let unbroken = Sandbox { breaker: false, ..sandbox("trap") };
    let PluginHandle::Scorer(bad) = runtime()
        .load("misbehaving-unbroken", &bytes, r#"{"mode": "trap"}"#, unbroken, FailurePolicy::FailOpen)
        .unwrap()
    else {
        panic!("a scorer")
    };
    let kinds: Vec<&str> = (0..8).map(|_| score(bad.as_ref(), &idle(2)).expect_err("fails").kind()).collect();
    assert_eq!(kinds, ["trap"; 8]);
}
