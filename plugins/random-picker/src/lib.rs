//! `random-picker`: returns `maxNumOfEndpoints` candidates chosen uniformly at random,
//! ignoring scores. Useful as a baseline when comparing policies.

use llmd_plugin_sdk::params::PickerParams;
use llmd_plugin_sdk::rng::SplitMix64;
use llmd_plugin_sdk::{Metrics, Picker, Plugin, Request};

#[derive(Default)]
pub struct RandomPicker {
    params: PickerParams,
}

impl Plugin for RandomPicker {
    fn configure(&mut self, params_json: &str) -> Result<(), String> {
        self.params = PickerParams::parse(params_json)?;
        Ok(())
    }
}

impl Picker for RandomPicker {
    fn pick(&mut self, req: &Request, metrics: &Metrics, _scores: &[f32]) -> Vec<u32> {
        let mut ids = metrics.ids.clone();
        SplitMix64::new(req.random_seed).shuffle(&mut ids);
        ids.truncate(self.params.max_num_of_endpoints);
        ids
    }
}

llmd_plugin_sdk::export_picker!(RandomPicker);
