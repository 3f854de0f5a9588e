//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as an MQTT 5 enhanced authentication method.
//!
//! Why SCRAM on top of passwords in CONNECT: the password never crosses the wire (not even
//! inside TLS), the server stores only keys derived from it (a stolen password file does not
//! let anyone log in as the user without cracking it), and the client learns that the server
//! knows the user's key (mutual authentication: the `v=` server signature).
//!
//! The exchange, carried by CONNECT/AUTH Authentication Data (method `SCRAM-SHA-256`):
//!
//! ```text
//! client CONNECT  n,,n=user,r=<client nonce>                        (client-first)
//! server AUTH 18  r=<client nonce><server nonce>,s=<salt>,i=<iter>   (server-first)
//! client AUTH 18  c=biws,r=<nonces>,p=<client proof>                 (client-final)
//! server CONNACK  v=<server signature>                               (server-final)
//! ```
//!
//! Re-authentication (AUTH 0x19 carrying a new client-first) runs the same exchange and ends
//! with AUTH 0x00 carrying the server-final message.
//!
//! What is not supported, on purpose: channel binding (`p=` in the GS2 header: the client is
//! refused, it asked for SCRAM-SHA-256-PLUS which we do not offer), an authorization identity
//! (`a=`), mandatory extensions (`m=`). User names and passwords are used as their UTF-8
//! bytes without SASLprep, which is the identity for ASCII.
//!
//! An unknown user (or a user whose password file line has no SCRAM credential, written by an
//! older `tiermq passwd`) gets a server-first message like any other — a salt derived from the
//! user name with a per-process secret, so asking twice gives the same answer — and fails at
//! the proof. The answers do not reveal which users exist.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tiermq_common::ReasonCode;
use tracing::{debug, info};

use crate::auth::{AuthExchange, AuthStep, Authenticator};

type HmacSha256 = Hmac<Sha256>;

/// The Authentication Method name.
pub const METHOD: &str = "SCRAM-SHA-256";
/// Iterations of new credentials: RFC 7677's minimum, PostgreSQL's default.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Credentials with fewer iterations are refused when the password file is read.
pub const MIN_ITERATIONS: u32 = 4096;
/// Salt length of new credentials, in bytes.
const SALT_LEN: usize = 16;
/// Random bytes in the server nonce (base64-encoded on the wire).
const SERVER_NONCE_LEN: usize = 18;
/// Longest client message accepted; real ones are well under 200 bytes.
const MAX_MESSAGE: usize = 4096;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// What the server stores for one user: `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`
/// (PostgreSQL's layout, base64 fields). Enough to verify a client proof and sign the answer,
/// not enough to compute a proof.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredential {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl fmt::Debug for ScramCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramCredential")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// SaltedPassword, ClientKey, StoredKey and ServerKey of RFC 5802 §3.
struct Keys {
    client_key: [u8; 32],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

fn keys(password: &[u8], salt: &[u8], iterations: u32) -> Keys {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut salted);
    let client_key = hmac(&salted, b"Client Key");
    Keys {
        client_key,
        stored_key: sha256(&client_key),
        server_key: hmac(&salted, b"Server Key"),
    }
}

impl ScramCredential {
    /// A credential for `password` with a fresh random salt.
    pub fn new(password: &[u8], iterations: u32) -> ScramCredential {
        let salt: [u8; SALT_LEN] = rand::random();
        ScramCredential::derive(password, &salt, iterations)
    }

    /// The credential for `password` with this salt (PBKDF2-HMAC-SHA-256 `iterations` times).
    pub fn derive(password: &[u8], salt: &[u8], iterations: u32) -> ScramCredential {
        let k = keys(password, salt, iterations);
        ScramCredential {
            iterations,
            salt: salt.to_vec(),
            stored_key: k.stored_key,
            server_key: k.server_key,
        }
    }

    /// Parses `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(text: &str) -> Result<ScramCredential, String> {
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or("expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")?;
        let (params, keys) = rest.split_once('$').ok_or("missing '$' before the keys")?;
        let (iter, salt) = params
            .split_once(':')
            .ok_or("expected <iterations>:<salt>")?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or("expected <StoredKey>:<ServerKey>")?;
        let iterations: u32 = iter
            .parse()
            .map_err(|_| format!("iterations {iter:?} is not a number"))?;
        if iterations < MIN_ITERATIONS {
            return Err(format!(
                "{iterations} iterations, fewer than the minimum {MIN_ITERATIONS}"
            ));
        }
        let salt = B64.decode(salt).map_err(|e| format!("salt: {e}"))?;
        if salt.is_empty() {
            return Err("empty salt".into());
        }
        let key = |what: &str, s: &str| -> Result<[u8; 32], String> {
            B64.decode(s)
                .map_err(|e| format!("{what}: {e}"))?
                .try_into()
                .map_err(|_| format!("{what}: not 32 bytes"))
        };
        Ok(ScramCredential {
            iterations,
            salt,
            stored_key: key("StoredKey", stored)?,
            server_key: key("ServerKey", server)?,
        })
    }
}

impl fmt::Display for ScramCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// Where the authenticator finds a user's credential (the current password file, which may be
/// reloaded between two exchanges).
pub type CredentialLookup = Arc<dyn Fn(&str) -> Option<ScramCredential> + Send + Sync>;

/// The `SCRAM-SHA-256` method.
pub struct ScramAuthenticator {
    lookup: CredentialLookup,
    /// Per-process secret from which unknown users' salts are derived.
    fake_secret: [u8; 32],
    failure_delay: Duration,
}

impl ScramAuthenticator {
    /// `failure_delay`: how long the handler waits before refusing a failed exchange (the
    /// same guessing brake as for passwords in CONNECT, `mqtt.auth_failure_delay_ms`).
    pub fn new(lookup: CredentialLookup, failure_delay: Duration) -> ScramAuthenticator {
        ScramAuthenticator {
            lookup,
            fake_secret: rand::random(),
            failure_delay,
        }
    }
}

impl Authenticator for ScramAuthenticator {
    fn method(&self) -> &str {
        METHOD
    }

    fn start(&self, _client_id: &str) -> Box<dyn AuthExchange> {
        let nonce: [u8; SERVER_NONCE_LEN] = rand::random();
        Box::new(ScramExchange::new(
            self.lookup.clone(),
            self.fake_secret,
            B64.encode(nonce),
        ))
    }

    fn failure_delay(&self) -> Duration {
        self.failure_delay
    }
}

/// Where an exchange stands.
enum State {
    /// Waiting for client-first.
    Start,
    /// Server-first sent; waiting for client-final.
    Challenged {
        user: String,
        /// None for an unknown user: the proof cannot match.
        credential: Option<ScramCredential>,
        gs2_header: String,
        /// client-first-message-bare "," server-first-message
        auth_prefix: String,
        nonce: String,
    },
    Done,
}

/// One SCRAM exchange (server side).
pub struct ScramExchange {
    lookup: CredentialLookup,
    fake_secret: [u8; 32],
    server_nonce: String,
    state: State,
    user: Option<String>,
}

impl ScramExchange {
    /// An exchange using `server_nonce` (printable, no ','): random in service, fixed in the
    /// RFC 7677 test.
    pub fn new(
        lookup: CredentialLookup,
        fake_secret: [u8; 32],
        server_nonce: String,
    ) -> ScramExchange {
        ScramExchange {
            lookup,
            fake_secret,
            server_nonce,
            state: State::Start,
            user: None,
        }
    }

    fn client_first(&mut self, msg: &str) -> Result<AuthStep, Refusal> {
        let (gs2_header, bare) = split_gs2_header(msg)?;
        let mut attrs = Attrs(bare);
        let (k, v) = attrs.next_attr()?;
        if k == 'm' {
            return Err(Refusal::Unsupported("mandatory extension (m=)"));
        }
        if k != 'n' {
            return Err(Refusal::Malformed("client-first: expected n=<user>"));
        }
        let user = decode_saslname(v)?;
        let (k, client_nonce) = attrs.next_attr()?;
        if k != 'r' || client_nonce.is_empty() {
            return Err(Refusal::Malformed("client-first: expected r=<nonce>"));
        }
        if !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(Refusal::Malformed("client-first: nonce not printable"));
        }
        // Optional extensions after the nonce are ignored (RFC 5802 §5.1).
        let credential = (self.lookup)(&user);
        let (salt, iterations) = match &credential {
            Some(c) => (c.salt.clone(), c.iterations),
            None => (
                hmac(&self.fake_secret, user.as_bytes())[..SALT_LEN].to_vec(),
                DEFAULT_ITERATIONS,
            ),
        };
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!("r={nonce},s={},i={iterations}", B64.encode(salt));
        self.state = State::Challenged {
            user,
            credential,
            gs2_header: gs2_header.to_string(),
            auth_prefix: format!("{bare},{server_first}"),
            nonce,
        };
        Ok(AuthStep::Continue(Bytes::from(server_first)))
    }

    fn client_final(&mut self, msg: &str) -> Result<AuthStep, Refusal> {
        let State::Challenged {
            user,
            credential,
            gs2_header,
            auth_prefix,
            nonce,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(Refusal::Malformed("unexpected message"));
        };
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(Refusal::Malformed("client-final: no proof"))?;
        let mut attrs = Attrs(without_proof);
        let (k, binding) = attrs.next_attr()?;
        if k != 'c' {
            return Err(Refusal::Malformed("client-final: expected c="));
        }
        // Without channel binding, c= is the GS2 header itself.
        if binding != B64.encode(gs2_header.as_bytes()) {
            return Err(Refusal::Malformed("client-final: channel binding mismatch"));
        }
        let (k, r) = attrs.next_attr()?;
        if k != 'r' || r != nonce {
            return Err(Refusal::Malformed("client-final: nonce mismatch"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(Refusal::Malformed(
                "client-final: proof is not 32 base64 bytes",
            ))?;
        let Some(credential) = credential else {
            return Err(Refusal::BadProof { user });
        };
        let auth_message = format!("{auth_prefix},{without_proof}");
        let signature = hmac(&credential.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        if !bool::from(sha256(&client_key).ct_eq(&credential.stored_key)) {
            return Err(Refusal::BadProof { user });
        }
        let server_signature = hmac(&credential.server_key, auth_message.as_bytes());
        self.user = Some(user);
        Ok(AuthStep::Success(Some(Bytes::from(format!(
            "v={}",
            B64.encode(server_signature)
        )))))
    }
}

/// Why an exchange failed (logged; the client gets a reason code).
#[derive(Debug)]
enum Refusal {
    Malformed(&'static str),
    Unsupported(&'static str),
    BadProof { user: String },
}

impl Refusal {
    fn reason_code(&self) -> ReasonCode {
        match self {
            Refusal::Malformed(_) | Refusal::BadProof { .. } => {
                ReasonCode::BAD_USER_NAME_OR_PASSWORD
            }
            Refusal::Unsupported(_) => ReasonCode::NOT_AUTHORIZED,
        }
    }
}

impl AuthExchange for ScramExchange {
    fn step(&mut self, data: Option<Bytes>) -> AuthStep {
        let data = data.unwrap_or_default();
        let result = if data.len() > MAX_MESSAGE {
            Err(Refusal::Malformed("message too long"))
        } else {
            match std::str::from_utf8(&data) {
                Err(_) => Err(Refusal::Malformed("not UTF-8")),
                Ok(msg) => match self.state {
                    State::Start => self.client_first(msg),
                    State::Challenged { .. } => self.client_final(msg),
                    State::Done => Err(Refusal::Malformed("exchange already finished")),
                },
            }
        };
        result.unwrap_or_else(|refusal| {
            self.state = State::Done;
            match &refusal {
                Refusal::BadProof { user } => {
                    debug!(user, "SCRAM: wrong proof (wrong password or unknown user)")
                }
                Refusal::Malformed(why) => debug!(why, "SCRAM: malformed message"),
                // The client asked for something we do not do: say so where an operator looks.
                Refusal::Unsupported(what) => info!(what, "SCRAM: refused, not supported"),
            }
            AuthStep::Fail(refusal.reason_code())
        })
    }

    fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
}

/// Splits `gs2-header client-first-message-bare`; only `n` or `y` without authzid.
fn split_gs2_header(msg: &str) -> Result<(&str, &str), Refusal> {
    let mut parts = msg.splitn(3, ',');
    let (Some(flag), Some(authzid), Some(bare)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Refusal::Malformed("client-first: no GS2 header"));
    };
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => {
            return Err(Refusal::Unsupported(
                "channel binding (use SCRAM-SHA-256 without -PLUS)",
            ))
        }
        _ => return Err(Refusal::Malformed("client-first: bad GS2 flag")),
    }
    if !authzid.is_empty() {
        return Err(Refusal::Unsupported("authorization identity (a=)"));
    }
    Ok((&msg[..flag.len() + authzid.len() + 2], bare))
}

/// `k=v` attributes separated by ','.
struct Attrs<'a>(&'a str);

impl<'a> Attrs<'a> {
    fn next_attr(&mut self) -> Result<(char, &'a str), Refusal> {
        let (attr, rest) = self.0.split_once(',').unwrap_or((self.0, ""));
        self.0 = rest;
        let mut chars = attr.chars();
        match (chars.next(), chars.next()) {
            (Some(k), Some('=')) if k.is_ascii_alphabetic() => Ok((k, &attr[2..])),
            _ => Err(Refusal::Malformed("expected an attribute k=value")),
        }
    }
}

/// A saslname: ',' and '=' are escaped as `=2C` and `=3D`; a bare '=' is an error.
fn decode_saslname(name: &str) -> Result<String, Refusal> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(Refusal::Malformed("user name: bad '=' escape")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err(Refusal::Malformed("empty user name"));
    }
    Ok(out)
}

/// The client side of the exchange, for tests and tools: RFC 5802 §3 from the password.
pub mod client {
    use super::*;

    /// The client-first message for `user` with `nonce`.
    pub fn first(user: &str, nonce: &str) -> String {
        let user = user.replace('=', "=3D").replace(',', "=2C");
        format!("n,,n={user},r={nonce}")
    }

    /// The client-final message answering `server_first`, and the server signature the
    /// server-final message must carry (`v=` + base64). None when server-first is malformed.
    pub fn last(
        password: &[u8],
        client_first: &str,
        server_first: &str,
    ) -> Option<(String, String)> {
        let bare = client_first.strip_prefix("n,,")?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            let (k, v) = attr.split_once('=')?;
            match k {
                "r" => nonce = Some(v),
                "s" => salt = B64.decode(v).ok(),
                "i" => iterations = v.parse().ok(),
                _ => {}
            }
        }
        let (nonce, salt, iterations) = (nonce?, salt?, iterations?);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let k = keys(password, &salt, iterations);
        let signature = hmac(&k.stored_key, auth_message.as_bytes());
        let mut proof = k.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        let server_signature = hmac(&k.server_key, auth_message.as_bytes());
        Some((
            format!("{without_proof},p={}", B64.encode(proof)),
            format!("v={}", B64.encode(server_signature)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_users() -> CredentialLookup {
        let cred = ScramCredential::derive(b"pencil", &B64.decode(SALT).unwrap(), 4096);
        Arc::new(move |u| (u == "user").then(|| cred.clone()))
    }

    fn exchange(users: CredentialLookup) -> ScramExchange {
        ScramExchange::new(users, [7; 32], SERVER_NONCE.to_string())
    }

    fn step(x: &mut ScramExchange, msg: &str) -> AuthStep {
        x.step(Some(Bytes::from(msg.to_string())))
    }

    const BAD: AuthStep = AuthStep::Fail(ReasonCode::BAD_USER_NAME_OR_PASSWORD);

    #[test]
    fn rfc7677_test_vector() {
        let mut x = exchange(rfc_users());
        assert_eq!(
            step(&mut x, CLIENT_FIRST),
            AuthStep::Continue(Bytes::from(SERVER_FIRST))
        );
        assert_eq!(x.user(), None);
        assert_eq!(
            step(&mut x, CLIENT_FINAL),
            AuthStep::Success(Some(Bytes::from(SERVER_FINAL)))
        );
        assert_eq!(x.user(), Some("user"));
        // The client side computes the same proof and expects the same signature.
        let (last, v) = client::last(b"pencil", CLIENT_FIRST, SERVER_FIRST).unwrap();
        assert_eq!(last, CLIENT_FINAL);
        assert_eq!(v, SERVER_FINAL);
    }

    #[test]
    fn wrong_password_and_unknown_user_fail_at_the_proof() {
        let mut x = exchange(rfc_users());
        step(&mut x, CLIENT_FIRST);
        let (last, _) = client::last(b"pen", CLIENT_FIRST, SERVER_FIRST).unwrap();
        assert_eq!(step(&mut x, &last), BAD);
        assert_eq!(x.user(), None);

        // Unknown user: a normal-looking challenge, the same salt every time.
        let first = "n,,n=nobody,r=abc";
        let salt_of = |step: AuthStep| match step {
            AuthStep::Continue(d) => {
                let s = String::from_utf8(d.to_vec()).unwrap();
                assert!(s.ends_with(",i=4096"), "{s}");
                s.split(",s=").nth(1).unwrap().to_string()
            }
            other => panic!("{other:?}"),
        };
        let mut a = exchange(rfc_users());
        let sa = salt_of(step(&mut a, first));
        let mut b = exchange(rfc_users());
        assert_eq!(sa, salt_of(step(&mut b, first)));
        let mut c = exchange(rfc_users());
        assert_ne!(sa, salt_of(step(&mut c, "n,,n=somebody,r=abc")));
        let server_first = format!("r=abc{SERVER_NONCE},s={sa}");
        let (last, _) = client::last(b"pencil", first, &server_first).unwrap();
        assert_eq!(step(&mut a, &last), BAD);
    }

    #[test]
    fn unsupported_and_malformed_messages_are_refused() {
        for (msg, code) in [
            ("p=tls-unique,,n=user,r=abc", ReasonCode::NOT_AUTHORIZED),
            ("n,a=admin,n=user,r=abc", ReasonCode::NOT_AUTHORIZED),
            ("n,,m=ext,n=user,r=abc", ReasonCode::NOT_AUTHORIZED),
            ("", ReasonCode::BAD_USER_NAME_OR_PASSWORD),
            ("n,,", ReasonCode::BAD_USER_NAME_OR_PASSWORD),
            ("n,,n=user", ReasonCode::BAD_USER_NAME_OR_PASSWORD),
            ("n,,n=us=er,r=abc", ReasonCode::BAD_USER_NAME_OR_PASSWORD),
            ("x,,n=user,r=abc", ReasonCode::BAD_USER_NAME_OR_PASSWORD),
            ("n,,r=abc,n=user", ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        ] {
            let mut x = exchange(rfc_users());
            assert_eq!(step(&mut x, msg), AuthStep::Fail(code), "{msg:?}");
        }
        let mut x = exchange(rfc_users());
        assert_eq!(x.step(None), BAD);
        // Client-final with another nonce, another GS2 header, or no proof.
        for last in [
            "c=biws,r=other,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "c=eSws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=short",
        ] {
            let mut x = exchange(rfc_users());
            step(&mut x, CLIENT_FIRST);
            assert_eq!(step(&mut x, last), BAD, "{last}");
        }
    }

    #[test]
    fn escaped_user_names() {
        assert_eq!(decode_saslname("a=2Cb=3Dc").unwrap(), "a,b=c");
        assert!(decode_saslname("a=").is_err());
        assert!(decode_saslname("").is_err());
        let cred = ScramCredential::new(b"pw", 4096);
        let users: CredentialLookup = Arc::new(move |u| (u == "a,b=c").then(|| cred.clone()));
        let mut x = exchange(users);
        let first = client::first("a,b=c", "nonce");
        let server_first = match step(&mut x, &first) {
            AuthStep::Continue(d) => String::from_utf8(d.to_vec()).unwrap(),
            other => panic!("{other:?}"),
        };
        let (last, v) = client::last(b"pw", &first, &server_first).unwrap();
        assert_eq!(step(&mut x, &last), AuthStep::Success(Some(Bytes::from(v))));
        assert_eq!(x.user(), Some("a,b=c"));
    }

    #[test]
    fn credentials_round_trip_and_refuse_weak_or_broken_ones() {
        let c = ScramCredential::new(b"pw", 4096);
        let text = c.to_string();
        assert!(text.starts_with("SCRAM-SHA-256$4096:"), "{text}");
        assert_eq!(ScramCredential::parse(&text).unwrap(), c);
        assert!(!format!("{c:?}").contains(&B64.encode(c.stored_key)));
        let weak = ScramCredential::derive(b"pw", b"salt", 1000).to_string();
        assert!(ScramCredential::parse(&weak)
            .unwrap_err()
            .contains("minimum"));
        for bad in [
            "",
            "SCRAM-SHA-1$4096:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$x:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
        ] {
            assert!(ScramCredential::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        /// Whatever the client sends, in whatever order, the exchange answers without
        /// panicking and never succeeds without the right proof.
        #[test]
        fn random_auth_data_never_panics(
            messages in prop::collection::vec(
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..200),
                    "[nyp]=?[a-z]*,[a-z=]*,[nrm]=[ -~]{0,40}(,[rcp]=[ -~]{0,40}){0,3}"
                        .prop_map(String::into_bytes),
                ],
                1..4,
            )
        ) {
            let mut x = exchange(rfc_users());
            for m in messages {
                let step = x.step(Some(Bytes::from(m)));
                prop_assert!(!matches!(step, AuthStep::Success(_)));
                if !matches!(step, AuthStep::Continue(_)) {
                    break;
                }
            }
        }
    }
}
