//! The config reloader in process (no watcher, no Envoy): what it compares and what it says.
//! The live swap under load is `e2e_reload`.

use std::sync::Arc;

use epp::config::PickerConfig;
use epp::datastore::Datastore;
use epp::publisher::Publisher;
use epp::reload::{ReloadOutcome, Reloader};
use epp::routing::Router;
use epp::telemetry::Telemetry;
use epp_stack::Scratch;

use crate::common::{config_head, runtime};

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
    let path = scratch.path.join("conf").join("epp.yaml");
    let config = PickerConfig::parse(started, path.parent()).unwrap();
    let built = epp::loader::build(runtime(), &config, &Default::default()).unwrap();
    let router = Arc::new(Router::new(Arc::new(Datastore::new()), built.scheduler, Telemetry::new("test")));
    let (loaded_tx, _) = tokio::sync::watch::channel(false);
    let publisher = Publisher::start(router.clone(), Box::new(|_| {}), loaded_tx).unwrap();
    Reloader::new(runtime().clone(), path, router, publisher, &config, built.plugins)
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
    assert!(!err.is_empty(), "a reason is given");
}
