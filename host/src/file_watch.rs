//! `FileWatch`: the one way the EPP follows files on disk — the endpoints file (discovery)
//! and the config with the components it names (reload) — with one rule for both.
//!
//! It watches the *folders* of the files it follows, because the usual ways of replacing a
//! file swap its inode: `mv x.tmp x`, or Kubernetes ConfigMap volumes, where
//! `endpoints.yaml -> ..data/endpoints.yaml` and the `..data` symlink is renamed over. A
//! watch on the file itself would stay on the old inode.
//!
//! The rule:
//! - Events on a followed file's name count; so do events on other names while a followed
//!   path is a symlink (any link on the way to it may be what was swapped), lost events and
//!   watcher errors. Opens and reads (ours included) do not; a close after writing does.
//!   Other files in the folders (logs, temp files) are ignored.
//! - A burst of events is over after `QUIET` without a counted event, and a change is acted
//!   on at most `MAX_DEBOUNCE` after it is first seen, however long the burst.
//! - A file written in place (not renamed over) is acted on once its writer closes it —
//!   where the watcher reports closes (inotify) — or after a rename or removal, or at the
//!   latest `MAX_WRITER_WAIT` after the write began: a slow writer's half-written file may
//!   parse, and must not be taken for the finished one.
//!
//! The caller's `on_change` runs on the watch's own thread, never concurrently with
//! itself: once right after the watch is installed (a change between the caller's own read
//! and the watch starting is not missed), then after each settled burst. It returns the
//! files to follow from then on (a config may name other components after a reload), and
//! may ask to be called again after a while without any event (a retry after a failure
//! that may pass, such as a deadline missed on a busy machine).
//! Comparing contents is the caller's job: a spurious call must cost one read and nothing
//! else. It works with or without a tokio runtime and never blocks one.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tracing::{debug, error, warn};

/// A burst of events (a write is open, modify×n, close) is over after this much quiet.
pub const QUIET: Duration = Duration::from_millis(20);
/// A steady stream of events must not postpone acting on a change forever: a change is
/// acted on within this (plus the caller's read and parse), inside the 100 ms promised for
/// endpoint updates.
pub const MAX_DEBOUNCE: Duration = Duration::from_millis(60);
/// The longest wait for an in-place writer to close the file.
pub const MAX_WRITER_WAIT: Duration = Duration::from_secs(1);

/// What `on_change` asks for next.
pub struct Follow {
    /// The files to follow from now on.
    pub files: Vec<PathBuf>,
    /// Call `on_change` again after this long if no event comes first.
    pub again_in: Option<Duration>,
}

impl Follow {
    pub fn files(files: Vec<PathBuf>) -> Follow {
        Follow { files, again_in: None }
    }
}

enum Msg {
    Fs(notify::Result<notify::Event>),
    Stop,
}

/// A running watch. Dropping it (or `stop()`) ends it.
pub struct FileWatch {
    /// `Some` until `stop`, which drops it first so no event arrives after `Stop`. Shared
    /// with the thread, which adds folders when the followed files change.
    watcher: Arc<Mutex<Option<RecommendedWatcher>>>,
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    what: &'static str,
}

impl FileWatch {
    /// Follows `files` (the folders holding them must be watchable, or this fails naming
    /// the folder). `what` names them in logs ("the endpoints file"); `thread` names the
    /// watch's thread.
    pub fn start(
        what: &'static str,
        thread: &str,
        files: Vec<PathBuf>,
        on_change: impl FnMut() -> Follow + Send + 'static,
    ) -> Result<FileWatch, String> {
        let (tx, rx) = mpsc::channel();
        let events = tx.clone();
        // notify calls this on its own thread; sending never blocks, and a send after the
        // worker ended has no one to tell.
        let watcher = notify::recommended_watcher(move |event| {
            let _ = events.send(Msg::Fs(event));
        })
        .map_err(|e| format!("cannot create a file watcher: {e}"))?;
        let closes_reported = RecommendedWatcher::kind() == notify::WatcherKind::Inotify;
        let watcher = Arc::new(Mutex::new(Some(watcher)));
        let mut worker = Worker {
            what,
            watcher: watcher.clone(),
            folders: BTreeSet::new(),
            files: Vec::new(),
            names: BTreeSet::new(),
            rx,
            on_change: Box::new(on_change),
            again_in: None,
            closes_reported,
            writing: BTreeSet::new(),
        };
        worker.follow(files).map_err(|(dir, e)| format!("cannot watch directory {}: {e}", dir.display()))?;
        let thread = std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || worker.run())
            .map_err(|e| format!("cannot start the {what} watch thread: {e}"))?;
        Ok(FileWatch { watcher, tx, thread: Some(thread), what })
    }

    /// Stops watching and waits for an `on_change` in progress to return, so it is not
    /// called after this returns (unless this is called from within `on_change`).
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        drop(lock(&self.watcher).take());
        // The worker may already have ended (it panicked in `on_change`); nothing to tell.
        let _ = self.tx.send(Msg::Stop);
        // Joining ourselves would deadlock: `on_change` dropped the handle.
        if thread.thread().id() != std::thread::current().id() && thread.join().is_err() {
            error!("the {} watch thread panicked", self.what);
        }
    }
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

struct Worker {
    what: &'static str,
    watcher: Arc<Mutex<Option<RecommendedWatcher>>>,
    /// Folders watched now: those of the files followed (a folder no longer needed is
    /// unwatched, so a file of the same name there is not taken for a followed one).
    folders: BTreeSet<PathBuf>,
    files: Vec<PathBuf>,
    names: BTreeSet<OsString>,
    rx: mpsc::Receiver<Msg>,
    on_change: Box<dyn FnMut() -> Follow + Send>,
    /// When `on_change` asked to be called again without an event.
    again_in: Option<Duration>,
    /// Whether the watcher reports a writer closing a file (inotify does).
    closes_reported: bool,
    /// Followed names written in place whose writer has not closed them yet.
    writing: BTreeSet<OsString>,
}

impl Worker {
    fn run(mut self) {
        self.changed();
        loop {
            let event = self.next();
            match event {
                Ok(Msg::Fs(event)) => self.note(&event),
                // Asked to be called again, and nothing came first.
                Err(RecvTimeoutError::Timeout) => {
                    self.changed();
                    continue;
                }
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            }
            if !self.debounce() {
                return;
            }
            self.changed();
        }
    }

    /// The next counted event or `Stop`; `Timeout` when `on_change` asked to be called
    /// again and its time came first.
    fn next(&mut self) -> Result<Msg, RecvTimeoutError> {
        let until = self.again_in.map(|wait| Instant::now() + wait);
        loop {
            let msg = match until {
                Some(until) => self.rx.recv_timeout(until.saturating_duration_since(Instant::now()))?,
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected)?,
            };
            match msg {
                Msg::Fs(event) if !self.counts(&event) => continue,
                msg => return Ok(msg),
            }
        }
    }

    fn changed(&mut self) {
        let Follow { files, again_in } = (self.on_change)();
        self.again_in = again_in;
        if let Err((dir, e)) = self.follow(files) {
            warn!(dir = %dir.display(), error = %e, "cannot watch folder; changes to {} there are not seen", self.what);
        }
    }

    /// Follows `files` from now on, watching their folders and unwatching the folders no
    /// longer needed; stops at the first folder that cannot be watched (the files are
    /// followed all the same, and no folder is unwatched then).
    fn follow(&mut self, files: Vec<PathBuf>) -> Result<(), (PathBuf, notify::Error)> {
        self.names = files.iter().filter_map(|f| f.file_name().map(OsString::from)).collect();
        self.writing.retain(|n| self.names.contains(n));
        let wanted: BTreeSet<PathBuf> = files.iter().map(|f| parent(f)).collect();
        self.files = files;
        let mut watcher = lock(&self.watcher);
        let Some(watcher) = watcher.as_mut() else { return Ok(()) };
        for dir in wanted.difference(&self.folders).cloned().collect::<Vec<_>>() {
            watcher.watch(&dir, RecursiveMode::NonRecursive).map_err(|e| (dir.clone(), e))?;
            self.folders.insert(dir);
        }
        for dir in self.folders.difference(&wanted).cloned().collect::<Vec<_>>() {
            // A folder removed meanwhile is no longer watched anyway.
            if let Err(e) = watcher.unwatch(&dir) {
                debug!(dir = %dir.display(), error = %e, "folder no longer followed could not be unwatched");
            }
            self.folders.remove(&dir);
        }
        Ok(())
    }

    /// Waits for a burst of counted events to settle (and for in-place writers to close
    /// their files, at most `MAX_WRITER_WAIT`); false when asked to stop.
    fn debounce(&mut self) -> bool {
        let start = Instant::now();
        let mut last = start;
        loop {
            let cap = if self.writing.is_empty() { MAX_DEBOUNCE } else { MAX_WRITER_WAIT };
            let left = cap.saturating_sub(start.elapsed());
            if left.is_zero() {
                if !self.writing.is_empty() {
                    debug!(writing = ?self.writing, "the writer of {} is still at it; acting on it anyway", self.what);
                    self.writing.clear();
                }
                return true;
            }
            let quiet_left = QUIET.saturating_sub(last.elapsed());
            if quiet_left.is_zero() && self.writing.is_empty() {
                return true;
            }
            let wait = if self.writing.is_empty() { quiet_left.min(left) } else { QUIET.min(left) };
            match self.rx.recv_timeout(wait) {
                Ok(Msg::Fs(event)) if self.counts(&event) => {
                    self.note(&event);
                    last = Instant::now();
                }
                Ok(Msg::Fs(_)) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Follows in-place writes: data written to a followed name opens a write; a close
    /// after writing, a rename over it or its removal ends it.
    fn note(&mut self, event: &notify::Result<notify::Event>) {
        let Ok(event) = event else { return };
        if !self.closes_reported {
            return;
        }
        for name in event.paths.iter().filter_map(|p| p.file_name()).filter(|n| self.names.contains(*n)) {
            match event.kind {
                EventKind::Modify(ModifyKind::Data(_)) => {
                    self.writing.insert(name.to_os_string());
                }
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(_))
                | EventKind::Remove(_) => {
                    self.writing.remove(name);
                }
                _ => {}
            }
        }
    }

    fn counts(&self, event: &notify::Result<notify::Event>) -> bool {
        let event = match event {
            Ok(event) => event,
            // Lost events (queue overflow) or a backend error: the files may have changed.
            Err(e) => {
                warn!(error = %e, "file watcher error; re-reading {}", self.what);
                return true;
            }
        };
        match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return false,
            _ => {}
        }
        if event.paths.is_empty() || event.need_rescan() {
            return true;
        }
        if event.paths.iter().filter_map(|p| p.file_name()).any(|n| self.names.contains(n)) {
            return true;
        }
        // A symlinked file changes when any link on the way to it is swapped, and those
        // links have other names (`..data`).
        self.files.iter().any(|f| std::fs::symlink_metadata(f).is_ok_and(|m| m.file_type().is_symlink()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const DEADLINE: Duration = Duration::from_secs(5);

    /// A watch whose `on_change` reports each call (with the file's text) on a channel.
    fn watch(files: Vec<PathBuf>, next: impl Fn() -> Follow + Send + 'static) -> (FileWatch, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel();
        let first = files[0].clone();
        let w = FileWatch::start("the test file", "test-watch", files, move || {
            let _ = tx.send(std::fs::read_to_string(&first).unwrap_or_default());
            next()
        })
        .unwrap();
        (w, rx)
    }

    fn next(rx: &mpsc::Receiver<String>, context: &str) -> String {
        rx.recv_timeout(DEADLINE).unwrap_or_else(|e| panic!("{context}: no call within {DEADLINE:?} ({e})"))
    }

    /// No call comes within a few debounce periods.
    fn none(rx: &mpsc::Receiver<String>, context: &str) {
        if let Ok(text) = rx.recv_timeout(MAX_DEBOUNCE * 4) {
            panic!("{context}: unexpected call seeing {text:?}");
        }
    }

    #[test]
    fn other_files_in_the_folder_are_ignored_and_followed_files_can_change() {
        let dir = TempDir::new("file-watch-follow");
        let (a, b, log) = (dir.join("a.yaml"), dir.join("b.wasm"), dir.join("epp.log"));
        std::fs::write(&a, "1").unwrap();
        std::fs::write(&b, "x").unwrap();
        // After the first call, `b` is followed too (as a config naming a component).
        let follow_b = vec![a.clone(), b.clone()];
        let (mut w, rx) = watch(vec![a.clone()], move || Follow::files(follow_b.clone()));
        assert_eq!(next(&rx, "first check"), "1");
        std::fs::write(&log, "busy").unwrap();
        none(&rx, "a log written beside it");
        std::fs::write(dir.join("b.wasm.tmp"), "y").unwrap();
        std::fs::rename(dir.join("b.wasm.tmp"), &b).unwrap();
        assert_eq!(next(&rx, "followed component renamed over"), "1");
        std::fs::write(&a, "2").unwrap();
        assert_eq!(next(&rx, "in-place write"), "2");
        w.stop();
        std::fs::write(&a, "3").unwrap();
        none(&rx, "after stop");
    }

    /// A slow writer: what it has written so far parses, but only the finished file counts.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_in_place_writer_is_waited_for_until_it_closes_the_file() {
        use std::io::Write;
        let dir = TempDir::new("file-watch-writer");
        let a = dir.join("a.yaml");
        std::fs::write(&a, "start").unwrap();
        let path = a.clone();
        let (_w, rx) = watch(vec![a.clone()], move || Follow::files(vec![path.clone()]));
        assert_eq!(next(&rx, "first check"), "start");
        let mut file = std::fs::File::create(&a).unwrap();
        file.write_all(b"half").unwrap();
        file.flush().unwrap();
        std::thread::sleep(MAX_DEBOUNCE * 5);
        file.write_all(b"+rest").unwrap();
        drop(file);
        assert_eq!(next(&rx, "after the close"), "half+rest");
        none(&rx, "one call for one write");
    }

    #[test]
    fn on_change_can_ask_to_be_called_again_without_an_event() {
        let dir = TempDir::new("file-watch-again");
        let a = dir.join("a.yaml");
        std::fs::write(&a, "same").unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let path = a.clone();
        // Twice asks to be called again shortly, then waits for events.
        let (_w, rx) = watch(vec![a.clone()], move || {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            Follow { files: vec![path.clone()], again_in: (n < 2).then_some(Duration::from_millis(30)) }
        });
        for context in ["first check", "first retry", "second retry"] {
            next(&rx, context);
        }
        none(&rx, "no third retry");
        std::fs::write(dir.join("unrelated.log"), "x").unwrap();
        none(&rx, "an unrelated write");
        assert_eq!(calls.load(Ordering::Relaxed), 3);
    }

    /// Once no followed file is left in a folder, a file there with a followed name (a
    /// config's old folder, say) no longer counts.
    #[test]
    fn a_folder_no_longer_followed_is_unwatched() {
        let (old, new) = (TempDir::new("file-watch-old"), TempDir::new("file-watch-new"));
        let (a_old, a_new) = (old.join("a.yaml"), new.join("a.yaml"));
        std::fs::write(&a_old, "old").unwrap();
        std::fs::write(&a_new, "new").unwrap();
        // After the first call the watch follows `new/a.yaml` only; the second call (asked
        // for without an event) shows that answer has been applied.
        let moved = vec![a_new.clone()];
        let calls = AtomicUsize::new(0);
        let (_w, rx) = watch(vec![a_old.clone()], move || Follow {
            files: moved.clone(),
            again_in: (calls.fetch_add(1, Ordering::Relaxed) == 0).then_some(Duration::from_millis(10)),
        });
        next(&rx, "first check");
        next(&rx, "the call asked for");
        std::fs::write(&a_old, "old 2").unwrap();
        none(&rx, "a write in the folder no longer followed");
        std::fs::write(&a_new, "new 2").unwrap();
        next(&rx, "another write to the followed file");
    }

    #[test]
    fn a_folder_that_cannot_be_watched_is_named() {
        let missing = std::env::temp_dir().join(format!("epp-file-watch-missing-{}", std::process::id()));
        let err = match FileWatch::start("the test file", "test-watch", vec![missing.join("x.yaml")], || {
            Follow::files(Vec::new())
        }) {
            Ok(_) => panic!("a missing folder was watched"),
            Err(e) => e,
        };
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }
}
