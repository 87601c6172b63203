//! `Scraper`: one polling task per endpoint, started, restarted and stopped by `sync`.
//!
//! It owns the tasks' lifecycle, their schedule (one scrape at a time per endpoint, every
//! `interval`), the per-endpoint error counters and the logging of each endpoint's scrape
//! state — once per change (warn when it goes bad, info when it recovers), never per scrape.
//! What a result means is the sink's business; this module must not interpret metrics, and
//! a poller must never end on bad data: every failure is reported and the next tick retries.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use super::extract::{EngineMetrics, MetricNames, extract};
use super::fetch::{self, MAX_PAGE_BYTES};
use super::parse::parse_bytes;
use super::{ScrapeConfig, ScrapeError, ScrapeSink, ScrapeTarget};

/// `tokio::time::interval` panics on a zero period; a configured 0 means "as often as
/// possible", which this still allows without spinning.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// Keeps one polling task per endpoint.
///
/// Its methods may be called from any thread, inside the runtime or not (discovery calls
/// `sync` from its own thread): tasks are spawned on the runtime handle taken at creation.
pub struct Scraper {
    config: Arc<ScrapeConfig>,
    sink: Arc<dyn ScrapeSink>,
    runtime: Handle,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pollers: HashMap<u32, Poller>,
    /// Failed scrapes per endpoint key. Shared with the pollers, so a poller restarted at a
    /// new address keeps counting where it was; dropped when the key leaves the pool.
    errors: HashMap<String, Arc<AtomicU64>>,
    /// Set by `stop`: no poller starts again.
    stopped: bool,
}

/// A running poller, as `sync` sees it.
struct Poller {
    key: String,
    addr: std::net::SocketAddr,
    names: Arc<MetricNames>,
    gate: Arc<Gate>,
    task: JoinHandle<()>,
}

impl Poller {
    /// Returns once the poller will make no more sink calls. Closing the gate waits for a
    /// call in progress; aborting then ends the task at its next await (mid-request, say).
    fn stop(self) {
        self.gate.close();
        self.task.abort();
        debug!(endpoint = %self.key, addr = %self.addr, "stopped scraping metrics");
    }
}

impl Scraper {
    /// A scraper spawning its tasks on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime; use `with_runtime` there.
    pub fn new(config: ScrapeConfig, sink: Arc<dyn ScrapeSink>) -> Self {
        Scraper::with_runtime(config, sink, Handle::current())
    }

    /// A scraper spawning its tasks on `runtime`.
    pub fn with_runtime(config: ScrapeConfig, sink: Arc<dyn ScrapeSink>, runtime: Handle) -> Self {
        Scraper { config: Arc::new(config), sink, runtime, state: Mutex::new(State::default()) }
    }

    /// Makes the pollers match `targets`: starts new ids, stops removed ones, restarts an id
    /// whose address, key or metric names changed. When it returns, no removed or replaced
    /// poller makes another sink call. Of duplicate ids the last one counts. Does nothing after `stop`.
    pub fn sync(&self, targets: &[ScrapeTarget]) {
        let mut state = self.lock();
        if state.stopped {
            debug!(targets = targets.len(), "metrics scraper stopped; ignoring new targets");
            return;
        }
        let wanted: HashMap<u32, &ScrapeTarget> = targets.iter().map(|t| (t.id, t)).collect();
        let stale: Vec<u32> = state
            .pollers
            .iter()
            .filter(|(id, p)| wanted.get(id).is_none_or(|t| t.addr != p.addr || t.key != p.key || t.names != p.names))
            .map(|(id, _)| *id)
            .collect();
        // Invariant: a replaced poller is stopped before its successor starts, so the sink
        // never sees the old address's values after the new one's.
        for id in stale {
            if let Some(poller) = state.pollers.remove(&id) {
                poller.stop();
            }
        }
        let keys: HashSet<&str> = wanted.values().map(|t| t.key.as_str()).collect();
        state.errors.retain(|key, _| keys.contains(key.as_str()));
        for target in wanted.values() {
            if !state.pollers.contains_key(&target.id) {
                let errors = state.errors.entry(target.key.clone()).or_default().clone();
                let poller = self.spawn(target, errors);
                state.pollers.insert(target.id, poller);
            }
        }
    }

    /// Stops every poller for good; when it returns no sink call is running or will start.
    /// Error counters stay readable. Also done on drop.
    pub fn stop(&self) {
        let mut state = self.lock();
        state.stopped = true;
        for (_, poller) in state.pollers.drain() {
            poller.stop();
        }
    }

    /// Failed scrapes so far per endpoint key of the current pool, sorted by key.
    pub fn error_counts(&self) -> Vec<(String, u64)> {
        let state = self.lock();
        let mut counts: Vec<(String, u64)> =
            state.errors.iter().map(|(key, count)| (key.clone(), count.load(Ordering::Relaxed))).collect();
        counts.sort();
        counts
    }

    fn spawn(&self, target: &ScrapeTarget, errors: Arc<AtomicU64>) -> Poller {
        let url = format!("{}://{}{}", self.config.scheme, target.addr, self.config.path);
        debug!(endpoint = %target.key, %url, "scraping metrics");
        let gate = Arc::new(Gate::new());
        let poll = Poll {
            id: target.id,
            key: target.key.clone(),
            url,
            names: target.names.clone(),
            config: self.config.clone(),
            sink: self.sink.clone(),
            gate: gate.clone(),
            errors,
        };
        let task = self.runtime.spawn(poll.run());
        Poller { key: target.key.clone(), addr: target.addr, names: target.names.clone(), gate, task }
    }

    /// The state stays consistent across a panic elsewhere (every change is one
    /// statement), so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for Scraper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("Scraper")
            .field("config", &self.config)
            .field("endpoints", &state.pollers.len())
            .field("stopped", &state.stopped)
            .finish()
    }
}

/// Whether a poller may still report. Held shut by `Poller::stop`; held open by the poller
/// for the length of one report, so closing it waits for that report to finish.
struct Gate(Mutex<bool>);

impl Gate {
    fn new() -> Gate {
        Gate(Mutex::new(true))
    }

    fn enter(&self) -> Option<MutexGuard<'_, bool>> {
        let open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if *open { Some(open) } else { None }
    }

    fn close(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = false;
    }
}

/// One endpoint's polling task.
struct Poll {
    id: u32,
    key: String,
    url: String,
    names: Arc<MetricNames>,
    config: Arc<ScrapeConfig>,
    sink: Arc<dyn ScrapeSink>,
    gate: Arc<Gate>,
    errors: Arc<AtomicU64>,
}

impl Poll {
    async fn run(self) {
        let mut client = None;
        let mut health = Health::Unknown;
        // The last unusable cache configuration logged, so each is logged once.
        let mut cache_note: Option<String> = None;
        let mut ticks = tokio::time::interval(self.config.interval.max(MIN_INTERVAL));
        // A scrape that overruns (a slow or hanging worker) pushes the schedule back rather
        // than being followed by a burst of catch-up scrapes.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            // Invariant: scrapes of one endpoint never overlap: this loop awaits each one.
            let outcome = self.scrape(&mut client).await;
            if let Ok(m) = &outcome {
                let note = m.cache_error.as_ref().map(ToString::to_string);
                if note.is_some() && note != cache_note {
                    warn!(
                        endpoint = %self.key,
                        url = %self.url,
                        error = note.as_deref().unwrap_or_default(),
                        "the KV-cache configuration on the metrics page is unusable; prefix-index capacity falls back to the configured one"
                    );
                }
                cache_note = note;
            }
            if !self.report(&outcome, &mut health) {
                return;
            }
        }
    }

    async fn scrape(&self, client: &mut Option<reqwest::Client>) -> Result<EngineMetrics, ScrapeError> {
        // Built on first use and kept, so the endpoint's connection is reused; a failure to
        // build is reported like any failed scrape and retried on the next tick.
        let http = match client {
            Some(http) => http.clone(),
            None => client.insert(fetch::client(self.config.timeout)?).clone(),
        };
        let page = fetch::fetch(&http, &self.url, self.config.timeout, MAX_PAGE_BYTES).await?;
        let samples = parse_bytes(&page)?;
        Ok(extract(&samples, &self.names)?)
    }

    /// Hands one outcome to the sink and logs a change of state; false once stopped.
    fn report(&self, outcome: &Result<EngineMetrics, ScrapeError>, health: &mut Health) -> bool {
        let Some(_open) = self.gate.enter() else {
            return false;
        };
        let change = health.observe(outcome.is_ok(), Instant::now());
        match outcome {
            Ok(metrics) => {
                match change {
                    Some(Change::Recovered { failures, after }) => {
                        info!(endpoint = %self.key, url = %self.url, failures, after = ?after, "metrics scrape recovered");
                    }
                    Some(Change::Up) => debug!(endpoint = %self.key, url = %self.url, "first metrics scrape succeeded"),
                    Some(Change::Down) | None => {}
                }
                self.sink.scraped(self.id, metrics);
            }
            Err(error) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if change == Some(Change::Down) {
                    warn!(
                        endpoint = %self.key,
                        url = %self.url,
                        %error,
                        "metrics scrape failing; the endpoint's metrics go stale until it recovers"
                    );
                }
                self.sink.failed(self.id, &self.key, error);
            }
        }
        true
    }
}

/// An endpoint's scrape state, as far as logging cares.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Health {
    /// Not scraped yet.
    Unknown,
    Ok,
    Failing {
        failures: u64,
        since: Instant,
    },
}

/// A change worth one log line.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Change {
    /// The first scrape succeeded.
    Up,
    /// A scrape failed after success, or the first one did.
    Down,
    Recovered {
        failures: u64,
        after: Duration,
    },
}

impl Health {
    fn observe(&mut self, ok: bool, now: Instant) -> Option<Change> {
        let (next, change) = match (*self, ok) {
            (Health::Unknown, true) => (Health::Ok, Some(Change::Up)),
            (Health::Ok, true) => (Health::Ok, None),
            (Health::Failing { failures, since }, true) => {
                (Health::Ok, Some(Change::Recovered { failures, after: now.saturating_duration_since(since) }))
            }
            (Health::Unknown | Health::Ok, false) => (Health::Failing { failures: 1, since: now }, Some(Change::Down)),
            (Health::Failing { failures, since }, false) => (Health::Failing { failures: failures + 1, since }, None),
        };
        *self = next;
        change
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::sync::watch;

    use super::super::test_server::{Reply, TestServer};
    use super::*;

    const CURRENT: &str = include_str!("../../../tests/fixtures/vllm-metrics/current.txt");
    const GARBAGE: &str = include_str!("../../../tests/fixtures/vllm-metrics/garbage.txt");
    const TRUNCATED: &str = include_str!("../../../tests/fixtures/vllm-metrics/truncated.txt");

    /// Generous: it is only reached when a test fails, and CI machines can be slow.
    const DEADLINE: Duration = Duration::from_secs(10);

    #[derive(Debug, Clone, PartialEq)]
    enum Event {
        Scraped { id: u32, waiting: f64 },
        Failed { id: u32, target: String, kind: String },
    }

    fn kind(error: &ScrapeError) -> String {
        match error {
            ScrapeError::Connect(_) => "connect".into(),
            ScrapeError::Transport(_) => "transport".into(),
            ScrapeError::Timeout(_) => "timeout".into(),
            ScrapeError::Status(code) => format!("status {code}"),
            ScrapeError::TooLarge { .. } => "too large".into(),
            ScrapeError::Parse(_) => "parse".into(),
            ScrapeError::Extract(_) => "extract".into(),
        }
    }

    /// A sink that records every call and wakes waiters.
    struct Recorder {
        events: Mutex<Vec<Event>>,
        changed: watch::Sender<u64>,
    }

    impl ScrapeSink for Recorder {
        fn scraped(&self, id: u32, metrics: &EngineMetrics) {
            self.push(Event::Scraped { id, waiting: metrics.waiting });
        }

        fn failed(&self, id: u32, target: &str, error: &ScrapeError) {
            self.push(Event::Failed { id, target: target.to_string(), kind: kind(error) });
        }
    }

    impl Recorder {
        fn new() -> Arc<Recorder> {
            Arc::new(Recorder { events: Mutex::new(Vec::new()), changed: watch::Sender::new(0) })
        }

        fn push(&self, event: Event) {
            self.events.lock().unwrap_or_else(PoisonError::into_inner).push(event);
            self.changed.send_modify(|n| *n += 1);
        }

        fn events(&self) -> Vec<Event> {
            self.events.lock().unwrap_or_else(PoisonError::into_inner).clone()
        }

        fn len(&self) -> usize {
            self.events.lock().unwrap_or_else(PoisonError::into_inner).len()
        }

        /// Waits until `done` holds for the events recorded from index `mark` on.
        async fn wait_after(&self, mark: usize, what: &str, done: impl Fn(&[Event]) -> bool) {
            let mut changes = self.changed.subscribe();
            let deadline = tokio::time::Instant::now() + DEADLINE;
            loop {
                // Marked seen before looking, so an event pushed after the look wakes us.
                changes.borrow_and_update();
                let events = self.events();
                if done(events.get(mark..).unwrap_or_default()) {
                    return;
                }
                if !matches!(tokio::time::timeout_at(deadline, changes.changed()).await, Ok(Ok(()))) {
                    let tail = &events[events.len().saturating_sub(10)..];
                    panic!("no {what} within {DEADLINE:?}; last events: {tail:#?}");
                }
            }
        }
    }

    fn config() -> ScrapeConfig {
        ScrapeConfig { interval: Duration::from_millis(10), timeout: Duration::from_millis(300), ..Default::default() }
    }

    fn target(id: u32, key: &str, addr: SocketAddr) -> ScrapeTarget {
        ScrapeTarget { id, key: key.to_string(), addr, names: Arc::new(MetricNames::default()) }
    }

    fn page(waiting: f64) -> String {
        format!("vllm:num_requests_waiting {waiting}\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0\n")
    }

    fn scrapes_of(id: u32, events: &[Event]) -> usize {
        events.iter().filter(|e| matches!(e, Event::Scraped { id: i, .. } if *i == id)).count()
    }

    fn scraped(id: u32, waiting: f64) -> impl Fn(&[Event]) -> bool {
        move |events| events.contains(&Event::Scraped { id, waiting })
    }

    /// Calls `sync` from a plain thread outside the runtime, as discovery does.
    fn sync_from_thread(scraper: &Arc<Scraper>, targets: Vec<ScrapeTarget>) {
        let scraper = scraper.clone();
        let joined = std::thread::spawn(move || scraper.sync(&targets)).join();
        assert!(joined.is_ok(), "sync panicked");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poller_reports_values_then_failures_then_recovers() {
        let server = TestServer::start(Reply::page(CURRENT)).await;
        let sink = Recorder::new();
        let scraper = Scraper::new(config(), sink.clone());
        scraper.sync(&[target(1, "default/a", server.addr())]);
        sink.wait_after(0, "scrape of the current page", scraped(1, 3.0)).await;

        let without_kv = "vllm:num_requests_waiting 1\nvllm:num_requests_running 0\n";
        let failures = [
            (Reply::page(GARBAGE), "parse"),
            (Reply::Status(500), "status 500"),
            (Reply::page(TRUNCATED), "parse"),
            (Reply::page(without_kv), "extract"),
            (Reply::Page(b"vllm:num_requests_waiting{a=\"\xff\"} 1\n".to_vec()), "parse"),
            (Reply::Chunked(vec![b'#'; MAX_PAGE_BYTES + 1]), "too large"),
            (Reply::Close, "transport"),
            (Reply::Hang, "timeout"),
            (Reply::page(&page(1.0)), "ok"),
            (Reply::Status(503), "status 503"),
        ];
        for (reply, expected) in failures {
            let mark = sink.len();
            let what = format!("{expected} after {reply:?}");
            server.set(reply);
            if expected == "ok" {
                sink.wait_after(mark, &what, scraped(1, 1.0)).await;
                continue;
            }
            let failed = Event::Failed { id: 1, target: "default/a".into(), kind: expected.into() };
            sink.wait_after(mark, &what, |events| events.contains(&failed)).await;
        }
        let mark = sink.len();
        server.set(Reply::page(&page(7.0)));
        sink.wait_after(mark, "recovery", scraped(1, 7.0)).await;

        // Counted once per failed scrape, exactly as reported (after `stop`, nothing is in
        // flight between the count and the report).
        scraper.stop();
        let failed = sink.events().iter().filter(|e| matches!(e, Event::Failed { .. })).count() as u64;
        assert_eq!(scraper.error_counts(), vec![("default/a".to_string(), failed)]);
    }

    /// An endpoint relabelled to another engine is read with that engine's names from the
    /// next sync on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relabelled_endpoint_is_read_with_its_new_engines_names() {
        let both = format!("{}sglang:num_queue_reqs 9\nsglang:num_running_reqs 1\nsglang:token_usage 0.5\n", page(4.0));
        let server = TestServer::start(Reply::page(&both)).await;
        let sink = Recorder::new();
        let scraper = Arc::new(Scraper::new(config(), sink.clone()));
        let engines = super::super::Engines::builtin(MetricNames::default());
        let labelled = |engine: &str| {
            let labels = [(super::super::ENGINE_LABEL_KEY.to_string(), engine.to_string())].into();
            ScrapeTarget { names: engines.resolve(&labels).0, ..target(1, "ns/a", server.addr()) }
        };
        sync_from_thread(&scraper, vec![labelled("vllm")]);
        sink.wait_after(0, "a scrape with vLLM's names", scraped(1, 4.0)).await;
        sync_from_thread(&scraper, vec![labelled("sglang")]);
        let mark = sink.len();
        sink.wait_after(mark, "a scrape with SGLang's names", scraped(1, 9.0)).await;
        assert!(!sink.events()[mark..].contains(&Event::Scraped { id: 1, waiting: 4.0 }), "old names after sync");
        // And back: vLLM's names again (an unknown engine reads as the default, vLLM, too).
        sync_from_thread(&scraper, vec![labelled("sglng")]);
        let mark = sink.len();
        sink.wait_after(mark, "a scrape with vLLM's names again", scraped(1, 4.0)).await;
        assert!(!sink.events()[mark..].contains(&Event::Scraped { id: 1, waiting: 9.0 }), "old names after sync");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_endpoint_fails_until_it_moves() {
        let server = TestServer::start(Reply::page(&page(5.0))).await;
        let closed = TestServer::closed_port().await;
        let sink = Recorder::new();
        let scraper = Arc::new(Scraper::new(config(), sink.clone()));
        sync_from_thread(&scraper, vec![target(1, "ns/a", closed)]);
        let refused = Event::Failed { id: 1, target: "ns/a".into(), kind: "connect".into() };
        sink.wait_after(0, "connect failures", |events| events.iter().filter(|e| **e == refused).count() >= 3).await;
        sync_from_thread(&scraper, vec![target(1, "ns/a", server.addr())]);
        let mark = sink.len();
        sink.wait_after(mark, "three scrapes at the new address", |events| scrapes_of(1, events) >= 3).await;
        assert!(!sink.events()[mark..].contains(&refused), "the old address's poller reported after sync returned");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_stops_removed_endpoints_and_restarts_moved_ones() {
        let a = TestServer::start(Reply::page(&page(1.0))).await;
        let b = TestServer::start(Reply::page(&page(2.0))).await;
        let sink = Recorder::new();
        let scraper = Arc::new(Scraper::new(config(), sink.clone()));
        sync_from_thread(&scraper, vec![target(1, "ns/one", a.addr()), target(2, "ns/two", b.addr())]);
        sink.wait_after(0, "scrapes of both", |e| scraped(1, 1.0)(e) && scraped(2, 2.0)(e)).await;

        // Removed: not one more call for id 2, while id 1 goes on.
        sync_from_thread(&scraper, vec![target(1, "ns/one", a.addr())]);
        let mark = sink.len();
        sink.wait_after(mark, "five more scrapes of id 1", |events| scrapes_of(1, events) >= 5).await;
        let after: Vec<Event> = sink.events()[mark..].to_vec();
        assert!(after.iter().all(|e| matches!(e, Event::Scraped { id: 1, .. })), "{after:?}");
        assert_eq!(scraper.error_counts(), vec![("ns/one".to_string(), 0)]);

        // Moved: restarted, and only the new address is reported once sync has returned.
        sync_from_thread(&scraper, vec![target(1, "ns/one", b.addr())]);
        let mark = sink.len();
        sink.wait_after(mark, "five scrapes at the new address", |events| scrapes_of(1, events) >= 5).await;
        let after: Vec<Event> = sink.events()[mark..].to_vec();
        assert!(after.iter().all(|e| *e == Event::Scraped { id: 1, waiting: 2.0 }), "{after:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_and_drop_end_every_poller() {
        let server = TestServer::start(Reply::page(&page(1.0))).await;
        // A second scraper of the same server is the clock: it shows time passing with
        // scrapes going on, without a fixed sleep.
        let clock_sink = Recorder::new();
        let clock = Scraper::new(config(), clock_sink.clone());
        clock.sync(&[target(9, "ns/clock", server.addr())]);

        for how in ["stop", "drop"] {
            let sink = Recorder::new();
            let scraper = Scraper::new(config(), sink.clone());
            scraper.sync(&[target(1, "ns/a", server.addr()), target(2, "ns/b", server.addr())]);
            sink.wait_after(0, "scrapes of both", |e| scraped(1, 1.0)(e) && scraped(2, 1.0)(e)).await;
            if how == "stop" {
                scraper.stop();
                scraper.sync(&[target(3, "ns/c", server.addr())]);
            } else {
                drop(scraper);
            }
            let ended = sink.len();
            let mark = clock_sink.len();
            clock_sink.wait_after(mark, "five clock ticks", |events| scrapes_of(9, events) >= 5).await;
            assert_eq!(sink.len(), ended, "a call after {how}: {:?}", &sink.events()[ended..]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_zero_interval_still_scrapes() {
        let server = TestServer::start(Reply::page(&page(1.0))).await;
        let sink = Recorder::new();
        let scraper = Scraper::new(ScrapeConfig { interval: Duration::ZERO, ..config() }, sink.clone());
        scraper.sync(&[target(1, "ns/a", server.addr())]);
        sink.wait_after(0, "three scrapes", |events| scrapes_of(1, events) >= 3).await;
    }

    #[test]
    fn sync_works_without_a_runtime_context() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let server = runtime.block_on(TestServer::start(Reply::page(&page(4.0))));
        let sink = Recorder::new();
        // Created and synced on this plain test thread: neither needs to be inside the runtime.
        let scraper = Scraper::with_runtime(config(), sink.clone(), runtime.handle().clone());
        scraper.sync(&[target(1, "ns/a", server.addr())]);
        runtime.block_on(sink.wait_after(0, "a scrape", scraped(1, 4.0)));
        scraper.stop();
        drop(server);
    }

    #[test]
    fn state_changes_are_logged_once() {
        use Change::{Down, Recovered, Up};
        let ms = Duration::from_millis;
        // Each step: scrape outcome → the change logged, if any. Steps are 10 ms apart.
        /// A scrape's outcome (ok?) and the change it must log, if any.
        type Step = (bool, Option<Change>);
        let cases: &[(&str, &[Step])] = &[
            ("healthy", &[(true, Some(Up)), (true, None), (true, None)]),
            ("bad from the start", &[(false, Some(Down)), (false, None), (false, None)]),
            (
                "flapping",
                &[
                    (true, Some(Up)),
                    (false, Some(Down)),
                    (false, None),
                    (false, None),
                    (true, Some(Recovered { failures: 3, after: ms(30) })),
                    (true, None),
                    (false, Some(Down)),
                    (true, Some(Recovered { failures: 1, after: ms(10) })),
                ],
            ),
            (
                "recovering from a bad start",
                &[(false, Some(Down)), (true, Some(Recovered { failures: 1, after: ms(10) }))],
            ),
        ];
        for (name, steps) in cases {
            let start = Instant::now();
            let mut health = Health::Unknown;
            for (i, (ok, expected)) in steps.iter().enumerate() {
                let now = start + ms(10 * i as u64);
                assert_eq!(health.observe(*ok, now), *expected, "{name}, step {i}");
            }
        }
    }
}
