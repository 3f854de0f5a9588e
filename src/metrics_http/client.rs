//! The client of [`MetricsServer`](super::MetricsServer): one request per connection over
//! hyper's HTTP/1 connection API, so that `tiermq health --http`, `tiermq frontend drain` and
//! `tiermq cluster status --frontends` work in images without curl.
//!
//! hyper's connection-level client rather than a pooled one: every caller asks one node once
//! (or once every 200 ms while waiting for a drain), and a node that went away must show up as
//! a failed connect on the next call, not as a stale pooled connection.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{CONNECTION, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// The largest answer read: `/metrics` of a busy node is well below it.
const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// One HTTP/1.1 request to a node's endpoint (`addr` = `host:port`): returns the status code
/// and the body. The whole exchange, connect included, is bounded by `timeout`.
pub async fn call(
    addr: &str,
    method: &str,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(timeout, exchange(addr, method, path))
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer from {addr} within {timeout:?}")))
}

async fn exchange(addr: &str, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let method = Method::from_bytes(method.as_bytes())
        .with_context(|| format!("not an HTTP method: {method:?}"))?;
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr)
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .with_context(|| format!("bad request path {path:?}"))?;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP handshake with {addr}"))?;
    // Drives the socket; it ends with the exchange (the server closes after one answer) or
    // is dropped with this future on timeout.
    let connection = tokio::spawn(connection);
    let answer = async {
        let response = sender
            .send_request(request)
            .await
            .context("sending the request")?;
        let code = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
            .to_bytes();
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }
    .await;
    connection.abort();
    answer
}
