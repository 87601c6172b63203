//! The numbers a replay reports per policy, computed from the run records, and their two
//! renderings: an aligned table for the terminal and CSV.
//!
//! Pure: records in, rows and text out. Percentiles are nearest-rank over completed
//! requests; rates are over the span from the first arrival to the last completion.

use std::fmt::Write;

use super::engine::{Outcome, RunResult};

/// One policy's row.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyReport {
    pub policy: String,
    pub requests: usize,
    pub completed: usize,
    /// Time to first token, milliseconds: p50, p90, p99.
    pub ttft_ms: [f64; 3],
    /// Arrival to last token, milliseconds: p50, p90, p99.
    pub e2e_ms: [f64; 3],
    /// Completed requests per second.
    pub throughput_rps: f64,
    /// Output tokens per second.
    pub output_tps: f64,
    /// Prompt tokens served from the workers' prefix caches / all prompt tokens (completed requests).
    pub prefix_hit_rate: f64,
    /// Mean over arrivals of max/mean running sequences across workers (1 = perfectly even).
    pub imbalance: f64,
    pub rejected_429: usize,
    pub rejected_503: usize,
    /// Other EPP errors (e.g. 500).
    pub rejected_other: usize,
    /// Requests too large for a worker's KV cache.
    pub too_large: usize,
}

/// The CSV header (and the table's column names).
pub const COLUMNS: [&str; 17] = [
    "policy",
    "requests",
    "completed",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "e2e_p50_ms",
    "e2e_p90_ms",
    "e2e_p99_ms",
    "throughput_rps",
    "output_tok_s",
    "prefix_hit_rate",
    "imbalance",
    "http_429",
    "http_503",
    "other_errors",
    "too_large",
];

/// Nearest-rank percentile `p` (0–100) of ascending `sorted`; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorted time-to-first-token values of a run's completed requests, milliseconds.
pub fn ttfts_ms(run: &RunResult) -> Vec<f64> {
    let mut v: Vec<f64> = run
        .records
        .iter()
        .filter_map(|r| match r.outcome {
            Outcome::Completed { first_token, .. } => Some((first_token - r.arrival) * 1000.0),
            _ => None,
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

impl PolicyReport {
    pub fn from_run(run: &RunResult) -> PolicyReport {
        let ttft = ttfts_ms(run);
        let mut e2e = Vec::with_capacity(ttft.len());
        let (mut prompt, mut cached, mut output) = (0u64, 0u64, 0u64);
        let (mut r429, mut r503, mut other, mut too_large) = (0, 0, 0, 0);
        let first_arrival = run.records.first().map(|r| r.arrival).unwrap_or(0.0);
        let mut last_finish = first_arrival;
        for r in &run.records {
            match r.outcome {
                Outcome::Completed { finished, usage, .. } => {
                    e2e.push((finished - r.arrival) * 1000.0);
                    prompt += u64::from(usage.prompt_tokens);
                    cached += u64::from(usage.cached_tokens);
                    output += u64::from(usage.completion_tokens);
                    last_finish = last_finish.max(finished);
                }
                Outcome::Rejected(429) => r429 += 1,
                Outcome::Rejected(503) => r503 += 1,
                Outcome::Rejected(_) | Outcome::InFlight => other += 1,
                Outcome::TooLarge => too_large += 1,
            }
        }
        e2e.sort_by(f64::total_cmp);
        let span = last_finish - first_arrival;
        let per_second = |x: f64| if span > 0.0 { x / span } else { 0.0 };
        let pct = |v: &[f64]| [percentile(v, 50.0), percentile(v, 90.0), percentile(v, 99.0)];
        PolicyReport {
            policy: run.policy.clone(),
            requests: run.records.len(),
            completed: ttft.len(),
            ttft_ms: pct(&ttft),
            e2e_ms: pct(&e2e),
            throughput_rps: per_second(ttft.len() as f64),
            output_tps: per_second(output as f64),
            prefix_hit_rate: if prompt > 0 { cached as f64 / prompt as f64 } else { 0.0 },
            imbalance: if run.imbalance_samples > 0 { run.imbalance_sum / run.imbalance_samples as f64 } else { 1.0 },
            rejected_429: r429,
            rejected_503: r503,
            rejected_other: other,
            too_large,
        }
    }

    /// The row's cells, formatted, in [`COLUMNS`] order.
    pub fn cells(&self) -> Vec<String> {
        let ms = |x: f64| format!("{x:.1}");
        vec![
            self.policy.clone(),
            self.requests.to_string(),
            self.completed.to_string(),
            ms(self.ttft_ms[0]),
            ms(self.ttft_ms[1]),
            ms(self.ttft_ms[2]),
            ms(self.e2e_ms[0]),
            ms(self.e2e_ms[1]),
            ms(self.e2e_ms[2]),
            format!("{:.2}", self.throughput_rps),
            format!("{:.0}", self.output_tps),
            format!("{:.3}", self.prefix_hit_rate),
            format!("{:.2}", self.imbalance),
            self.rejected_429.to_string(),
            self.rejected_503.to_string(),
            self.rejected_other.to_string(),
            self.too_large.to_string(),
        ]
    }
}

/// An aligned table, one row per policy, names left-aligned and numbers right-aligned.
pub fn table(reports: &[PolicyReport]) -> String {
    let rows: Vec<Vec<String>> = reports.iter().map(PolicyReport::cells).collect();
    let widths: Vec<usize> = (0..COLUMNS.len())
        .map(|c| rows.iter().map(|r| r[c].len()).chain([COLUMNS[c].len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut parts = Vec::with_capacity(cells.len());
        for (c, cell) in cells.iter().enumerate() {
            parts.push(if c == 0 {
                format!("{cell:<w$}", w = widths[c])
            } else {
                format!("{cell:>w$}", w = widths[c])
            });
        }
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(&COLUMNS);
    for row in &rows {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

/// One tenant's share of a run (workloads with tenants).
#[derive(Clone, Debug, PartialEq)]
pub struct TenantReport {
    pub policy: String,
    pub tenant: String,
    pub requests: usize,
    pub completed: usize,
    /// Time to first token, milliseconds: p50, p90.
    pub ttft_ms: [f64; 2],
    pub mean_ttft_ms: f64,
    /// Answered by the EPP (429/503) or refused by a worker.
    pub rejected: usize,
}

/// Per tenant of each run, when the workload has tenants.
pub fn tenant_reports(run: &RunResult) -> Vec<TenantReport> {
    (0..run.tenant_names.len())
        .map(|k| {
            let mine = run.records.iter().zip(&run.tenants).filter(|(_, t)| **t == Some(k as u16)).map(|(r, _)| r);
            let mut ttft = Vec::new();
            let (mut requests, mut rejected) = (0, 0);
            for r in mine {
                requests += 1;
                match r.outcome {
                    Outcome::Completed { first_token, .. } => ttft.push((first_token - r.arrival) * 1000.0),
                    Outcome::InFlight => {}
                    _ => rejected += 1,
                }
            }
            ttft.sort_by(f64::total_cmp);
            let mean = if ttft.is_empty() { f64::NAN } else { ttft.iter().sum::<f64>() / ttft.len() as f64 };
            TenantReport {
                policy: run.policy.clone(),
                tenant: run.tenant_names[k].clone(),
                requests,
                completed: ttft.len(),
                ttft_ms: [percentile(&ttft, 50.0), percentile(&ttft, 90.0)],
                mean_ttft_ms: mean,
                rejected,
            }
        })
        .collect()
}

/// Jain's fairness index of the tenants' mean TTFTs: 1 when every tenant waits alike,
/// 1/n when one tenant takes all the waiting.
pub fn jain_index(values: &[f64]) -> f64 {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let sum: f64 = v.iter().sum();
    let squares: f64 = v.iter().map(|x| x * x).sum();
    if v.is_empty() || squares == 0.0 { 1.0 } else { sum * sum / (v.len() as f64 * squares) }
}

/// The per-tenant table of `runs`, or None when the workload has no tenants.
pub fn tenant_table(runs: &[RunResult]) -> Option<String> {
    let rows: Vec<TenantReport> = runs.iter().flat_map(tenant_reports).collect();
    if rows.is_empty() {
        return None;
    }
    let mut out = format!(
        "{:<14} {:<16} {:>8} {:>9} {:>11} {:>11} {:>8}\n",
        "policy", "tenant", "requests", "completed", "ttft_p50_ms", "ttft_p90_ms", "rejected"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "{:<14} {:<16} {:>8} {:>9} {:>11.1} {:>11.1} {:>8}",
            r.policy, r.tenant, r.requests, r.completed, r.ttft_ms[0], r.ttft_ms[1], r.rejected
        );
    }
    for run in runs {
        let means: Vec<f64> = tenant_reports(run).iter().map(|t| t.mean_ttft_ms).collect();
        let _ = writeln!(
            out,
            "{}: Jain's fairness index of mean TTFT across tenants {:.3}",
            run.policy,
            jain_index(&means)
        );
    }
    Some(out)
}

/// One worker's share of a run (`--per-worker`).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerReport {
    pub policy: String,
    pub worker: u32,
    /// Requests routed to it, and their share of the run's routed requests.
    pub requests: usize,
    pub share: f64,
    pub completed: usize,
    /// Prompt tokens served from its prefix cache / all its prompt tokens (completed).
    pub prefix_hit_rate: f64,
    /// Time to first token, milliseconds: p50, p90.
    pub ttft_ms: [f64; 2],
    /// When its last request finished, seconds after the run's first arrival (a worker
    /// busy long after the others was given more than it could serve).
    pub busy_until_s: f64,
    /// The models (base or LoRA adapter) it was sent most, with their counts, at most three.
    pub models: Vec<(String, usize)>,
}

/// Models listed per worker in the per-worker table.
const TOP_MODELS: usize = 3;

/// Per worker of `run`, workers `0..workers` (one that got nothing included).
pub fn worker_reports(run: &RunResult, workers: usize) -> Vec<WorkerReport> {
    let first_arrival = run.records.first().map(|r| r.arrival).unwrap_or(0.0);
    // Each worker's records, in one pass over the run.
    let mut mine: Vec<Vec<usize>> = vec![Vec::new(); workers];
    for (i, r) in run.records.iter().enumerate() {
        if let Some(list) = r.worker.and_then(|w| mine.get_mut(w as usize)) {
            list.push(i);
        }
    }
    let routed = run.records.iter().filter(|r| r.worker.is_some()).count();
    mine.into_iter()
        .enumerate()
        .map(|(w, indices)| {
            let w = u32::try_from(w).unwrap_or(u32::MAX);
            let (mut prompt, mut cached, mut busy_until) = (0u64, 0u64, 0.0f64);
            let requests = indices.len();
            let mut ttft = Vec::new();
            let mut per_model = vec![0usize; run.model_names.len()];
            for i in indices {
                let r = &run.records[i];
                if let Some(n) = run.models.get(i).and_then(|&m| per_model.get_mut(usize::from(m))) {
                    *n += 1;
                }
                if let Outcome::Completed { first_token, finished, usage } = r.outcome {
                    ttft.push((first_token - r.arrival) * 1000.0);
                    prompt += u64::from(usage.prompt_tokens);
                    cached += u64::from(usage.cached_tokens);
                    busy_until = busy_until.max(finished - first_arrival);
                }
            }
            ttft.sort_by(f64::total_cmp);
            let mut models: Vec<(String, usize)> = run
                .model_names
                .iter()
                .zip(per_model)
                .filter(|(_, n)| *n > 0)
                .map(|(name, n)| (name.clone(), n))
                .collect();
            // Most requests first; equal counts by name, so the table is reproducible.
            models.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            models.truncate(TOP_MODELS);
            WorkerReport {
                policy: run.policy.clone(),
                worker: w,
                requests,
                share: if routed > 0 { requests as f64 / routed as f64 } else { 0.0 },
                completed: ttft.len(),
                prefix_hit_rate: if prompt > 0 { cached as f64 / prompt as f64 } else { 0.0 },
                ttft_ms: [percentile(&ttft, 50.0), percentile(&ttft, 90.0)],
                busy_until_s: busy_until,
                models,
            }
        })
        .collect()
}

/// The per-worker table of `runs` over `workers` workers (`--per-worker`).
pub fn worker_table(runs: &[RunResult], workers: usize) -> String {
    let mut out = format!(
        "{:<14} {:>6} {:>8} {:>6} {:>9} {:>6} {:>11} {:>11} {:>12}  {}\n",
        "policy",
        "worker",
        "requests",
        "share",
        "completed",
        "hits",
        "ttft_p50_ms",
        "ttft_p90_ms",
        "busy_until_s",
        "models"
    );
    for r in runs.iter().flat_map(|run| worker_reports(run, workers)) {
        let models: Vec<String> = r.models.iter().map(|(name, n)| format!("{name} {n}")).collect();
        let _ = writeln!(
            out,
            "{:<14} {:>6} {:>8} {:>5.1}% {:>9} {:>6.3} {:>11.1} {:>11.1} {:>12.1}  {}",
            r.policy,
            r.worker,
            r.requests,
            r.share * 100.0,
            r.completed,
            r.prefix_hit_rate,
            r.ttft_ms[0],
            r.ttft_ms[1],
            r.busy_until_s,
            models.join(", ")
        );
    }
    out
}

/// The rows as CSV, with a header. Policy names are quoted when they need it.
pub fn csv(reports: &[PolicyReport]) -> String {
    let mut out = COLUMNS.join(",");
    out.push('\n');
    for r in reports {
        let mut cells = r.cells();
        if cells[0].contains([',', '"', '\n']) {
            cells[0] = format!("\"{}\"", cells[0].replace('"', "\"\""));
        }
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::engine::Record;
    use llmd_plugin_sdk::Usage;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let cases = [(50.0, 50.0), (90.0, 90.0), (99.0, 99.0), (100.0, 100.0), (0.0, 1.0)];
        for (p, want) in cases {
            assert_eq!(percentile(&v, p), want, "p{p}");
        }
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    fn completed(arrival: f64, first: f64, finished: f64, prompt: u32, cached: u32) -> Record {
        let usage = Usage { prompt_tokens: prompt, cached_tokens: cached, completion_tokens: 10 };
        Record::new(arrival, Outcome::Completed { first_token: first, finished, usage })
    }

    #[test]
    fn rows_from_records() {
        let run = RunResult {
            policy: "p,1".into(),
            records: vec![
                completed(0.0, 0.1, 1.0, 100, 50),
                completed(1.0, 1.3, 2.0, 100, 0),
                Record::new(1.5, Outcome::Rejected(429)),
                Record::new(1.6, Outcome::Rejected(503)),
                Record::new(1.7, Outcome::TooLarge),
            ],
            imbalance_sum: 3.0,
            imbalance_samples: 2,
            tenants: Vec::new(),
            tenant_names: Vec::new(),
            models: Vec::new(),
            model_names: Vec::new(),
        };
        let r = PolicyReport::from_run(&run);
        assert_eq!((r.requests, r.completed, r.rejected_429, r.rejected_503, r.too_large), (5, 2, 1, 1, 1));
        assert!((r.ttft_ms[0] - 100.0).abs() < 1e-9 && (r.ttft_ms[2] - 300.0).abs() < 1e-9, "{:?}", r.ttft_ms);
        assert!((r.e2e_ms[0] - 1000.0).abs() < 1e-9);
        assert_eq!((r.throughput_rps, r.output_tps), (1.0, 10.0), "2 requests, 20 tokens over 2 s");
        assert_eq!((r.prefix_hit_rate, r.imbalance), (0.25, 1.5));
        let csv = csv(std::slice::from_ref(&r));
        assert!(csv.starts_with("policy,requests,completed,ttft_p50_ms"));
        assert!(csv.lines().nth(1).is_some_and(|l| l.starts_with("\"p,1\",5,2,100.0,")), "{csv}");
        let table = table(&[r]);
        assert_eq!(table.lines().count(), 2);
        assert!(table.lines().all(|l| l.len() == table.lines().next().map_or(0, str::len)), "aligned:\n{table}");
    }

    #[test]
    fn worker_rows_split_the_run_by_worker() {
        let on = |worker: u32, mut r: Record| {
            r.worker = Some(worker);
            r
        };
        let run = RunResult {
            policy: "p".into(),
            records: vec![
                on(0, completed(0.0, 0.1, 1.0, 100, 50)),
                on(0, completed(0.5, 0.7, 4.0, 100, 100)),
                on(1, completed(1.0, 1.5, 2.0, 200, 0)),
                on(0, Record::new(1.2, Outcome::TooLarge)),
                Record::new(1.5, Outcome::Rejected(429)),
            ],
            imbalance_sum: 0.0,
            imbalance_samples: 0,
            tenants: Vec::new(),
            tenant_names: Vec::new(),
            models: vec![1, 0, 1, 2, 1],
            model_names: vec!["base".into(), "lora-a".into(), "lora-b".into()],
        };
        let rows = worker_reports(&run, 3);
        assert_eq!(rows.len(), 3, "a worker that got nothing has its row");
        let w0 = &rows[0];
        assert_eq!((w0.requests, w0.completed), (3, 2));
        assert!((w0.share - 0.75).abs() < 1e-9, "3 of the 4 routed requests");
        assert!((w0.prefix_hit_rate - 0.75).abs() < 1e-9);
        assert!((w0.ttft_ms[0] - 100.0).abs() < 1e-9 && (w0.ttft_ms[1] - 200.0).abs() < 1e-9, "{:?}", w0.ttft_ms);
        assert!((w0.busy_until_s - 4.0).abs() < 1e-9);
        let names = |r: &WorkerReport| r.models.iter().map(|(m, n)| format!("{m} {n}")).collect::<Vec<_>>();
        assert_eq!(names(w0), ["base 1", "lora-a 1", "lora-b 1"], "equal counts by name");
        assert_eq!(names(&rows[1]), ["lora-a 1"]);
        assert_eq!((rows[2].requests, rows[2].completed, rows[2].share), (0, 0, 0.0));
        assert!(rows[2].ttft_ms[0].is_nan() && rows[2].models.is_empty());
        let table = worker_table(std::slice::from_ref(&run), 3);
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(
            table.lines().nth(1).is_some_and(|l| l.contains("75.0%") && l.ends_with("base 1, lora-a 1, lora-b 1")),
            "{table}"
        );
    }
}
