//! One scheduling cycle: producers add columns, filters narrow the candidates, scorers'
//! clamped scores are weighted and summed, the picker chooses. Then every plugin's
//! `pre-request` hook learns the decision.
//!
//! Invariant: whatever plugins return, a decision only ever names candidates that were
//! passed in, and a score never enters the sum unless it is finite (then clamped to [0,1]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmd_plugin_sdk::{Column, EndpointInfo, Metrics, Request, Usage};
use tracing::{debug, warn};

use super::plugin::{
    FailurePolicy, FilterPlugin, PickerPlugin, PluginCore, PluginError, PluginHandle, ProducerPlugin, Role,
    ScorerPlugin,
};

/// A scorer weight: finite and non-negative (validated where configs are parsed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weight(f32);

impl Weight {
    pub const ONE: Weight = Weight(1.0);

    pub fn new(value: f64) -> Result<Weight, String> {
        if value.is_finite() && value >= 0.0 && value <= f32::MAX as f64 {
            Ok(Weight(value as f32))
        } else {
            Err(format!("weight must be a finite number ≥ 0, got {value}"))
        }
    }

    pub fn get(self) -> f32 {
        self.0
    }
}

#[derive(Clone)]
pub struct WeightedScorer {
    pub scorer: Arc<dyn ScorerPlugin>,
    pub weight: Weight,
}

/// The outcome of a successful cycle.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Endpoint ids, primary first, then fallbacks; never empty.
    pub targets: Vec<u32>,
    /// Candidate ids after filtering, aligned with `total_scores` and `columns`.
    pub candidates: Vec<u32>,
    pub total_scores: Vec<f32>,
    /// The producers' columns over the final candidates.
    pub columns: Vec<Column>,
    /// How long each plugin call took, in call order.
    pub timings: Vec<PluginTiming>,
    /// Plugins that failed and were skipped (fail-open) in this cycle.
    pub failures: Vec<(String, PluginError)>,
}

/// One plugin call's duration (for telemetry; the scheduler itself does not use it).
#[derive(Clone, Debug, PartialEq)]
pub struct PluginTiming {
    pub role: Role,
    pub plugin: String,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("no candidate endpoints")]
    NoCandidates,
    #[error("filter {filter} removed every candidate")]
    AllFiltered { filter: String },
    #[error("plugin {plugin} failed: {error}")]
    PluginFailed { plugin: String, error: PluginError },
}

/// An ordered set of plugins forming one scheduling policy.
#[derive(Clone)]
pub struct SchedulerProfile {
    pub name: String,
    pub producers: Vec<Arc<dyn ProducerPlugin>>,
    pub filters: Vec<Arc<dyn FilterPlugin>>,
    pub scorers: Vec<WeightedScorer>,
    pub picker: Arc<dyn PickerPlugin>,
    /// Every distinct plugin above, for pool and life-cycle hooks.
    plugins: Vec<PluginHandle>,
}

impl SchedulerProfile {
    pub fn new(
        name: impl Into<String>,
        producers: Vec<Arc<dyn ProducerPlugin>>,
        filters: Vec<Arc<dyn FilterPlugin>>,
        scorers: Vec<WeightedScorer>,
        picker: Arc<dyn PickerPlugin>,
    ) -> Self {
        let mut plugins: Vec<PluginHandle> = Vec::new();
        let mut add = |h: PluginHandle| {
            if !plugins.iter().any(|p| p.core().name() == h.core().name()) {
                plugins.push(h);
            }
        };
        producers.iter().for_each(|p| add(PluginHandle::Producer(p.clone())));
        filters.iter().for_each(|p| add(PluginHandle::Filter(p.clone())));
        scorers.iter().for_each(|s| add(PluginHandle::Scorer(s.scorer.clone())));
        add(PluginHandle::Picker(picker.clone()));
        SchedulerProfile { name: name.into(), producers, filters, scorers, picker, plugins }
    }

    pub fn plugins(&self) -> &[PluginHandle] {
        &self.plugins
    }

    /// Tells every plugin the pool changed. Failures are logged; a plugin that cannot
    /// take the new pool will fail its calls and be handled by its policy.
    pub fn pool_changed(&self, generation: u64, endpoints: &[EndpointInfo]) {
        for p in &self.plugins {
            if let Err(e) = p.core().pool_changed(generation, endpoints) {
                warn!(plugin = p.core().name(), error = %e, "pool-changed hook failed");
            }
        }
    }

    /// Tells every plugin a response completed.
    pub fn response_complete(&self, request_id: &str, endpoint: u32, usage: Usage) {
        for p in &self.plugins {
            if let Err(e) = p.core().response_complete(request_id, endpoint, usage) {
                warn!(plugin = p.core().name(), error = %e, "response-complete hook failed");
            }
        }
    }

    /// Runs one cycle over `candidates` and, on success, the `pre-request` hooks.
    pub fn schedule(&self, req: &Request, candidates: &Metrics) -> Result<Decision, ScheduleError> {
        let decision = self.cycle(req, candidates)?;
        self.pre_request(&req.id, &decision.targets);
        Ok(decision)
    }

    /// A shadow cycle: decides without acting, then tells the plugins where the request
    /// really went (`actual`, chosen by another profile), so their state follows reality.
    pub fn schedule_shadow(
        &self,
        req: &Request,
        candidates: &Metrics,
        actual: &[u32],
    ) -> Result<Decision, ScheduleError> {
        let decision = self.cycle(req, candidates);
        self.pre_request(&req.id, actual);
        decision
    }

    fn pre_request(&self, request_id: &str, targets: &[u32]) {
        for p in &self.plugins {
            if let Err(e) = p.core().pre_request(request_id, targets) {
                warn!(plugin = p.core().name(), error = %e, "pre-request hook failed");
            }
        }
    }

    /// Producers → filters → scorers → picker, without hooks.
    fn cycle(&self, req: &Request, candidates: &Metrics) -> Result<Decision, ScheduleError> {
        if candidates.is_empty() {
            return Err(ScheduleError::NoCandidates);
        }
        let mut metrics = candidates.clone();
        let mut columns: Vec<Column> = Vec::new();
        let mut cycle = Cycle::default();

        for producer in &self.producers {
            match cycle.timed(Role::Producer, producer.name(), || producer.produce(req, &metrics)) {
                Ok(produced) => {
                    for col in produced {
                        if col.values.len() == metrics.len() {
                            columns.push(col);
                        } else {
                            let e = PluginError::InvalidOutput(format!(
                                "column {} has {} values for {} candidates",
                                col.name,
                                col.values.len(),
                                metrics.len()
                            ));
                            cycle.on_failure(producer.as_ref(), e)?;
                        }
                    }
                }
                Err(e) => cycle.on_failure(producer.as_ref(), e)?,
            }
        }

        for filter in &self.filters {
            let kept = match cycle.timed(Role::Filter, filter.name(), || filter.filter(req, &metrics, &columns)) {
                Ok(kept) => kept,
                Err(e) => {
                    cycle.on_failure(filter.as_ref(), e)?;
                    continue;
                }
            };
            let positions: Vec<usize> = (0..metrics.len()).filter(|&i| kept.contains(&metrics.ids[i])).collect();
            if positions.is_empty() {
                return Err(ScheduleError::AllFiltered { filter: filter.name().to_string() });
            }
            if positions.len() != metrics.len() {
                metrics = metrics.select(&positions);
                columns = columns.iter().map(|c| c.select(&positions)).collect();
            }
        }

        let n = metrics.len();
        let mut total = vec![0.0f32; n];
        for ws in &self.scorers {
            let scores = match cycle.timed(Role::Scorer, ws.scorer.name(), || ws.scorer.score(req, &metrics, &columns))
            {
                Ok(s) if s.len() == n => s,
                Ok(s) => {
                    let e = PluginError::InvalidOutput(format!("{} scores for {n} candidates", s.len()));
                    cycle.on_failure(ws.scorer.as_ref(), e)?;
                    continue;
                }
                Err(e) => {
                    cycle.on_failure(ws.scorer.as_ref(), e)?;
                    continue;
                }
            };
            for (t, s) in total.iter_mut().zip(&scores) {
                // Invariant: only finite scores, clamped to [0,1], enter the sum.
                let s = if s.is_finite() { s.clamp(0.0, 1.0) } else { 0.0 };
                *t += s * ws.weight.get();
            }
            debug!(request_id = %req.id, scorer = ws.scorer.name(), ?scores, "scored");
        }

        let picked = cycle
            .timed(Role::Picker, self.picker.name(), || self.picker.pick(req, &metrics, &total))
            .map_err(|error| ScheduleError::PluginFailed { plugin: self.picker.name().to_string(), error })?;
        let mut targets: Vec<u32> = Vec::with_capacity(picked.len());
        for id in picked {
            if metrics.ids.contains(&id) && !targets.contains(&id) {
                targets.push(id);
            }
        }
        if targets.is_empty() {
            return Err(ScheduleError::PluginFailed {
                plugin: self.picker.name().to_string(),
                error: PluginError::InvalidOutput("picked no candidate endpoint".into()),
            });
        }
        Ok(Decision {
            targets,
            candidates: metrics.ids,
            total_scores: total,
            columns,
            timings: cycle.timings,
            failures: cycle.failures,
        })
    }
}

/// What one cycle records about its plugin calls.
#[derive(Default)]
struct Cycle {
    timings: Vec<PluginTiming>,
    failures: Vec<(String, PluginError)>,
}

impl Cycle {
    fn timed<R>(&mut self, role: Role, plugin: &str, call: impl FnOnce() -> R) -> R {
        let started = Instant::now();
        let r = call();
        self.timings.push(PluginTiming { role, plugin: plugin.to_string(), elapsed: started.elapsed() });
        r
    }

    /// Applies a plugin's failure policy: fail-open records and continues, fail-closed aborts.
    fn on_failure(&mut self, plugin: &dyn PluginCore, error: PluginError) -> Result<(), ScheduleError> {
        match plugin.failure_policy() {
            FailurePolicy::FailOpen => {
                warn!(plugin = plugin.name(), %error, "plugin failed; skipping it for this request (fail-open)");
                self.failures.push((plugin.name().to_string(), error));
                Ok(())
            }
            FailurePolicy::FailClosed => Err(ScheduleError::PluginFailed { plugin: plugin.name().to_string(), error }),
        }
    }
}
