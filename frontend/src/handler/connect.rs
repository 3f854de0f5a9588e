//! CONNECT: the checks before a session exists (client id, credentials, will, ACL, drain),
//! the session's opening through the partitions, and CONNACK.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesOrdered;
use futures::SinkExt;
use tiermq_common::codec::{ConnAck, ConnAckProperties, Connect, MqttCodec, Packet};
use tiermq_common::released_ids::ReleasedIds;
use tiermq_common::session_api::{ConnectRequest, DisconnectRequest, ServiceError, SessionService};
use tiermq_common::{topic, QoS, ReasonCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::authenticate::{authenticate, ConnectAuth};
use super::Handler;
use crate::acl::Access;
use crate::alias::OutboundAliases;
use crate::auth::AuthSession;
use crate::config::FrontendConfig;
use crate::convert::will_from_connect;
use crate::limits::Limit;
use crate::listener::ConnectionInfo;
use crate::metrics::ConnectionMetrics;
use crate::sys_topics::is_sys_topic;

impl<S, IO> Handler<S, IO>
where
    S: SessionService,
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Validates CONNECT, opens the session and answers CONNACK.
    pub(super) async fn accept(
        mut framed: Framed<IO, MqttCodec>,
        conn: ConnectionInfo,
        connect: Connect,
        service: Arc<S>,
        config: Arc<FrontendConfig>,
        deadline: Instant,
        shutdown: &CancellationToken,
    ) -> Option<Self> {
        let peer = conn.peer;
        let version = connect.protocol;
        let v5 = version.is_v5();
        let props = &connect.properties;
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            if !v5 && !connect.clean_start {
                // 3.1.1: a zero-length id needs Clean Session = 1 (§3.1.3-8).
                refuse(&mut framed, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID).await;
                return None;
            }
            let id = format!("tiermq-{:016x}", rand::random::<u64>());
            assigned = Some(id.clone());
            id
        } else {
            connect.client_id.clone()
        };
        if client_id.len() > config.max_client_id_len {
            config.metrics.limit_hit(Limit::ClientIdLength);
            refuse(&mut framed, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID).await;
            return None;
        }
        // User name and password (mqtt.password_file): before the session exists. A verified
        // client certificate on a `use_identity_as_username` listener stands in for them.
        if let Some(auth) = &config.password_auth {
            if props.authentication_method.is_none() && conn.cert_username.is_none() {
                if let Err(code) = auth
                    .check(connect.username.as_deref(), connect.password.as_deref())
                    .await
                {
                    debug!(%peer, user = ?connect.username, "refused: credentials");
                    refuse(&mut framed, code).await;
                    return None;
                }
            }
        }
        let authenticator = match &props.authentication_method {
            None => None,
            Some(method) => match config.authenticators.get(method) {
                Some(a) => Some(a.clone()),
                None => {
                    // Nobody offers this method (§4.12: 0x8C).
                    debug!(%peer, method, "unknown authentication method");
                    refuse(&mut framed, ReasonCode::BAD_AUTHENTICATION_METHOD).await;
                    return None;
                }
            },
        };
        if let Some(will) = &connect.will {
            if !v5 && topic::validate_topic_name(&will.topic).is_err() {
                // 3.1.1 has no CONNACK code for an ill-formed will topic (a zero-length one,
                // wildcards): a protocol violation, closed without CONNACK ([MQTT-3.2.2-6],
                // [MQTT-4.8.0-1]). Return code 5 would tell the client it is not authorized.
                debug!(%peer, topic = %will.topic, "ill-formed will topic: closing");
                return None;
            }
            let over_limit = config.limits.check_topic(&will.topic);
            if let Err(limit) = over_limit {
                config.metrics.limit_hit(limit);
            }
            let code = if topic::validate_topic_name(&will.topic).is_err()
                || is_sys_topic(&will.topic)
                || over_limit.is_err()
            {
                Some(ReasonCode::TOPIC_NAME_INVALID)
            } else if will.qos > config.maximum_qos {
                Some(ReasonCode::QOS_NOT_SUPPORTED)
            } else if will.retain && !config.retain_available {
                Some(ReasonCode::RETAIN_NOT_SUPPORTED)
            } else if will.properties.payload_format_indicator == Some(1)
                && std::str::from_utf8(&will.payload).is_err()
            {
                Some(ReasonCode::PAYLOAD_FORMAT_INVALID)
            } else {
                None
            };
            if let Some(code) = code {
                refuse(&mut framed, code).await;
                return None;
            }
        }
        let session_expiry_secs = if v5 {
            props.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let receive_maximum = if v5 {
            props.receive_maximum.unwrap_or(u16::MAX)
        } else {
            config.v311_inflight
        };
        let client_max_packet = props.maximum_packet_size.unwrap_or(u32::MAX);
        // Never more aliases than the client can hold (absent = 0, §3.1.2.11.5); none in v3.
        let outbound_alias_max = if v5 {
            props
                .topic_alias_maximum
                .unwrap_or(0)
                .min(config.topic_alias_out)
        } else {
            0
        };
        let mut keep_alive = connect.keep_alive;
        let mut server_keep_alive = None;
        // Only v5 can be told (Server Keep Alive); a 3.1.1 client keeps its own value.
        if v5
            && config.max_keep_alive > 0
            && (keep_alive == 0 || keep_alive > config.max_keep_alive)
        {
            keep_alive = config.max_keep_alive;
            server_keep_alive = Some(keep_alive);
        }
        let request_response = props.request_response_information == Some(true);
        let client_id: Arc<str> = Arc::from(client_id);
        // Authenticate before the session exists: a refused client never touches it.
        let (auth, auth_data) = match authenticator {
            None => (None, None),
            Some(a) => {
                let (session, step) =
                    AuthSession::begin(a, client_id.clone(), props.authentication_data.clone());
                let ctx = ConnectAuth {
                    peer,
                    deadline,
                    shutdown,
                };
                let (session, data) = authenticate(&mut framed, ctx, session, step).await?;
                (Some(session), data)
            }
        };
        // See `Handler::username`: exchange user > certificate identity > CONNECT User Name.
        let username: Option<Arc<str>> = auth
            .as_ref()
            .and_then(|a| a.user().cloned())
            .or_else(|| conn.cert_username.clone())
            .or_else(|| connect.username.as_deref().map(Arc::from));
        // Authorization keys on that same user name. The will is a publish: a will the client
        // may not publish refuses the CONNECT (0x87, 3.1.1 return code 5) rather than being
        // dropped unseen.
        let mut acl = config
            .acl
            .for_listener(&conn.listener)
            .map(|a| a.view(username.clone(), client_id.clone()));
        if let (Some(view), Some(will)) = (acl.as_mut(), &connect.will) {
            if !view.may_publish(&will.topic) {
                debug!(%peer, client_id = %client_id, topic = %will.topic, "refused: will denied by the ACL");
                config.metrics.acl_denied(Access::Publish);
                refuse(&mut framed, ReasonCode::NOT_AUTHORIZED).await;
                return None;
            }
        }
        if config.drain.is_draining() {
            // The listener no longer accepts, but this CONNECT was already on its way.
            debug!(%peer, "CONNECT while draining: use another server");
            crate::metrics::connection_refused(ReasonCode::USE_ANOTHER_SERVER);
            let _ = framed
                .send(&Packet::ConnAck(ConnAck {
                    session_present: false,
                    reason_code: ReasonCode::USE_ANOTHER_SERVER,
                    properties: ConnAckProperties {
                        server_reference: v5
                            .then(|| config.drain.server_reference().map(str::to_string))
                            .flatten(),
                        ..ConnAckProperties::default()
                    },
                }))
                .await;
            return None;
        }
        // A connection of this client still open here reads what its client sent before this
        // CONNECT (a DISCONNECT, say) and records it first (see `crate::takeover`).
        let live = config.takeovers.enter(&client_id).await;
        let req = ConnectRequest {
            client_id: client_id.clone(),
            protocol: version,
            clean_start: connect.clean_start,
            session_expiry_secs,
            receive_maximum,
            will: connect.will.map(will_from_connect),
            frontend_id: config.frontend_id,
        };
        let connected = match service.connect(req).await {
            Ok(c) => {
                // The connection's span (listener.rs) names the session from now on.
                let span = tracing::Span::current();
                span.record("client_id", &*client_id);
                span.record("epoch", c.session.epoch);
                c
            }
            Err(e) => {
                debug!(%peer, error = %e, "connect refused by the partitions");
                let code = match e {
                    ServiceError::QuotaExceeded(_) => ReasonCode::QUOTA_EXCEEDED,
                    _ => ReasonCode::SERVER_UNAVAILABLE,
                };
                refuse(&mut framed, code).await;
                return None;
            }
        };
        let properties = if v5 {
            ConnAckProperties {
                receive_maximum: Some(config.receive_maximum),
                maximum_packet_size: Some(config.max_packet_size),
                topic_alias_maximum: (config.topic_alias_maximum > 0)
                    .then_some(config.topic_alias_maximum),
                maximum_qos: (config.maximum_qos < QoS::ExactlyOnce).then_some(config.maximum_qos),
                retain_available: Some(config.retain_available),
                wildcard_subscription_available: Some(true),
                subscription_identifiers_available: Some(true),
                shared_subscription_available: Some(true),
                assigned_client_identifier: assigned,
                server_keep_alive,
                response_information: match (&config.response_information, request_response) {
                    (Some(prefix), true) => Some(format!("{prefix}{client_id}")),
                    _ => None,
                },
                authentication_method: auth.as_ref().map(|a| a.method().to_string()),
                authentication_data: auth_data,
                ..ConnAckProperties::default()
            }
        } else {
            ConnAckProperties::default()
        };
        let connack = Packet::ConnAck(ConnAck {
            session_present: connected.session_present,
            reason_code: ReasonCode::SUCCESS,
            properties,
        });
        if framed.send(&connack).await.is_err() {
            let _ = service
                .disconnect(&connected.session, DisconnectRequest::ABNORMAL)
                .await;
            return None;
        }
        debug!(%peer, client_id = %client_id, ?version, session_present = connected.session_present, listener = %conn.listener, tls_identity = ?conn.peer_identity, user = ?username, "connected");
        let metrics = ConnectionMetrics::opened(&config.metrics, version);
        let throttle = config.limits.throttle(std::time::Instant::now());
        Some(Handler {
            metrics,
            framed,
            peer,
            conn,
            version,
            service,
            config,
            session: connected.session,
            events: connected.events,
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            last_packet: Instant::now(),
            connect_expiry: session_expiry_secs,
            inbound_aliases: HashMap::new(),
            outbound_aliases: OutboundAliases::new(outbound_alias_max),
            auth,
            username,
            client_max_packet,
            acl,
            pending: FuturesOrdered::new(),
            releases: FuturesOrdered::new(),
            released: ReleasedIds::new(),
            throttle,
            write_failed: false,
            live,
        })
    }
}

/// Answers a CONNECT with a refusal (§3.2.2.2) and lets the connection close.
pub(super) async fn refuse<IO>(framed: &mut Framed<IO, MqttCodec>, reason: ReasonCode)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    crate::metrics::connection_refused(reason);
    let _ = framed
        .send(&Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: reason,
            properties: ConnAckProperties::default(),
        }))
        .await;
}
