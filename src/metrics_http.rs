//! The per-node HTTP endpoint operators and orchestrators talk to:
//!
//! - `GET /metrics`: every `tiermq_*` series in the OpenMetrics text format Prometheus reads;
//! - `GET /healthz`: `200 ok` as long as the process runs (a liveness probe);
//! - `GET /readyz`: `200 ok` when the node does its job, `503` with the reason when not; a
//!   role that cannot tell honestly has no readiness check and answers `404`;
//! - `GET /status` (frontend): a small JSON object — frontend id, connections by protocol,
//!   draining, ready — that `tiermq cluster status --frontends` shows;
//! - `POST /drain` (frontend): starts draining (`202`; `200` when already draining); the
//!   process exits once its clients are gone. `tiermq frontend drain --admin ADDR` calls it.
//!
//! [`call`] is the matching client (`tiermq health --http`, `tiermq frontend drain`), on
//! hyper's HTTP/1 client (`metrics_http/client.rs`).
//!
//! It is deliberately small — plain hyper 1 (already in the tree through tonic), one request
//! per connection, a deadline per connection — because it must never be what takes a broker
//! down: a slow or malicious client of this port holds one short-lived task, nothing else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tiermq_common::config::MetricsSettings;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

mod client;
pub use client::call;

/// An async probe run per request.
pub type Hook<T> = Arc<dyn Fn() -> BoxFuture<'static, T> + Send + Sync>;

/// What one node exposes.
pub struct Endpoint {
    /// Every series, `tiermq_` prefixed.
    pub registry: Registry,
    /// Runs before each scrape, for gauges whose source must be asked (partition tasks, Raft
    /// groups) rather than read from an atomic.
    pub refresh: Option<Hook<()>>,
    /// `/readyz`: `Ok` when ready, `Err(why)` when not; `None` where there is no honest check.
    pub readiness: Option<Hook<Result<(), String>>>,
    /// `GET /status`: a JSON document; `None`: 404.
    pub status: Option<Hook<String>>,
    /// `POST /drain`: starts a drain, `Ok(text)` when this call started it, `Err(text)` when
    /// it was already running; `None`: 404.
    pub drain: Option<Hook<Result<String, String>>>,
}

impl Endpoint {
    /// An endpoint with `registry` only: no refresh, readiness, status or drain.
    pub fn new(registry: Registry) -> Endpoint {
        Endpoint {
            registry,
            refresh: None,
            readiness: None,
            status: None,
            drain: None,
        }
    }
}

/// How long one HTTP connection may live, request and answer included.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the endpoint as configured. `None` when disabled — or when the *default* address is
/// taken (another node on this host has it): that is logged and the node runs without
/// metrics. An address the operator chose that cannot be bound is an error.
pub async fn bind(settings: &MetricsSettings) -> anyhow::Result<Option<TcpListener>> {
    let Some(listen) = settings.listen()? else {
        return Ok(None);
    };
    match TcpListener::bind(listen.addr).await {
        Ok(l) => Ok(Some(l)),
        Err(e) if !listen.explicit => {
            warn!(addr = %listen.addr, error = %e,
                "default metrics address unavailable, running without the metrics endpoint \
                 (set metrics.listen / --metrics-listen)");
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen for metrics on {}", listen.addr)),
    }
}

/// Binds ([`bind`]) and serves `endpoint`; `None` when there is nothing to serve on.
pub async fn start(
    settings: &MetricsSettings,
    endpoint: Endpoint,
) -> anyhow::Result<Option<MetricsServer>> {
    match bind(settings).await? {
        Some(listener) => Ok(Some(MetricsServer::start(listener, endpoint)?)),
        None => Ok(None),
    }
}

/// A running endpoint; it stops when dropped (a node that failed to start does not leave it
/// behind).
pub struct MetricsServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Serves `endpoint` on `listener` until [`MetricsServer::shutdown`].
    pub fn start(listener: TcpListener, endpoint: Endpoint) -> anyhow::Result<MetricsServer> {
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, Arc::new(endpoint), shutdown.clone()));
        info!(%addr, "metrics endpoint ready (/metrics, /healthz, /readyz)");
        Ok(MetricsServer {
            addr,
            shutdown,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `metrics accept failed` (EMFILE, retried every 100 ms): at most one a minute.
static ACCEPT_WARNINGS: tiermq_common::log_limit::LogLimiter =
    tiermq_common::log_limit::LogLimiter::new(Duration::from_secs(60));

async fn accept_loop(listener: TcpListener, endpoint: Arc<Endpoint>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tiermq_common::warn_limited!(
                    ACCEPT_WARNINGS,
                    "metrics-accept",
                    error = %e,
                    "metrics accept failed"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let endpoint = endpoint.clone();
                async move { Ok::<_, Infallible>(answer(&endpoint, req).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection).await;
        });
    }
}

async fn answer(endpoint: &Endpoint, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/drain" {
        return match (&endpoint.drain, req.method()) {
            (None, _) => text(
                StatusCode::NOT_FOUND,
                "no drain on this node (frontends only)\n".into(),
            ),
            (Some(drain), &Method::POST) => match drain().await {
                Ok(msg) => text(StatusCode::ACCEPTED, format!("{msg}\n")),
                Err(msg) => text(StatusCode::OK, format!("{msg}\n")),
            },
            (Some(_), _) => text(StatusCode::METHOD_NOT_ALLOWED, "POST /drain\n".into()),
        };
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/status" => match &endpoint.status {
            None => text(StatusCode::NOT_FOUND, "no status on this node\n".into()),
            Some(status) => {
                let mut response = text(StatusCode::OK, status().await);
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                response
            }
        },
        "/metrics" => {
            if let Some(refresh) = &endpoint.refresh {
                refresh().await;
            }
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &endpoint.registry) {
                Ok(()) => Response::builder()
                    .header(CONTENT_TYPE, OPENMETRICS)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, String::new())),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot encode metrics\n".into(),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match &endpoint.readiness {
            None => text(
                StatusCode::NOT_FOUND,
                "no readiness check on this node (see docs/operations.md)\n".into(),
            ),
            Some(check) => match check().await {
                Ok(()) => text(StatusCode::OK, "ok\n".into()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz, /readyz, /status or POST /drain\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
