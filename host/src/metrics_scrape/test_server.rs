//! A tiny HTTP/1.1 server for the scraper's tests (test builds only).
//!
//! It owns nothing but raw responses: every request gets the reply currently set, which a
//! test switches at will (a page, a status, a hang, a closed connection) to drive a poller
//! through good and bad states. It must not be used outside tests; it trusts its clients.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What the server answers to every request, until changed.
#[derive(Clone)]
pub(super) enum Reply {
    /// 200 with this body and a `Content-Length`.
    Page(Vec<u8>),
    /// 200 with this body sent in chunks, without a `Content-Length`.
    Chunked(Vec<u8>),
    /// This status with a short body.
    Status(u16),
    /// Reads the request and never answers (until the client hangs up).
    Hang,
    /// Reads the request and closes the connection without answering.
    Close,
}

impl Reply {
    pub(super) fn page(text: &str) -> Reply {
        Reply::Page(text.as_bytes().to_vec())
    }
}

impl fmt::Debug for Reply {
    /// Short: bodies can be megabytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Page(body) => write!(f, "Page({} bytes)", body.len()),
            Reply::Chunked(body) => write!(f, "Chunked({} bytes)", body.len()),
            Reply::Status(code) => write!(f, "Status({code})"),
            Reply::Hang => write!(f, "Hang"),
            Reply::Close => write!(f, "Close"),
        }
    }
}

pub(super) struct TestServer {
    addr: SocketAddr,
    reply: Arc<Mutex<Reply>>,
    task: JoinHandle<()>,
}

impl TestServer {
    pub(super) async fn start(reply: Reply) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}"));
        let reply = Arc::new(Mutex::new(reply));
        let shared = reply.clone();
        let task = tokio::spawn(async move {
            // Owned by the accept loop, so aborting it ends every connection too.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(serve(stream, shared.clone()));
                // Reap finished connections so the set does not grow for the whole test.
                while connections.try_join_next().is_some() {}
            }
        });
        TestServer { addr, reply, task }
    }

    /// An address where nothing listens.
    pub(super) async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind: {e}"));
        listener.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}"))
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(super) fn set(&self, reply: Reply) {
        *self.reply.lock().unwrap_or_else(PoisonError::into_inner) = reply;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers the requests of one keep-alive connection.
async fn serve(mut stream: TcpStream, reply: Arc<Mutex<Reply>>) {
    let mut buf = Vec::new();
    loop {
        // One request head; the scraper only sends GETs, which have no body.
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        buf.drain(..end);
        let reply = reply.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let response = match reply {
            Reply::Page(body) => {
                let mut response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                response.extend_from_slice(&body);
                response
            }
            Reply::Chunked(body) => {
                let mut response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for chunk in body.chunks(512) {
                    response.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    response.extend_from_slice(chunk);
                    response.extend_from_slice(b"\r\n");
                }
                response.extend_from_slice(b"0\r\n\r\n");
                response
            }
            Reply::Status(code) => format!("HTTP/1.1 {code} Test\r\nContent-Length: 4\r\n\r\noops").into_bytes(),
            Reply::Hang => {
                let mut sink = [0u8; 256];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            Reply::Close => return,
        };
        if stream.write_all(&response).await.is_err() {
            return;
        }
    }
}
