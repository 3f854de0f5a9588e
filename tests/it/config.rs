//! The binary refuses a bad configuration at start, whichever layer it comes from (file,
//! `TIERMQ_*` variable, flag), with a message naming the setting and exit code 2.

/// `tiermq standalone ARGS` with the variables `env`; every case here is refused at start, so
/// no broker runs. Returns the exit code and standard error.
fn standalone(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .arg("standalone")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", ""])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(args)
        .env_remove("TIERMQ_CONFIG")
        .envs(env.iter().copied())
        .output()
        .expect("run tiermq");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr)
}

/// A settings file holding `text`, and the `--config` flag for it.
fn config_file(dir: &tempfile::TempDir, text: &str) -> [String; 2] {
    let path = dir.path().join("tiermq.toml");
    std::fs::write(&path, text).unwrap();
    ["--config".into(), path.display().to_string()]
}

#[test]
fn a_bad_variable_names_its_flag_and_value() {
    let (code, stderr) = standalone(&[], &[("TIERMQ_MAX_PACKET_SIZE", "lots")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("invalid value 'lots'"), "{stderr}");
    assert!(stderr.contains("--max-packet-size"), "{stderr}");
}

#[test]
fn unknown_keys_and_bad_values_in_the_file_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir, "[mqtt]\nlisen = \"127.0.0.1:1\"\n");
    let (code, stderr) = standalone(&[&config[0], &config[1]], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("invalid config file"), "{stderr}");
    assert!(stderr.contains("unknown field `lisen`"), "{stderr}");
    let config = config_file(&dir, "[mqtt]\nreceive_maximum = -1\n");
    let (code, stderr) = standalone(&[&config[0], &config[1]], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("receive_maximum"), "{stderr}");
}

/// An out-of-range value is refused by name from each layer; the variable wins over the file's
/// good value, and a good flag over a bad variable.
#[test]
fn out_of_range_values_are_refused_from_every_layer() {
    let refused = "invalid setting mqtt.receive_maximum: must be at least 1";
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir, "[mqtt]\nreceive_maximum = 0\n");
    let (code, stderr) = standalone(&[&config[0], &config[1]], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(refused), "{stderr}");
    let (code, stderr) = standalone(&["--receive-maximum", "0"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(refused), "{stderr}");
    // File good, variable bad: refused. Variable bad, flag good: the flag wins, and a
    // queue limit of 0 from the file (checked after it) shows that validation got past it.
    let config = config_file(
        &dir,
        "[mqtt]\nreceive_maximum = 10\n[session]\nmax_queued_messages = 0\n",
    );
    let env = [("TIERMQ_RECEIVE_MAXIMUM", "0")];
    let (code, stderr) = standalone(&[&config[0], &config[1]], &env);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(refused), "{stderr}");
    let args = [config[0].as_str(), &config[1], "--receive-maximum", "5"];
    let (code, stderr) = standalone(&args, &env);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid setting session.max_queued_messages"),
        "{stderr}"
    );
}
