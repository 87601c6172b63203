//! Saturation-based admission, as upstream: how loaded is the pool, should a sheddable
//! request be refused, and which endpoints are over their thresholds.
//!
//! Pure: it reads the metrics columns of one cycle and returns numbers and positions. An
//! endpoint whose metrics are older than the staleness threshold (or unknown) counts as
//! saturated — not knowing a worker's load must not make it look idle.

use crate::columns::Candidates;

/// Thresholds (upstream defaults: queue 5, kv-cache 0.8, staleness 200 ms).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SaturationConfig {
    pub queue_depth_threshold: f32,
    pub kv_cache_threshold: f32,
    pub staleness_ms: u32,
    /// The filter keeps endpoints under `threshold × (1 + headroom)` (upstream's
    /// utilization-detector `headroom`, default 0).
    pub headroom: f32,
}

impl Default for SaturationConfig {
    fn default() -> Self {
        SaturationConfig { queue_depth_threshold: 5.0, kv_cache_threshold: 0.8, staleness_ms: 200, headroom: 0.0 }
    }
}

/// An endpoint whose queue is this many times the queue threshold is left out, whoever sent
/// the requests in it, while another candidate has an empty queue and runs at most
/// `IDLE_SPILL_RUNNING_SHARE` of its running requests (see `filter`).
pub const IDLE_SPILL_QUEUE_FACTOR: f32 = 2.0;
/// The most an idle candidate may run, as a share of the long-queued endpoint's running
/// requests, to count as idle (more means it is busy with its own traffic).
pub const IDLE_SPILL_RUNNING_SHARE: f32 = 0.5;

/// How old an endpoint's last scrape may be before the filter leaves it out (with scrapes
/// every 50 ms: about twenty missed in a row; the scrape timeout is also 1 s).
pub const STALE_EXCLUDE_MS: u32 = 1000;

impl SaturationConfig {
    /// One endpoint's load: `max(waiting/queue_threshold, kv/kv_threshold)`, or 1.0 (and
    /// more) when its metrics are stale or unknown.
    pub fn load(&self, metrics: &Candidates, i: usize) -> f32 {
        let age = metrics.age_ms.get(i).copied().unwrap_or(f32::INFINITY);
        let waiting = metrics.waiting.get(i).copied().unwrap_or(f32::NAN);
        let kv = metrics.kv_usage.get(i).copied().unwrap_or(f32::NAN);
        let fresh = age.is_finite() && age <= self.staleness_ms as f32;
        if !fresh || !waiting.is_finite() || !kv.is_finite() {
            return f32::INFINITY;
        }
        (waiting / self.queue_depth_threshold.max(f32::MIN_POSITIVE))
            .max(kv / self.kv_cache_threshold.max(f32::MIN_POSITIVE))
            .max(0.0)
    }

    /// Pool saturation: the mean endpoint load, each capped at 1 (so one stale endpoint
    /// weighs as one saturated endpoint, not as infinity). An empty pool is saturated.
    pub fn pool_saturation(&self, metrics: &Candidates) -> f32 {
        let n = metrics.len();
        if n == 0 {
            return 1.0;
        }
        (0..n).map(|i| self.load(metrics, i).min(1.0)).sum::<f32>() / n as f32
    }

    /// Whether a request of `priority` is refused: sheddable (< 0) and the pool saturated.
    pub fn shed(&self, priority: i32, metrics: &Candidates) -> bool {
        priority < 0 && self.pool_saturation(metrics) >= 1.0
    }

    /// Positions of the endpoints still being scraped and whose queue is not made of others'
    /// work — or all of them, when none is (dropping all would turn load into errors).
    ///
    /// An endpoint whose last scrape is older than `STALE_EXCLUDE_MS` (or the staleness
    /// threshold, if longer) is left out: its `/metrics` fails or hangs. One that is merely
    /// late — a busy engine answers `/metrics` slowly, and a busy engine is often the one
    /// holding the prefixes — stays, with its queue unknown; it still counts as saturated for
    /// shedding. Leaving out every endpoint past the 200 ms threshold instead dropped the
    /// prefix holders whenever scrapes ran late (`epp replay` with 500 ms scrapes: hit rate
    /// 0.49 → 0.22 on multi-turn chat).
    ///
    /// An endpoint is left out when its queue is at the threshold *and* at least a threshold
    /// of the requests it holds (waiting + running) are not the EPP's own in-flight ones:
    /// load the EPP cannot see otherwise (traffic from elsewhere, a stuck engine). A queue
    /// of the EPP's own requests is already weighed by the load scorers, which also know
    /// what moving a request costs in lost prefix hits; leaving such endpoints out on a
    /// scraped number instead broke prefix affinity in every burst (measured in `epp
    /// replay`: −4 points of hit rate on bursty shared prompts, up to −16, at a higher TTFT).
    ///
    /// One more case leaves an endpoint out whoever sent its queue: a queue of twice the
    /// threshold while another candidate has an empty queue and runs at most half as many
    /// requests — a worker with free slots, not one just keeping up with its own traffic.
    /// Without it, a prompt that every request shares (one application, one system prompt)
    /// never leaves the first worker that cached it: the affinity filter keeps that worker
    /// while the others idle, and its in-flight prompt tokens (a few hundred uncached per
    /// request) never outweigh the match, while requests wait for a slot behind its running
    /// ones. In `epp replay` (1 500 requests sharing a 1 024-token prompt at 24 and 40
    /// req/s, on 4 and 8 workers of 512 and 2 048 blocks) that held the TTFT p90 at 4–14 s,
    /// where round-robin's is about 40 ms; with this rule it is 0.34–0.61 s, 1.2–1.3 s on 8
    /// workers × 512 blocks at 40 req/s (the peers' `cache_aware` model: 7.5 s) and 9.3 s
    /// on 4 × 512 at 40 req/s, a cluster every policy overloads (round-robin: 18 s), at the
    /// same hit rate. The prompt spreads to the idle workers, which then hold it too and
    /// share its traffic. Over 40 other cells (shared prompts, multi-turn chat, a LoRA mix,
    /// bursts, unique prompts; seeds 1 and 2) it changes nothing on shared prompts,
    /// multi-turn chat and unique prompts, and moves a LoRA mix by −0.2 points of hit rate
    /// at 0.99× the TTFT p90 and bursts by −0.25 points at 0.98× (averages per workload).
    /// Without the condition on the idle worker's running requests, bursts lost 1.2 points
    /// (a worker serving its own prompts counted as idle whenever its queue was empty).
    /// At the queue threshold itself instead of twice it, the one-prompt TTFT p90 falls to
    /// 0.4–0.6× of these figures on 8 workers, but a LoRA mix's rises by 14 % on average
    /// (1.3–2.7× on 8 workers × 2 048 blocks), its requests spilling to idle workers that
    /// must load their adapter.
    ///
    /// Only the queue counts here: a full queue delays every new request, while a high
    /// KV-cache usage mostly means the cache holds running requests (the worker queues what
    /// does not fit, which then shows in the queue). Leaving out endpoints over the KV
    /// threshold too would break prefix affinity exactly when the caches are busiest
    /// (measured: −1 to −2 points of prefix-hit rate on multi-turn chat). Upstream applies
    /// this filter only when its detector is named in a profile; the KV threshold still
    /// counts towards the pool's saturation (shedding).
    pub fn filter(&self, metrics: &Candidates) -> Vec<usize> {
        let limit = self.queue_depth_threshold * (1.0 + self.headroom);
        let scraped_within = self.staleness_ms.max(STALE_EXCLUDE_MS) as f32;
        let scraped = |i: usize| metrics.age_ms.get(i).copied().unwrap_or(f32::INFINITY) <= scraped_within;
        // The fewest requests running on a candidate with an empty queue (fresh metrics):
        // a worker with free slots now.
        let idle_running = (0..metrics.len())
            .filter(|&j| scraped(j) && metrics.waiting.get(j).copied() == Some(0.0))
            .filter_map(|j| metrics.running.get(j).copied().filter(|r| r.is_finite()))
            .reduce(f32::min);
        let under: Vec<usize> = (0..metrics.len())
            .filter(|&i| {
                // NaN when unknown or older than the staleness threshold: no queue to judge.
                let waiting = metrics.waiting.get(i).copied().unwrap_or(f32::NAN);
                let running = metrics.running.get(i).copied().filter(|r| r.is_finite()).unwrap_or(0.0);
                let own = metrics.own_in_flight.get(i).copied().filter(|n| n.is_finite()).unwrap_or(0.0);
                let others_queue = waiting >= limit && waiting + running - own >= limit;
                let overloaded = waiting >= IDLE_SPILL_QUEUE_FACTOR * limit
                    && idle_running.is_some_and(|r| r <= IDLE_SPILL_RUNNING_SHARE * running);
                scraped(i) && !others_queue && !overloaded
            })
            .collect();
        if under.is_empty() { (0..metrics.len()).collect() } else { under }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rows: &[(f32, f32, f32)]) -> Candidates {
        Candidates {
            ids: (0..rows.len() as u32).collect(),
            waiting: rows.iter().map(|r| r.0).collect(),
            running: rows.iter().map(|_| 0.0).collect(),
            kv_usage: rows.iter().map(|r| r.1).collect(),
            age_ms: rows.iter().map(|r| r.2).collect(),
            attributes: Vec::new(),
            own_in_flight: Vec::new(),
        }
    }

    /// Candidates from rows (waiting, running, own in flight, scrape age ms).
    fn queues(rows: &[(f32, f32, f32, f32)]) -> Candidates {
        Candidates {
            ids: (0..rows.len() as u32).collect(),
            waiting: rows.iter().map(|r| r.0).collect(),
            running: rows.iter().map(|r| r.1).collect(),
            kv_usage: rows.iter().map(|_| 0.1).collect(),
            age_ms: rows.iter().map(|r| r.3).collect(),
            attributes: Vec::new(),
            own_in_flight: rows.iter().map(|r| r.2).collect(),
        }
    }

    #[test]
    fn table() {
        let c = SaturationConfig::default();
        // rows (waiting, kv, age) → (pool saturation, kept positions)
        type Case<'a> = (&'a [(f32, f32, f32)], f32, &'a [usize]);
        let cases: &[Case] = &[
            (&[(0.0, 0.0, 10.0), (0.0, 0.0, 10.0)], 0.0, &[0, 1]),
            (&[(5.0, 0.0, 10.0), (0.0, 0.4, 10.0)], 0.75, &[1]),
            // A busy cache alone does not leave an endpoint out; a full queue does.
            (&[(10.0, 0.0, 10.0), (0.0, 0.9, 10.0)], 1.0, &[1]),
            (&[(1.0, 0.95, 10.0), (9.0, 0.1, 10.0)], 1.0, &[0]),
            (&[(9.0, 0.0, 10.0), (6.0, 0.9, 10.0)], 1.0, &[0, 1]),
            // Late (500 ms) but still scraped: kept; not scraped for over a second: left out.
            (&[(0.0, 0.0, 500.0), (2.5, 0.0, 10.0)], 0.75, &[0, 1]),
            (&[(0.0, 0.0, 1500.0), (2.5, 0.0, 10.0)], 0.75, &[1]),
            // Queue unknown: kept, its load left to the scorers (it counts as saturated).
            (&[(f32::NAN, 0.1, 10.0), (1.0, 0.1, 10.0)], 0.6, &[0, 1]),
            (&[], 1.0, &[]),
        ];
        for (rows, sat, kept) in cases {
            let metrics = m(rows);
            assert!((c.pool_saturation(&metrics) - sat).abs() < 1e-6, "{rows:?}: {}", c.pool_saturation(&metrics));
            assert_eq!(c.filter(&metrics), *kept, "{rows:?}");
        }
    }

    #[test]
    fn a_queue_of_the_epps_own_requests_is_left_to_the_scorers() {
        let c = SaturationConfig::default();
        // rows (waiting, running, own in flight) → kept positions; all fresh.
        type Case<'a> = (&'a [(f32, f32, f32)], &'a [usize]);
        let cases: &[Case] = &[
            // Every queued request is the EPP's own: nobody is left out.
            (&[(8.0, 4.0, 12.0), (0.0, 1.0, 1.0)], &[0, 1]),
            // Requests finished since the scrape: own < waiting + running by less than 5.
            (&[(8.0, 4.0, 9.0), (0.0, 1.0, 1.0)], &[0, 1]),
            // Traffic from elsewhere: 8 queued, none the EPP's.
            (&[(7.0, 1.0, 0.0), (0.0, 1.0, 1.0)], &[1]),
            // Half of it the EPP's, the rest still over the threshold.
            (&[(10.0, 4.0, 7.0), (0.0, 1.0, 1.0)], &[1]),
            // Under the threshold, whoever sent it.
            (&[(4.0, 30.0, 0.0), (0.0, 1.0, 1.0)], &[0, 1]),
        ];
        for (rows, kept) in cases {
            let fresh: Vec<_> = rows.iter().map(|r| (r.0, r.1, r.2, 10.0)).collect();
            assert_eq!(c.filter(&queues(&fresh)), *kept, "{rows:?}");
        }
    }

    #[test]
    fn a_long_queue_of_its_own_is_left_out_while_another_candidate_idles() {
        let c = SaturationConfig::default();
        // rows (waiting, running, own in flight, scrape age ms) → kept positions.
        type Case<'a> = (&'a [(f32, f32, f32, f32)], &'a [usize]);
        let cases: &[Case] = &[
            // Ten of its own queued (twice the threshold), the other idle: left out.
            (&[(10.0, 32.0, 42.0, 10.0), (0.0, 3.0, 3.0, 10.0)], &[1]),
            // Nobody idle: every queue is the EPP's own, nobody is left out.
            (&[(10.0, 32.0, 42.0, 10.0), (1.0, 32.0, 33.0, 10.0)], &[0, 1]),
            // Under twice the threshold: kept for its prefixes.
            (&[(9.0, 32.0, 41.0, 10.0), (0.0, 3.0, 3.0, 10.0)], &[0, 1]),
            // The one with an empty queue runs more than half as many: it is busy with its
            // own traffic, not idle.
            (&[(10.0, 32.0, 42.0, 10.0), (0.0, 17.0, 17.0, 10.0)], &[0, 1]),
            (&[(10.0, 32.0, 42.0, 10.0), (0.0, 17.0, 17.0, 10.0), (0.0, 16.0, 16.0, 10.0)], &[1, 2]),
            // The idle one is not scraped any more: it is left out and proves nothing.
            (&[(10.0, 32.0, 42.0, 10.0), (0.0, 3.0, 3.0, 1500.0)], &[0]),
        ];
        for (rows, kept) in cases {
            assert_eq!(c.filter(&queues(rows)), *kept, "{rows:?}");
        }
    }

    #[test]
    fn only_sheddable_requests_are_refused() {
        let c = SaturationConfig::default();
        let full = m(&[(9.0, 0.9, 10.0)]);
        let idle = m(&[(0.0, 0.0, 10.0)]);
        assert!(c.shed(-1, &full));
        assert!(!c.shed(0, &full));
        assert!(!c.shed(-1, &idle));
    }
}
