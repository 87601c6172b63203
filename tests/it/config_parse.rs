//! EndpointPickerConfig parsing: the upstream guide's file loads unchanged, our default is
//! the same profile, and every kind of mistake is an error that names the field.

use epp::config::{ConfigError, PickerConfig, PluginKind};
use epp_core::FailurePolicy;

use crate::common::{metrics, pool, request, runtime};

const GUIDE: &str = include_str!("../../config/guide/epp-config.yaml");

fn profile_of(c: &PickerConfig) -> Vec<(String, f32)> {
    c.profile().plugins.iter().map(|e| (e.plugin_ref.clone(), e.weight.get())).collect()
}

fn owned(v: &[(&str, f32)]) -> Vec<(String, f32)> {
    v.iter().map(|(n, w)| (n.to_string(), *w)).collect()
}

#[test]
fn the_guide_config_loads_unchanged() {
    let c = PickerConfig::parse(GUIDE, None).expect("guide config");
    assert_eq!(c.api_version, "llm-d.ai/v1alpha1");
    assert_eq!(
        profile_of(&c),
        owned(&[
            ("approx-prefix-cache-producer", 1.0),
            ("queue-scorer", 2.0),
            ("kv-cache-utilization-scorer", 2.0),
            ("prefix-cache-scorer", 3.0),
            ("no-hit-lru-scorer", 2.0),
            ("max-score-picker", 1.0),
        ])
    );
    let discovery = c.discovery().expect("discovery plugin");
    assert_eq!(discovery.type_name, "file-discovery");
    assert_eq!(discovery.parameters["path"], "/etc/epp/endpoints.yaml");
    assert_eq!(discovery.parameters["watchFile"], true);
    assert!(!c.data_layer.inject_defaults);
    assert_eq!(c.data_layer.sources.len(), 1);
    assert_eq!(c.data_layer.sources[0].extractors, vec!["metrics-extractor".to_string()]);
    assert_eq!(c.plugin("metrics-source").unwrap().kind, PluginKind::DataSource);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // The implicit producer is marked as such.
    assert!(c.plugin("approx-prefix-cache-producer").unwrap().implicit);
}

#[test]
fn the_default_config_is_upstreams_current_baseline() {
    let ours = PickerConfig::default_config().unwrap();
    assert_eq!(
        profile_of(&ours),
        owned(&[
            ("approx-prefix-cache-producer", 1.0),
            ("inflight-load-producer", 1.0),
            ("prefix-cache-affinity-filter", 1.0),
            ("prefix-cache-scorer", 1.0),
            ("token-load-scorer", 1.0),
            ("lora-affinity-scorer", 1.0),
            ("active-request-scorer", 0.02),
            ("no-hit-lru-scorer", 0.0001),
            ("max-score-picker", 1.0)
        ])
    );
    assert!(ours.warnings.is_empty(), "{:?}", ours.warnings);
    // The guide's config gets its producer too (with autoTune, as upstream).
    let guide = PickerConfig::parse(GUIDE, None).unwrap();
    let producer = guide.plugins.iter().find(|p| p.type_name == "approx-prefix-cache-producer").expect("implicit");
    assert!(producer.implicit && producer.parameters.get("autoTune").is_none(), "{producer:?}");
}

#[test]
fn all_api_versions_are_accepted() {
    for v in epp::config::API_VERSIONS {
        let text = format!("apiVersion: {v}\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n");
        let c = PickerConfig::parse(&text, None).unwrap();
        // No profile given: every scheduling plugin at weight 1.
        assert_eq!(profile_of(&c), owned(&[("queue-scorer", 1.0)]));
    }
}

#[test]
fn prefix_scorer_parameters_reach_the_implicit_producer() {
    let text = r#"
apiVersion: llm-d.ai/v1
plugins:
- type: prefix-cache-scorer
  parameters: {blockSizeTokens: 32, lruCapacityPerServer: 1000}
schedulingProfiles:
- name: p
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 1.5
"#;
    let c = PickerConfig::parse(text, None).unwrap();
    let producer = c.plugin("approx-prefix-cache-producer").unwrap();
    assert_eq!(producer.parameters["blockSizeTokens"], 32);
    assert_eq!(producer.parameters["lruCapacityPerServer"], 1000);
    assert_eq!(profile_of(&c)[1], ("prefix-cache-scorer".to_string(), 1.5));
}

/// `utilization-filter` gets the in-flight producer only when a condition caps
/// `active-requests`, the one metric of its that the producer supplies.
#[test]
fn utilization_filter_gets_the_inflight_producer_when_it_caps_active_requests() {
    let config = |metric: &str| {
        format!(
            r#"
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: utilization-filter
  parameters:
    conditions: [{{metric: {metric}, maxValue: 4}}]
    fallbackOnEmpty: true
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: utilization-filter
  - pluginRef: queue-scorer
"#
        )
    };
    let c = PickerConfig::parse(&config("active-requests"), None).unwrap();
    let producer = c.plugin("inflight-load-producer").expect("implicit in-flight producer");
    assert!(producer.implicit);
    assert_eq!(profile_of(&c)[0].0, "approx-prefix-cache-producer", "the in-flight producer reads prefix columns");
    assert_eq!(profile_of(&c)[1].0, "inflight-load-producer");
    let c = PickerConfig::parse(&config("waiting-queue"), None).unwrap();
    assert!(c.plugin("inflight-load-producer").is_none(), "{:?}", profile_of(&c));
    // Both build and schedule with the embedded components.
    for metric in ["active-requests", "waiting-queue"] {
        let c = PickerConfig::parse(&config(metric), None).unwrap();
        let mut built = epp::loader::build(runtime(), &c, &Default::default()).expect("builds");
        let profile = built.scheduler.variants.remove(0).profile;
        assert!(profile.pool_changed(1, &pool(3)).is_empty());
        let m = metrics(&[(0, 9.0, 0.0, 0.0), (1, 1.0, 0.0, 0.0), (2, 3.0, 0.0, 0.0)]);
        let r = profile.schedule(1, &request("r", "hello"), &m).expect(metric);
        assert_eq!(r.targets[0], 1, "{metric}: shortest queue among the kept");
    }
}

/// Every built-in scheduling type, aliases included, has its component embedded.
#[test]
fn every_builtin_scheduling_type_has_an_embedded_component() {
    for (type_name, kind) in epp::config::BUILTIN_TYPES {
        if *kind == PluginKind::Scheduling {
            assert!(epp::wasm::embedded::find(type_name).is_some(), "{type_name} has no component");
        }
    }
}

/// Upstream's role filters keep the endpoints of their `llm-d.ai/role` (decode also keeps
/// the unlabelled ones); they take no parameters of their own.
#[test]
fn role_filters_keep_the_endpoints_of_their_role() {
    let mut eps = pool(5);
    for (e, role) in eps.iter_mut().zip(["decode", "prefill", "both", "encode"]) {
        e.labels.push(("llm-d.ai/role".into(), role.into()));
    }
    for (type_name, params, want) in [
        ("decode-filter", "", vec![0, 2, 4]),
        ("prefill-filter", "", vec![1, 2]),
        ("encode-filter", "\n  parameters: {label: gpu}", vec![3]),
    ] {
        let text = format!(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: {type_name}{params}\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: {type_name}\n  - pluginRef: queue-scorer\n"
        );
        let c = PickerConfig::parse(&text, None).unwrap();
        assert_eq!(c.warnings.len(), usize::from(!params.is_empty()), "{type_name}: {:?}", c.warnings);
        let mut built = epp::loader::build(runtime(), &c, &Default::default()).expect("builds");
        let profile = built.scheduler.variants.remove(0).profile;
        assert!(profile.pool_changed(1, &eps).is_empty());
        let r = profile.schedule(1, &request("r", "hello"), &crate::common::idle(5)).expect(type_name);
        let mut kept = r.table.ids().to_vec();
        kept.sort();
        assert_eq!(kept, want, "{type_name}");
    }
}

#[test]
fn extensions_wasm_policy_and_sandbox() {
    let text = r#"
apiVersion: llm-d.ai/v1alpha1
plugins:
- name: mine
  type: my-custom-scorer
  wasm: plugins/mine.wasm
  failurePolicy: failClosed
  sandbox: {memoryMiB: 32, callTimeoutMs: 20}
"#;
    let c = PickerConfig::parse(text, Some(std::path::Path::new("/etc/epp"))).unwrap();
    let p = c.plugin("mine").unwrap();
    assert_eq!(p.wasm.as_deref(), Some(std::path::Path::new("/etc/epp/plugins/mine.wasm")));
    assert_eq!(p.failure_policy, FailurePolicy::FailClosed);
    assert_eq!(p.sandbox.memory_bytes, 32 << 20);
    assert_eq!(p.sandbox.call_timeout_ms, 20);
}

#[test]
fn unknown_keys_are_warned_not_dropped_silently() {
    let text = "apiVersion: llm-d.ai/v1\nparser: {}\nsurprise: 1\nplugins:\n- type: queue-scorer\n  colour: red\n";
    let c = PickerConfig::parse(text, None).unwrap();
    assert_eq!(c.warnings.len(), 3, "{:?}", c.warnings);
    assert!(c.warnings.iter().any(|w| w.contains("`surprise`")));
    assert!(c.warnings.iter().any(|w| w.contains("`colour`")));
    // An extractor's engine settings are read; what is accepted and not read is said.
    let text = "apiVersion: llm-d.ai/v1\nplugins:\n- type: core-metrics-extractor\n  parameters:\n    \
                defaultEngine: sglang\n    engineConfigs:\n    - {name: mine, queuedRequestsSpec: q, loraGPULoadedSpec: x}\n";
    let c = PickerConfig::parse(text, None).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("engineConfigs[0].loraGPULoadedSpec` is accepted and not read"), "{:?}", c.warnings);
    let engines = c.engines(Default::default()).unwrap();
    let (unlabelled, _) = engines.resolve(&Default::default());
    assert_eq!(unlabelled.waiting, "sglang:num_queue_reqs", "defaultEngine: sglang");
    let mine = [("llm-d.ai/engine-type".to_string(), "mine".to_string())].into();
    assert_eq!(engines.resolve(&mine).0.waiting, "q");
}

#[test]
fn mistakes_are_errors_naming_the_field() {
    let head = "apiVersion: llm-d.ai/v1\n";
    let cases: &[(&str, &str)] = &[
        ("plugins: [", "not valid YAML"),
        ("", "empty"),
        ("apiVersion: v9\n", "`apiVersion`"),
        ("kind: Pod\n", "`kind`"),
        ("plugins:\n- type: warp-drive-scorer\n", "`plugins[0].type`: unknown plugin type `warp-drive-scorer`"),
        ("plugins:\n- name: x\n", "`plugins[0].type`: missing"),
        ("plugins:\n- type: queue-scorer\n- type: queue-scorer\n", "`plugins[1].name`: duplicate"),
        ("plugins:\n- type: queue-scorer\n  parameters: [1]\n", "`plugins[0].parameters`"),
        ("plugins:\n- type: queue-scorer\n  failurePolicy: sometimes\n", "`plugins[0].failurePolicy`"),
        ("plugins:\n- type: queue-scorer\n  sandbox: {memoryMiB: 0}\n", "`plugins[0].sandbox.memoryMiB`"),
        ("plugins:\n- type: file-discovery\n  wasm: x.wasm\n", "`plugins[0].wasm`"),
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: queue-scorer\n    weight: -1\n",
            "`schedulingProfiles[0].plugins[0].weight`",
        ),
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: queue-scorer\n    weight: 3.0e38\n",
            "`schedulingProfiles[0].plugins[0].weight`: weight must be a number from 0 to 1000000",
        ),
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: queue-scorer\n    weight: heavy\n",
            "`schedulingProfiles[0].plugins[0].weight`: weight must be a number",
        ),
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: nope\n",
            "`schedulingProfiles[0].plugins[0].pluginRef`: no plugin named `nope`",
        ),
        (
            "plugins:\n- type: file-discovery\n  parameters: {path: e.yaml}\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: file-discovery\n",
            "not a filter, scorer or picker",
        ),
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n- name: b\n",
            "`schedulingProfiles`: 2 profiles given; without an `experiment`",
        ),
        (
            "plugins:\n- type: queue-scorer\ndataLayer:\n  discovery:\n    pluginRef: queue-scorer\n",
            "`dataLayer.discovery.pluginRef`",
        ),
        ("dataLayer:\n  sources:\n  - pluginRef: ghost\n", "`dataLayer.sources[0].pluginRef`: no plugin named `ghost`"),
        (
            "plugins:\n- type: core-metrics-extractor\n  parameters: {defaultEngine: tgi}\n",
            "`plugins[0].parameters.defaultEngine`: `tgi` is not an engine (known: atom, sglang,",
        ),
        (
            "plugins:\n- type: core-metrics-extractor\n  parameters: {engineConfigs: [{name: x, runningRequestsSpec: \"r{\"}]}\n",
            "`plugins[0].parameters.engineConfigs[0]`: metric `r{`",
        ),
    ];
    for (body, expected) in cases {
        let text =
            if body.starts_with("apiVersion") || body.is_empty() { body.to_string() } else { format!("{head}{body}") };
        let err: ConfigError = PickerConfig::parse(&text, None).expect_err(body);
        assert!(
            err.to_string().contains(expected),
            "config {body:?}\n  error: {err}\n  expected to contain: {expected}"
        );
    }
}

#[test]
fn discovery_via_endpoints_ref_is_understood() {
    let text = "apiVersion: llm-d.ai/v1\nplugins:\n- type: file-discovery\n  name: files\n  parameters: {path: e.yaml}\n- type: queue-scorer\ndataLayer:\n  discovery:\n    endpoints:\n      pluginRef: files\n";
    let c = PickerConfig::parse(text, None).unwrap();
    assert_eq!(c.discovery().unwrap().name, "files");
    assert!(c.data_layer.inject_defaults);
}

#[test]
fn upstreams_flow_control_config_is_accepted() {
    let text = r#"
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: ["flowControl"]
plugins:
- type: max-score-picker
- type: utilization-detector
  parameters: {queueDepthThreshold: 2, kvCacheUtilThreshold: 0.85, metricsStalenessThreshold: 200ms, headroom: 0.0}
- type: round-robin-fairness-policy
- type: edf-ordering-policy
- name: limit
  type: static-usage-limit-policy
  parameters: {threshold: 0.9}
flowControl:
  maxBytes: 4Gi
  maxRequests: "20000"
  defaultRequestTTL: 30s
  noEndpointRequestTTL: 5m
  defaultPriorityBand: {maxRequests: 2000}
  defaultNegativePriorityBand: {maxRequests: 50, maxBytes: 100M}
  priorityBands:
  - {priority: 100, maxBytes: 500M, maxRequests: 500, fairnessPolicyRef: round-robin-fairness-policy, orderingPolicyRef: edf-ordering-policy}
  usageLimitPolicyPluginRef: limit
  saturationDetector: {pluginRef: utilization-detector}
"#;
    use epp::config::flow::{DetectorSpec, Fairness, Ordering};
    let c = PickerConfig::parse(text, None).unwrap_or_else(|e| panic!("{e}"));
    let f = &c.flow;
    assert!(f.enabled);
    assert_eq!((f.max_bytes, f.max_requests), (4 << 30, 20_000));
    assert_eq!(f.request_ttl, Some(std::time::Duration::from_secs(30)));
    assert_eq!(f.no_endpoint_ttl, Some(std::time::Duration::from_secs(300)));
    assert_eq!(f.usage_limit, 0.9);
    let priorities: Vec<i32> = f.bands.iter().map(|b| b.priority).collect();
    assert_eq!(priorities, [100, 0], "band 0 is always there");
    let top = &f.bands[0];
    assert_eq!(
        (top.max_bytes, top.max_requests, top.fairness, top.ordering),
        (500_000_000, 500, Fairness::RoundRobin, Ordering::Edf)
    );
    assert_eq!((f.bands[1].max_requests, f.bands[1].max_bytes), (2000, 1_000_000_000), "0 or absent → default");
    let neg = f.band_for(-3);
    assert_eq!((neg.priority, neg.max_requests, neg.max_bytes), (-3, 50, 100_000_000));
    match &f.detector {
        DetectorSpec::Utilization(s) => assert_eq!((s.queue_depth_threshold, s.kv_cache_threshold), (2.0, 0.85)),
        other => panic!("{other:?}"),
    }
    // The legacy admission reads the same detector.
    assert_eq!(c.saturation.queue_depth_threshold, 2.0);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn flow_control_mistakes_name_the_field_and_a_disabled_section_is_warned() {
    let head = "apiVersion: llm-d.ai/v1\nplugins:\n- type: max-score-picker\n";
    let cases: &[(&str, &str)] = &[
        ("featureGates: [warpDrive]\n", "`featureGates[0]`: feature gate 'warpDrive' is unknown"),
        ("featureGates: [flowControl]\nflowControl: {maxBytes: -1}\n", "`flowControl.maxBytes`: must be non-negative"),
        (
            "featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1, maxRequests: -5}]}\n",
            "`flowControl.priorityBands[0].maxRequests`",
        ),
        (
            "featureGates: [flowControl]\nflowControl: {defaultPriorityBand: {fairnessPolicyRef: fair-dice}}\n",
            "`flowControl.defaultPriorityBand.fairnessPolicyRef`: plugin \"fair-dice\" not found",
        ),
        (
            "featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1}, {priority: 1}]}\n",
            "duplicate priority level 1",
        ),
        ("featureGates: [flowControl]\nflowControl: {defaultRequestTTL: soon}\n", "`flowControl.defaultRequestTTL`"),
        ("featureGates: [flowControl]\nflowControl: {bogus: 1}\n", "bogus"),
        (
            "featureGates: [flowControl]\nflowControl: {saturationDetector: {pluginRef: max-score-picker}}\n",
            "`flowControl.saturationDetector.pluginRef`: plugin `max-score-picker` is a max-score-picker",
        ),
    ];
    for (tail, want) in cases {
        let text = format!("{head}{tail}");
        let e = PickerConfig::parse(&text, None).err().unwrap_or_else(|| panic!("accepted: {text}")).to_string();
        assert!(e.contains(want), "{text}\n→ {e}\n(wanted {want})");
    }
    // A usage limit of 0 would dispatch nothing, whether the policy is referenced or not.
    for reference in ["", "  usageLimitPolicyPluginRef: limit\n"] {
        let text = format!(
            "{head}- name: limit\n  type: static-usage-limit-policy\n  parameters: {{threshold: 0}}\nfeatureGates: [flowControl]\nflowControl:\n  maxRequests: 10\n{reference}"
        );
        let e = PickerConfig::parse(&text, None).err().unwrap_or_else(|| panic!("accepted: {text}")).to_string();
        assert!(e.contains("`plugins[limit].parameters.threshold`: must be > 0"), "{text}\n→ {e}");
    }
    let off = PickerConfig::parse(&format!("{head}flowControl: {{maxRequests: 10}}\n"), None).unwrap();
    assert!(!off.flow.enabled);
    assert!(off.warnings.iter().any(|w| w.contains("feature gate is disabled")), "{:?}", off.warnings);
}

/// Upstream's top-level `saturationDetector: {pluginRef: …}` (deprecated there for
/// flowControl's, which wins when both are set) names the detector of admission and flow
/// control alike.
#[test]
fn the_top_level_saturation_detector_reference_is_understood() {
    use epp::config::flow::DetectorSpec;
    let head = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: max-score-picker\n\
                - type: concurrency-detector\n  parameters: {maxConcurrency: 7}\n- type: utilization-detector\n";
    let c = PickerConfig::parse(&format!("{head}saturationDetector: {{pluginRef: concurrency-detector}}\n"), None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(c.flow.detector, DetectorSpec::Concurrency { max_requests: 7, .. }), "{:?}", c.flow.detector);
    let both = format!(
        "{head}saturationDetector: {{pluginRef: concurrency-detector}}\nfeatureGates: [flowControl]\n\
         flowControl: {{saturationDetector: {{pluginRef: utilization-detector}}}}\n"
    );
    let c = PickerConfig::parse(&both, None).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(c.flow.detector, DetectorSpec::Utilization(_)), "{:?}", c.flow.detector);
    let e = match PickerConfig::parse(&format!("{head}saturationDetector: {{pluginRef: max-score-picker}}\n"), None) {
        Ok(_) => panic!("a picker is no detector"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("`saturationDetector.pluginRef`"), "{e}");
}

#[test]
fn the_shipped_flow_control_example_loads() {
    let text = include_str!("../../config/flow-control.yaml");
    let c = PickerConfig::parse(text, None).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.flow.enabled && c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.flow.bands.iter().map(|b| b.priority).collect::<Vec<_>>(), [1, 0]);
    assert_eq!(c.saturation.queue_depth_threshold, 1.0);
}

#[test]
fn the_state_store_is_read_and_checked() {
    let with = |url: &str| format!("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nstateStore: {url}\n");
    let c = PickerConfig::parse(&with("redis://10.0.0.9:6379/2"), None).expect("a redis url");
    assert_eq!(c.state_store.as_deref(), Some("redis://10.0.0.9:6379/2"));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    for bad in ["http://10.0.0.9:6379", "rediss://10.0.0.9:6379"] {
        let e = PickerConfig::parse(&with(bad), None).expect_err(bad).to_string();
        assert!(e.contains("stateStore"), "{bad}: {e}");
    }
    assert_eq!(PickerConfig::parse(&with("redis://h:1"), None).map(|c| c.state_store.is_some()).ok(), Some(true));
    assert!(PickerConfig::default_config().expect("default").state_store.is_none());
}

/// What keeps the EPP from starting is printed as one chain naming the cause, last in its
/// output, with no backtrace even when `RUST_BACKTRACE` asks for one: operators (and the
/// test stack, which retries on a port taken meanwhile) read the reason from there.
#[test]
fn startup_errors_are_one_line_naming_the_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let dir = crate::common::TempDir::new("config", "startup");
    let endpoints = dir.join("endpoints.yaml");
    std::fs::write(&endpoints, "endpoints: []\n").expect("endpoints");
    let discovery = format!(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: file-discovery\n  parameters:\n    path: {}\n",
        endpoints.display()
    );
    let missing = dir.join("no-such-config.yaml");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
            .args(["--bind-address", "127.0.0.1", "--metrics-bind-address", "127.0.0.1", "--secure-serving=false"])
            .args(["--grpc-health-port", "0", "--metrics-port", "0"])
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("run epp");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let cases: [(Vec<&str>, &str); 2] = [
        (vec!["--grpc-port", &port, "--config-text", &discovery], "Address already in use"),
        (vec!["--grpc-port", "0", "--config-file", missing.to_str().expect("path")], "no-such-config.yaml"),
    ];
    for (args, cause) in cases {
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(1), "{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: ") && last.contains(cause), "last line {last:?} of:\n{stderr}");
        assert!(!stderr.contains("backtrace"), "{stderr}");
    }
}

/// An attribute plugin reading a key that no extractor's `customMetrics` declares loads
/// (the key may be a producer's of a later config) and is warned about by name.
#[test]
fn an_attribute_no_extractor_declares_is_warned_about() {
    let config = |key: &str| {
        format!(
            "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: core-metrics-extractor
  parameters:
    engineConfigs:
    - name: e
      queuedRequestsSpec: q
      customMetrics: [{{attributeKey: gpu.temp, metricSpec: temp}}]
- name: cool
  type: endpoint-attribute-filter
  parameters: {{attribute: {key}, algorithm: {{type: threshold, threshold: {{operator: LessThan, value: 1}}}}}}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: cool
"
        )
    };
    let declared = PickerConfig::parse(&config("gpu.temp"), None).unwrap();
    assert!(declared.warnings.is_empty(), "{:?}", declared.warnings);
    let typo = PickerConfig::parse(&config("gpu.tmp"), None).unwrap();
    assert!(
        typo.warnings.iter().any(|w| w.contains("plugin `cool`") && w.contains("`gpu.tmp`") && w.contains("gpu.temp")),
        "{:?}",
        typo.warnings
    );
}
