//! `sim-worker`: runs one simulated vLLM worker from command-line flags until SIGINT or
//! SIGTERM. It prints exactly one line to stdout, `sim-worker <name> listening on <addr>`,
//! which scripts parse for the bound address; logs go to stderr. Everything else lives in
//! the library.

use clap::Parser;
use sim::{Cli, SimConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let config = SimConfig::from(Cli::parse());
    let handle = sim::spawn(config).await?;
    println!("sim-worker {} listening on {}", handle.name(), handle.addr());
    stopped().await?;
    handle.shutdown().await
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn stopped() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
