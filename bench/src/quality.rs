//! Part 3, routing quality on the live stack: simulated workers that model prefill cost in
//! real time (time_scale 1, a small KV cache each) serve a shared-prefix workload — a few
//! long system prompts, many users, each user bound to one system prompt — routed three
//! ways: the EPP's optimized baseline, the EPP with a random picker only, and Envoy
//! round-robin without the EPP. It reports the prefix-cache hit rate the workers saw
//! (cached_tokens / prompt_tokens of their replies) and the time to the first SSE chunk.
//!
//! Every policy gets fresh workers and a fresh EPP, so no policy inherits a warm cache, and
//! the same request sequence (request k is the same body for every policy).

use std::sync::Arc;
use std::time::Duration;

use crate::load::{self, LoadResult, Shape, Target};
use crate::stack::{Envoy, Epp, Scratch, Setup, StackError, Workers};
use crate::workload::SharedPrefix;

#[derive(Clone, Debug)]
pub struct QualityOptions {
    pub workers: usize,
    pub system_prompts: usize,
    pub system_bytes: usize,
    pub users: usize,
    pub user_bytes: usize,
    pub max_tokens: u32,
    pub clients: usize,
    pub requests: u64,
    /// The first requests fill the caches and are not recorded.
    pub warmup: u64,
    /// KV blocks per worker: small enough that one worker cannot hold every system prompt,
    /// large enough that the pool can (where routing makes the difference).
    pub gpu_blocks: usize,
}

impl QualityOptions {
    pub fn full() -> QualityOptions {
        QualityOptions {
            workers: 4,
            system_prompts: 8,
            system_bytes: 4096,
            users: 200,
            user_bytes: 256,
            max_tokens: 4,
            clients: 8,
            requests: 700,
            warmup: 100,
            gpu_blocks: 192,
        }
    }

    pub fn smoke() -> QualityOptions {
        QualityOptions { requests: 40, warmup: 8, ..QualityOptions::full() }
    }
}

/// The routing policies compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The EPP with the default config.
    Baseline,
    /// The default config with the prefix index sized to the workers' KV cache
    /// (`lruCapacityPerServer` = their block count), as a deployment would tune it.
    BaselineSized,
    /// The EPP with a random picker and nothing else.
    Random,
    /// Envoy round-robin, no EPP.
    RoundRobin,
}

impl Policy {
    pub const ALL: [Policy; 4] = [Policy::Baseline, Policy::BaselineSized, Policy::Random, Policy::RoundRobin];

    pub fn label(self) -> &'static str {
        match self {
            Policy::Baseline => "EPP optimized baseline",
            Policy::BaselineSized => "EPP optimized baseline, index sized to the workers' cache",
            Policy::Random => "EPP random-picker",
            Policy::RoundRobin => "Envoy round-robin (no EPP)",
        }
    }
}

/// The default config reading `endpoints`; with `lru_blocks`, the prefix index keeps at
/// most that many blocks per endpoint (the implicit producer takes the prefix-cache-scorer's
/// parameters).
pub fn baseline_config(endpoints: &std::path::Path, lru_blocks: Option<usize>) -> String {
    let text = epp::config::DEFAULT_CONFIG.replace("path: endpoints.yaml", &format!("path: {}", endpoints.display()));
    match lru_blocks {
        None => text,
        Some(n) => text.replace(
            "  - type: prefix-cache-scorer\n",
            &format!("  - type: prefix-cache-scorer\n    parameters: {{lruCapacityPerServer: {n}}}\n"),
        ),
    }
}

/// An EPP config with only a random picker, its endpoints file at `endpoints`.
pub fn random_config(endpoints: &std::path::Path) -> String {
    format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - name: file-discovery
    type: file-discovery
    parameters: {{path: {}, watchFile: true}}
  - type: random-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: random-picker
",
        endpoints.display()
    )
}

#[derive(Clone)]
pub struct PolicyRun {
    pub policy: Policy,
    pub load: LoadResult,
}

#[derive(Clone)]
pub struct QualityResults {
    pub options: QualityOptions,
    pub runs: Vec<PolicyRun>,
}

pub async fn run(
    opts: &QualityOptions,
    setup: &Setup,
    progress: &mut dyn FnMut(String),
) -> Result<QualityResults, StackError> {
    let workload = Arc::new(SharedPrefix::new(
        opts.system_prompts,
        opts.system_bytes,
        opts.users,
        opts.user_bytes,
        opts.max_tokens,
    ));
    let mut runs = Vec::new();
    for policy in Policy::ALL {
        let load = run_policy(opts, policy, &workload, setup).await?;
        if load.ok == 0 {
            return Err(StackError::Setup(format!(
                "{}: no request succeeded: {}",
                policy.label(),
                load.first_error.unwrap_or_default()
            )));
        }
        progress(format!(
            "quality: {}: prefix hits {:.1} %, TTFT p50 {} p99 {}, {} errors",
            policy.label(),
            100.0 * load.prefix_hit_rate(),
            crate::latency::fmt_duration(load.ttft.summary().p50),
            crate::latency::fmt_duration(load.ttft.summary().p99),
            load.errors
        ));
        runs.push(PolicyRun { policy, load });
    }
    Ok(QualityResults { options: opts.clone(), runs })
}

async fn run_policy(
    opts: &QualityOptions,
    policy: Policy,
    workload: &Arc<SharedPrefix>,
    setup: &Setup,
) -> Result<LoadResult, StackError> {
    let scratch = Scratch::new("quality")?;
    let model = sim::ModelParams { num_gpu_blocks: opts.gpu_blocks, ..Default::default() };
    let base = sim::SimConfig { time_scale: 1.0, model, ..Default::default() };
    let workers = Workers::spawn(opts.workers, &base).await?;
    let endpoints = scratch.write("endpoints.yaml", &workers.endpoints_yaml())?;
    // The EPP (when used) must outlive the load: keep its handle in scope.
    let (_epp, envoy) = match policy {
        Policy::RoundRobin => (None, Envoy::round_robin(setup, &scratch, &workers).await?),
        Policy::Baseline | Policy::BaselineSized | Policy::Random => {
            let config = match policy {
                Policy::Baseline => baseline_config(&endpoints, None),
                Policy::BaselineSized => baseline_config(&endpoints, Some(opts.gpu_blocks)),
                _ => random_config(&endpoints),
            };
            let epp = Epp::start(setup, &scratch, &config).await?;
            let envoy = Envoy::ext_proc(setup, &scratch, epp.grpc_port).await?;
            (Some(epp), envoy)
        }
    };
    // Envoy's readiness probe went to some worker; let its engine finish before the clock starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = {
        let w = workload.clone();
        Arc::new(move |k| w.body(k)) as load::BodyFn
    };
    let target = Target {
        client: load::client(opts.clients),
        url: envoy.url("/v1/chat/completions"),
        body,
        stream: true,
        record_from: opts.warmup,
    };
    Ok(load::run(&target, Shape::Requests { clients: opts.clients, total: opts.requests }).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sized_baseline_hands_its_lru_capacity_to_the_prefix_producer() {
        let text = baseline_config(std::path::Path::new("/tmp/e.yaml"), Some(192));
        let config = epp::config::PickerConfig::parse(&text, None).expect("sized baseline parses");
        let producer = config
            .plugins
            .iter()
            .find(|p| p.type_name == "approx-prefix-cache-producer")
            .expect("the implicit prefix producer");
        assert_eq!(producer.parameters["lruCapacityPerServer"], 192, "{:?}", producer.parameters);
        assert_eq!(baseline_config(std::path::Path::new("/tmp/e.yaml"), None).matches("lruCapacity").count(), 0);
    }

    #[test]
    fn the_random_config_is_a_valid_config_with_only_a_random_picker() {
        let config = epp::config::PickerConfig::parse(&random_config(std::path::Path::new("/tmp/e.yaml")), None)
            .expect("random config parses");
        let refs: Vec<&str> = config.profile().plugins.iter().map(|e| e.plugin_ref.as_str()).collect();
        assert_eq!(refs, ["random-picker"]);
    }
}
