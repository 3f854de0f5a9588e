//! Multi-process cluster harness: 3 `tiermq backend` and 2 `tiermq frontend` processes on free
//! 127.0.0.1 ports, data and logs in a temporary folder.
//!
//! * [`ProcCluster::start`] returns once every partition has a leader and a QoS1 message
//!   published through each frontend reached a subscriber on each (`tiermq cluster probe`).
//! * Nodes can be killed (-9) and restarted on their data; [`ProcCluster::status`] is
//!   `tiermq cluster status` as a value (leaders, terms, lag).
//! * [`Target`]: one test body, run against the in-process standalone broker or a cluster
//!   ([`shared_cluster`], started once per test binary).
//!
//! Children are spawned from one long-lived thread with `PR_SET_PDEATHSIG`, so they die with
//! the test process even when it panics or is killed; dropping a `ProcCluster` kills them too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tempfile::TempDir;
use tiermq::cluster_cli::{self, ClusterStatus};
use tiermq_proto::tls::GrpcTls;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{free_port, start_broker, Broker};

/// How long a cluster may take to serve after its processes start.
pub const START_WAIT: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------------------------
// Spawning children that die with us
// ---------------------------------------------------------------------------------------------

type SpawnRequest = (Command, std_mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the test process; the child gets SIGKILL
/// when that thread (the process) ends.
fn spawn_child(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<std_mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("cluster-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    #[cfg(target_os = "linux")]
                    {
                        use std::os::unix::process::CommandExt;
                        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
                        unsafe {
                            cmd.pre_exec(|| {
                                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                                Ok(())
                            });
                        }
                    }
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static: this loop never ends, so neither does the
                // thread (its end would kill every child).
            })
            .expect("spawner thread");
        Mutex::new(tx)
    });
    let (reply, rx) = std_mpsc::channel();
    // `Command` is Send; move it to the spawner.
    let taken = std::mem::replace(&mut cmd, Command::new("true"));
    tx.lock()
        .unwrap()
        .send((taken, reply))
        .expect("spawner alive");
    rx.recv().expect("spawner answers")
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Backend,
    Frontend,
}

/// One node process and how to start it again.
pub struct Node {
    pub role: Role,
    /// 1-based: backend node id, or frontend number.
    pub id: usize,
    /// gRPC address (backend) or MQTT address (frontend).
    pub addr: SocketAddr,
    /// Metrics/admin endpoint (`--metrics-listen`): /metrics, /healthz, /readyz, /status,
    /// POST /drain.
    pub admin: SocketAddr,
    pub log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

impl Node {
    fn spawn(&mut self) {
        self.starts += 1;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiermq"));
        cmd.args(&self.args)
            .arg("--metrics-listen")
            .arg(self.admin.to_string())
            .env("TIERMQ_LOG", "info,slog=warn")
            .env_remove("RUST_LOG")
            .env_remove("TIERMQ_CONFIG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        self.child = Some(spawn_child(cmd).expect("spawn tiermq"));
    }

    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process, if it runs.
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    /// Waits (at most `within`) for the process to exit on its own and reaps it; its exit
    /// status, or `None` when it still runs.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            } else {
                return None;
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A node that exited because its metrics port was taken meanwhile (ports are picked
    /// free, then bound by the child later) starts again on another one.
    fn retry_admin_port(&mut self) -> bool {
        let taken = format!("cannot listen for metrics on {}", self.admin);
        if self.starts > 3 || !self.log_text().contains(&taken) {
            return false;
        }
        self.kill9();
        self.admin = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        self.spawn();
        true
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn name(&self) -> String {
        match self.role {
            Role::Backend => format!("backend {}", self.id),
            Role::Frontend => format!("frontend {}", self.id),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub backends: usize,
    pub frontends: usize,
    pub partitions: u32,
    pub replication: usize,
    /// Extra flags for every frontend (e.g. `--probe-interval-secs 1`).
    pub frontend_args: Vec<String>,
    /// Extra flags for every backend (e.g. `--leader-transfer-secs 0`).
    pub backend_args: Vec<String>,
    /// Internal gRPC over mutual TLS, with certificates made by `scripts/gen-cluster-certs`
    /// in `<cluster folder>/certs` (the harness's own calls present `admin.pem`).
    pub tls: bool,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            backends: 3,
            frontends: 2,
            partitions: 8,
            replication: 3,
            frontend_args: Vec::new(),
            backend_args: Vec::new(),
            tls: false,
        }
    }
}

enum Dir {
    Temp(TempDir),
    Kept(PathBuf),
}

/// Backends and frontends as child processes.
pub struct ProcCluster {
    pub backends: Vec<Node>,
    pub frontends: Vec<Node>,
    pub opts: ClusterOpts,
    /// What the harness's gRPC calls use when `opts.tls`.
    pub tls: Option<GrpcTls>,
    // Last: the folder goes after the processes.
    dir: Dir,
}

impl ProcCluster {
    /// 3 backends, 2 frontends, 8 partitions × 3 replicas; returns once it serves.
    pub async fn start() -> ProcCluster {
        Self::start_with(ClusterOpts::default()).await
    }

    pub async fn start_with(opts: ClusterOpts) -> ProcCluster {
        let dir = tempfile::Builder::new()
            .prefix("tiermq-cluster-test.")
            .tempdir()
            .expect("temp dir");
        Self::start_in(opts, Dir::Temp(dir)).await
    }

    async fn start_in(opts: ClusterOpts, dir: Dir) -> ProcCluster {
        let root = match &dir {
            Dir::Temp(t) => t.path().to_path_buf(),
            Dir::Kept(p) => p.clone(),
        };
        let be_addrs: Vec<SocketAddr> = (0..opts.backends)
            .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
            .collect();
        let peers = be_addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let seeds = be_addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let certs = root.join("certs");
        let tls_args = |name: &str| -> Vec<String> {
            if !opts.tls {
                return Vec::new();
            }
            let file = |f: String| certs.join(f).display().to_string();
            vec![
                "--cluster-tls-ca".into(),
                file("ca.pem".into()),
                "--cluster-tls-cert".into(),
                file(format!("{name}.pem")),
                "--cluster-tls-key".into(),
                file(format!("{name}.key")),
            ]
        };
        let tls = opts.tls.then(|| {
            let mut names: Vec<String> = (1..=opts.backends).map(|i| format!("b{i}")).collect();
            names.extend(["frontend".into(), "admin".into()]);
            gen_cluster_certs(&certs, &names);
            GrpcTls::load(
                &certs.join("ca.pem"),
                &certs.join("admin.pem"),
                &certs.join("admin.key"),
            )
            .expect("admin certificate loads")
        });
        let backends: Vec<Node> = be_addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| Node {
                role: Role::Backend,
                id: i + 1,
                addr: *addr,
                admin: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
                log: root.join(format!("backend-{}.log", i + 1)),
                args: vec![
                    "backend".into(),
                    "--node-id".into(),
                    (i + 1).to_string(),
                    "--grpc-listen".into(),
                    addr.to_string(),
                    "--peers".into(),
                    peers.clone(),
                    "--data-dir".into(),
                    root.join(format!("data-{}", i + 1)).display().to_string(),
                    "--cluster-partitions".into(),
                    opts.partitions.to_string(),
                    "--replication".into(),
                    opts.replication.to_string(),
                ]
                .into_iter()
                .chain(opts.backend_args.iter().cloned())
                .chain(tls_args(&format!("b{}", i + 1)))
                .collect(),
                child: None,
                starts: 0,
            })
            .collect();
        let fe_addrs: Vec<SocketAddr> = (0..opts.frontends)
            .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
            .collect();
        let frontends: Vec<Node> = (0..opts.frontends)
            .map(|i| {
                let addr = fe_addrs[i];
                // A draining frontend sends its v5 clients to the others.
                let others: Vec<String> = fe_addrs
                    .iter()
                    .filter(|a| **a != addr)
                    .map(|a| a.to_string())
                    .collect();
                Node {
                    role: Role::Frontend,
                    id: i + 1,
                    addr,
                    admin: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
                    log: root.join(format!("frontend-{}.log", i + 1)),
                    args: [
                        "frontend".into(),
                        "--listen".into(),
                        addr.to_string(),
                        "--backends".into(),
                        seeds.clone(),
                        "--server-references".into(),
                        others.join(","),
                    ]
                    .into_iter()
                    .chain(opts.frontend_args.iter().cloned())
                    .chain(tls_args("frontend"))
                    .collect(),
                    child: None,
                    starts: 0,
                }
            })
            .collect();
        let mut c = ProcCluster {
            backends,
            frontends,
            opts,
            tls,
            dir,
        };
        for b in &mut c.backends {
            b.spawn();
        }
        let deadline = Instant::now() + START_WAIT;
        c.wait_healthy_until(deadline).await;
        for f in &mut c.frontends {
            f.spawn();
        }
        for i in 0..c.frontends.len() {
            c.wait_frontend_listens(i, deadline).await;
        }
        c.wait_serves_until(deadline).await;
        c
    }

    pub fn dir(&self) -> &Path {
        match &self.dir {
            Dir::Temp(t) => t.path(),
            Dir::Kept(p) => p,
        }
    }

    /// MQTT address of frontend `i` (0-based).
    pub fn fe(&self, i: usize) -> SocketAddr {
        self.frontends[i].addr
    }

    /// Metrics/admin endpoint of frontend `i` (0-based).
    pub fn fe_admin(&self, i: usize) -> SocketAddr {
        self.frontends[i].admin
    }

    /// Metrics/admin endpoint of backend `i` (0-based).
    pub fn be_admin(&self, i: usize) -> SocketAddr {
        self.backends[i].admin
    }

    pub fn fe_addrs(&self) -> Vec<SocketAddr> {
        self.frontends.iter().map(|f| f.addr).collect()
    }

    /// Last lines of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in self.backends.iter().chain(&self.frontends) {
            let text = n.log_text();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("---- {} ({})\n", n.name(), n.log.display()));
            for l in lines[..]
                .iter()
                .filter(|l| !l.contains(" slog: "))
                .rev()
                .take(25)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn check_alive(&mut self) {
        let mut dead = Vec::new();
        for n in self.backends.iter_mut().chain(self.frontends.iter_mut()) {
            if n.child.is_some() && !n.running() && !n.retry_admin_port() {
                dead.push(n.name());
            }
        }
        assert!(dead.is_empty(), "{dead:?} exited; logs:\n{}", self.logs());
    }

    /// `tiermq cluster status` through the first backend that answers.
    pub async fn status(&self) -> Option<ClusterStatus> {
        for b in &self.backends {
            if b.child.is_none() {
                continue;
            }
            let addr = b.addr.to_string();
            if let Ok(s) =
                cluster_cli::collect(&addr, Duration::from_secs(2), self.tls.as_ref()).await
            {
                return Some(s);
            }
        }
        None
    }

    /// Waits until every partition has a leader and every running backend answers.
    pub async fn wait_healthy(&mut self) {
        self.wait_healthy_until(Instant::now() + START_WAIT).await;
    }

    async fn wait_healthy_until(&mut self, deadline: Instant) {
        loop {
            self.check_alive();
            if let Some(s) = self.status().await {
                let led = s.partition_status.iter().all(|p| p.leader != 0);
                let running: Vec<u64> = self
                    .backends
                    .iter()
                    .filter(|b| b.child.is_some())
                    .map(|b| b.id as u64)
                    .collect();
                let up = s
                    .members
                    .iter()
                    .all(|m| m.reachable || !running.contains(&m.id));
                if led && up {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "cluster not healthy in time: {:?}; logs:\n{}",
                self.status().await.map(|s| s.problems),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_frontend_listens(&mut self, i: usize, deadline: Instant) {
        loop {
            self.check_alive();
            if TcpStream::connect(self.frontends[i].addr).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "frontend {} did not listen in time; logs:\n{}",
                i + 1,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A QoS1 round trip through every running frontend succeeds.
    pub async fn wait_serves(&mut self) {
        self.wait_serves_until(Instant::now() + START_WAIT).await;
    }

    async fn wait_serves_until(&mut self, deadline: Instant) {
        loop {
            self.check_alive();
            let addrs: Vec<SocketAddr> = self
                .frontends
                .iter()
                .filter(|f| f.child.is_some())
                .map(|f| f.addr)
                .collect();
            let left = deadline.saturating_duration_since(Instant::now());
            let e = match cluster_cli::probe(&addrs, left.min(Duration::from_secs(10))).await {
                Ok(()) => return,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "cluster does not serve: {e:#}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The backend index (0-based) leading the partition of `key` (a client id or topic).
    pub async fn leader_index_of(&self, key: &str) -> usize {
        let s = self.status().await.expect("a backend answers");
        let id = s.leader_of_key(key);
        assert!(
            id != 0,
            "partition of {key:?} has no leader: {:?}",
            s.problems
        );
        id as usize - 1
    }

    /// The partition of `key`.
    pub fn partition_of(&self, key: &str) -> u32 {
        tiermq_common::hashing::partition_of(key, self.opts.partitions)
    }

    pub fn kill9_backend(&mut self, i: usize) {
        self.backends[i].kill9();
    }

    pub fn kill9_frontend(&mut self, i: usize) {
        self.frontends[i].kill9();
    }

    /// Starts a killed backend again on its data folder and address.
    pub fn restart_backend(&mut self, i: usize) {
        assert!(self.backends[i].child.is_none(), "backend {} runs", i + 1);
        self.backends[i].spawn();
    }

    /// Starts a killed frontend again on its address and waits until it listens.
    pub async fn restart_frontend(&mut self, i: usize) {
        assert!(self.frontends[i].child.is_none(), "frontend {} runs", i + 1);
        self.frontends[i].spawn();
        self.wait_frontend_listens(i, Instant::now() + START_WAIT)
            .await;
    }
}

/// Runs `scripts/gen-cluster-certs DIR NAMES...` (openssl), as operators do.
pub fn gen_cluster_certs(dir: &Path, names: &[String]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gen-cluster-certs");
    let out = Command::new(script)
        .arg(dir)
        .args(names)
        .output()
        .expect("run scripts/gen-cluster-certs (needs openssl)");
    assert!(
        out.status.success(),
        "gen-cluster-certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        for n in self.backends.iter_mut().chain(self.frontends.iter_mut()) {
            n.kill9();
        }
        // A failed test keeps its logs and data.
        if std::thread::panicking() {
            if let Dir::Temp(t) = std::mem::replace(&mut self.dir, Dir::Kept(PathBuf::new())) {
                eprintln!("cluster folder kept: {}", t.keep().display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One cluster per test binary, and the two targets of shared test bodies
// ---------------------------------------------------------------------------------------------

/// A cluster started once per test process (in a thread with its own runtime, so any test's
/// runtime may ask for it) and killed when the process ends. Tests that use it must use
/// client ids and topics of their own.
pub fn shared_cluster() -> &'static ProcCluster {
    static SHARED: OnceLock<ProcCluster> = OnceLock::new();
    SHARED.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            // The folder lives under target/ (a static is never dropped, so a TempDir would
            // leak); folders of earlier runs are removed here.
            let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("shared-clusters");
            std::fs::create_dir_all(&base).unwrap();
            if let Ok(entries) = std::fs::read_dir(&base) {
                for e in entries.flatten() {
                    let pid: Option<i32> = e.file_name().to_str().and_then(|n| n.parse().ok());
                    // SAFETY: kill with signal 0 only checks whether the process exists.
                    let alive = pid.is_some_and(|p| unsafe { libc::kill(p, 0) } == 0);
                    if !alive {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            let dir = base.join(std::process::id().to_string());
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            rt.block_on(ProcCluster::start_in(
                ClusterOpts::default(),
                Dir::Kept(dir),
            ))
        })
        .join()
        .expect("shared cluster starts")
    })
}

/// Where a shared test body runs.
pub enum Target {
    /// The in-process standalone broker: every "frontend" is the same listener.
    Standalone(Broker),
    /// The shared process cluster: frontend `i` is `i % 2`.
    Cluster(&'static ProcCluster),
}

impl Target {
    pub async fn standalone() -> Target {
        Target::Standalone(start_broker().await)
    }

    pub fn cluster() -> Target {
        Target::Cluster(shared_cluster())
    }

    /// MQTT address of "frontend" `i`: consecutive indexes are different frontends of a
    /// cluster, so a body that publishes on 0 and subscribes on 1 crosses frontends.
    pub fn addr(&self, i: usize) -> SocketAddr {
        match self {
            Target::Standalone(b) => b.addr,
            Target::Cluster(c) => c.fe(i % c.frontends.len()),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Target::Standalone(_) => "standalone",
            Target::Cluster(_) => "cluster",
        }
    }
}

/// Runs one test body against both targets: `both!(name, body_fn)` defines `name_standalone`
/// and `name_cluster` tests. The body is `async fn(Target, &str)`, the string a prefix that
/// keeps client ids and topics of the two runs apart.
#[macro_export]
macro_rules! both {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn standalone() {
                let t = $crate::support::cluster::Target::standalone().await;
                super::$body(t, concat!(stringify!($name), "-s")).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() {
                let t = $crate::support::cluster::Target::cluster();
                super::$body(t, concat!(stringify!($name), "-c")).await;
            }
        }
    };
}
