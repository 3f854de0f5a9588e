//! Reloading files while the node runs: TLS certificates, the password file.
//!
//! Each reloadable thing keeps its current version behind a lock and swaps it only when the
//! new files make a valid one; a broken file is logged and the previous version stays, so an
//! operator's typo never locks clients out. [`watch`] reloads on SIGHUP and, when polling, on
//! a change of a file's [`FileStamp`] (modification time, length, inode: a file replaced by
//! rename counts as changed even if the time is the same).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What identifies files' contents cheaply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp(Vec<Option<(SystemTime, u64, u64)>>);

impl FileStamp {
    pub fn of<'a>(paths: impl IntoIterator<Item = &'a Path>) -> FileStamp {
        let one = |p: &Path| {
            let m = std::fs::metadata(p).ok()?;
            #[cfg(unix)]
            let ino = std::os::unix::fs::MetadataExt::ino(&m);
            #[cfg(not(unix))]
            let ino = 0;
            Some((m.modified().ok()?, m.len(), ino))
        };
        FileStamp(paths.into_iter().map(one).collect())
    }
}

/// The stamp of the last load attempt (successful or not), so a broken file is reported once
/// per change, not once per poll.
#[derive(Debug)]
pub struct Attempted(Mutex<FileStamp>);

impl Attempted {
    pub fn new(stamp: FileStamp) -> Attempted {
        Attempted(Mutex::new(stamp))
    }

    pub fn set(&self, stamp: FileStamp) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
    }

    /// Whether `now` differs from the last attempt.
    pub fn differs(&self, now: &FileStamp) -> bool {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) != *now
    }
}

/// Something [`watch`] reloads.
pub trait Reload: Send + Sync {
    /// What it is, for logs (e.g. `TLS certificate of listener tls:0.0.0.0:8883`).
    fn what(&self) -> String;
    /// Reads the files again; on error the previous version stays in use.
    fn reload(&self) -> Result<(), String>;
    /// Whether a file changed since the last attempt.
    fn changed(&self) -> bool;
}

/// [`Reload::reload`], logging a failure.
pub fn reload_logged(r: &dyn Reload) {
    if let Err(e) = r.reload() {
        warn!(what = %r.what(), error = %e, "reload failed; the previous version stays in use");
    }
}

/// Reloads `items` on SIGHUP (unix) and, when `poll` is set, whenever one's files change,
/// until `shutdown`.
pub async fn watch(
    items: Vec<Arc<dyn Reload>>,
    poll: Option<Duration>,
    shutdown: CancellationToken,
) {
    if items.is_empty() {
        return;
    }
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| warn!(error = %e, "cannot watch SIGHUP; files reload only when they change"))
        .ok();
    let period = poll.map_or(Duration::from_secs(86_400), |p| {
        p.max(Duration::from_millis(100))
    });
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hup => {
                info!("SIGHUP: reloading certificates and the password file");
                items.iter().for_each(|r| reload_logged(r.as_ref()));
            }
            _ = tick.tick(), if poll.is_some() => {
                items.iter().filter(|r| r.changed()).for_each(|r| reload_logged(r.as_ref()));
            }
        }
    }
}
