//! The pool publisher orders pool, engine and scheduler changes: however a config reload and
//! discovery updates race, the scheduler that ends up running was told the newest pool.

use std::sync::Arc;

use epp::config::PickerConfig;
use epp::datastore::{Datastore, EngineInfo};
use epp::discovery::EndpointSpec;
use epp::publisher::Publisher;
use epp::routing::{Built, Router};
use epp::telemetry::Telemetry;
use epp_core::CacheInfo;

use crate::common::runtime;

fn specs(n: usize, round: usize) -> Arc<Vec<EndpointSpec>> {
    Arc::new(
        (0..n)
            .map(|i| EndpointSpec {
                name: format!("e{i}"),
                namespace: "default".into(),
                address: "10.0.0.1".parse().unwrap(),
                // Each round moves one endpoint: a new endpoint, a new generation.
                port: 8000 + i as u16 + if i == round % n { 1000 } else { 0 },
                metrics_port: None,
                labels: [("round".to_string(), round.to_string())].into(),
            })
            .collect(),
    )
}

#[test]
fn racing_reloads_and_discovery_never_leave_a_scheduler_on_a_stale_pool() {
    let config = PickerConfig::default_config().unwrap();
    let build = || epp::loader::build(runtime(), &config, &Default::default()).unwrap().scheduler;
    let telemetry = Telemetry::new("test");
    let router = Arc::new(Router::new(Arc::new(Datastore::new()), build(), telemetry.clone()));
    let (loaded_tx, _loaded_rx) = tokio::sync::watch::channel(false);
    let publisher = Publisher::start(router.clone(), Box::new(|_| {}), loaded_tx).unwrap();
    publisher.endpoints(specs(4, 0));

    std::thread::scope(|s| {
        let discovery = publisher.clone();
        s.spawn(move || {
            for round in 1..200 {
                discovery.endpoints(specs(4, round));
                if round % 7 == 0 {
                    let cache = Some(CacheInfo { block_size: 16, num_gpu_blocks: 1000 + round as u32 });
                    discovery.engine(1 + (round % 4) as u32, EngineInfo { cache, ..Default::default() });
                }
            }
        });
        let reload = publisher.clone();
        let telemetry = telemetry.clone();
        s.spawn(move || {
            for _ in 0..12 {
                reload.scheduler(Arc::new(Built::new(build(), &telemetry)));
            }
        });
    });
    // Every change sent before this one has been applied once it returns.
    publisher.scheduler(Arc::new(Built::new(build(), &telemetry)));
    let pool = router.datastore().snapshot();
    assert!(pool.generation > 100, "the pool kept changing: generation {}", pool.generation);
    assert_eq!(router.built().told_generation(), pool.generation, "the running scheduler knows the newest pool");
    // And a discovery change after the last reload reaches it too.
    publisher.endpoints(specs(4, 500));
    publisher.scheduler(router.built());
    assert_eq!(router.built().told_generation(), router.datastore().snapshot().generation);
}
