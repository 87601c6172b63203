//! The HTTP front end of a simulated worker: axum routes for the OpenAI endpoints, `/metrics`,
//! `/health`, `/v1/models` and `/admin/fault`, plus [`spawn`] and the [`SimHandle`] that
//! owns a running server.
//!
//! It owns the wire: parsing goes through `openai.rs`, timing through `engine.rs`, metrics
//! text through `metrics.rs`. Every response, error or not, carries `x-sim-worker: <name>`,
//! and every error becomes an OpenAI-style JSON body in one place ([`ApiError`]). Request
//! bodies may arrive chunked (Envoy forwards them so); axum accepts that as long as handlers
//! take the body as bytes, which they do.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::Instrument;

use crate::config::{ServedModels, SimConfig};
use crate::engine::{Engine, Events, SubmitError};
use crate::fault::{FaultMode, FaultUpdate, Faults};
use crate::metrics::{self, MetricsInput};
use crate::model::{EventKind, Model, ModelParams, ModelRequest, Usage};
use crate::openai::{self, Api, InferenceRequest, ReplyMeta, RequestError};

/// The response header naming the worker.
pub const WORKER_HEADER: &str = "x-sim-worker";

/// Long prompts are the point of a prefix-cache benchmark; axum's 2 MiB default is too low.
const MAX_BODY_BYTES: usize = 64 << 20;

/// How long `shutdown` waits for connections to drain before abandoning them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Every way a request can fail; [`IntoResponse`] is the one place mapping them to HTTP.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error(transparent)]
    BadRequest(#[from] RequestError),
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error(transparent)]
    Rejected(#[from] SubmitError),
    #[error("could not read the request body: {0}")]
    Body(#[from] BytesRejection),
    #[error("injected fault")]
    Injected,
    #[error("not found")]
    NoRoute,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            ApiError::BadRequest(_) | ApiError::Rejected(SubmitError::Admit(_)) => {
                (StatusCode::BAD_REQUEST, "BadRequestError")
            }
            ApiError::ModelNotFound(_) | ApiError::NoRoute => (StatusCode::NOT_FOUND, "NotFoundError"),
            ApiError::Rejected(SubmitError::ShuttingDown) => {
                (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableError")
            }
            ApiError::Injected => (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError"),
            // Too large (413) or a broken connection (400): the rejection knows which.
            ApiError::Body(rejection) => (rejection.status(), "BadRequestError"),
        };
        let body = openai::error_body(status.as_u16(), kind, &self.to_string());
        (status, axum::Json(body)).into_response()
    }
}

struct App {
    name: String,
    served: ServedModels,
    params: ModelParams,
    metrics_names: crate::config::MetricsNames,
    extra_metrics: Arc<std::sync::Mutex<Vec<(String, f64)>>>,
    engine: Arc<Engine>,
    faults: Arc<Faults>,
    serial: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

/// A running worker. Dropping it (or calling [`SimHandle::shutdown`]) stops the server.
pub struct SimHandle {
    addr: SocketAddr,
    name: String,
    faults: Arc<Faults>,
    engine: Arc<Engine>,
    extra_metrics: Arc<std::sync::Mutex<Vec<(String, f64)>>>,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    kv_events_ports: Option<(u16, Option<u16>)>,
}

impl SimHandle {
    /// The bound address (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The KV-event ports (PUB, replay) when events are published.
    pub fn kv_events_ports(&self) -> Option<(u16, Option<u16>)> {
        self.kv_events_ports
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model's state now (queues, KV usage, cumulative counters: prefix-cache queries and
    /// hits are the ground truth a benchmark reads).
    pub fn stats(&self) -> crate::model::ModelStats {
        self.engine.stats()
    }

    /// Changes injected faults, as `POST /admin/fault` does; returns the resulting state.
    pub fn set_faults(&self, update: FaultUpdate) -> FaultUpdate {
        self.faults.apply(update)
    }

    /// Sets extra gauge `series` (`name` or `name{labels}`) on `/metrics` to `value`, adding
    /// it if new; `None` removes it.
    pub fn set_extra_metric(&self, series: &str, value: Option<f64>) {
        let mut extra = self.extra_metrics.lock().unwrap_or_else(|p| p.into_inner());
        extra.retain(|(s, _)| s != series);
        if let Some(v) = value {
            extra.push((series.to_string(), v));
        }
    }

    /// Stops accepting, ends requests in flight, and waits (briefly) for the server to exit.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let Some(server) = self.server.take() else { return Ok(()) };
        match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
            Ok(joined) => joined.context("server task failed")?.context("server failed"),
            Err(_) => {
                tracing::warn!(worker = %self.name, "connections did not drain in time; abandoning them");
                Ok(())
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        // The server and ticker tasks watch this and wind down on their own.
        let _ = self.stop.send(true);
    }
}

/// Validates `config`, binds, and serves in background tasks of the current tokio runtime.
pub async fn spawn(config: SimConfig) -> anyhow::Result<SimHandle> {
    config.validate()?;
    let served = ServedModels::new(config.served_model_name.clone(), config.loras.clone())?;
    let model = Model::new(config.model.clone())?;
    let listener = tokio::net::TcpListener::bind((config.host, config.port))
        .await
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    let (stop, shutdown) = watch::channel(false);
    let (engine, kv_events_ports) = match &config.kv_events {
        None => (Engine::new(model, config.time_scale), None),
        Some(kv) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let publish = crate::kv_publish::PublishConfig {
                endpoint: format!("tcp://{}:{}", config.host, kv.port),
                replay_endpoint: kv.replay_port.map(|p| format!("tcp://{}:{p}", config.host)),
                topic: kv.topic.clone(),
                block_size: u32::try_from(config.model.block_size).unwrap_or(u32::MAX),
            };
            let ports =
                crate::kv_publish::start(publish, rx, shutdown.clone()).await.context("publishing KV events")?;
            (Engine::with_kv_events(model, config.time_scale, Some(tx)), Some(ports))
        }
    };
    tokio::spawn(Arc::clone(&engine).run(shutdown.clone()));
    let handle_engine = Arc::clone(&engine);
    let faults = Arc::new(Faults::new(config.metrics_mode, config.requests_mode));
    let extra_metrics = Arc::new(std::sync::Mutex::new(config.extra_metrics.clone()));
    let app = Arc::new(App {
        name: config.name.clone(),
        served,
        params: config.model.clone(),
        metrics_names: config.metrics_names,
        extra_metrics: Arc::clone(&extra_metrics),
        engine,
        faults: Arc::clone(&faults),
        serial: AtomicU64::new(0),
        shutdown: shutdown.clone(),
    });
    let router = router(app, &config.name)?;
    let mut server_stop = shutdown;
    let server = tokio::spawn(async move {
        // TCP_NODELAY: a reply's headers and body go out in separate writes; with Nagle on,
        // a proxy in front (router, Envoy) waits ~40 ms for the delayed ACK between them.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|stop| *stop).await;
            })
            .await
    });
    tracing::info!(worker = %config.name, %addr, "sim worker listening");
    Ok(SimHandle {
        addr,
        name: config.name,
        faults,
        engine: handle_engine,
        extra_metrics,
        stop,
        server: Some(server),
        kv_events_ports,
    })
}

fn router(app: Arc<App>, name: &str) -> anyhow::Result<Router> {
    let worker = HeaderValue::from_str(name).context("worker name")?;
    Ok(Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/completions/render", post(render_completions))
        .route("/v1/chat/completions/render", post(render_chat))
        .route("/tokenize", post(tokenize))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_page))
        .route("/admin/fault", post(set_fault))
        .fallback(no_route)
        .with_state(app)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(move |mut res: Response| {
            let worker = worker.clone();
            async move {
                res.headers_mut().insert(WORKER_HEADER, worker);
                res
            }
        })))
}

async fn completions(State(app): State<Arc<App>>, body: BodyBytes) -> Response {
    infer(app, Api::Completions, body).await
}

async fn chat(State(app): State<Arc<App>>, body: BodyBytes) -> Response {
    infer(app, Api::Chat, body).await
}

async fn responses(State(app): State<Arc<App>>, body: BodyBytes) -> Response {
    infer(app, Api::Responses, body).await
}

async fn embeddings(State(app): State<Arc<App>>, body: BodyBytes) -> Response {
    infer(app, Api::Embeddings, body).await
}

async fn render_completions(body: BodyBytes) -> Response {
    render(Api::Completions, body).await
}

async fn render_chat(body: BodyBytes) -> Response {
    render(Api::Chat, body).await
}

/// The token ids of a request body as the model would see them (vLLM's render API).
async fn render(api: Api, body: BodyBytes) -> Response {
    let parsed = body.map_err(ApiError::Body).and_then(|b| openai::parse_request(api, &b).map_err(ApiError::from));
    match parsed {
        Ok(req) => axum::Json(openai::render_reply(&openai::pseudo_tokens(&req.prompt))).into_response(),
        Err(e) => e.into_response(),
    }
}

/// vLLM's `/tokenize`: a completions-style `prompt` or chat `messages`.
async fn tokenize(State(app): State<Arc<App>>, body: BodyBytes) -> Response {
    let parsed = body.map_err(ApiError::Body).and_then(|b| {
        let chat = serde_json::from_slice::<serde_json::Value>(&b).is_ok_and(|v| v.get("messages").is_some());
        openai::parse_request(if chat { Api::Chat } else { Api::Completions }, &b).map_err(ApiError::from)
    });
    match parsed {
        Ok(req) => {
            let max_len = (app.params.num_gpu_blocks * app.params.block_size) as u64;
            axum::Json(openai::tokenize_reply(&openai::pseudo_tokens(&req.prompt), max_len)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// A request body, or why axum could not read it.
type BodyBytes = Result<Bytes, BytesRejection>;

async fn infer(app: Arc<App>, api: Api, body: BodyBytes) -> Response {
    let serial = app.serial.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("request", worker = %app.name, serial, path = api.path());
    async move {
        match app.faults.requests() {
            FaultMode::Ok => {}
            FaultMode::Garbage => return (StatusCode::OK, "{\"choices\": [garbage").into_response(),
            FaultMode::Error => return ApiError::Injected.into_response(),
            FaultMode::Hang => return hang(&app).await,
        }
        let served = match body {
            Ok(body) => serve(&app, api, serial, &body).await,
            Err(rejection) => Err(ApiError::Body(rejection)),
        };
        match served {
            Ok(res) => res,
            Err(e) => {
                tracing::info!(error = %e, "request failed");
                e.into_response()
            }
        }
    }
    .instrument(span)
    .await
}

async fn serve(app: &App, api: Api, serial: u64, body: &[u8]) -> Result<Response, ApiError> {
    let req = openai::parse_request(api, body)?;
    let resolved = app
        .served
        .resolve(req.model.as_deref())
        .ok_or_else(|| ApiError::ModelNotFound(req.model.clone().unwrap_or_default()))?;
    let salt = req.cache_salt.as_deref().unwrap_or_default();
    let model_req = ModelRequest::from_prompt(
        &app.params,
        req.prompt.as_bytes(),
        &[resolved.name.as_bytes(), salt.as_bytes()],
        req.max_tokens,
        resolved.lora,
    );
    let (id, events) = app.engine.submit(model_req)?;
    tracing::debug!(request = id.0, model = %resolved.name, stream = req.stream, "admitted");
    let meta = ReplyMeta::new(api, serial, &app.name, unix_now() as u64, resolved.name);
    if req.stream {
        return Ok(stream_reply(req, meta, events));
    }
    let usage = wait_finished(events).await.ok_or(ApiError::Rejected(SubmitError::ShuttingDown))?;
    Ok(axum::Json(openai::final_reply(&req, &meta, &usage)).into_response())
}

async fn wait_finished(mut events: Events) -> Option<Usage> {
    while let Some(kind) = events.recv().await {
        if let EventKind::Finished(usage) = kind {
            return Some(usage);
        }
    }
    None
}

fn stream_reply(req: InferenceRequest, meta: ReplyMeta, events: Events) -> Response {
    let start: String = openai::stream_start(&req, &meta).iter().map(openai::SseFrame::encode).collect();
    let frames = UnboundedReceiverStream::new(events).map(move |kind| {
        let text: String = match kind {
            EventKind::Token { index } => openai::stream_token(&req, &meta, index).encode(),
            EventKind::Finished(usage) => {
                openai::stream_end(&req, &meta, &usage).iter().map(openai::SseFrame::encode).collect()
            }
        };
        Ok::<_, Infallible>(Bytes::from(text))
    });
    let body = futures::stream::iter((!start.is_empty()).then(|| Ok(Bytes::from(start)))).chain(frames);
    let mut res = Response::new(Body::from_stream(body));
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// Answers only when the worker shuts down: a hung endpoint that still lets tests finish.
async fn hang(app: &App) -> Response {
    let mut shutdown = app.shutdown.clone();
    let _ = shutdown.wait_for(|stop| *stop).await;
    ApiError::Rejected(SubmitError::ShuttingDown).into_response()
}

async fn metrics_page(State(app): State<Arc<App>>) -> Response {
    match app.faults.metrics() {
        FaultMode::Ok => {}
        FaultMode::Garbage => return prometheus_text(metrics::GARBAGE.to_owned()),
        FaultMode::Error => return ApiError::Injected.into_response(),
        FaultMode::Hang => return hang(&app).await,
    }
    let stats = app.engine.stats();
    let extra = app.extra_metrics.lock().map(|e| e.clone()).unwrap_or_default();
    let page = metrics::render(&MetricsInput {
        names: app.metrics_names,
        model_name: app.served.base(),
        params: &app.params,
        stats: &stats,
        now_unix: unix_now(),
        extra: &extra,
    });
    prometheus_text(page)
}

fn prometheus_text(page: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], page).into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    axum::Json(openai::models_list(app.served.base(), app.served.loras(), unix_now() as u64)).into_response()
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn set_fault(State(app): State<Arc<App>>, body: Bytes) -> Response {
    match serde_json::from_slice::<FaultUpdate>(&body) {
        Ok(update) => {
            let state = app.faults.apply(update);
            tracing::info!(worker = %app.name, ?state, "faults changed");
            axum::Json(state).into_response()
        }
        Err(e) => ApiError::BadRequest(RequestError::Json(e)).into_response(),
    }
}

async fn no_route() -> Response {
    ApiError::NoRoute.into_response()
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
