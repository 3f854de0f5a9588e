//! The password file: `user:PHC-hash[:SCRAM-credential]` lines, one per user.
//!
//! Why a file of hashes and not of passwords: whoever reads the file (a backup, a leaked
//! image) learns nothing usable; argon2id makes guessing expensive even offline. The format is
//! the PHC string (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`), so the parameters travel
//! with each hash and can be raised later without breaking old entries.
//!
//! SCRAM-SHA-256 ([`crate::scram`]) needs keys that cannot be derived from an argon2id hash,
//! so `tiermq passwd add` also writes the user's SCRAM credential after a second ':'
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, PostgreSQL's layout; a PHC
//! string never contains ':'). Lines without it, written before SCRAM existed, still work for
//! passwords in CONNECT; SCRAM fails for those users until their password is set again.
//!
//! The file is reloaded while the node runs ([`PasswordStore`]): on SIGHUP and when it
//! changes. A file that does not parse keeps the previous users.
//!
//! Verification costs tens of milliseconds of CPU by design: callers run it on a blocking
//! thread ([`PasswordFile::verify_blocking`]) so a burst of CONNECTs cannot stall the
//! connections already served.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use tracing::info;

use crate::reload::{Attempted, FileStamp, Reload};
use crate::scram::{self, ScramCredential};

#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    #[error("cannot read password file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write password file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("password file line {line}: {message}")]
    Parse { line: usize, message: String },
    #[error("invalid user name {0:?}: it must be non-empty and contain no ':' or line break")]
    BadUser(String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// One user's line: the argon2id hash and, when written by a `tiermq passwd` that knows
/// SCRAM, the SCRAM-SHA-256 credential.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    hash: String,
    scram: Option<ScramCredential>,
}

/// Users and their password hashes, sorted by user name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: BTreeMap<String, Entry>,
}

fn valid_user(user: &str) -> bool {
    !user.is_empty() && !user.contains([':', '\n', '\r'])
}

impl PasswordFile {
    /// Reads and checks a password file: every line `user:hash`, every hash a PHC string.
    /// Blank lines and lines starting with `#` are ignored.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswdError::Read {
            path: path.display().to_string(),
            source,
        })?;
        PasswordFile::parse(&text)
    }

    pub fn parse(text: &str) -> Result<PasswordFile, PasswdError> {
        let mut users = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parse_error = |message: &str| PasswdError::Parse {
                line: i + 1,
                message: message.to_string(),
            };
            let Some((user, rest)) = line.split_once(':') else {
                return Err(parse_error("expected user:hash"));
            };
            if !valid_user(user) {
                return Err(parse_error("empty user name"));
            }
            let (hash, scram) = match rest.split_once(':') {
                Some((hash, scram)) => (hash, Some(scram)),
                None => (rest, None),
            };
            PasswordHash::new(hash)
                .map_err(|e| parse_error(&format!("not a password hash ({e})")))?;
            let scram = scram
                .map(ScramCredential::parse)
                .transpose()
                .map_err(|e| parse_error(&format!("bad SCRAM credential: {e}")))?;
            let entry = Entry {
                hash: hash.to_string(),
                scram,
            };
            if users.insert(user.to_string(), entry).is_some() {
                return Err(parse_error(&format!("user {user:?} appears twice")));
            }
        }
        Ok(PasswordFile { users })
    }

    /// The file's text: one `user:hash[:scram]` line per user, sorted.
    pub fn render(&self) -> String {
        self.users
            .iter()
            .map(|(u, e)| match &e.scram {
                Some(scram) => format!("{u}:{}:{scram}\n", e.hash),
                None => format!("{u}:{}\n", e.hash),
            })
            .collect()
    }

    /// The user names, sorted.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// `user`'s SCRAM-SHA-256 credential (None for unknown users and lines without one).
    pub fn scram(&self, user: &str) -> Option<ScramCredential> {
        self.users.get(user)?.scram.clone()
    }

    /// Writes the file atomically (a temporary file renamed over it), readable only by its
    /// owner on Unix.
    pub fn save(&self, path: &Path) -> Result<(), PasswdError> {
        let write_error = |source| PasswdError::Write {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut f = options.open(&tmp).map_err(write_error)?;
            f.write_all(self.render().as_bytes()).map_err(write_error)?;
            f.sync_all().map_err(write_error)?;
        }
        std::fs::rename(&tmp, path).map_err(write_error)
    }

    /// Adds or replaces `user` with a fresh argon2id hash of `password` and a fresh SCRAM
    /// credential.
    pub fn set(&mut self, user: &str, password: &[u8]) -> Result<(), PasswdError> {
        if !valid_user(user) {
            return Err(PasswdError::BadUser(user.to_string()));
        }
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(password, &salt)
            .map_err(|e| PasswdError::Hash(e.to_string()))?;
        let entry = Entry {
            hash: hash.to_string(),
            scram: Some(ScramCredential::new(password, scram::DEFAULT_ITERATIONS)),
        };
        self.users.insert(user.to_string(), entry);
        Ok(())
    }

    /// Removes `user`; false when there was no such user.
    pub fn remove(&mut self, user: &str) -> bool {
        self.users.remove(user).is_some()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `password` is `user`'s. An unknown user costs the same work as a known one
    /// (a hash of a dummy password is checked), so timing does not reveal which users exist.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        static DUMMY: OnceLock<String> = OnceLock::new();
        let (hash, known) = match self.users.get(user) {
            Some(e) => (e.hash.as_str(), true),
            None => (
                DUMMY
                    .get_or_init(|| {
                        let salt = SaltString::generate(&mut OsRng);
                        Argon2::default()
                            .hash_password(b"tiermq-dummy", &salt)
                            .map(|h| h.to_string())
                            .unwrap_or_default()
                    })
                    .as_str(),
                false,
            ),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let ok = Argon2::default().verify_password(password, &parsed).is_ok();
        ok && known
    }

    /// [`PasswordFile::verify`] on tokio's blocking pool.
    pub async fn verify_blocking(self: &Arc<Self>, user: &str, password: &[u8]) -> bool {
        let file = self.clone();
        let user = user.to_string();
        let password = password.to_vec();
        tokio::task::spawn_blocking(move || file.verify(&user, &password))
            .await
            .unwrap_or(false)
    }
}

/// The password file as the node uses it: the version loaded last, replaced by
/// [`PasswordStore::reload`] (SIGHUP, a change of the file) only when the new file parses.
#[derive(Debug)]
pub struct PasswordStore {
    /// None for a store made in memory ([`PasswordStore::fixed`]): nothing to reload.
    path: Option<PathBuf>,
    current: RwLock<Arc<PasswordFile>>,
    attempted: Attempted,
}

impl PasswordStore {
    /// Reads `path` now; an unreadable or invalid file is an error (the node does not start).
    pub fn load(path: &Path) -> Result<Arc<PasswordStore>, PasswdError> {
        let attempted = Attempted::new(FileStamp::of([path]));
        let file = PasswordFile::load(path)?;
        Ok(Arc::new(PasswordStore {
            path: Some(path.to_path_buf()),
            current: RwLock::new(Arc::new(file)),
            attempted,
        }))
    }

    /// Users given directly (tests, tools); never reloaded.
    pub fn fixed(file: PasswordFile) -> Arc<PasswordStore> {
        Arc::new(PasswordStore {
            path: None,
            current: RwLock::new(Arc::new(file)),
            attempted: Attempted::new(FileStamp::of([])),
        })
    }

    /// The users as of now (a snapshot: a reload does not change it).
    pub fn current(&self) -> Arc<PasswordFile> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the file again; on success new CONNECTs and SCRAM exchanges see the new users,
    /// connections already in keep going. On error the previous users stay.
    pub fn reload(&self) -> Result<(), PasswdError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        self.attempted.set(FileStamp::of([path.as_path()]));
        let file = PasswordFile::load(path)?;
        info!(file = %path.display(), users = file.len(), "password file reloaded");
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(file);
        Ok(())
    }

    /// The SCRAM-SHA-256 method over this store's current users.
    pub fn scram_authenticator(
        self: &Arc<Self>,
        failure_delay: std::time::Duration,
    ) -> scram::ScramAuthenticator {
        let store = self.clone();
        scram::ScramAuthenticator::new(
            Arc::new(move |user| store.current().scram(user)),
            failure_delay,
        )
    }
}

impl Reload for PasswordStore {
    fn what(&self) -> String {
        match &self.path {
            Some(p) => format!("password file {}", p.display()),
            None => "password file".into(),
        }
    }

    fn reload(&self) -> Result<(), String> {
        PasswordStore::reload(self).map_err(|e| e.to_string())
    }

    fn changed(&self) -> bool {
        match &self.path {
            Some(p) => self.attempted.differs(&FileStamp::of([p.as_path()])),
            None => false,
        }
    }
}

/// Who may connect with a username and password (CONNECT's User Name / Password fields).
#[derive(Debug, Clone)]
pub struct PasswordAuth {
    pub users: Arc<PasswordStore>,
    /// A CONNECT without a user name is let in (otherwise: 0x87 / v3 return code 5).
    pub allow_anonymous: bool,
    /// Wait this long before refusing wrong credentials: a guesser gets few tries per
    /// connection and second, a real client hardly notices.
    pub failure_delay: std::time::Duration,
}

impl PasswordAuth {
    /// Checks CONNECT's credentials. The refusal is the v5 reason code (the codec turns it
    /// into the 3.1.1 return code: 0x86 → 4 bad user name or password, 0x87 → 5 not
    /// authorized).
    pub async fn check(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<(), tiermq_common::ReasonCode> {
        use tiermq_common::ReasonCode;
        let Some(user) = username else {
            if self.allow_anonymous {
                return Ok(());
            }
            tokio::time::sleep(self.failure_delay).await;
            return Err(ReasonCode::NOT_AUTHORIZED);
        };
        if self
            .users
            .current()
            .verify_blocking(user, password.unwrap_or_default())
            .await
        {
            return Ok(());
        }
        tokio::time::sleep(self.failure_delay).await;
        Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_verify_remove_round_trip() {
        let mut f = PasswordFile::default();
        f.set("alice", b"s3cret").unwrap();
        f.set("bob", b"hunter2").unwrap();
        assert!(f.verify("alice", b"s3cret"));
        assert!(!f.verify("alice", b"hunter2"));
        assert!(!f.verify("carol", b"s3cret"));
        let text = f.render();
        assert!(text.starts_with("alice:$argon2id$"), "{text}");
        assert!(!text.contains("s3cret"), "never plaintext");
        let back = PasswordFile::parse(&text).unwrap();
        assert_eq!(back, f);
        assert!(back.verify("bob", b"hunter2"));
        let mut f = back;
        assert!(f.remove("bob"));
        assert!(!f.remove("bob"));
        assert!(!f.verify("bob", b"hunter2"));
    }

    #[test]
    fn bad_files_and_names_are_refused_clearly() {
        let e = PasswordFile::parse("# users\n\nalice\n").unwrap_err();
        assert_eq!(e.to_string(), "password file line 3: expected user:hash");
        let e = PasswordFile::parse("alice:plaintext").unwrap_err();
        assert!(e.to_string().contains("line 1: not a password hash"), "{e}");
        let mut f = PasswordFile::default();
        f.set("a", b"x").unwrap();
        let twice = format!("{}{}", f.render(), f.render());
        assert!(PasswordFile::parse(&twice)
            .unwrap_err()
            .to_string()
            .contains("appears twice"));
        assert!(matches!(f.set("a:b", b"x"), Err(PasswdError::BadUser(_))));
        assert!(matches!(f.set("", b"x"), Err(PasswdError::BadUser(_))));
    }

    #[test]
    fn lines_carry_a_scram_credential_and_old_lines_still_work() {
        let mut f = PasswordFile::default();
        f.set("alice", b"s3cret").unwrap();
        let text = f.render();
        let (hash, scram) = text.trim_end()["alice:".len()..].split_once(':').unwrap();
        assert!(hash.starts_with("$argon2id$"), "{text}");
        assert!(scram.starts_with("SCRAM-SHA-256$4096:"), "{text}");
        let cred = f.scram("alice").unwrap();
        assert_eq!(
            cred,
            ScramCredential::derive(b"s3cret", &cred.salt, cred.iterations)
        );
        // A line as the first `tiermq passwd` wrote it: passwords work, SCRAM has nothing.
        let old = PasswordFile::parse(&format!("alice:{hash}\n")).unwrap();
        assert!(old.verify("alice", b"s3cret"));
        assert_eq!(old.scram("alice"), None);
        assert_eq!(old.render(), format!("alice:{hash}\n"));
        let e = PasswordFile::parse(&format!("alice:{hash}:SCRAM-SHA-256$10:x$y:z")).unwrap_err();
        assert!(e.to_string().contains("bad SCRAM credential"), "{e}");
    }

    #[test]
    fn a_store_reloads_and_keeps_the_last_good_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let mut f = PasswordFile::default();
        f.set("alice", b"pw").unwrap();
        f.save(&path).unwrap();
        let store = PasswordStore::load(&path).unwrap();
        assert!(!Reload::changed(&*store));
        f.set("bob", b"pw2").unwrap();
        f.save(&path).unwrap();
        assert!(Reload::changed(&*store));
        store.reload().unwrap();
        assert!(store.current().contains("bob"));
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(store.reload().is_err());
        assert!(
            !Reload::changed(&*store),
            "a failed attempt is not retried until the next change"
        );
        assert!(store.current().contains("bob"), "previous users stay");
    }

    #[test]
    fn save_writes_atomically_and_privately() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let mut f = PasswordFile::default();
        f.set("alice", b"pw").unwrap();
        f.save(&path).unwrap();
        assert_eq!(PasswordFile::load(&path).unwrap(), f);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let e = PasswordFile::load(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().starts_with("cannot read password file"));
    }
}
