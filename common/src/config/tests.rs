//! The settings' tests: the file format, the layering of file, environment and flags, and
//! the checks.

use std::sync::Mutex;

use clap::{Args, Command, FromArgMatches};

use super::*;

/// Held while parsing a command line: clap reads `TIERMQ_*` variables, which one test sets.
static ENV: Mutex<()> = Mutex::new(());

/// `tiermq standalone ARGS` as the node parses it (with the environment as it is).
fn parse(args: &[&str]) -> Result<NodeFlags, clap::Error> {
    let cmd = NodeFlags::augment_args(Command::new("tiermq"));
    let matches =
        cmd.try_get_matches_from(std::iter::once("tiermq").chain(args.iter().copied()))?;
    NodeFlags::from_arg_matches(&matches)
}

fn node_flags(args: &[&str]) -> NodeFlags {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    parse(args).unwrap()
}

fn flags(args: &[&str]) -> SettingsFlags {
    node_flags(args).settings
}

#[test]
fn defaults_are_valid() {
    Settings::default().validate().unwrap();
    assert_eq!(Settings::from_toml("").unwrap(), Settings::default());
}

/// `deploy/hardened.toml`, which `docs/security.md` points operators to, stays a valid
/// settings file that means what its comments say.
#[test]
fn hardened_example_config_loads() {
    let text = include_str!("../../../deploy/hardened.toml");
    let s = Settings::from_toml(text).unwrap();
    s.validate().unwrap();
    assert_eq!(s.listeners.len(), 3);
    assert!(s.listeners.iter().all(|l| l.kind != ListenerKind::Tcp));
    assert_eq!(s.mqtt.allow_anonymous, Some(false));
    assert!(s.mqtt.password_file.is_some() && s.mqtt.acl_file.is_some());
    assert_eq!(s.limits.max_topic_levels, 16);
    assert_eq!(s.session.max_subscriptions, 100);
    assert!(s.cluster.tls_ca.is_some());
}

#[test]
fn file_then_overrides() {
    let s = Settings::from_toml(
        "[mqtt]\nlisten = \"127.0.0.1:2883\"\nmax_packet_size = 2048\n[storage]\npartitions = 4\n",
    )
    .unwrap();
    assert_eq!(s.mqtt.listen.port(), 2883);
    assert_eq!(s.storage.partitions, 4);
    let mut s2 = s.clone();
    flags(&["--listen", "127.0.0.1:3883"])
        .apply(&mut s2)
        .unwrap();
    assert_eq!(s2.mqtt.listen.port(), 3883);
    assert_eq!(s2.mqtt.max_packet_size, 2048);
}

#[test]
fn cluster_peers_parse_and_validate() {
    let mut c = ClusterSettings {
        node_id: 2,
        peers: vec!["1=a:7000".into(), "2=b:7000".into(), "3=c:7000".into()],
        ..ClusterSettings::default()
    };
    assert_eq!(c.peer_map().unwrap()[&2], "b:7000");
    c.validate_backend().unwrap();
    c.node_id = 4;
    assert!(c.validate_backend().is_err());
    c.peers.push("x=d:1".into());
    assert!(c.peer_map().is_err());
}

#[test]
fn a_joining_backend_needs_an_address_for_the_others() {
    let mut c = ClusterSettings {
        node_id: 4,
        join: vec!["b1:7000".into()],
        ..ClusterSettings::default()
    };
    let e = c.validate_backend().unwrap_err().to_string();
    assert!(e.contains("--advertise"), "{e}");
    c.advertise = Some("b4:7000".into());
    c.validate_backend().unwrap();
    assert_eq!(c.advertised_addr().unwrap().as_deref(), Some("b4:7000"));
    c.advertise = Some("no-port".into());
    assert!(c.validate_backend().is_err());
    c.advertise = Some("b4:7000".into());
    c.max_moves = 0;
    assert!(c.validate_backend().is_err());
    // Without --advertise, this node's --peers entry is its address.
    let c = ClusterSettings {
        node_id: 4,
        join: vec!["b1:7000".into()],
        peers: vec!["4=b4:7001".into()],
        ..ClusterSettings::default()
    };
    c.validate_backend().unwrap();
    assert_eq!(c.advertised_addr().unwrap().as_deref(), Some("b4:7001"));
}

#[test]
fn cluster_tls_all_or_none_file_then_flags() {
    let mut s = Settings::from_toml(
        "[cluster]\ntls_ca = \"ca.pem\"\ntls_cert = \"n.pem\"\ntls_key = \"n.key\"",
    )
    .unwrap();
    let files = s.cluster.tls_files().unwrap().unwrap();
    assert_eq!(files.1, Path::new("n.pem"));
    flags(&["--cluster-tls-cert", "other.pem"])
        .apply(&mut s)
        .unwrap();
    assert_eq!(s.cluster.tls_cert, Some(PathBuf::from("other.pem")));
    assert_eq!(s.cluster.tls_ca, Some(PathBuf::from("ca.pem")));
    s.validate().unwrap();
    s.cluster.tls_key = None;
    assert!(s.validate().is_err(), "two of three files is an error");
    assert_eq!(Settings::default().cluster.tls_files().unwrap(), None);
}

#[test]
fn metrics_listen_default_explicit_disabled_invalid() {
    let default = Settings::default().metrics.listen().unwrap().unwrap();
    assert_eq!(default.addr, DEFAULT_METRICS_LISTEN.parse().unwrap());
    assert!(!default.explicit);
    let s = Settings::from_toml("[metrics]\nlisten = \"127.0.0.1:0\"").unwrap();
    assert!(s.metrics.listen().unwrap().unwrap().explicit);
    let s = Settings::from_toml("[metrics]\nlisten = \"\"").unwrap();
    assert_eq!(s.metrics.listen().unwrap(), None);
    let mut s = Settings::default();
    flags(&["--metrics-listen", "localhost"])
        .apply(&mut s)
        .unwrap();
    assert!(matches!(
        s.validate(),
        Err(ConfigError::Invalid {
            name: "metrics.listen",
            ..
        })
    ));
    assert_eq!(Settings::default().mqtt.sys_interval_secs, 10);
    // The probe is off unless asked for.
    let m = &Settings::default().metrics;
    assert_eq!((m.probe_interval_secs, m.probe_timeout_secs), (0, 5));
    let s =
        Settings::from_toml("[metrics]\nprobe_interval_secs = 2\nprobe_timeout_secs = 1").unwrap();
    assert_eq!(
        (s.metrics.probe_interval_secs, s.metrics.probe_timeout_secs),
        (2, 1)
    );
}

#[test]
fn listeners_default_toml_and_flags() {
    // No listeners: one TCP listener on mqtt.listen.
    let s = Settings::default();
    assert_eq!(
        s.effective_listeners(),
        vec![ListenerSettings::new(ListenerKind::Tcp, s.mqtt.listen)]
    );
    let s = Settings::from_toml(
        "[[listeners]]\nkind = \"tcp\"\nlisten = \"0.0.0.0:1883\"\n\
         [[listeners]]\nname = \"devices\"\nkind = \"tls\"\nlisten = \"0.0.0.0:8883\"\n\
         cert = \"c.pem\"\nkey = \"k.pem\"\nca = \"ca.pem\"\n\
         [[listeners]]\nkind = \"ws\"\nlisten = \"0.0.0.0:8080\"\npath = \"/ws\"\n",
    )
    .unwrap();
    s.validate().unwrap();
    assert_eq!(s.listeners.len(), 3);
    assert_eq!(s.listeners[1].name(), "devices");
    assert!(s.listeners[1].requires_client_cert());
    assert_eq!(s.listeners[2].ws_path(), "/ws");
    assert_eq!(s.listeners[0].name(), "tcp:0.0.0.0:1883");
    // Flags add to the default TCP listener (moved by --listen).
    let s = node_flags(&[
        "--listen",
        "127.0.0.1:2883",
        "--tls-listen",
        "127.0.0.1:8883",
        "--tls-cert",
        "c.pem",
        "--tls-key",
        "k.pem",
        "--ws-listen",
        "127.0.0.1:8080",
    ])
    .load()
    .unwrap();
    let kinds: Vec<_> = s
        .listeners
        .iter()
        .map(|l| (l.kind, l.listen.port()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (ListenerKind::Tcp, 2883),
            (ListenerKind::Tls, 8883),
            (ListenerKind::Ws, 8080)
        ]
    );
    assert!(!s.listeners[1].requires_client_cert());
    // TLS files without a TLS listener.
    assert!(node_flags(&["--tls-cert", "c.pem"]).load().is_err());
}

#[test]
fn bad_listeners_are_refused() {
    let bad = [
        "kind = \"tls\"\nlisten = \"0.0.0.0:8883\"\nkey = \"k.pem\"",
        "kind = \"tls\"\nlisten = \"0.0.0.0:8883\"\ncert = \"c.pem\"",
        "kind = \"tls\"\nlisten = \"0.0.0.0:8883\"\ncert = \"c\"\nkey = \"k\"\nrequire_client_cert = true",
        "kind = \"tcp\"\nlisten = \"0.0.0.0:1883\"\ncert = \"c.pem\"",
        "kind = \"tcp\"\nlisten = \"0.0.0.0:1883\"\npath = \"/mqtt\"",
        "kind = \"ws\"\nlisten = \"0.0.0.0:8080\"\npath = \"mqtt\"",
    ];
    for b in bad {
        let s = Settings::from_toml(&format!("[[listeners]]\n{b}\n")).unwrap();
        assert!(
            matches!(
                s.validate(),
                Err(ConfigError::Invalid {
                    name: "listeners",
                    ..
                })
            ),
            "{b}"
        );
    }
    assert!(Settings::from_toml("[[listeners]]\nkind = \"quic\"\nlisten = \"0.0.0.0:1\"").is_err());
    let twice = "[[listeners]]\nkind = \"tcp\"\nlisten = \"0.0.0.0:1883\"\n\
                 [[listeners]]\nkind = \"ws\"\nlisten = \"0.0.0.0:1883\"\n";
    assert!(Settings::from_toml(twice).unwrap().validate().is_err());
}

#[test]
fn limits_from_file_env_and_listeners() {
    let d = LimitsSettings::default();
    assert_eq!((d.max_connections, d.publish_rate), (0, 0));
    let mut s = Settings::from_toml(
        "[limits]\nmax_connections = 100\nconnection_rate = 50\nmax_topic_levels = 8\n\
         [[listeners]]\nkind = \"tcp\"\nlisten = \"0.0.0.0:1883\"\nmax_connections = 10\n",
    )
    .unwrap();
    s.validate().unwrap();
    assert_eq!(s.limits.max_connections, 100);
    assert_eq!(s.limits.max_topic_levels, 8);
    assert_eq!(s.listeners[0].max_connections, Some(10));
    flags(&["--max-connections", "7", "--publish-rate", "20"])
        .apply(&mut s)
        .unwrap();
    assert_eq!((s.limits.max_connections, s.limits.publish_rate), (7, 20));
    assert_eq!(s.limits.connection_rate, 50);
    s.limits.max_topic_length = 0;
    assert!(s.validate().is_err());
}

#[test]
fn unknown_keys_and_bad_values_are_refused() {
    assert!(Settings::from_toml("[mqtt]\nlisen = \"x\"").is_err());
    assert!(Settings::from_toml("[mqtt]\nreceive_maximum = -1").is_err());
    let mut s = Settings::default();
    s.storage.partitions = 0;
    assert!(matches!(
        s.validate(),
        Err(ConfigError::Invalid {
            name: "storage.partitions",
            ..
        })
    ));
}

/// A number, a bool, an address and a list, each set by the file, then by a variable, then by
/// a flag: each layer wins over the one before it, and what a layer leaves out keeps the value
/// of the layers below (a default never hides the file).
#[test]
fn file_then_environment_then_flags() {
    let file = std::env::temp_dir().join(format!("tiermq-layers-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        "[mqtt]\nmax_packet_size = 2048\nreceive_maximum = 10\n\
         [session]\nqueue_qos0_offline = true\n\
         [cluster]\ngrpc_listen = \"127.0.0.1:7001\"\npeers = [\"1=a:7001\"]\npartitions = 8\n",
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let layers = |args: &[&str]| {
        let s = parse(&[&["--config", config], args].concat())
            .unwrap()
            .load()
            .unwrap();
        (
            s.mqtt.max_packet_size,
            s.session.queue_qos0_offline,
            s.cluster.grpc_listen.port(),
            s.cluster.peers.len(),
            (
                s.mqtt.receive_maximum,
                s.cluster.partitions,
                s.mqtt.v311_inflight,
            ),
        )
    };
    let variables = [
        ("TIERMQ_MAX_PACKET_SIZE", "4096"),
        ("TIERMQ_QUEUE_QOS0_OFFLINE", "false"),
        ("TIERMQ_GRPC_LISTEN", "127.0.0.1:7002"),
        ("TIERMQ_PEERS", "1=a:7002,2=b:7002"),
    ];
    let flags = [
        "--max-packet-size",
        "8192",
        "--queue-qos0-offline",
        "true",
        "--grpc-listen",
        "127.0.0.1:7003",
        "--peers",
        "1=a:7003,2=b:7003,3=c:7003",
    ];
    // Settings only the file sets, and one only the default sets, are the same in every case.
    let kept = (10, 8, 100);
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let file_only = layers(&[]);
    for (name, value) in variables {
        std::env::set_var(name, value);
    }
    let with_env = layers(&[]);
    let with_flags = layers(&flags);
    // A variable no flag overrides still counts.
    let one_flag = layers(&["--max-packet-size", "8192"]);
    for (name, _) in variables {
        std::env::remove_var(name);
    }
    std::fs::remove_file(&file).unwrap();
    assert_eq!(file_only, (2048, true, 7001, 1, kept));
    assert_eq!(with_env, (4096, false, 7002, 2, kept));
    assert_eq!(with_flags, (8192, true, 7003, 3, kept));
    assert_eq!(one_flag, (8192, false, 7002, 2, kept));
}

/// A bad value in a variable is refused when the command line is parsed, naming the setting's
/// flag and the value, with clap's exit code 2 (the code of every configuration error).
#[test]
fn a_bad_variable_is_a_clear_error() {
    let err = {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var("TIERMQ_MAX_PACKET_SIZE", "lots");
        let result = parse(&[]);
        std::env::remove_var("TIERMQ_MAX_PACKET_SIZE");
        result.expect_err("a bad variable is an error")
    };
    let message = err.to_string();
    assert!(message.contains("invalid value 'lots'"), "{message}");
    assert!(message.contains("--max-packet-size"), "{message}");
    assert_eq!(err.exit_code(), 2);
}

/// Every default is written once, on its field, and `--help` shows it.
#[test]
fn help_shows_the_declared_defaults() {
    let mut cmd = NodeFlags::augment_args(Command::new("tiermq"));
    let help = cmd.render_long_help().to_string();
    for shown in [
        "[default: 0.0.0.0:1883]",
        "[default: 1048576]",
        "[default: round-robin]",
        "[default: info,slog=warn]",
        "[env: TIERMQ_CLUSTER_PARTITIONS=]",
    ] {
        assert!(help.contains(shown), "{shown} missing from:\n{help}");
    }
    let d = Settings::default();
    assert_eq!(d.mqtt.listen, "0.0.0.0:1883".parse().unwrap());
    assert_eq!(
        (d.mqtt.max_packet_size, d.mqtt.max_write_buffer),
        (1 << 20, 4 << 20)
    );
    assert_eq!(d.cluster.grpc_listen.port(), 7000);
    assert_eq!(d.storage.data_dir, PathBuf::from("./data"));
    assert!(d.mqtt.retain_available && !d.session.queue_qos0_offline);
}
