//! Enhanced authentication (MQTT 5 §4.12): challenge/response exchanges carried by AUTH
//! packets, before CONNACK and again at any time after it (re-authentication).
//!
//! A client names an *authentication method* in CONNECT. The frontend looks it up in its
//! [`Authenticators`] registry; an unknown method is refused with CONNACK 0x8C. A known one
//! starts an [`AuthExchange`], which the connection handler feeds every piece of data the
//! client sends (first from CONNECT, then from each AUTH) and which answers with an
//! [`AuthStep`]: another challenge (AUTH 0x18), success (CONNACK 0x00, or AUTH 0x00 when
//! re-authenticating) or failure (CONNACK / DISCONNECT with the reason).
//!
//! The split between [`Authenticator`] (shared, stateless, one per method) and
//! [`AuthExchange`] (one per running exchange, owned by the connection) keeps per-connection
//! state such as nonces out of shared structures: the handler drops the exchange when it ends
//! and nothing needs locking.
//!
//! Exchanges run inline in the connection task, so a step must not block: hashing and
//! comparing is fine, a database round trip is not (that needs an async variant of this
//! interface). [`crate::scram`] implements `SCRAM-SHA-256`; [`ChallengeAuthenticator`] is a
//! toy method for tests and examples.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tiermq_common::codec::{Auth, AuthProperties, Packet, ReasonSet};
use tiermq_common::ReasonCode;

/// What an exchange answers to the client's latest data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send this challenge (AUTH 0x18 Continue authentication) and wait for the answer.
    Continue(Bytes),
    /// Authenticated; the data (if any) goes to the client with the CONNACK or AUTH 0x00.
    Success(Option<Bytes>),
    /// Refused with this reason code. Codes a CONNACK or DISCONNECT cannot carry become 0x87
    /// Not authorized.
    Fail(ReasonCode),
}

/// One enhanced authentication method, shared by every connection of a frontend.
pub trait Authenticator: Send + Sync {
    /// The Authentication Method name clients put in CONNECT and AUTH, e.g. `SCRAM-SHA-256`.
    fn method(&self) -> &str;

    /// Begins an exchange for `client_id` (at CONNECT, or when the client re-authenticates).
    /// The exchange receives the client's first data through [`AuthExchange::step`].
    fn start(&self, client_id: &str) -> Box<dyn AuthExchange>;

    /// How long the handler waits before sending a failure, to slow down guessing (a method
    /// that checks secrets returns `mqtt.auth_failure_delay_ms`).
    fn failure_delay(&self) -> Duration {
        Duration::ZERO
    }
}

/// The state of one running exchange, owned by the connection that runs it.
pub trait AuthExchange: Send {
    /// The client's next Authentication Data (from CONNECT or AUTH; `None` if absent).
    fn step(&mut self, data: Option<Bytes>) -> AuthStep;

    /// After [`AuthStep::Success`]: the user the exchange authenticated, if the method names
    /// users (SCRAM does). It becomes the connection's user name.
    fn user(&self) -> Option<&str> {
        None
    }
}

/// The enhanced authentication methods a frontend offers, by name. Empty by default: every
/// CONNECT with an Authentication Method is then refused with 0x8C.
#[derive(Clone, Default)]
pub struct Authenticators {
    by_method: HashMap<String, Arc<dyn Authenticator>>,
}

impl Authenticators {
    pub fn new() -> Authenticators {
        Authenticators::default()
    }

    /// Registers `authenticator` under its method name (replacing one of the same name).
    pub fn register(&mut self, authenticator: Arc<dyn Authenticator>) {
        self.by_method
            .insert(authenticator.method().to_string(), authenticator);
    }

    /// [`register`](Self::register), builder style.
    pub fn with(mut self, authenticator: Arc<dyn Authenticator>) -> Authenticators {
        self.register(authenticator);
        self
    }

    pub fn get(&self, method: &str) -> Option<&Arc<dyn Authenticator>> {
        self.by_method.get(method)
    }

    pub fn is_empty(&self) -> bool {
        self.by_method.is_empty()
    }
}

impl fmt::Debug for Authenticators {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.by_method.keys()).finish()
    }
}

/// Enhanced authentication of one connection: the method chosen at CONNECT and the exchange in
/// progress, if any. Owned by the connection handler.
pub(crate) struct AuthSession {
    authenticator: Arc<dyn Authenticator>,
    client_id: Arc<str>,
    exchange: Option<Box<dyn AuthExchange>>,
    /// The user the last successful exchange authenticated.
    user: Option<Arc<str>>,
}

impl AuthSession {
    /// Starts the exchange CONNECT asked for and feeds it CONNECT's Authentication Data.
    pub(crate) fn begin(
        authenticator: Arc<dyn Authenticator>,
        client_id: Arc<str>,
        data: Option<Bytes>,
    ) -> (AuthSession, AuthStep) {
        let mut session = AuthSession {
            exchange: Some(authenticator.start(&client_id)),
            authenticator,
            client_id,
            user: None,
        };
        let step = session.step(data);
        (session, step)
    }

    pub(crate) fn method(&self) -> &str {
        self.authenticator.method()
    }

    /// The user the last successful exchange authenticated (see [`AuthExchange::user`]).
    pub(crate) fn user(&self) -> Option<&Arc<str>> {
        self.user.as_ref()
    }

    /// The method's [`Authenticator::failure_delay`].
    pub(crate) fn failure_delay(&self) -> Duration {
        self.authenticator.failure_delay()
    }

    /// An AUTH packet from the client. `connected`: CONNACK was sent, so the client may start
    /// a re-authentication. `Err` names the protocol error (the caller disconnects with 0x82).
    pub(crate) fn on_auth(
        &mut self,
        auth: Auth,
        connected: bool,
    ) -> Result<AuthStep, &'static str> {
        // §4.12: every AUTH carries the method of the CONNECT, unchanged.
        if auth.properties.authentication_method.as_deref() != Some(self.method()) {
            return Err("AUTH with another authentication method than CONNECT");
        }
        match auth.reason_code {
            ReasonCode::CONTINUE_AUTHENTICATION if self.exchange.is_none() => {
                Err("AUTH continue without an exchange in progress")
            }
            ReasonCode::CONTINUE_AUTHENTICATION => {
                Ok(self.step(auth.properties.authentication_data))
            }
            ReasonCode::REAUTHENTICATE if !connected => Err("re-authentication before CONNACK"),
            ReasonCode::REAUTHENTICATE if self.exchange.is_some() => {
                Err("re-authentication while an exchange is in progress")
            }
            ReasonCode::REAUTHENTICATE => {
                self.exchange = Some(self.authenticator.start(&self.client_id));
                Ok(self.step(auth.properties.authentication_data))
            }
            _ => Err("AUTH success from a client"),
        }
    }

    /// Feeds the running exchange and drops it once it has ended.
    fn step(&mut self, data: Option<Bytes>) -> AuthStep {
        let Some(exchange) = self.exchange.as_mut() else {
            return AuthStep::Fail(ReasonCode::PROTOCOL_ERROR);
        };
        let step = exchange.step(data);
        if matches!(step, AuthStep::Success(_)) {
            self.user = exchange.user().map(Arc::from);
        }
        if !matches!(step, AuthStep::Continue(_)) {
            self.exchange = None;
        }
        step
    }

    /// An AUTH packet to the client with our method.
    pub(crate) fn packet(&self, reason_code: ReasonCode, data: Option<Bytes>) -> Packet {
        Packet::Auth(Auth {
            reason_code,
            properties: AuthProperties {
                authentication_method: Some(self.method().to_string()),
                authentication_data: data,
                ..AuthProperties::default()
            },
        })
    }
}

/// The reason code a failed exchange ends with in a packet of `set` (CONNACK or DISCONNECT):
/// the authenticator's, if that packet can carry it, else 0x87 Not authorized.
pub(crate) fn failure_code(code: ReasonCode, set: ReasonSet) -> ReasonCode {
    if code.is_error() && set.allows(code) {
        code
    } else {
        ReasonCode::NOT_AUTHORIZED
    }
}

/// A toy challenge/response method for tests and as an example of the interface: **not
/// secure** (the shared secret travels in clear).
///
/// The server sends a random nonce (AUTH 0x18); the client answers with the nonce reversed
/// followed by the shared secret ([`ChallengeAuthenticator::answer`]). After `rounds` correct
/// answers the exchange succeeds with the data `welcome`; a wrong answer fails it with 0x87.
/// Authentication Data in CONNECT (or in the AUTH 0x19 that starts a re-authentication) is
/// ignored.
pub struct ChallengeAuthenticator {
    secret: Bytes,
    rounds: u32,
}

impl ChallengeAuthenticator {
    pub const METHOD: &'static str = "tiermq-test-challenge";
    /// Authentication Data sent with the success.
    pub const WELCOME: &'static [u8] = b"welcome";

    pub fn new(secret: impl Into<Bytes>, rounds: u32) -> ChallengeAuthenticator {
        ChallengeAuthenticator {
            secret: secret.into(),
            rounds,
        }
    }

    /// The correct answer to `nonce`.
    pub fn answer(nonce: &[u8], secret: &[u8]) -> Vec<u8> {
        nonce.iter().rev().chain(secret).copied().collect()
    }
}

impl Authenticator for ChallengeAuthenticator {
    fn method(&self) -> &str {
        Self::METHOD
    }

    fn start(&self, _client_id: &str) -> Box<dyn AuthExchange> {
        Box::new(ChallengeExchange {
            secret: self.secret.clone(),
            rounds_left: self.rounds,
            nonce: None,
        })
    }
}

struct ChallengeExchange {
    secret: Bytes,
    rounds_left: u32,
    /// The challenge awaiting an answer (None before the first one).
    nonce: Option<[u8; 16]>,
}

impl AuthExchange for ChallengeExchange {
    fn step(&mut self, data: Option<Bytes>) -> AuthStep {
        if let Some(nonce) = self.nonce.take() {
            let expected = ChallengeAuthenticator::answer(&nonce, &self.secret);
            if data.as_deref() != Some(&expected[..]) {
                return AuthStep::Fail(ReasonCode::NOT_AUTHORIZED);
            }
            self.rounds_left = self.rounds_left.saturating_sub(1);
        }
        if self.rounds_left == 0 {
            return AuthStep::Success(Some(Bytes::from_static(ChallengeAuthenticator::WELCOME)));
        }
        let nonce: [u8; 16] = rand::random();
        self.nonce = Some(nonce);
        AuthStep::Continue(Bytes::copy_from_slice(&nonce))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge(step: AuthStep) -> Bytes {
        match step {
            AuthStep::Continue(nonce) => nonce,
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    fn auth(method: &str, reason_code: ReasonCode, data: Option<Vec<u8>>) -> Auth {
        Auth {
            reason_code,
            properties: AuthProperties {
                authentication_method: Some(method.to_string()),
                authentication_data: data.map(Bytes::from),
                ..AuthProperties::default()
            },
        }
    }

    fn session(rounds: u32) -> (AuthSession, AuthStep) {
        let a: Arc<dyn Authenticator> = Arc::new(ChallengeAuthenticator::new("s3cret", rounds));
        AuthSession::begin(a, Arc::from("c1"), None)
    }

    const M: &str = ChallengeAuthenticator::METHOD;

    #[test]
    fn two_rounds_then_success() {
        let (mut s, step) = session(2);
        let n1 = challenge(step);
        let a1 = ChallengeAuthenticator::answer(&n1, b"s3cret");
        let n2 = challenge(
            s.on_auth(auth(M, ReasonCode(0x18), Some(a1)), false)
                .unwrap(),
        );
        assert_ne!(n1, n2);
        let a2 = ChallengeAuthenticator::answer(&n2, b"s3cret");
        let done = s.on_auth(auth(M, ReasonCode(0x18), Some(a2)), false);
        assert_eq!(
            done,
            Ok(AuthStep::Success(Some(Bytes::from_static(b"welcome"))))
        );
        // The exchange is over: a stray continue is a protocol error.
        assert!(s
            .on_auth(auth(M, ReasonCode(0x18), Some(vec![])), true)
            .is_err());
    }

    #[test]
    fn wrong_answer_fails() {
        let (mut s, step) = session(1);
        challenge(step);
        let r = s.on_auth(auth(M, ReasonCode(0x18), Some(b"nope".to_vec())), false);
        assert_eq!(r, Ok(AuthStep::Fail(ReasonCode::NOT_AUTHORIZED)));
    }

    #[test]
    fn protocol_errors() {
        let (mut s, _) = session(1);
        assert!(s
            .on_auth(auth("other", ReasonCode(0x18), None), false)
            .is_err());
        let mut no_method = auth(M, ReasonCode(0x18), None);
        no_method.properties.authentication_method = None;
        assert!(s.on_auth(no_method, false).is_err());
        assert!(s.on_auth(auth(M, ReasonCode(0x19), None), false).is_err());
        assert!(s.on_auth(auth(M, ReasonCode(0x00), None), true).is_err());
    }

    #[test]
    fn reauthentication_starts_a_new_exchange() {
        let (mut s, step) = session(0);
        assert!(matches!(step, AuthStep::Success(_)));
        let step = s.on_auth(auth(M, ReasonCode(0x19), None), true).unwrap();
        assert!(matches!(step, AuthStep::Success(_)));
    }

    #[test]
    fn failure_codes_fit_the_packet() {
        let banned = ReasonCode::BANNED;
        assert_eq!(failure_code(banned, ReasonSet::ConnAck), banned);
        // DISCONNECT cannot carry 0x8A: it becomes 0x87.
        assert_eq!(
            failure_code(banned, ReasonSet::Disconnect),
            ReasonCode::NOT_AUTHORIZED
        );
        assert_eq!(
            failure_code(ReasonCode::SUCCESS, ReasonSet::ConnAck),
            ReasonCode::NOT_AUTHORIZED
        );
    }

    #[test]
    fn registry_finds_methods_by_name() {
        let r = Authenticators::new().with(Arc::new(ChallengeAuthenticator::new("x", 1)));
        assert!(r.get(M).is_some());
        assert!(r.get("SCRAM-SHA-1").is_none());
        assert!(Authenticators::default().is_empty());
        assert_eq!(format!("{r:?}"), format!("{{{M:?}}}"));
    }
}
