use std::path::{Path, PathBuf};

use clap::error::ErrorKind;

use super::yaml::parse_str;
use super::*;

fn parse(args: &[&str]) -> Result<DaemonConfig, ConfigError> {
    parse_from(std::iter::once("vhost-plug").chain(args.iter().copied()))
}

fn ok(args: &[&str]) -> DaemonConfig {
    match parse(args) {
        Ok(cfg) => cfg,
        Err(e) => panic!("{args:?} refused: {e}"),
    }
}

/// The clap error for `args`, with its rendered text (no colours).
fn cli_err(args: &[&str]) -> (ErrorKind, String) {
    match parse(args) {
        Err(ConfigError::Cli(e)) => (e.kind(), e.render().to_string()),
        other => panic!("{args:?}: expected a clap error, got {other:?}"),
    }
}

fn vm(cid: u64, socket: &str, uds: &str) -> VmConfig {
    VmConfig::new(cid, socket, uds)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A config file with `text` in the temp dir, removed on drop.
struct TempYaml(PathBuf);

impl TempYaml {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "vhost-plug-config-test-{}-{name}.yaml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        TempYaml(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempYaml {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn yaml_ok(text: &str) -> (Vec<VmSpec>, Vec<String>) {
    match parse_str(Path::new("test.yaml"), text) {
        Ok(l) => (l.specs, l.warnings),
        Err(e) => panic!("refused: {e}\n{text}"),
    }
}

fn yaml_err(text: &str) -> ConfigError {
    match parse_str(Path::new("test.yaml"), text) {
        Ok(l) => panic!("accepted: {:?}\n{text}", l.specs),
        Err(e) => e,
    }
}

/// (field, line, column, message) of a YAML error.
fn yaml_pos(text: &str) -> (Option<String>, usize, usize, String) {
    match yaml_err(text) {
        ConfigError::Yaml {
            field,
            line,
            column,
            message,
            ..
        } => (field, line, column, message),
        other => panic!("expected a located YAML error, got {other:?}"),
    }
}

fn finish(specs: Vec<VmSpec>) -> Vec<VmConfig> {
    specs
        .into_iter()
        .map(|s| s.finish(DEFAULT_MAX_CONNECTIONS).0)
        .collect()
}

// ---- single-VM flags ----

#[test]
fn flags_minimal_use_peer_defaults() {
    let cfg = ok(&["--socket", "/tmp/v.sock", "--uds-path", "/tmp/vm.vsock"]);
    assert_eq!(cfg.vms, vec![vm(3, "/tmp/v.sock", "/tmp/vm.vsock")]);
    assert_eq!(cfg.vms[0].tx_buffer_size, 262144);
    assert_eq!(cfg.vms[0].queue_size, 1024);
    assert_eq!(cfg.vms[0].groups, vec!["default"]);
    assert_eq!(cfg.vms[0].max_connections, 16384);
    assert_eq!(cfg.log_format, LogFormat::Text);
    assert!(cfg.warnings.is_empty());
}

#[test]
fn flags_all_in_both_forms() {
    let want = VmConfig {
        guest_cid: 7,
        socket: "/s".into(),
        uds_path: "/u".into(),
        tx_buffer_size: 4096,
        queue_size: 256,
        groups: vec!["a".into(), "b".into()],
        max_connections: 10,
        plugins: Vec::new(),
        allow_routes: Vec::new(),
    };
    let spaced = ok(&[
        "--guest-cid",
        "7",
        "--socket",
        "/s",
        "--uds-path",
        "/u",
        "--tx-buffer-size",
        "4096",
        "--queue-size",
        "256",
        "--groups",
        " a+b ",
        "--max-connections",
        "10",
    ]);
    assert_eq!(spaced.vms, vec![want.clone()]);
    let equals = ok(&[
        "--guest-cid=7",
        "--socket=/s",
        "--uds-path=/u",
        "--tx-buffer-size=4096",
        "--queue-size=256",
        "--groups=a+b",
        "--max-connections=10",
    ]);
    assert_eq!(equals.vms, vec![want]);
}

#[test]
fn flags_groups_kept_literally_like_the_peer() {
    let cfg = ok(&["--socket", "/s", "--uds-path", "/u", "--groups", "a++b"]);
    assert_eq!(cfg.vms[0].groups, vec!["a", "", "b"]);
}

#[test]
fn flags_require_socket_and_uds_path() {
    let (kind, text) = cli_err(&["--uds-path", "/u"]);
    assert_eq!(kind, ErrorKind::MissingRequiredArgument);
    assert!(text.contains("--socket <PATH> is required"), "{text}");
    let (kind, text) = cli_err(&["--socket", "/s", "--guest-cid", "4"]);
    assert_eq!(kind, ErrorKind::MissingRequiredArgument);
    assert!(text.contains("--uds-path <PATH> is required"), "{text}");
    assert!(text.contains("Usage: vhost-plug"), "{text}");
}

#[test]
fn no_vm_at_all_is_an_error() {
    for args in [
        &[][..],
        &["--max-connections", "5"],
        &["--log-format", "json"],
    ] {
        let (kind, text) = cli_err(args);
        assert_eq!(kind, ErrorKind::MissingRequiredArgument);
        assert!(text.contains("no VM to serve"), "{text}");
    }
}

#[test]
fn guest_cid_range() {
    for bad in ["0", "1", "2"] {
        let (kind, text) = cli_err(&["--guest-cid", bad, "--socket", "/s", "--uds-path", "/u"]);
        assert_eq!(kind, ErrorKind::ValueValidation);
        assert!(
            text.contains(&format!(
                "guest CID {bad} is reserved (0: hypervisor, 1: local, 2: host); use 3 or more"
            )),
            "{text}"
        );
    }
    let (_, text) = cli_err(&[
        "--guest-cid",
        "4294967295",
        "--socket",
        "/s",
        "--uds-path",
        "/u",
    ]);
    assert!(
        text.contains("guest CID 4294967295 is out of range: virtio-vsock reserves the upper 32 bits and 0xffffffff means any CID; use at most 4294967294"),
        "{text}"
    );
    let (_, text) = cli_err(&["--guest-cid", "-3", "--socket", "/s", "--uds-path", "/u"]);
    assert!(text.contains("unexpected argument '-3'"), "{text}");
    let (_, text) = cli_err(&["--guest-cid=x", "--socket", "/s", "--uds-path", "/u"]);
    assert!(
        text.contains("`x` is not a non-negative integer: invalid digit found in string"),
        "{text}"
    );
    let cfg = ok(&[
        "--guest-cid",
        "4294967294",
        "--socket",
        "/s",
        "--uds-path",
        "/u",
    ]);
    assert_eq!(cfg.vms[0].guest_cid, 4294967294);
    let cfg = ok(&["--guest-cid", "+3", "--socket", "/s", "--uds-path", "/u"]);
    assert_eq!(cfg.vms[0].guest_cid, 3);
}

#[test]
fn tx_buffer_size_range() {
    let (kind, text) = cli_err(&[
        "--tx-buffer-size",
        "0",
        "--socket",
        "/s",
        "--uds-path",
        "/u",
    ]);
    assert_eq!(kind, ErrorKind::ValueValidation);
    assert!(
        text.contains("TX buffer size must be greater than 0"),
        "{text}"
    );
    let (_, text) = cli_err(&[
        "--tx-buffer-size",
        "67108865",
        "--socket",
        "/s",
        "--uds-path",
        "/u",
    ]);
    assert!(
        text.contains("TX buffer size 67108865 is too large; the limit is 67108864 (64 MiB)"),
        "{text}"
    );
    let cfg = ok(&[
        "--tx-buffer-size",
        "67108864",
        "--socket",
        "/s",
        "--uds-path",
        "/u",
    ]);
    assert_eq!(cfg.vms[0].tx_buffer_size, MAX_TX_BUFFER_SIZE);
    let cfg = ok(&[
        "--tx-buffer-size",
        "1",
        "--socket",
        "/s",
        "--uds-path",
        "/u",
    ]);
    assert_eq!(cfg.vms[0].tx_buffer_size, 1);
}

#[test]
fn queue_size_power_of_two() {
    for bad in ["0", "3", "1000", "65536", "4294967296"] {
        let (kind, text) = cli_err(&["--queue-size", bad, "--socket", "/s", "--uds-path", "/u"]);
        assert_eq!(kind, ErrorKind::ValueValidation);
        assert!(
            text.contains(&format!(
                "queue size {bad} is not a power of two between 1 and 32768"
            )),
            "{text}"
        );
    }
    for good in [1u16, 2, 256, 32768] {
        let cfg = ok(&[
            "--queue-size",
            &good.to_string(),
            "--socket",
            "/s",
            "--uds-path",
            "/u",
        ]);
        assert_eq!(cfg.vms[0].queue_size, good);
    }
}

#[test]
fn empty_paths_refused() {
    let (kind, text) = cli_err(&["--socket", "", "--uds-path", "/u"]);
    assert_eq!(kind, ErrorKind::ValueValidation);
    assert!(text.contains("path must not be empty"), "{text}");
    let (_, text) = cli_err(&["--vm", "socket=/s,uds-path="]);
    assert!(text.contains("uds-path: path must not be empty"), "{text}");
}

#[test]
fn vsock_backend_flags_refused_clearly() {
    let (kind, text) = cli_err(&["--socket", "/s", "--forward-cid", "1"]);
    assert_eq!(kind, ErrorKind::ArgumentConflict);
    assert!(
        text.contains("--forward-cid: vhost-device-vsock's vsock forwarding backend (forward-cid / forward-listen) is not supported by vhost-plug; use uds-path"),
        "{text}"
    );
    let (_, text) = cli_err(&[
        "--socket",
        "/s",
        "--forward-cid",
        "1",
        "--forward-listen",
        "9000+9001",
    ]);
    assert!(text.contains("--forward-cid: "), "{text}");
    let (_, text) = cli_err(&["--socket", "/s", "--forward-listen", "9000"]);
    assert!(text.contains("--forward-listen: "), "{text}");
    // As in the peer, uds-path and the vsock backend conflict.
    let (kind, text) = cli_err(&["--socket", "/s", "--uds-path", "/u", "--forward-cid", "1"]);
    assert_eq!(kind, ErrorKind::ArgumentConflict);
    assert!(
        text.contains("'--uds-path <PATH>' cannot be used with '--forward-cid"),
        "{text}"
    );
}

// ---- --vm ----

#[test]
fn vm_args_from_the_peer_tests() {
    // vhost-device-vsock's test_vsock_config_setup_from_vm_args_unix, in spirit.
    let cfg = ok(&[
        "--vm",
        "socket=/t/vhost3.socket,uds_path=/t/vm3.vsock",
        "--vm",
        "socket=/t/vhost4.socket,uds-path=/t/vm4.vsock,guest-cid=4,tx_buffer_size=65536,queue_size=1024,groups=group1",
        "--vm",
        "groups=group2+group3,guest-cid=5,socket=/t/vhost5.socket,uds_path=/t/vm5.vsock,tx-buffer-size=32768,queue_size=256",
    ]);
    let mut v5 = vm(5, "/t/vhost5.socket", "/t/vm5.vsock");
    v5.tx_buffer_size = 32768;
    v5.queue_size = 256;
    v5.groups = vec!["group2".into(), "group3".into()];
    let mut v4 = vm(4, "/t/vhost4.socket", "/t/vm4.vsock");
    v4.groups = vec!["group1".into()];
    v4.tx_buffer_size = 65536;
    assert_eq!(
        cfg.vms,
        vec![vm(3, "/t/vhost3.socket", "/t/vm3.vsock"), v4, v5]
    );
}

#[test]
fn vm_args_from_the_peer_readme() {
    // Sibling example of the README.
    let cfg = ok(&[
        "--vm",
        "guest-cid=3,uds-path=/tmp/vm3.vsock,socket=/tmp/vhost3.socket,groups=group1+group2",
        "--vm",
        "guest-cid=4,uds-path=/tmp/vm4.vsock,socket=/tmp/vhost4.socket,groups=group1",
    ]);
    assert_eq!(cfg.vms[0].groups, vec!["group1", "group2"]);
    assert_eq!(cfg.vms[1].groups, vec!["group1"]);
    // Multi-VM example of the README: its third VM uses the vsock backend.
    let (kind, text) = cli_err(&[
        "--vm",
        "guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,groups=group1+groupA",
        "--vm",
        "guest-cid=4,socket=/tmp/vhost4.socket,uds-path=/tmp/vm4.vsock,tx-buffer-size=32768,queue-size=256",
        "--vm",
        "guest-cid=5,socket=/tmp/vhost5.socket,forward-cid=1,forward-listen=9001+9002,tx-buffer-size=32768,queue-size=1024",
    ]);
    assert_eq!(kind, ErrorKind::ValueValidation);
    assert!(
        text.contains("forward-cid: vhost-device-vsock's vsock forwarding backend"),
        "{text}"
    );
    // Working example of the README.
    let cfg = ok(&[
        "--vm",
        "guest-cid=4,uds-path=/tmp/vm4.vsock,socket=/tmp/vhost4.socket,tx-buffer-size=65536,queue-size=1024",
    ]);
    let mut v4 = vm(4, "/tmp/vhost4.socket", "/tmp/vm4.vsock");
    v4.tx_buffer_size = 65536;
    assert_eq!(cfg.vms, vec![v4]);
}

#[test]
fn vm_arg_details() {
    // --vm=..., outer whitespace trimmed, repeated key keeps the last value, '=' in values kept,
    // max-connections in both spellings.
    let cfg = ok(&[
        "--vm= guest_cid=9,socket=/a,uds-path=/b=c,guest-cid=10,max_connections=3 ",
        "--vm",
        "socket=/c,uds-path=/d,max-connections=4,groups=",
    ]);
    assert_eq!(cfg.vms[0].guest_cid, 10);
    assert_eq!(cfg.vms[0].uds_path, PathBuf::from("/b=c"));
    assert_eq!(cfg.vms[0].max_connections, 3);
    assert_eq!(cfg.vms[1].max_connections, 4);
    assert_eq!(cfg.vms[1].groups, vec![""]);
    // One value per --vm: the stray value is taken for a subcommand next to daemon flags.
    let (kind, _) = cli_err(&["--vm", "socket=/a,uds-path=/b", "socket=/c,uds-path=/d"]);
    assert_eq!(kind, ErrorKind::ArgumentConflict);
}

#[test]
fn vm_arg_errors() {
    let cases = [
        ("", "expected key=value, found ``"),
        ("socket=/a,uds-path=/b,", "expected key=value, found ``"),
        ("socket=/a,uds-path", "expected key=value, found `uds-path`"),
        (
            "socket=/a,uds-path=/b,group=x",
            "unknown key `group` (known keys: guest-cid, socket, uds-path, tx-buffer-size, queue-size, groups, max-connections)",
        ),
        ("uds-path=/b", "missing required key `socket`"),
        ("socket=/a", "missing required key `uds-path`"),
        (
            "guest-cid=x,socket=/a,uds-path=/b",
            "guest-cid: `x` is not a non-negative integer: invalid digit found in string",
        ),
        ("guest-cid=2,socket=/a,uds-path=/b", "guest-cid: guest CID 2 is reserved"),
        ("socket=/a,uds-path=/b,tx-buffer-size=0", "tx-buffer-size: TX buffer size must be greater than 0"),
        ("socket=/a,uds-path=/b,queue_size=48", "queue_size: queue size 48 is not a power of two"),
        ("socket=/a,uds-path=/b,max-connections=0", "max-connections: max connections must be at least 1"),
        (
            "socket=/a,uds-path=/b,forward_cid=1",
            "forward_cid: vhost-device-vsock's vsock forwarding backend (forward-cid / forward-listen) is not supported by vhost-plug; use uds-path",
        ),
    ];
    for (arg, want) in cases {
        let (kind, text) = cli_err(&["--vm", arg]);
        assert_eq!(kind, ErrorKind::ValueValidation, "{arg}");
        assert!(
            text.contains(&format!(
                "invalid value '{arg}' for '--vm <KEY=VALUE,...>': {want}"
            )),
            "{arg}: {text}"
        );
    }
}

#[test]
fn vm_forward_listen_next_to_uds_path_is_ignored_with_a_warning() {
    let cfg = ok(&["--vm", "socket=/a,uds-path=/b,forward-listen=9001+9002"]);
    assert_eq!(cfg.vms, vec![vm(3, "/a", "/b")]);
    assert_eq!(
        cfg.warnings,
        vec!["--vm #1: forward-listen is ignored next to uds-path (as vhost-device-vsock does)"]
    );
}

#[test]
fn forms_conflict_like_the_peer() {
    let yaml = fixture("peer-readme-unix.yaml");
    let yaml = yaml.to_str().unwrap();
    let cases: [&[&str]; 6] = [
        &["--vm", "socket=/a,uds-path=/b", "--queue-size", "4"],
        &["--vm", "socket=/a,uds-path=/b", "--guest-cid", "4"],
        &["--vm", "socket=/a,uds-path=/b", "--config", yaml],
        &["--config", yaml, "--socket", "/s"],
        &["--config", yaml, "--groups", "a"],
        &[
            "--socket",
            "/s",
            "--uds-path",
            "/u",
            "--vm",
            "socket=/a,uds-path=/b",
        ],
    ];
    for args in cases {
        let (kind, text) = cli_err(args);
        assert_eq!(kind, ErrorKind::ArgumentConflict, "{args:?}");
        assert!(text.contains("cannot be used with"), "{text}");
    }
}

// ---- our own flags ----

#[test]
fn max_connections_default_and_override() {
    let cfg = ok(&[
        "--max-connections",
        "100",
        "--vm",
        "socket=/a,uds-path=/b",
        "--vm",
        "guest-cid=4,socket=/c,uds-path=/d,max-connections=7",
    ]);
    assert_eq!(cfg.vms[0].max_connections, 100);
    assert_eq!(cfg.vms[1].max_connections, 7);
    let (kind, text) = cli_err(&[
        "--max-connections",
        "0",
        "--socket",
        "/s",
        "--uds-path",
        "/u",
    ]);
    assert_eq!(kind, ErrorKind::ValueValidation);
    assert!(
        text.contains("max connections must be at least 1"),
        "{text}"
    );
}

#[test]
fn log_format() {
    let base = ["--socket", "/s", "--uds-path", "/u"];
    assert_eq!(ok(&base).log_format, LogFormat::Text);
    let json = [&base[..], &["--log-format", "json"]].concat();
    assert_eq!(ok(&json).log_format, LogFormat::Json);
    let text = [&["--log-format=text"][..], &base[..]].concat();
    assert_eq!(ok(&text).log_format, LogFormat::Text);
    let (kind, msg) = cli_err(&[&base[..], &["--log-format", "xml"]].concat());
    assert_eq!(kind, ErrorKind::InvalidValue);
    assert!(msg.contains("[possible values: text, json]"), "{msg}");
}

#[test]
fn help_and_version() {
    let (kind, text) = cli_err(&["--help"]);
    assert_eq!(kind, ErrorKind::DisplayHelp);
    for flag in [
        "--guest-cid",
        "--socket",
        "--uds-path",
        "--tx-buffer-size",
        "--queue-size",
        "--groups",
        "--vm",
        "--config",
        "--max-connections",
        "--log-format",
    ] {
        assert!(text.contains(flag), "{flag} missing from help:\n{text}");
    }
    assert!(!text.contains("--forward-cid"), "{text}");
    let (kind, text) = cli_err(&["--version"]);
    assert_eq!(kind, ErrorKind::DisplayVersion);
    assert!(text.starts_with("vhost-plug "), "{text}");
    match parse(&["-h"]) {
        Err(ConfigError::Cli(e)) => assert_eq!(e.exit_code(), 0),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_positional_is_refused() {
    // Not a known subcommand (ctl, plugin).
    let (kind, _) = cli_err(&["frobnicate"]);
    assert_eq!(kind, ErrorKind::InvalidSubcommand);
}

// ---- uniqueness ----

#[test]
fn duplicate_cids_refused() {
    match parse(&[
        "--vm",
        "socket=/a,uds-path=/b",
        "--vm",
        "guest-cid=3,socket=/c,uds-path=/d",
    ]) {
        Err(e @ ConfigError::DuplicateCid { cid: 3, .. }) => {
            assert_eq!(
                e.to_string(),
                "guest CID 3 is given to both --vm #1 and --vm #2"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn duplicate_paths_refused() {
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "--vm",
                "socket=/a,uds-path=/b",
                "--vm",
                "guest-cid=4,socket=/a,uds-path=/d",
            ],
            "path /a is used twice: as socket of --vm #1 and as socket of --vm #2",
        ),
        (
            &[
                "--vm",
                "socket=/a,uds-path=/b",
                "--vm",
                "guest-cid=4,socket=/c,uds-path=/tmp/../b",
            ],
            "<ok>",
        ),
        (
            &[
                "--vm",
                "socket=/a,uds-path=/x//b",
                "--vm",
                "guest-cid=4,socket=/x/b/,uds-path=/d",
            ],
            "path /x/b/ is used twice: as uds-path of --vm #1 and as socket of --vm #2",
        ),
        (
            &["--socket", "/s", "--uds-path", "/s"],
            "path /s is used twice: as --socket and as --uds-path",
        ),
    ];
    for (args, want) in cases {
        match parse(args) {
            Ok(_) if want == "<ok>" => {}
            Err(e @ ConfigError::DuplicatePath { .. }) => assert_eq!(e.to_string(), want),
            other => panic!("{args:?}: {other:?}"),
        }
    }
}

// ---- YAML ----

#[test]
fn yaml_peer_readme_example() {
    let cfg = ok(&[
        "--config",
        fixture("peer-readme-unix.yaml").to_str().unwrap(),
    ]);
    let mut v3 = vm(3, "/tmp/vhost3.socket", "/tmp/vm3.sock");
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
fn yaml_peer_readme_example_verbatim_points_at_the_vsock_backend() {
    // vhost-device-vsock itself fails on this file (it ignores `forward-cid`, then finds
    // neither uds_path nor forward_cid); we say why.
    let path = fixture("peer-readme.yaml");
    match parse(&["--config", path.to_str().unwrap()]) {
        Err(e @ ConfigError::Yaml { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "{}:17:20: vms[2].forward-cid: vhost-device-vsock's vsock forwarding backend \
                 (forward_cid / forward_listen) is not supported by vhost-plug; use uds_path",
                path.display()
            )
        ),
        other => panic!("{other:?}"),
    }
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
            "vms[0].forward_cid",
            (4, 18),
            "vhost-device-vsock's vsock forwarding backend (forward_cid / forward_listen) is not supported by vhost-plug; use uds_path",
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
    use crate::metrics::MetricsAddr;
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
