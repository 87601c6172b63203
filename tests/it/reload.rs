//! The config reloader in process (no Envoy): what it compares, what it says, and how its
//! watch reads a file being written. The live swap under load is `e2e_reload`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use epp::config::PickerConfig;
use epp::datastore::Datastore;
use epp::publisher::Publisher;
use epp::reload::{RETRY_DELAYS, Rejected, ReloadOutcome, Reloader};
use epp::routing::Router;
use epp::telemetry::Telemetry;
use epp_stack::Scratch;

use crate::common::{config_head, runtime, wasm_file_bytes};

/// A config whose queue scorer weighs `queue` and whose endpoints file is `endpoints`.
fn config(queue: u32, endpoints: &str) -> String {
    format!(
        "{}- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: {queue}}}
  - {{pluginRef: max-score-picker}}
",
        config_head(endpoints)
    )
}

/// A reloader as the server makes it: built from `started` (the text parsed at start-up),
/// while the file on disk may already hold something newer.
fn reloader(scratch: &Scratch, started: &str) -> Arc<Reloader> {
    reloader_and_router(scratch, started).0
}

fn reloader_and_router(scratch: &Scratch, started: &str) -> (Arc<Reloader>, Arc<Router>) {
    let path = scratch.path.join("conf").join("epp.yaml");
    let config = PickerConfig::parse(started, path.parent()).unwrap();
    let built = epp::loader::build(runtime(), &config, &Default::default()).unwrap();
    let router = Arc::new(Router::new(Arc::new(Datastore::new()), built.scheduler, Telemetry::new("test")));
    let (loaded_tx, _) = tokio::sync::watch::channel(false);
    let publisher = Publisher::start(router.clone(), Box::new(|_| {}), loaded_tx).unwrap();
    (Reloader::new(runtime().clone(), path, router.clone(), publisher, &config, built.plugins), router)
}

#[test]
fn an_edit_made_during_start_up_is_applied_at_the_first_check() {
    let scratch = Scratch::new("reload-startup").unwrap();
    // Started from weight 1; the file already says 2 when the reloader is made.
    scratch.write("epp.yaml", &config(2, "endpoints.yaml")).unwrap();
    let r = reloader(&scratch, &config(1, "endpoints.yaml"));
    assert!(matches!(r.reload(), Ok(ReloadOutcome::Applied { .. })), "the newer file must be built");
    assert_eq!(r.reload(), Ok(ReloadOutcome::Unchanged));

    // The file as started from: nothing to do.
    let scratch = Scratch::new("reload-same").unwrap();
    scratch.write("epp.yaml", &config(1, "endpoints.yaml")).unwrap();
    let r = reloader(&scratch, &config(1, "endpoints.yaml"));
    assert_eq!(r.reload(), Ok(ReloadOutcome::Unchanged));
}

#[test]
fn start_only_sections_that_change_are_named() {
    let scratch = Scratch::new("reload-start-only").unwrap();
    scratch.write("epp.yaml", &config(1, "endpoints.yaml")).unwrap();
    let r = reloader(&scratch, &config(1, "endpoints.yaml"));
    // A scorer's weight applies live and needs no restart.
    scratch.write("epp.yaml", &config(3, "endpoints.yaml")).unwrap();
    match r.reload() {
        Ok(ReloadOutcome::Applied { restart_needed, .. }) => assert!(restart_needed.is_empty(), "{restart_needed:?}"),
        other => panic!("expected a reload: {other:?}"),
    }
    // Another endpoints file is read only at start: the reload says so.
    scratch.write("epp.yaml", &config(3, "other-endpoints.yaml")).unwrap();
    match r.reload() {
        Ok(ReloadOutcome::Applied { restart_needed, .. }) => {
            assert_eq!(restart_needed, vec!["the discovery plugin"])
        }
        other => panic!("expected a reload: {other:?}"),
    }
    // A file that no longer parses is rejected with its reason.
    scratch.write("epp.yaml", "plugins: [").unwrap();
    let err = r.reload().unwrap_err();
    assert!(!err.reason.is_empty() && err.retry_in.is_none(), "a reason is given: {err:?}");
}

/// `epp_config_reload_total` by result: (applied, rejected).
fn reload_counts(router: &Router) -> (u64, u64) {
    let text = router.telemetry().render();
    let count = |result: &str| {
        text.lines()
            .filter(|l| l.starts_with("epp_config_reload_total") && l.contains(&format!("result=\"{result}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    (count("applied"), count("rejected"))
}

fn wait_for_applied(router: &Router, n: u64, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while reload_counts(router).0 < n {
        assert!(Instant::now() < deadline, "{context}: reloads never reached {n}: {:?}", reload_counts(router));
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A config copied in place by a slow writer: what is written so far does not parse, and it
/// must not be tried (counted as a rejected reload) before the writer closes the file.
#[cfg(target_os = "linux")]
#[test]
fn a_config_written_in_place_is_read_once_its_writer_closes_it() {
    use std::io::Write;
    let scratch = Scratch::new("reload-slow-writer").unwrap();
    let path = scratch.write("epp.yaml", &config(1, "endpoints.yaml")).unwrap();
    let (r, router) = reloader_and_router(&scratch, &config(1, "endpoints.yaml"));
    let _watch = r.watch().unwrap();
    // A rename the watch acts on: its first check (which a writer starting now could race)
    // is then behind it.
    let tmp = scratch.write("epp.yaml.tmp", &config(2, "endpoints.yaml")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_for_applied(&router, 1, "renamed over");

    let text = config(3, "endpoints.yaml");
    let cut = text.find("queue-scorer").unwrap() + "queue-sc".len();
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&text.as_bytes()[..cut]).unwrap();
    file.flush().unwrap();
    // Well past the debounce: a watch not waiting for the close would try the half file.
    std::thread::sleep(Duration::from_millis(300));
    file.write_all(&text.as_bytes()[cut..]).unwrap();
    drop(file);
    wait_for_applied(&router, 2, "after the writer closed");
    assert_eq!(reload_counts(&router), (2, 0), "the half-written config was never tried");
}

/// A component that cannot be read (being replaced) is tried again after each of
/// `RETRY_DELAYS` with the same files, then only after a change; a config that cannot
/// pass whatever the wait is not retried.
#[test]
fn a_failure_that_may_pass_is_retried_a_bounded_number_of_times() {
    let scratch = Scratch::new("reload-retry").unwrap();
    let started = config(1, "endpoints.yaml");
    scratch.write("epp.yaml", &started).unwrap();
    let r = reloader(&scratch, &started);
    let with_scorer = started.replace(
        "- type: max-score-picker\n",
        "- name: prefer-gpu\n  type: label-affinity-scorer\n  wasm: prefer.wasm\n  parameters: {label: gpu, scores: {H100: 1.0}}\n- type: max-score-picker\n",
    ) + "  - {pluginRef: prefer-gpu, weight: 5}\n";
    scratch.write("epp.yaml", &with_scorer).unwrap();
    for wait in RETRY_DELAYS {
        match r.reload() {
            Err(Rejected { reason, retry_in }) => {
                assert!(reason.contains("prefer.wasm"), "{reason}");
                assert_eq!(retry_in, Some(wait));
            }
            other => panic!("expected a rejection to retry in {wait:?}: {other:?}"),
        }
    }
    match r.reload() {
        Err(Rejected { reason, retry_in: None }) => assert!(reason.contains("tries"), "{reason}"),
        other => panic!("expected a final rejection: {other:?}"),
    }
    assert_eq!(r.reload(), Ok(ReloadOutcome::Unchanged), "given up until the files change");
    // The component arrives: applied.
    std::fs::write(scratch.path.join("conf").join("prefer.wasm"), wasm_file_bytes("label_affinity_scorer")).unwrap();
    assert!(matches!(r.reload(), Ok(ReloadOutcome::Applied { .. })));

    // A config that does not validate is not worth a retry.
    scratch.write("epp.yaml", &started.replace("queue-scorer, weight", "no-such-scorer, weight")).unwrap();
    match r.reload() {
        Err(Rejected { retry_in: None, .. }) => {}
        other => panic!("expected a rejection without retry: {other:?}"),
    }

    // A probe call past its time limit may pass on a less busy machine; a trap will not.
    std::fs::write(scratch.path.join("conf").join("bad.wasm"), wasm_file_bytes("misbehaving_scorer")).unwrap();
    let misbehaving = |mode: &str| {
        started.replace(
            "- type: max-score-picker\n",
            &format!("- name: bad\n  type: misbehaving-scorer\n  wasm: bad.wasm\n  parameters: {{mode: {mode}}}\n- type: max-score-picker\n"),
        ) + "  - {pluginRef: bad, weight: 1}\n"
    };
    for (mode, want) in [("loop", Some(RETRY_DELAYS[0])), ("trap", None)] {
        scratch.write("epp.yaml", &misbehaving(mode)).unwrap();
        match r.reload() {
            Err(Rejected { reason, retry_in }) => {
                assert!(reason.contains("failed its probe"), "{mode}: {reason}");
                assert_eq!(retry_in, want, "{mode}: {reason}");
            }
            other => panic!("{mode}: expected a rejection: {other:?}"),
        }
    }
}

/// A config whose precise producer names a tokenizer that is not there yet is refused;
/// once the file arrives, the same config applies, without an edit (the files a config
/// reads are part of what a reload compares, and are followed by the watch).
#[test]
fn a_tokenizer_file_that_arrives_after_its_config_is_picked_up() {
    let scratch = Scratch::new("reload-tokenizer").unwrap();
    let conf = scratch.path.join("conf");
    let precise = epp::config::PRECISE_CONFIG
        .replace("path: endpoints.yaml", &format!("path: {}", conf.join("endpoints.yaml").display()))
        .replace("type: sim", "path: tokenizer.json");
    scratch.write("epp.yaml", &config(1, "endpoints.yaml")).unwrap();
    let r = reloader(&scratch, &config(1, "endpoints.yaml"));
    scratch.write("epp.yaml", &precise).unwrap();
    let refused = r.reload().expect_err("no tokenizer yet");
    assert!(refused.reason.contains("tokenizer"), "{}", refused.reason);
    std::fs::write(conf.join("tokenizer.json"), epp_stack::text::trained_bpe_json().unwrap()).unwrap();
    assert!(matches!(r.reload(), Ok(ReloadOutcome::Applied { .. })), "the arrived tokenizer was not picked up");
    assert_eq!(r.reload(), Ok(ReloadOutcome::Unchanged));
}

/// Plugin timings carry upstream's labels: the extension point, the plugin's type and its
/// configured name, which differ here.
#[test]
fn plugin_timings_are_labelled_by_extension_point_type_and_name() {
    let text = format!(
        "{}- name: tokens
  type: token-load-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: tokens, weight: 2}}
  - {{pluginRef: max-score-picker}}
",
        config_head("endpoints.yaml")
    );
    let config = PickerConfig::parse(&text, None).unwrap();
    let built = epp::loader::build(runtime(), &config, &Default::default()).unwrap();
    let telemetry = Telemetry::new("test");
    let _handles = telemetry.scheduler_metrics(&built.scheduler);
    let page = telemetry.render();
    let series = |labels: &[&str]| {
        page.lines().any(|l| {
            l.starts_with("inference_extension_plugin_duration_seconds_count") && labels.iter().all(|x| l.contains(x))
        })
    };
    assert!(
        series(&["extension_point=\"Scorer\"", "plugin_type=\"token-load-scorer\"", "plugin_name=\"tokens\""]),
        "{page}"
    );
    assert!(
        series(&["extension_point=\"Picker\"", "plugin_type=\"max-score-picker\"", "plugin_name=\"max-score-picker\""]),
        "{page}"
    );
}
