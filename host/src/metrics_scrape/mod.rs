//! Scraping the workers' Prometheus `/metrics` pages: the only place in the host that does.
//!
//! It owns fetching a page (HTTP, size cap, timeout), parsing the text format, picking the
//! engine's load gauges out of it, and one polling task per endpoint that hands each result
//! to a `ScrapeSink`. It must not know about the datastore, the scheduler or discovery: the
//! caller tells it which endpoints exist (`Scraper::sync`) and decides what a reading or a
//! failure means. A bad page is rejected whole — never half-read — and reported as a failure,
//! so the endpoint goes stale instead of looking idle.
//!
//! - `parse`: the Prometheus text exposition format → `Sample`s (pure).
//! - `extract`: samples → `EngineMetrics` with configurable metric names (pure).
//! - `engines`: which names read which endpoint (upstream's engine configs, by label).
//! - `fetch`: one HTTP GET with a size cap and a deadline.
//! - `poller`: `Scraper`, the per-endpoint tasks, state-change logging and error counters.

mod engines;
mod extract;
mod fetch;
mod parse;
mod poller;

#[cfg(test)]
mod test_server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use engines::{DEFAULT_ENGINE, ENGINE_LABEL_KEY, EngineConfigError, Engines};
pub use extract::{CacheInfo, EngineMetrics, ExtractError, LoraInfo, MAX_BLOCK_SIZE, MetricNames, extract};
pub use fetch::MAX_PAGE_BYTES;
pub use parse::{LineError, ParseError, Sample, parse, parse_bytes};
pub use poller::Scraper;

/// How every endpoint is scraped.
#[derive(Debug, Clone, PartialEq)]
pub struct ScrapeConfig {
    /// URL scheme; only `http` is built in (the HTTP client has no TLS).
    pub scheme: String,
    /// Path of the metrics page, starting with `/`.
    pub path: String,
    /// Time between the starts of two scrapes of one endpoint. A scrape that takes longer
    /// delays the next one: scrapes of one endpoint never overlap.
    pub interval: Duration,
    /// Deadline of one scrape: connecting, the response and the whole body.
    pub timeout: Duration,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        ScrapeConfig {
            scheme: "http".to_string(),
            path: "/metrics".to_string(),
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
        }
    }
}

/// Where scrape results go. Called from the pollers' tasks, one call at a time per endpoint.
///
/// Invariant: once `Scraper::sync` has dropped an endpoint (or `stop` returned), no call for
/// it is running or will start. To keep that promise the scraper waits for a running call to
/// return, so a sink must be quick and must not call back into the `Scraper`.
pub trait ScrapeSink: Send + Sync + 'static {
    /// A scrape of endpoint `id` succeeded.
    fn scraped(&self, id: u32, metrics: &EngineMetrics);
    /// A scrape of endpoint `id` failed; called on every failed scrape. `target` is the
    /// endpoint's key (`namespace/name`).
    fn failed(&self, id: u32, target: &str, error: &ScrapeError);
}

/// One endpoint to scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeTarget {
    pub id: u32,
    /// `namespace/name`, for logs and error counters.
    pub key: String,
    pub addr: SocketAddr,
    /// The names its page is read with (its engine's).
    pub names: Arc<MetricNames>,
}

/// Why one scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The exchange broke off after connecting (reset, malformed HTTP, …).
    #[error("HTTP exchange failed: {0}")]
    Transport(String),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("answered with HTTP status {0}")]
    Status(u16),
    #[error("the page is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("invalid metrics page: {0}")]
    Parse(#[from] ParseError),
    #[error("unusable metrics: {0}")]
    Extract(#[from] ExtractError),
}
