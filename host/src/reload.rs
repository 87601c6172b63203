//! Hot reload of the config file and the `.wasm` files it names.
//!
//! On a change (atomic rename, in-place write or symlink swap of the config or of any
//! referenced component), a new scheduler is built off the request path: parse + validate,
//! compile what changed (the runtime caches by content hash), instantiate, configure, probe —
//! reusing unchanged plugins with their state — then published atomically. In-flight
//! requests finish on the scheduler they started with. Any failure keeps the old scheduler,
//! is logged with its reason, and counted in `epp_config_reload_total{result}`.
//!
//! What is compared is what was parsed: the file is read once per attempt, and the same bytes
//! are parsed and fingerprinted, so an edit landing between the two is never taken for the
//! running config. Right after the watch is installed the file is checked once, so an edit
//! made while the EPP started is applied too. Sections read only at start (discovery, the
//! metrics source, the state store) are not applied live; a reload that changes them says
//! so in the log.
//!
//! Files are followed by `crate::file_watch`, with the endpoints file's rule: a config or
//! component written in place is read once its writer closes it, not half-written. The watch
//! runs on its own thread, nothing on the request path.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use crate::config::{PickerConfig, PluginSpec};
use crate::file_watch::{FileWatch, Follow};
use crate::loader::{self, PluginSet};
use crate::publisher::Publisher;
use crate::routing::{Built, Router};
use crate::wasm::WasmRuntime;

#[derive(Debug, PartialEq)]
pub enum ReloadOutcome {
    /// A new scheduler was published; these plugins were loaded afresh. `restart_needed`
    /// names the sections that changed but apply only at start.
    Applied { loaded: Vec<String>, restart_needed: Vec<&'static str> },
    /// Config and components are byte-for-byte what is running.
    Unchanged,
}

/// A reload that was not applied: the running scheduler stays.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejected {
    pub reason: String,
    /// The same files are tried again after this long: the failure may pass without a change
    /// (a component being replaced, a deadline missed on a busy machine). `None`: only a
    /// change of the files is tried.
    pub retry_in: Option<Duration>,
}

impl From<String> for Rejected {
    fn from(reason: String) -> Rejected {
        Rejected { reason, retry_in: None }
    }
}

/// How long a reload that failed in a way that may pass waits before each new try; after
/// the last, only a change of the files is tried.
pub const RETRY_DELAYS: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30)];

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
    /// The files being retried after a failure that may pass, and the tries made so far.
    retrying: Option<(u64, usize)>,
    /// The config and the components named by the last config that parsed: what the watch
    /// follows.
    files: Vec<PathBuf>,
    plugins: PluginSet,
    /// The start-only sections the process runs with.
    start_only: StartOnly,
}

/// The parts of a config the EPP reads once, at start.
#[derive(PartialEq)]
struct StartOnly {
    discovery: Option<PluginSpec>,
    metrics_source: Option<(String, String)>,
    /// The extractor's engine configs.
    metrics_extractor: Option<serde_json::Value>,
    state_store: Option<String>,
}

impl StartOnly {
    fn of(config: &PickerConfig) -> StartOnly {
        StartOnly {
            discovery: config.discovery().cloned(),
            metrics_source: config.metrics_source().ok().flatten(),
            metrics_extractor: config.metrics_extractor().map(|p| p.parameters.clone()),
            state_store: config.state_store.clone(),
        }
    }

    /// The sections of `new` that differ from these.
    fn changed(&self, new: &StartOnly) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.discovery != new.discovery {
            out.push("the discovery plugin");
        }
        if self.metrics_source != new.metrics_source {
            out.push("the metrics source");
        }
        if self.metrics_extractor != new.metrics_extractor {
            out.push("the metrics extractor (engine configs)");
        }
        if self.state_store != new.state_store {
            out.push("stateStore");
        }
        out
    }
}

impl Reloader {
    /// `plugins` and `config` are what the running scheduler was built from. If the file
    /// no longer parses to `config` (it changed since start-up), the first check rebuilds.
    pub fn new(
        runtime: WasmRuntime,
        path: PathBuf,
        router: Arc<Router>,
        publisher: Publisher,
        config: &PickerConfig,
        plugins: PluginSet,
    ) -> Arc<Reloader> {
        let fingerprint = match read(&path) {
            Ok((now, fp)) if now == *config => fp,
            _ => 0,
        };
        let files = files_of(&path, config);
        Arc::new(Reloader {
            runtime,
            path,
            router,
            publisher,
            state: Mutex::new(State {
                fingerprint,
                attempted: fingerprint,
                retrying: None,
                files,
                plugins,
                start_only: StartOnly::of(config),
            }),
        })
    }

    /// Re-reads the config and, if anything changed, builds and publishes a new scheduler.
    /// A failure that may pass is tried again, at most `RETRY_DELAYS.len()` times, when
    /// called after the `retry_in` it returns.
    pub fn reload(&self) -> Result<ReloadOutcome, Rejected> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (config, fp) = read(&self.path)?;
        state.files = files_of(&self.path, &config);
        if fp == state.fingerprint || fp == state.attempted {
            return Ok(ReloadOutcome::Unchanged);
        }
        state.attempted = fp;
        let tries = match state.retrying.take() {
            Some((retried, tries)) if retried == fp => tries,
            _ => 0,
        };
        if tries == 0 {
            for w in &config.warnings {
                warn!("config: {w}");
            }
        }
        let built = match loader::build(&self.runtime, &config, &state.plugins) {
            Ok(built) => built,
            Err(e) if e.transient() && tries < RETRY_DELAYS.len() => {
                // Not marked as tried: the next call builds the same files again.
                state.attempted = state.fingerprint;
                state.retrying = Some((fp, tries + 1));
                return Err(Rejected { reason: e.to_string(), retry_in: Some(RETRY_DELAYS[tries]) });
            }
            Err(e) if e.transient() => {
                return Err(
                    format!("{e} (the same after {tries} more tries; a change of the files is tried next)").into()
                );
            }
            Err(e) => return Err(e.to_string().into()),
        };
        let scheduler = Arc::new(
            Built::new(built.scheduler, self.router.telemetry())
                .with_flow(config.flow.clone())
                .with_precise(built.plugins.precise().cloned()),
        );
        self.publisher.scheduler(scheduler);
        state.plugins = built.plugins;
        state.fingerprint = fp;
        let restart_needed = state.start_only.changed(&StartOnly::of(&config));
        Ok(ReloadOutcome::Applied { loaded: built.loaded, restart_needed })
    }

    /// Reloads and reports the outcome in the log and the reload counter; returns when to
    /// try again, if the failure may pass.
    pub fn reload_and_report(&self) -> Option<Duration> {
        let telemetry = self.router.telemetry();
        match self.reload() {
            Ok(ReloadOutcome::Applied { loaded, restart_needed }) => {
                telemetry.config_reload(true);
                info!(path = %self.path.display(), reloaded_plugins = ?loaded, "config reloaded; new scheduler published");
                for section in restart_needed {
                    warn!(path = %self.path.display(), "config: {section} changed, but it is read at start only; restart the EPP to apply it");
                }
            }
            Ok(ReloadOutcome::Unchanged) => {}
            Err(Rejected { reason, retry_in: None }) => {
                telemetry.config_reload(false);
                warn!(path = %self.path.display(), %reason, "config reload rejected; the running scheduler stays");
            }
            Err(Rejected { reason, retry_in: Some(wait) }) => {
                telemetry.config_reload(false);
                warn!(path = %self.path.display(), %reason, "config reload rejected; the running scheduler stays; the failure may pass, trying again in {wait:?}");
                return Some(wait);
            }
        }
        None
    }

    /// Follows the config and the `.wasm` files it names (`crate::file_watch`: the same
    /// rule as the endpoints file's), reloading on each change; the watch ends when the
    /// returned handle is dropped.
    pub fn watch(self: Arc<Self>) -> Result<FileWatch, String> {
        let me = self.clone();
        let watch = FileWatch::start("the config file", "epp-config-watch", self.files(), move || {
            let again_in = me.reload_and_report();
            Follow { files: me.files(), again_in }
        })?;
        info!(path = %self.path.display(), "watching the config file and its plugins");
        Ok(watch)
    }

    /// What the watch follows: the config and the components its last parsed version names.
    fn files(&self) -> Vec<PathBuf> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).files.clone()
    }
}

/// The config file and the components `config` names.
fn files_of(path: &Path, config: &PickerConfig) -> Vec<PathBuf> {
    std::iter::once(path.to_path_buf()).chain(config.files_read()).collect()
}

/// Reads the config once; parses and fingerprints the same bytes.
fn read(path: &Path) -> Result<(PickerConfig, u64), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    let config = PickerConfig::parse(text, path.parent()).map_err(|e| e.to_string())?;
    let fp = fingerprint(&bytes, &config);
    Ok((config, fp))
}

/// A hash of the config's bytes and of every file it makes the EPP read (components, a
/// tokenizer): a file that appears or changes is a change of the config.
fn fingerprint(config_bytes: &[u8], config: &PickerConfig) -> u64 {
    let mut bytes = config_bytes.to_vec();
    for p in config.files_read() {
        bytes.extend_from_slice(p.as_os_str().as_encoded_bytes());
        bytes.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&std::fs::read(p).unwrap_or_default()).to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}
