//! The set of profiles a config runs: one, or the variants of an A/B experiment (routing
//! variants and shadows). Pure: choosing a variant is `ExperimentSpec::choose`; this holds
//! the built profiles and fans life-cycle hooks out to all of them.

use llmd_plugin_sdk::{EndpointInfo, Usage};

use super::SchedulerProfile;
use crate::experiment::ExperimentSpec;

pub struct Variant {
    pub name: String,
    pub profile: SchedulerProfile,
    pub shadow: bool,
}

/// What the router runs. Invariant: `variants` is not empty and, without an experiment,
/// holds exactly the primary profile.
pub struct Scheduler {
    pub variants: Vec<Variant>,
    pub experiment: Option<ExperimentSpec>,
}

impl Scheduler {
    /// A scheduler of one profile (no experiment).
    pub fn single(profile: SchedulerProfile) -> Scheduler {
        Scheduler { variants: vec![Variant { name: profile.name.clone(), profile, shadow: false }], experiment: None }
    }

    /// Index of the variant routing a request (always 0 without an experiment).
    pub fn choose(&self, request_id: &str, header: &dyn Fn(&str) -> Option<String>, user: Option<&str>) -> usize {
        match &self.experiment {
            Some(e) => e.choose(request_id, header, user),
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

    pub fn pool_changed(&self, generation: u64, endpoints: &[EndpointInfo]) {
        for v in &self.variants {
            v.profile.pool_changed(generation, endpoints);
        }
    }

    pub fn response_complete(&self, variant: usize, request_id: &str, endpoint: u32, usage: Usage) {
        if let Some(v) = self.variants.get(variant) {
            v.profile.response_complete(request_id, endpoint, usage);
        }
    }

    /// Whether responses should name their variant.
    pub fn names_variants(&self) -> bool {
        self.experiment.as_ref().is_some_and(|e| e.response_header)
    }
}
