//! The simulated pool of a replay: one `sim::Model` per worker (the very model the live
//! `sim-worker` serves from), advanced in virtual time, plus what the EPP would know of it —
//! the last scrape of each worker's metrics and the endpoint records plugins are told.
//!
//! It owns virtual-time bookkeeping only: scrapes happen every `scrape interval` per worker
//! (phases staggered across workers, as independent pollers drift), so the scheduler sees
//! values up to one interval old, and a change in a worker's LoRA adapters reaches the
//! plugins only through a scrape, as in the live stack. It makes no routing decision and
//! calls no plugin: the engine does that with what this module returns.

use epp_core::{CacheInfo, Candidates, EndpointInfo};
use sim::model::{AdmitError, EventKind, Model, ModelParams, ModelRequest, ParamsError, PoolShape};

/// Named model parameter sets (`--model-profile`).
pub const PROFILES: &[(&str, &str)] = &[
    (
        "small",
        "the live simulator's defaults: 32 sequences, 2048 blocks of 16 tokens (32k tokens), 50 µs/prefill token",
    ),
    ("8b-1gpu", "roughly an 8B model on one 80 GB GPU: 256 sequences, 26k blocks (416k tokens), 60 µs/prefill token"),
];

/// The parameters of profile `name`.
pub fn profile(name: &str) -> Option<ModelParams> {
    match name {
        "small" => Some(ModelParams::default()),
        // Llama-3-8B in bf16 holds 128 KiB of KV per token; ~54 GB left after weights and
        // activations at 0.9 GPU memory utilisation is ~420k tokens. Prefill runs at about
        // 16k tokens/s; a decode step reads the 16 GB of weights (~10 ms) plus each
        // sequence's KV.
        "8b-1gpu" => Some(ModelParams {
            max_num_seqs: 256,
            max_loras: 4,
            block_size: 16,
            num_gpu_blocks: 26_000,
            prefill_us_per_token: 60.0,
            decode_ms_base: 10.0,
            decode_ms_per_seq: 0.15,
        }),
        _ => None,
    }
}

/// An event of one worker, tagged with the worker and the replay's request index.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerEvent {
    pub at: f64,
    pub worker: u32,
    pub request: usize,
    pub kind: EventKind,
}

/// The last scrape of one worker, as the EPP's datastore holds it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Scrape {
    at: f64,
    waiting: f32,
    running: f32,
    kv_usage: f32,
}

struct Worker {
    model: Model,
    /// The replay's request index of each model request id (ids count up from 0 per model).
    requests: Vec<usize>,
    /// Offset of this worker's scrape ticks within one interval.
    phase: f64,
    scrape: Scrape,
}

/// The simulated pool; see the module documentation.
pub struct Cluster {
    workers: Vec<Worker>,
    params: ModelParams,
    /// Seconds; 0 means the scheduler sees the live state.
    scrape_interval: f64,
    infos: Vec<EndpointInfo>,
    generation: u64,
}

impl Cluster {
    /// `workers` workers of `params`, each changed as `shape` says (KV blocks, speed).
    pub fn new(
        workers: usize,
        params: ModelParams,
        shape: &PoolShape,
        scrape_interval: f64,
    ) -> Result<Self, ParamsError> {
        let max_lora = u32::try_from(params.max_loras).ok();
        let mut list = Vec::with_capacity(workers);
        let mut infos = Vec::with_capacity(workers);
        for w in 0..workers {
            let own = shape.worker(&params, w);
            let num_gpu_blocks = u32::try_from(own.num_gpu_blocks).unwrap_or(u32::MAX);
            list.push(Worker {
                model: Model::new(own)?,
                requests: Vec::new(),
                phase: scrape_interval * w as f64 / workers.max(1) as f64,
                // Idle workers are known idle from the start: the first scrape precedes traffic.
                scrape: Scrape { at: 0.0, waiting: 0.0, running: 0.0, kv_usage: 0.0 },
            });
            infos.push(EndpointInfo {
                id: w as u32,
                name: format!("sim-{w}"),
                namespace: "default".into(),
                address: format!("10.0.{}.{}", w / 250, w % 250 + 1),
                port: 8000,
                labels: Vec::new(),
                max_lora,
                running_adapters: Vec::new(),
                waiting_adapters: Vec::new(),
                // The KV geometry the live worker reports in `vllm:cache_config_info`.
                cache: Some(CacheInfo {
                    block_size: u32::try_from(params.block_size).unwrap_or(u32::MAX),
                    num_gpu_blocks,
                }),
            });
        }
        Ok(Cluster { workers: list, params, scrape_interval, infos, generation: 1 })
    }

    /// Starts recording every worker's KV-cache events (precise prefix routing).
    pub fn record_kv_events(&mut self) {
        for w in &mut self.workers {
            w.model.record_kv_events(true);
        }
    }

    /// Worker `w`'s KV-cache events since the last call.
    pub fn drain_kv_events(&mut self, w: usize) -> Vec<sim::kv_cache::KvEvent> {
        self.workers.get_mut(w).map(|x| x.model.drain_kv_events()).unwrap_or_default()
    }

    pub fn params(&self) -> &ModelParams {
        &self.params
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The endpoint records plugins know, and their generation.
    pub fn pool(&self) -> (u64, &[EndpointInfo]) {
        (self.generation, &self.infos)
    }

    /// Brings every worker to `now`, taking the scrapes due on the way, and appends the
    /// events that happened to `events`. Returns true when a scrape changed what the EPP
    /// knows of the LoRA adapters (a new pool generation the plugins must be told).
    pub fn advance(&mut self, now: f64, events: &mut Vec<WorkerEvent>) -> bool {
        let mut pool_changed = false;
        for (w, worker) in self.workers.iter_mut().enumerate() {
            let due = if self.scrape_interval > 0.0 {
                latest_tick(now, worker.phase, self.scrape_interval)
            } else {
                Some(now)
            };
            if let Some(at) = due.filter(|&at| at > worker.scrape.at || self.scrape_interval == 0.0) {
                collect(w, &worker.requests, worker.model.advance(at), events);
                let stats = worker.model.stats();
                worker.scrape = Scrape {
                    at,
                    waiting: stats.waiting as f32,
                    running: stats.running as f32,
                    kv_usage: stats.kv_usage as f32,
                };
                let info = &mut self.infos[w];
                if info.running_adapters != stats.running_loras || info.waiting_adapters != stats.waiting_loras {
                    info.running_adapters = stats.running_loras;
                    info.waiting_adapters = stats.waiting_loras;
                    pool_changed = true;
                }
            }
            collect(w, &worker.requests, worker.model.advance(now), events);
        }
        if pool_changed {
            self.generation += 1;
        }
        pool_changed
    }

    /// The scheduler's view at `now`: every worker's last scrape, its age, and NaN for
    /// values older than `staleness_ms` (as the live datastore reports them).
    pub fn metrics(&self, now: f64, staleness_ms: u32) -> Candidates {
        let n = self.workers.len();
        let mut m = Candidates {
            ids: Vec::with_capacity(n),
            waiting: Vec::with_capacity(n),
            running: Vec::with_capacity(n),
            kv_usage: Vec::with_capacity(n),
            age_ms: Vec::with_capacity(n),
            own_in_flight: Vec::with_capacity(n),
            attributes: Vec::new(),
        };
        for (w, worker) in self.workers.iter().enumerate() {
            let s = worker.scrape;
            let age = ((now - s.at).max(0.0) * 1000.0).round().min(f64::from(u32::MAX)) as u32;
            let v = |x: f32| if age <= staleness_ms { x } else { f32::NAN };
            m.ids.push(w as u32);
            m.waiting.push(v(s.waiting));
            m.running.push(v(s.running));
            m.kv_usage.push(v(s.kv_usage));
            m.age_ms.push(age as f32);
            // Every request of a replay goes through the policy: what a worker holds now is
            // what the EPP has in flight there.
            m.own_in_flight.push((worker.model.running() + worker.model.waiting()) as f32);
        }
        m
    }

    /// Running sequences per worker right now (the true state, not the scraped one).
    pub fn running(&self) -> impl Iterator<Item = usize> + '_ {
        self.workers.iter().map(|w| w.model.running())
    }

    /// Sends request `index` to `worker` at `now`.
    pub fn admit(&mut self, worker: u32, now: f64, req: ModelRequest, index: usize) -> Result<(), AdmitError> {
        let Some(w) = self.workers.get_mut(worker as usize) else {
            // Invariant: the engine only passes ids it took from `metrics`.
            debug_assert!(false, "worker {worker} does not exist");
            return Ok(());
        };
        let id = w.model.admit(now, req)?;
        debug_assert_eq!(id.0 as usize, w.requests.len(), "model ids count up from 0");
        w.requests.push(index);
        Ok(())
    }

    /// Runs every worker until idle and appends the remaining events.
    pub fn drain(&mut self, events: &mut Vec<WorkerEvent>) {
        for (w, worker) in self.workers.iter_mut().enumerate() {
            collect(w, &worker.requests, worker.model.run_until_idle(), events);
        }
    }
}

/// The last scrape tick at or before `now` of a worker ticking at `phase + k × interval`.
fn latest_tick(now: f64, phase: f64, interval: f64) -> Option<f64> {
    if now < phase {
        return None;
    }
    Some(phase + ((now - phase) / interval).floor() * interval)
}

fn collect(worker: usize, requests: &[usize], from: Vec<sim::model::Event>, into: &mut Vec<WorkerEvent>) {
    into.extend(from.into_iter().filter_map(|e| {
        let request = requests.get(e.id.0 as usize).copied()?;
        Some(WorkerEvent { at: e.at, worker: worker as u32, request, kind: e.kind })
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(c: &Cluster, prompt: &str, max_tokens: u32) -> ModelRequest {
        ModelRequest::from_prompt(c.params(), prompt.as_bytes(), &[b"m"], max_tokens, None)
    }

    #[test]
    fn profiles_are_valid() {
        for (name, _) in PROFILES {
            let p = profile(name).unwrap_or_else(|| panic!("{name} has no parameters"));
            assert_eq!(p.validate(), Ok(()), "{name}");
        }
        assert_eq!(profile("70b"), None);
    }

    #[test]
    fn scrape_ticks() {
        // (now, phase, interval) → latest tick
        let cases = [
            (0.0, 0.0, 0.05, Some(0.0)),
            (0.049, 0.0, 0.05, Some(0.0)),
            (0.051, 0.0, 0.05, Some(0.05)),
            (0.01, 0.02, 0.05, None),
            (0.121, 0.02, 0.05, Some(0.12)),
        ];
        for (now, phase, interval, want) in cases {
            let got = latest_tick(now, phase, interval);
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-9, "{now}: {g} vs {w}"),
                _ => assert_eq!(got, want, "{now}"),
            }
        }
    }

    #[test]
    fn the_scheduler_sees_the_last_scrape() {
        let mut c = Cluster::new(2, ModelParams::default(), &PoolShape::default(), 0.05).expect("valid");
        let mut events = Vec::new();
        c.advance(0.001, &mut events);
        c.admit(0, 0.001, req(&c, &"p".repeat(400), 500), 0).expect("fits");
        let m = c.metrics(0.002, 2000);
        assert_eq!((m.running[0], m.age_ms[0]), (0.0, 2.0), "not scraped since the admission");
        c.advance(0.051, &mut events);
        let m = c.metrics(0.051, 2000);
        assert_eq!((m.running[0], m.age_ms[0]), (1.0, 1.0), "worker 0 scraped at 50 ms");
        assert_eq!(m.age_ms[1], 26.0, "worker 1 ticks at 25 ms, 75 ms, …");
        let stale = c.metrics(3.0, 2000);
        assert!(stale.waiting[0].is_nan() && stale.age_ms[0] > 2000.0, "old scrapes are unknown");
        assert_eq!(c.running().collect::<Vec<_>>(), vec![1, 0]);
    }

    #[test]
    fn a_mixed_pool_reports_each_workers_own_cache() {
        let shape = PoolShape { blocks: vec![2048, 512], speed: vec![1.0, 0.5] };
        let mut c = Cluster::new(3, ModelParams::default(), &shape, 0.0).expect("valid");
        let blocks: Vec<u32> = c.pool().1.iter().map(|e| e.cache.expect("geometry").num_gpu_blocks).collect();
        assert_eq!(blocks, [2048, 512, 2048], "what each worker reports in cache_config_info");
        // The same prompt takes twice as long on the half-speed worker.
        let mut events = Vec::new();
        let prompt = "p".repeat(4000);
        for w in 0..2u32 {
            c.admit(w, 0.0, req(&c, &prompt, 1), w as usize).expect("fits");
        }
        c.drain(&mut events);
        let done = |w: usize| {
            events
                .iter()
                .find(|e| e.worker as usize == w && matches!(e.kind, EventKind::Finished(_)))
                .map(|e| e.at)
                .expect("done")
        };
        let (fast, slow) = (done(0), done(1));
        assert!((slow / fast - 2.0).abs() < 1e-6, "fast {fast} s, slow {slow} s");
    }

    #[test]
    fn zero_interval_means_live_state() {
        let mut c = Cluster::new(1, ModelParams::default(), &PoolShape::default(), 0.0).expect("valid");
        let mut events = Vec::new();
        c.admit(0, 0.0, req(&c, "hello", 3), 42).expect("fits");
        c.advance(0.0, &mut events);
        let m = c.metrics(0.0, 2000);
        assert_eq!((m.running[0], m.age_ms[0]), (1.0, 0.0));
        c.drain(&mut events);
        let finished: Vec<_> = events.iter().filter(|e| matches!(e.kind, EventKind::Finished(_))).collect();
        assert_eq!(finished.len(), 1);
        assert_eq!((finished[0].worker, finished[0].request), (0, 42), "events carry the request index");
    }

    #[test]
    fn lora_changes_reach_the_pool_through_scrapes() {
        let mut c = Cluster::new(1, ModelParams::default(), &PoolShape::default(), 0.05).expect("valid");
        let mut events = Vec::new();
        let lora = ModelRequest::from_prompt(c.params(), b"x", &[b"a"], 100, Some("a".into()));
        c.admit(0, 0.01, lora, 0).expect("fits");
        assert!(!c.advance(0.02, &mut events), "no scrape yet");
        assert!(c.advance(0.06, &mut events), "the scrape at 50 ms sees adapter a");
        let (generation, infos) = c.pool();
        assert_eq!((generation, infos[0].running_adapters.clone()), (2, vec!["a".to_string()]));
        assert!(!c.advance(0.11, &mut events), "unchanged");
    }
}
