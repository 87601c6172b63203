//! One scheduling profile and its cycle: producers write columns, filters narrow the
//! candidates, scorers' clamped scores are weighted and summed, the picker chooses. Then the
//! plugins that asked for it learn the decision (`decided`).
//!
//! Column names are resolved when the profile is built: every column a plugin reads must
//! be built in or written by a producer that runs before it, and no two producers write
//! the same column; each plugin then gets exactly its columns, by slot, in every call.
//!
//! Invariant: whatever plugins return, a decision only ever names candidates that were
//! passed in, and a score never enters the sum unless it is finite (then clamped to [0,1]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmd_plugin_sdk::columns::{ATTRIBUTE_PREFIX, BUILT_IN};
use llmd_plugin_sdk::{Completion, EndpointInfo};
use tracing::{debug, warn};

use crate::columns::{Candidates, Table};
use crate::plugin::{
    CallInput, FailurePolicy, FilterPlugin, PickerPlugin, PluginCore, PluginError, PluginHandle, ProducerPlugin,
    ScorerPlugin,
};
use crate::request::Request;

/// A scorer weight: finite and non-negative (validated where configs are parsed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weight(f32);

impl Weight {
    pub const ONE: Weight = Weight(1.0);
    /// The largest weight accepted: far above any useful ratio, and small enough that the
    /// weighted sum of many scorers stays finite and keeps the small terms' precision.
    pub const MAX: f64 = 1_000_000.0;

    pub fn new(value: f64) -> Result<Weight, String> {
        if value.is_finite() && (0.0..=Self::MAX).contains(&value) {
            Ok(Weight(value as f32))
        } else {
            Err(format!("weight must be a number from 0 to {}, got {value}", Self::MAX))
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

/// Why a set of plugins does not form a profile.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ProfileError {
    #[error(
        "plugin `{plugin}` reads column `{column}`, which is not built in and no producer before it in profile `{profile}` writes (known: {known})"
    )]
    UnknownColumn { profile: String, plugin: String, column: String, known: String },
    #[error("column `{column}` is written by both `{first}` and `{second}` in profile `{profile}`")]
    WrittenTwice { profile: String, column: String, first: String, second: String },
    #[error("plugin `{plugin}` writes `{column}`, a column the host fills (built in or an endpoint attribute)")]
    WritesBuiltIn { plugin: String, column: String },
}

/// The outcome of a successful cycle.
#[derive(Clone, Debug, PartialEq)]
pub struct CycleResult {
    /// Endpoint ids, primary first, then fallbacks; never empty.
    pub targets: Vec<u32>,
    /// The candidates after filtering and every column over them.
    pub table: Table,
    /// Aligned with `table.ids()`.
    pub total_scores: Vec<f32>,
    /// How long each plugin call took, in call order.
    pub timings: Vec<PluginTiming>,
    /// Plugins that failed and were skipped (fail-open) in this cycle.
    pub failures: Vec<HookFailure>,
    /// Headers the plugins' `decided` hooks add to the client's response.
    pub response_headers: Vec<(String, String)>,
}

/// One plugin call's duration (for telemetry; the scheduler itself does not use it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PluginTiming {
    /// Index into `SchedulerProfile::plugins`.
    pub plugin: usize,
    pub elapsed: Duration,
}

/// A plugin call that failed without failing the request.
#[derive(Clone, Debug, PartialEq)]
pub struct HookFailure {
    /// Index into `SchedulerProfile::plugins`.
    pub plugin: usize,
    pub error: PluginError,
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

/// A plugin of a profile with its columns resolved to table slots.
struct Stage<P: ?Sized> {
    plugin: Arc<P>,
    /// Index into `plugins`.
    index: usize,
    reads: Vec<usize>,
    writes: Vec<usize>,
}

/// An ordered set of plugins forming one scheduling policy.
pub struct SchedulerProfile {
    pub name: String,
    producers: Vec<Stage<dyn ProducerPlugin>>,
    filters: Vec<Stage<dyn FilterPlugin>>,
    scorers: Vec<(Stage<dyn ScorerPlugin>, Weight)>,
    picker: Stage<dyn PickerPlugin>,
    /// Every plugin above, in profile order (producers, filters, scorers, picker).
    plugins: Vec<PluginHandle>,
    /// Slot → column name; the built-ins first.
    columns: Vec<String>,
    /// Slots of the endpoint attributes read (`attribute/<key>` columns), filled from
    /// `Candidates::attributes`, and their keys.
    attributes: Vec<(usize, String)>,
    /// Indices into `plugins` of those that asked for each hook.
    pool_hook: Vec<usize>,
    decided_hook: Vec<usize>,
    first_chunk_hook: Vec<usize>,
    finished_hook: Vec<usize>,
}

/// Resolves column names to slots while a profile is being built.
struct Columns<'a> {
    profile: &'a str,
    names: Vec<String>,
    writers: Vec<String>,
    /// The endpoint-attribute slots given so far, with their keys.
    attributes: Vec<(usize, String)>,
}

impl Columns<'_> {
    /// The slots of the columns `plugin` reads. An endpoint attribute (`attribute/<key>`)
    /// gets a slot on its first reader: the host fills it from the scraped attributes (NaN
    /// for an endpoint without it), so no producer writes it.
    fn reads(&mut self, plugin: &dyn PluginCore) -> Result<Vec<usize>, ProfileError> {
        let mut slots = Vec::new();
        for column in &plugin.manifest().reads {
            if let Some(k) = self.names.iter().position(|n| n == column) {
                slots.push(k);
            } else if let Some(key) = column.strip_prefix(ATTRIBUTE_PREFIX).filter(|k| !k.is_empty()) {
                slots.push(self.names.len());
                self.attributes.push((self.names.len(), key.to_string()));
                self.names.push(column.clone());
                self.writers.push("(endpoint attribute)".into());
            } else {
                return Err(ProfileError::UnknownColumn {
                    profile: self.profile.to_string(),
                    plugin: plugin.name().to_string(),
                    column: column.clone(),
                    known: self.names.join(", "),
                });
            }
        }
        Ok(slots)
    }

    fn writes(&mut self, plugin: &dyn PluginCore) -> Result<Vec<usize>, ProfileError> {
        let mut slots = Vec::new();
        for column in &plugin.manifest().writes {
            if BUILT_IN.contains(&column.as_str()) || column.starts_with(ATTRIBUTE_PREFIX) {
                return Err(ProfileError::WritesBuiltIn { plugin: plugin.name().into(), column: column.clone() });
            }
            if let Some(k) = self.names.iter().position(|n| n == column) {
                return Err(ProfileError::WrittenTwice {
                    profile: self.profile.to_string(),
                    column: column.clone(),
                    first: self.writers[k].clone(),
                    second: plugin.name().to_string(),
                });
            }
            slots.push(self.names.len());
            self.names.push(column.clone());
            self.writers.push(plugin.name().to_string());
        }
        Ok(slots)
    }
}

/// Producers reordered so that each runs after those whose columns it reads (upstream
/// orders its data producers the same way); otherwise in the order given. A producer whose
/// reads no one can satisfy keeps its place, and `new` names the missing column.
fn dependency_order(mut pending: Vec<Arc<dyn ProducerPlugin>>) -> Vec<Arc<dyn ProducerPlugin>> {
    let mut known: Vec<String> = BUILT_IN.iter().map(|s| s.to_string()).collect();
    let mut ordered = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let ready = pending.iter().position(|p| p.manifest().reads.iter().all(|c| known.contains(c))).unwrap_or(0);
        let p = pending.remove(ready);
        known.extend(p.manifest().writes.iter().cloned());
        ordered.push(p);
    }
    ordered
}

impl SchedulerProfile {
    /// Builds a profile, resolving every plugin's columns (see the module documentation).
    pub fn new(
        name: impl Into<String>,
        producers: Vec<Arc<dyn ProducerPlugin>>,
        filters: Vec<Arc<dyn FilterPlugin>>,
        scorers: Vec<WeightedScorer>,
        picker: Arc<dyn PickerPlugin>,
    ) -> Result<Self, ProfileError> {
        let name = name.into();
        let mut cols = Columns {
            profile: &name,
            names: BUILT_IN.iter().map(|s| s.to_string()).collect(),
            writers: BUILT_IN.iter().map(|_| "(built in)".to_string()).collect(),
            attributes: Vec::new(),
        };
        let mut plugins = Vec::new();
        let mut produced = Vec::new();
        for p in dependency_order(producers) {
            let reads = cols.reads(p.as_ref())?;
            let writes = cols.writes(p.as_ref())?;
            plugins.push(PluginHandle::Producer(p.clone()));
            produced.push(Stage { plugin: p, index: plugins.len() - 1, reads, writes });
        }
        let mut filtering = Vec::new();
        for f in filters {
            let reads = cols.reads(f.as_ref())?;
            plugins.push(PluginHandle::Filter(f.clone()));
            filtering.push(Stage { plugin: f, index: plugins.len() - 1, reads, writes: Vec::new() });
        }
        let mut scoring = Vec::new();
        for ws in scorers {
            let reads = cols.reads(ws.scorer.as_ref())?;
            plugins.push(PluginHandle::Scorer(ws.scorer.clone()));
            scoring.push((Stage { plugin: ws.scorer, index: plugins.len() - 1, reads, writes: Vec::new() }, ws.weight));
        }
        let reads = cols.reads(picker.as_ref())?;
        plugins.push(PluginHandle::Picker(picker.clone()));
        let picking = Stage { plugin: picker, index: plugins.len() - 1, reads, writes: Vec::new() };
        let hook = |wants: fn(&llmd_plugin_sdk::Needs) -> bool| -> Vec<usize> {
            (0..plugins.len()).filter(|&i| wants(&plugins[i].core().manifest().needs)).collect()
        };
        let (pool_hook, decided_hook, first_chunk_hook, finished_hook) =
            (hook(|n| n.pool), hook(|n| n.decided), hook(|n| n.first_chunk), hook(|n| n.finished));
        let (columns, attributes) = (cols.names, cols.attributes);
        Ok(SchedulerProfile {
            name,
            producers: produced,
            filters: filtering,
            scorers: scoring,
            picker: picking,
            plugins,
            columns,
            attributes,
            pool_hook,
            decided_hook,
            first_chunk_hook,
            finished_hook,
        })
    }

    /// Every plugin, in profile order; `PluginTiming::plugin` and `HookFailure::plugin`
    /// index into it.
    pub fn plugins(&self) -> &[PluginHandle] {
        &self.plugins
    }

    /// The weights of the scorers, in profile order.
    pub fn weights(&self) -> Vec<f32> {
        self.scorers.iter().map(|(_, w)| w.get()).collect()
    }

    /// The table slot of column `name`, if the profile has it.
    pub fn column_slot(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    /// Tells the plugins that asked for it that the pool changed. Failed calls are
    /// returned (and logged); a plugin that cannot take the new pool will fail its calls
    /// and be handled by its policy.
    pub fn pool_changed(&self, generation: u64, endpoints: &[EndpointInfo]) -> Vec<HookFailure> {
        self.fan_out(&self.pool_hook, "pool-changed", |p| p.pool_changed(generation, endpoints))
    }

    /// The cycle's request went to `endpoint`; returns the headers the plugins add to the
    /// response, and the hooks that failed.
    pub fn decided(&self, cycle: u64, endpoint: u32) -> (Vec<(String, String)>, Vec<HookFailure>) {
        let mut headers = Vec::new();
        let failures = self.fan_out(&self.decided_hook, "decided", |p| {
            headers.extend(p.decided(cycle, endpoint)?);
            Ok(())
        });
        (headers, failures)
    }

    /// The first response bytes of the cycle's request arrived at `now_ms`.
    pub fn first_chunk(&self, cycle: u64, endpoint: u32, now_ms: u64) -> Vec<HookFailure> {
        self.fan_out(&self.first_chunk_hook, "first-chunk", |p| p.first_chunk(cycle, endpoint, now_ms))
    }

    /// The cycle's request ended.
    pub fn finished(&self, cycle: u64, completion: &Completion) -> Vec<HookFailure> {
        self.fan_out(&self.finished_hook, "finished", |p| p.finished(cycle, completion))
    }

    /// Whether any plugin wants `first-chunk` (the host can skip watching for it).
    pub fn wants_first_chunk(&self) -> bool {
        !self.first_chunk_hook.is_empty()
    }

    fn fan_out(
        &self,
        which: &[usize],
        hook: &str,
        mut call: impl FnMut(&dyn PluginCore) -> Result<(), PluginError>,
    ) -> Vec<HookFailure> {
        let mut failures = Vec::new();
        for &i in which {
            let plugin = self.plugins[i].core();
            if let Err(error) = call(plugin) {
                warn!(plugin = plugin.name(), hook, %error, "plugin hook failed");
                failures.push(HookFailure { plugin: i, error });
            }
        }
        failures
    }

    /// Runs one cycle over `candidates` and, on success, tells the plugins that asked
    /// where the request goes.
    pub fn schedule(&self, cycle: u64, req: &Request, candidates: &Candidates) -> Result<CycleResult, ScheduleError> {
        let mut result = self.cycle(cycle, req, candidates)?;
        if let Some(&primary) = result.targets.first() {
            let (headers, failures) = self.decided(cycle, primary);
            result.response_headers = headers;
            result.failures.extend(failures);
        }
        Ok(result)
    }

    /// A shadow cycle: decides without acting, then tells the plugins where the request
    /// really went (`actual`, chosen by another profile), so their state follows reality.
    pub fn schedule_shadow(
        &self,
        cycle: u64,
        req: &Request,
        candidates: &Candidates,
        actual: u32,
    ) -> Result<CycleResult, ScheduleError> {
        let result = self.cycle(cycle, req, candidates);
        self.decided(cycle, actual);
        result
    }

    /// Producers → filters → scorers → picker, without hooks.
    fn cycle(&self, cycle: u64, req: &Request, candidates: &Candidates) -> Result<CycleResult, ScheduleError> {
        if candidates.is_empty() {
            return Err(ScheduleError::NoCandidates);
        }
        let mut table = Table::new(candidates, self.columns.len());
        for (slot, key) in &self.attributes {
            if let Some(values) = candidates.attribute(key) {
                table.set(*slot, values);
            }
        }
        let mut run = Run::default();
        let mut buf = Vec::new();

        for stage in &self.producers {
            table.gather(&stage.reads, &mut buf);
            let input = CallInput { cycle, request: req, ids: table.ids(), columns: &buf };
            let produced = run.timed(stage.index, || stage.plugin.produce(&input));
            let n = table.len();
            match produced {
                Ok(values) if values.len() == n * stage.writes.len() => {
                    for (k, &slot) in stage.writes.iter().enumerate() {
                        table.set(slot, &values[k * n..(k + 1) * n]);
                    }
                }
                Ok(values) => {
                    let e = PluginError::InvalidOutput(format!(
                        "{} values for {} columns of {n} candidates",
                        values.len(),
                        stage.writes.len()
                    ));
                    run.on_failure(stage.plugin.as_ref(), stage.index, e)?;
                }
                Err(e) => run.on_failure(stage.plugin.as_ref(), stage.index, e)?,
            }
        }

        for stage in &self.filters {
            table.gather(&stage.reads, &mut buf);
            let input = CallInput { cycle, request: req, ids: table.ids(), columns: &buf };
            let kept = match run.timed(stage.index, || stage.plugin.filter(&input)) {
                Ok(kept) => kept,
                Err(e) => {
                    run.on_failure(stage.plugin.as_ref(), stage.index, e)?;
                    continue;
                }
            };
            let positions = table.positions_of(&kept);
            if positions.is_empty() {
                return Err(ScheduleError::AllFiltered { filter: stage.plugin.name().to_string() });
            }
            if positions.len() != table.len() {
                table.retain(&positions);
            }
        }

        let n = table.len();
        // One candidate left: the pick is settled. A scorer or picker that keeps no state
        // (manifest `stateless`) could only confirm it, so it is not called; a stateful one
        // still is, since what it sees may feed its state.
        let settled = n == 1;
        let mut total = vec![0.0f32; n];
        for (stage, weight) in &self.scorers {
            if settled && stage.plugin.manifest().stateless {
                continue;
            }
            table.gather(&stage.reads, &mut buf);
            let input = CallInput { cycle, request: req, ids: table.ids(), columns: &buf };
            let scores = match run.timed(stage.index, || stage.plugin.score(&input)) {
                Ok(s) if s.len() == n => s,
                Ok(s) => {
                    let e = PluginError::InvalidOutput(format!("{} scores for {n} candidates", s.len()));
                    run.on_failure(stage.plugin.as_ref(), stage.index, e)?;
                    continue;
                }
                Err(e) => {
                    run.on_failure(stage.plugin.as_ref(), stage.index, e)?;
                    continue;
                }
            };
            for (t, s) in total.iter_mut().zip(&scores) {
                // Invariant: only finite scores, clamped to [0,1], enter the sum.
                let s = if s.is_finite() { s.clamp(0.0, 1.0) } else { 0.0 };
                *t += s * weight.get();
            }
            debug!(request_id = %req.id, scorer = stage.plugin.name(), ?scores, "scored");
        }

        let picker = &self.picker;
        let picked = if settled && picker.plugin.manifest().stateless {
            table.ids().to_vec()
        } else {
            table.gather(&picker.reads, &mut buf);
            let input = CallInput { cycle, request: req, ids: table.ids(), columns: &buf };
            run.timed(picker.index, || picker.plugin.pick(&input, &total))
                .map_err(|error| ScheduleError::PluginFailed { plugin: picker.plugin.name().to_string(), error })?
        };
        let mut targets: Vec<u32> = Vec::with_capacity(picked.len().min(n));
        for id in picked {
            if table.ids().contains(&id) && !targets.contains(&id) {
                targets.push(id);
            }
        }
        if targets.is_empty() {
            return Err(ScheduleError::PluginFailed {
                plugin: picker.plugin.name().to_string(),
                error: PluginError::InvalidOutput("picked no candidate endpoint".into()),
            });
        }
        Ok(CycleResult {
            targets,
            table,
            total_scores: total,
            timings: run.timings,
            failures: run.failures,
            response_headers: Vec::new(),
        })
    }
}

/// What one cycle records about its plugin calls.
#[derive(Default)]
struct Run {
    timings: Vec<PluginTiming>,
    failures: Vec<HookFailure>,
}

impl Run {
    fn timed<R>(&mut self, plugin: usize, call: impl FnOnce() -> R) -> R {
        let started = Instant::now();
        let r = call();
        self.timings.push(PluginTiming { plugin, elapsed: started.elapsed() });
        r
    }

    /// Applies a plugin's failure policy: fail-open records and continues, fail-closed aborts.
    fn on_failure(&mut self, plugin: &dyn PluginCore, index: usize, error: PluginError) -> Result<(), ScheduleError> {
        match plugin.failure_policy() {
            FailurePolicy::FailOpen => {
                warn!(plugin = plugin.name(), %error, "plugin failed; skipping it for this request (fail-open)");
                self.failures.push(HookFailure { plugin: index, error });
                Ok(())
            }
            FailurePolicy::FailClosed => Err(ScheduleError::PluginFailed { plugin: plugin.name().to_string(), error }),
        }
    }
}
