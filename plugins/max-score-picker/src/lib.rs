//! `max-score-picker`: returns the `maxNumOfEndpoints` highest-scoring candidates, best
//! first; ties are broken at random (from the request's seed), so equal endpoints share
//! load instead of the first one taking everything.

use llmd_plugin_sdk::params::PickerParams;
use llmd_plugin_sdk::rng::SplitMix64;
use llmd_plugin_sdk::{Cycle, Manifest, Picker, Plugin};

#[derive(Default)]
pub struct MaxScorePicker {
    params: PickerParams,
}

impl Plugin for MaxScorePicker {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        self.params = PickerParams::parse(params_json)?;
        Ok(Manifest::stateless(&[]))
    }
}

impl Picker for MaxScorePicker {
    fn pick(&mut self, cycle: &Cycle, scores: &[f32]) -> Vec<u32> {
        let score = |i: usize| scores.get(i).copied().filter(|s| !s.is_nan()).unwrap_or(f32::NEG_INFINITY);
        let mut order: Vec<usize> = (0..cycle.len()).collect();
        SplitMix64::new(cycle.request.random_seed).shuffle(&mut order);
        // Stable sort: after the shuffle, equal scores stay in random order.
        order.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
        order.iter().take(self.params.max_num_of_endpoints).map(|&i| cycle.ids[i]).collect()
    }
}

llmd_plugin_sdk::export_picker!(MaxScorePicker);
