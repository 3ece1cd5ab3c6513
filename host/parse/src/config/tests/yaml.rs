//! YAML config file tests (the peer's format).
use super::*;

#[test]
fn yaml_peer_readme_example() {
    let cfg = ok(&[
        "--config",
        fixture("peer-readme-unix.yaml").to_str().unwrap(),
    ]);
    let mut v3 = vm(3, "/tmp/vhost3.socket", "/tmp/vm3.sock");
    v3.queue_size = 1024;
    v3.groups = vec!["group1".into(), "groupA".into()];
    v3.tx_buffer_size = 65536;
    let mut v4 = vm(4, "/tmp/vhost4.socket", "/tmp/vm4.sock");
    v4.tx_buffer_size = 32768;
    v4.queue_size = 256;
    v4.groups = vec!["group2".into(), "groupB".into()];
    assert_eq!(cfg.vms, vec![v3, v4]);
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
}

#[test]
fn yaml_peer_readme_example_verbatim_starts_the_vsock_backend() {
    // The README spells the vsock backend's keys with '-' (`forward-cid`), which
    // vhost-device-vsock itself ignores in files (then it finds neither uds_path nor
    // forward_cid and fails); we read them, with a warning each.
    let path = fixture("peer-readme.yaml");
    let cfg = parse(&["--config", path.to_str().unwrap()]).expect("README example");
    let mut v5 = VmConfig::forwarding(
        5,
        "/tmp/vhost5.socket",
        Forward {
            cid: 1,
            listen: vec![9001, 9002],
        },
    );
    v5.tx_buffer_size = 32768;
    v5.queue_size = 1024;
    assert_eq!(cfg.vms[2], v5);
    assert_eq!(cfg.warnings.len(), 2, "{:?}", cfg.warnings);
    assert!(cfg.warnings[0].ends_with(
        "vms[2].forward-cid is read as forward_cid (vhost-device-vsock 0.3.0 ignores fields \
         spelled with '-' in config files)"
    ));
}

#[test]
fn yaml_vsock_backend_in_the_peer_spelling() {
    let (specs, warnings) = yaml_ok(
        "vms:\n  - guest_cid: 4\n    socket: /s\n    forward_cid: 1\n    forward_listen: 9001+9002\n  - guest_cid: 5\n    socket: /t\n    forward_cid: 2\n    forward_listen: 7000\n",
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(specs[0].forward_cid, Some(1));
    assert_eq!(specs[0].forward_listen, Some(vec![9001, 9002]));
    assert_eq!(specs[0].uds_path, None);
    assert_eq!(specs[1].forward_listen, Some(vec![7000]));
}

#[test]
fn yaml_peer_test_file_and_defaults() {
    // vhost-device-vsock's test_vsock_config_setup_from_file_unix, in spirit.
    let (specs, warnings) = yaml_ok(
        "vms:
    - guest_cid: 4
      socket: /t/vhost4.socket
      uds_path: /t/vm4.vsock
      tx_buffer_size: 32768
      queue_size: 256
      groups: group1+group2",
    );
    let mut want = vm(4, "/t/vhost4.socket", "/t/vm4.vsock");
    want.tx_buffer_size = 32768;
    want.queue_size = 256;
    want.groups = vec!["group1".into(), "group2".into()];
    assert_eq!(finish(specs), vec![want]);
    assert!(warnings.is_empty());

    let (specs, _) = yaml_ok("vms:\n    - socket: /t/vhost4.socket\n      uds_path: /t/vm4.vsock");
    assert_eq!(
        finish(specs),
        vec![vm(3, "/t/vhost4.socket", "/t/vm4.vsock")]
    );
}

#[test]
fn yaml_nulls_mean_defaults_and_numbers_in_any_yaml_form() {
    let (specs, _) = yaml_ok(
        "vms:
  - guest_cid: ~
    socket: /s
    uds_path: /u
    tx_buffer_size: 0x8000
    queue_size: null
    groups:
    forward_cid: ~
    forward_listen: ~
    max_connections: 0o17",
    );
    let mut want = vm(3, "/s", "/u");
    want.tx_buffer_size = 0x8000;
    want.max_connections = 15;
    assert_eq!(finish(specs), vec![want]);
}

#[test]
fn yaml_groups_forms() {
    let (specs, _) = yaml_ok(
        "vms:
  - {socket: /a, uds_path: /b, groups: ' x+y '}
  - {guest_cid: 4, socket: /c, uds_path: /d, groups: [x, 'z w']}
  - {guest_cid: 5, socket: /e, uds_path: /f, groups: []}",
    );
    let groups: Vec<_> = finish(specs).into_iter().map(|v| v.groups).collect();
    assert_eq!(
        groups,
        vec![vec!["x", "y"], vec!["x", "z w"], Vec::<&str>::new()]
    );
}

#[test]
fn yaml_max_connections_and_global_default() {
    let f = TempYaml::new(
        "maxconn",
        "vms:\n  - {socket: /a, uds_path: /b, max_connections: 9}\n  - {guest_cid: 4, socket: /c, uds_path: /d}\n",
    );
    let cfg = ok(&[
        "--config",
        f.arg(),
        "--max-connections",
        "77",
        "--log-format",
        "json",
    ]);
    assert_eq!(cfg.vms[0].max_connections, 9);
    assert_eq!(cfg.vms[1].max_connections, 77);
    assert_eq!(cfg.log_format, LogFormat::Json);
}

#[test]
fn yaml_dashed_fields_read_with_warnings() {
    let (specs, warnings) = yaml_ok(
        "vms:
  - guest-cid: 4
    socket: /s
    uds-path: /u
    tx-buffer-size: 1024
    queue-size: 64
    max-connections: 2",
    );
    let mut want = vm(4, "/s", "/u");
    want.tx_buffer_size = 1024;
    want.queue_size = 64;
    want.max_connections = 2;
    assert_eq!(finish(specs), vec![want]);
    assert_eq!(warnings.len(), 5);
    assert_eq!(
        warnings[0],
        "test.yaml: vms[0].guest-cid is read as guest_cid (vhost-device-vsock 0.3.0 ignores \
         fields spelled with '-' in config files)"
    );
}

#[test]
fn yaml_underscore_spelling_wins_and_repeats_keep_the_last() {
    let (specs, warnings) = yaml_ok(
        "vms:
  - guest_cid: 4
    guest-cid: 5
    socket: /s
    uds-path: /x
    uds_path: /u
    queue_size: 8
    queue_size: 16",
    );
    let specs = finish(specs);
    assert_eq!(specs[0].guest_cid, 4);
    assert_eq!(specs[0].uds_path, PathBuf::from("/u"));
    assert_eq!(specs[0].queue_size, 16);
    assert_eq!(
        warnings,
        vec![
            "test.yaml: vms[0].guest-cid is ignored: guest_cid is also given",
            "test.yaml: vms[0].uds-path is read as uds_path (vhost-device-vsock 0.3.0 ignores fields spelled with '-' in config files)",
            "test.yaml: vms[0].uds-path is ignored: uds_path is also given",
            "test.yaml: vms[0].queue_size is given twice; the last value is used",
        ]
    );
}

#[test]
fn yaml_unknown_fields_ignored_with_warnings() {
    let (specs, warnings) = yaml_ok(
        "log: text
vms:
  - socket: /s
    uds_path: /u
    name: vm1
    forward_listen: 9001+9002
extra: [1, 2]",
    );
    assert_eq!(finish(specs), vec![vm(3, "/s", "/u")]);
    assert_eq!(
        warnings,
        vec![
            "test.yaml: unknown top-level key `log` is ignored",
            "test.yaml: vms[0].name: unknown field, ignored",
            "test.yaml: vms[0].forward_listen is ignored next to uds_path (as vhost-device-vsock does)",
            "test.yaml: unknown top-level key `extra` is ignored",
        ]
    );
}

#[test]
fn yaml_bad_field_location_is_exact() {
    let text = "vms:
  - guest_cid: 4
    socket: /s4
    uds_path: /u4
  - guest_cid: abc
    socket: /s5
    uds_path: /u5
";
    match yaml_err(text) {
        e @ ConfigError::Yaml { .. } => {
            assert_eq!(
                e.to_string(),
                "test.yaml:5:16: vms[1].guest_cid: invalid type: string \"abc\", expected a \
                 guest CID (a non-negative integer)"
            );
            let ConfigError::Yaml {
                path,
                field,
                line,
                column,
                ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(path, PathBuf::from("test.yaml"));
            assert_eq!(field.as_deref(), Some("vms[1].guest_cid"));
            assert_eq!((line, column), (5, 16));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn yaml_validation_errors_point_at_the_value() {
    let cases = [
        (
            "vms:\n  - guest_cid: 2\n    socket: /s\n    uds_path: /u\n",
            "vms[0].guest_cid",
            (2, 16),
            "guest CID 2 is reserved (0: hypervisor, 1: local, 2: host); use 3 or more",
        ),
        (
            "vms:\n  - guest_cid: \"4\"\n    socket: /s\n    uds_path: /u\n",
            "vms[0].guest_cid",
            (2, 16),
            "invalid type: string \"4\", expected a guest CID (a non-negative integer)",
        ),
        (
            "vms:\n  - guest_cid: -4\n    socket: /s\n    uds_path: /u\n",
            "vms[0].guest_cid",
            (2, 16),
            "invalid type: integer `-4`, expected a guest CID (a non-negative integer)",
        ),
        (
            "vms:\n  - socket: /s\n    uds_path: /u\n    tx_buffer_size: 0\n",
            "vms[0].tx_buffer_size",
            (4, 21),
            "TX buffer size must be greater than 0",
        ),
        (
            "vms:\n  - socket: /s\n    uds_path: /u\n    tx_buffer_size: 100000000\n",
            "vms[0].tx_buffer_size",
            (4, 21),
            "TX buffer size 100000000 is too large; the limit is 67108864 (64 MiB)",
        ),
        (
            "vms:\n  - socket: /s\n    uds_path: /u\n    queue_size: 100\n",
            "vms[0].queue_size",
            (4, 17),
            "queue size 100 is not a power of two between 1 and 32768",
        ),
        (
            "vms:\n  - socket: /s\n    uds_path: /u\n    max_connections: 0\n",
            "vms[0].max_connections",
            (4, 22),
            "max connections must be at least 1",
        ),
        (
            "vms:\n  - socket: ''\n    uds_path: /u\n",
            "vms[0].socket",
            (2, 13),
            "path must not be empty",
        ),
        (
            "vms:\n  - socket: /s\n    uds_path: /u\n    groups: 5\n",
            "vms[0].groups",
            (4, 13),
            "invalid type: integer `5`, expected group names joined by '+', or a list of group names",
        ),
        (
            "vms:\n  - socket: /s\n    uds_path: /u\n    forward_cid: 1\n",
            "vms[0]",
            (2, 5),
            "only one of uds-path or forward-cid can be provided",
        ),
        (
            "vms:\n  - guest_cid: 3\n    uds_path: /u\n",
            "vms[0]",
            (2, 5),
            "missing field `socket`",
        ),
        (
            "vms:\n  - socket: /s\n    forward_listen: 9000\n",
            "vms[0]",
            (2, 5),
            "missing field `uds_path`",
        ),
        (
            "vms:\n  - socket: /s\n    forward_cid: 1\n    forward_listen: 9000+x\n",
            "vms[0].forward_listen",
            (4, 21),
            "`9000+x` is not a list of ports joined by '+': `x`: invalid digit found in string",
        ),
        ("vms: []\n", "vms", (1, 6), "the list of VMs is empty"),
        (
            "vms: ~\n",
            "vms",
            (1, 6),
            "invalid type: unit value, expected a list of VMs",
        ),
        (
            "vms:\n  - /s\n",
            "vms[0]",
            (2, 5),
            "invalid type: string \"/s\", expected a mapping describing a VM",
        ),
    ];
    for (text, field, pos, message) in cases {
        let got = yaml_pos(text);
        assert_eq!(
            got,
            (Some(field.to_string()), pos.0, pos.1, message.to_string()),
            "\n{text}"
        );
    }
}

#[test]
fn yaml_document_errors() {
    // No `vms` at all.
    assert_eq!(
        yaml_pos("other: 1\n"),
        (None, 1, 1, "missing field `vms`".to_string())
    );
    // Not a mapping.
    assert_eq!(
        yaml_pos("- socket: /s\n"),
        (
            None,
            1,
            1,
            "invalid type: sequence, expected a mapping with a `vms` list".to_string()
        )
    );
    // YAML syntax error: position, the field being read when it was found.
    let e = yaml_err("vms:\n  - socket: /s\n    uds_path: /u: x\n");
    assert_eq!(
        e.to_string(),
        "test.yaml:3:17: vms[0]: mapping values are not allowed in this context"
    );
    // Empty file.
    match yaml_err("") {
        ConfigError::Yaml { message, .. } | ConfigError::ConfigFile { message, .. } => {
            assert!(message.contains("vms"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // Two documents: no position to give.
    match yaml_err("vms:\n  - {socket: /a, uds_path: /b}\n---\nfoo: 1\n") {
        e @ ConfigError::ConfigFile { .. } => assert_eq!(
            e.to_string(),
            "test.yaml: deserializing from YAML containing more than one document is not supported"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn yaml_file_errors_name_the_file() {
    let missing = std::env::temp_dir().join("vhost-plug-config-test-does-not-exist.yaml");
    match parse(&["--config", missing.to_str().unwrap()]) {
        Err(e @ ConfigError::ReadConfig { .. }) => {
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("cannot read config file {}: ", missing.display())),
                "{text}"
            );
            assert_eq!(e.exit(), ExitCode::from(2));
        }
        other => panic!("{other:?}"),
    }
    let f = TempYaml::new(
        "badfield",
        "vms:\n  - socket: /s\n    uds_path: /u\n    queue_size: 3\n",
    );
    match parse(&["--config", f.arg()]) {
        Err(e) => assert_eq!(
            e.to_string(),
            format!(
                "{}:4:17: vms[0].queue_size: queue size 3 is not a power of two between 1 and 32768",
                f.0.display()
            )
        ),
        Ok(c) => panic!("{c:?}"),
    }
}

#[test]
fn yaml_duplicates_across_vms() {
    let f = TempYaml::new(
        "dups",
        "vms:\n  - {socket: /a, uds_path: /b}\n  - {socket: /c, uds_path: /d}\n",
    );
    match parse(&["--config", f.arg()]) {
        Err(e @ ConfigError::DuplicateCid { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "guest CID 3 is given to both vms[0] in {0} and vms[1] in {0}",
                f.0.display()
            )
        ),
        other => panic!("{other:?}"),
    }
    let f = TempYaml::new(
        "dupspath",
        "vms:\n  - {socket: /a, uds_path: /b}\n  - {guest_cid: 4, socket: /c, uds_path: /a}\n",
    );
    match parse(&["--config", f.arg()]) {
        Err(e @ ConfigError::DuplicatePath { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "path /a is used twice: as socket of vms[0] in {0} and as uds_path of vms[1] in {0}",
                f.0.display()
            )
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn yaml_warnings_reach_the_daemon_config() {
    let f = TempYaml::new(
        "warn",
        "vms:\n  - {socket: /a, uds_path: /b, colour: blue}\n",
    );
    let cfg = ok(&["--config", f.arg()]);
    assert_eq!(
        cfg.warnings,
        vec![format!(
            "{}: vms[0].colour: unknown field, ignored",
            f.0.display()
        )]
    );
}

// ---- DaemonConfig built in code ----

#[test]
fn validate_configs_built_in_code() {
    let good = DaemonConfig::new(vec![vm(3, "/a", "/b"), vm(4, "/c", "/d")]);
    good.validate().unwrap();

    assert_eq!(
        DaemonConfig::new(vec![])
            .validate()
            .unwrap_err()
            .to_string(),
        "config: no VM to serve"
    );
    let mut bad = good.clone();
    bad.vms[1].guest_cid = 1;
    assert_eq!(
        bad.validate().unwrap_err().to_string(),
        "vms[1].guest_cid: guest CID 1 is reserved (0: hypervisor, 1: local, 2: host); use 3 or more"
    );
    let mut bad = good.clone();
    bad.vms[0].queue_size = 12;
    assert!(matches!(bad.validate(), Err(ConfigError::Invalid { .. })));
    let mut bad = good.clone();
    bad.vms[0].tx_buffer_size = 0;
    assert!(matches!(bad.validate(), Err(ConfigError::Invalid { .. })));
    let mut bad = good.clone();
    bad.vms[0].max_connections = 0;
    assert!(matches!(bad.validate(), Err(ConfigError::Invalid { .. })));
    let mut bad = good.clone();
    bad.vms[0].socket = PathBuf::new();
    assert!(matches!(bad.validate(), Err(ConfigError::Invalid { .. })));
    let mut bad = good.clone();
    bad.vms[1].guest_cid = 3;
    assert_eq!(
        bad.validate().unwrap_err().to_string(),
        "guest CID 3 is given to both vms[0] and vms[1]"
    );
    let mut bad = good;
    bad.vms[1].uds_path = "/a".into();
    assert_eq!(
        bad.validate().unwrap_err().to_string(),
        "path /a is used twice: as socket of vms[0] and as uds_path of vms[1]"
    );
}

#[test]
fn yaml_per_vm_plugins() {
    let (specs, _) = yaml_ok(
        "vms:
  - socket: /a
    uds_path: /b
    plugins:
      - 'policy=builtin:port-allowlist,config=allow=2:1234,2:80'
      - serializer=builtin:serializer-json
  - {guest_cid: 4, socket: /c, uds_path: /d}",
    );
    let vms = finish(specs);
    assert_eq!(vms[0].plugins.len(), 2);
    assert_eq!(vms[0].plugins[0].config, "allow=2:1234,2:80");
    assert!(vms[1].plugins.is_empty(), "no list: the global plugins");
    let (field, line, _, message) = yaml_pos(
        "vms:
  - socket: /a
    uds_path: /b
    plugins: [nonsense]",
    );
    // The field is exact; serde_yaml places errors raised while reading a list at its VM entry.
    assert_eq!(field.as_deref(), Some("vms[0].plugins"));
    assert_eq!(line, 2);
    assert!(message.contains("KIND=PATH"), "{message}");
}

#[test]
fn metrics_endpoint() {
    use crate::config::MetricsAddr;
    let base = ["--socket", "/s", "--uds-path", "/u"];
    assert_eq!(ok(&base).metrics, None);
    fn with<'a>(base: &[&'a str], v: &'a str) -> Vec<&'a str> {
        [base, &["--metrics", v]].concat()
    }
    assert_eq!(
        ok(&with(&base, "unix:/run/vp.metrics")).metrics,
        Some(MetricsAddr::Unix("/run/vp.metrics".into()))
    );
    assert_eq!(
        ok(&with(&base, "127.0.0.1:9100")).metrics,
        Some(MetricsAddr::Tcp("127.0.0.1:9100".parse().expect("addr")))
    );
    assert_eq!(
        ok(&with(&base, "[::1]:0")).metrics,
        Some(MetricsAddr::Tcp("[::1]:0".parse().expect("addr")))
    );
    let (kind, text) = cli_err(&with(&base, "0.0.0.0:9100"));
    assert_eq!(kind, ErrorKind::ValueValidation);
    assert!(
        text.contains("--metrics") && text.contains("not a loopback address"),
        "{text}"
    );
    let (_, text) = cli_err(&with(&base, "metrics.example:9100"));
    assert!(text.contains("unix:PATH or a loopback IP:PORT"), "{text}");
    assert_eq!(ok(&base).log_level, None);
    assert_eq!(
        ok(&[&base[..], &["--log-level", "info,vhost_plug=debug"]].concat())
            .log_level
            .as_deref(),
        Some("info,vhost_plug=debug")
    );
    let (kind, _) = cli_err(&[&base[..], &["--log-level", "info,[bad"]].concat());
    assert_eq!(kind, ErrorKind::ValueValidation);
    // A daemon flag: not next to a subcommand.
    assert!(parse(&[
        "--metrics",
        "127.0.0.1:9100",
        "ctl",
        "--socket",
        "/c",
        "status"
    ])
    .is_err());
}

/// The fuzz targets' entry points (`config::fuzzing`) give what the command line gives.
#[test]
fn fuzzing_entry_points_match_the_command_line() {
    let values = [
        "guest-cid=3,socket=/s3,uds-path=/u3,groups=a+b",
        "guest_cid=4,socket=/s4,uds_path=/u4,max-connections=7",
    ];
    let cli = ok(&["--vm", values[0], "--vm", values[1]]);
    assert_eq!(fuzzing::parse_vm_args(&values).unwrap(), cli.vms);
    let dup =
        fuzzing::parse_vm_args(&["socket=/s,uds-path=/u", "socket=/t,uds-path=/v"]).unwrap_err();
    assert!(dup.contains("guest CID 3"), "{dup}");

    let text = "vms:\n  - guest_cid: 5\n    socket: /s5\n    uds_path: /u5\n    queue_size: 256\n";
    let file = TempYaml::new("fuzzing", text);
    assert_eq!(
        fuzzing::parse_yaml(text).unwrap(),
        ok(&["--config", file.arg()]).vms
    );
    let empty = fuzzing::parse_yaml("vms: []\n").unwrap_err();
    assert!(empty.to_string().contains("empty"), "{empty}");
}

#[test]
fn landlock_flags() {
    let base = ["--socket", "/tmp/v.sock", "--uds-path", "/tmp/v.vsock"];
    let cfg = ok(&base);
    assert!(!cfg.landlock && cfg.landlock_rw.is_empty());
    let mut args = base.to_vec();
    args.extend([
        "--landlock",
        "--landlock-rw",
        "/var/lib/a",
        "--landlock-rw",
        "/b",
    ]);
    let cfg = ok(&args);
    assert!(cfg.landlock);
    assert_eq!(
        cfg.landlock_rw,
        [PathBuf::from("/var/lib/a"), PathBuf::from("/b")]
    );
    let mut args = base.to_vec();
    args.extend(["--landlock-rw", "/b"]);
    let (kind, text) = cli_err(&args);
    assert_eq!(kind, ErrorKind::MissingRequiredArgument, "{text}");
    assert!(text.contains("--landlock"), "{text}");
}

#[test]
fn yaml_connect_wait() {
    let f = TempYaml::new(
        "connwait",
        "vms:\n  - {socket: /a, uds_path: /b, connect_wait: 3s}\n  - {guest_cid: 4, socket: /c, uds_path: /d, connect_wait: null}\n",
    );
    let cfg = ok(&["--config", f.arg()]);
    assert_eq!(
        cfg.vms[0].connect_wait,
        Some(std::time::Duration::from_secs(3))
    );
    assert_eq!(cfg.vms[1].connect_wait, None);
    let bad = TempYaml::new(
        "connwait-bad",
        "vms:\n  - {socket: /a, uds_path: /b, connect_wait: 3}\n",
    );
    let e = parse_from(["vhost-plug", "--config", bad.arg()]).expect_err("no unit");
    assert!(e.to_string().contains("needs a unit"), "{e}");
}
