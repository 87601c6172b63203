//! Precise prefix routing end to end: simulated workers publish their KV-cache events over
//! ZMQ as vLLM does, the `epp` binary subscribes (endpoint labels name each worker's
//! sockets) and routes on what every worker really stores — including blocks stored by
//! traffic that never went through the EPP, which the approximate index cannot know.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sim::{KvEventsConfig, SimConfig};

use crate::stack::{EnvoyConfig, Stack, completion, eventually, sample};

fn precise_config_with(endpoints: &Path) -> String {
    epp::config::PRECISE_CONFIG.replace("path: endpoints.yaml", &format!("path: {}", endpoints.display()))
}

/// The precise config with a model-like tokenizer: a byte-level BPE trained in-test, written
/// beside the config (paths in the config resolve from its folder).
fn bpe_config_with(endpoints: &Path) -> String {
    let dir = endpoints.parent().expect("the config folder");
    let json = epp_stack::text::trained_bpe_json().expect("train a tokenizer");
    std::fs::write(dir.join("tokenizer.json"), json).expect("write tokenizer.json");
    precise_config_with(endpoints).replace("type: sim", "path: tokenizer.json")
}

fn with_events(cfg: &mut SimConfig) {
    cfg.kv_events = Some(KvEventsConfig { port: 0, replay_port: Some(0), topic: String::new() });
}

/// `blocks` simulated KV blocks (16 tokens of 4 bytes) of text unique to `tag`.
fn prompt(tag: &str, blocks: usize) -> String {
    let unit = format!("{tag}-{}", "x".repeat(63 - tag.len()));
    unit.repeat(blocks)
}

/// Labels every worker with its own event sockets.
fn label_event_sockets(stack: &Stack) {
    let labels: Vec<Vec<(String, String)>> = stack
        .workers
        .iter()
        .map(|w| {
            let (events, replay) = w.handle.kv_events_ports().expect("the worker publishes KV events");
            let mut l = vec![("kv-events-endpoint".to_string(), format!("tcp://127.0.0.1:{events}"))];
            if let Some(r) = replay {
                l.push(("kv-events-replay-endpoint".to_string(), format!("tcp://127.0.0.1:{r}")));
            }
            l
        })
        .collect();
    let borrowed: Vec<Vec<(&str, &str)>> =
        labels.iter().map(|l| l.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()).collect();
    let entries: Vec<(usize, &[(&str, &str)])> = borrowed.iter().enumerate().map(|(i, l)| (i, l.as_slice())).collect();
    stack.write_endpoints_labelled(&entries);
}

/// Sends `prompt` straight to worker `i`, bypassing Envoy and the EPP.
async fn direct(stack: &Stack, i: usize, prompt: &str) {
    let url = format!("http://{}/v1/completions", stack.workers[i].addr());
    let r = stack
        .client
        .post(url)
        .header("content-type", "application/json")
        .body(completion(prompt, 2))
        .send()
        .await
        .expect("direct request");
    assert_eq!(r.status(), 200);
}

/// Waits until the EPP's precise index holds blocks of worker `name` (at least `min`).
async fn index_holds(stack: &Stack, name: &str, min: f64) {
    eventually(Duration::from_secs(15), &format!("the precise index to hold {min} blocks of {name}"), || async {
        let page = stack.epp_metrics().await;
        sample(&page, "llm_d_epp_kv_cache_index_blocks", &[&format!("endpoint=\"{name}\"")]).filter(|&b| b >= min)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_on_what_each_worker_stores_and_heals_after_a_restart() {
    let mut stack = Stack::start_config(3, EnvoyConfig::Ours, with_events, &[], precise_config_with).await;
    label_event_sockets(&stack);
    let sockets: Vec<String> = stack
        .workers
        .iter()
        .filter_map(|w| w.handle.kv_events_ports())
        .map(|(events, _)| format!("tcp://127.0.0.1:{events}"))
        .collect();
    eventually(Duration::from_secs(15), "subscriptions to every worker's labelled sockets", || async {
        let log = stack.epp_log();
        let joined: Vec<&str> = log.lines().filter(|l| l.contains("KV event stream joined")).collect();
        sockets.iter().all(|s| joined.iter().any(|l| l.contains(s.as_str()))).then_some(())
    })
    .await;

    // Each worker gets a long prompt of its own behind the EPP's back; only the workers'
    // events can tell the EPP where those prefixes live. Three right picks out of three
    // would happen by chance one time in 27.
    let prompts: Vec<String> = (0..3).map(|i| prompt(&format!("doc{i}"), 40)).collect();
    for (i, p) in prompts.iter().enumerate() {
        direct(&stack, i, p).await;
        index_holds(&stack, &format!("w{i}"), 40.0).await;
    }
    for (i, p) in prompts.iter().enumerate() {
        let r = stack.post("/v1/completions", &format!("follow-{i}"), &completion(&format!("{p} and then?"), 2)).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.worker.as_deref(), Some(format!("w{i}").as_str()), "the follow-up of doc{i} went elsewhere");
    }
    // Live messages are counted. The blocks above may have come through the replay at join
    // (the subscription reaches a publisher a moment after the socket connects, and what is
    // published before is not delivered live), so new blocks are stored on w1 until one
    // arrives on the live stream.
    let mut counted = None;
    for round in 0..5 {
        direct(&stack, 1, &prompt(&format!("live{round}"), 2)).await;
        let deadline = Instant::now() + Duration::from_secs(2);
        while counted.is_none() && Instant::now() < deadline {
            let page = stack.epp_metrics().await;
            counted = sample(&page, "llm_d_epp_kv_cache_events_messages_received_total", &["endpoint=\"w1\""])
                .filter(|&n| n >= 1.0);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if counted.is_some() {
            break;
        }
    }
    assert!(counted.is_some(), "no live event message counted for w1:\n{}", stack.epp_metrics().await);

    // Worker 1 restarts on the same ports: a new publisher, sequence numbers from 0. The EPP
    // notices the disconnect, reconnects, forgets what the old process held and learns the
    // new one's blocks — no EPP restart.
    let old = stack.workers.remove(1);
    let (events, replay) = old.handle.kv_events_ports().expect("ports");
    let http = old.addr().port();
    drop(old);
    let handle = respawn(http, events, replay).await;
    stack.workers.insert(1, crate::stack::Worker { handle, name: "w1".into() });
    let fresh = prompt("after-restart", 30);
    direct(&stack, 1, &fresh).await;
    eventually(Duration::from_secs(20), "the restart to be noticed", || async {
        let log = stack.epp_log();
        log.contains("KV event publisher reconnected").then_some(())
    })
    .await;
    index_holds(&stack, "w1", 30.0).await;
    let page = stack.epp_metrics().await;
    let w1 = sample(&page, "llm_d_epp_kv_cache_index_blocks", &["endpoint=\"w1\""]).unwrap_or(0.0);
    assert!(w1 < 70.0, "the old process's 40 blocks should have been forgotten (index holds {w1})");
    let r = stack.post("/v1/completions", "after-restart", &completion(&format!("{fresh} more"), 2)).await;
    assert_eq!(r.worker.as_deref(), Some("w1"), "{r:?}");
}

/// Starts worker w1 again on the ports its previous process used, retrying while the old
/// listeners are still being released.
/// Workers that publish events but run no replay socket (vLLM's default: no
/// `replay_endpoint`), while the endpoints name one: the first failed replay marks it
/// unreachable and later gaps do not wait on it again; the live stream still feeds routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_replay_socket_is_tried_once_not_at_every_gap() {
    let no_replay = |cfg: &mut SimConfig| {
        cfg.kv_events = Some(KvEventsConfig { port: 0, replay_port: None, topic: String::new() });
    };
    let stack = Stack::start_config(2, EnvoyConfig::Ours, no_replay, &[], precise_config_with).await;
    // Blocks stored before the EPP subscribes: their events are gone, so its first live
    // message comes after a gap in the sequence, which asks for a replay.
    direct(&stack, 0, &prompt("before", 4)).await;
    let p = prompt("noreplay", 30);
    let closed = epp_stack::free_port().expect("a free port");
    let labels: Vec<Vec<(String, String)>> = stack
        .workers
        .iter()
        .map(|w| {
            let (events, _) = w.handle.kv_events_ports().expect("the worker publishes KV events");
            vec![
                ("kv-events-endpoint".to_string(), format!("tcp://127.0.0.1:{events}")),
                ("kv-events-replay-endpoint".to_string(), format!("tcp://127.0.0.1:{closed}")),
            ]
        })
        .collect();
    let borrowed: Vec<Vec<(&str, &str)>> =
        labels.iter().map(|l| l.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()).collect();
    let entries: Vec<(usize, &[(&str, &str)])> = borrowed.iter().enumerate().map(|(i, l)| (i, l.as_slice())).collect();
    stack.write_endpoints_labelled(&entries);
    eventually(Duration::from_secs(20), "both KV event streams to be joined", || async {
        (stack.epp_log().matches("KV event stream joined").count() >= 2).then_some(())
    })
    .await;
    // Each stored prompt is a live message; the first comes after the gap.
    for round in 0..3 {
        direct(&stack, 0, &format!("{p} {round}")).await;
    }
    index_holds(&stack, "w0", 30.0).await;
    let page = stack.epp_metrics().await;
    let failed = sample(&page, "llm_d_epp_kv_cache_events_replays_total", &["endpoint=\"w0\"", "outcome=\"failed\""]);
    assert_eq!(failed, Some(1.0), "replays of w0 tried and failed:\n{page}");
    let r = stack.post("/v1/completions", "noreplay-follow", &completion(&format!("{p} and then?"), 2)).await;
    assert_eq!(r.worker.as_deref(), Some("w0"), "{r:?}");
}

async fn respawn(http: u16, events: u16, replay: Option<u16>) -> sim::SimHandle {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut cfg = SimConfig { name: "w1".into(), port: http, time_scale: 0.0, ..SimConfig::default() };
        cfg.kv_events = Some(KvEventsConfig { port: events, replay_port: replay, topic: String::new() });
        match sim::spawn(cfg).await {
            Ok(h) => return h,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("restart w1 on its ports: {e:#}"),
        }
    }
}

/// A long prompt's tokenization with a model's BPE tokenizer runs off the EPP's async
/// workers: while more such requests are being tokenized than the EPP has workers, small
/// requests still get through. (Were the tokenization on the workers, every one of them
/// would be busy and the small requests would wait for the first long one to be decided.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_tokenizations_do_not_hold_up_other_requests() {
    let stack = Arc::new(Stack::start_config(2, EnvoyConfig::Ours, |_| {}, &[], bpe_config_with).await);
    let started = Instant::now();
    let heavy = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
    let long = Arc::new(completion(&epp_stack::text::prose(7, 4 << 20), 2));
    let mut long_ones = Vec::new();
    for i in 0..heavy {
        let (stack, body) = (stack.clone(), long.clone());
        long_ones.push(tokio::spawn(async move {
            let r = stack.post("/v1/completions", &format!("long-{i}"), &body).await;
            (r, started.elapsed())
        }));
    }
    // Their bodies reach the EPP within a few milliseconds; tokenizing each takes seconds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut small = Vec::new();
    for i in 0..5 {
        let r =
            stack.post("/v1/completions", &format!("small-{i}"), &completion(&format!("short question {i}"), 2)).await;
        assert_eq!(r.status, 200, "{r:?}");
        small.push(started.elapsed());
    }
    let mut first_long = Duration::MAX;
    for task in long_ones {
        let (r, at) = task.await.expect("long request task");
        // The workers refuse a prompt larger than their KV cache; what matters is that the
        // EPP decided and Envoy delivered it.
        assert!(r.worker.is_some(), "the long request was not routed: {} {}", r.status, r.body);
        first_long = first_long.min(at);
    }
    // The long prompts take seconds to tokenize; the small requests must pass meanwhile, well
    // within the first half of the time the first long one takes. (Were the tokenization on
    // the async workers, they would all wait for the long decisions and finish just before
    // the first long request.)
    let before = small.iter().filter(|&&t| t < first_long / 2).count();
    assert!(
        before >= 3,
        "only {before} of 5 small requests finished in the first half of the long requests' time (small at {small:?}, first long at {first_long:?})"
    );
}

/// Building a scheduler never touches the running event intake: the precise settings ride
/// with the build and are put in force only when it is installed. A rebuild whose precise
/// entry did not change reuses them (no tokenizer reload, the index kept), and a build
/// that fails leaves the hub as it was.
#[test]
fn builds_carry_precise_settings_and_leave_the_hub_alone() {
    use epp::config::{PRECISE_CONFIG, PickerConfig};
    use epp::loader::{PluginSet, build};

    let runtime = crate::common::runtime();
    let hub = epp::kv_events::KvEvents::new(None);
    let config = PickerConfig::parse(PRECISE_CONFIG, None).expect("the precise config");
    let first = build(runtime, &config, &PluginSet::with_kv_events(hub.clone())).expect("build");
    let settings = first.plugins.precise().cloned().expect("precise settings in the build");
    assert!(hub.settings().is_none(), "a build must not change the hub");

    // Another weight, same precise entry: the same settings.
    let reweighted = PRECISE_CONFIG.replace("weight: 0.0001", "weight: 0.001");
    assert_ne!(reweighted, PRECISE_CONFIG);
    let config = PickerConfig::parse(&reweighted, None).expect("the reweighted config");
    let second = build(runtime, &config, &first.plugins).expect("rebuild");
    assert!(Arc::ptr_eq(&settings, second.plugins.precise().expect("settings")));

    // A bad precise entry fails the build and changes nothing in force.
    hub.install(Some(&settings));
    let bad = PRECISE_CONFIG.replace("type: sim", "type: nonsense");
    let config = PickerConfig::parse(&bad, None).expect("parses; the producer rejects it");
    assert!(build(runtime, &config, &second.plugins).is_err());
    assert!(hub.settings().is_some_and(|s| Arc::ptr_eq(&s, &settings)));
}

/// A chat request's `messages` are written out again for the tokenizer only when it renders
/// the model's chat template: the default profile, the simulator's tokenizer and a model
/// tokenizer without a template parse chat bodies without that copy.
#[test]
fn chat_messages_are_kept_only_for_a_chat_template() {
    use epp::config::{PRECISE_CONFIG, PickerConfig};
    use epp::loader::{PluginSet, build};
    use epp::routing::Built;

    let runtime = crate::common::runtime();
    let dir = std::env::temp_dir().join(format!("epp-chat-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("config folder");
    let json = epp_stack::text::trained_bpe_json().expect("train a tokenizer");
    std::fs::write(dir.join("tokenizer.json"), json).expect("write tokenizer.json");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"}"#,
    )
    .expect("write tokenizer_config.json");
    let telemetry = epp::telemetry::Telemetry::new("test");
    let renders_chat_with = |config: PickerConfig| {
        let hub = epp::kv_events::KvEvents::new(None);
        let built = build(runtime, &config, &PluginSet::with_kv_events(hub)).unwrap_or_else(|e| panic!("{e}"));
        let precise = built.plugins.precise().cloned();
        Built::new(built.scheduler, &telemetry).with_precise(precise).renders_chat()
    };
    let renders_chat =
        |text: &str| renders_chat_with(PickerConfig::parse(text, Some(&dir)).unwrap_or_else(|e| panic!("{e}")));
    assert!(!renders_chat_with(PickerConfig::default_config().expect("the default config")), "default profile");
    assert!(!renders_chat(PRECISE_CONFIG), "the simulator's tokenizer");
    let model = PRECISE_CONFIG.replace("type: sim", "path: tokenizer.json");
    assert!(!renders_chat(&model), "a model tokenizer without a chat template");
    let templated =
        model.replace("path: tokenizer.json\n", "path: tokenizer.json\n        chatTemplate: tokenizer_config.json\n");
    assert_ne!(templated, model);
    assert!(renders_chat(&templated), "a model tokenizer with its chat template");
    let _ = std::fs::remove_dir_all(&dir);
}
