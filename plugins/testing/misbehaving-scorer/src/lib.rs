//! `misbehaving-scorer`: a scorer that fails on purpose, for testing the host's sandbox
//! and failure handling. Its `mode` parameter selects the failure: `trap` (panics), `loop`
//! (never returns), `alloc` (allocates until the memory cap stops it), `nan` (returns NaN
//! scores), `short` (returns too few scores), `reject` (refuses its configuration),
//! `trap-after` (works for `after` calls, then traps on every call: a plugin that passes its
//! probe and breaks in production) or `ok` (scores 0.5). Never part of a real configuration.

use llmd_plugin_sdk::{Cycle, Manifest, Plugin, Scorer, params};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    pub mode: String,
    pub after: u32,
}

#[derive(Default)]
pub struct MisbehavingScorer {
    mode: String,
    after: u32,
    calls: u32,
    hoard: Vec<Vec<u8>>,
}

impl Plugin for MisbehavingScorer {
    fn configure(&mut self, params_json: &str) -> Result<Manifest, String> {
        let p: Params = params::parse(params_json)?;
        if p.mode == "reject" {
            return Err("this plugin refuses every configuration".into());
        }
        self.mode = p.mode;
        self.after = p.after;
        Ok(Manifest::default())
    }
}

impl Scorer for MisbehavingScorer {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32> {
        let n = cycle.len();
        self.calls = self.calls.saturating_add(1);
        match self.mode.as_str() {
            "trap-after" if self.calls > self.after => panic!("misbehaving-scorer: trap after {} calls", self.after),
            "trap" => panic!("misbehaving-scorer: trap requested"),
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            "alloc" => loop {
                let mut block = vec![0u8; 16 << 20];
                block[0] = 1;
                self.hoard.push(std::hint::black_box(block));
            },
            "nan" => vec![f32::NAN; n],
            "short" => vec![0.5; n / 2],
            _ => vec![0.5; n],
        }
    }
}

llmd_plugin_sdk::export_scorer!(MisbehavingScorer);
