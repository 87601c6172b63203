//! A whole local stack for end-to-end tests: simulated workers (in process), the `epp`
//! binary and a real Envoy, all on free loopback ports, stopped when dropped. Logs of the
//! EPP and Envoy go to files in the stack's temp folder and are printed when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sim::{SimConfig, SimHandle};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// The Envoy binary: $ENVOY_BIN, else the repo's .venv (made by scripts/test.sh), else PATH.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join(".venv/bin/envoy");
    if venv.exists() {
        return venv;
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("envoy")).find(|p| p.exists()));
    on_path.unwrap_or_else(|| {
        panic!("Envoy not found: run the tests with scripts/test.sh (it installs Envoy into .venv) or set ENVOY_BIN")
    })
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

pub struct Stack {
    pub dir: PathBuf,
    pub workers: Vec<Worker>,
    pub endpoints_path: PathBuf,
    pub listener: u16,
    pub admin: u16,
    pub epp_port: u16,
    pub health_port: u16,
    pub metrics_port: u16,
    epp: Option<Child>,
    envoy: Option<Child>,
    /// Extra flags for the EPP.
    pub epp_args: Vec<String>,
    pub client: reqwest::Client,
}

/// Which Envoy bootstrap to run: ours (config/envoy.yaml) or the upstream guide's, unchanged
/// except for ports.
#[derive(Clone, Copy, PartialEq)]
pub enum EnvoyConfig {
    Ours,
    Guide,
}

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
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("epp-it-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");

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
            workers: ws,
            listener: free_port(),
            admin: free_port(),
            epp_port: free_port(),
            health_port: free_port(),
            metrics_port: free_port(),
            epp: None,
            envoy: None,
            epp_args: Vec::new(),
            client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client"),
        };
        stack.epp_args = epp_args.iter().map(|a| a.to_string()).collect();
        let all: Vec<usize> = (0..workers).collect();
        stack.write_endpoints(&all, &[]);
        let config = crate::stack::default_config_with(&stack.endpoints_path);
        std::fs::write(stack.dir.join("epp-config.yaml"), config).expect("write config");
        stack.start_epp(envoy);
        stack.wait_serving().await;
        stack.start_envoy(envoy);
        stack.wait_envoy_ready().await;
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

    /// Starts the EPP: TLS on ext_proc with our Envoy config (its default), plaintext with
    /// the upstream guide's (which runs it with --secure-serving=false).
    pub fn start_epp(&mut self, envoy: EnvoyConfig) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("epp.log")).expect("epp log");
        let secure = if envoy == EnvoyConfig::Guide { "--secure-serving=false" } else { "--secure-serving=true" };
        let child = Command::new(env!("CARGO_BIN_EXE_epp"))
            .args(["--bind-address", "127.0.0.1", secure, "--v=3"])
            .args(&self.epp_args)
            .args(["--grpc-port", &self.epp_port.to_string()])
            .args(["--grpc-health-port", &self.health_port.to_string()])
            .args(["--metrics-port", &self.metrics_port.to_string(), "--refresh-prometheus-metrics-interval", "200ms"])
            .arg("--config-file")
            .arg(self.dir.join("epp-config.yaml"))
            .env("RUST_LOG", "info,epp::ext_proc=debug,epp::routing=debug")
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start epp");
        self.epp = Some(child);
    }

    /// The EPP's process id.
    pub fn epp_pid(&self) -> Option<u32> {
        self.epp.as_ref().map(|c| c.id())
    }

    /// Sends SIGTERM to the EPP and waits (up to `limit`) for it to exit; its exit status.
    pub fn terminate_epp(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.epp.as_mut()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.epp = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits until the EPP reports SERVING on its health port.
    pub async fn wait_serving(&mut self) {
        let port = self.health_port;
        let epp = &mut self.epp;
        let dir = self.dir.clone();
        eventually(Duration::from_secs(90), "the EPP's gRPC health to report SERVING", || {
            let exited = epp.as_mut().and_then(|c| c.try_wait().ok().flatten());
            let dir = dir.clone();
            async move {
                if let Some(status) = exited {
                    panic!("epp exited early ({status}); log:\n{}", read(&dir.join("epp.log")));
                }
                health_status(port, "").await.filter(|s| s == "SERVING")
            }
        })
        .await;
    }

    fn start_envoy(&mut self, which: EnvoyConfig) {
        let template = match which {
            EnvoyConfig::Ours => workspace_root().join("config/envoy.yaml"),
            EnvoyConfig::Guide => workspace_root().join("config/guide/envoy.yaml"),
        };
        let text = std::fs::read_to_string(template)
            .expect("envoy template")
            .replace("port_value: 8081", &format!("port_value: {}", self.listener))
            .replace("port_value: 9002", &format!("port_value: {}", self.epp_port))
            .replace("localhost:9002", &format!("localhost:{}", self.epp_port))
            .replace("port_value: 19000", &format!("port_value: {}", self.admin))
            .replace("address: 0.0.0.0", "address: 127.0.0.1");
        let path = self.dir.join("envoy.yaml");
        std::fs::write(&path, text).expect("write envoy config");
        let log = std::fs::File::create(self.dir.join("envoy.log")).expect("envoy log");
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&path)
            .args(["--use-dynamic-base-id", "--concurrency", "2", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start envoy");
        self.envoy = Some(child);
    }

    async fn wait_envoy_ready(&mut self) {
        let url = format!("http://127.0.0.1:{}/ready", self.admin);
        let client = self.client.clone();
        let dir = self.dir.clone();
        let envoy = &mut self.envoy;
        eventually(Duration::from_secs(60), "Envoy to be ready", || {
            let exited = envoy.as_mut().and_then(|c| c.try_wait().ok().flatten());
            let (client, url, dir) = (client.clone(), url.clone(), dir.clone());
            async move {
                if let Some(status) = exited {
                    panic!("envoy exited early ({status}); log:\n{}", read(&dir.join("envoy.log")));
                }
                let r = client.get(&url).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listener)
    }

    /// POSTs JSON through Envoy with request id `id`; returns status, worker name, body.
    pub async fn post(&self, path: &str, id: &str, body: &str) -> Reply {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .header("x-request-id", id)
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {id} failed: {e}"));
        let status = r.status().as_u16();
        let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let worker = header("x-sim-worker");
        let request_id = header("x-request-id").unwrap_or_default();
        let content_type = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = r.text().await.unwrap_or_default();
        Reply { status, worker, request_id, content_type, body }
    }

    pub fn epp_log(&self) -> String {
        read(&self.dir.join("epp.log"))
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
        for child in [self.envoy.take(), self.epp.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- epp.log ----\n{}", read(&self.dir.join("epp.log")));
            eprintln!("---- envoy.log ----\n{}", read(&self.dir.join("envoy.log")));
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub worker: Option<String>,
    /// The id the EPP scheduled the request under (Envoy may replace the client's).
    pub request_id: String,
    pub content_type: String,
    pub body: String,
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The default config with its discovery path pointed at `endpoints`.
pub fn default_config_with(endpoints: &Path) -> String {
    epp::config::DEFAULT_CONFIG.replace("path: endpoints.yaml", &format!("path: {}", endpoints.display()))
}

/// gRPC health status of `service` on `port`, as its proto name.
pub async fn health_status(port: u16, service: &str) -> Option<String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).ok()?.connect().await.ok()?;
    let mut client = HealthClient::new(channel);
    let r = client.check(HealthCheckRequest { service: service.to_string() }).await.ok()?;
    Some(r.into_inner().status().as_str_name().to_string())
}
