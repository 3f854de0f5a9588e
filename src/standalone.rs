//! `tiermq standalone`: one frontend and the in-process partitions in one process, data in a
//! local folder. The frontend talks to the partitions through the same `SessionService`
//! interface a cluster frontend uses over gRPC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tiermq_frontend::passwd::{PasswordAuth, PasswordStore};

use anyhow::Context;
use tiermq_backend::local::{LocalBroker, LocalConfig};
use tiermq_backend::partition::session::SessionLimits;
use tiermq_common::config::Settings;
use tiermq_common::QoS;
use tiermq_frontend::metrics::FrontendMetrics;
use tiermq_frontend::sys_topics::SysTopics;
use tiermq_frontend::{FrontendConfig, ListenerSet};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::metrics_http::{self, MetricsServer};
use crate::node_metrics::{self, RetainedCount, StandaloneState};

/// A running standalone broker.
pub struct Standalone {
    local_addr: SocketAddr,
    /// Boxed: tests keep brokers in enums, where size counts.
    listeners: Box<ListenerSet>,
    shutdown: CancellationToken,
    listener: JoinHandle<()>,
    broker: LocalBroker,
    metrics: Option<MetricsServer>,
    sys_topics: Option<JoinHandle<()>>,
    /// The self-check probe, when `metrics.probe_interval_secs` asks for it.
    probe: Option<JoinHandle<()>>,
}

/// The username/password check `mqtt.password_file` asks for (read and checked now, so a bad
/// file stops the start with its line number).
pub fn password_auth(s: &Settings) -> anyhow::Result<Option<PasswordAuth>> {
    let Some(path) = &s.mqtt.password_file else {
        return Ok(None);
    };
    Ok(Some(PasswordAuth {
        users: PasswordStore::load(path)?,
        allow_anonymous: s.mqtt.allow_anonymous.unwrap_or(false),
        failure_delay: Duration::from_millis(s.mqtt.auth_failure_delay_ms),
    }))
}

/// Loads the password file into `config`: the CONNECT username/password check, and the
/// SCRAM-SHA-256 enhanced authentication method over the same users.
pub fn apply_password_file(s: &Settings, config: &mut FrontendConfig) -> anyhow::Result<()> {
    config.password_auth = password_auth(s)?;
    if let Some(auth) = &config.password_auth {
        let scram = auth.users.scram_authenticator(auth.failure_delay);
        config.authenticators.register(Arc::new(scram));
    }
    Ok(())
}

/// The ACLs `mqtt.acl_file` and the listeners' `acl_file` ask for (read and checked now, so a
/// bad file stops the start with its line number; later reloads keep the previous rules).
pub fn acl_set(s: &Settings) -> anyhow::Result<tiermq_frontend::acl::AclSet> {
    use tiermq_frontend::acl::Acl;
    let mut set = tiermq_frontend::acl::AclSet::default();
    if let Some(path) = &s.mqtt.acl_file {
        set.default = Some(Acl::load(path)?);
    }
    for l in s.effective_listeners() {
        if let Some(path) = &l.acl_file {
            set.listeners.insert(l.name(), Acl::load(path)?);
        }
    }
    if !set.is_empty() && s.mqtt.password_file.is_none() {
        tracing::warn!("an ACL is set without mqtt.password_file: `user` rules and %u trust the user name a client claims (certificate identities excepted)");
    }
    Ok(set)
}

pub fn frontend_config(s: &Settings) -> FrontendConfig {
    let m = &s.mqtt;
    FrontendConfig {
        frontend_id: 0,
        max_packet_size: m.max_packet_size,
        receive_maximum: m.receive_maximum,
        v311_inflight: m.v311_inflight,
        max_keep_alive: m.max_keep_alive,
        connect_timeout: Duration::from_secs(m.connect_timeout_secs),
        topic_alias_maximum: m.topic_alias_maximum,
        topic_alias_out: m.topic_alias_out,
        max_client_id_len: m.max_client_id_len,
        retain_available: m.retain_available,
        maximum_qos: QoS::from_u8(m.maximum_qos).unwrap_or(QoS::ExactlyOnce),
        response_information: (!m.response_information.is_empty())
            .then(|| m.response_information.clone()),
        // Loaded by `password_auth`, which can fail.
        password_auth: None,
        max_write_buffer: m.max_write_buffer,
        // Methods are code, not settings: a binary (or a test) registers them through
        // `Standalone::start_with`.
        authenticators: Default::default(),
        // A fresh set per node; the node's metrics endpoint registers it.
        metrics: Default::default(),
        // A cluster frontend sets its own (server references, pacing); see src/frontend.rs.
        drain: Default::default(),
        limits: tiermq_frontend::limits::Limits::new(s.limits.clone()),
        // Loaded by `acl_set`, which can fail.
        acl: Default::default(),
        takeovers: Default::default(),
    }
}

/// Opens the configured client listeners (TLS files are read first, so a missing file is
/// reported before any port is taken). Returns them, what the node keeps of them, and the
/// first one's address.
pub async fn bind_listeners(
    s: &Settings,
) -> anyhow::Result<(Vec<tiermq_frontend::Listener>, ListenerSet, SocketAddr)> {
    let bound = tiermq_frontend::bind_all(&s.effective_listeners()).await?;
    let set = ListenerSet::of(&bound);
    let first = set
        .listeners
        .first()
        .map(|l| l.addr)
        .context("no client listener configured")?;
    Ok((bound, set, first))
}

/// How often TLS certificate files are checked for changes (None: only SIGHUP).
pub fn tls_poll(s: &Settings) -> Option<Duration> {
    (s.mqtt.tls_reload_interval_secs > 0)
        .then(|| Duration::from_secs(s.mqtt.tls_reload_interval_secs))
}

pub fn local_config(s: &Settings) -> LocalConfig {
    LocalConfig {
        partitions: s.storage.partitions,
        limits: SessionLimits {
            max_queued_messages: s.session.max_queued_messages,
            queue_qos0_offline: s.session.queue_qos0_offline,
            max_subscriptions: s.session.max_subscriptions,
            shared_strategy: s.session.shared_strategy,
            queue_full: s.session.queue_full_policy,
        },
        checkpoint_entries: s.storage.checkpoint_entries,
        ..LocalConfig::default()
    }
}

impl Standalone {
    /// Opens the data folder, recovers state and starts listening.
    pub async fn start(settings: &Settings) -> anyhow::Result<Standalone> {
        Standalone::start_with(settings, |_| {}).await
    }

    /// [`start`](Self::start) with a last say on the frontend's protocol settings, for what
    /// the settings file cannot express (enhanced authentication methods).
    pub async fn start_with(
        settings: &Settings,
        frontend: impl FnOnce(&mut FrontendConfig),
    ) -> anyhow::Result<Standalone> {
        // The metrics endpoint comes first, so /healthz answers (and /readyz says "not yet")
        // while a large data folder is being recovered.
        let node_metrics = Arc::new(FrontendMetrics::new());
        let state = StandaloneState::default();
        let mut endpoint = node_metrics::standalone(&node_metrics, state.clone());
        let probe_metrics = crate::probe_task::register(settings, &mut endpoint.registry);
        let metrics = metrics_http::start(&settings.metrics, endpoint).await?;
        let dir = &settings.storage.data_dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data folder {}", dir.display()))?;
        let broker = LocalBroker::open(dir, local_config(settings))
            .with_context(|| format!("cannot open data folder {}", dir.display()))?;
        let (bound, listeners, local_addr) = bind_listeners(settings).await?;
        let shutdown = CancellationToken::new();
        let mut config = frontend_config(settings);
        apply_password_file(settings, &mut config)?;
        config.acl = acl_set(settings)?;
        config.metrics = node_metrics.clone();
        frontend(&mut config);
        let listener = tokio::spawn(tiermq_frontend::serve_listeners(
            bound,
            Arc::new(broker.router().clone()),
            Arc::new(config),
            tls_poll(settings),
            shutdown.clone(),
        ));
        let retained = RetainedCount::new(broker.clone());
        let _ = state.set((broker.clone(), retained.clone()));
        let probe = crate::probe_task::spawn(
            settings,
            probe_metrics,
            Arc::new(broker.router().clone()),
            0,
            shutdown.clone(),
        );
        let sys_topics = (settings.mqtt.sys_interval_secs > 0).then(|| {
            let publisher = broker.clone();
            let sys = SysTopics {
                interval: Duration::from_secs(settings.mqtt.sys_interval_secs),
                prefix: SysTopics::STANDALONE_PREFIX.to_string(),
                expiry_secs: None,
                metrics: node_metrics,
                publish: Arc::new(move |m| Box::pin(publisher.publish_message(m))),
                retained_count: Some(Arc::new(move || {
                    let retained = retained.clone();
                    Box::pin(async move { Some(retained.get().await) })
                })),
            };
            tokio::spawn(sys.run(shutdown.clone()))
        });
        info!(mqtt = %local_addr, data = %dir.display(), "tiermq standalone running");
        Ok(Standalone {
            local_addr,
            listeners: Box::new(listeners),
            shutdown,
            listener,
            broker,
            metrics,
            sys_topics,
            probe,
        })
    }

    /// The address of the first listener (the TCP one unless `[[listeners]]` says otherwise).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every client listener with its bound address; reloads TLS certificates.
    pub fn listeners(&self) -> &ListenerSet {
        &self.listeners
    }

    pub fn broker(&self) -> &LocalBroker {
        &self.broker
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// Graceful stop: close clients with DISCONNECT 0x8B, then checkpoint and flush.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        if let Some(sys) = self.sys_topics {
            let _ = sys.await;
        }
        if let Some(probe) = self.probe {
            let _ = probe.await;
        }
        let _ = self.listener.await;
        self.broker.shutdown().await;
        if let Some(metrics) = self.metrics {
            metrics.shutdown().await;
        }
        info!("tiermq standalone stopped");
    }
}
