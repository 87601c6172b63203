//! The live stacks the integration tests and the benchmarks run, all on loopback: simulated
//! workers (in the caller's process), the `epp` binary, real Envoy processes — with the
//! ext_proc filter pointing at the EPP (the project's `config/envoy.yaml` or the upstream
//! guide's, ports changed), or a static round-robin cluster of the same workers and no
//! ext_proc (the baseline) — and the peer routers an operator would install instead
//! (`sglang-router`, `vllm-router`, from the Python venv).
//!
//! It owns starting, readiness, CPU accounting and stopping of those processes; every child
//! is killed when its handle drops. It measures nothing itself. Tests and benchmarks share
//! it, so what the tests check is what the benchmarks measure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sim::{SimConfig, SimHandle};

/// The project's Envoy bootstrap for the EPP path, embedded so the binary runs anywhere.
const EXT_PROC_ENVOY: &str = include_str!("../../config/envoy.yaml");
/// The upstream guide's Envoy bootstrap, unchanged but for ports.
const GUIDE_ENVOY: &str = include_str!("../../config/guide/envoy.yaml");
/// The project's Envoy bootstrap for two EPP replicas.
const REPLICAS_ENVOY: &str = include_str!("../../config/envoy-replicas.yaml");

pub mod peers;
pub mod text;

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{what} did not happen within {limit:?}{log}")]
    Timeout { what: String, limit: Duration, log: String },
    #[error("{what} exited early ({status}){log}")]
    Exited { what: String, status: String, log: String },
    #[error("{0}")]
    Setup(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StackError {
    let what = what.into();
    move |error| StackError::Io { what, error }
}

/// The workspace root (this crate's parent folder), where `target/`, `.venv/` and
/// `config/` are found.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// A loopback port nothing listens on now, and that this process has not handed out before.
/// Stacks start in parallel: a port released here could otherwise be found free again by
/// another stack before its first user binds it, and Envoy binds its listeners with
/// `SO_REUSEPORT` (its default on Linux), so two Envoys given one port would both start and
/// share each other's connections.
pub fn free_port() -> Result<u16, StackError> {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..256 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(io("free port"))?;
        if HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return Ok(port);
        }
    }
    Err(StackError::Setup("no free loopback port left that this process has not handed out".into()))
}

/// The `epp` binary: `explicit` if given; else the one in this build's target folder
/// (same profile as this binary), built with cargo first — a no-op when it is up to date,
/// and it keeps a stale binary from being measured.
pub fn locate_epp(explicit: Option<&Path>) -> Result<PathBuf, StackError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(StackError::Setup(format!("--epp-bin {} is not a file", p.display())))
        };
    }
    let release = !cfg!(debug_assertions);
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join(if release { "release" } else { "debug" }).join("epp");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args(["build", "--quiet", "-p", "epp", "--bin", "epp"]);
    if release {
        cmd.arg("--release");
    }
    match cmd.status() {
        Ok(s) if s.success() => {}
        // Without cargo (a copied binary) an existing epp is still usable.
        _ if bin.is_file() => eprintln!("warning: could not rebuild {}; using it as it is", bin.display()),
        Ok(s) => return Err(StackError::Setup(format!("`cargo build -p epp` failed ({s})"))),
        Err(e) => return Err(StackError::Setup(format!("cannot run cargo to build epp: {e}; pass --epp-bin"))),
    }
    if bin.is_file() { Ok(bin) } else { Err(StackError::Setup(format!("{} was not built", bin.display()))) }
}

/// The Envoy binary: `explicit`, $ENVOY_BIN, the repo's .venv (scripts/prepare.sh), PATH.
pub fn locate_envoy(explicit: Option<&Path>) -> Result<PathBuf, StackError> {
    let candidates = explicit
        .map(Path::to_path_buf)
        .into_iter()
        .chain(std::env::var_os("ENVOY_BIN").map(PathBuf::from))
        .chain(Some(workspace_root().join(".venv/bin/envoy")))
        .chain(
            std::env::var_os("PATH")
                .into_iter()
                .flat_map(|p| std::env::split_paths(&p).map(|d| d.join("envoy")).collect::<Vec<_>>()),
        );
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
    }
    Err(StackError::Setup(
        "Envoy not found: run scripts/bench.sh (it installs Envoy into .venv), or set ENVOY_BIN / --envoy-bin".into(),
    ))
}

/// A scratch folder, removed when dropped: `conf/` for configs, `logs/` for logs. They are
/// apart because the EPP watches the folders of its config and endpoints files: a log
/// written beside them would wake its watchers on every line and be measured as EPP cost.
pub struct Scratch {
    pub path: PathBuf,
    keep: std::sync::atomic::AtomicBool,
}

impl Scratch {
    pub fn new(tag: &str) -> Result<Scratch, StackError> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("epp-stack-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        for sub in ["conf", "logs"] {
            std::fs::create_dir_all(path.join(sub)).map_err(io(format!("create {}", path.display())))?;
        }
        Ok(Scratch { path, keep: Default::default() })
    }

    /// Keeps the folder when dropped (to look at after a failure).
    pub fn keep(&self) {
        self.keep.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes `conf/<name>`.
    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf, StackError> {
        let p = self.path.join("conf").join(name);
        std::fs::write(&p, text).map_err(io(format!("write {}", p.display())))?;
        Ok(p)
    }

    /// The path of `logs/<name>`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.path.join("logs").join(name)
    }
}

/// What the stacks run: the binaries, and how Envoy reaches the EPP.
#[derive(Clone, Debug)]
pub struct Setup {
    pub epp: PathBuf,
    pub envoy: PathBuf,
    /// Plaintext gRPC to the EPP (`--secure-serving=false`, no TLS transport socket in the
    /// bootstrap) instead of the defaults; for measuring what TLS costs.
    pub plaintext_ext_proc: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Simulated workers, stopped when dropped.
pub struct Workers {
    pub handles: Vec<SimHandle>,
}

impl Workers {
    /// Starts `n` workers named w0.., each from `base` (its name and port replaced).
    pub async fn spawn(n: usize, base: &SimConfig) -> Result<Workers, StackError> {
        Workers::spawn_shaped(n, base, &sim::PoolShape::default()).await
    }

    /// Starts `n` workers named w0.., each from `base` with the KV blocks and speed `shape`
    /// gives worker `i`.
    pub async fn spawn_shaped(n: usize, base: &SimConfig, shape: &sim::PoolShape) -> Result<Workers, StackError> {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let model = shape.worker(&base.model, i);
            let cfg = SimConfig { name: format!("w{i}"), port: 0, model, ..base.clone() };
            let h = sim::spawn(cfg).await.map_err(|e| StackError::Setup(format!("simulated worker w{i}: {e:#}")))?;
            handles.push(h);
        }
        Ok(Workers { handles })
    }

    /// The EPP's endpoints file listing every worker; a worker that publishes KV-cache
    /// events gets the labels naming its sockets (`kv-events-endpoint`,
    /// `kv-events-replay-endpoint`).
    pub fn endpoints_yaml(&self) -> String {
        let mut text = String::from("endpoints:\n");
        for h in &self.handles {
            text.push_str(&format!(
                "  - name: {}\n    address: 127.0.0.1\n    port: \"{}\"\n",
                h.name(),
                h.addr().port()
            ));
            if let Some((events, replay)) = h.kv_events_ports() {
                text.push_str(&format!("    labels:\n      kv-events-endpoint: \"tcp://127.0.0.1:{events}\"\n"));
                if let Some(r) = replay {
                    text.push_str(&format!("      kv-events-replay-endpoint: \"tcp://127.0.0.1:{r}\"\n"));
                }
            }
        }
        text
    }
}

/// CPU time a process has used (user + system, all threads).
pub fn cpu_time(pid: u32) -> Result<Duration, StackError> {
    let path = if pid == std::process::id() { "/proc/self/stat".to_string() } else { format!("/proc/{pid}/stat") };
    let text = std::fs::read_to_string(&path).map_err(io(format!("read {path}")))?;
    let ticks = parse_stat_ticks(&text).ok_or_else(|| StackError::Setup(format!("cannot parse {path}")))?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64))
}

/// utime + stime from the text of /proc/<pid>/stat (fields 14 and 15; the command name in
/// field 2 may hold spaces and parentheses, so fields are counted after its last `)`).
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// USER_HZ, from `getconf CLK_TCK` (100 on every Linux we know, the fallback).
fn clock_ticks_per_second() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&hz| hz > 0)
            .unwrap_or(100)
    })
}

/// A child process, killed when dropped, logging to a file.
pub struct Process {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    pub fn spawn(what: &str, cmd: &mut Command, log: PathBuf) -> Result<Process, StackError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("create {}", log.display())))?;
        let err = file.try_clone().map_err(io("log file"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(io(format!("start {what} ({:?})", cmd.get_program())))?;
        Ok(Process { what: what.into(), child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (up to `limit`) for the process to exit; its exit status.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills it at once (SIGKILL: no drain) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn cpu_time(&self) -> Result<Duration, StackError> {
        cpu_time(self.pid())
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        if tail.is_empty() { String::new() } else { format!("; last log lines of {}:\n{tail}", self.what) }
    }

    /// Fails if the process has exited.
    fn check_alive(&mut self) -> Result<(), StackError> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                Err(StackError::Exited { what: self.what.clone(), status: status.to_string(), log: self.log_tail() })
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `ready` every 20 ms until it holds, `proc` dies, or `limit` passes.
pub async fn wait_until<F, Fut>(proc: &mut Process, what: &str, limit: Duration, mut ready: F) -> Result<(), StackError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        proc.check_alive()?;
        if ready().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(StackError::Timeout { what: what.into(), limit, log: proc.log_tail() });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How to run an `epp`, beyond its config.
#[derive(Clone, Debug, Default)]
pub struct EppOptions {
    /// Extra flags.
    pub args: Vec<String>,
    /// `RUST_LOG` for it (None: the default verbosity, as users run it).
    pub log_filter: Option<String>,
    /// Serve ext_proc in plaintext (`--secure-serving=false`), as the upstream guide runs it.
    pub plaintext: bool,
    /// A replacement for a running EPP on the same ports (both with `--reuse-port`): it
    /// logs to `epp-<n>.log` and is ready when its own log says SERVING (the shared health
    /// port may answer for the old process).
    pub replacement: Option<u32>,
}

/// A running `epp`.
pub struct Epp {
    pub process: Process,
    pub grpc_port: u16,
    pub health_port: u16,
    pub metrics_port: u16,
    pub config_path: PathBuf,
}

impl Epp {
    /// Starts the EPP with `config` (its discovery path must point at an endpoints file)
    /// and waits until its gRPC health reports SERVING (endpoints loaded).
    pub async fn start(setup: &Setup, scratch: &Scratch, config: &str) -> Result<Epp, StackError> {
        let opts = EppOptions { plaintext: setup.plaintext_ext_proc, ..Default::default() };
        Epp::start_with(&setup.epp, scratch, config, &opts).await
    }

    /// Starts `bin` with `config` and `opts`; waits for SERVING.
    pub async fn start_with(bin: &Path, scratch: &Scratch, config: &str, opts: &EppOptions) -> Result<Epp, StackError> {
        Epp::start_on(bin, scratch, config, opts, None).await
    }

    /// Like `start_with`, on the given (ext_proc, health, metrics) ports when some (a
    /// restart where Envoy expects it), else on free ones.
    pub async fn start_on(
        bin: &Path,
        scratch: &Scratch,
        config: &str,
        opts: &EppOptions,
        ports: Option<(u16, u16, u16)>,
    ) -> Result<Epp, StackError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let chosen = match ports {
                Some(p) => p,
                None => (free_port()?, free_port()?, free_port()?),
            };
            match Epp::spawn_on(bin, scratch, config, opts, chosen).await {
                // A free port taken by a parallel test before the EPP bound it: new ports.
                Err(e) if ports.is_none() && attempt < 4 && e.to_string().contains("Address already in use") => {}
                other => return other,
            }
        }
    }

    async fn spawn_on(
        bin: &Path,
        scratch: &Scratch,
        config: &str,
        opts: &EppOptions,
        (grpc_port, health_port, metrics_port): (u16, u16, u16),
    ) -> Result<Epp, StackError> {
        let config_path = scratch.write("epp-config.yaml", config)?;
        let mut cmd = Command::new(bin);
        // Serving (TLS or not) is left at the EPP's default, which config/envoy.yaml matches.
        if opts.plaintext {
            cmd.arg("--secure-serving=false");
        }
        cmd.args(["--bind-address", "127.0.0.1", "--metrics-bind-address", "127.0.0.1"])
            .args(&opts.args)
            .args(["--grpc-port", &grpc_port.to_string()])
            .args(["--grpc-health-port", &health_port.to_string()])
            .args(["--metrics-port", &metrics_port.to_string()])
            .arg("--config-file")
            .arg(&config_path);
        match &opts.log_filter {
            Some(filter) => cmd.env("RUST_LOG", filter),
            None => cmd.env_remove("RUST_LOG"),
        };
        if let Some(n) = opts.replacement {
            let log = scratch.log(&format!("epp-{n}.log"));
            let mut process = Process::spawn("epp", &mut cmd, log.clone())?;
            wait_until(&mut process, "the replacement EPP reporting SERVING", Duration::from_secs(90), || {
                let log = log.clone();
                async move { std::fs::read_to_string(&log).is_ok_and(|t| t.contains("health is SERVING")) }
            })
            .await?;
            return Ok(Epp { process, grpc_port, health_port, metrics_port, config_path });
        }
        let mut process = Process::spawn("epp", &mut cmd, scratch.log("epp.log"))?;
        wait_until(&mut process, "the EPP's gRPC health reporting SERVING", Duration::from_secs(90), || async move {
            health_status(health_port, "").await.as_deref() == Some("SERVING")
        })
        .await?;
        Ok(Epp { process, grpc_port, health_port, metrics_port, config_path })
    }
}

/// Two EPPs behind one Envoy (`config/envoy-replicas.yaml`, ext_proc balanced over both),
/// sharing routing state through a real redis-server when `shared`, each on its own state
/// otherwise; the tests and the bench start them the same way.
pub struct ReplicaSet {
    pub redis: Option<Redis>,
    /// One per replica (`None` while a test holds it stopped).
    pub epps: Vec<Option<Epp>>,
    /// One folder per replica: its config copy and logs.
    pub homes: Vec<Scratch>,
    /// Each replica's (ext_proc, health, metrics) ports, which a restart reuses.
    pub ports: Vec<(u16, u16, u16)>,
    pub envoy: Envoy,
    /// What the replicas run with, `--state-store` included when shared (a restart reuses it).
    pub options: EppOptions,
}

impl ReplicaSet {
    /// Starts Redis (when `shared`), two `epp` replicas with `config` and `options`, and
    /// Envoy in front of them (TLS to them unless `options.plaintext`).
    pub async fn start(
        epp: &Path,
        envoy: &Path,
        scratch: &Scratch,
        config: &str,
        shared: bool,
        mut options: EppOptions,
    ) -> Result<ReplicaSet, StackError> {
        let redis = if shared { Some(Redis::start(scratch, None).await?) } else { None };
        if let Some(r) = &redis {
            options.args.extend(["--state-store".to_string(), r.url()]);
        }
        let (mut epps, mut homes, mut ports) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..2 {
            let home = Scratch::new("replica")?;
            let e = Epp::start_on(epp, &home, config, &options, None).await?;
            ports.push((e.grpc_port, e.health_port, e.metrics_port));
            epps.push(Some(e));
            homes.push(home);
        }
        let envoy = Envoy::ext_proc_replicas(envoy, scratch, [ports[0].0, ports[1].0], options.plaintext).await?;
        Ok(ReplicaSet { redis, epps, homes, ports, envoy, options })
    }
}

/// gRPC health status of `service` on `port` (plaintext), as its proto name.
pub async fn health_status(port: u16, service: &str) -> Option<String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).ok()?.connect().await.ok()?;
    let reply = HealthClient::new(channel).check(HealthCheckRequest { service: service.to_string() }).await.ok()?;
    Some(reply.into_inner().status().as_str_name().to_string())
}

/// A running Envoy.
pub struct Envoy {
    pub process: Process,
    pub listener: u16,
}

impl Envoy {
    /// Envoy with the project's ext_proc bootstrap, asking the EPP on `epp_port`.
    pub async fn ext_proc(setup: &Setup, scratch: &Scratch, epp_port: u16) -> Result<Envoy, StackError> {
        let bootstrap = if setup.plaintext_ext_proc { Bootstrap::OursPlaintext } else { Bootstrap::Ours };
        Envoy::ext_proc_with(&setup.envoy, scratch, epp_port, bootstrap).await
    }

    /// Envoy with the given ext_proc `bootstrap`, asking the EPP on `epp_port`.
    pub async fn ext_proc_with(
        envoy: &Path,
        scratch: &Scratch,
        epp_port: u16,
        bootstrap: Bootstrap,
    ) -> Result<Envoy, StackError> {
        let template = match bootstrap {
            Bootstrap::Ours | Bootstrap::OursPlaintext | Bootstrap::Buffered => EXT_PROC_ENVOY,
            Bootstrap::Guide => GUIDE_ENVOY,
        };
        Envoy::start_on_free_ports(envoy, scratch, "envoy-ext-proc", |listener, admin| {
            let text = with_ports(template, listener, admin, epp_port);
            match bootstrap {
                Bootstrap::OursPlaintext => without_tls(&text),
                Bootstrap::Buffered => text
                    .replace("request_body_mode: FULL_DUPLEX_STREAMED", "request_body_mode: BUFFERED")
                    .replace("response_body_mode: FULL_DUPLEX_STREAMED", "response_body_mode: STREAMED"),
                _ => text,
            }
        })
        .await
    }

    /// Envoy with `config/envoy-replicas.yaml`: ext_proc balanced over two EPPs on `ports`
    /// (TLS to them unless `plaintext`).
    pub async fn ext_proc_replicas(
        envoy: &Path,
        scratch: &Scratch,
        ports: [u16; 2],
        plaintext: bool,
    ) -> Result<Envoy, StackError> {
        Envoy::start_on_free_ports(envoy, scratch, "envoy-replicas", |listener, admin| {
            let text = with_ports(REPLICAS_ENVOY, listener, admin, ports[0])
                .replace("port_value: 9012", &format!("port_value: {}", ports[1]));
            if plaintext { without_tls(&text) } else { text }
        })
        .await
    }

    /// Envoy round-robin over `workers`, without ext_proc.
    pub async fn round_robin(setup: &Setup, scratch: &Scratch, workers: &Workers) -> Result<Envoy, StackError> {
        let ports: Vec<u16> = workers.handles.iter().map(|h| h.addr().port()).collect();
        Envoy::start_on_free_ports(&setup.envoy, scratch, "envoy-round-robin", |listener, admin| {
            round_robin_bootstrap(listener, admin, &ports)
        })
        .await
    }

    /// Starts Envoy on two free ports; a port taken by another process between being found
    /// free and being bound (tests run in parallel) is retried with new ports.
    async fn start_on_free_ports(
        bin: &Path,
        scratch: &Scratch,
        name: &str,
        bootstrap: impl Fn(u16, u16) -> String,
    ) -> Result<Envoy, StackError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (listener, admin) = (free_port()?, free_port()?);
            match Envoy::start(bin, scratch, name, &bootstrap(listener, admin), listener, admin).await {
                Err(e) if attempt < 4 && e.to_string().contains("Address already in use") => continue,
                other => return other,
            }
        }
    }

    async fn start(
        bin: &Path,
        scratch: &Scratch,
        name: &str,
        bootstrap: &str,
        listener: u16,
        admin: u16,
    ) -> Result<Envoy, StackError> {
        let path = scratch.write(&format!("{name}.yaml"), bootstrap)?;
        let mut cmd = Command::new(bin);
        // Two worker threads: the machine's cores, as the test stack runs it.
        cmd.arg("-c").arg(&path).args(["--use-dynamic-base-id", "--concurrency", "2", "--log-level", "warn"]);
        let mut process = Process::spawn(name, &mut cmd, scratch.log(&format!("{name}.log")))?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| StackError::Setup(format!("http client: {e}")))?;
        let ready = format!("http://127.0.0.1:{admin}/ready");
        wait_until(&mut process, &format!("{name} admin /ready"), Duration::from_secs(60), || {
            let (client, ready) = (client.clone(), ready.clone());
            async move { client.get(&ready).send().await.map(|r| r.status().is_success()).unwrap_or(false) }
        })
        .await?;
        // Ready for Envoy is not ready for traffic (the ext_proc cluster's health check may
        // not have passed yet): wait for one request to go all the way through.
        let url = format!("http://127.0.0.1:{listener}/v1/chat/completions");
        let body = serde_json::json!({
            "model": "sim-model",
            "messages": [{"role": "user", "content": "ready?"}],
            "max_tokens": 1,
        })
        .to_string();
        wait_until(&mut process, &format!("a request through {name}"), Duration::from_secs(60), || {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            async move {
                let r = client.post(&url).header("content-type", "application/json").body(body).send().await;
                r.map(|r| r.status().is_success()).unwrap_or(false)
            }
        })
        .await?;
        Ok(Envoy { process, listener })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listener)
    }
}

/// Whether the project's bootstrap reaches the EPP over TLS (for the report's wording).
pub fn ext_proc_uses_tls() -> bool {
    EXT_PROC_ENVOY.contains("envoy.transport_sockets.tls")
}

/// Which ext_proc bootstrap Envoy runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// The project's `config/envoy.yaml` (TLS to the EPP, the EPP's default).
    Ours,
    /// The same without TLS to the EPP (for an EPP run with `--secure-serving=false`).
    OursPlaintext,
    /// The upstream guide's `config/guide/envoy.yaml` (plaintext, full duplex both ways).
    Guide,
    /// `config/envoy.yaml` in the buffered modes an operator may choose instead (request
    /// body `BUFFERED`, response body `STREAMED`), TLS to the EPP as shipped.
    Buffered,
}

/// config/envoy.yaml with its listener, admin and EPP ports replaced, listening on loopback.
pub fn ext_proc_bootstrap(listener: u16, admin: u16, epp_port: u16) -> String {
    with_ports(EXT_PROC_ENVOY, listener, admin, epp_port)
}

/// An ext_proc bootstrap with its listener, admin and EPP ports replaced, on loopback.
fn with_ports(template: &str, listener: u16, admin: u16, epp_port: u16) -> String {
    template
        .replace("port_value: 8081", &format!("port_value: {listener}"))
        .replace("port_value: 9002", &format!("port_value: {epp_port}"))
        .replace("localhost:9002", &format!("localhost:{epp_port}"))
        .replace("port_value: 19000", &format!("port_value: {admin}"))
        .replace("address: 0.0.0.0", "address: 127.0.0.1")
}

/// `bootstrap` without its `transport_socket` blocks (the TLS to the EPP): the block's
/// key line and every following line indented deeper than it.
pub fn without_tls(bootstrap: &str) -> String {
    let mut out = String::with_capacity(bootstrap.len());
    let mut skipping: Option<usize> = None;
    for line in bootstrap.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(depth) = skipping {
            if line.trim().is_empty() || indent > depth {
                continue;
            }
            skipping = None;
        }
        if line.trim_start().starts_with("transport_socket:") {
            skipping = Some(indent);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The baseline: the same listener and HTTP settings as config/envoy.yaml, but a STATIC
/// cluster of the workers with ROUND_ROBIN and no ext_proc filter. Everything the two
/// bootstraps share is kept equal so that the difference measured is the EPP path.
pub fn round_robin_bootstrap(listener: u16, admin: u16, worker_ports: &[u16]) -> String {
    let endpoints: String = worker_ports
        .iter()
        .map(|p| {
            format!(
                "              - endpoint:\n                  address:\n                    socket_address: {{address: 127.0.0.1, port_value: {p}}}\n"
            )
        })
        .collect();
    format!(
        r#"# Generated by epp-bench: round-robin over the workers, no ext_proc.
admin:
  address:
    socket_address: {{address: 127.0.0.1, port_value: {admin}}}
static_resources:
  listeners:
    - name: vllm
      address:
        socket_address: {{address: 127.0.0.1, port_value: {listener}}}
      per_connection_buffer_limit_bytes: 32768
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: http-rr
                route_config:
                  name: vllm
                  virtual_hosts:
                    - name: vllm-default
                      domains: ["*"]
                      routes:
                        - match: {{prefix: "/"}}
                          route:
                            cluster: workers
                            timeout: 86400s
                            idle_timeout: 86400s
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
                      suppress_envoy_headers: true
                use_remote_address: true
                normalize_path: true
                merge_slashes: true
                server_header_transformation: PASS_THROUGH
  clusters:
    - name: workers
      type: STATIC
      connect_timeout: 10s
      lb_policy: ROUND_ROBIN
      circuit_breakers:
        thresholds:
          - max_connections: 40000
            max_pending_requests: 40000
            max_requests: 40000
      load_assignment:
        cluster_name: workers
        endpoints:
          - lb_endpoints:
{endpoints}"#
    )
}

/// The `redis-server` binary: `$REDIS_SERVER`, then `PATH`, then Debian's place.
pub fn locate_redis() -> Result<PathBuf, StackError> {
    if let Some(p) = std::env::var_os("REDIS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|d| d.join("redis-server")).find(|p| p.is_file()));
    if let Some(Some(p)) = on_path {
        return Ok(p);
    }
    let debian = PathBuf::from("/usr/bin/redis-server");
    if debian.is_file() {
        return Ok(debian);
    }
    Err(StackError::Setup(
        "redis-server not found (scripts/prepare.sh installs Debian's redis-server; or set REDIS_SERVER)".into(),
    ))
}

/// A real `redis-server` on loopback, without persistence; killed when dropped.
pub struct Redis {
    pub process: Process,
    pub port: u16,
}

impl Redis {
    /// Starts one on `port` (a free one when None) and waits until it answers PING. A free
    /// port can be taken by another process before redis-server binds it; then it exits,
    /// and another free port is tried (three in all).
    pub async fn start(scratch: &Scratch, port: Option<u16>) -> Result<Redis, StackError> {
        let bin = locate_redis()?;
        let attempts = if port.is_some() { 1 } else { 3 };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = match port {
                Some(p) => p,
                None => free_port()?,
            };
            let mut cmd = Command::new(&bin);
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--protected-mode", "no"]);
            let mut process = Process::spawn("redis-server", &mut cmd, scratch.log("redis.log"))?;
            let ready = Duration::from_secs(20);
            match wait_until(&mut process, "redis-server answering PING", ready, || redis_ping(port)).await {
                Ok(()) => return Ok(Redis { process, port }),
                Err(e @ StackError::Exited { .. }) if attempt < attempts => {
                    eprintln!("redis-server on port {port} exited ({e}); trying another port");
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// Whether a Redis server on `port` answers PING.
pub async fn redis_ping(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt).await.ok().flatten().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_are_fields_14_and_15_even_with_odd_names() {
        let stat = "4242 (epp (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 123 45 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(168));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..2000).map(|_| free_port().unwrap()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }

    #[test]
    fn our_own_cpu_time_is_readable() {
        assert!(cpu_time(std::process::id()).is_ok());
    }

    #[test]
    fn bootstraps_name_the_ports_given() {
        let ext = ext_proc_bootstrap(1111, 2222, 3333);
        assert!(
            ext.contains("port_value: 1111") && ext.contains("port_value: 2222") && ext.contains("port_value: 3333")
        );
        assert!(!ext.contains("address: 0.0.0.0") && !ext.contains("port_value: 9002"));
        assert!(ext.contains("envoy.filters.http.ext_proc"));
        let plain = without_tls(&ext);
        assert!(!plain.contains("envoy.transport_sockets.tls") && !plain.contains("UpstreamTlsContext"), "{plain}");
        assert!(plain.contains("name: ext_proc") && plain.contains("port_value: 3333"));
        let rr = round_robin_bootstrap(1111, 2222, &[4001, 4002]);
        assert!(rr.contains("port_value: 4001}") && rr.contains("port_value: 4002}") && rr.contains("ROUND_ROBIN"));
        assert!(!rr.contains("envoy.filters.http.ext_proc"));
    }
}
