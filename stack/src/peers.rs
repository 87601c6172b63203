//! The routers an operator could install instead of Envoy + EPP: `sglang-router` and
//! `vllm-router` (Rust binaries inside PyPI wheels, installed into the repository's `.venv`
//! by `scripts/bench.sh`), started in front of the same simulated workers.
//!
//! They run as operators run them — their default policy is `cache_aware` — with two
//! changes that only keep the comparison fair on one machine: their periodic health checks
//! are turned off (sglang) or made rare (vllm), and every port is on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{Process, Scratch, StackError, free_port, wait_until, workspace_root};

/// Which peer router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    Sglang,
    Vllm,
}

impl PeerKind {
    pub const ALL: [PeerKind; 2] = [PeerKind::Sglang, PeerKind::Vllm];

    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Sglang => "sglang-router",
            PeerKind::Vllm => "vllm-router",
        }
    }

    /// The command that starts it, if it is installed in the venv.
    fn command(self) -> Option<Command> {
        let venv = workspace_root().join(".venv/bin");
        match self {
            PeerKind::Sglang => {
                let python = venv.join("python");
                // Importable only when the wheel is installed.
                let installed = Command::new(&python)
                    .args(["-c", "import sglang_router"])
                    .output()
                    .is_ok_and(|o| o.status.success());
                installed.then(|| {
                    let mut c = Command::new(python);
                    c.args(["-m", "sglang_router.launch_router"]);
                    c
                })
            }
            PeerKind::Vllm => {
                let bin: PathBuf = venv.join("vllm-router");
                bin.is_file().then(|| Command::new(bin))
            }
        }
    }

    /// Whether it is installed.
    pub fn available(self) -> bool {
        self.command().is_some()
    }
}

/// A running peer router.
pub struct Peer {
    pub kind: PeerKind,
    pub process: Process,
    pub port: u16,
}

impl Peer {
    /// Starts `kind` with `policy` in front of `workers` and waits until it reports every
    /// worker healthy and a request goes through.
    pub async fn start(
        kind: PeerKind,
        policy: &str,
        workers: &[SocketAddr],
        scratch: &Scratch,
    ) -> Result<Peer, StackError> {
        let mut cmd = kind.command().ok_or_else(|| {
            StackError::Setup(format!("{} is not installed (scripts/bench.sh installs it)", kind.name()))
        })?;
        let (port, metrics) = (free_port()?, free_port()?);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--policy", policy])
            .args(["--prometheus-host", "127.0.0.1", "--prometheus-port", &metrics.to_string()])
            .arg("--worker-urls")
            .args(workers.iter().map(|w| format!("http://{w}")))
            // Loopback only: nothing may go through a proxy.
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost");
        match kind {
            PeerKind::Sglang => cmd.args(["--disable-health-check", "--log-level", "warn"]),
            PeerKind::Vllm => cmd.args(["--health-check-interval-secs", "3600", "--log-level", "warning"]),
        };
        let mut process = Process::spawn(kind.name(), &mut cmd, scratch.log(&format!("{}.log", kind.name())))?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .map_err(|e| StackError::Setup(format!("http client: {e}")))?;
        let readiness = format!("http://127.0.0.1:{port}/readiness");
        let n = workers.len() as u64;
        wait_until(&mut process, &format!("{} ready with {n} workers", kind.name()), Duration::from_secs(60), || {
            let (client, url) = (client.clone(), readiness.clone());
            async move {
                let Ok(r) = client.get(&url).send().await else { return false };
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                v["healthy_workers"].as_u64() == Some(n)
            }
        })
        .await?;
        let url = format!("http://127.0.0.1:{port}/v1/completions");
        let body = serde_json::json!({"model": "sim-model", "prompt": "ready?", "max_tokens": 1}).to_string();
        wait_until(&mut process, &format!("a request through {}", kind.name()), Duration::from_secs(30), || {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            async move {
                let r = client.post(&url).header("content-type", "application/json").body(body).send().await;
                r.map(|r| r.status().is_success()).unwrap_or(false)
            }
        })
        .await?;
        Ok(Peer { kind, process, port })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}
