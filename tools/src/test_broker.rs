//! A broker for the tools' end-to-end tests: the standalone partition runtime behind one
//! plain TCP listener with the default protocol settings. The `tiermq standalone` wiring lives
//! in the binary crate, which depends on this one; these few lines keep the dependency one-way.

use std::net::SocketAddr;
use std::sync::Arc;

use tiermq_backend::local::{LocalBroker, LocalConfig};
use tiermq_frontend::FrontendConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running broker and its data folder (removed when dropped).
pub struct TestBroker {
    addr: SocketAddr,
    broker: LocalBroker,
    shutdown: CancellationToken,
    listener: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    /// Opens a fresh data folder and listens on a free loopback port.
    pub async fn start() -> TestBroker {
        let dir = tempfile::tempdir().expect("temporary folder");
        let broker = LocalBroker::open(dir.path(), LocalConfig::default()).expect("data folder");
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("free port");
        let addr = tcp.local_addr().expect("bound address");
        let shutdown = CancellationToken::new();
        let listener = tokio::spawn(tiermq_frontend::listener::serve(
            tcp,
            Arc::new(broker.router().clone()),
            Arc::new(FrontendConfig::default()),
            shutdown.clone(),
        ));
        TestBroker {
            addr,
            broker,
            shutdown,
            listener,
            _dir: dir,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the clients (DISCONNECT 0x8B), then stops the partitions.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.listener.await;
        self.broker.shutdown().await;
    }
}
