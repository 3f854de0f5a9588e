//! `--log-format json`: every line the broker writes is one JSON object (for log shippers),
//! with the level and the message; a bad format value is refused clearly.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn json_log_lines_are_json_objects() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .args([
            "standalone",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
        ])
        .args(["--log-format", "json", "--log-level", "info"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = child.kill();
    let _ = child.wait();
    let mut text = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log output");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    assert!(lines.iter().any(|l| l.contains("listener ready")), "{text}");
}

#[test]
fn unknown_log_format_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .args(["standalone", "--log-format", "xml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown log format"));
}
