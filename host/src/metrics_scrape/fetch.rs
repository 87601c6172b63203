//! One HTTP GET of a metrics page, with a size cap and a deadline over the whole exchange.
//!
//! It owns the HTTP client's settings and the mapping of transport failures to
//! `ScrapeError`. It must not parse: it hands back the page's bytes, or why there are none.

use std::time::Duration;

use reqwest::header::ACCEPT;

use super::ScrapeError;

/// The largest page read. vLLM's pages are tens of KiB; anything near this is not a
/// metrics page we want to parse every 50 ms.
pub const MAX_PAGE_BYTES: usize = 4 << 20;

/// Asks for the classic text format: exporters that negotiate would otherwise be free to
/// answer in OpenMetrics or protobuf.
const ACCEPT_TEXT_FORMAT: &str = "text/plain; version=0.0.4";

/// A client for scraping one endpoint (it keeps that endpoint's connection alive).
pub(super) fn client(timeout: Duration) -> Result<reqwest::Client, ScrapeError> {
    reqwest::Client::builder()
        // Workers are addressed directly; an HTTP_PROXY in the environment is meant for
        // other traffic, and following a redirect would scrape some other page.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1)
        .build()
        .map_err(|e| ScrapeError::Transport(format!("cannot build the HTTP client: {}", reason(&e))))
}

/// The body of `url`, if it answers 2xx within `timeout` with at most `limit` bytes.
pub(super) async fn fetch(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    limit: usize,
) -> Result<Vec<u8>, ScrapeError> {
    match tokio::time::timeout(timeout, get(client, url, limit)).await {
        Ok(result) => result,
        Err(_) => Err(ScrapeError::Timeout(timeout)),
    }
}

async fn get(client: &reqwest::Client, url: &str, limit: usize) -> Result<Vec<u8>, ScrapeError> {
    let mut response = client.get(url).header(ACCEPT, ACCEPT_TEXT_FORMAT).send().await.map_err(transport)?;
    let status = response.status();
    if !status.is_success() {
        return Err(ScrapeError::Status(status.as_u16()));
    }
    let declared = response.content_length();
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ScrapeError::TooLarge { limit });
    }
    // Invariant: `page` never grows past `limit`, whatever the server declared or sends.
    let mut page = Vec::with_capacity(declared.map_or(0, |length| length as usize));
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if page.len() + chunk.len() > limit {
            return Err(ScrapeError::TooLarge { limit });
        }
        page.extend_from_slice(&chunk);
    }
    Ok(page)
}

fn transport(error: reqwest::Error) -> ScrapeError {
    // Only the connect timeout is set on the client (the overall deadline is ours), so a
    // timeout reported by reqwest is a failure to connect.
    if error.is_connect() || error.is_timeout() {
        ScrapeError::Connect(reason(&error))
    } else {
        ScrapeError::Transport(reason(&error))
    }
}

/// The error and its sources: reqwest's own text alone ("error sending request") hides the
/// cause an operator needs ("connection refused").
fn reason(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::super::test_server::{Reply, TestServer};
    use super::*;

    const LIMIT: usize = 1024;
    const TIMEOUT: Duration = Duration::from_millis(300);

    fn kind(result: &Result<Vec<u8>, ScrapeError>) -> String {
        match result {
            Ok(page) => format!("ok {} bytes", page.len()),
            Err(ScrapeError::Connect(_)) => "connect".into(),
            Err(ScrapeError::Transport(_)) => "transport".into(),
            Err(ScrapeError::Timeout(_)) => "timeout".into(),
            Err(ScrapeError::Status(code)) => format!("status {code}"),
            Err(ScrapeError::TooLarge { limit }) => format!("too large {limit}"),
            Err(other) => format!("unexpected {other}"),
        }
    }

    #[tokio::test]
    async fn replies() {
        let cases: Vec<(Reply, String)> = vec![
            (Reply::page("a 1\n"), "ok 4 bytes".into()),
            (Reply::Page("x".repeat(LIMIT).into_bytes()), format!("ok {LIMIT} bytes")),
            (Reply::Page("x".repeat(LIMIT + 1).into_bytes()), format!("too large {LIMIT}")),
            (Reply::Chunked("x".repeat(LIMIT).into_bytes()), format!("ok {LIMIT} bytes")),
            (Reply::Chunked("x".repeat(4 * LIMIT).into_bytes()), format!("too large {LIMIT}")),
            (Reply::Status(500), "status 500".into()),
            (Reply::Status(404), "status 404".into()),
            (Reply::Status(302), "status 302".into()),
            (Reply::Hang, "timeout".into()),
            (Reply::Close, "transport".into()),
        ];
        let server = TestServer::start(Reply::Status(500)).await;
        let client = client(TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        let url = format!("http://{}/metrics", server.addr());
        for (reply, expected) in cases {
            server.set(reply.clone());
            let got = fetch(&client, &url, TIMEOUT, LIMIT).await;
            assert_eq!(kind(&got), expected, "{reply:?}");
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let addr = TestServer::closed_port().await;
        let client = client(TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        let got = fetch(&client, &format!("http://{addr}/metrics"), TIMEOUT, LIMIT).await;
        assert_eq!(kind(&got), "connect");
        let Err(error) = got else { panic!("connected to a closed port") };
        assert!(error.to_string().to_lowercase().contains("refused"), "the cause is named: {error}");
    }
}
