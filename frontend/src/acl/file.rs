//! The rules of one ACL file as a node holds them: loaded at start, replaced as a whole on
//! reload (SIGHUP or a changed file), and the set of them per listener.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch as channel;
use tracing::info;

use super::{AclError, AclRules, AclView};
use crate::reload::{Attempted, FileStamp, Reload};

/// The ACL of a listener (or of the node), replaced as a whole on reload. Connections hold a
/// [`AclView`], which sees a reload at its next check.
pub struct Acl {
    path: PathBuf,
    current: channel::Sender<Arc<AclRules>>,
    attempted: Attempted,
}

impl std::fmt::Debug for Acl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acl").field("path", &self.path).finish()
    }
}

impl Acl {
    /// Reads the file now; an unreadable or invalid file is an error (the node does not start).
    pub fn load(path: &Path) -> Result<Arc<Acl>, AclError> {
        let stamp = FileStamp::of([path]);
        let rules = AclRules::load(path)?;
        info!(file = %path.display(), rules = rules.len(), "ACL loaded");
        Ok(Acl::from_rules(path, rules, stamp))
    }

    pub(super) fn from_rules(path: &Path, rules: AclRules, stamp: FileStamp) -> Arc<Acl> {
        Arc::new(Acl {
            path: path.to_path_buf(),
            current: channel::Sender::new(Arc::new(rules)),
            attempted: Attempted::new(stamp),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn rules(&self) -> Arc<AclRules> {
        self.current.borrow().clone()
    }

    /// Reads the file again; on success every connection re-checks at its next step (its
    /// granted subscriptions included). On error the previous rules stay.
    pub fn reload_rules(&self) -> Result<(), AclError> {
        self.attempted.set(FileStamp::of([self.path.as_path()]));
        let rules = AclRules::load(&self.path)?;
        info!(file = %self.path.display(), rules = rules.len(), "ACL reloaded");
        self.current.send_replace(Arc::new(rules));
        Ok(())
    }

    /// The per-connection view for a client.
    pub fn view(&self, username: Option<Arc<str>>, client_id: Arc<str>) -> AclView {
        AclView::new(self.current.subscribe(), username, client_id)
    }
}

/// Reloaded with the certificates and the password file ([`crate::reload::watch`]: SIGHUP,
/// and polling for file changes).
impl Reload for Acl {
    fn what(&self) -> String {
        format!("ACL file {}", self.path.display())
    }

    fn reload(&self) -> Result<(), String> {
        self.reload_rules().map_err(|e| e.to_string())
    }

    fn changed(&self) -> bool {
        self.attempted
            .differs(&FileStamp::of([self.path.as_path()]))
    }
}

/// The node's ACLs: one for every listener without its own, and per-listener overrides.
#[derive(Debug, Clone, Default)]
pub struct AclSet {
    pub default: Option<Arc<Acl>>,
    /// By listener name.
    pub listeners: HashMap<String, Arc<Acl>>,
}

impl AclSet {
    /// The ACL that governs connections of `listener`; `None`: everything allowed.
    pub fn for_listener(&self, listener: &str) -> Option<&Arc<Acl>> {
        self.listeners.get(listener).or(self.default.as_ref())
    }

    pub fn is_empty(&self) -> bool {
        self.default.is_none() && self.listeners.is_empty()
    }

    /// Every ACL, for the reload watcher.
    pub fn reloaders(&self) -> Vec<Arc<dyn Reload>> {
        self.default
            .iter()
            .chain(self.listeners.values())
            .map(|a| a.clone() as Arc<dyn Reload>)
            .collect()
    }
}
