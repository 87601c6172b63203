//! Picking an inference engine's load out of a parsed metrics page.
//!
//! It owns which metric names mean what (`MetricNames`, defaulting to vLLM's), how several
//! series of one metric combine (summed queues, the fullest KV cache, the newest LoRA
//! report) and the checks that keep a nonsense page from passing for an idle engine: a
//! missing load gauge, or a value that is NaN, infinite or negative, is an error. It is pure;
//! it does no I/O and knows nothing of endpoints or scheduling.

use super::parse::Sample;

/// Labels of `vllm:lora_requests_info` and `vllm:cache_config_info` (vLLM's own names).
const MAX_LORA: &str = "max_lora";
const RUNNING_LORA_ADAPTERS: &str = "running_lora_adapters";
const WAITING_LORA_ADAPTERS: &str = "waiting_lora_adapters";
const BLOCK_SIZE: &str = "block_size";
const NUM_GPU_BLOCKS: &str = "num_gpu_blocks";

/// The metric names one engine's page is read with. Each is a name, or upstream's
/// `name{label=value,…}` form (values quoted or not), which reads only the series whose
/// labels match; an empty one is not read (its value is 0, or unknown for LoRA and the
/// cache configuration), as upstream's engine configs leave out what an engine lacks: e.g.
/// `vllm:kv_cache_usage_perc{engine="0"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricNames {
    /// Requests queued (gauge).
    pub waiting: String,
    /// Requests being executed (gauge).
    pub running: String,
    /// KV-cache usage, 0..=1 (gauge).
    pub kv_usage: String,
    /// Read when `kv_usage` is absent: vLLM's name for it before the V1 engine.
    pub kv_usage_fallback: Option<String>,
    /// LoRA adapters in use; the value is the report's Unix time.
    pub lora: String,
    /// The engine's KV-cache configuration, in labels (vLLM's `cache_config_info`).
    pub cache: String,
    /// The labels of `cache` that hold the block size and the block count.
    pub cache_block_size_label: String,
    pub cache_num_blocks_label: String,
    /// The KV-cache configuration as two gauges instead (SGLang's `page_size` and
    /// `num_pages`), read when `cache` is empty or not on the page.
    pub cache_block_size: String,
    pub cache_num_blocks: String,
    /// `customMetrics`: endpoint attributes, each the value of one metric (plugins read
    /// attribute `key` as column `attribute/<key>`).
    pub custom: Vec<CustomMetric>,
}

/// One `customMetrics` entry of an engine config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomMetric {
    /// The attribute's key (`attributeKey`).
    pub key: std::sync::Arc<str>,
    /// The metric, by name or selector (`metricSpec`).
    pub spec: String,
}

impl MetricNames {
    /// Checks every name's form; the error names the offending one.
    pub fn check(&self) -> Result<(), String> {
        let all = [
            &self.waiting,
            &self.running,
            &self.kv_usage,
            &self.lora,
            &self.cache,
            &self.cache_block_size,
            &self.cache_num_blocks,
        ];
        for spec in all.into_iter().chain(&self.kv_usage_fallback).filter(|s| !s.trim().is_empty()) {
            Selector::parse(spec)?;
        }
        for (i, c) in self.custom.iter().enumerate() {
            if c.key.trim().is_empty() {
                return Err(format!("customMetrics[{i}].attributeKey: required"));
            }
            if self.custom[..i].iter().any(|earlier| earlier.key == c.key) {
                return Err(format!("customMetrics[{i}].attributeKey: `{}` is given twice", c.key));
            }
            if c.spec.trim().is_empty() {
                return Err(format!("customMetrics[{i}].metricSpec: required"));
            }
            Selector::parse(&c.spec).map_err(|e| format!("customMetrics[{i}].metricSpec: {e}"))?;
        }
        if self.cache_block_size.trim().is_empty() != self.cache_num_blocks.trim().is_empty() {
            return Err("the cache block size and block count gauges are given together or not at all".into());
        }
        for label in [&self.cache_block_size_label, &self.cache_num_blocks_label] {
            if label.trim().is_empty() || label.contains(['{', '}', '=', ',', '"']) {
                return Err(format!("`{label}` is not a label name"));
            }
        }
        Ok(())
    }
}

/// A metric as named: its name and the labels its series must have.
struct Selector<'a> {
    name: &'a str,
    labels: Vec<(&'a str, &'a str)>,
}

impl<'a> Selector<'a> {
    fn parse(spec: &'a str) -> Result<Selector<'a>, String> {
        let bad = |why: &str| format!("metric `{spec}`: {why}; expected `name` or `name{{label=\"value\",…}}`");
        let Some((name, rest)) = spec.split_once('{') else {
            return if spec.trim().is_empty() || spec.contains('}') {
                Err(bad("not a metric name"))
            } else {
                Ok(Selector { name: spec.trim(), labels: Vec::new() })
            };
        };
        let inner = rest.trim_end().strip_suffix('}').ok_or_else(|| bad("no closing `}`"))?;
        if name.trim().is_empty() {
            return Err(bad("no metric name before `{`"));
        }
        let mut labels = Vec::new();
        for pair in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| bad(&format!("`{pair}` is not label=value")))?;
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            if k.trim().is_empty() {
                return Err(bad(&format!("`{pair}` has no label name")));
            }
            labels.push((k.trim(), v));
        }
        Ok(Selector { name: name.trim(), labels })
    }

    /// A spec that does not parse (checked at start) matches nothing.
    fn of(spec: &'a str) -> Option<Selector<'a>> {
        Selector::parse(spec).ok()
    }

    fn matches(&self, s: &Sample) -> bool {
        s.name == self.name && self.labels.iter().all(|(k, v)| s.label(k) == Some(*v))
    }
}

impl Default for MetricNames {
    fn default() -> Self {
        MetricNames {
            waiting: "vllm:num_requests_waiting".to_string(),
            running: "vllm:num_requests_running".to_string(),
            kv_usage: "vllm:kv_cache_usage_perc".to_string(),
            kv_usage_fallback: Some("vllm:gpu_cache_usage_perc".to_string()),
            lora: "vllm:lora_requests_info".to_string(),
            cache: "vllm:cache_config_info".to_string(),
            cache_block_size_label: BLOCK_SIZE.to_string(),
            cache_num_blocks_label: NUM_GPU_BLOCKS.to_string(),
            cache_block_size: String::new(),
            cache_num_blocks: String::new(),
            custom: Vec::new(),
        }
    }
}

/// One engine's load as of one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineMetrics {
    pub waiting: f64,
    pub running: f64,
    /// 0..=1 as the engine reports it; not clamped here.
    pub kv_usage: f64,
    /// `None` when the page has no LoRA report (LoRA disabled).
    pub lora: Option<LoraInfo>,
    /// `None` when the page has no usable cache configuration.
    pub cache: Option<CacheInfo>,
    /// Why a cache configuration on the page was not usable (it is left out; the rest of
    /// the page still counts).
    pub cache_error: Option<ExtractError>,
    /// The custom metrics found on the page, by attribute key (a missing one, or one whose
    /// value is not a finite number, is left out: its attribute reads as unknown).
    pub custom: Vec<(std::sync::Arc<str>, f32)>,
}

/// The newest LoRA report of an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraInfo {
    pub max_lora: u32,
    pub running: Vec<String>,
    pub waiting: Vec<String>,
}

/// An engine's KV-cache geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheInfo {
    /// Tokens per KV block.
    pub block_size: u32,
    pub num_gpu_blocks: u32,
}

/// Why a page's samples do not describe an engine's load.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExtractError {
    /// `names` are the metric and its fallbacks, in the order tried.
    #[error("no sample of `{}`", .names.join("` or `"))]
    Missing { names: Vec<String> },
    #[error("`{name}` has the value {value}, not a finite number ≥ 0")]
    BadValue { name: String, value: f64 },
    #[error("`{name}` has no label `{label}`")]
    MissingLabel { name: String, label: String },
    #[error("`{name}`: label `{label}` is {value:?}, not a whole number")]
    BadLabel { name: String, label: String, value: String },
    #[error("`{name}`: samples disagree on label `{label}`")]
    Inconsistent { name: String, label: String },
    #[error("`{name}`: label `{label}` is 0")]
    Zero { name: String, label: String },
    #[error("`{name}`: label `{label}` is {value}, more than {max}")]
    TooLarge { name: String, label: String, value: u32, max: u32 },
    #[error("`{name}` is {value}, not a whole number from 1 to {max}")]
    BadGauge { name: String, value: f64, max: u32 },
    #[error("`{name}`: its series disagree")]
    Disagree { name: String },
}

/// The largest KV block an engine is believed to report, in tokens (vLLM's are 1 to a few
/// hundred): a larger one would make the prefix index, which hashes prompts in the pool's
/// largest block, match nothing on any endpoint.
pub const MAX_BLOCK_SIZE: u32 = 4096;

/// The engine's load from a page's samples.
///
/// Several series of one gauge (one per `model_name`, or per data-parallel `engine`) are
/// summed for the queues and maxed for the KV cache — the fullest cache is the one that
/// preempts first. Of several LoRA reports the newest (highest value) wins, the first one on
/// the page among equals: vLLM keeps a series per distinct adapter list, so old lists linger
/// on the page with old timestamps. Several cache configurations must agree on the block
/// size; the smallest block count is kept, as the capacity every engine behind the endpoint
/// has. LoRA reports are checked as strictly as the required metrics: a page that states
/// them wrongly is not trusted for the rest. A cache configuration that is wrong (garbage,
/// zero, inconsistent — vLLM shows `num_gpu_blocks="None"` before profiling) is left out
/// with its reason in `cache_error`: it only sizes the prefix index, which then falls back
/// to its configured capacity.
pub fn extract(samples: &[Sample], names: &MetricNames) -> Result<EngineMetrics, ExtractError> {
    let missing = |names: &[&String]| ExtractError::Missing { names: names.iter().map(|n| n.to_string()).collect() };
    let read = |name: &String, combine: fn(f64, f64) -> f64| -> Result<f64, ExtractError> {
        if name.trim().is_empty() {
            return Ok(0.0);
        }
        fold(samples, name, combine)?.ok_or_else(|| missing(&[name]))
    };
    let waiting = read(&names.waiting, |a, b| a + b)?;
    let running = read(&names.running, |a, b| a + b)?;
    let fallback = names.kv_usage_fallback.as_ref().filter(|f| !f.trim().is_empty());
    let kv_usage = match (names.kv_usage.trim().is_empty(), fallback) {
        (true, None) => 0.0,
        (true, Some(fallback)) => read(fallback, f64::max)?,
        (false, None) => read(&names.kv_usage, f64::max)?,
        (false, Some(fallback)) => match fold(samples, &names.kv_usage, f64::max)? {
            Some(kv) => kv,
            None => fold(samples, fallback, f64::max)?.ok_or_else(|| missing(&[&names.kv_usage, fallback]))?,
        },
    };
    // The info metric's labels, else (not on the page, or not configured) the two gauges.
    let info = if names.cache.trim().is_empty() {
        Ok(None)
    } else {
        cache(samples, &names.cache, &names.cache_block_size_label, &names.cache_num_blocks_label)
    };
    let cached = match info {
        Ok(None) if !names.cache_block_size.trim().is_empty() => {
            cache_gauges(samples, &names.cache_block_size, &names.cache_num_blocks)
        }
        other => other,
    };
    let (cache, cache_error) = match cached {
        Ok(c) => (c, None),
        Err(e) => (None, Some(e)),
    };
    let lora = if names.lora.trim().is_empty() { None } else { lora(samples, &names.lora)? };
    // Of several matching series, the first on the page (upstream takes the newest by
    // timestamp; engines do not stamp their samples).
    let custom = names
        .custom
        .iter()
        .filter_map(|c| {
            let value = matching(samples, &c.spec).map(|s| s.value).find(|v| v.is_finite())?;
            let value = value as f32;
            value.is_finite().then(|| (c.key.clone(), value))
        })
        .collect();
    Ok(EngineMetrics { waiting, running, kv_usage, lora, cache, cache_error, custom })
}

/// The samples of `name` (a name or selector), those not matching it left out.
fn matching<'a>(samples: &'a [Sample], name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
    let selector = Selector::of(name);
    samples.iter().filter(move |s| selector.as_ref().is_some_and(|sel| sel.matches(s)))
}

/// All samples of `name`, each with a checked value.
fn series<'a>(samples: &'a [Sample], name: &'a str) -> impl Iterator<Item = Result<&'a Sample, ExtractError>> + 'a {
    matching(samples, name).map(move |s| {
        if s.value.is_finite() && s.value >= 0.0 {
            Ok(s)
        } else {
            Err(ExtractError::BadValue { name: name.to_string(), value: s.value })
        }
    })
}

/// The values of `name` combined by `combine`; `None` when the page has none.
fn fold(samples: &[Sample], name: &str, combine: fn(f64, f64) -> f64) -> Result<Option<f64>, ExtractError> {
    let mut acc = None;
    for sample in series(samples, name) {
        let value = sample?.value;
        acc = Some(acc.map_or(value, |a| combine(a, value)));
    }
    // Each value is finite, but their sum may not be, nor fit the f32 the scorers read.
    match acc {
        Some(value) if !(value.is_finite() && value <= f64::from(f32::MAX)) => {
            Err(ExtractError::BadValue { name: name.to_string(), value })
        }
        _ => Ok(acc),
    }
}

fn lora(samples: &[Sample], name: &str) -> Result<Option<LoraInfo>, ExtractError> {
    let mut newest: Option<&Sample> = None;
    for sample in series(samples, name) {
        let sample = sample?;
        if newest.is_none_or(|n| sample.value > n.value) {
            newest = Some(sample);
        }
    }
    let Some(sample) = newest else { return Ok(None) };
    Ok(Some(LoraInfo {
        max_lora: whole_label(sample, name, MAX_LORA)?,
        running: adapters(label(sample, name, RUNNING_LORA_ADAPTERS)?),
        waiting: adapters(label(sample, name, WAITING_LORA_ADAPTERS)?),
    }))
}

/// The cache configuration from an info metric's labels (`block_label`, `blocks_label`).
fn cache(
    samples: &[Sample],
    name: &str,
    block_label: &str,
    blocks_label: &str,
) -> Result<Option<CacheInfo>, ExtractError> {
    let mut info: Option<CacheInfo> = None;
    // The value of an info metric is a constant 1, so it is not checked.
    for sample in matching(samples, name) {
        let positive = |label: &str| match whole_label(sample, name, label)? {
            0 => Err(ExtractError::Zero { name: name.to_string(), label: label.to_string() }),
            n => Ok(n),
        };
        let block_size = positive(block_label)?;
        if block_size > MAX_BLOCK_SIZE {
            return Err(ExtractError::TooLarge {
                name: name.to_string(),
                label: block_label.to_string(),
                value: block_size,
                max: MAX_BLOCK_SIZE,
            });
        }
        let this = CacheInfo { block_size, num_gpu_blocks: positive(blocks_label)? };
        info = Some(match info {
            None => this,
            Some(seen) if seen.block_size != this.block_size => {
                return Err(ExtractError::Inconsistent { name: name.to_string(), label: block_label.to_string() });
            }
            Some(seen) => CacheInfo { num_gpu_blocks: seen.num_gpu_blocks.min(this.num_gpu_blocks), ..seen },
        });
    }
    Ok(info)
}

/// The cache configuration from two gauges: the block size (tokens) and the block count.
/// Several series (data-parallel ranks) must agree on the size; the smallest count is kept.
fn cache_gauges(samples: &[Sample], size_name: &str, count_name: &str) -> Result<Option<CacheInfo>, ExtractError> {
    let whole = |name: &str, max: u32| -> Result<Vec<u32>, ExtractError> {
        series(samples, name)
            .map(|s| {
                let value = s?.value;
                if value >= 1.0 && value <= f64::from(max) && value.fract() == 0.0 {
                    Ok(value as u32)
                } else {
                    Err(ExtractError::BadGauge { name: name.to_string(), value, max })
                }
            })
            .collect()
    };
    let sizes = whole(size_name, MAX_BLOCK_SIZE)?;
    let counts = whole(count_name, u32::MAX)?;
    let (block_size, num_gpu_blocks) = match (sizes.first(), counts.iter().min()) {
        (Some(&size), Some(&count)) => (size, count),
        (None, None) => return Ok(None),
        (None, Some(_)) => return Err(ExtractError::Missing { names: vec![size_name.to_string()] }),
        (Some(_), None) => return Err(ExtractError::Missing { names: vec![count_name.to_string()] }),
    };
    if sizes.iter().any(|s| *s != block_size) {
        return Err(ExtractError::Disagree { name: size_name.to_string() });
    }
    Ok(Some(CacheInfo { block_size, num_gpu_blocks }))
}

fn label<'a>(sample: &'a Sample, name: &str, label: &str) -> Result<&'a str, ExtractError> {
    sample.label(label).ok_or_else(|| ExtractError::MissingLabel { name: name.to_string(), label: label.to_string() })
}

fn whole_label(sample: &Sample, name: &str, label_name: &str) -> Result<u32, ExtractError> {
    let value = label(sample, name, label_name)?;
    value.parse().map_err(|_| ExtractError::BadLabel {
        name: name.to_string(),
        label: label_name.to_string(),
        value: value.into(),
    })
}

/// `"a,b"` → `[a, b]`; blanks around names and empty entries are dropped (`""` → none).
fn adapters(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::super::parse::parse;
    use super::*;

    const CURRENT: &str = include_str!("../../../tests/fixtures/vllm-metrics/current.txt");
    const V0_GPU_CACHE: &str = include_str!("../../../tests/fixtures/vllm-metrics/v0-gpu-cache.txt");
    const LORA: &str = include_str!("../../../tests/fixtures/vllm-metrics/lora.txt");
    const MULTI_MODEL: &str = include_str!("../../../tests/fixtures/vllm-metrics/multi-model.txt");

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn extract_page(page: &str) -> Result<EngineMetrics, ExtractError> {
        let samples = parse(page).unwrap_or_else(|e| panic!("fixture does not parse: {e}"));
        extract(&samples, &MetricNames::default())
    }

    #[test]
    fn fixtures() {
        let cases: &[(&str, &str, EngineMetrics)] = &[
            (
                "current",
                CURRENT,
                EngineMetrics {
                    waiting: 3.0,
                    running: 12.0,
                    kv_usage: 0.4172,
                    lora: None,
                    cache: Some(CacheInfo { block_size: 16, num_gpu_blocks: 27690 }),
                    cache_error: None,
                    custom: Vec::new(),
                },
            ),
            (
                "v0-gpu-cache",
                V0_GPU_CACHE,
                EngineMetrics {
                    waiting: 1.0,
                    running: 4.0,
                    kv_usage: 0.0912,
                    lora: Some(LoraInfo { max_lora: 0, running: vec![], waiting: vec![] }),
                    cache: Some(CacheInfo { block_size: 16, num_gpu_blocks: 7724 }),
                    cache_error: None,
                    custom: Vec::new(),
                },
            ),
            (
                "lora",
                LORA,
                EngineMetrics {
                    waiting: 2.0,
                    running: 6.0,
                    kv_usage: 0.2281,
                    lora: Some(LoraInfo {
                        max_lora: 4,
                        running: strings(&["sql-lora", "tweet-lora"]),
                        waiting: strings(&["sql-lora-v2"]),
                    }),
                    cache: Some(CacheInfo { block_size: 16, num_gpu_blocks: 25812 }),
                    cache_error: None,
                    custom: Vec::new(),
                },
            ),
            (
                "multi-model",
                MULTI_MODEL,
                EngineMetrics {
                    waiting: 8.0,
                    running: 17.0,
                    kv_usage: 0.6105,
                    lora: None,
                    cache: Some(CacheInfo { block_size: 16, num_gpu_blocks: 27104 }),
                    cache_error: None,
                    custom: Vec::new(),
                },
            ),
        ];
        for (fixture, page, expected) in cases {
            assert_eq!(&extract_page(page), &Ok(expected.clone()), "fixture {fixture}");
        }
    }

    #[test]
    fn a_page_cut_before_the_kv_gauge_is_an_error_not_an_idle_engine() {
        let cut = CURRENT.find("# HELP vllm:kv_cache_usage_perc").unwrap_or_else(|| panic!("fixture changed"));
        let missing =
            ExtractError::Missing { names: strings(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]) };
        assert_eq!(extract_page(&CURRENT[..cut]), Err(missing));
    }

    #[test]
    fn pages() {
        let names = MetricNames::default();
        let missing = |names: &[&str]| Err(ExtractError::Missing { names: strings(names) });
        let bad = |name: &str, value: f64| Err(ExtractError::BadValue { name: name.into(), value });
        let base = "vllm:num_requests_waiting 1\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\n";
        let ok = |lora: Option<LoraInfo>, cache: Option<CacheInfo>| {
            Ok(EngineMetrics {
                waiting: 1.0,
                running: 2.0,
                kv_usage: 0.5,
                lora,
                cache,
                cache_error: None,
                custom: Vec::new(),
            })
        };
        let cache_err = |e: ExtractError| {
            Ok(EngineMetrics {
                waiting: 1.0,
                running: 2.0,
                kv_usage: 0.5,
                lora: None,
                cache: None,
                cache_error: Some(e),
                custom: Vec::new(),
            })
        };
        let lora = |max_lora, running: &[&str], waiting: &[&str]| {
            Some(LoraInfo { max_lora, running: strings(running), waiting: strings(waiting) })
        };
        let cases: Vec<(String, Result<EngineMetrics, ExtractError>)> = vec![
            (base.into(), ok(None, None)),
            ("".into(), missing(&["vllm:num_requests_waiting"])),
            ("vllm:num_requests_waiting 1\n".into(), missing(&["vllm:num_requests_running"])),
            (
                "vllm:num_requests_waiting 1\nvllm:num_requests_running 2\n".into(),
                missing(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]),
            ),
            (
                // Other metrics that merely share a prefix are not the gauge.
                "vllm:num_requests_waiting_total 1\nvllm:num_requests_waiting_created 5\n".into(),
                missing(&["vllm:num_requests_waiting"]),
            ),
            (
                "vllm:num_requests_waiting 1\nvllm:num_requests_running 2\nvllm:gpu_cache_usage_perc 0.5\n".into(),
                ok(None, None),
            ),
            (
                // The current name wins over the old one.
                format!("{base}vllm:gpu_cache_usage_perc 0.9\n"),
                ok(None, None),
            ),
            (
                "vllm:num_requests_waiting{m=\"a\"} 0.5\nvllm:num_requests_waiting{m=\"b\"} 0.5\n\
                 vllm:num_requests_running{m=\"a\"} 1\nvllm:num_requests_running{m=\"b\"} 1\n\
                 vllm:kv_cache_usage_perc{m=\"a\"} 0.5\nvllm:kv_cache_usage_perc{m=\"b\"} 0.25\n"
                    .into(),
                ok(None, None),
            ),
            ("vllm:num_requests_waiting NaN\n".into(), bad("vllm:num_requests_waiting", f64::NAN)),
            (
                "vllm:num_requests_waiting 1\nvllm:num_requests_running -1\n".into(),
                bad("vllm:num_requests_running", -1.0),
            ),
            (
                "vllm:num_requests_waiting 1\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc +Inf\n".into(),
                bad("vllm:kv_cache_usage_perc", f64::INFINITY),
            ),
            (
                // A bad series is an error even when another series of the gauge is fine.
                format!("{base}vllm:kv_cache_usage_perc{{engine=\"1\"}} -0.1\n"),
                bad("vllm:kv_cache_usage_perc", -0.1),
            ),
            (
                format!(
                    "{base}vllm:lora_requests_info{{max_lora=\"2\",running_lora_adapters=\" a , ,b \",waiting_lora_adapters=\"\"}} 10\n"
                ),
                ok(lora(2, &["a", "b"], &[]), None),
            ),
            (
                // Equal timestamps: the first wins.
                format!(
                    "{base}vllm:lora_requests_info{{max_lora=\"2\",running_lora_adapters=\"a\",waiting_lora_adapters=\"\"}} 10\n\
                     vllm:lora_requests_info{{max_lora=\"2\",running_lora_adapters=\"b\",waiting_lora_adapters=\"\"}} 10\n"
                ),
                ok(lora(2, &["a"], &[]), None),
            ),
            (
                format!("{base}vllm:lora_requests_info{{running_lora_adapters=\"\",waiting_lora_adapters=\"\"}} 10\n"),
                Err(ExtractError::MissingLabel { name: "vllm:lora_requests_info".into(), label: MAX_LORA.into() }),
            ),
            (
                format!("{base}vllm:lora_requests_info{{max_lora=\"1\",waiting_lora_adapters=\"\"}} 10\n"),
                Err(ExtractError::MissingLabel {
                    name: "vllm:lora_requests_info".into(),
                    label: RUNNING_LORA_ADAPTERS.into(),
                }),
            ),
            (
                format!(
                    "{base}vllm:lora_requests_info{{max_lora=\"-1\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}} 10\n"
                ),
                Err(ExtractError::BadLabel {
                    name: "vllm:lora_requests_info".into(),
                    label: MAX_LORA.into(),
                    value: "-1".into(),
                }),
            ),
            (
                format!(
                    "{base}vllm:lora_requests_info{{max_lora=\"1\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}} NaN\n"
                ),
                bad("vllm:lora_requests_info", f64::NAN),
            ),
            (
                format!("{base}vllm:cache_config_info{{block_size=\"32\",num_gpu_blocks=\"100\"}} 1\n"),
                ok(None, Some(CacheInfo { block_size: 32, num_gpu_blocks: 100 })),
            ),
            (
                format!("{base}vllm:cache_config_info{{block_size=\"16\",num_gpu_blocks=\"None\"}} 1\n"),
                cache_err(ExtractError::BadLabel {
                    name: "vllm:cache_config_info".into(),
                    label: NUM_GPU_BLOCKS.into(),
                    value: "None".into(),
                }),
            ),
            (
                format!("{base}vllm:cache_config_info{{num_gpu_blocks=\"100\"}} 1\n"),
                cache_err(ExtractError::MissingLabel {
                    name: "vllm:cache_config_info".into(),
                    label: BLOCK_SIZE.into(),
                }),
            ),
            (
                format!("{base}vllm:cache_config_info{{block_size=\"16\",num_gpu_blocks=\"0\"}} 1\n"),
                cache_err(ExtractError::Zero { name: "vllm:cache_config_info".into(), label: NUM_GPU_BLOCKS.into() }),
            ),
            (
                format!("{base}vllm:cache_config_info{{block_size=\"1048576\",num_gpu_blocks=\"100\"}} 1\n"),
                cache_err(ExtractError::TooLarge {
                    name: "vllm:cache_config_info".into(),
                    label: BLOCK_SIZE.into(),
                    value: 1_048_576,
                    max: MAX_BLOCK_SIZE,
                }),
            ),
            // Two finite series whose sum is not an f32.
            (
                "vllm:num_requests_waiting{engine=\"0\"} 1e38\nvllm:num_requests_waiting{engine=\"1\"} 3e38\n\
                 vllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\n"
                    .to_string(),
                bad("vllm:num_requests_waiting", 4e38),
            ),
            (
                format!(
                    "{base}vllm:cache_config_info{{engine=\"0\",block_size=\"16\",num_gpu_blocks=\"100\"}} 1\n\
                     vllm:cache_config_info{{engine=\"1\",block_size=\"32\",num_gpu_blocks=\"100\"}} 1\n"
                ),
                cache_err(ExtractError::Inconsistent {
                    name: "vllm:cache_config_info".into(),
                    label: BLOCK_SIZE.into(),
                }),
            ),
        ];
        for (page, expected) in &cases {
            let samples = parse(page).unwrap_or_else(|e| panic!("{page:?}: {e}"));
            let got = extract(&samples, &names);
            // NaN never equals itself, so compare errors by their text.
            let text = |r: &Result<EngineMetrics, ExtractError>| r.as_ref().map_err(|e| e.to_string()).cloned();
            assert_eq!(text(&got), text(expected), "{page:?}");
        }
    }

    #[test]
    fn names_are_configurable() {
        let names = MetricNames {
            waiting: "sglang:num_queue_reqs".into(),
            running: "sglang:num_running_reqs".into(),
            kv_usage: "sglang:token_usage".into(),
            kv_usage_fallback: None,
            lora: String::new(),
            cache: String::new(),
            ..MetricNames::default()
        };
        let page = "sglang:num_queue_reqs 4\nsglang:num_running_reqs 5\nsglang:token_usage 0.75\n";
        let samples = parse(page).unwrap_or_else(|e| panic!("{e}"));
        let expected = EngineMetrics {
            waiting: 4.0,
            running: 5.0,
            kv_usage: 0.75,
            lora: None,
            cache: None,
            cache_error: None,
            custom: Vec::new(),
        };
        assert_eq!(extract(&samples, &names), Ok(expected));
        let samples = parse("sglang:num_queue_reqs 4\nsglang:num_running_reqs 5\n").unwrap_or_else(|e| panic!("{e}"));
        let missing = ExtractError::Missing { names: strings(&["sglang:token_usage"]) };
        assert_eq!(extract(&samples, &names), Err(missing));
    }

    /// `customMetrics`: each attribute is its metric's first matching series on the page;
    /// one missing or not a number is left out without failing the page.
    #[test]
    fn custom_metrics_become_attributes() {
        let custom = |key: &str, spec: &str| CustomMetric { key: key.into(), spec: spec.into() };
        let names = MetricNames {
            custom: vec![
                custom("gpu.temp", "DCGM_FI_DEV_GPU_TEMP{gpu=\"1\"}"),
                custom("tier", "node_tier"),
                custom("absent", "not_on_the_page"),
                custom("nan", "broken_gauge"),
            ],
            ..MetricNames::default()
        };
        assert_eq!(names.check(), Ok(()));
        let page = "vllm:num_requests_waiting 1\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\n\
                    DCGM_FI_DEV_GPU_TEMP{gpu=\"0\"} 40\nDCGM_FI_DEV_GPU_TEMP{gpu=\"1\"} 77\n\
                    node_tier{zone=\"a\"} -2\nnode_tier{zone=\"b\"} 5\nbroken_gauge NaN\n";
        let samples = parse(page).unwrap_or_else(|e| panic!("{e}"));
        let got = extract(&samples, &names).expect("the page reads");
        assert_eq!(got.custom, vec![("gpu.temp".into(), 77.0), ("tier".into(), -2.0)]);
        assert_eq!((got.waiting, got.running), (1.0, 2.0), "the engine's metrics as before");
        let twice = MetricNames { custom: vec![custom("a", "x"), custom("a", "y")], ..MetricNames::default() };
        assert_eq!(twice.check(), Err("customMetrics[1].attributeKey: `a` is given twice".into()));
        let bad = MetricNames { custom: vec![custom("a", "x{")], ..MetricNames::default() };
        assert!(bad.check().is_err_and(|e| e.starts_with("customMetrics[0].metricSpec: metric `x{`")));
    }

    /// Upstream's `name{label=value}` form reads only the matching series.
    #[test]
    fn names_with_label_selectors_read_only_matching_series() {
        let names = MetricNames {
            waiting: "vllm:num_requests_waiting{engine=\"0\"}".into(),
            running: "vllm:num_requests_running{engine=0, model_name=\"m\"}".into(),
            kv_usage: "vllm:kv_cache_usage_perc{engine=\"1\"}".into(),
            ..MetricNames::default()
        };
        assert_eq!(names.check(), Ok(()));
        let page = "vllm:num_requests_waiting{engine=\"0\"} 3\nvllm:num_requests_waiting{engine=\"1\"} 40\n\
                    vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 2\n\
                    vllm:num_requests_running{engine=\"0\",model_name=\"other\"} 9\n\
                    vllm:kv_cache_usage_perc{engine=\"0\"} 0.9\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.25\n";
        let samples = parse(page).unwrap_or_else(|e| panic!("{e}"));
        let got = extract(&samples, &names).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((got.waiting, got.running, got.kv_usage), (3.0, 2.0, 0.25));
        // No series with the label: missing, named as configured.
        let names = MetricNames { waiting: "vllm:num_requests_waiting{engine=\"7\"}".into(), ..MetricNames::default() };
        let missing = ExtractError::Missing { names: strings(&["vllm:num_requests_waiting{engine=\"7\"}"]) };
        assert_eq!(extract(&samples, &names), Err(missing));
        for bad in ["vllm:x{engine=\"0\"", "{engine=0}", "vllm:x{engine}", "vllm:x{=0}", "vllm:x}"] {
            let names = MetricNames { running: bad.into(), ..MetricNames::default() };
            let e = names.check().expect_err(bad);
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
    }

    /// Engines that lack a metric leave it empty: it is not read. SGLang states its cache
    /// configuration as two gauges; another engine may name the info metric's labels.
    #[test]
    fn empty_names_are_not_read_and_the_cache_may_come_from_gauges_or_other_labels() {
        // The built-in `sglang` engine: no LoRA, the cache as `page_size` and `num_pages`.
        let sglang = [(super::super::ENGINE_LABEL_KEY.to_string(), "sglang".to_string())].into();
        let (names, _) = super::super::Engines::builtin(MetricNames::default()).resolve(&sglang);
        let names = &*names;
        assert_eq!(names.check(), Ok(()));
        let page = "sglang:num_queue_reqs 1\nsglang:num_running_reqs 2\nsglang:token_usage 0.5\n\
                    sglang:page_size{tp_rank=\"0\"} 16\nsglang:page_size{tp_rank=\"1\"} 16\n\
                    sglang:num_pages{tp_rank=\"0\"} 900\nsglang:num_pages{tp_rank=\"1\"} 800\n";
        let got = extract(&parse(page).unwrap(), names).unwrap();
        assert_eq!(got.cache, Some(CacheInfo { block_size: 16, num_gpu_blocks: 800 }));
        // Older SGLang: the info metric's labels, read first.
        let older = format!("{page}sglang:cache_config_info{{page_size=\"32\",num_pages=\"100\"}} 1\n");
        let got = extract(&parse(&older).unwrap(), names).unwrap();
        assert_eq!(got.cache, Some(CacheInfo { block_size: 32, num_gpu_blocks: 100 }));
        assert_eq!((got.waiting, got.running, got.kv_usage, got.lora), (1.0, 2.0, 0.5, None));
        // Garbage or disagreeing gauges leave the cache out, with the reason; the load counts.
        for (bad, why) in [
            ("sglang:page_size 0\nsglang:num_pages 10\n", "`sglang:page_size` is 0"),
            ("sglang:page_size 16.5\nsglang:num_pages 10\n", "not a whole number"),
            ("sglang:page_size{r=\"0\"} 16\nsglang:page_size{r=\"1\"} 32\nsglang:num_pages 10\n", "disagree"),
            ("sglang:page_size 16\n", "no sample of `sglang:num_pages`"),
        ] {
            let page = format!("sglang:num_queue_reqs 1\nsglang:num_running_reqs 2\nsglang:token_usage 0.5\n{bad}");
            let got = extract(&parse(&page).unwrap(), names).unwrap();
            assert_eq!(got.cache, None, "{bad}");
            let error = got.cache_error.map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains(why), "{bad}: {error}");
        }
        // Only the two load gauges: no KV usage, no cache, no LoRA.
        let names = MetricNames {
            waiting: "nv_inference_pending_request_count".into(),
            running: "nv_inference_exec_count".into(),
            kv_usage: String::new(),
            kv_usage_fallback: None,
            lora: String::new(),
            cache: String::new(),
            ..MetricNames::default()
        };
        let page = "nv_inference_pending_request_count 3\nnv_inference_exec_count 4\n";
        let got = extract(&parse(page).unwrap(), &names).unwrap();
        assert_eq!((got.waiting, got.running, got.kv_usage, got.cache), (3.0, 4.0, 0.0, None));
        // The info metric's labels, renamed.
        let names = MetricNames {
            cache: "atom:cache_config_info".into(),
            cache_block_size_label: "page_size".into(),
            cache_num_blocks_label: "num_pages".into(),
            ..MetricNames::default()
        };
        let page = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0\n\
                    atom:cache_config_info{page_size=\"32\",num_pages=\"64\"} 1\n";
        let got = extract(&parse(page).unwrap(), &names).unwrap();
        assert_eq!(got.cache, Some(CacheInfo { block_size: 32, num_gpu_blocks: 64 }));
        // Gauges given alone, or a label that is no name, are refused at the start.
        let half = MetricNames { cache: String::new(), cache_block_size: "x".into(), ..MetricNames::default() };
        assert!(half.check().is_err());
        let label = MetricNames { cache_num_blocks_label: "a=b".into(), ..MetricNames::default() };
        assert!(label.check().unwrap_err().contains("`a=b`"));
    }
}
