//! Latency distributions: an HDR histogram in nanoseconds and the summary the tables print
//! (count, p50, p90, p99, mean). Every measurement of the benchmarks goes through here so that
//! all tables read percentiles the same way.

use std::time::Duration;

use hdrhistogram::Histogram;

/// The longest latency recorded exactly; slower samples are clamped to it (a minute is far
/// beyond anything a healthy run sees, and clamping keeps a stray outlier from aborting it).
const MAX_NS: u64 = 60_000_000_000;

/// A latency histogram with 3 significant digits from 1 ns to a minute.
#[derive(Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        // Invariant: these bounds are valid for hdrhistogram (low ≥ 1, high ≥ 2 × low, 3 digits).
        let hist = Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds");
        Latency { hist }
    }

    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(MAX_NS).clamp(1, MAX_NS);
        self.hist.saturating_record(ns);
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail; saturate rather than panic anyway.
        if self.hist.add(&other.hist).is_err() {
            for v in other.hist.iter_recorded() {
                self.hist.saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    pub fn summary(&self) -> Summary {
        if self.hist.is_empty() {
            return Summary::default();
        }
        Summary {
            count: self.hist.len(),
            p50: Duration::from_nanos(self.hist.value_at_quantile(0.50)),
            p90: Duration::from_nanos(self.hist.value_at_quantile(0.90)),
            p99: Duration::from_nanos(self.hist.value_at_quantile(0.99)),
            mean: Duration::from_nanos(self.hist.mean() as u64),
        }
    }
}

/// What a table shows of one distribution.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub mean: Duration,
}

/// `a / b` of two durations, NaN when `b` is zero (an empty distribution).
pub fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() { f64::NAN } else { a.as_secs_f64() / b.as_secs_f64() }
}

/// A duration in the unit that keeps three significant digits readable: ns, µs, ms or s.
pub fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    if ns < 1_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.1} µs", ns / 1e3)
    } else if ns < 1_000_000_000.0 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut l = Latency::new();
        for us in 1..=100u64 {
            l.record(Duration::from_micros(us));
        }
        let s = l.summary();
        assert_eq!(s.count, 100);
        // Three significant digits: within 0.1 % of the exact value.
        assert!((s.p50.as_nanos() as f64 - 50_000.0).abs() < 100.0, "{s:?}");
        assert!((s.p99.as_nanos() as f64 - 99_000.0).abs() < 100.0, "{s:?}");
    }

    #[test]
    fn merge_adds_counts_and_empty_is_zero() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        a.record(Duration::from_millis(1));
        b.record(Duration::from_secs(3600));
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(Latency::new().summary(), Summary::default());
        assert!(ratio(Duration::from_millis(1), Duration::ZERO).is_nan());
    }

    #[test]
    fn durations_print_in_a_readable_unit() {
        let cases = [(450, "450 ns"), (12_340, "12.3 µs"), (2_500_000, "2.50 ms"), (3_000_000_000, "3.00 s")];
        for (ns, want) in cases {
            assert_eq!(fmt_duration(Duration::from_nanos(ns)), want);
        }
    }
}
