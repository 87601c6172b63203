//! Passive health: a per-endpoint breaker fed by what the EPP sees on the response path.
//!
//! A worker can fail gray — accept connections, keep a healthy-looking `/metrics`, and never
//! answer. Scraped metrics cannot show it; the requests the EPP routed there can. Every
//! routed request is tracked until its response headers arrive:
//!
//! - **stall**: `stall_min` streamed requests have waited `stall_timeout` for their response
//!   headers, the endpoint answered nothing meanwhile, and another endpoint answered a
//!   request sent after them → ejected. Streamed responses start at once on a working vLLM
//!   server, so silence while the rest of the pool answers is a strong signal; when the
//!   whole pool is slow, nothing is ejected. Non-streamed responses only start when the
//!   completion is done, so they never count as stalled.
//! - **failures**: `failure_threshold` consecutive failures — 5xx statuses (Envoy's own
//!   502/503/504 for a reset, refused or timed-out upstream included) or requests that
//!   ended without any answer after waiting `stall_timeout` → ejected. A non-streamed
//!   request that ends so counts only if the endpoint answered nothing since it was sent
//!   while another endpoint answered a request sent after it: its client may simply have
//!   stopped waiting for a long generation.
//!
//! An ejected endpoint is left out of the candidates for a cool-down (`cooldown`, doubled
//! on each repeated ejection up to `max_cooldown`), then half-open: it may take one probe
//! request at a time. The decision that may probe it claims it when it filters its
//! candidates, so concurrent decisions do not all pick it; the claim becomes the probe if
//! that decision picks it and is released otherwise. A good answer closes the breaker, a
//! failure ejects it again (a streamed probe fails by stalling too; a non-streamed one is
//! judged by how it ends). When
//! every candidate is ejected, all are kept: routing to a doubtful endpoint beats refusing
//! every request.
//!
//! The request path only reads a published set (one atomic load while nothing is ejected);
//! the bookkeeping takes one short lock per request at routing, answer and end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::telemetry::Telemetry;

/// The breaker's settings (flags `--endpoint-*`).
#[derive(Clone, Debug, PartialEq)]
pub struct HealthConfig {
    /// How long a streamed request may wait for response headers; zero turns the
    /// breaker off.
    pub stall_timeout: Duration,
    /// Stalled requests needed to eject.
    pub stall_min: usize,
    /// Consecutive failed responses needed to eject.
    pub failure_threshold: u32,
    /// First cool-down of an ejected endpoint.
    pub cooldown: Duration,
    /// Longest cool-down after repeated ejections.
    pub max_cooldown: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            stall_timeout: Duration::from_secs(1),
            stall_min: 1,
            failure_threshold: 5,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(300),
        }
    }
}

impl HealthConfig {
    pub fn enabled(&self) -> bool {
        !self.stall_timeout.is_zero()
    }
}

/// Why an endpoint was ejected (the `reason` label of `epp_endpoint_ejections_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Stalled,
    Failures,
    ProbeFailed,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Stalled => "stalled",
            Reason::Failures => "failures",
            Reason::ProbeFailed => "probe_failed",
        }
    }
}

/// An idle endpoint's record is dropped after this long without an answer.
const FORGET_AFTER: Duration = Duration::from_secs(300);
/// A claim whose decision never said where it went is dropped after this long. Every way
/// out of a decision settles its claims (`sent` or `release`); this is a safety net. A
/// decision that outlasts it (several plugin calls each near their 10 s cap) may meet a
/// second probe: the breaker's state stays sound, one more request tries the endpoint.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// Cool-down over: one request at a time may probe it.
    HalfOpen {
        probe: Option<u64>,
    },
}

struct Awaiting {
    sent: Instant,
    streamed: bool,
}

struct Tracker {
    /// Routed requests still waiting for response headers, by cycle.
    awaiting: HashMap<u64, Awaiting>,
    last_answer: Option<Instant>,
    /// When the most recently sent of the requests it answered was sent.
    newest_answered: Option<Instant>,
    failures: u32,
    state: State,
    /// The cool-down the next ejection gets.
    next_cooldown: Duration,
    /// Half-open only: the decision (cycle) that may send its probe, and since when.
    claim: Option<(u64, Instant)>,
}

impl Tracker {
    fn new(config: &HealthConfig) -> Self {
        Tracker {
            awaiting: HashMap::new(),
            last_answer: None,
            newest_answered: None,
            failures: 0,
            state: State::Closed,
            next_cooldown: config.cooldown,
            claim: None,
        }
    }

    /// Left out of the candidates right now (a claimed one is left out by `filter_for`, of
    /// every decision but its claimant).
    fn excluded(&self) -> bool {
        match self.state {
            State::Closed => false,
            State::Open { .. } => true,
            State::HalfOpen { probe } => probe.is_some(),
        }
    }

    /// Half-open with no probe out: a decision may claim it.
    fn probe_ready(&self) -> bool {
        self.state == (State::HalfOpen { probe: None })
    }
}

/// What the request path reads without a lock, published whole on every change of state.
#[derive(Default)]
struct Published {
    /// Endpoints to leave out.
    excluded: Arc<Vec<SocketAddr>>,
    /// Half-open endpoints with no probe out; claims on them are checked under the lock.
    ready: Vec<SocketAddr>,
}

/// The breaker of every endpoint the EPP has routed to.
pub struct Health {
    config: HealthConfig,
    trackers: Mutex<HashMap<SocketAddr, Tracker>>,
    /// One snapshot, so a reader never sees the leave-out set of one state and the half-open
    /// set of another.
    published: ArcSwap<Published>,
    /// Whether some decision holds a claim (so `sent` looks for claims to settle). Written
    /// under the lock.
    claimed: AtomicBool,
    telemetry: Option<Arc<Telemetry>>,
}

impl Health {
    pub fn new(config: HealthConfig, telemetry: Option<Arc<Telemetry>>) -> Self {
        Health {
            config,
            trackers: Mutex::default(),
            published: ArcSwap::from_pointee(Published::default()),
            claimed: AtomicBool::new(false),
            telemetry,
        }
    }

    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Tracker>> {
        self.trackers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoints left out of routing now.
    pub fn excluded(&self) -> Arc<Vec<SocketAddr>> {
        self.published.load().excluded.clone()
    }

    /// Keeps the candidates that are not ejected; all of them when every one is. Half-open
    /// endpoints are kept, claimed or not (for the pool's capacity, say); a decision uses
    /// `filter_for`.
    pub fn filter<'a, T>(&self, candidates: Vec<&'a T>, addr: impl Fn(&T) -> SocketAddr) -> Vec<&'a T> {
        keep(&self.published.load().excluded, &[], candidates, addr)
    }

    /// `filter` for decision `cycle`: it also claims the half-open endpoints among the
    /// candidates that nobody probes or claims, so that no concurrent decision picks them
    /// too. `sent` turns the claim on the picked endpoint into its probe and releases the
    /// others; `release` drops them all (the decision failed).
    pub fn filter_for<'a, T>(&self, cycle: u64, candidates: Vec<&'a T>, addr: impl Fn(&T) -> SocketAddr) -> Vec<&'a T> {
        self.filter_for_at(cycle, candidates, addr, Instant::now())
    }

    fn filter_for_at<'a, T>(
        &self,
        cycle: u64,
        candidates: Vec<&'a T>,
        addr: impl Fn(&T) -> SocketAddr,
        now: Instant,
    ) -> Vec<&'a T> {
        let published = self.published.load();
        if published.ready.is_empty() || !candidates.iter().any(|c| published.ready.contains(&addr(c))) {
            return keep(&published.excluded, &[], candidates, addr);
        }
        // A half-open candidate: claim it, or leave it out if another decision has, or if
        // its state moved on since the snapshot. Claims are not published: readers that
        // meet a half-open endpoint always come here.
        let mut others = Vec::new();
        {
            let mut trackers = self.lock();
            for c in &candidates {
                let a = addr(c);
                if !published.ready.contains(&a) {
                    continue;
                }
                match trackers.get_mut(&a) {
                    Some(t) if t.probe_ready() && t.claim.is_none_or(|(c, _)| c == cycle) => {
                        t.claim = Some((cycle, now));
                        self.claimed.store(true, Ordering::Release);
                    }
                    Some(t) if t.probe_ready() || t.excluded() => others.push(a),
                    _ => {}
                }
            }
        }
        keep(&published.excluded, &others, candidates, addr)
    }

    /// Decision `cycle` failed: the endpoints it claimed may be claimed again.
    pub fn release(&self, cycle: u64) {
        if !self.claimed.load(Ordering::Acquire) {
            return;
        }
        let mut trackers = self.lock();
        self.settle_claims(&mut trackers, cycle, None);
    }

    /// Settles decision `cycle`'s claims: the one on `picked` stays (the caller turns it into
    /// the probe), every other is released.
    fn settle_claims(&self, trackers: &mut HashMap<SocketAddr, Tracker>, cycle: u64, picked: Option<SocketAddr>) {
        let mut left = false;
        for (a, t) in trackers.iter_mut() {
            if t.claim.is_some_and(|(c, _)| c == cycle) && Some(*a) != picked {
                t.claim = None;
            }
            left |= t.claim.is_some();
        }
        self.claimed.store(left, Ordering::Release);
    }

    /// A request (cycle `cycle`) was routed to `addr`.
    pub fn sent(&self, addr: SocketAddr, cycle: u64, streamed: bool) {
        self.sent_at(addr, cycle, streamed, Instant::now());
    }

    fn sent_at(&self, addr: SocketAddr, cycle: u64, streamed: bool, now: Instant) {
        if !self.config.enabled() {
            return;
        }
        let mut trackers = self.lock();
        if self.claimed.load(Ordering::Acquire) {
            self.settle_claims(&mut trackers, cycle, Some(addr));
        }
        let t = trackers.entry(addr).or_insert_with(|| Tracker::new(&self.config));
        t.awaiting.insert(cycle, Awaiting { sent: now, streamed });
        if let State::HalfOpen { probe: None } = t.state {
            t.state = State::HalfOpen { probe: Some(cycle) };
            t.claim = None;
            self.publish(&trackers);
        }
    }

    /// The response headers of `cycle` arrived from `addr` with `status`.
    pub fn answered(&self, addr: SocketAddr, cycle: u64, status: u16) {
        self.answered_at(addr, cycle, status, Instant::now());
    }

    fn answered_at(&self, addr: SocketAddr, cycle: u64, status: u16, now: Instant) {
        if !self.config.enabled() {
            return;
        }
        let mut trackers = self.lock();
        let Some(t) = trackers.get_mut(&addr) else { return };
        if let Some(a) = t.awaiting.remove(&cycle) {
            t.newest_answered = Some(t.newest_answered.map_or(a.sent, |n| n.max(a.sent)));
        }
        t.last_answer = Some(now);
        let changed = if (500..600).contains(&status) {
            self.failed(addr, t, now)
        } else {
            t.failures = 0;
            if matches!(t.state, State::HalfOpen { .. }) {
                t.state = State::Closed;
                t.claim = None;
                t.next_cooldown = self.config.cooldown;
                info!(endpoint = %addr, "endpoint answered its probe; back in rotation");
                self.gauge(addr, false);
                true
            } else {
                false
            }
        };
        if changed {
            self.publish(&trackers);
        }
    }

    /// `cycle` ended without response headers (client gone, stream reset).
    pub fn unanswered(&self, addr: SocketAddr, cycle: u64) {
        self.unanswered_at(addr, cycle, Instant::now());
    }

    fn unanswered_at(&self, addr: SocketAddr, cycle: u64, now: Instant) {
        if !self.config.enabled() {
            return;
        }
        let mut trackers = self.lock();
        let others_newest = trackers.iter().filter(|(a, _)| **a != addr).filter_map(|(_, t)| t.newest_answered).max();
        let Some(t) = trackers.get_mut(&addr) else { return };
        let Some(a) = t.awaiting.remove(&cycle) else { return };
        let waited = now.duration_since(a.sent) >= self.config.stall_timeout;
        // A non-streamed answer comes at the end of the generation: a client that stopped
        // waiting blames the endpoint only if it was silent while others answered.
        let silent = t.last_answer.is_none_or(|l| l < a.sent) && others_newest.is_some_and(|n| n > a.sent);
        let changed = if waited && (a.streamed || silent) {
            self.failed(addr, t, now)
        } else {
            // Gone before the endpoint could be blamed: a probe frees its slot.
            if t.state == (State::HalfOpen { probe: Some(cycle) }) {
                t.state = State::HalfOpen { probe: None };
                true
            } else {
                false
            }
        };
        if changed {
            self.publish(&trackers);
        }
    }

    /// Counts one failure; returns whether the state changed.
    fn failed(&self, addr: SocketAddr, t: &mut Tracker, now: Instant) -> bool {
        t.failures += 1;
        match t.state {
            State::HalfOpen { .. } => {
                self.eject(addr, t, Reason::ProbeFailed, now);
                true
            }
            State::Closed if t.failures >= self.config.failure_threshold => {
                self.eject(addr, t, Reason::Failures, now);
                true
            }
            _ => false,
        }
    }

    fn eject(&self, addr: SocketAddr, t: &mut Tracker, reason: Reason, now: Instant) {
        let cooldown = t.next_cooldown;
        t.state = State::Open { until: now + cooldown };
        t.claim = None;
        t.next_cooldown = (cooldown * 2).min(self.config.max_cooldown);
        t.failures = 0;
        warn!(
            endpoint = %addr,
            reason = reason.label(),
            cooldown_s = cooldown.as_secs_f64(),
            awaiting = t.awaiting.len(),
            "endpoint ejected from routing"
        );
        if let Some(tel) = &self.telemetry {
            tel.endpoint_ejected(&addr.to_string(), reason.label());
        }
    }

    fn gauge(&self, addr: SocketAddr, ejected: bool) {
        if let Some(tel) = &self.telemetry {
            tel.endpoint_ejection_state(&addr.to_string(), ejected);
        }
    }

    /// Advances time: finds stalled endpoints, ends cool-downs. Call it a few times a second.
    pub fn tick(&self) {
        self.tick_at(Instant::now());
    }

    fn tick_at(&self, now: Instant) {
        if !self.config.enabled() {
            return;
        }
        let mut trackers = self.lock();
        let mut changed = false;
        // The two most recent "sent" times of answered requests, with their endpoints: for
        // each endpoint, the newest answer of the *others*.
        let mut top: [Option<(SocketAddr, Instant)>; 2] = [None, None];
        for (addr, t) in trackers.iter() {
            let Some(n) = t.newest_answered else { continue };
            if top[0].is_none_or(|(_, x)| n > x) {
                top[1] = top[0];
                top[0] = Some((*addr, n));
            } else if top[1].is_none_or(|(_, x)| n > x) {
                top[1] = Some((*addr, n));
            }
        }
        let others_newest = |addr: &SocketAddr| match top {
            [Some((a, _)), second] if a == *addr => second.map(|(_, n)| n),
            [first, _] => first.map(|(_, n)| n),
        };
        for (addr, t) in trackers.iter_mut() {
            match t.state {
                State::Open { until } if now >= until => {
                    t.state = State::HalfOpen { probe: None };
                    info!(endpoint = %addr, "endpoint cool-down over; probing it");
                    changed = true;
                }
                State::Closed if self.stalled(t, now, others_newest(addr)) => {
                    self.eject(*addr, t, Reason::Stalled, now);
                    changed = true;
                }
                State::HalfOpen { probe: None }
                    if t.claim.is_some_and(|(_, at)| now.duration_since(at) >= CLAIM_TIMEOUT) =>
                {
                    t.claim = None;
                    changed = true;
                }
                State::HalfOpen { probe: Some(p) } => {
                    // A streamed probe that stalls is a failed probe; a non-streamed one
                    // answers when its generation ends and is judged then.
                    let stalled = t
                        .awaiting
                        .get(&p)
                        .is_some_and(|a| a.streamed && now.duration_since(a.sent) >= self.config.stall_timeout);
                    if stalled {
                        t.awaiting.remove(&p);
                        self.eject(*addr, t, Reason::ProbeFailed, now);
                        changed = true;
                    }
                }
                _ => {}
            }
        }
        // Forget endpoints with nothing to remember (removed from the pool, long idle).
        trackers.retain(|_, t| {
            !(t.state == State::Closed
                && t.awaiting.is_empty()
                && t.failures == 0
                && t.last_answer.is_none_or(|l| now.duration_since(l) > FORGET_AFTER))
        });
        if changed {
            self.publish(&trackers);
        }
    }

    /// Enough streamed requests sent since the endpoint's last answer waited too long, and
    /// another endpoint answered a request sent after the oldest of them (`others_newest`).
    /// Requests sent before the last answer do not count: one old hung stream must not hide
    /// an endpoint that went silent later.
    fn stalled(&self, t: &Tracker, now: Instant, others_newest: Option<Instant>) -> bool {
        let limit = self.config.stall_timeout;
        let mut count = 0;
        let mut oldest: Option<Instant> = None;
        let unanswered_since = |a: &&Awaiting| t.last_answer.is_none_or(|l| l < a.sent);
        for a in
            t.awaiting.values().filter(|a| a.streamed && now.duration_since(a.sent) >= limit).filter(unanswered_since)
        {
            count += 1;
            oldest = Some(oldest.map_or(a.sent, |o| o.min(a.sent)));
        }
        match oldest {
            Some(oldest) if count >= self.config.stall_min.max(1) => others_newest.is_some_and(|n| n > oldest),
            _ => false,
        }
    }

    fn publish(&self, trackers: &HashMap<SocketAddr, Tracker>) {
        let out: Vec<SocketAddr> = trackers.iter().filter(|(_, t)| t.excluded()).map(|(a, _)| *a).collect();
        let ready: Vec<SocketAddr> = trackers.iter().filter(|(_, t)| t.probe_ready()).map(|(a, _)| *a).collect();
        self.claimed.store(trackers.values().any(|t| t.claim.is_some()), Ordering::Release);
        let before = self.published.load().excluded.clone();
        for a in &out {
            if !before.contains(a) {
                self.gauge(*a, true);
            }
        }
        for a in before.iter() {
            if !out.contains(a) && trackers.get(a).is_none_or(|t| t.state == State::Closed) {
                self.gauge(*a, false);
            }
        }
        self.published.store(Arc::new(Published { excluded: Arc::new(out), ready }));
    }
}

/// The candidates not in `out` nor in `also_out`; all of them when none would be left.
fn keep<'a, T>(
    out: &[SocketAddr],
    also_out: &[SocketAddr],
    candidates: Vec<&'a T>,
    addr: impl Fn(&T) -> SocketAddr,
) -> Vec<&'a T> {
    if out.is_empty() && also_out.is_empty() {
        return candidates;
    }
    let kept: Vec<&T> =
        candidates.iter().copied().filter(|c| !out.contains(&addr(c)) && !also_out.contains(&addr(c))).collect();
    if kept.is_empty() { candidates } else { kept }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }

    fn health() -> Health {
        let config = HealthConfig { stall_timeout: Duration::from_secs(3), stall_min: 2, ..Default::default() };
        Health::new(config, None)
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_silent_endpoint_is_ejected_after_the_stall_timeout_and_probed_after_the_cooldown() {
        let h = health();
        let t0 = Instant::now();
        h.sent_at(addr(1), 1, true, t0);
        h.sent_at(addr(1), 2, true, t0 + S);
        h.sent_at(addr(2), 3, true, t0 + S / 2);
        h.answered_at(addr(2), 3, 200, t0 + S / 2);
        h.tick_at(t0 + 3 * S);
        assert!(h.excluded().is_empty(), "one stalled request is not enough");
        h.tick_at(t0 + 4 * S);
        assert_eq!(*h.excluded(), vec![addr(1)]);
        // Cool-down over: half-open, one probe at a time.
        h.tick_at(t0 + 35 * S);
        assert!(h.excluded().is_empty());
        h.sent_at(addr(1), 10, true, t0 + 35 * S);
        assert_eq!(*h.excluded(), vec![addr(1)], "excluded while its probe is out");
        h.answered_at(addr(1), 10, 200, t0 + 36 * S);
        assert!(h.excluded().is_empty());
    }

    /// Concurrent decisions do not all pick a half-open endpoint: the first to filter claims
    /// it; the claim becomes the probe if picked and is released if not (or if the decision
    /// fails, or after `CLAIM_TIMEOUT` with no word).
    #[test]
    fn a_half_open_endpoint_is_claimed_by_one_decision_at_a_time() {
        let h = Health::new(HealthConfig { failure_threshold: 1, ..Default::default() }, None);
        let t0 = Instant::now();
        h.sent_at(addr(1), 1, true, t0);
        h.answered_at(addr(1), 1, 503, t0);
        assert_eq!(*h.excluded(), vec![addr(1)]);
        h.tick_at(t0 + 31 * S);
        let all = [addr(1), addr(2)];
        let refs: Vec<&SocketAddr> = all.iter().collect();
        let half_open = vec![&all[0], &all[1]];
        assert_eq!(h.filter(refs.clone(), |a| *a), half_open, "half-open: a candidate");
        // Decision 10 claims it; decision 11, concurrent, does not see it.
        assert_eq!(h.filter_for(10, refs.clone(), |a| *a), half_open);
        assert_eq!(h.filter_for(11, refs.clone(), |a| *a), vec![&addr(2)], "claimed by another decision");
        // 10 went elsewhere: released, and 12 may claim it.
        h.sent_at(addr(2), 10, true, t0 + 31 * S);
        h.answered_at(addr(2), 10, 200, t0 + 31 * S);
        assert_eq!(h.filter_for(12, refs.clone(), |a| *a), half_open);
        // 12 failed to decide: released; 13 claims it and picks it: its request is the probe.
        h.release(12);
        assert_eq!(h.filter_for(13, refs.clone(), |a| *a), half_open);
        h.sent_at(addr(1), 13, true, t0 + 31 * S);
        assert_eq!(h.filter_for(14, refs.clone(), |a| *a), vec![&addr(2)], "its probe is out");
        h.answered_at(addr(1), 13, 200, t0 + 32 * S);
        assert!(h.excluded().is_empty(), "the probe answered");
        assert_eq!(h.filter_for(15, refs.clone(), |a| *a), half_open);

        // A claim nobody settles (it cannot happen through routing) lapses in time.
        h.sent_at(addr(1), 20, true, t0 + 40 * S);
        h.answered_at(addr(1), 20, 503, t0 + 40 * S);
        let t1 = t0 + 100 * S;
        h.tick_at(t1);
        assert_eq!(h.filter_for_at(21, refs.clone(), |a| *a, t1), half_open);
        h.tick_at(t1 + CLAIM_TIMEOUT - Duration::from_millis(1));
        assert_eq!(h.filter_for_at(22, refs.clone(), |a| *a, t1), vec![&addr(2)], "still claimed");
        h.tick_at(t1 + CLAIM_TIMEOUT);
        assert_eq!(h.filter_for_at(23, refs, |a| *a, t1), half_open, "the lapsed claim is free again");
    }

    #[test]
    fn when_the_whole_pool_is_slow_nothing_is_ejected() {
        let h = health();
        let t0 = Instant::now();
        for (c, a) in [(1, 1), (2, 1), (3, 2), (4, 2)] {
            h.sent_at(addr(a), c, true, t0 + S * c as u32 / 10);
        }
        // Endpoint 2 answers, but only requests sent before endpoint 1's stalled ones.
        h.sent_at(addr(2), 9, true, t0 - S);
        h.answered_at(addr(2), 9, 200, t0 + S);
        h.tick_at(t0 + 10 * S);
        assert!(h.excluded().is_empty(), "{:?}", h.excluded());
    }

    #[test]
    fn answers_in_between_mean_the_endpoint_is_slow_not_stalled() {
        let h = health();
        let t0 = Instant::now();
        h.sent_at(addr(1), 1, true, t0);
        h.sent_at(addr(1), 2, true, t0);
        h.sent_at(addr(1), 3, true, t0);
        h.answered_at(addr(1), 3, 200, t0 + 2 * S);
        h.tick_at(t0 + 4 * S);
        assert!(h.excluded().is_empty());
        // Non-streamed requests answer at the end of the generation: never a stall.
        h.sent_at(addr(2), 4, false, t0);
        h.sent_at(addr(2), 5, false, t0);
        h.tick_at(t0 + 60 * S);
        assert!(h.excluded().is_empty());
    }

    #[test]
    fn consecutive_5xx_eject_and_a_failed_probe_doubles_the_cooldown() {
        let h = health();
        let t0 = Instant::now();
        for c in 0..4 {
            h.sent_at(addr(1), c, false, t0);
            h.answered_at(addr(1), c, 503, t0);
        }
        h.sent_at(addr(1), 4, false, t0);
        h.answered_at(addr(1), 4, 200, t0);
        for c in 5..9 {
            h.sent_at(addr(1), c, false, t0);
            h.answered_at(addr(1), c, 502, t0);
        }
        assert!(h.excluded().is_empty(), "a success in between resets the count");
        h.sent_at(addr(1), 9, false, t0);
        h.answered_at(addr(1), 9, 504, t0);
        assert_eq!(*h.excluded(), vec![addr(1)]);
        h.tick_at(t0 + 30 * S);
        h.sent_at(addr(1), 20, false, t0 + 30 * S);
        h.answered_at(addr(1), 20, 500, t0 + 30 * S);
        assert_eq!(*h.excluded(), vec![addr(1)], "failed probe: ejected again");
        h.tick_at(t0 + 89 * S);
        assert_eq!(*h.excluded(), vec![addr(1)], "second cool-down is 60 s");
        h.tick_at(t0 + 90 * S);
        assert!(h.excluded().is_empty());
    }

    #[test]
    fn requests_that_end_unanswered_after_the_timeout_count_as_failures() {
        let h = health();
        let t0 = Instant::now();
        for c in 0..5 {
            h.sent_at(addr(1), c, true, t0);
            h.unanswered_at(addr(1), c, t0 + S);
        }
        assert!(h.excluded().is_empty(), "clients that leave early do not blame the endpoint");
        for c in 5..10 {
            h.sent_at(addr(1), c, true, t0);
            h.unanswered_at(addr(1), c, t0 + 5 * S);
        }
        assert_eq!(*h.excluded(), vec![addr(1)]);
    }

    /// A non-streamed request answers when its generation ends: a client that stops
    /// waiting says nothing about the endpoint unless it was silent while others answered.
    #[test]
    fn non_streamed_requests_left_unanswered_count_only_against_a_silent_endpoint() {
        let h = health();
        let t0 = Instant::now();
        // Endpoint 1 keeps answering other requests: clients giving up on long generations.
        for c in 0..10u64 {
            let sent = t0 + S * c as u32;
            h.sent_at(addr(1), c, false, sent);
            h.sent_at(addr(1), 100 + c, false, sent);
            h.answered_at(addr(1), 100 + c, 200, sent + 2 * S);
            h.unanswered_at(addr(1), c, sent + 5 * S);
        }
        assert!(h.excluded().is_empty(), "{:?}", h.excluded());
        // Endpoint 2 answers nothing while endpoint 3 answers newer requests: a gray failure.
        let t1 = t0 + 20 * S;
        for c in 200..205u64 {
            h.sent_at(addr(2), c, false, t1);
            h.sent_at(addr(3), c + 100, false, t1 + S);
            h.answered_at(addr(3), c + 100, 200, t1 + 2 * S);
            h.unanswered_at(addr(2), c, t1 + 10 * S);
        }
        assert_eq!(*h.excluded(), vec![addr(2)]);
    }

    #[test]
    fn a_non_streamed_probe_is_judged_by_its_answer_not_by_the_stall_timeout() {
        let h = health();
        let t0 = Instant::now();
        for c in 0..5 {
            h.sent_at(addr(1), c, false, t0);
            h.answered_at(addr(1), c, 503, t0);
        }
        assert_eq!(*h.excluded(), vec![addr(1)]);
        h.tick_at(t0 + 30 * S);
        assert!(h.excluded().is_empty(), "half-open after the cool-down");
        h.sent_at(addr(1), 10, false, t0 + 30 * S);
        // A long generation: well past the stall timeout, the probe is still out.
        h.tick_at(t0 + 45 * S);
        assert_eq!(*h.excluded(), vec![addr(1)], "excluded while its probe is out, not ejected");
        h.answered_at(addr(1), 10, 200, t0 + 50 * S);
        assert!(h.excluded().is_empty(), "the probe's answer closes the breaker");
        // A streamed probe that stalls still fails.
        for c in 20..25 {
            h.sent_at(addr(1), c, false, t0 + 51 * S);
            h.answered_at(addr(1), c, 500, t0 + 51 * S);
        }
        h.tick_at(t0 + 81 * S);
        h.sent_at(addr(1), 30, true, t0 + 81 * S);
        h.tick_at(t0 + 85 * S);
        h.tick_at(t0 + 110 * S);
        assert_eq!(*h.excluded(), vec![addr(1)], "stalled probe: ejected again for 60 s");
    }

    #[test]
    fn an_old_hung_stream_does_not_hide_a_later_stall() {
        let h = health();
        let t0 = Instant::now();
        // One stream hangs; the endpoint keeps answering others for a while.
        h.sent_at(addr(1), 1, true, t0);
        h.sent_at(addr(1), 2, true, t0 + S);
        h.answered_at(addr(1), 2, 200, t0 + S);
        h.tick_at(t0 + 5 * S);
        assert!(h.excluded().is_empty(), "answers after the hung stream: slow, not stalled");
        // Then it goes silent while endpoint 2 answers newer requests.
        h.sent_at(addr(1), 3, true, t0 + 10 * S);
        h.sent_at(addr(1), 4, true, t0 + 10 * S);
        h.sent_at(addr(2), 5, true, t0 + 11 * S);
        h.answered_at(addr(2), 5, 200, t0 + 11 * S);
        h.tick_at(t0 + 14 * S);
        assert_eq!(*h.excluded(), vec![addr(1)]);
    }

    #[test]
    fn the_filter_keeps_everything_when_every_candidate_is_ejected() {
        let h = health();
        let t0 = Instant::now();
        for c in 0..5 {
            h.sent_at(addr(1), c, false, t0);
            h.answered_at(addr(1), c, 500, t0);
        }
        let all = [addr(1), addr(2)];
        let refs: Vec<&SocketAddr> = all.iter().collect();
        assert_eq!(h.filter(refs.clone(), |a| *a), vec![&addr(2)]);
        assert_eq!(h.filter(vec![&all[0]], |a| *a), vec![&addr(1)]);
    }

    #[test]
    fn a_zero_stall_timeout_turns_the_breaker_off() {
        let h = Health::new(HealthConfig { stall_timeout: Duration::ZERO, ..Default::default() }, None);
        let t0 = Instant::now();
        for c in 0..10 {
            h.sent_at(addr(1), c, false, t0);
            h.answered_at(addr(1), c, 500, t0);
        }
        assert!(h.excluded().is_empty());
    }
}
