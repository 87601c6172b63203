//! `epp experiment report`: reads the EPP's Prometheus page (fetched by the caller or a
//! saved scrape) and prints the variants side by side — requests, errors, time to first
//! token, latency, prefix-cache hit rate, endpoint spread, shadow agreement — with each
//! variant's difference to the first one and a 95% confidence interval.
//!
//! Pure: text in, a table out. Intervals are normal approximations: latency from the
//! histograms' bucket midpoints, hit rate as a proportion over requests.

use std::collections::BTreeMap;
use std::io::Write;

use crate::metrics_scrape::{Sample, parse};

#[derive(Debug, Default, Clone)]
struct Hist {
    /// (upper bound, cumulative count)
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Hist {
    fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The q-quantile by linear interpolation inside its bucket.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let target = q * self.count;
        let mut prev = (0.0, 0.0);
        for &(le, cum) in &self.buckets {
            if cum >= target {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let width = cum - prev.1;
                let frac = if width > 0.0 { (target - prev.1) / width } else { 0.0 };
                return Some(prev.0 + (le - prev.0) * frac);
            }
            prev = (le, cum);
        }
        Some(prev.0)
    }

    /// Variance estimated from bucket midpoints.
    fn variance(&self) -> Option<f64> {
        let mean = self.mean()?;
        let mut prev = (0.0, 0.0);
        let mut acc = 0.0;
        for &(le, cum) in &self.buckets {
            let n = cum - prev.1;
            let mid = if le.is_infinite() { prev.0 } else { (prev.0 + le) / 2.0 };
            acc += n * (mid - mean).powi(2);
            prev = (le, cum);
        }
        Some(acc / self.count.max(1.0))
    }
}

#[derive(Debug, Default)]
struct VariantStats {
    requests: f64,
    errors: f64,
    prompt_tokens: f64,
    cached_tokens: f64,
    ttft: Hist,
    duration: Hist,
    picks: BTreeMap<String, f64>,
    shadow: BTreeMap<String, f64>,
}

impl VariantStats {
    fn hit_rate(&self) -> Option<f64> {
        (self.prompt_tokens > 0.0).then(|| self.cached_tokens / self.prompt_tokens)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read the metrics page: {0}")]
    Parse(String),
    #[error("the page has no experiment metrics (epp_variant_requests_total); is an experiment configured?")]
    NoVariants,
}

fn collect(samples: &[Sample]) -> BTreeMap<String, VariantStats> {
    let mut by: BTreeMap<String, VariantStats> = BTreeMap::new();
    for s in samples {
        let Some(variant) = s.label("variant") else { continue };
        let v = by.entry(variant.to_string()).or_default();
        let hist = |h: &mut Hist, s: &Sample| match s.name.rsplit('_').next() {
            Some("bucket") => {
                let le = s.label("le").and_then(|x| x.parse::<f64>().ok()).unwrap_or(f64::INFINITY);
                h.buckets.push((le, s.value));
            }
            Some("sum") => h.sum = s.value,
            Some("count") => h.count = s.value,
            _ => {}
        };
        match s.name.as_str() {
            "epp_variant_requests_total" => v.requests += s.value,
            "epp_variant_errors_total" => v.errors += s.value,
            "epp_variant_prompt_tokens_total" => v.prompt_tokens += s.value,
            "epp_variant_cached_tokens_total" => v.cached_tokens += s.value,
            "epp_variant_picks_total" => {
                *v.picks.entry(s.label("endpoint").unwrap_or("?").to_string()).or_default() += s.value;
            }
            "epp_shadow_decisions_total" => {
                *v.shadow.entry(s.label("outcome").unwrap_or("?").to_string()).or_default() += s.value;
            }
            n if n.starts_with("epp_variant_ttft_seconds_") => hist(&mut v.ttft, s),
            n if n.starts_with("epp_variant_request_duration_seconds_") => hist(&mut v.duration, s),
            _ => {}
        }
    }
    for v in by.values_mut() {
        for h in [&mut v.ttft, &mut v.duration] {
            h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
    by
}

fn ms(x: Option<f64>) -> String {
    x.map(|v| format!("{:.1}", v * 1e3)).unwrap_or_else(|| "-".into())
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.1}%", v * 100.0)).unwrap_or_else(|| "-".into())
}

/// Writes the side-by-side report of the metrics page `text`.
pub fn report(text: &str, out: &mut dyn Write) -> Result<(), ReportError> {
    let samples = parse(text).map_err(|e| ReportError::Parse(e.to_string()))?;
    let by = collect(&samples);
    let routing: Vec<(&String, &VariantStats)> = by.iter().filter(|(_, v)| v.shadow.is_empty()).collect();
    if routing.is_empty() && by.is_empty() {
        return Err(ReportError::NoVariants);
    }
    let io = |e: std::io::Error| ReportError::Parse(e.to_string());
    writeln!(
        out,
        "{:<16} {:>8} {:>7} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10}",
        "variant", "requests", "errors", "ttft p50", "ttft mean", "e2e p50", "hit rate", "endpoints", "top share"
    )
    .map_err(io)?;
    for (name, v) in &routing {
        let top = v.picks.values().cloned().fold(0.0, f64::max);
        let total: f64 = v.picks.values().sum();
        writeln!(
            out,
            "{:<16} {:>8} {:>7} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10}",
            name,
            v.requests,
            v.errors,
            ms(v.ttft.quantile(0.5)),
            ms(v.ttft.mean()),
            ms(v.duration.quantile(0.5)),
            pct(v.hit_rate()),
            v.picks.len(),
            pct((total > 0.0).then(|| top / total)),
        )
        .map_err(io)?;
    }
    writeln!(out, "(times in ms; hit rate = cached / prompt tokens from responses' usage)").map_err(io)?;
    if let Some((base_name, base)) = routing.first() {
        for (name, v) in routing.iter().skip(1) {
            writeln!(out, "\n{name} vs {base_name} (95% confidence intervals):").map_err(io)?;
            if let (Some(m1), Some(m0), Some(v1), Some(v0)) =
                (v.ttft.mean(), base.ttft.mean(), v.ttft.variance(), base.ttft.variance())
            {
                let half = 1.96 * (v1 / v.ttft.count.max(1.0) + v0 / base.ttft.count.max(1.0)).sqrt();
                writeln!(out, "  ttft mean  {:+.1} ms ± {:.1} ms", (m1 - m0) * 1e3, half * 1e3).map_err(io)?;
            }
            if let (Some(h1), Some(h0)) = (v.hit_rate(), base.hit_rate()) {
                let half =
                    1.96 * (h1 * (1.0 - h1) / v.requests.max(1.0) + h0 * (1.0 - h0) / base.requests.max(1.0)).sqrt();
                writeln!(out, "  hit rate   {:+.1} pts ± {:.1} pts", (h1 - h0) * 100.0, half * 100.0).map_err(io)?;
            }
        }
    }
    let shadows: Vec<(&String, &VariantStats)> = by.iter().filter(|(_, v)| !v.shadow.is_empty()).collect();
    for (name, v) in shadows {
        let get = |k: &str| v.shadow.get(k).copied().unwrap_or(0.0);
        let decided = get("agree") + get("disagree");
        writeln!(
            out,
            "\nshadow {name}: {} decisions, agreement with the routing pick {}, errors {}",
            decided + get("error"),
            pct((decided > 0.0).then(|| get("agree") / decided)),
            get("error")
        )
        .map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
epp_variant_requests_total{variant=\"a\"} 100
epp_variant_requests_total{variant=\"b\"} 100
epp_variant_errors_total{variant=\"b\"} 2
epp_variant_prompt_tokens_total{variant=\"a\"} 1000
epp_variant_cached_tokens_total{variant=\"a\"} 600
epp_variant_prompt_tokens_total{variant=\"b\"} 1000
epp_variant_cached_tokens_total{variant=\"b\"} 200
epp_variant_ttft_seconds_bucket{variant=\"a\",le=\"0.1\"} 50
epp_variant_ttft_seconds_bucket{variant=\"a\",le=\"0.2\"} 100
epp_variant_ttft_seconds_bucket{variant=\"a\",le=\"+Inf\"} 100
epp_variant_ttft_seconds_sum{variant=\"a\"} 10
epp_variant_ttft_seconds_count{variant=\"a\"} 100
epp_variant_ttft_seconds_bucket{variant=\"b\",le=\"0.1\"} 10
epp_variant_ttft_seconds_bucket{variant=\"b\",le=\"0.2\"} 100
epp_variant_ttft_seconds_bucket{variant=\"b\",le=\"+Inf\"} 100
epp_variant_ttft_seconds_sum{variant=\"b\"} 15
epp_variant_ttft_seconds_count{variant=\"b\"} 100
epp_variant_picks_total{variant=\"a\",endpoint=\"w0\"} 70
epp_variant_picks_total{variant=\"a\",endpoint=\"w1\"} 30
epp_shadow_decisions_total{variant=\"s\",outcome=\"agree\"} 30
epp_shadow_decisions_total{variant=\"s\",outcome=\"disagree\"} 10
";

    #[test]
    fn side_by_side_with_differences() {
        let mut out = Vec::new();
        report(PAGE, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("60.0%") && text.contains("20.0%"), "{text}");
        assert!(text.contains("b vs a"), "{text}");
        assert!(text.contains("hit rate   -40.0 pts"), "{text}");
        assert!(text.contains("ttft mean  +50.0 ms"), "{text}");
        assert!(text.contains("shadow s: 40 decisions, agreement with the routing pick 75.0%"), "{text}");
        assert!(text.contains("70.0%"), "top share of a: {text}");
    }

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let h = Hist { buckets: vec![(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)], sum: 10.0, count: 100.0 };
        assert!((h.quantile(0.5).unwrap() - 0.1).abs() < 1e-9);
        assert!((h.quantile(0.75).unwrap() - 0.15).abs() < 1e-9);
    }

    #[test]
    fn a_page_without_experiments_is_an_error() {
        assert!(matches!(report("up 1\n", &mut Vec::new()), Err(ReportError::NoVariants)));
    }
}
