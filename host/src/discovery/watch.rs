//! `FileDiscovery`: loads the endpoints file once, then (with `watchFile`) keeps following it.
//!
//! Following the file is `crate::file_watch`'s job (the same rule as the config's: folder
//! watch for renames and ConfigMap symlink swaps, debounce, in-place writers waited for until
//! they close the file). This module reads the file when told, publishes whole sets through
//! the caller's callback and the `endpoints()` snapshot, and counts reloads; it does not
//! decide anything about the endpoints themselves. Every re-read compares the bytes with the
//! last ones processed, so spurious events cost one read and nothing else. Not seen: in-place
//! edits to a symlink's target when that target lives outside the watched directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use tracing::{debug, info, warn};

use super::file::{parse_bytes, read_file, with_path};
use super::{DiscoveryError, EndpointSpec, FileDiscoveryParams, Parsed, diff};
use crate::file_watch::{FileWatch, Follow};

/// Reload counters, a snapshot of the live ones (Prometheus export reads these).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoveryStats {
    /// Reloads that published a different endpoint set.
    pub reloads_applied: u64,
    /// Reloads that kept the last good set because the file was unreadable or invalid.
    pub reloads_rejected: u64,
    /// Why the file on disk is currently rejected; `None` once a good file is read again.
    pub last_error: Option<String>,
}

type OnUpdate = Box<dyn Fn(Arc<Vec<EndpointSpec>>) + Send + Sync>;

/// A running file discovery. Dropping it (or `stop()`) ends the watch.
pub struct FileDiscovery {
    path: PathBuf,
    shared: Arc<Shared>,
    watch: Option<FileWatch>,
}

/// What the handle and the reload thread both see.
struct Shared {
    current: ArcSwap<Vec<EndpointSpec>>,
    stats: Mutex<DiscoveryStats>,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, DiscoveryStats> {
        // The counters stay meaningful even if a holder panicked: they are plain numbers.
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl FileDiscovery {
    /// Loads `params.path` (failing with the path and reason if it is unreadable or
    /// invalid), calls `on_update` with the initial set, and, with `watchFile`, starts
    /// watching. `on_update` is later called from the reload thread, only when the set
    /// changed, never concurrently with itself.
    pub fn start(
        params: FileDiscoveryParams,
        on_update: impl Fn(Arc<Vec<EndpointSpec>>) + Send + Sync + 'static,
    ) -> Result<Self, DiscoveryError> {
        let path = params.path;
        let bytes = read_file(&path)?;
        let parsed = parse_bytes(&bytes).map_err(|e| with_path(e, &path))?;
        log_entry_problems(&path, &parsed);
        let set = Arc::new(parsed.endpoints);
        info!(path = %path.display(), endpoints = set.len(), watch = params.watch_file, "endpoints file loaded");
        let shared = Arc::new(Shared { current: ArcSwap::new(set.clone()), stats: Mutex::default() });
        on_update(set);
        let watch = match params.watch_file {
            true => Some(follow(&path, bytes, shared.clone(), Box::new(on_update))?),
            false => None,
        };
        Ok(Self { path, shared, watch })
    }

    /// The set last handed to `on_update`.
    pub fn endpoints(&self) -> Arc<Vec<EndpointSpec>> {
        self.shared.current.load_full()
    }

    pub fn stats(&self) -> DiscoveryStats {
        self.shared.stats().clone()
    }

    /// A reader of the stats that outlives no one: it can be moved into another task.
    pub fn stats_source(&self) -> impl Fn() -> DiscoveryStats + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.stats().clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True while a watcher is running (only with `watchFile`, until `stop()`).
    pub fn is_watching(&self) -> bool {
        self.watch.is_some()
    }

    /// Stops watching and waits for an in-progress reload to finish, so `on_update` is
    /// not called after this returns (unless called from within `on_update` itself).
    pub fn stop(&mut self) {
        if let Some(mut watch) = self.watch.take() {
            watch.stop();
            info!(path = %self.path.display(), "stopped watching the endpoints file");
        }
    }
}

impl Drop for FileDiscovery {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts following `path` (its content at start is `initial`).
fn follow(
    path: &Path,
    initial: Vec<u8>,
    shared: Arc<Shared>,
    on_update: OnUpdate,
) -> Result<FileWatch, DiscoveryError> {
    if path.file_name().is_none() {
        return Err(DiscoveryError::Watch(format!("{} does not name a file", path.display())));
    }
    let mut worker = Worker { path: path.to_path_buf(), seen: Seen::Bytes(initial), shared, on_update };
    let files = vec![path.to_path_buf()];
    let watch = FileWatch::start("the endpoints file", "epp-discovery", files.clone(), move || {
        worker.check();
        Follow::files(files.clone())
    })
    .map_err(DiscoveryError::Watch)?;
    info!(path = %path.display(), "watching the endpoints file");
    Ok(watch)
}

/// The last file state the worker acted on, to tell a real change from a repeated event.
enum Seen {
    Bytes(Vec<u8>),
    ReadError(String),
}

struct Worker {
    path: PathBuf,
    seen: Seen,
    shared: Arc<Shared>,
    on_update: OnUpdate,
}

impl Worker {
    /// Re-reads the file and acts on it if it differs from what was last seen.
    fn check(&mut self) {
        match read_file(&self.path) {
            Ok(bytes) => {
                if matches!(&self.seen, Seen::Bytes(prev) if *prev == bytes) {
                    debug!(path = %self.path.display(), "endpoints file event without a content change");
                    return;
                }
                info!(path = %self.path.display(), "endpoints file changed, reloading");
                let parsed = parse_bytes(&bytes).map_err(|e| with_path(e, &self.path));
                self.seen = Seen::Bytes(bytes);
                match parsed {
                    Ok(parsed) => self.apply(parsed),
                    Err(e) => self.reject(&e),
                }
            }
            Err(e) => {
                let reason = e.to_string();
                // A missing file (say, mid `rm` + re-create) is reported once, not per event.
                if matches!(&self.seen, Seen::ReadError(prev) if *prev == reason) {
                    return;
                }
                self.seen = Seen::ReadError(reason);
                self.reject(&e);
            }
        }
    }

    fn apply(&self, parsed: Parsed) {
        log_entry_problems(&self.path, &parsed);
        let old = self.shared.current.load_full();
        let change = diff(&old, &parsed.endpoints);
        self.shared.stats().last_error = None;
        if change.is_empty() {
            info!(path = %self.path.display(), endpoints = old.len(), "endpoints unchanged");
            return;
        }
        let set = Arc::new(parsed.endpoints);
        self.shared.current.store(set.clone());
        self.shared.stats().reloads_applied += 1;
        info!(path = %self.path.display(), endpoints = set.len(), "endpoints updated: {change}");
        (self.on_update)(set);
    }

    fn reject(&self, e: &DiscoveryError) {
        let reason = e.to_string();
        let kept = self.shared.current.load().len();
        warn!(path = %self.path.display(), kept, "endpoints file rejected, keeping the last good endpoints: {reason}");
        let mut stats = self.shared.stats();
        stats.reloads_rejected += 1;
        stats.last_error = Some(reason);
    }
}

fn log_entry_problems(path: &Path, parsed: &Parsed) {
    for reason in &parsed.skipped {
        warn!(path = %path.display(), "endpoint skipped: {reason}");
    }
    for warning in &parsed.warnings {
        warn!(path = %path.display(), "endpoints file: {warning}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    const DEADLINE: Duration = Duration::from_secs(5);

    fn write_atomic(path: &Path, text: &str) {
        let tmp = path.with_file_name(format!("{}.tmp", path.file_name().unwrap().to_string_lossy()));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// One line per endpoint, `name@ip:port{k=v,…}`, sorted: what a test expects to see.
    fn render(set: &[EndpointSpec]) -> Vec<String> {
        let mut lines: Vec<String> = set
            .iter()
            .map(|e| {
                let labels: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{}@{}{{{}}}", e.name, e.target(), labels.join(","))
            })
            .collect();
        lines.sort();
        lines
    }

    fn start(path: &Path, watch_file: bool) -> (FileDiscovery, mpsc::Receiver<Arc<Vec<EndpointSpec>>>) {
        let (tx, rx) = mpsc::channel();
        let params = FileDiscoveryParams { path: path.to_path_buf(), watch_file };
        let discovery = FileDiscovery::start(params, move |set| {
            let _ = tx.send(set);
        })
        .unwrap();
        (discovery, rx)
    }

    fn next_update(rx: &mpsc::Receiver<Arc<Vec<EndpointSpec>>>, context: &str) -> Vec<String> {
        match rx.recv_timeout(DEADLINE) {
            Ok(set) => render(&set),
            Err(e) => panic!("{context}: no update within {DEADLINE:?} ({e})"),
        }
    }

    fn wait_for_stats(d: &FileDiscovery, context: &str, done: impl Fn(&DiscoveryStats) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done(&d.stats()) {
            assert!(Instant::now() < deadline, "{context}: stats never matched: {:?}", d.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    const A: &str = "endpoints:\n- {name: a, address: 127.0.0.1, port: 8000}\n";
    const AB: &str = "endpoints:\n- {name: a, address: 127.0.0.1, port: 8000}\n\
                      - {name: b, address: 127.0.0.2, port: '8000'}\n";
    const BA: &str = "endpoints:\n- {name: b, address: 127.0.0.2, port: 8000}\n\
                      - {name: a, address: 127.0.0.1, port: 8000}\n";
    const AB_RELABELLED: &str = "endpoints:\n- {name: a, address: 127.0.0.1, port: 8000, labels: {model: m}}\n\
                                 - {name: b, address: 127.0.0.2, port: 8000}\n";
    const B_MOVED: &str = "endpoints:\n- {name: b, address: 127.0.0.3, port: 9000}\n";
    const EMPTY_POOL: &str = "endpoints: []\n";

    enum Step {
        /// Write to a temp file and rename it over the endpoints file.
        Atomic(&'static str),
        /// Truncate and write the endpoints file in place.
        InPlace(&'static str),
        /// The next `on_update` carries exactly these endpoints (rendered).
        Update(&'static [&'static str]),
        /// `reloads_rejected` reaches this, and the published set is still these endpoints.
        Rejected(u64, &'static [&'static str]),
    }
    use Step::*;

    const ONLY_A: &[&str] = &["a@127.0.0.1:8000{}"];
    const BOTH: &[&str] = &["a@127.0.0.1:8000{}", "b@127.0.0.2:8000{}"];

    #[test]
    fn watch_scenarios() {
        let cases: Vec<(&str, Vec<Step>, DiscoveryStats)> = vec![
            (
                "atomic rename: add, relabel, move+remove, empty pool",
                vec![
                    Atomic(AB),
                    Update(BOTH),
                    Atomic(AB_RELABELLED),
                    Update(&["a@127.0.0.1:8000{model=m}", "b@127.0.0.2:8000{}"]),
                    Atomic(B_MOVED),
                    Update(&["b@127.0.0.3:9000{}"]),
                    Atomic(EMPTY_POOL),
                    Update(&[]),
                ],
                DiscoveryStats { reloads_applied: 4, reloads_rejected: 0, last_error: None },
            ),
            ("in-place write", vec![InPlace(AB), Update(BOTH)], DiscoveryStats::default()),
            (
                // If these produced updates, the next update seen would not be B_MOVED's.
                "same content, reordered content and comments are not updates",
                vec![Atomic(A), Atomic("# same\nendpoints: [{name: a, address: 127.0.0.1, port: 8000}]\n")]
                    .into_iter()
                    .chain([Atomic(AB), Update(BOTH), Atomic(BA), Atomic(B_MOVED), Update(&["b@127.0.0.3:9000{}"])])
                    .collect(),
                DiscoveryStats { reloads_applied: 2, reloads_rejected: 0, last_error: None },
            ),
            (
                "invalid YAML keeps the set, then the fix applies",
                vec![Atomic("endpoints: [\n"), Rejected(1, ONLY_A), Atomic(AB), Update(BOTH)],
                DiscoveryStats { reloads_applied: 1, reloads_rejected: 1, last_error: None },
            ),
            (
                "truncated (empty) file keeps the set",
                vec![InPlace(""), Rejected(1, ONLY_A), Atomic(AB), Update(BOTH)],
                DiscoveryStats { reloads_applied: 1, reloads_rejected: 1, last_error: None },
            ),
            (
                "missing key and all-invalid entries keep the set",
                vec![
                    Atomic("other: []\n"),
                    Rejected(1, ONLY_A),
                    Atomic("endpoints: [{name: a, address: localhost, port: 80}]\n"),
                    Rejected(2, ONLY_A),
                    Atomic(AB),
                    Update(BOTH),
                ],
                DiscoveryStats { reloads_applied: 1, reloads_rejected: 2, last_error: None },
            ),
        ];
        for (case, steps, want_stats) in cases {
            let dir = TempDir::new("discovery-scenario");
            let path = dir.join("endpoints.yaml");
            std::fs::write(&path, A).unwrap();
            let (mut d, rx) = start(&path, true);
            assert!(d.is_watching(), "{case}");
            assert_eq!(next_update(&rx, case), ONLY_A, "{case}: initial set");
            for (i, step) in steps.iter().enumerate() {
                let context = format!("{case}, step {i}");
                match step {
                    Atomic(text) => write_atomic(&path, text),
                    InPlace(text) => std::fs::write(&path, text).unwrap(),
                    Update(want) => {
                        assert_eq!(next_update(&rx, &context), *want, "{context}");
                        assert_eq!(render(&d.endpoints()), *want, "{context}: endpoints()");
                    }
                    Rejected(n, kept) => {
                        wait_for_stats(&d, &context, |s| s.reloads_rejected >= *n);
                        let stats = d.stats();
                        assert_eq!(stats.reloads_rejected, *n, "{context}");
                        assert!(stats.last_error.is_some_and(|e| e.contains("endpoints.yaml")), "{context}");
                        assert_eq!(render(&d.endpoints()), *kept, "{context}: kept set");
                    }
                }
            }
            d.stop();
            assert!(!d.is_watching(), "{case}");
            // After stop the callback (and its sender) is gone: no update was left unseen.
            let extra: Vec<_> = rx.try_iter().map(|s| render(&s)).collect();
            assert!(extra.is_empty(), "{case}: unexpected updates {extra:?}");
            assert!(matches!(rx.try_recv(), Err(mpsc::TryRecvError::Disconnected)), "{case}: callback not dropped");
            let stats = d.stats();
            // In-place writes may be read half-done (empty), which is rightly rejected; only
            // the atomic scenarios pin the rejection count.
            if case != "in-place write" {
                assert_eq!(stats, want_stats, "{case}");
            }
        }
    }

    /// Kubernetes ConfigMap volumes: `endpoints.yaml -> ..data/endpoints.yaml`, and an
    /// update renames a new `..data` symlink over the old one.
    #[cfg(unix)]
    #[test]
    fn symlink_swap_is_seen() {
        use std::os::unix::fs::symlink;
        let dir = TempDir::new("discovery-symlink");
        let root = dir.path();
        let publish = |version: &str, text: &str| {
            std::fs::create_dir(root.join(version)).unwrap();
            std::fs::write(root.join(version).join("endpoints.yaml"), text).unwrap();
            symlink(version, root.join("..data_tmp")).unwrap();
            std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        };
        publish("..v1", A);
        symlink("..data/endpoints.yaml", root.join("endpoints.yaml")).unwrap();
        let (mut d, rx) = start(&root.join("endpoints.yaml"), true);
        assert_eq!(next_update(&rx, "initial"), ONLY_A);

        publish("..v2", AB);
        assert_eq!(next_update(&rx, "first swap"), BOTH);
        std::fs::remove_dir_all(root.join("..v1")).unwrap();
        publish("..v3", B_MOVED);
        assert_eq!(next_update(&rx, "second swap"), ["b@127.0.0.3:9000{}"]);
        d.stop();
        assert_eq!(d.stats(), DiscoveryStats { reloads_applied: 2, reloads_rejected: 0, last_error: None });
    }

    /// A slow writer rewriting the file in place: what it has written so far parses (one
    /// endpoint), but only the finished file (two) may become the pool.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_file_written_in_place_is_read_once_its_writer_closes_it() {
        use std::io::Write;
        let dir = TempDir::new("discovery-slow-writer");
        let path = dir.join("endpoints.yaml");
        std::fs::write(&path, AB).unwrap();
        let (mut d, rx) = start(&path, true);
        assert_eq!(next_update(&rx, "initial"), BOTH);
        // The watcher's first check (for a change between the initial read and the watch)
        // runs on its thread before it handles any event: one update through an event says
        // it is done. The writer starts after it, as a writer at start-up cannot be told
        // from a finished file.
        write_atomic(&path, A);
        assert_eq!(next_update(&rx, "renamed over"), ONLY_A);
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(b"endpoints:\n- {name: c, address: 127.0.0.5, port: 8000}\n").unwrap();
        file.flush().unwrap();
        // Well past the debounce: a reader not waiting for the close would publish `c` alone.
        std::thread::sleep(Duration::from_millis(300));
        file.write_all(b"- {name: d, address: 127.0.0.6, port: 8000}\n").unwrap();
        drop(file);
        assert_eq!(next_update(&rx, "after the writer closed"), ["c@127.0.0.5:8000{}", "d@127.0.0.6:8000{}"]);
        d.stop();
        assert_eq!(d.stats().reloads_applied, 2, "no half-written set was published");
    }

    #[test]
    fn without_watch_file_loads_once() {
        let dir = TempDir::new("discovery-nowatch");
        let path = dir.join("endpoints.yaml");
        std::fs::write(&path, AB).unwrap();
        let (d, rx) = start(&path, false);
        assert!(!d.is_watching());
        // The initial update happened before `start` returned.
        assert_eq!(render(&rx.try_recv().unwrap()), BOTH);
        assert_eq!(render(&d.endpoints()), BOTH);
        assert_eq!(d.path(), path);
        drop(d);
        assert!(matches!(rx.try_recv(), Err(mpsc::TryRecvError::Disconnected)));
    }

    #[test]
    fn start_fails_with_path_and_reason() {
        let dir = TempDir::new("discovery-startfail");
        std::fs::write(dir.join("empty.yaml"), "").unwrap();
        std::fs::write(dir.join("bad.yaml"), "endpoints: {").unwrap();
        // (file, watchFile, fragment of the error)
        let cases = [
            ("missing.yaml", false, "cannot read endpoints file"),
            ("missing.yaml", true, "cannot read endpoints file"),
            ("empty.yaml", true, "empty"),
            ("bad.yaml", false, "not valid YAML"),
        ];
        for (file, watch_file, want) in cases {
            let params = FileDiscoveryParams { path: dir.join(file), watch_file };
            let called = Arc::new(AtomicUsize::new(0));
            let counter = called.clone();
            let err = match FileDiscovery::start(params, move |_| {
                counter.fetch_add(1, Ordering::Relaxed);
            }) {
                Ok(_) => panic!("{file}: start should fail"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(file) && err.contains(want), "{file}: {err:?} lacks {want:?}");
            assert_eq!(called.load(Ordering::Relaxed), 0, "{file}: on_update called");
        }
    }

    #[test]
    fn works_inside_a_tokio_runtime() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = TempDir::new("discovery-tokio");
        let path = dir.join("endpoints.yaml");
        std::fs::write(&path, A).unwrap();
        // A current-thread runtime has no spare worker: were reloads run on it, this test
        // would see no update while the runtime's only thread waits below.
        runtime.block_on(async {
            let (d, rx) = start(&path, true);
            assert_eq!(next_update(&rx, "initial"), ONLY_A);
            write_atomic(&path, AB);
            assert_eq!(next_update(&rx, "after change"), BOTH);
            drop(d);
        });
    }

    #[test]
    fn handle_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FileDiscovery>();
    }
}
