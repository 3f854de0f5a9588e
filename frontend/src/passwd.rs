//! The password file: `user:PHC-hash` lines, one per user, hashes in argon2id.
//!
//! Why a file of hashes and not of passwords: whoever reads the file (a backup, a leaked
//! image) learns nothing usable; argon2id makes guessing expensive even offline. The format is
//! the PHC string (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`), so the parameters travel
//! with each hash and can be raised later without breaking old entries.
//!
//! Verification costs tens of milliseconds of CPU by design: callers run it on a blocking
//! thread ([`PasswordFile::verify_blocking`]) so a burst of CONNECTs cannot stall the
//! connections already served.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

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

/// Users and their password hashes, sorted by user name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: BTreeMap<String, String>,
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
            let Some((user, hash)) = line.split_once(':') else {
                return Err(parse_error("expected user:hash"));
            };
            if !valid_user(user) {
                return Err(parse_error("empty user name"));
            }
            PasswordHash::new(hash)
                .map_err(|e| parse_error(&format!("not a password hash ({e})")))?;
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(parse_error(&format!("user {user:?} appears twice")));
            }
        }
        Ok(PasswordFile { users })
    }

    /// The file's text: one `user:hash` line per user, sorted.
    pub fn render(&self) -> String {
        self.users
            .iter()
            .map(|(u, h)| format!("{u}:{h}\n"))
            .collect()
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

    /// Adds or replaces `user` with a fresh argon2id hash of `password`.
    pub fn set(&mut self, user: &str, password: &[u8]) -> Result<(), PasswdError> {
        if !valid_user(user) {
            return Err(PasswdError::BadUser(user.to_string()));
        }
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(password, &salt)
            .map_err(|e| PasswdError::Hash(e.to_string()))?;
        self.users.insert(user.to_string(), hash.to_string());
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
            Some(h) => (h.as_str(), true),
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

/// Who may connect with a username and password (CONNECT's User Name / Password fields).
#[derive(Debug, Clone)]
pub struct PasswordAuth {
    pub file: Arc<PasswordFile>,
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
            .file
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
