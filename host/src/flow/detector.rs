//! Saturation detectors: how full the pool is, 1.0 being the point where flow control
//! stops dispatching (with the default usage limit). Values above 1 mean oversubscription.
//!
//! - `utilization-detector`: per endpoint `max(waiting / queueDepthThreshold, kv /
//!   kvCacheUtilThreshold)`, 1 when its metrics are stale, averaged over the pool, as
//!   upstream. One difference: `waiting` counts the requests the EPP routed to the endpoint
//!   since its last scrape. Scrapes are 50 ms apart; without this, everything queued would
//!   be dispatched in the first millisecond after a scrape shows room.
//! - `concurrency-detector`: the EPP's own requests (or prompt tokens) in flight against
//!   `maxConcurrency` (`maxTokenConcurrency`) per endpoint, as upstream.
//!
//! An empty pool is saturated.

use crate::config::flow::{ConcurrencyMode, DetectorSpec};
use crate::datastore::{Datastore, PoolEndpoint};

/// One endpoint's inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EndpointLoad {
    /// Scraped values (NaN unknown) and their age.
    pub waiting: f32,
    pub kv_usage: f32,
    pub age_ms: u32,
    /// The EPP's own counts.
    pub routed_since_scrape: u32,
    pub in_flight: u32,
    pub in_flight_tokens: u64,
}

/// The loads of `endpoints`, in their order.
pub fn loads(ds: &Datastore, endpoints: &[&PoolEndpoint]) -> Vec<EndpointLoad> {
    let m = ds.candidates(endpoints, u32::MAX);
    endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let own = e.metrics.own_load();
            EndpointLoad {
                waiting: m.waiting[i],
                kv_usage: m.kv_usage[i],
                age_ms: ds.age_ms(e),
                routed_since_scrape: own.routed_since_scrape,
                in_flight: own.in_flight,
                in_flight_tokens: own.in_flight_tokens,
            }
        })
        .collect()
}

/// The pool's saturation by `spec`.
pub fn saturation(spec: &DetectorSpec, loads: &[EndpointLoad]) -> f64 {
    if loads.is_empty() {
        return 1.0;
    }
    let n = loads.len() as f64;
    match spec {
        DetectorSpec::Utilization(c) => {
            let one = |l: &EndpointLoad| {
                let fresh = l.age_ms <= c.staleness_ms && l.waiting.is_finite() && l.kv_usage.is_finite();
                if !fresh {
                    return 1.0;
                }
                let waiting = f64::from(l.waiting) + f64::from(l.routed_since_scrape);
                (waiting / f64::from(c.queue_depth_threshold).max(f64::MIN_POSITIVE))
                    .max(f64::from(l.kv_usage) / f64::from(c.kv_cache_threshold).max(f64::MIN_POSITIVE))
                    .max(0.0)
            };
            loads.iter().map(one).sum::<f64>() / n
        }
        DetectorSpec::Concurrency { mode, max_requests, max_tokens, .. } => {
            let (mr, mt) = (*max_requests as f64, *max_tokens as f64);
            match mode {
                ConcurrencyMode::Requests => loads.iter().map(|l| f64::from(l.in_flight)).sum::<f64>() / (n * mr),
                ConcurrencyMode::Tokens => loads.iter().map(|l| l.in_flight_tokens as f64).sum::<f64>() / (n * mt),
                ConcurrencyMode::Hybrid => {
                    loads.iter().map(|l| (f64::from(l.in_flight) / mr).max(l.in_flight_tokens as f64 / mt)).sum::<f64>()
                        / n
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use epp_core::SaturationConfig;

    use super::*;

    fn load(waiting: f32, kv: f32, age_ms: u32) -> EndpointLoad {
        EndpointLoad { waiting, kv_usage: kv, age_ms, ..Default::default() }
    }

    #[test]
    fn utilization_is_the_mean_roofline_with_stale_as_full() {
        let spec = DetectorSpec::Utilization(SaturationConfig::default());
        assert_eq!(saturation(&spec, &[]), 1.0);
        let cases: &[(&[EndpointLoad], f64)] = &[
            (&[load(0.0, 0.0, 10)], 0.0),
            (&[load(5.0, 0.0, 10), load(0.0, 0.4, 10)], 0.75),
            (&[load(10.0, 0.0, 10), load(0.0, 0.0, 10)], 1.0),
            (&[load(0.0, 0.0, 1000), load(0.0, 0.0, 10)], 0.5),
            (&[load(f32::NAN, 0.1, 10)], 1.0),
        ];
        for (loads, want) in cases {
            assert!((saturation(&spec, loads) - want).abs() < 1e-6, "{loads:?}");
        }
        // Requests routed since the scrape count as waiting.
        let mut l = load(2.0, 0.0, 10);
        l.routed_since_scrape = 3;
        assert!((saturation(&spec, &[l]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn concurrency_counts_the_epps_own_requests() {
        let mk = |r: u32, t: u64| EndpointLoad { in_flight: r, in_flight_tokens: t, ..Default::default() };
        let requests = DetectorSpec::Concurrency {
            mode: ConcurrencyMode::Requests,
            max_requests: 10,
            max_tokens: 1000,
            headroom: 0.0,
        };
        assert!((saturation(&requests, &[mk(5, 0), mk(10, 0)]) - 0.75).abs() < 1e-9);
        let tokens = DetectorSpec::Concurrency {
            mode: ConcurrencyMode::Tokens,
            max_requests: 10,
            max_tokens: 1000,
            headroom: 0.0,
        };
        assert!((saturation(&tokens, &[mk(9, 500), mk(9, 1500)]) - 1.0).abs() < 1e-9);
        let hybrid = DetectorSpec::Concurrency {
            mode: ConcurrencyMode::Hybrid,
            max_requests: 10,
            max_tokens: 1000,
            headroom: 0.0,
        };
        assert!((saturation(&hybrid, &[mk(5, 900), mk(2, 0)]) - 0.55).abs() < 1e-9);
    }
}
