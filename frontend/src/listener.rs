//! Accepting client sockets: plain TCP, TLS, WebSocket and WebSocket over TLS, several at once.
//!
//! Every listener hands its connections to the same handler ([`crate::handler`]), which is
//! generic over the byte stream; what differs is only the work before the first MQTT byte (a
//! TLS handshake, an HTTP upgrade), done in the connection's own task within the connect
//! timeout, so a slow or hostile handshake never holds up the accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tiermq_common::config::{CertIdentity, ListenerKind, ListenerSettings};
use tiermq_common::session_api::SessionService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::FrontendConfig;
use crate::handler::serve_connection;
use crate::limits::{Admission, Limit, ListenerGauge};
use crate::metered_io::MeteredIo;
use crate::metrics;
use crate::reload::{self, Reload};
use crate::tls::{self, TlsFiles, TlsReloader};
use crate::ws;

/// What the handler knows about a connection besides its bytes.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    /// The listener's name (per-listener settings key on it).
    pub listener: Arc<str>,
    pub transport: ListenerKind,
    /// The verified client certificate's subject CN (or first SAN), on TLS listeners with
    /// client certificates.
    pub peer_identity: Option<Arc<str>>,
    /// On a listener with `use_identity_as_username`: the certificate's name chosen there. It
    /// is the connection's user name and stands in for a password.
    pub cert_username: Option<Arc<str>>,
    /// The socket is over this connection limit: its CONNECT is answered with the limit's
    /// reason code and the connection closes ([`crate::limits`]).
    pub refused: Option<Limit>,
}

impl ConnectionInfo {
    /// A plain TCP connection on an unnamed listener (tests, tools).
    pub fn tcp(peer: SocketAddr) -> ConnectionInfo {
        ConnectionInfo {
            peer,
            listener: Arc::from("tcp"),
            transport: ListenerKind::Tcp,
            peer_identity: None,
            cert_username: None,
            refused: None,
        }
    }
}

/// A listener that could not be opened; the message names the listener and the cause (the
/// file, the address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenError(pub String);

impl std::fmt::Display for ListenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ListenError {}

/// A bound listener, ready to [`serve_listeners`].
pub struct Listener {
    name: Arc<str>,
    kind: ListenerKind,
    socket: TcpListener,
    local_addr: SocketAddr,
    tls: Option<Arc<TlsReloader>>,
    ws_path: Arc<str>,
    /// `use_identity_as_username`.
    identity_as_username: Option<CertIdentity>,
    /// This listener's open sockets against its `max_connections`.
    gauge: Arc<ListenerGauge>,
}

impl Listener {
    /// Loads the TLS files (if any) and binds the address.
    pub async fn bind(s: &ListenerSettings) -> Result<Listener, ListenError> {
        let name: Arc<str> = Arc::from(s.name());
        let tls = if s.kind.is_tls() {
            let (Some(cert), Some(key)) = (&s.cert, &s.key) else {
                return Err(ListenError(format!(
                    "listener {name}: a TLS listener needs a certificate and a key"
                )));
            };
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: s.ca.clone(),
                require_client_cert: s.requires_client_cert(),
            };
            let reloader = TlsReloader::load(name.clone(), files)
                .map_err(|e| ListenError(format!("listener {name}: {e}")))?;
            Some(reloader)
        } else {
            None
        };
        let socket = bind_listener(s.listen).map_err(|e| {
            ListenError(format!(
                "listener {name}: cannot listen on {}: {e}",
                s.listen
            ))
        })?;
        let local_addr = socket
            .local_addr()
            .map_err(|e| ListenError(format!("listener {name}: {e}")))?;
        Ok(Listener {
            name,
            kind: s.kind,
            socket,
            local_addr,
            tls,
            ws_path: Arc::from(s.ws_path()),
            identity_as_username: s.use_identity_as_username,
            gauge: ListenerGauge::new(s.max_connections),
        })
    }

    /// A plain TCP listener on an already bound socket.
    pub fn tcp(socket: TcpListener) -> std::io::Result<Listener> {
        let local_addr = socket.local_addr()?;
        Ok(Listener {
            name: Arc::from(format!("tcp:{local_addr}")),
            kind: ListenerKind::Tcp,
            socket,
            local_addr,
            tls: None,
            ws_path: Arc::from(""),
            identity_as_username: None,
            gauge: ListenerGauge::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> ListenerKind {
        self.kind
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The reloadable TLS configuration of a tls/wss listener.
    pub fn tls(&self) -> Option<&Arc<TlsReloader>> {
        self.tls.as_ref()
    }
}

/// A listener as the node reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    pub name: String,
    pub kind: ListenerKind,
    pub addr: SocketAddr,
}

/// What a node keeps of its listeners while they serve: their addresses, and the handles to
/// reload their TLS certificates.
#[derive(Debug, Clone, Default)]
pub struct ListenerSet {
    pub listeners: Vec<ListenerInfo>,
    reloaders: Vec<Arc<TlsReloader>>,
}

impl ListenerSet {
    pub fn of(listeners: &[Listener]) -> ListenerSet {
        ListenerSet {
            listeners: listeners
                .iter()
                .map(|l| ListenerInfo {
                    name: l.name.to_string(),
                    kind: l.kind,
                    addr: l.local_addr,
                })
                .collect(),
            reloaders: listeners.iter().filter_map(|l| l.tls.clone()).collect(),
        }
    }

    /// The address of the first listener of `kind`.
    pub fn addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.kind == kind)
            .map(|l| l.addr)
    }

    /// The address of the listener named `name`.
    pub fn addr_of(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.addr)
    }

    /// Reads every TLS listener's files again now (what SIGHUP does). New handshakes use the
    /// new certificates; established connections keep theirs. The first failure is returned
    /// (that listener keeps its previous certificate; the others are still reloaded).
    pub fn reload_tls(&self) -> Result<(), tls::TlsError> {
        let mut first = Ok(());
        for r in &self.reloaders {
            if let Err(e) = r.reload() {
                warn!(listener = r.name(), error = %e, "TLS reload failed; the previous certificate stays in use");
                if first.is_ok() {
                    first = Err(tls::TlsError(format!("listener {}: {e}", r.name())));
                }
            }
        }
        first
    }
}

/// Binds every listener; fails on the first that cannot be opened (nothing stays bound).
pub async fn bind_all(settings: &[ListenerSettings]) -> Result<Vec<Listener>, ListenError> {
    let mut out = Vec::with_capacity(settings.len());
    for s in settings {
        out.push(Listener::bind(s).await?);
    }
    Ok(out)
}

/// Accepts MQTT connections on one plain TCP `listener` until `shutdown` is cancelled, then
/// waits for every connection task to finish (each sends DISCONNECT 0x8B to v5 clients and
/// closes).
pub async fn serve<S: SessionService>(
    listener: TcpListener,
    service: Arc<S>,
    config: Arc<FrontendConfig>,
    shutdown: CancellationToken,
) {
    match Listener::tcp(listener) {
        Ok(l) => serve_listeners(vec![l], service, config, None, shutdown).await,
        Err(e) => warn!(error = %e, "listener has no address"),
    }
}

/// Serves every listener until `shutdown`, then waits for all their connections to finish.
/// TLS certificates and the password file reload on SIGHUP and, with `tls_poll`, when their
/// files change.
pub async fn serve_listeners<S: SessionService>(
    listeners: Vec<Listener>,
    service: Arc<S>,
    config: Arc<FrontendConfig>,
    tls_poll: Option<Duration>,
    shutdown: CancellationToken,
) {
    let tasks = TaskTracker::new();
    let mut reloaders: Vec<Arc<dyn Reload>> = listeners
        .iter()
        .filter_map(|l| l.tls.clone().map(|t| t as Arc<dyn Reload>))
        .collect();
    if let Some(auth) = &config.password_auth {
        reloaders.push(auth.users.clone());
    }
    reloaders.extend(config.acl.reloaders());
    let loops = futures::future::join_all(listeners.into_iter().map(|l| {
        accept_loop(
            l,
            service.clone(),
            config.clone(),
            shutdown.clone(),
            tasks.clone(),
        )
    }));
    tokio::join!(loops, reload::watch(reloaders, tls_poll, shutdown.clone()));
    tasks.close();
    tasks.wait().await;
}

/// Connections the kernel completes and queues per listener before the accept loop takes them
/// (capped by `net.core.somaxconn`). tokio's `TcpListener::bind` asks for 128, which a burst
/// of connecting clients (thousands reconnecting after a frontend restart) overflows: the
/// dropped handshakes are retried by the clients after 1 s, 3 s, ... while the broker idles.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds an MQTT listener as `TcpListener::bind` does (SO_REUSEADDR), with [`LISTEN_BACKLOG`].
fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

struct ListenerCtx {
    name: Arc<str>,
    kind: ListenerKind,
    tls: Option<Arc<TlsReloader>>,
    ws_path: Arc<str>,
    identity_as_username: Option<CertIdentity>,
}

/// `accept failed` warnings: at most one per listener per minute.
static ACCEPT_WARNINGS: tiermq_common::log_limit::LogLimiter =
    tiermq_common::log_limit::LogLimiter::new(Duration::from_secs(60));

async fn accept_loop<S: SessionService>(
    listener: Listener,
    service: Arc<S>,
    config: Arc<FrontendConfig>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let Listener {
        name,
        kind,
        socket,
        local_addr,
        tls,
        ws_path,
        identity_as_username,
        gauge,
    } = listener;
    info!(listener = %name, %kind, addr = %local_addr, "MQTT listener ready");
    let ctx = Arc::new(ListenerCtx {
        name,
        kind,
        tls,
        ws_path,
        identity_as_username,
    });
    loop {
        let accepted = tokio::select! {
            r = socket.accept() => r,
            _ = shutdown.cancelled() => break,
            // Draining: no new sockets; the open connections move away on their own.
            _ = config.drain.started() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let now = std::time::Instant::now();
                let admission = match config.limits.admit(&gauge, peer.ip(), now) {
                    Ok(a) => a,
                    Err(limit) => {
                        // Over a limit with too many refusals already waiting: close now.
                        config.metrics.limit_hit(limit);
                        debug!(listener = %ctx.name, %peer, limit = limit.label(), "socket closed at once");
                        continue;
                    }
                };
                if let Some(limit) = admission.refused {
                    config.metrics.limit_hit(limit);
                    debug!(listener = %ctx.name, %peer, limit = limit.label(), "over a connection limit: CONNECT will be refused");
                }
                let _ = stream.set_nodelay(true);
                let stream = MeteredIo::new(stream, &config.metrics);
                // Every log line of the connection carries these; the handler fills in the
                // client id and session epoch once the CONNACK is decided.
                let span = tracing::info_span!(
                    "conn",
                    listener = %ctx.name,
                    %peer,
                    client_id = tracing::field::Empty,
                    epoch = tracing::field::Empty,
                );
                tasks.spawn(tracing::Instrument::instrument(
                    metrics::scope(
                        config.metrics.clone(),
                        connection(
                            ctx.clone(),
                            stream,
                            peer,
                            admission,
                            service.clone(),
                            config.clone(),
                            shutdown.clone(),
                        ),
                    ),
                    span,
                ));
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning, and say so once a
                // minute per listener, not 20 times a second.
                tiermq_common::warn_limited!(
                    ACCEPT_WARNINGS,
                    &ctx.name,
                    listener = %ctx.name,
                    error = %e,
                    "accept failed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The largest WebSocket message accepted: a whole maximum-size MQTT packet plus slack for a
/// client that puts several packets in one message.
fn ws_limit(config: &FrontendConfig) -> usize {
    (config.max_packet_size as usize)
        .saturating_add(64 * 1024)
        .max(64 * 1024)
}

/// Runs `step` within the handshake budget (the connect timeout) unless shutdown comes first.
async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    peer: SocketAddr,
    listener: &str,
    budget: Duration,
    shutdown: &CancellationToken,
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Option<T> {
    tokio::select! {
        r = tokio::time::timeout(budget, step) => match r {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                debug!(%peer, listener, error = %e, "{what} failed");
                None
            }
            Err(_) => {
                debug!(%peer, listener, "{what} not finished before the connect timeout");
                None
            }
        },
        _ = shutdown.cancelled() => None,
    }
}

async fn connection<S: SessionService>(
    ctx: Arc<ListenerCtx>,
    stream: MeteredIo<TcpStream>,
    peer: SocketAddr,
    // Held for the connection's life: the socket counts against the limits until it closes.
    admission: Admission,
    service: Arc<S>,
    config: Arc<FrontendConfig>,
    shutdown: CancellationToken,
) {
    let mut info = ConnectionInfo {
        peer,
        listener: ctx.name.clone(),
        transport: ctx.kind,
        peer_identity: None,
        cert_username: None,
        refused: admission.refused,
    };
    let budget = config.connect_timeout;
    let name = &*ctx.name;
    match (&ctx.tls, ctx.kind.is_websocket()) {
        (None, false) => serve_connection(stream, info, service, config, shutdown).await,
        (None, true) => serve_websocket(stream, &ctx, info, service, config, shutdown).await,
        (Some(tls), websocket) => {
            let handshake = tls.acceptor().accept(stream);
            let Some(stream) =
                bounded("TLS handshake", peer, name, budget, &shutdown, handshake).await
            else {
                return;
            };
            info.peer_identity = tls::peer_identity(stream.get_ref().1).map(Arc::from);
            info.cert_username = ctx
                .identity_as_username
                .and_then(|which| tls::peer_username(stream.get_ref().1, which))
                .map(Arc::from);
            debug!(%peer, listener = name, identity = ?info.peer_identity, "TLS established");
            if websocket {
                serve_websocket(stream, &ctx, info, service, config, shutdown).await
            } else {
                serve_connection(stream, info, service, config, shutdown).await
            }
        }
    }
}

/// The WebSocket upgrade on `stream` (plain or TLS), then MQTT over its binary messages.
async fn serve_websocket<S, IO>(
    stream: IO,
    ctx: &ListenerCtx,
    info: ConnectionInfo,
    service: Arc<S>,
    config: Arc<FrontendConfig>,
    shutdown: CancellationToken,
) where
    S: SessionService,
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let upgrade = ws::accept(stream, &ctx.ws_path, ws_limit(&config));
    let budget = config.connect_timeout;
    let step = bounded(
        "WebSocket upgrade",
        info.peer,
        &ctx.name,
        budget,
        &shutdown,
        upgrade,
    );
    if let Some(io) = step.await {
        serve_connection(io, info, service, config, shutdown).await
    }
}
