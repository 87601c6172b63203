//! What a config runs — one profile, or the variants of an A/B experiment — with its
//! admission thresholds, and `decide`, the one decision the server, `epp replay` and the
//! benchmarks share: admission, variant choice, the variant's cycle.

use llmd_plugin_sdk::{Completion, EndpointInfo};

use crate::admission::SaturationConfig;
use crate::columns::Candidates;
use crate::experiment::ExperimentSpec;
use crate::profile::{CycleResult, HookFailure, ScheduleError, SchedulerProfile};
use crate::request::Request;

pub struct Variant {
    pub name: String,
    pub profile: SchedulerProfile,
    pub shadow: bool,
}

/// How requests are admitted before scheduling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Admission {
    /// Upstream's legacy admission: sheddable requests (priority < 0) get 429 while the pool
    /// is saturated; every other request is scheduled.
    #[default]
    ShedSheddable,
    /// Saturation is handled before `decide` (flow control queues instead of shedding).
    External,
}

/// What the router runs. Invariant: `variants` is not empty and, without an experiment,
/// holds exactly the primary profile.
pub struct Scheduler {
    pub variants: Vec<Variant>,
    pub experiment: Option<ExperimentSpec>,
    pub saturation: SaturationConfig,
    pub admission: Admission,
}

/// Why a request is not scheduled.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DecideError {
    #[error("no endpoints available in the pool")]
    NoEndpoints,
    #[error("the pool is saturated; sheddable request rejected")]
    Saturated,
    #[error("{error}")]
    Schedule { variant: usize, error: ScheduleError },
}

/// A scheduled request.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Index of the routing variant in `Scheduler::variants`.
    pub variant: usize,
    pub result: CycleResult,
    /// The shadow variants that see this request (run them with `run_shadow`, off the
    /// request path).
    pub shadows: Vec<usize>,
    /// The candidates after admission, what the shadows start from.
    pub admitted: Candidates,
}

impl Decision {
    /// The primary target. Invariant: a cycle's targets are never empty (the profile fails
    /// a cycle whose picker names no candidate), so this is the first of them.
    pub fn primary(&self) -> u32 {
        self.result.targets.first().copied().unwrap_or(u32::MAX)
    }
}

impl Scheduler {
    /// A scheduler of one profile (no experiment) with default admission.
    pub fn single(profile: SchedulerProfile) -> Scheduler {
        Scheduler {
            variants: vec![Variant { name: profile.name.clone(), profile, shadow: false }],
            experiment: None,
            saturation: SaturationConfig::default(),
            admission: Admission::default(),
        }
    }

    /// The primary (first) profile.
    pub fn primary(&self) -> &SchedulerProfile {
        &self.variants[0].profile
    }

    /// Admission, variant choice and the variant's cycle over `candidates`, for the
    /// request's cycle `cycle` (a number unique per scheduled request).
    pub fn decide(&self, cycle: u64, req: &Request, candidates: Candidates) -> Result<Decision, DecideError> {
        if candidates.is_empty() {
            return Err(DecideError::NoEndpoints);
        }
        if self.admission == Admission::ShedSheddable && self.saturation.shed(req.priority, &candidates) {
            return Err(DecideError::Saturated);
        }
        let kept = self.saturation.filter(&candidates);
        let admitted = if kept.len() == candidates.len() { candidates } else { candidates.select(&kept) };
        let variant = self.choose(req);
        let Some(v) = self.variants.get(variant) else {
            return Err(DecideError::NoEndpoints);
        };
        let result =
            v.profile.schedule(cycle, req, &admitted).map_err(|error| DecideError::Schedule { variant, error })?;
        let shadows = self.shadows_for(&req.id);
        Ok(Decision { variant, result, shadows, admitted })
    }

    /// Runs shadow variant `shadow` on a decided request: it decides without acting, then
    /// learns where the request really went.
    pub fn run_shadow(
        &self,
        shadow: usize,
        cycle: u64,
        req: &Request,
        decision: &Decision,
    ) -> Option<Result<CycleResult, ScheduleError>> {
        let v = self.variants.get(shadow)?;
        Some(v.profile.schedule_shadow(cycle, req, &decision.admitted, decision.primary()))
    }

    /// Index of the variant routing a request (always 0 without an experiment).
    pub fn choose(&self, req: &Request) -> usize {
        match &self.experiment {
            Some(e) => e.choose(&req.id, &|name| req.header(name).map(str::to_string), req.user.as_deref()),
            None => 0,
        }
    }

    /// Indices of the shadows that see this request.
    pub fn shadows_for(&self, request_id: &str) -> Vec<usize> {
        match &self.experiment {
            Some(e) => {
                (0..self.variants.len()).filter(|&i| self.variants[i].shadow && e.samples(i, request_id)).collect()
            }
            None => Vec::new(),
        }
    }

    /// Tells every variant's plugins that asked for it that the pool changed.
    pub fn pool_changed(&self, generation: u64, endpoints: &[EndpointInfo]) -> Vec<(usize, HookFailure)> {
        let mut failures = Vec::new();
        for (i, v) in self.variants.iter().enumerate() {
            failures.extend(v.profile.pool_changed(generation, endpoints).into_iter().map(|f| (i, f)));
        }
        failures
    }

    /// The first response bytes of a decided request arrived; `variants` are those whose
    /// plugins were told the decision (the routing variant and its shadows).
    pub fn first_chunk(&self, variants: &[usize], cycle: u64, endpoint: u32, now_ms: u64) -> Vec<(usize, HookFailure)> {
        self.each(variants, |p| p.first_chunk(cycle, endpoint, now_ms))
    }

    /// A decided request ended; `variants` as for `first_chunk`.
    pub fn finished(&self, variants: &[usize], cycle: u64, completion: &Completion) -> Vec<(usize, HookFailure)> {
        self.each(variants, |p| p.finished(cycle, completion))
    }

    fn each(
        &self,
        variants: &[usize],
        call: impl Fn(&SchedulerProfile) -> Vec<HookFailure>,
    ) -> Vec<(usize, HookFailure)> {
        let mut failures = Vec::new();
        for &i in variants {
            if let Some(v) = self.variants.get(i) {
                failures.extend(call(&v.profile).into_iter().map(|f| (i, f)));
            }
        }
        failures
    }

    /// Whether responses should name their variant.
    pub fn names_variants(&self) -> bool {
        self.experiment.as_ref().is_some_and(|e| e.response_header)
    }

    /// Whether any variant's plugins want the `first-chunk` hook.
    pub fn wants_first_chunk(&self) -> bool {
        self.variants.iter().any(|v| v.profile.wants_first_chunk())
    }
}
