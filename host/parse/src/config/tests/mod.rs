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
    assert_eq!(cfg.vms[0].queue_size, 32768);
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
        connect_wait: None,
        forward: None,
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
    assert!(
        text.contains("--uds-path <PATH> (or --forward-cid <CID>) is required"),
        "{text}"
    );
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

fn fwd(cid: u64, socket: &str, fcid: u32, listen: &[u32]) -> VmConfig {
    VmConfig::forwarding(
        cid,
        socket,
        Forward {
            cid: fcid,
            listen: listen.to_vec(),
        },
    )
}

#[test]
fn vsock_backend_flags_as_the_peer() {
    // The peer's README command lines.
    let cfg = ok(&["--guest-cid", "4", "--socket", "/s", "--forward-cid", "1"]);
    assert_eq!(cfg.vms, vec![fwd(4, "/s", 1, &[])]);
    let cfg = ok(&[
        "--socket",
        "/s",
        "--forward-cid",
        "1",
        "--forward-listen",
        "9000+9001",
    ]);
    assert_eq!(cfg.vms, vec![fwd(3, "/s", 1, &[9000, 9001])]);
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    // --forward-listen alone: nowhere to send the guest's connections.
    let (kind, text) = cli_err(&["--socket", "/s", "--forward-listen", "9000"]);
    assert_eq!(kind, ErrorKind::MissingRequiredArgument);
    assert!(
        text.contains("--forward-listen needs --forward-cid"),
        "{text}"
    );
    // Neither backend.
    let (_, text) = cli_err(&["--socket", "/s"]);
    assert!(
        text.contains("--uds-path <PATH> (or --forward-cid <CID>) is required"),
        "{text}"
    );
    // As in the peer, uds-path and the vsock backend conflict.
    let (kind, text) = cli_err(&["--socket", "/s", "--uds-path", "/u", "--forward-cid", "1"]);
    assert_eq!(kind, ErrorKind::ArgumentConflict);
    assert!(
        text.contains("'--uds-path <PATH>' cannot be used with '--forward-cid"),
        "{text}"
    );
    let (kind, _) = cli_err(&[
        "--socket",
        "/s",
        "--uds-path",
        "/u",
        "--forward-listen",
        "1",
    ]);
    assert_eq!(kind, ErrorKind::ArgumentConflict);
}

#[test]
fn malformed_forward_listen_is_a_clear_error() {
    // The peer panics on these (`unwrap` on the parse of each item).
    for (value, want) in [
        (
            "9001+x",
            "`9001+x` is not a list of ports joined by '+': `x`",
        ),
        ("9001+", "`9001+` is not a list of ports joined by '+': ``"),
        ("", "`` is not a list of ports joined by '+': ``"),
        ("-1", "`-1` is not a list of ports joined by '+': `-1`"),
        (
            "4294967296",
            "`4294967296` is not a list of ports joined by '+'",
        ),
        (
            "4294967295",
            "port 4294967295 means any port and cannot be listened on",
        ),
        ("9001+9001", "port 9001 is listed twice"),
    ] {
        let flag = format!("--forward-listen={value}");
        let (kind, text) = cli_err(&["--socket", "/s", "--forward-cid", "1", &flag]);
        assert_eq!(kind, ErrorKind::ValueValidation, "{value}");
        assert!(text.contains(want), "{value}: {text}");
        let arg = format!("socket=/s,forward-cid=1,forward-listen={value}");
        let (_, text) = cli_err(&["--vm", &arg]);
        assert!(
            text.contains(&format!("forward-listen: {want}")),
            "{value}: {text}"
        );
    }
    let (_, text) = cli_err(&["--socket", "/s", "--forward-cid", "4294967295"]);
    assert!(
        text.contains("forward CID 4294967295 means any CID"),
        "{text}"
    );
    let (_, text) = cli_err(&["--socket", "/s", "--forward-cid", "x"]);
    assert!(text.contains("`x` is not a non-negative integer"), "{text}");
}

#[test]
fn two_vms_cannot_listen_on_one_forward_port() {
    let e = parse(&[
        "--vm",
        "guest-cid=3,socket=/a,forward-cid=1,forward-listen=9001+9002",
        "--vm",
        "guest-cid=4,socket=/b,forward-cid=1,forward-listen=9002",
    ])
    .expect_err("duplicate port");
    assert_eq!(
        e.to_string(),
        "host vsock port 9002 is listened on by both forward-listen of --vm #1 and \
         forward-listen of --vm #2"
    );
    // Forwarding VMs have no hybrid socket, so no path clash between them.
    let cfg = ok(&[
        "--vm",
        "guest-cid=3,socket=/a,forward-cid=1",
        "--vm",
        "guest-cid=4,socket=/b,forward-cid=1",
    ]);
    assert_eq!(cfg.vms, vec![fwd(3, "/a", 1, &[]), fwd(4, "/b", 1, &[])]);
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
    v4.queue_size = 1024;
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
    let cfg = ok(&[
        "--vm",
        "guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,groups=group1+groupA",
        "--vm",
        "guest-cid=4,socket=/tmp/vhost4.socket,uds-path=/tmp/vm4.vsock,tx-buffer-size=32768,queue-size=256",
        "--vm",
        "guest-cid=5,socket=/tmp/vhost5.socket,forward-cid=1,forward-listen=9001+9002,tx-buffer-size=32768,queue-size=1024",
    ]);
    let mut v5 = fwd(5, "/tmp/vhost5.socket", 1, &[9001, 9002]);
    v5.tx_buffer_size = 32768;
    v5.queue_size = 1024;
    assert_eq!(cfg.vms[2], v5);
    assert_eq!(cfg.vms[0].forward, None);
    // Working example of the README.
    let cfg = ok(&[
        "--vm",
        "guest-cid=4,uds-path=/tmp/vm4.vsock,socket=/tmp/vhost4.socket,tx-buffer-size=65536,queue-size=1024",
    ]);
    let mut v4 = vm(4, "/tmp/vhost4.socket", "/tmp/vm4.vsock");
    v4.tx_buffer_size = 65536;
    v4.queue_size = 1024;
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
fn connect_wait_per_vm() {
    // Off by default (drop-in); `0` is off too.
    let cfg = ok(&[
        "--vm",
        "socket=/a,uds-path=/b,connect-wait=5s",
        "--vm",
        "guest-cid=4,socket=/c,uds-path=/d,connect_wait=250ms",
        "--vm",
        "guest-cid=5,socket=/e,uds-path=/f,connect-wait=0",
        "--vm",
        "guest-cid=6,socket=/g,uds-path=/h",
    ]);
    let waits: Vec<_> = cfg.vms.iter().map(|v| v.connect_wait).collect();
    assert_eq!(
        waits,
        [
            Some(std::time::Duration::from_secs(5)),
            Some(std::time::Duration::from_millis(250)),
            None,
            None
        ]
    );
}

#[test]
fn vm_arg_errors() {
    let cases = [
        ("", "expected key=value, found ``"),
        ("socket=/a,uds-path=/b,", "expected key=value, found ``"),
        ("socket=/a,uds-path", "expected key=value, found `uds-path`"),
        (
            "socket=/a,uds-path=/b,group=x",
            "unknown key `group` (known keys: guest-cid, socket, uds-path, forward-cid, forward-listen, tx-buffer-size, queue-size, groups, max-connections, connect-wait)",
        ),
        ("uds-path=/b", "missing required key `socket`"),
        ("socket=/a", "missing required key `uds-path` (or `forward-cid`)"),
        ("socket=/a,forward-listen=1", "missing required key `uds-path` (or `forward-cid`)"),
        (
            "guest-cid=x,socket=/a,uds-path=/b",
            "guest-cid: `x` is not a non-negative integer: invalid digit found in string",
        ),
        ("guest-cid=2,socket=/a,uds-path=/b", "guest-cid: guest CID 2 is reserved"),
        ("socket=/a,uds-path=/b,tx-buffer-size=0", "tx-buffer-size: TX buffer size must be greater than 0"),
        ("socket=/a,uds-path=/b,queue_size=48", "queue_size: queue size 48 is not a power of two"),
        ("socket=/a,uds-path=/b,max-connections=0", "max-connections: max connections must be at least 1"),
        ("socket=/a,uds-path=/b,connect-wait=5", "connect-wait: `5` needs a unit: ms, s or m (e.g. 5s)"),
        ("socket=/a,uds-path=/b,connect_wait=1h", "connect_wait: `1h`: unknown unit `h` (ms, s or m)"),
        (
            "socket=/a,uds-path=/b,forward_cid=1",
            "only one of uds-path or forward-cid can be provided",
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
    assert!(text.contains("--forward-cid"), "{text}");
    assert!(text.contains("--forward-listen"), "{text}");
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

mod yaml;

#[test]
fn allow_route_vsock_entries() {
    let cfg = ok(&[
        "--vm",
        "guest-cid=3,socket=/run/a.sock,uds-path=/run/a.vsock",
        "--allow-route",
        "vsock:1:5201",
        "--allow-route",
        "vsock:16:*",
    ]);
    assert_eq!(
        cfg.allow_routes,
        vec![
            RouteSpec::Vsock("1:5201".into()),
            RouteSpec::Vsock("16:*".into())
        ]
    );
    for bad in [
        "vsock:1",
        "vsock:x:1",
        "vsock:4294967295:1",
        "vsock:1:-2",
        "vsock:",
    ] {
        let (kind, text) = cli_err(&[
            "--vm",
            "guest-cid=3,socket=/run/a.sock,uds-path=/run/a.vsock",
            "--allow-route",
            bad,
        ]);
        assert_eq!(kind, ErrorKind::ValueValidation, "{bad}: {text}");
        assert!(text.contains("not CID:PORT"), "{bad}: {text}");
    }
}
