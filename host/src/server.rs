//! Wires the EPP together and runs it: config → scheduler (wasm plugins) → datastore fed by
//! file discovery → the ext_proc gRPC server (with gRPC health on the same port, as the
//! upstream Envoy config checks it there) and a separate gRPC health server.
//!
//! Health reports NOT_SERVING until the first endpoint set is loaded. It owns start-up and
//! shutdown order; the request path lives in `ext_proc` and `routing`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::config::{ConfigError, PickerConfig};
use crate::datastore::{Datastore, EngineInfo, Reading};
use crate::discovery::{DiscoveryError, FileDiscovery, FileDiscoveryParams};
use crate::ext_proc::{self, ExtProc};
use crate::loader::{self, BuildError};
use crate::metrics_scrape::{EngineMetrics, MetricNames, ScrapeConfig, ScrapeError, ScrapeSink, ScrapeTarget, Scraper};
use crate::publisher::Publisher;
use crate::reload::Reloader;
use crate::routing::Router;
use crate::telemetry::{self, Telemetry};
use crate::wasm::{LoadError, WasmRuntime};

/// Where the config comes from.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    File(PathBuf),
    Text(String),
    Default,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub bind: IpAddr,
    pub grpc_port: u16,
    pub grpc_health_port: u16,
    pub metrics_port: u16,
    /// Where the metrics endpoint listens (defaults to `bind`).
    pub metrics_bind: IpAddr,
    /// How often pool gauges are recomputed.
    pub refresh_prometheus_interval: std::time::Duration,
    /// How often each worker's /metrics is scraped.
    pub refresh_metrics_interval: std::time::Duration,
    /// Metrics older than this are unknown to scorers (and excluded from pool gauges).
    pub metrics_staleness: std::time::Duration,
    /// Keep compiled plugins in wasmtime's on-disk cache.
    pub wasm_disk_cache: bool,
    /// Requests in flight beyond this get 429.
    pub max_in_flight: usize,
    /// Names of the vLLM metrics read from each worker.
    pub metric_names: MetricNames,
    pub config: ConfigSource,
    pub max_body_bytes: usize,
    /// Serve ext_proc over TLS.
    pub secure_serving: bool,
    /// Folder with `tls.crt` and `tls.key`; without it a self-signed certificate is made.
    pub cert_path: Option<PathBuf>,
    /// After a shutdown signal, how long in-flight streams may take to finish.
    pub drain_timeout: std::time::Duration,
    /// Bind with SO_REUSEPORT (a replacement process can bind the same ports).
    pub reuse_port: bool,
    /// `redis://host:port[/db]`: share routing state with other replicas (overrides the
    /// config's `stateStore`).
    pub state_store: Option<String>,
    pub pool_name: String,
    pub pool_namespace: String,
    /// The passive breaker's settings.
    pub health: crate::health::HealthConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot build the scheduler: {0}")]
    Build(#[from] BuildError),
    #[error("cannot start the wasm runtime: {0}")]
    Runtime(#[from] LoadError),
    #[error("endpoint discovery: {0}")]
    Discovery(#[from] DiscoveryError),
    #[error(
        "the config has no discovery plugin; add `- type: file-discovery` with `parameters: {{path: endpoints.yaml}}`"
    )]
    NoDiscovery,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot watch the config file: {0}")]
    Watch(String),
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("{0}")]
    StateStore(String),
    #[error("gRPC server on {addr} failed: {error}")]
    Serve { addr: SocketAddr, error: tonic::transport::Error },
}

/// Loads the config named by `source`; relative paths in it resolve against its folder
/// (or the working directory for text and the built-in default).
pub fn load_config(source: &ConfigSource) -> Result<PickerConfig, ConfigError> {
    let config = match source {
        ConfigSource::File(path) => PickerConfig::from_file(path)?,
        ConfigSource::Text(text) => PickerConfig::parse(text, None)?,
        ConfigSource::Default => PickerConfig::default_config()?,
    };
    for w in &config.warnings {
        warn!("config: {w}");
    }
    Ok(config)
}

/// Runs the EPP until `shutdown` resolves.
pub async fn run(opts: Options, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServerError> {
    let config = load_config(&opts.config)?;
    let runtime = if opts.wasm_disk_cache { WasmRuntime::with_disk_cache()? } else { WasmRuntime::new()? };
    let telemetry = Telemetry::new(&opts.pool_name);
    // Precise prefix routing's event intake; idle unless a config uses it (kept across reloads).
    let kv_events = crate::kv_events::KvEvents::new(Some(telemetry.clone()));
    let built = loader::build(&runtime, &config, &loader::PluginSet::with_kv_events(kv_events.clone()))?;
    let datastore = Arc::new(Datastore::new());
    let first = crate::routing::Built::new(built.scheduler, &telemetry)
        .with_flow(config.flow.clone())
        .with_precise(built.plugins.precise().cloned());
    let mut router = Router::with_built(datastore.clone(), first, telemetry.clone());
    router.metrics_staleness_ms = opts.metrics_staleness.as_millis().min(u32::MAX as u128) as u32;
    router.max_in_flight = opts.max_in_flight;
    router.set_health(opts.health.clone());
    let router = Arc::new(router);
    let flow = router.start_flow_control();
    tokio::spawn({
        let (hub, datastore, router) = (kv_events.clone(), datastore.clone(), router.clone());
        async move {
            // The event intake follows the installed scheduler's precise settings and the
            // pool (idle while no config uses precise routing).
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
            let mut seen: Option<(u64, Option<Arc<crate::kv_events::Settings>>)> = None;
            loop {
                tick.tick().await;
                let pool = datastore.snapshot();
                let precise = router.built().precise.clone();
                let same = seen.as_ref().is_some_and(|(generation, settings)| {
                    *generation == pool.generation
                        && settings.as_ref().map(Arc::as_ptr) == precise.as_ref().map(Arc::as_ptr)
                });
                if !same {
                    hub.sync(precise.as_ref(), &pool);
                    seen = Some((pool.generation, precise));
                }
            }
        }
    });
    if config.flow.enabled {
        info!(bands = ?config.flow.bands.iter().map(|b| b.priority).collect::<Vec<_>>(), "flow control on");
    }
    if opts.health.enabled() {
        let health = router.health().clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                health.tick();
            }
        });
    }

    let scraper = match config.metrics_source()? {
        Some((scheme, path)) => {
            let scrape = ScrapeConfig {
                scheme,
                path,
                interval: opts.refresh_metrics_interval,
                timeout: std::time::Duration::from_secs(1),
            };
            info!(path = %scrape.path, interval_ms = scrape.interval.as_millis() as u64, "scraping worker metrics");
            Some(scrape)
        }
        None => {
            warn!(
                "the config has no metrics source (dataLayer.injectDefaults is off and no sources): scorers see no load"
            );
            None
        }
    };
    // Scrapers report to the publisher, which owns every change to the pool; the publisher
    // tells the scrapers which endpoints exist. The cell breaks that cycle at start-up.
    let scraper_cell: Arc<std::sync::OnceLock<Arc<Scraper>>> = Arc::default();
    let (loaded_tx, mut loaded_rx) = watch::channel(false);
    // Each endpoint's page is read with its engine's names (the engine label), vLLM's by
    // default.
    let engines = config.engines(opts.metric_names.clone())?;
    let on_pool = {
        let cell = scraper_cell.clone();
        // An endpoint labelled with an unknown engine is warned about once (per label value):
        // the notes of the last publication, by endpoint.
        let warned: std::sync::Mutex<std::collections::HashMap<String, String>> = Default::default();
        Box::new(move |snapshot: &crate::datastore::PoolSnapshot| {
            if let Some(scraper) = cell.get() {
                let mut warned = warned.lock().unwrap_or_else(|p| p.into_inner());
                let mut notes = std::collections::HashMap::new();
                let targets: Vec<ScrapeTarget> = snapshot
                    .endpoints
                    .iter()
                    .map(|e| {
                        let key = e.spec.key();
                        let (names, note) = engines.resolve(&e.spec.labels);
                        if let Some(note) = note {
                            if warned.get(&key) != Some(&note) {
                                warn!(endpoint = %key, "{note}");
                            }
                            notes.insert(key.clone(), note);
                        }
                        ScrapeTarget { id: e.id, key, addr: e.spec.metrics_target(), names }
                    })
                    .collect();
                *warned = notes;
                scraper.sync(&targets);
            }
        })
    };
    let publisher = Publisher::start(router.clone(), on_pool, loaded_tx)
        .map_err(|e| ServerError::Watch(format!("cannot start the pool publisher: {e}")))?;
    if let Some(scrape) = scraper {
        let sink = PoolSink { router: router.clone(), publisher: publisher.clone() };
        let _ = scraper_cell.set(Arc::new(Scraper::new(scrape, Arc::new(sink))));
    }
    // With a config file, changes to it (or to the components it names) are applied live.
    let _config_watch = match &opts.config {
        ConfigSource::File(path) => {
            let reloader =
                Reloader::new(runtime.clone(), path.clone(), router.clone(), publisher.clone(), &config, built.plugins);
            Some(reloader.watch().map_err(ServerError::Watch)?)
        }
        _ => None,
    };

    let discovery_spec = config.discovery().ok_or(ServerError::NoDiscovery)?;
    let params = FileDiscoveryParams::from_json(&discovery_spec.parameters, config.base_dir.as_deref())?;
    let on_update = {
        let publisher = publisher.clone();
        move |specs: Arc<Vec<crate::discovery::EndpointSpec>>| publisher.endpoints(specs)
    };
    info!(path = %params.path.display(), watch = params.watch_file, "starting file discovery");
    let discovery = FileDiscovery::start(params, on_update)?;

    let (health, health_service) = tonic_health::server::health_reporter();
    for service in ["", ext_proc::SERVICE_NAME] {
        health.set_service_status(service, ServingStatus::NotServing).await;
    }
    let state_url = opts.state_store.clone().or_else(|| config.state_store.clone());
    if let Some(url) = &state_url {
        crate::state_store::check_url(url).map_err(ServerError::StateStore)?;
    }
    // Set once shutdown begins; held while a health status is set, so SERVING (after a slow
    // start or state-store warm-up) can never land after the drain's NOT_SERVING.
    let stopping = Arc::new(tokio::sync::Mutex::new(false));
    {
        let health = health.clone();
        let stopping = stopping.clone();
        let (router, telemetry, pool) =
            (router.clone(), telemetry.clone(), format!("{}/{}", opts.pool_namespace, opts.pool_name));
        tokio::spawn(async move {
            if loaded_rx.wait_for(|loaded| *loaded).await.is_ok() {
                // With a shared state store, peers' decisions are replayed before serving.
                if let Some(url) = state_url {
                    match crate::state_store::StateStore::start(&url, &pool, router.clone(), telemetry) {
                        Ok(store) => {
                            router.set_sink(store.clone());
                            if !store.warmed(std::time::Duration::from_secs(10)).await {
                                warn!("the state store's history was not replayed within 10 s; serving on local state");
                            }
                        }
                        Err(e) => warn!(error = %e, "state store not started; routing on local state"),
                    }
                }
                let stopping = stopping.lock().await;
                if *stopping {
                    return;
                }
                for service in ["", ext_proc::SERVICE_NAME] {
                    health.set_service_status(service, ServingStatus::Serving).await;
                }
                info!("endpoints loaded; health is SERVING");
            }
        });
    }

    let grpc_addr = SocketAddr::new(opts.bind, opts.grpc_port);
    let health_addr = SocketAddr::new(opts.bind, opts.grpc_health_port);
    let metrics_addr = SocketAddr::new(opts.metrics_bind, opts.metrics_port);
    let grpc_listener = bind(grpc_addr, opts.reuse_port)?;
    let health_listener = bind(health_addr, opts.reuse_port)?;
    let metrics_listener = bind(metrics_addr, opts.reuse_port)?;
    info!(
        ext_proc = %grpc_listener.local_addr().unwrap_or(grpc_addr),
        health = %health_listener.local_addr().unwrap_or(health_addr),
        metrics = %metrics_listener.local_addr().unwrap_or(metrics_addr),
        pool = %format!("{}/{}", opts.pool_namespace, opts.pool_name),
        "EPP listening"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_rx_main = stop_rx.clone();
    tokio::spawn(async move {
        shutdown.await;
        // Health checkers (Envoy's, a replacement's operator) see the drain at once.
        let mut stopping = stopping.lock().await;
        *stopping = true;
        for service in ["", ext_proc::SERVICE_NAME] {
            health.set_service_status(service, ServingStatus::NotServing).await;
        }
        drop(stopping);
        stop_tx.send_replace(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    tokio::spawn({
        let stop = stopped(stop_rx.clone());
        let telemetry = telemetry.clone();
        async move {
            if let Err(e) = telemetry::serve(telemetry, metrics_listener, stop).await {
                warn!(error = %e, "metrics endpoint failed");
            }
        }
    });
    tokio::spawn({
        let router = router.clone();
        let stats = discovery.stats_source();
        let every = opts.refresh_prometheus_interval;
        async move {
            let mut tick = tokio::time::interval(every);
            let mut counted = (0u64, 0u64);
            loop {
                tick.tick().await;
                router.refresh_pool_gauges();
                let s = stats();
                router.telemetry().discovery_reloads(
                    s.reloads_applied.saturating_sub(counted.0),
                    s.reloads_rejected.saturating_sub(counted.1),
                );
                counted = (s.reloads_applied, s.reloads_rejected);
            }
        }
    });

    let ext_proc = ExtProc::new(router.clone(), opts.max_body_bytes).into_server();
    let mut main_builder = crate::ext_proc::Keepalive::default().apply(tonic::transport::Server::builder());
    if opts.secure_serving {
        main_builder = main_builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(tls_identity(opts.cert_path.as_deref())?))
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    }
    let main_server = main_builder
        .add_service(health_service.clone())
        .add_service(ext_proc)
        .serve_with_incoming_shutdown(incoming(grpc_listener), stopped(stop_rx.clone()));
    let health_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .serve_with_incoming_shutdown(incoming(health_listener), stopped(stop_rx));
    let servers = async { tokio::join!(main_server, health_server) };
    tokio::pin!(servers);
    // Once shutdown begins, in-flight streams get `drain_timeout` to finish.
    let mut draining = stop_rx_main.clone();
    let (a, b) = tokio::select! {
        done = &mut servers => done,
        _ = async {
            let _ = draining.wait_for(|s| *s).await;
            // Queued requests are answered (503) rather than left to the drain timeout.
            flow.shutdown();
            info!(timeout_s = opts.drain_timeout.as_secs_f64(), "draining in-flight requests");
            tokio::time::sleep(opts.drain_timeout).await;
        } => {
            warn!(in_flight = router.in_flight(), "drain timeout reached; stopping with requests in flight");
            drop(discovery);
            return Ok(());
        }
    };
    drop(discovery);
    a.map_err(|error| ServerError::Serve { addr: grpc_addr, error })?;
    b.map_err(|error| ServerError::Serve { addr: health_addr, error })?;
    info!("EPP stopped");
    Ok(())
}

/// A listener on `addr`; with `reuse_port`, shared with other processes that bound it the
/// same way (the kernel spreads new connections over them).
fn bind(addr: SocketAddr, reuse_port: bool) -> Result<tokio::net::TcpListener, ServerError> {
    let err = |error| ServerError::Bind { addr, error };
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }.map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    if reuse_port {
        socket.set_reuseport(true).map_err(err)?;
    }
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// The server identity: `tls.crt` + `tls.key` from `cert_path`, or a fresh self-signed
/// certificate for `localhost` (as upstream does when no certificate is given).
fn tls_identity(cert_path: Option<&std::path::Path>) -> Result<tonic::transport::Identity, ServerError> {
    match cert_path {
        Some(dir) => {
            let read = |name: &str| {
                std::fs::read(dir.join(name))
                    .map_err(|e| ServerError::Tls(format!("{}: {e}", dir.join(name).display())))
            };
            Ok(tonic::transport::Identity::from_pem(read("tls.crt")?, read("tls.key")?))
        }
        None => {
            let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
            let certified = rcgen::generate_simple_self_signed(names).map_err(|e| ServerError::Tls(e.to_string()))?;
            info!("serving ext_proc over TLS with a self-signed certificate");
            Ok(tonic::transport::Identity::from_pem(certified.cert.pem(), certified.signing_key.serialize_pem()))
        }
    }
}

/// Where scrapes land: endpoint load into the datastore's cells, engine state (LoRA
/// adapters, cache geometry) to the publisher when it changed, failures into the
/// scrape-error counter.
struct PoolSink {
    router: Arc<Router>,
    publisher: Publisher,
}

impl ScrapeSink for PoolSink {
    fn scraped(&self, id: u32, m: &EngineMetrics) {
        let ds = self.router.datastore();
        ds.record_metrics(
            id,
            Reading { waiting: m.waiting as f32, running: m.running as f32, kv_usage: m.kv_usage as f32 },
        );
        ds.record_attributes(id, m.custom.clone());
        let engine = EngineInfo {
            max_lora: m.lora.as_ref().map(|l| l.max_lora),
            running_adapters: m.lora.as_ref().map(|l| l.running.clone()).unwrap_or_default(),
            waiting_adapters: m.lora.as_ref().map(|l| l.waiting.clone()).unwrap_or_default(),
            cache: m.cache.map(|c| epp_core::CacheInfo { block_size: c.block_size, num_gpu_blocks: c.num_gpu_blocks }),
        };
        // Most scrapes change nothing: only a change goes to the publisher.
        if ds.engine_differs(id, &engine) {
            self.publisher.engine(id, engine);
        }
    }

    fn failed(&self, _id: u32, target: &str, _error: &ScrapeError) {
        self.router.telemetry().scrape_failed(target);
    }
}

/// Accepted connections with TCP_NODELAY (without it, Nagle's algorithm meets Envoy's
/// delayed ACKs and every ext_proc exchange stalls for ~40 ms) and TCP keepalive (a peer
/// host gone without a FIN is found even on a connection with no HTTP/2 traffic).
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)))
}
