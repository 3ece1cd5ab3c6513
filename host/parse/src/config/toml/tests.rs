use super::*;
use crate::config::{parse_from, DaemonConfig, DEFAULT_MAX_CONNECTIONS};

/// Where the test configs pretend to live (relative paths resolve against `/etc/vp`).
const FILE: &str = "/etc/vp/vhost-plug.toml";

fn parse(text: &str) -> Result<Loaded, ConfigError> {
    parse_str(Path::new(FILE), text)
}

/// The (field, line, column, message) of the error `text` gives; checks the file is named.
fn err(text: &str) -> (Option<String>, usize, usize, String) {
    match parse(text) {
        Err(e @ ConfigError::Toml { .. }) => {
            let shown = e.to_string();
            let ConfigError::Toml {
                path,
                field,
                line,
                column,
                message,
            } = e
            else {
                unreachable!()
            };
            assert_eq!(path, Path::new(FILE));
            assert!(
                shown.starts_with(&format!("{FILE}:{line}:{column}: ")),
                "{shown}"
            );
            (field, line, column, message)
        }
        Err(e) => panic!("expected a TOML error, got {e:?}"),
        Ok(l) => panic!("accepted: {l:?}\n{text}"),
    }
}

/// Asserts the error of `text` is at `field`, `line` and contains `needle`.
#[track_caller]
fn assert_err(text: &str, field: &str, line: usize, needle: &str) {
    let (f, l, _, m) = err(text);
    assert_eq!(f.as_deref(), Some(field), "field of: {m}");
    assert_eq!(l, line, "line of: {m}");
    assert!(m.contains(needle), "`{m}` lacks `{needle}`");
}

const ONE_VM: &str = "[[vm]]\nsocket = '/run/a.sock'\nuds-path = '/run/a.vsock'\n";

#[test]
fn the_example_file_parses() {
    let text = include_str!("../../../../../examples/vhost-plug.toml");
    let l = parse(text).expect("examples/vhost-plug.toml");
    assert_eq!(
        l.control_socket.as_deref(),
        Some(Path::new("/run/vhost-plug/control.sock"))
    );
    assert_eq!(
        l.plugin_cache.as_deref(),
        Some(Path::new("/var/cache/vhost-plug"))
    );
    assert_eq!(l.max_connections, Some(4096));
    assert_eq!(l.max_buffered, Some(256 << 20));
    assert_eq!(
        l.allow_routes,
        vec![
            RouteSpec::UnixDir("/run/vsock-services".into()),
            RouteSpec::Tcp("127.0.0.1:8080".into()),
            RouteSpec::Tcp("127.0.0.1:*".into()),
        ]
    );
    assert_eq!(
        l.plugins,
        vec![
            PluginSpec::builtin(PluginKind::Policy, "allow-group", ""),
            PluginSpec::builtin(PluginKind::Policy, "audit", ""),
            PluginSpec::builtin(PluginKind::Serializer, "serializer-postcard", ""),
        ]
    );
    assert_eq!(l.specs.len(), 2);
    let (a, b) = (&l.specs[0], &l.specs[1]);
    assert_eq!(a.guest_cid, Some(3));
    assert_eq!(
        a.socket.as_deref(),
        Some(Path::new("/run/vhost-plug/vm3.socket"))
    );
    assert_eq!(a.tx_buffer_size, Some(65536));
    assert_eq!(a.queue_size, Some(1024));
    assert_eq!(a.groups, Some(vec!["web".to_string()]));
    assert_eq!(a.plugins, None);
    assert!(a.allow_routes.is_empty());
    assert_eq!(b.guest_cid, Some(4));
    assert_eq!(b.max_connections, Some(256));
    assert_eq!(
        b.allow_routes,
        vec![RouteSpec::Tcp("127.0.0.1:5432".into())]
    );
    assert_eq!(
        b.plugins,
        Some(vec![
            PluginSpec::builtin(
                PluginKind::Policy,
                "port-allowlist",
                "allow=2:5432;rate=20;burst=40"
            ),
            PluginSpec::builtin(PluginKind::Bridge, "tcp-bridge", "map=5432=127.0.0.1:5432"),
        ])
    );
}

#[test]
fn the_systemd_sample_config_parses() {
    let text = include_str!("../../../../../examples/systemd/vhost-plug.toml");
    let l = parse(text).expect("examples/systemd/vhost-plug.toml");
    // Everything the service writes is inside its RuntimeDirectory and CacheDirectory.
    assert_eq!(
        l.control_socket.as_deref(),
        Some(Path::new("/run/vhost-plug/control.sock"))
    );
    assert_eq!(
        l.plugin_cache.as_deref(),
        Some(Path::new("/var/cache/vhost-plug"))
    );
    for vm in &l.specs {
        for p in [&vm.socket, &vm.uds_path] {
            assert!(p
                .as_deref()
                .is_some_and(|p| p.starts_with("/run/vhost-plug")));
        }
    }
}

#[test]
fn minimal_file_takes_the_defaults() {
    let l = parse(ONE_VM).expect("one VM");
    assert!(l.plugins.is_empty() && l.allow_routes.is_empty());
    assert_eq!(
        (l.control_socket, l.plugin_cache, l.max_connections),
        (None, None, None)
    );
    assert_eq!(l.specs.len(), 1);
    let (vm, warnings) = l
        .specs
        .into_iter()
        .next()
        .unwrap()
        .finish(DEFAULT_MAX_CONNECTIONS);
    assert!(warnings.is_empty());
    assert_eq!(
        vm,
        crate::config::VmConfig::new(3, "/run/a.sock", "/run/a.vsock")
    );
}

#[test]
fn relative_paths_are_relative_to_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("plugins")).expect("mkdir");
    std::fs::write(dir.path().join("plugins/p.wasm"), b"\0asm").expect("write");
    let text = "control-socket = 'ctl.sock'\nplugin-cache = 'cache'\n\
                [plugins]\npolicy = [{ path = 'plugins/p.wasm', config = 'a=1' }]\n\
                [[vm]]\nsocket = 'vm3.sock'\nuds-path = '/abs/vm3.vsock'\n";
    let file = dir.path().join("c.toml");
    let l = parse_str(&file, text).expect("parses");
    assert_eq!(l.control_socket, Some(dir.path().join("ctl.sock")));
    assert_eq!(l.plugin_cache, Some(dir.path().join("cache")));
    assert_eq!(l.specs[0].socket, Some(dir.path().join("vm3.sock")));
    assert_eq!(
        l.specs[0].uds_path.as_deref(),
        Some(Path::new("/abs/vm3.vsock"))
    );
    assert_eq!(
        l.plugins,
        vec![PluginSpec {
            kind: PluginKind::Policy,
            source: PluginSource::Path(dir.path().join("plugins/p.wasm")),
            name: None,
            config: "a=1".into(),
        }]
    );
}

#[test]
fn syntax_errors_have_a_position_and_no_field() {
    let (field, line, column, message) = err(&format!("{ONE_VM}[routes\n"));
    assert_eq!((field, line), (None, 4));
    assert!(column >= 1);
    assert!(!message.is_empty());
}

#[test]
fn schema_errors_name_field_and_line() {
    assert_err("foo = 1\n", "foo", 1, "unknown field `foo`");
    assert_err(
        &format!("{ONE_VM}bogus = 1\n"),
        "vm[0].bogus",
        4,
        "unknown field `bogus`",
    );
    assert_err(
        &format!("{ONE_VM}[[vm]]\nguest-cid = 'x'\nsocket = '/b'\nuds-path = '/c'\n"),
        "vm[1].guest-cid",
        5,
        "expected u64",
    );
    assert_err(
        &format!("{ONE_VM}[[vm]]\nguest-cid = -4\nsocket = '/b'\nuds-path = '/c'\n"),
        "vm[1].guest-cid",
        5,
        "-4",
    );
    assert_err(
        "[[vm]]\nuds-path = '/b'\n",
        "vm[0]",
        1,
        "missing field `socket`",
    );
    assert_err(
        &format!("[limits]\nmax-connections = 'many'\n{ONE_VM}"),
        "limits.max-connections",
        2,
        "expected u64",
    );
    assert_err(
        &format!("{ONE_VM}[vm.plugins]\npolicy = {{ builtin = 'audit' }}\n"),
        "vm[0].plugins.policy",
        5,
        "expected a sequence",
    );
    assert_err(
        &format!("{ONE_VM}plugins = {{ policy = [{{ builtin = 'audit', bogus = 1 }}] }}\n"),
        "vm[0].plugins.policy[0].bogus",
        4,
        "unknown field `bogus`",
    );
    assert_err(
        &format!("[routes]\ntcp = [1]\n{ONE_VM}"),
        "routes.tcp[0]",
        2,
        "string",
    );
    assert_err("", "vm", 1, "no VM to serve");
    assert_err("vm = []\n", "vm", 1, "no VM to serve");
}

#[test]
fn value_rules_name_field_and_line() {
    let vm_with = |extra: &str| format!("{ONE_VM}{extra}\n");
    assert_err(&vm_with("guest-cid = 2"), "vm[0].guest-cid", 4, "reserved");
    assert_err(
        &vm_with("guest-cid = 4294967295"),
        "vm[0].guest-cid",
        4,
        "out of range",
    );
    assert_err(
        &vm_with("tx-buffer-size = 0"),
        "vm[0].tx-buffer-size",
        4,
        "greater than 0",
    );
    assert_err(
        &vm_with("queue-size = 1000"),
        "vm[0].queue-size",
        4,
        "power of two",
    );
    assert_err(
        &vm_with("max-connections = 0"),
        "vm[0].max-connections",
        4,
        "at least 1",
    );
    assert_err(
        &format!("[limits]\nmax-connections = 0\n{ONE_VM}"),
        "limits.max-connections",
        2,
        "at least 1",
    );
    assert_err(
        "[[vm]]\nsocket = ''\nuds-path = '/u'\n",
        "vm[0].socket",
        2,
        "must not be empty",
    );
}

#[test]
fn duplicate_cids_and_paths_point_at_the_second() {
    let two = |a: &str, b: &str| format!("[[vm]]\n{a}\n[[vm]]\n{b}\n");
    let (field, line, _, message) = err(&two(
        "guest-cid = 5\nsocket = '/s5'\nuds-path = '/u5'",
        "guest-cid = 5\nsocket = '/s6'\nuds-path = '/u6'",
    ));
    assert_eq!((field.as_deref(), line), (Some("vm[1].guest-cid"), 6));
    assert!(
        message.contains("guest CID 5 is already given to vm[0]"),
        "{message}"
    );
    // Both default to CID 3: the error points at the second VM's socket.
    assert_err(
        &two(
            "socket = '/s5'\nuds-path = '/u5'",
            "socket = '/s6'\nuds-path = '/u6'",
        ),
        "vm[1]",
        5,
        "guest CID 3 is already given",
    );
    assert_err(
        &two(
            "guest-cid = 5\nsocket = '/s'\nuds-path = '/u5'",
            "guest-cid = 6\nsocket = '/s6'\nuds-path = '/s'",
        ),
        "vm[1].uds-path",
        8,
        "already used as vm[0].socket (line 3)",
    );
    assert_err(
        &format!("control-socket = '/run/a.sock'\n{ONE_VM}"),
        "vm[0].socket",
        3,
        "already used as control-socket (line 1)",
    );
    // Paths compare after resolution: `a.sock` next to the file is `/etc/vp/a.sock`.
    assert_err(
        "[[vm]]\nguest-cid = 3\nsocket = 'a.sock'\nuds-path = '/u3'\n\
         [[vm]]\nguest-cid = 4\nsocket = '/etc/vp/a.sock'\nuds-path = '/u4'\n",
        "vm[1].socket",
        7,
        "/etc/vp/a.sock is already used",
    );
}

#[test]
fn bad_routes_are_refused_where_written() {
    assert_err(
        &format!("[routes]\nunix = ['/ok', 'rel/dir']\n{ONE_VM}"),
        "routes.unix[1]",
        2,
        "must be absolute",
    );
    assert_err(
        &format!("[routes]\nunix = ['/a/../b']\n{ONE_VM}"),
        "routes.unix[0]",
        2,
        "..",
    );
    assert_err(
        &format!("[routes]\ntcp = ['127.0.0.1']\n{ONE_VM}"),
        "routes.tcp[0]",
        2,
        "HOST:PORT",
    );
    assert_err(
        &format!("{ONE_VM}routes = {{ tcp = ['127.0.0.1:99999'] }}\n"),
        "vm[0].routes.tcp[0]",
        4,
        "not HOST:PORT",
    );
    assert_err(
        &format!("[routes]\nvsock = ['1:5000', '1']\n{ONE_VM}"),
        "routes.vsock[1]",
        2,
        "not CID:PORT",
    );
    assert_err(
        &format!("{ONE_VM}routes = {{ vsock = ['4294967295:1'] }}\n"),
        "vm[0].routes.vsock[0]",
        4,
        "not CID:PORT",
    );
    let l = parse(&format!(
        "[routes]\ntcp = ['localhost:22']\nvsock = ['1:5000']\n{ONE_VM}routes = {{ unix = ['/srv'], tcp = ['[::1]:*'], vsock = ['16:*'] }}\n"
    ))
    .expect("good routes");
    assert_eq!(
        l.allow_routes,
        vec![
            RouteSpec::Tcp("localhost:22".into()),
            RouteSpec::Vsock("1:5000".into())
        ]
    );
    assert_eq!(
        l.specs[0].allow_routes,
        vec![
            RouteSpec::UnixDir("/srv".into()),
            RouteSpec::Tcp("[::1]:*".into()),
            RouteSpec::Vsock("16:*".into())
        ]
    );
}

#[test]
fn plugin_entries_are_checked() {
    let with = |plugins: &str| format!("{ONE_VM}[vm.plugins]\n{plugins}\n");
    assert_err(
        &with("policy = [{ builtin = 'audit' }, { path = 'missing.wasm' }]"),
        "vm[0].plugins.policy[1].path",
        5,
        "plugin file /etc/vp/missing.wasm",
    );
    assert_err(
        &with("policy = [{ path = '/' }]"),
        "vm[0].plugins.policy[0].path",
        5,
        "is not a file",
    );
    assert_err(
        &with("bridge = { builtin = 'nope' }"),
        "vm[0].plugins.bridge.builtin",
        5,
        "no built-in plugin `nope` (built in: allow-group,",
    );
    assert_err(
        &with("serializer = { path = 'a.wasm', builtin = 'serializer-json' }"),
        "vm[0].plugins.serializer",
        5,
        "exactly one of `path`",
    );
    assert_err(
        &with("policy = [{ config = 'x' }]"),
        "vm[0].plugins.policy[0]",
        5,
        "exactly one of `path`",
    );
    assert_err(&with("policy = []"), "vm[0].plugins", 4, "names no plugin");
    assert_err(
        &with("policy = [{ builtin = 'audit' }, { builtin = 'audit' }]"),
        "vm[0].plugins.policy[1]",
        5,
        "a second plugin named `audit`",
    );
    assert_err(
        &with("policy = [{ builtin = 'audit', name = 'a,b' }]"),
        "vm[0].plugins.policy[0].name",
        5,
        "without ','",
    );
    // Two instances of one plugin are fine with distinct names, in chain order.
    let l = parse(&with(
        "policy = [{ builtin = 'audit', name = 'one' }, { builtin = 'audit', name = 'two' }]\n\
         serializer = { builtin = 'serializer-json' }",
    ))
    .expect("named twice");
    let plugins = l.specs[0].plugins.as_ref().expect("own plugins");
    let names: Vec<_> = plugins.iter().map(PluginSpec::name).collect();
    assert_eq!(names, ["one", "two", "serializer-json"]);
}

/// A TOML file on disk, through the command line.
fn cli(dir: &Path, text: &str, extra: &[&str]) -> Result<DaemonConfig, ConfigError> {
    let file = dir.join("daemon.TOML");
    std::fs::write(&file, text).expect("write config");
    let file = file.to_str().expect("utf-8 temp path");
    let args = ["vhost-plug", "--config", file]
        .into_iter()
        .chain(extra.iter().copied());
    parse_from(args)
}

#[test]
fn max_buffered_from_the_file_and_from_the_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!("[limits]\nmax-buffered = 1048576\n{ONE_VM}");
    let cfg = cli(dir.path(), &text, &[]).expect("file alone");
    assert_eq!(cfg.max_buffered, 1 << 20);
    let cfg = cli(dir.path(), &text, &["--max-buffered", "64M"]).expect("flag wins");
    assert_eq!(cfg.max_buffered, 64 << 20);
    let cfg = cli(dir.path(), ONE_VM, &["--max-buffered", "2g"]).expect("suffix");
    assert_eq!(cfg.max_buffered, 2 << 30);
    let cfg = cli(dir.path(), ONE_VM, &[]).expect("default");
    assert_eq!(cfg.max_buffered, crate::config::DEFAULT_MAX_BUFFERED);
    for bad in ["1000", "x", "4096T", "99999999999999999999G"] {
        assert!(
            cli(dir.path(), ONE_VM, &["--max-buffered", bad]).is_err(),
            "--max-buffered {bad}"
        );
    }
    let text = format!("[limits]\nmax-buffered = 10\n{ONE_VM}");
    let err = cli(dir.path(), &text, &[]).expect_err("below one page");
    assert!(err.to_string().contains("limits.max-buffered"), "{err}");
}

#[test]
fn command_line_loads_the_file_and_its_flags_win() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = "control-socket = 'ctl.sock'\n\
                [limits]\nmax-connections = 100\n\
                [routes]\nunix = ['/srv']\n\
                [plugins]\npolicy = [{ builtin = 'audit' }]\n\
                [[vm]]\nsocket = '/s3'\nuds-path = '/u3'\n\
                [[vm]]\nguest-cid = 4\nsocket = '/s4'\nuds-path = '/u4'\nmax-connections = 7\n\
                routes = { unix = ['/srv4'] }\n";
    let cfg = cli(dir.path(), text, &[]).expect("file alone");
    assert_eq!(cfg.vms.len(), 2);
    assert_eq!(cfg.vms[0].max_connections, 100);
    assert_eq!(cfg.vms[1].max_connections, 7);
    assert_eq!(
        cfg.vms[1].allow_routes,
        vec![RouteSpec::UnixDir("/srv4".into())]
    );
    assert_eq!(cfg.control_socket, Some(dir.path().join("ctl.sock")));
    assert_eq!(cfg.allow_routes, vec![RouteSpec::UnixDir("/srv".into())]);
    assert_eq!(
        cfg.plugins,
        vec![PluginSpec::builtin(PluginKind::Policy, "audit", "")]
    );
    assert!(cfg.warnings.is_empty());
    cfg.validate().expect("a valid config");

    let cfg = cli(
        dir.path(),
        text,
        &[
            "--max-connections",
            "9",
            "--control-socket",
            "/other.sock",
            "--plugin",
            "policy=builtin:allow-group",
            "--allow-route",
            "tcp:127.0.0.1:80",
        ],
    )
    .expect("file and flags");
    assert_eq!(cfg.vms[0].max_connections, 9);
    assert_eq!(cfg.vms[1].max_connections, 7);
    assert_eq!(
        cfg.control_socket.as_deref(),
        Some(Path::new("/other.sock"))
    );
    assert_eq!(
        cfg.plugins,
        vec![PluginSpec::builtin(PluginKind::Policy, "allow-group", "")]
    );
    assert_eq!(
        cfg.allow_routes,
        vec![
            RouteSpec::UnixDir("/srv".into()),
            RouteSpec::Tcp("127.0.0.1:80".into())
        ]
    );

    // Errors keep the file's name as given on the command line.
    match cli(dir.path(), "[[vm]]\nsocket = 3\n", &[]) {
        Err(ConfigError::Toml {
            path, field, line, ..
        }) => {
            assert_eq!(path, dir.path().join("daemon.TOML"));
            assert_eq!((field.as_deref(), line), (Some("vm[0].socket"), 2));
        }
        other => panic!("expected a TOML error, got {other:?}"),
    }
    // VM flags and a config file exclude each other, as with YAML.
    assert!(cli(dir.path(), text, &["--vm", "socket=/a,uds-path=/b"]).is_err());
}

#[test]
fn only_the_toml_extension_selects_toml() {
    assert!(is_toml(Path::new("a.toml")));
    assert!(is_toml(Path::new("/x/a.Toml")));
    assert!(!is_toml(Path::new("a.yaml")));
    assert!(!is_toml(Path::new("a.yml")));
    assert!(!is_toml(Path::new("toml")));
    // A YAML file still goes through the YAML reader (its unknown keys are warnings).
    let dir = tempfile::tempdir().expect("temp dir");
    let yaml = dir.path().join("vms.yaml");
    std::fs::write(
        &yaml,
        "vms:\n  - socket: /s\n    uds_path: /u\n    extra: 1\n",
    )
    .expect("w");
    let cfg =
        parse_from(["vhost-plug", "--config", yaml.to_str().expect("utf-8")]).expect("YAML config");
    assert_eq!(cfg.vms.len(), 1);
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
}

#[test]
fn sandbox_table() {
    let l = parse(ONE_VM).expect("one VM");
    assert!(!l.landlock && l.landlock_rw.is_empty());
    let text = format!("[sandbox]\nlandlock = true\nwritable = ['state', '/srv/x']\n{ONE_VM}");
    let l = parse(&text).expect("sandbox");
    assert!(l.landlock);
    assert_eq!(
        l.landlock_rw,
        [PathBuf::from("/etc/vp/state"), PathBuf::from("/srv/x")]
    );
    assert_err(
        &format!("[sandbox]\nwritable = ['/srv/x']\n{ONE_VM}"),
        "sandbox.writable",
        2,
        "landlock = true",
    );
    assert_err(
        &format!("[sandbox]\nlandlock = 'yes'\n{ONE_VM}"),
        "sandbox.landlock",
        2,
        "",
    );
    // The file's sandbox reaches the daemon config; the command line adds directories.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vp.toml");
    std::fs::write(&path, format!("[sandbox]\nlandlock = true\n{ONE_VM}")).unwrap();
    let p = path.display().to_string();
    let args = ["vhost-plug", "--config", &p, "--landlock-rw", "/b"];
    let cfg = parse_from(args).expect("config with a sandbox table");
    assert!(cfg.landlock);
    assert_eq!(cfg.landlock_rw, [PathBuf::from("/b")]);
}

#[test]
fn connect_wait_per_vm() {
    let l = parse(&format!("{ONE_VM}connect-wait = '5s'\n")).expect("parses");
    assert_eq!(
        l.specs[0].connect_wait,
        Some(std::time::Duration::from_secs(5))
    );
    assert_eq!(parse(ONE_VM).expect("parses").specs[0].connect_wait, None);
    assert_err(
        &format!("{ONE_VM}connect-wait = '5 s'\n"),
        "vm[0].connect-wait",
        4,
        "unknown unit",
    );
}

#[test]
fn vsock_forwarding_backend() {
    let l = parse(
        "[[vm]]\nsocket = '/run/a.sock'\nforward-cid = 1\nforward-listen = [9001, 9002]\n\
         [[vm]]\nguest-cid = 4\nsocket = '/run/b.sock'\nforward-cid = 1\nforward-listen = '7000+7001'\n\
         [[vm]]\nguest-cid = 5\nsocket = '/run/c.sock'\nforward-cid = 2\n",
    )
    .expect("forwarding VMs");
    assert_eq!(l.specs[0].forward_cid, Some(1));
    assert_eq!(l.specs[0].forward_listen, Some(vec![9001, 9002]));
    assert_eq!(l.specs[0].uds_path, None);
    assert_eq!(l.specs[1].forward_listen, Some(vec![7000, 7001]));
    assert_eq!(l.specs[2].forward_listen, None);

    let vm = "[[vm]]\nsocket = '/run/a.sock'\n";
    assert_err(
        &format!("{vm}uds-path = '/run/a.vsock'\nforward-cid = 1\n"),
        "vm[0]",
        2,
        "only one of uds-path or forward-cid",
    );
    assert_err(
        &format!("{vm}uds-path = '/run/a.vsock'\nforward-listen = [1]\n"),
        "vm[0].forward-listen",
        4,
        "forward-listen needs forward-cid instead of uds-path",
    );
    assert_err(
        &format!("{vm}forward-cid = 1\nforward-listen = [1, 1]\n"),
        "vm[0].forward-listen",
        4,
        "port 1 is listed twice",
    );
    assert_err(
        &format!("{vm}forward-cid = 1\nforward-listen = '1+x'\n"),
        "vm[0].forward-listen",
        4,
        "`1+x` is not a list of ports joined by '+'",
    );
    assert_err(
        &format!("{vm}forward-cid = 4294967295\n"),
        "vm[0].forward-cid",
        3,
        "means any CID",
    );
    assert_err(
        vm,
        "vm[0]",
        2,
        "missing required key `uds-path` (or `forward-cid`)",
    );
}
