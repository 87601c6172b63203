//! `random-picker`: returns `maxNumOfEndpoints` candidates chosen uniformly at random,
//! ignoring scores. Useful as a baseline when comparing policies.

use llmd_plugin_sdk::params::PickerParams;
use llmd_plugin_sdk::rng::SplitMix64;
use llmd_plugin_sdk::{Cycle, Manifest, Picker, Plugin};

#[derive(Default)]
pub struct RandomPicker {
    params: PickerParams,
}

impl Plugin for RandomPicker {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        self.params = PickerParams::parse(params_json)?;
        Ok(Manifest::stateless(&[]))
    }
}

impl Picker for RandomPicker {
    fn pick(&mut self, cycle: &Cycle, _scores: &[f32]) -> Vec<u32> {
        let mut ids = cycle.ids.clone();
        SplitMix64::new(cycle.request.random_seed).shuffle(&mut ids);
        ids.truncate(self.params.max_num_of_endpoints);
        ids
    }
}

llmd_plugin_sdk::export_picker!(RandomPicker);
