//! The replay's picture: an SVG with, side by side, the TTFT distribution of every policy
//! (a CDF on a logarithmic time axis) and each policy's prefix-cache hit rate (bars).
//!
//! It draws with plotters' SVG backend into a string and uses no system fonts (plotters'
//! built-in text metrics), so it works on machines without any; writing the file is the
//! caller's business.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::PolicyReport;

/// What a policy contributes to the plot.
pub struct Series<'a> {
    pub report: &'a PolicyReport,
    /// Ascending TTFT values of its completed requests, milliseconds.
    pub ttft_ms: &'a [f64],
}

/// Points of a CDF line drawn per policy at most.
const CDF_POINTS: usize = 400;

/// Renders the SVG document.
pub fn svg(title: &str, series: &[Series<'_>]) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1200, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
        let (left, right) = root.split_horizontally(760);
        ttft_cdf(&left, series)?;
        hit_rates(&right, series)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

fn err(e: impl std::fmt::Display) -> String {
    format!("cannot draw the plot: {e}")
}

/// Samples a sorted list into at most `CDF_POINTS + 1` (value, cumulative share) points.
pub fn cdf_points(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let steps = CDF_POINTS.min(n - 1).max(1);
    let mut points: Vec<(f64, f64)> = (0..=steps)
        .map(|k| {
            let i = k * (n - 1) / steps;
            (sorted[i], (i + 1) as f64 / n as f64)
        })
        .collect();
    points.dedup();
    points
}

fn ttft_cdf(area: &DrawingArea<SVGBackend<'_>, Shift>, series: &[Series<'_>]) -> Result<(), String> {
    // A log axis needs positive bounds; sub-0.1 ms TTFTs are drawn at 0.1 ms.
    let floor = 0.1;
    let lo = series.iter().filter_map(|s| s.ttft_ms.first()).copied().fold(f64::INFINITY, f64::min).max(floor);
    let lo = if lo.is_finite() { lo } else { floor };
    // Start at a power of ten, so the axis labels of the first decade are round numbers.
    let lo = 10f64.powf(lo.log10().floor());
    let hi = series.iter().filter_map(|s| s.ttft_ms.last()).copied().fold(0.0, f64::max).max(lo * 10.0);
    let mut chart = ChartBuilder::on(area)
        .caption("Time to first token (CDF)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("TTFT (ms, log scale)")
        .x_labels(12)
        .max_light_lines(1)
        .y_desc("share of requests")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points = cdf_points(s.ttft_ms).into_iter().map(|(x, y)| (x.max(floor), y));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(s.report.policy.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

fn hit_rates(area: &DrawingArea<SVGBackend<'_>, Shift>, series: &[Series<'_>]) -> Result<(), String> {
    let n = series.len().max(1);
    let names: Vec<String> = series.iter().map(|s| s.report.policy.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption("Prefix-cache hit rate", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        // An integer range includes its end, so 0..n-1 makes exactly n segments.
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .y_desc("cached / prompt tokens")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => names.get(*i).cloned().unwrap_or_default(),
            SegmentValue::Last => String::new(),
        })
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let rate = s.report.prefix_hit_rate.clamp(0.0, 1.0);
        chart
            .draw_series([Rectangle::new(
                [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), rate)],
                color.filled(),
            )])
            .map_err(err)?;
        chart
            .draw_series([Text::new(
                format!("{rate:.2}"),
                (SegmentValue::CenterOf(i), (rate + 0.03).min(0.97)),
                ("sans-serif", 14),
            )])
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_points_are_sampled_and_end_at_one() {
        let v: Vec<f64> = (0..10_000).map(f64::from).collect();
        let p = cdf_points(&v);
        assert!(p.len() <= CDF_POINTS + 1);
        assert_eq!(p.first(), Some(&(0.0, 1.0 / 10_000.0)));
        assert_eq!(p.last(), Some(&(9_999.0, 1.0)));
        assert!(p.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert_eq!(cdf_points(&[5.0]), vec![(5.0, 1.0)]);
        assert!(cdf_points(&[]).is_empty());
    }

    #[test]
    fn draws_an_svg_with_every_policy() {
        let report = |name: &str, rate: f64| PolicyReport {
            policy: name.into(),
            requests: 3,
            completed: 3,
            ttft_ms: [1.0; 3],
            e2e_ms: [1.0; 3],
            throughput_rps: 1.0,
            output_tps: 1.0,
            prefix_hit_rate: rate,
            imbalance: 1.0,
            rejected_429: 0,
            rejected_503: 0,
            rejected_other: 0,
            too_large: 0,
        };
        let (a, b) = (report("fast-one", 0.8), report("slow-one", 0.1));
        let ttft_a = [5.0, 8.0, 20.0];
        let ttft_b = [50.0, 300.0, 900.0];
        let svg = svg(
            "replay",
            &[
                Series { report: &a, ttft_ms: &ttft_a },
                Series { report: &b, ttft_ms: &ttft_b },
                Series { report: &b, ttft_ms: &[] },
            ],
        )
        .expect("drawn");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for text in ["fast-one", "slow-one", "Time to first token", "0.80"] {
            assert!(svg.contains(text), "missing {text}");
        }
    }
}
