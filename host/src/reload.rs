//! Hot reload of the config file and the `.wasm` files it names.
//!
//! On a change (atomic rename, in-place write or symlink swap of the config or of any
//! referenced component), a new scheduler is built off the request path: parse + validate,
//! compile what changed (the runtime caches by content hash), instantiate, configure, probe —
//! reusing unchanged plugins with their state — then published atomically. In-flight
//! requests finish on the scheduler they started with. Any failure keeps the old scheduler,
//! is logged with its reason, and counted in `epp_config_reload_total{result}`.
//!
//! It owns the config watcher thread and nothing on the request path.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tracing::{info, warn};

use crate::config::PickerConfig;
use crate::loader::{self, PluginSet};
use crate::publisher::Publisher;
use crate::routing::{Built, Router};
use crate::wasm::WasmRuntime;

/// Quiet time after the last file event before a reload (editors write in bursts).
const DEBOUNCE: Duration = Duration::from_millis(50);
/// A change is applied at most this long after it is first seen, even if writes go on.
const MAX_DEBOUNCE: Duration = Duration::from_millis(250);

#[derive(Debug, PartialEq)]
pub enum ReloadOutcome {
    /// A new scheduler was published; these plugins were loaded afresh.
    Applied { loaded: Vec<String> },
    /// Config and components are byte-for-byte what is running.
    Unchanged,
}

pub struct Reloader {
    runtime: WasmRuntime,
    path: PathBuf,
    router: Arc<Router>,
    publisher: Publisher,
    state: Mutex<State>,
}

struct State {
    /// What the running scheduler was built from.
    fingerprint: u64,
    /// The last files tried, applied or not: a rejected config is not retried until its
    /// bytes change (file events from unrelated writes in the folder must not loop).
    attempted: u64,
    plugins: PluginSet,
}

impl Reloader {
    /// `plugins` and `config` are what the running scheduler was built from.
    pub fn new(
        runtime: WasmRuntime,
        path: PathBuf,
        router: Arc<Router>,
        publisher: Publisher,
        config: &PickerConfig,
        plugins: PluginSet,
    ) -> Arc<Reloader> {
        let fingerprint = fingerprint(&path, config);
        Arc::new(Reloader {
            runtime,
            path,
            router,
            publisher,
            state: Mutex::new(State { fingerprint, attempted: fingerprint, plugins }),
        })
    }

    /// Re-reads the config and, if anything changed, builds and publishes a new scheduler.
    pub fn reload(&self) -> Result<ReloadOutcome, String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let config = PickerConfig::from_file(&self.path).map_err(|e| e.to_string())?;
        let fp = fingerprint(&self.path, &config);
        if fp == state.fingerprint || fp == state.attempted {
            return Ok(ReloadOutcome::Unchanged);
        }
        state.attempted = fp;
        for w in &config.warnings {
            warn!("config: {w}");
        }
        let built = loader::build(&self.runtime, &config, &state.plugins).map_err(|e| e.to_string())?;
        let scheduler = Arc::new(
            Built::new(built.scheduler, self.router.telemetry())
                .with_flow(config.flow.clone())
                .with_precise(built.plugins.precise().cloned()),
        );
        self.publisher.scheduler(scheduler);
        state.plugins = built.plugins;
        state.fingerprint = fp;
        Ok(ReloadOutcome::Applied { loaded: built.loaded })
    }

    /// Reloads and reports the outcome in the log and the reload counter.
    pub fn reload_and_report(&self) {
        let telemetry = self.router.telemetry();
        match self.reload() {
            Ok(ReloadOutcome::Applied { loaded }) => {
                telemetry.config_reload(true);
                info!(path = %self.path.display(), reloaded_plugins = ?loaded, "config reloaded; new scheduler published");
            }
            Ok(ReloadOutcome::Unchanged) => {}
            Err(reason) => {
                telemetry.config_reload(false);
                warn!(path = %self.path.display(), %reason, "config reload rejected; the running scheduler stays");
            }
        }
    }

    /// Watches the config's folder and the folders of its `.wasm` files; returns a handle
    /// that stops watching when dropped.
    pub fn watch(self: Arc<Self>) -> Result<ConfigWatch, String> {
        let (tx, rx) = mpsc::channel::<()>();
        // Only the config, its components and symlink-swap names (`..data`) matter: the
        // folders may hold busy files (logs) whose writes must not trigger anything.
        let names: Arc<Mutex<BTreeSet<std::ffi::OsString>>> = Arc::default();
        let filter = names.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let relevant = match &event {
                Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => false,
                Ok(e) if e.need_rescan() || e.paths.is_empty() => true,
                Ok(e) => {
                    let names = filter.lock().unwrap_or_else(|p| p.into_inner());
                    e.paths
                        .iter()
                        .filter_map(|p| p.file_name())
                        .any(|n| names.contains(n) || n.to_string_lossy().starts_with(".."))
                }
                Err(_) => true,
            };
            if relevant {
                let _ = tx.send(());
            }
        })
        .map_err(|e| e.to_string())?;
        let mut watched = BTreeSet::new();
        self.watch_dirs(&mut watcher, &mut watched, &names);
        let me = self.clone();
        let thread = std::thread::Builder::new()
            .name("epp-config-watch".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // Debounce: wait for a quiet moment (at most MAX_DEBOUNCE), then reload once.
                    let first = std::time::Instant::now();
                    while first.elapsed() < MAX_DEBOUNCE && rx.recv_timeout(DEBOUNCE).is_ok() {}
                    me.reload_and_report();
                    me.watch_dirs(&mut watcher, &mut watched, &names);
                }
            })
            .map_err(|e| e.to_string())?;
        info!(path = %self.path.display(), "watching the config file and its plugins");
        Ok(ConfigWatch { _thread: thread })
    }

    /// Adds watches for the folders of the config and of every component it names now, and
    /// records the file names that matter.
    fn watch_dirs(
        &self,
        watcher: &mut notify::RecommendedWatcher,
        watched: &mut BTreeSet<PathBuf>,
        names: &Mutex<BTreeSet<std::ffi::OsString>>,
    ) {
        let mut dirs = vec![parent(&self.path)];
        let mut files = vec![self.path.clone()];
        if let Ok(config) = PickerConfig::from_file(&self.path) {
            files.extend(config.plugins.iter().filter_map(|p| p.wasm.clone()));
        }
        dirs.extend(files.iter().skip(1).map(|f| parent(f)));
        {
            let mut names = names.lock().unwrap_or_else(|p| p.into_inner());
            names.extend(files.iter().filter_map(|f| f.file_name().map(|n| n.to_os_string())));
        }
        for dir in dirs {
            if !watched.contains(&dir) {
                match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        watched.insert(dir);
                    }
                    Err(e) => warn!(dir = %dir.display(), error = %e, "cannot watch folder"),
                }
            }
        }
    }
}

/// Keeps the watcher thread (which owns the watcher) alive; the process ends it.
pub struct ConfigWatch {
    _thread: std::thread::JoinHandle<()>,
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A hash of the config file's bytes and of every component file it names.
fn fingerprint(path: &Path, config: &PickerConfig) -> u64 {
    let mut bytes = std::fs::read(path).unwrap_or_default();
    for p in config.plugins.iter().filter_map(|p| p.wasm.as_deref()) {
        bytes.extend_from_slice(p.as_os_str().as_encoded_bytes());
        bytes.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&std::fs::read(p).unwrap_or_default()).to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}
