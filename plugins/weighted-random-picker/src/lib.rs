//! `weighted-random-picker`: picks `maxNumOfEndpoints` candidates at random with
//! probability proportional to score, without replacement, by weighted reservoir sampling
//! (each candidate draws key `u^(1/score)`, the largest keys win). Candidates scoring 0
//! come only after every positive one; if none is positive the choice is uniform.

use llmd_plugin_sdk::params::PickerParams;
use llmd_plugin_sdk::rng::SplitMix64;
use llmd_plugin_sdk::{Cycle, Manifest, Picker, Plugin};

#[derive(Default)]
pub struct WeightedRandomPicker {
    params: PickerParams,
}

impl Plugin for WeightedRandomPicker {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        self.params = PickerParams::parse(params_json)?;
        Ok(Manifest::stateless(&[]))
    }
}

impl Picker for WeightedRandomPicker {
    fn pick(&mut self, cycle: &Cycle, scores: &[f32]) -> Vec<u32> {
        let mut rng = SplitMix64::new(cycle.request.random_seed);
        // Keys in log space: ln(u)/w orders exactly like u^(1/w) and cannot underflow.
        // Non-positive weights get a key below every positive one, random among themselves.
        let mut keyed: Vec<(f64, f64, usize)> = (0..cycle.len())
            .map(|i| {
                let w = scores.get(i).copied().filter(|s| s.is_finite()).unwrap_or(0.0) as f64;
                let u = rng.next_f64().max(f64::MIN_POSITIVE);
                if w > 0.0 { (0.0, u.ln() / w, i) } else { (-1.0, u, i) }
            })
            .collect();
        keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.total_cmp(&a.1)));
        keyed.iter().take(self.params.max_num_of_endpoints).map(|&(_, _, i)| cycle.ids[i]).collect()
    }
}

llmd_plugin_sdk::export_picker!(WeightedRandomPicker);
