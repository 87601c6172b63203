//! Two EPP replicas behind one Envoy (`config/envoy-replicas.yaml`), sharing routing state
//! through a real `redis-server` (`--state-store`): follow-ups of a prefix stay on its
//! worker whichever replica decides them; Redis going away and coming back, a replica
//! killed, and a rolling restart under load — what fails, if anything.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use epp_stack::{Epp, EppOptions, Redis, ReplicaSet, Scratch, Workers};

use crate::stack::{completion, eventually, sample};

const LOG_FILTER: &str = "info,epp::ext_proc=debug,epp::routing=debug,epp::state_store=debug";

struct Replicas {
    scratch: Scratch,
    /// Kept alive for the whole test.
    _workers: Workers,
    config: String,
    set: ReplicaSet,
    client: reqwest::Client,
}

fn epp_bin() -> std::path::PathBuf {
    Path::new(env!("CARGO_BIN_EXE_epp")).to_path_buf()
}

impl Replicas {
    /// `workers` simulated workers, two EPPs (sharing state through Redis when `share`) and
    /// Envoy balancing ext_proc over them.
    async fn start(workers: usize, share: bool) -> Replicas {
        let scratch = Scratch::new("replicas").expect("scratch");
        let base = sim::SimConfig { time_scale: 0.0, ..Default::default() };
        let workers = Workers::spawn(workers, &base).await.expect("workers");
        let endpoints = scratch.write("endpoints.yaml", &workers.endpoints_yaml()).expect("endpoints");
        let config =
            epp::config::DEFAULT_CONFIG.replace("path: endpoints.yaml", &format!("path: {}", endpoints.display()));
        let options = EppOptions {
            args: vec!["--v=3".into(), "--reuse-port".into()],
            log_filter: Some(LOG_FILTER.into()),
            ..Default::default()
        };
        let envoy = epp_stack::locate_envoy(None).expect("envoy");
        let set = ReplicaSet::start(&epp_bin(), &envoy, &scratch, &config, share, options)
            .await
            .unwrap_or_else(|e| panic!("start the replicas: {e}"));
        Replicas {
            scratch,
            _workers: workers,
            config,
            set,
            client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client"),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/completions", self.set.envoy.listener)
    }

    /// POSTs a completion through Envoy; (status, worker name or error text).
    async fn post(&self, prompt: &str) -> Result<String, String> {
        let body = completion(prompt, 2);
        let r = self
            .client
            .post(self.url())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let worker = r.headers().get(sim::WORKER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = r.text().await.unwrap_or_default();
        match (status, worker) {
            (200, Some(w)) => Ok(w),
            _ => Err(format!("HTTP {status}: {}", text.chars().take(200).collect::<String>())),
        }
    }

    fn log(&self, i: usize) -> String {
        let main = std::fs::read_to_string(self.set.homes[i].log("epp.log")).unwrap_or_default();
        let replacement = std::fs::read_to_string(self.set.homes[i].log("epp-2.log")).unwrap_or_default();
        main + &replacement
    }

    async fn metrics(&self, i: usize) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.set.ports[i].2);
        match self.client.get(url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// `prefixes` long prompts, each sent `turns` times with a growing tail, 30 ms apart
    /// (conversation turns); the share of follow-ups served by the worker of the first turn.
    async fn follow_ups(&self, tag: &str, prefixes: usize, turns: usize) -> f64 {
        let (mut same, mut total) = (0, 0);
        for p in 0..prefixes {
            let head = format!("{tag}-{p}-{}", "y".repeat(40)).repeat(60);
            let mut first = None;
            for t in 0..turns {
                let worker = self.post(&format!("{head} turn {t}")).await.unwrap_or_else(|e| panic!("{e}"));
                match &first {
                    None => first = Some(worker),
                    Some(f) => {
                        total += 1;
                        same += usize::from(*f == worker);
                    }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
        same as f64 / total.max(1) as f64
    }
}

/// What a load client saw: requests served, and every failure with its time.
type Outcomes = (u32, Vec<(Instant, String)>);

/// Closed-loop load from `clients` clients until `stop`; every failure with its time.
fn load(r: &Arc<Replicas>, clients: usize, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Outcomes>> {
    (0..clients)
        .map(|c| {
            let (r, stop) = (r.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    match r.post(&format!("load client {c} request {i}: a short question")).await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push((Instant::now(), e)),
                    }
                }
                (ok, failed)
            })
        })
        .collect()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Outcomes>>) -> Outcomes {
    let (mut ok, mut failed) = (0, Vec::new());
    for t in tasks {
        let (o, f) = t.await.expect("client task");
        ok += o;
        failed.extend(f);
    }
    (ok, failed)
}

fn routed_count(log: &str) -> usize {
    log.matches("request routed").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ups_stay_on_their_worker_across_replicas_only_when_they_share_state() {
    let mut together = Vec::new();
    for share in [false, true] {
        let r = Replicas::start(4, share).await;
        let tag = if share { "shared" } else { "alone" };
        let fraction = r.follow_ups(tag, 12, 4).await;
        println!("two replicas, sharing {share}: {:.0} % of follow-ups on their prefix's worker", 100.0 * fraction);
        let (a, b) = (routed_count(&r.log(0)), routed_count(&r.log(1)));
        assert!(a > 0 && b > 0, "Envoy should spread streams over both replicas ({a} / {b} routed)");
        if share {
            for i in 0..2 {
                let page = r.metrics(i).await;
                let applied = sample(&page, "epp_state_store_events_total", &["direction=\"applied\""]).unwrap_or(0.0);
                assert!(applied > 0.0, "replica {i} applied none of its peer's decisions:\n{}", r.log(i));
                assert_eq!(sample(&page, "epp_state_store_connected", &[]), Some(1.0));
                let lag = sample(&page, "epp_state_store_lag_seconds", &[]).unwrap_or(f64::NAN);
                println!("replica {i}: {applied} peer events applied, last lag {:.1} ms", lag * 1e3);
            }
            assert!(fraction >= 0.95, "with shared state only {:.0} % of follow-ups stayed", 100.0 * fraction);
        }
        together.push(fraction);
    }
    assert!(together[1] >= together[0], "sharing should not lose affinity: {together:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_fails_no_request_and_sharing_resumes() {
    let r = Arc::new(Replicas::start(3, true).await);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&r, 2, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let port = r.set.redis.as_ref().expect("redis").port;
    // Kill Redis under load (SIGKILL: no goodbye), then start a new one on its port.
    kill_pid(r.set.redis.as_ref().expect("redis").process.pid());
    eventually(Duration::from_secs(10), "a replica to notice Redis is gone", || async {
        let page = r.metrics(0).await;
        (sample(&page, "epp_state_store_connected", &[]) == Some(0.0)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = Redis::start(&r.scratch, Some(port)).await.unwrap_or_else(|e| panic!("restart redis: {e}"));
    eventually(Duration::from_secs(15), "both replicas to reconnect", || async {
        let mut up = true;
        for i in 0..2 {
            up &= sample(&r.metrics(i).await, "epp_state_store_connected", &[]) == Some(1.0);
        }
        up.then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = collect(clients).await;
    println!("Redis killed and restarted under load: {ok} requests served, {} failed", failed.len());
    assert!(failed.is_empty(), "requests failed: {:?}", &failed[..failed.len().min(3)]);
    assert!(r.log(0).contains("state store unreachable") || r.log(1).contains("state store unreachable"));
    assert!(r.log(0).contains("state store reachable again") || r.log(1).contains("state store reachable again"));
    // Sharing works again on the new Redis.
    let fraction = r.follow_ups("after-outage", 6, 3).await;
    assert!(fraction >= 0.95, "after Redis came back only {:.0} % of follow-ups stayed", 100.0 * fraction);
    drop(again);
}

/// Redis stops answering without closing anything (`SIGSTOP`: as a hung host or a cut
/// network looks): each replica's reader, blocked on the stream, gives up after its reply
/// deadline and says the store is gone; once Redis answers again, sharing resumes. Before,
/// the blocked read waited forever and the store still read as connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_is_noticed_and_sharing_resumes() {
    let r = Replicas::start(2, true).await;
    let pid = r.set.redis.as_ref().expect("redis").process.pid();
    for i in 0..2 {
        eventually(Duration::from_secs(10), "the replicas to connect", || async {
            (sample(&r.metrics(i).await, "epp_state_store_connected", &[]) == Some(1.0)).then_some(())
        })
        .await;
    }
    signal(pid, "-STOP");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut noticed = false;
    while !noticed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        noticed = sample(&r.metrics(0).await, "epp_state_store_connected", &[]) == Some(0.0);
    }
    signal(pid, "-CONT");
    assert!(noticed, "20 s after Redis went silent, the store still reads as connected");
    eventually(Duration::from_secs(20), "both replicas to reconnect", || async {
        let mut up = true;
        for i in 0..2 {
            up &= sample(&r.metrics(i).await, "epp_state_store_connected", &[]) == Some(1.0);
        }
        up.then_some(())
    })
    .await;
    let fraction = r.follow_ups("after-silence", 6, 3).await;
    assert!(fraction >= 0.95, "after Redis answered again only {:.0} % of follow-ups stayed", 100.0 * fraction);
}

fn signal(pid: u32, which: &str) {
    let _ = std::process::Command::new("kill").args([which, &pid.to_string()]).status();
}

fn kill_pid(pid: u32) {
    let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_fails_only_the_streams_it_held() {
    let mut r = Replicas::start(3, true).await;
    let mut victim = r.set.epps[0].take().expect("replica 0");
    let r = Arc::new(r);
    let stop = Arc::new(AtomicBool::new(false));
    const CLIENTS: usize = 4;
    let clients = load(&r, CLIENTS, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    victim.process.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = collect(clients).await;
    println!(
        "replica killed under load: {ok} requests served, {} failed (at most {CLIENTS} were in flight)",
        failed.len()
    );
    assert!(failed.len() <= CLIENTS, "more failures than streams in flight: {:?}", &failed[..failed.len().min(6)]);
    for (at, e) in &failed {
        assert!(at.duration_since(killed_at) < Duration::from_millis(500), "a request failed well after the kill: {e}");
    }
    // The survivor serves on.
    let after = r.follow_ups("survivor", 3, 3).await;
    assert!(after >= 0.95, "the survivor lost affinity: {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_both_replicas_fails_no_request() {
    let mut r = Replicas::start(3, true).await;
    let mut old = Vec::new();
    let shared = Arc::new(AtomicBool::new(false));
    let stop = shared.clone();
    // The load runs on its own client against Envoy's listener.
    let url = r.url();
    let client = r.client.clone();
    let load_task = tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::<String>::new());
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let body = serde_json::json!({"model": "m", "prompt": format!("rolling {i}"), "max_tokens": 2}).to_string();
            match client.post(&url).header("content-type", "application/json").body(body).send().await {
                Ok(resp) if resp.status() == 200 => {
                    let _ = resp.bytes().await;
                    ok += 1;
                }
                Ok(resp) => failed.push(format!("HTTP {}", resp.status())),
                Err(e) => failed.push(e.to_string()),
            }
        }
        (ok, failed)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..2 {
        let opts = EppOptions { replacement: Some(2), ..r.set.options.clone() };
        let fresh = Epp::start_on(&epp_bin(), &r.set.homes[i], &r.config, &opts, Some(r.set.ports[i]))
            .await
            .unwrap_or_else(|e| panic!("start the replacement of replica {i}: {e}"));
        let mut previous = r.set.epps[i].replace(fresh).expect("a running replica");
        let status = tokio::task::spawn_blocking(move || {
            let s = previous.process.terminate(Duration::from_secs(30));
            (s, previous)
        })
        .await
        .expect("join");
        assert!(status.0.is_some_and(|s| s.success()), "replica {i} did not drain and exit cleanly");
        old.push(status.1);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    shared.store(true, Ordering::Relaxed);
    let (ok, failed) = load_task.await.expect("load");
    println!("rolling restart of two replicas: {ok} requests served, {} failed", failed.len());
    assert!(failed.is_empty(), "requests failed: {:?}", &failed[..failed.len().min(5)]);
    assert!(ok > 50, "too little load to tell: {ok}");
    for i in 0..2 {
        let replacement = std::fs::read_to_string(r.set.homes[i].log("epp-2.log")).unwrap_or_default();
        assert!(
            replacement.contains("routing state replayed from the store"),
            "replica {i}'s replacement did not warm up"
        );
    }
}
