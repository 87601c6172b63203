//! A whole local stack for end-to-end tests, on the harness the benchmarks use too
//! (`epp_stack`): simulated workers (in process), the `epp` binary and a real Envoy, all on
//! free loopback ports, stopped when dropped. Logs of the EPP and Envoy go to the stack's
//! scratch folder and are printed when a test fails. What this adds to the harness is the
//! tests' vocabulary: rewrite the endpoints file or the config, post a request, find the
//! endpoint the EPP logged for it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use epp_stack::health_status;
use epp_stack::{Bootstrap, Envoy, Epp, EppOptions, Scratch};
use sim::{SimConfig, SimHandle};

pub fn workspace_root() -> PathBuf {
    epp_stack::workspace_root()
}

/// The Envoy binary: $ENVOY_BIN, else the repo's .venv (made by scripts/test.sh), else PATH.
pub fn envoy_bin() -> PathBuf {
    epp_stack::locate_envoy(None).unwrap_or_else(|e| panic!("{e}: run the tests with scripts/test.sh"))
}

/// Polls `f` until it returns Some, or panics after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Worker {
    pub handle: SimHandle,
    pub name: String,
}

impl Worker {
    pub fn addr(&self) -> std::net::SocketAddr {
        self.handle.addr()
    }
}

/// Which Envoy bootstrap to run: ours (config/envoy.yaml) or the upstream guide's, unchanged
/// except for ports.
#[derive(Clone, Copy, PartialEq)]
pub enum EnvoyConfig {
    Ours,
    Guide,
    /// Ours in the buffered modes (request body `BUFFERED`, response body `STREAMED`).
    Buffered,
}

pub struct Stack {
    scratch: Scratch,
    /// Where the config and endpoints files live (`<scratch>/conf`).
    pub dir: PathBuf,
    pub workers: Vec<Worker>,
    pub endpoints_path: PathBuf,
    pub listener: u16,
    pub epp_port: u16,
    pub health_port: u16,
    pub metrics_port: u16,
    epp: Option<Epp>,
    envoy: Option<Envoy>,
    /// Extra flags for the EPP.
    pub epp_args: Vec<String>,
    pub client: reqwest::Client,
}

/// The EPP's log filter in tests: the per-request lines the tests read.
const LOG_FILTER: &str = "info,epp::ext_proc=debug,epp::routing=debug,epp::flow=debug,epp::kv_events=debug";

impl Stack {
    pub async fn start(workers: usize) -> Stack {
        Stack::start_with(workers, EnvoyConfig::Ours, |_| {}).await
    }

    pub async fn start_with(workers: usize, envoy: EnvoyConfig, tune: impl Fn(&mut SimConfig)) -> Stack {
        Stack::start_full(workers, envoy, tune, &[]).await
    }

    /// Like `start_with`, with extra EPP flags.
    pub async fn start_full(
        workers: usize,
        envoy: EnvoyConfig,
        tune: impl Fn(&mut SimConfig),
        epp_args: &[&str],
    ) -> Stack {
        Stack::start_config(workers, envoy, tune, epp_args, default_config_with).await
    }

    /// Like `start_full`, with the EPP config `config(endpoints file)`.
    pub async fn start_config(
        workers: usize,
        envoy: EnvoyConfig,
        tune: impl Fn(&mut SimConfig),
        epp_args: &[&str],
        config: fn(&Path) -> String,
    ) -> Stack {
        let scratch = Scratch::new("it").expect("scratch folder");
        let dir = scratch.path.join("conf");
        let mut ws = Vec::new();
        for i in 0..workers {
            let name = format!("w{i}");
            let mut cfg = SimConfig { name: name.clone(), time_scale: 0.0, ..SimConfig::default() };
            tune(&mut cfg);
            let handle = sim::spawn(cfg).await.expect("start simulated worker");
            ws.push(Worker { handle, name });
        }
        let mut stack = Stack {
            endpoints_path: dir.join("endpoints.yaml"),
            dir,
            scratch,
            workers: ws,
            listener: 0,
            epp_port: 0,
            health_port: 0,
            metrics_port: 0,
            epp: None,
            envoy: None,
            epp_args: epp_args.iter().map(|a| a.to_string()).collect(),
            client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client"),
        };
        let all: Vec<usize> = (0..workers).collect();
        stack.write_endpoints(&all, &[]);
        stack.write_config(&config(&stack.endpoints_path));
        stack.start_epp(envoy).await;
        stack.start_envoy(envoy).await;
        stack
    }

    /// Atomically replaces the endpoints file with workers `which`, each with `labels`.
    pub fn write_endpoints(&self, which: &[usize], labels: &[(&str, &str)]) {
        let entries: Vec<(usize, &[(&str, &str)])> = which.iter().map(|&i| (i, labels)).collect();
        self.write_endpoints_labelled(&entries);
    }

    /// Atomically replaces the endpoints file with the given workers and their own labels.
    pub fn write_endpoints_labelled(&self, entries: &[(usize, &[(&str, &str)])]) {
        let mut text = String::from(if entries.is_empty() { "endpoints: []\n" } else { "endpoints:\n" });
        for &(i, labels) in entries {
            let w = &self.workers[i];
            text.push_str(&format!(
                "  - name: {}\n    address: 127.0.0.1\n    port: \"{}\"\n",
                w.name,
                w.addr().port()
            ));
            if !labels.is_empty() {
                text.push_str("    labels:\n");
                for (k, v) in labels {
                    text.push_str(&format!("      {k}: \"{v}\"\n"));
                }
            }
        }
        self.write_endpoints_text(&text);
    }

    /// Atomically replaces the EPP's config file.
    pub fn write_config(&self, text: &str) {
        let path = self.dir.join("epp-config.yaml");
        let tmp = self.dir.join("epp-config.yaml.tmp");
        std::fs::write(&tmp, text).expect("write config tmp");
        std::fs::rename(&tmp, &path).expect("rename config");
    }

    pub fn write_endpoints_text(&self, text: &str) {
        let tmp = self.endpoints_path.with_extension("yaml.tmp");
        std::fs::write(&tmp, text).expect("write endpoints tmp");
        std::fs::rename(&tmp, &self.endpoints_path).expect("rename endpoints");
    }

    /// Starts the EPP on the current config file and waits until it serves: TLS on ext_proc
    /// with our Envoy config (its default), plaintext with the upstream guide's (which runs
    /// it with --secure-serving=false). A restart keeps the ports Envoy knows.
    pub async fn start_epp(&mut self, envoy: EnvoyConfig) {
        let ports = (self.epp_port != 0).then_some((self.epp_port, self.health_port, self.metrics_port));
        let epp = self.spawn_epp(envoy, None, ports).await;
        (self.epp_port, self.health_port, self.metrics_port) = (epp.grpc_port, epp.health_port, epp.metrics_port);
        self.epp = Some(epp);
    }

    /// Starts a second EPP on the same ports (the stack must run with `--reuse-port`),
    /// waits until it serves, and returns the one it replaces (still running) for the
    /// caller to stop.
    pub async fn start_replacement_epp(&mut self, envoy: EnvoyConfig) -> Epp {
        let ports = Some((self.epp_port, self.health_port, self.metrics_port));
        let epp = self.spawn_epp(envoy, Some(2), ports).await;
        self.epp.replace(epp).expect("a running EPP to replace")
    }

    async fn spawn_epp(&self, envoy: EnvoyConfig, replacement: Option<u32>, ports: Option<(u16, u16, u16)>) -> Epp {
        let config = std::fs::read_to_string(self.dir.join("epp-config.yaml")).expect("config");
        let mut args = vec!["--v=3".to_string(), "--refresh-prometheus-metrics-interval".into(), "200ms".into()];
        args.extend(self.epp_args.iter().cloned());
        let opts = EppOptions {
            args,
            log_filter: Some(LOG_FILTER.into()),
            plaintext: envoy == EnvoyConfig::Guide,
            replacement,
        };
        let bin = Path::new(env!("CARGO_BIN_EXE_epp")).to_path_buf();
        Epp::start_on(&bin, &self.scratch, &config, &opts, ports).await.unwrap_or_else(|e| panic!("start epp: {e}"))
    }

    /// The log of the replacement EPP.
    pub fn replacement_log(&self) -> String {
        read(&self.scratch.log("epp-2.log"))
    }

    /// The EPP's process id.
    pub fn epp_pid(&self) -> Option<u32> {
        self.epp.as_ref().map(|e| e.process.pid())
    }

    /// Sends SIGTERM to the EPP without waiting; `terminate_epp` then waits for the exit.
    pub fn signal_epp(&self) {
        if let Some(pid) = self.epp_pid() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
    }

    /// Sends SIGTERM to the EPP and waits (up to `limit`) for it to exit; its exit status.
    pub fn terminate_epp(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let status = self.epp.as_mut()?.process.terminate(limit);
        if status.is_some() {
            self.epp = None;
        }
        status
    }

    /// Waits until the EPP reports SERVING on its health port.
    pub async fn wait_serving(&mut self) {
        let port = self.health_port;
        eventually(Duration::from_secs(90), "the EPP's gRPC health to report SERVING", || async move {
            health_status(port, "").await.filter(|s| s == "SERVING")
        })
        .await;
    }

    async fn start_envoy(&mut self, which: EnvoyConfig) {
        let bootstrap = match which {
            EnvoyConfig::Ours => Bootstrap::Ours,
            EnvoyConfig::Guide => Bootstrap::Guide,
            EnvoyConfig::Buffered => Bootstrap::Buffered,
        };
        let envoy = Envoy::ext_proc_with(&envoy_bin(), &self.scratch, self.epp_port, bootstrap)
            .await
            .unwrap_or_else(|e| panic!("start envoy: {e}"));
        self.listener = envoy.listener;
        self.envoy = Some(envoy);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listener)
    }

    /// POSTs JSON through Envoy with request id `id`; returns status, worker name, body.
    pub async fn post(&self, path: &str, id: &str, body: &str) -> Reply {
        self.post_with(path, id, body, &[]).await
    }

    /// Sends `n` one-token completions one after another, each with a prompt never sent
    /// before (so prefix affinity plays no part); their replies, in order.
    pub async fn fresh_questions(&self, tag: &str, n: usize) -> Vec<Reply> {
        static SENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let k = SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            out.push(self.post("/v1/completions", &format!("{tag}-{k}"), &question(&format!("{tag} {k}"), 1)).await);
        }
        out
    }

    /// Like `post`, with extra request headers.
    pub async fn post_with(&self, path: &str, id: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .header("x-request-id", id)
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap_or_else(|e| panic!("request {id} failed: {e}"));
        let status = r.status().as_u16();
        let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let worker = header("x-sim-worker");
        let request_id = header("x-request-id").unwrap_or_default();
        let dropped_reason = header("x-llm-d-request-dropped-reason");
        let content_type = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = r.text().await.unwrap_or_default();
        Reply { status, worker, request_id, dropped_reason, content_type, body }
    }

    /// The EPP's own metrics page (empty when it cannot be read).
    pub async fn epp_metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        match self.client.get(url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    pub fn epp_log(&self) -> String {
        read(&self.scratch.log("epp.log"))
    }

    /// The endpoint the EPP logged for request `id`.
    pub async fn routed_to(&self, id: &str) -> String {
        let needle = format!("request_id={id} ");
        eventually(Duration::from_secs(10), &format!("the EPP log line for request {id}"), || {
            let log = self.epp_log();
            let found = log
                .lines()
                .find(|l| l.contains("request routed") && l.contains(&needle))
                .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("endpoint=")).map(str::to_string));
            async move { found }
        })
        .await
    }

    pub fn worker_by_name(&self, name: &str) -> &Worker {
        self.workers.iter().find(|w| w.name == name).unwrap_or_else(|| panic!("no worker {name}"))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let (envoy, epp) = (self.envoy.take(), self.epp.take());
        drop(envoy);
        drop(epp);
        if std::thread::panicking() {
            eprintln!("---- epp.log ----\n{}", read(&self.scratch.log("epp.log")));
            eprintln!("---- envoy.log ----\n{}", read(&self.scratch.log("envoy-ext-proc.log")));
            // Keep the folder for a look after the failure.
            self.scratch.keep();
        }
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub worker: Option<String>,
    /// The id the EPP scheduled the request under (Envoy may replace the client's).
    pub request_id: String,
    /// Why flow control answered it, when it did.
    pub dropped_reason: Option<String>,
    pub content_type: String,
    pub body: String,
}

/// A `/v1/completions` body for model `m`: `prompt`, at most `max_tokens` tokens out.
pub fn completion(prompt: &str, max_tokens: u32) -> String {
    serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": max_tokens}).to_string()
}

/// A completion whose prompt is `tag` and a question.
pub fn question(tag: &str, max_tokens: u32) -> String {
    completion(&format!("{tag}: a question"), max_tokens)
}

/// The value of the first sample of `metric` whose line contains every one of `labels`.
pub fn sample(page: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    page.lines()
        .filter(|l| l.starts_with(metric) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The upstream guide's config with its discovery path pointed at `endpoints`.
pub fn guide_config_with(endpoints: &Path) -> String {
    epp::config::GUIDE_CONFIG.replace("path: /etc/epp/endpoints.yaml", &format!("path: {}", endpoints.display()))
}

/// The default config with its discovery path pointed at `endpoints`.
pub fn default_config_with(endpoints: &Path) -> String {
    epp::config::DEFAULT_CONFIG.replace("path: endpoints.yaml", &format!("path: {}", endpoints.display()))
}
