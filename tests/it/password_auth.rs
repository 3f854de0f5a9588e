//! Username/password authentication against the password file (`mqtt.password_file`,
//! managed by `tiermq passwd`): real clients (rumqttc v5 and 3.1.1) and raw CONNECTs.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::*;
use tiermq_common::{ProtocolVersion, ReasonCode};

/// Runs `tiermq passwd ARGS` with `stdin` as standard input; (exit success, stdout+stderr).
fn passwd(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .arg("passwd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tiermq passwd");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn password_file(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("passwd");
    let f = file.to_str().unwrap();
    assert!(passwd(&["add", f, "alice"], "wonderland\n").0);
    assert!(passwd(&["add", f, "bob"], "builder\n").0);
    file
}

async fn broker(file: &Path, anonymous: bool) -> Broker {
    let file = file.to_path_buf();
    start_broker_with(move |s| {
        s.mqtt.password_file = Some(file);
        s.mqtt.allow_anonymous = Some(anonymous);
        s.mqtt.auth_failure_delay_ms = 10;
    })
    .await
}

#[test]
fn passwd_tool_adds_lists_checks_and_removes_users() {
    let dir = tempfile::tempdir().unwrap();
    let file = password_file(dir.path());
    let f = file.to_str().unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("alice:$argon2id$"), "{text}");
    assert!(!text.contains("wonderland"), "no plaintext on disk");
    let (ok, out) = passwd(&["list", f], "");
    assert!(ok);
    assert_eq!(out, "alice\nbob\n");
    assert!(passwd(&["check", f, "alice"], "wonderland\n").0);
    assert!(!passwd(&["check", f, "alice"], "builder\n").0);
    assert!(
        passwd(&["add", f, "alice"], "looking-glass\n").0,
        "password change"
    );
    assert!(passwd(&["check", f, "alice"], "looking-glass\n").0);
    assert!(passwd(&["remove", f, "bob"], "").0);
    assert!(!passwd(&["check", f, "bob"], "builder\n").0);
    let (ok, out) = passwd(&["remove", f, "bob"], "");
    assert!(!ok && out.contains("no user"), "{out}");
    let (ok, out) = passwd(&["add", f, "carol"], "\n");
    assert!(!ok && out.contains("empty password"), "{out}");
    std::fs::write(&file, "garbage\n").unwrap();
    let (ok, out) = passwd(&["list", f], "");
    assert!(!ok && out.contains("line 1"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_credentials_connect_wrong_ones_get_0x86_or_return_code_4() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(&password_file(dir.path()), false).await;
    for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
        let (_, ack) = Raw::connect(b.addr, version, "pw-ok", |c| {
            c.username = Some("alice".into());
            c.password = Some("wonderland".into());
        })
        .await;
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "{version:?}");
        for (user, pass) in [("alice", "builder"), ("mallory", "wonderland")] {
            let (mut c, ack) = Raw::connect(b.addr, version, "pw-bad", |c| {
                c.username = Some(user.into());
                c.password = Some(pass.into());
            })
            .await;
            // 3.1.1 return code 4 decodes to the same reason.
            assert_eq!(
                ack.reason_code,
                ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                "{version:?} {user}"
            );
            c.expect_closed().await;
        }
    }
    // A real client with the right password works end to end.
    let (mut sub, _) = V5::connect(b.addr, "pw-rumqttc", |o| {
        o.set_credentials("bob", "builder");
    })
    .await;
    sub.subscribe("pw/t", Q5::AtLeastOnce).await;
    let (mut publ, _) = V3::connect(b.addr, "pw-rumqttc3", |o| {
        o.set_credentials("alice", "wonderland");
    })
    .await;
    publ.publish_qos1("pw/t", b"hi").await;
    assert_eq!(&sub.next_publish().await.payload[..], b"hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let file = password_file(dir.path());
    let closed = broker(&file, false).await;
    for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
        let (_, ack) = Raw::connect(closed.addr, version, "anon", |_| {}).await;
        // 3.1.1 return code 5 decodes to 0x87.
        assert_eq!(ack.reason_code, ReasonCode::NOT_AUTHORIZED, "{version:?}");
    }
    let open = broker(&file, true).await;
    let (_, ack) = Raw::connect(open.addr, ProtocolVersion::V5, "anon", |_| {}).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    // Credentials given are still checked when anonymous clients are allowed.
    let (_, ack) = Raw::connect(open.addr, ProtocolVersion::V5, "anon-bad", |c| {
        c.username = Some("alice".into());
        c.password = Some("nope".into());
    })
    .await;
    assert_eq!(ack.reason_code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_password_file_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    std::fs::write(&file, "alice:not-a-hash\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .args(["standalone", "--listen", "127.0.0.1:0", "--password-file"])
        .arg(&file)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1"), "{err}");
}

/// Connects as `user` (v5) and returns the CONNACK reason code.
async fn try_login(addr: std::net::SocketAddr, user: &str, password: &str) -> ReasonCode {
    let (_, ack) = Raw::connect(addr, ProtocolVersion::V5, "reload", |c| {
        c.username = Some(user.into());
        c.password = Some(password.to_string().into());
    })
    .await;
    ack.reason_code
}

/// Retries `try_login` until it answers `want` (the file is polled every second).
async fn login_becomes(addr: std::net::SocketAddr, user: &str, password: &str, want: ReasonCode) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let got = try_login(addr, user, password).await;
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{user}: still {got:?}, want {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_file_changes_apply_without_a_restart_and_a_broken_one_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let file = password_file(dir.path());
    let f = file.to_str().unwrap().to_string();
    let path = file.clone();
    let b = start_broker_with(move |s| {
        s.mqtt.password_file = Some(path);
        s.mqtt.allow_anonymous = Some(false);
        s.mqtt.auth_failure_delay_ms = 10;
        s.mqtt.tls_reload_interval_secs = 1;
    })
    .await;
    let (mut alice, ack) = Raw::connect(b.addr, ProtocolVersion::V5, "alice-stays", |c| {
        c.username = Some("alice".into());
        c.password = Some("wonderland".into());
    })
    .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    let bad = ReasonCode::BAD_USER_NAME_OR_PASSWORD;
    assert_eq!(try_login(b.addr, "carol", "christmas").await, bad);
    assert!(passwd(&["add", &f, "carol"], "christmas\n").0);
    login_becomes(b.addr, "carol", "christmas", ReasonCode::SUCCESS).await;
    assert!(passwd(&["remove", &f, "bob"], "").0);
    login_becomes(b.addr, "bob", "builder", bad).await;
    // A broken file: the previous users stay (after more than one poll).
    std::fs::write(&file, "carol\n").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(
        try_login(b.addr, "carol", "christmas").await,
        ReasonCode::SUCCESS
    );
    assert_eq!(try_login(b.addr, "bob", "builder").await, bad);
    // Connections made before any of it were never dropped.
    alice.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_password_file() {
    let dir = ProcDir::new();
    let file = password_file(dir.data().parent().unwrap());
    let config = dir.data().parent().unwrap().join("tiermq.toml");
    // No polling: only the signal reloads.
    std::fs::write(
        &config,
        "[mqtt]\ntls_reload_interval_secs = 0\nauth_failure_delay_ms = 10\n",
    )
    .unwrap();
    let log = dir.data().parent().unwrap().join("broker.log");
    let args = [
        "--config".to_string(),
        config.display().to_string(),
        "--password-file".to_string(),
        file.display().to_string(),
    ];
    let b = ProcBroker::start_with_args(&dir.data(), &log, &args).await;
    let bad = ReasonCode::BAD_USER_NAME_OR_PASSWORD;
    assert!(passwd(&["add", file.to_str().unwrap(), "dave"], "diver\n").0);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        try_login(b.addr, "dave", "diver").await,
        bad,
        "no reload yet"
    );
    let status = Command::new("kill")
        .args(["-HUP", &b.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    login_becomes(b.addr, "dave", "diver", ReasonCode::SUCCESS).await;
    assert!(
        b.log_text().contains("password file reloaded"),
        "{}",
        b.log_text()
    );
}
