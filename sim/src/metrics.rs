//! The `/metrics` page: a model snapshot rendered in the Prometheus text format (0.0.4) with
//! vLLM's metric names (or SGLang's), every sample labelled `model_name`.
//!
//! It owns names, help texts, label sets and escaping. It is pure: the snapshot and the
//! wall-clock time (the value of `vllm:lora_requests_info`) are passed in.

use std::fmt::Write;

use crate::config::MetricsNames;
use crate::model::{ModelParams, ModelStats};

/// What a page is rendered from.
#[derive(Debug, Clone)]
pub struct MetricsInput<'a> {
    pub names: MetricsNames,
    pub model_name: &'a str,
    pub params: &'a ModelParams,
    pub stats: &'a ModelStats,
    /// Unix time, seconds.
    pub now_unix: f64,
    /// More gauges (`name` or `name{labels}`, value), after the engine's.
    pub extra: &'a [(String, f64)],
}

/// Served when `/metrics` is in `garbage` mode: starts like a real page, then stops parsing.
pub const GARBAGE: &str = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
    vllm:num_requests_waiting{model_name=\"oops 17\n}}}} not prometheus at all \u{1F4A5}\n";

pub fn render(input: &MetricsInput<'_>) -> String {
    let s = input.stats;
    let c = &s.counters;
    let model = escape(input.model_name);
    let base = format!("model_name=\"{model}\"");
    let mut out = String::with_capacity(2048);
    let mut metric = |name: &str, kind: &str, help: &str, labels: &str, value: f64| {
        // Writing to a String cannot fail.
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}\n");
    };
    if input.names == MetricsNames::Sglang {
        // SGLang's gauges: no LoRA report; the KV-cache size as a page size and a page count.
        metric("sglang:num_running_reqs", "gauge", "The number of running requests.", &base, s.running as f64);
        metric(
            "sglang:num_queue_reqs",
            "gauge",
            "The number of requests in the waiting queue.",
            &base,
            s.waiting as f64,
        );
        metric("sglang:token_usage", "gauge", "The token usage.", &base, s.kv_usage);
        metric("sglang:page_size", "gauge", "Tokens per KV-cache page.", &base, input.params.block_size as f64);
        metric("sglang:num_pages", "gauge", "KV-cache pages.", &base, input.params.num_gpu_blocks as f64);
        push_extra(&mut out, input.extra);
        return out;
    }
    metric(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        &base,
        s.running as f64,
    );
    metric(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        &base,
        s.waiting as f64,
    );
    metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", &base, s.kv_usage);
    let lora_labels = format!(
        "{base},max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"",
        input.params.max_loras,
        escape(&s.running_loras.join(",")),
        escape(&s.waiting_loras.join(",")),
    );
    metric("vllm:lora_requests_info", "gauge", "Running stats on lora requests.", &lora_labels, input.now_unix);
    let cache_labels =
        format!("{base},block_size=\"{}\",num_gpu_blocks=\"{}\"", input.params.block_size, input.params.num_gpu_blocks);
    metric("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig.", &cache_labels, 1.0);
    metric(
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prefix cache queries, in terms of number of queried tokens.",
        &base,
        c.prefix_cache_queries as f64,
    );
    metric(
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prefix cache hits, in terms of number of cached tokens.",
        &base,
        c.prefix_cache_hits as f64,
    );
    metric(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
        &format!("{base},finished_reason=\"length\""),
        c.request_success as f64,
    );
    metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", &base, c.prompt_tokens as f64);
    metric(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        &base,
        c.generation_tokens as f64,
    );
    push_extra(&mut out, input.extra);
    out
}

/// Appends the extra gauges, each as written (`name` or `name{labels}`).
fn push_extra(out: &mut String, extra: &[(String, f64)]) {
    for (series, value) in extra {
        let name = series.split('{').next().unwrap_or(series);
        let _ = write!(out, "# HELP {name} An extra gauge.\n# TYPE {name} gauge\n{series} {value}\n");
    }
}

/// Escapes a label value (backslash, double quote, newline), as the text format requires.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for ch in value.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Counters;

    fn stats() -> ModelStats {
        ModelStats {
            waiting: 3,
            running: 2,
            kv_usage: 0.25,
            running_loras: vec!["a".into(), "b".into()],
            waiting_loras: vec![],
            counters: Counters {
                prefix_cache_queries: 100,
                prefix_cache_hits: 40,
                request_success: 7,
                prompt_tokens: 100,
                generation_tokens: 9,
            },
        }
    }

    /// The page of `stats()` with these names, model name, parameters and clock.
    fn page(names: MetricsNames, model_name: &str, params: &ModelParams, now_unix: f64) -> String {
        render(&MetricsInput { names, model_name, params, stats: &stats(), now_unix, extra: &[] })
    }

    #[test]
    fn renders_vllm_names_with_help_and_type() {
        let page = page(MetricsNames::Vllm, "m", &ModelParams::default(), 1700000000.5);
        let expected = [
            "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 2\n",
            "vllm:num_requests_waiting{model_name=\"m\"} 3\n",
            "vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n",
            "vllm:lora_requests_info{model_name=\"m\",max_lora=\"1\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"} 1700000000.5\n",
            "vllm:cache_config_info{model_name=\"m\",block_size=\"16\",num_gpu_blocks=\"2048\"} 1\n",
            "# TYPE vllm:prefix_cache_queries_total counter\nvllm:prefix_cache_queries_total{model_name=\"m\"} 100\n",
            "vllm:prefix_cache_hits_total{model_name=\"m\"} 40\n",
            "vllm:request_success_total{model_name=\"m\",finished_reason=\"length\"} 7\n",
        ];
        for line in expected {
            assert!(page.contains(line), "missing {line:?} in\n{page}");
        }
        let samples = page.lines().filter(|l| !l.starts_with('#')).count();
        let helps = page.lines().filter(|l| l.starts_with("# HELP ")).count();
        let types = page.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!((helps, types), (samples, samples), "every metric has HELP and TYPE");
    }

    #[test]
    fn label_values_are_escaped() {
        let page = page(MetricsNames::Vllm, "a\"b\\c\nd", &ModelParams::default(), 0.0);
        assert!(page.contains(r#"model_name="a\"b\\c\nd""#), "{page}");
    }

    /// With SGLang's names the page has SGLang's gauges only: what the EPP reads for an
    /// endpoint labelled `sglang`, and nothing vLLM's names would find.
    #[test]
    fn sglang_names_render_sglang_gauges_only() {
        let params = ModelParams { block_size: 16, num_gpu_blocks: 2048, ..ModelParams::default() };
        let page = page(MetricsNames::Sglang, "m", &params, 0.0);
        for line in [
            "sglang:num_running_reqs{model_name=\"m\"} 2\n",
            "sglang:num_queue_reqs{model_name=\"m\"} 3\n",
            "sglang:token_usage{model_name=\"m\"} 0.25\n",
            "sglang:page_size{model_name=\"m\"} 16\n",
            "sglang:num_pages{model_name=\"m\"} 2048\n",
        ] {
            assert!(page.contains(line), "{line:?} missing from:\n{page}");
        }
        assert!(!page.contains("vllm:"), "{page}");
    }

    #[test]
    fn extra_gauges_follow_the_engines() {
        let extra = [("gpu_temp".to_string(), 71.5), ("tier{level=\"gold\"}".to_string(), 1.0)];
        let input = MetricsInput {
            names: MetricsNames::Vllm,
            model_name: "m",
            params: &ModelParams::default(),
            stats: &stats(),
            now_unix: 0.0,
            extra: &extra,
        };
        let page = render(&input);
        assert!(page.ends_with("# TYPE tier gauge\ntier{level=\"gold\"} 1\n"), "{page}");
        assert!(page.contains("# TYPE gpu_temp gauge\ngpu_temp 71.5\n"), "{page}");
    }
}
