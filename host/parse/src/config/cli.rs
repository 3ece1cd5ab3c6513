//! The clap command line.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};

use super::{
    check_forward_cid, check_guest_cid, check_max_buffered, check_max_connections, check_path,
    check_queue_size, check_tx_buffer_size, finish_vms, parse_forward_listen, parse_number,
    split_groups, toml, yaml, ConfigError, DaemonConfig, Invocation, LogFormat, Origin, VmSpec,
    DEFAULT_MAX_CONNECTIONS,
};

// Subcommands of `vhost-plug`; `vhost-plug` alone runs the daemon. (A plain comment: clap
// would show a doc comment here as the program's --help text.)
//
// To add one, add a variant here (its arguments can be an `Args` struct defined in the
// module that implements it), then handle it in main.rs's `run_command`. Daemon flags given
// together with a subcommand are refused by clap, and so is any option before the subcommand
// name: `--log-format` is global but must come after it (`vhost-plug ctl --log-format json ...`).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with plugin components.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Talk to a running daemon over its control socket.
    Ctl {
        /// The daemon's --control-socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Work with saved device states.
    #[command(subcommand)]
    State(StateCommand),
}

/// `vhost-plug state ...`
#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Decode a saved device state (SET_DEVICE_STATE_FD blob) and print it as JSON.
    Inspect {
        /// The state file.
        file: PathBuf,
        /// Serializer component to decode with [default: the built-in one the state names].
        #[arg(long, value_name = "PATH")]
        serializer: Option<PathBuf>,
    },
}

/// `vhost-plug ctl ...`
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// VMs, frontends, connection counts and plugins.
    Status,
    /// Per-plugin calls, denials, failures and call latency.
    Plugins,
    /// Replace a policy plugin in place, carrying its state over (dispatch pauses meanwhile).
    Swap {
        /// The new plugin: policy=PATH|builtin:NAME[,name=NAME][,config=STRING]
        spec: String,
        /// Name of the plugin to replace [default: the new plugin's name].
        #[arg(long, value_name = "NAME")]
        replace: Option<String>,
        /// Only the VM with this CID [default: every VM].
        #[arg(long, value_name = "CID")]
        vm: Option<u64>,
    },
    /// Write the VM's state (device facts and plugin states) to FILE, on the daemon's side.
    Save {
        file: PathBuf,
        /// The VM with this CID [default: the only VM].
        #[arg(long, value_name = "CID")]
        vm: Option<u64>,
    },
    /// Load the plugin states of a state FILE into the running VM (all or nothing).
    Load {
        file: PathBuf,
        /// The VM with this CID [default: the only VM].
        #[arg(long, value_name = "CID")]
        vm: Option<u64>,
    },
    /// Make the next device-state SAVE a same-host handover: the state carries the
    /// connection table and the sockets go to the new daemon's control socket.
    Handover {
        /// Control socket of the daemon taking over.
        #[arg(long, value_name = "SOCKET")]
        to: PathBuf,
        /// Only the VM with this CID [default: every VM].
        #[arg(long, value_name = "CID")]
        vm: Option<u64>,
    },
    /// Live upgrade: start a new daemon (same arguments) and hand it every VM's running
    /// session; the VMMs see nothing. If the new daemon fails, this one keeps serving.
    Upgrade {
        /// The new daemon's binary [default: the path this daemon was started from].
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Open connections: addresses, initiator, state, bytes each way and credit.
    Conns {
        /// Only the VM with this CID [default: every VM].
        #[arg(long, value_name = "CID")]
        vm: Option<u64>,
    },
}

/// `vhost-plug plugin ...`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Say which world a component implements, or what is wrong with it.
    Check {
        /// The component (.wasm) to inspect.
        file: PathBuf,
    },
    /// Create a plugin crate (template, SDK and WIT copied in) that builds on its own with
    /// `cargo build --release --target wasm32-wasip2`.
    New {
        /// Crate and directory name: ASCII letters, digits, '-' and '_', starting with a letter.
        name: String,
        /// The world the plugin implements.
        #[arg(long, value_enum, default_value_t = crate::spec::PluginKind::Policy)]
        world: crate::spec::PluginKind,
        /// Create the crate inside DIR [default: the current directory].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

const LONG_ABOUT: &str = "\
vhost-user virtio-vsock backend with WebAssembly plugins (command line compatible with
vhost-device-vsock 0.3.0).

Without a subcommand it runs the daemon for the VMs given by one of:
  --socket S --uds-path U [--guest-cid N ...]   one VM from flags
  --vm socket=S,uds-path=U[,...]                 one VM per --vm (repeatable)
  --config FILE.toml | FILE.yaml                 VMs (and, in TOML, plugins, routes, limits)
It stops on SIGINT or SIGTERM and removes its sockets. Logs go to stderr; the filter comes
from VHOST_PLUG_LOG (or RUST_LOG), e.g. VHOST_PLUG_LOG=debug.

Examples:
  vhost-plug --guest-cid 3 --socket /tmp/vhost3.socket --uds-path /tmp/vm3.vsock
  vhost-plug --config /etc/vhost-plug/vhost-plug.toml
  vhost-plug plugin new my-policy      (a plugin crate; see my-policy/README.md)
  vhost-plug ctl --socket /run/vhost-plug/control.sock status";

#[derive(Debug, Parser)]
#[command(
    name = "vhost-plug",
    version,
    about = "vhost-user virtio-vsock backend (command line compatible with vhost-device-vsock 0.3.0)",
    long_about = LONG_ABOUT,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    single: SingleVm,

    /// One VM as comma-separated key=value pairs; repeat for more VMs.
    ///
    /// Keys (`-` or `_`): guest-cid, socket, uds-path, tx-buffer-size, queue-size,
    /// groups (names joined by '+'), max-connections, connect-wait (e.g. 5s: a CONNECT the
    /// guest refuses is retried until then). socket and uds-path are required.
    ///
    /// Example:
    ///   --vm guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,
    ///        tx-buffer-size=65536,queue-size=1024,groups=group1+group2
    #[arg(
        long,
        value_name = "KEY=VALUE,...",
        value_parser = parse_vm_arg,
        conflicts_with = "config",
        verbatim_doc_comment
    )]
    vm: Vec<VmSpec>,

    /// Load the VMs from a config file. FILE.toml: vhost-plug's own format (VMs, plugins,
    /// routes, limits, control socket; see examples/vhost-plug.toml). Any other name: the
    /// vhost-device-vsock YAML holding a `vms:` list (fields as the --vm keys, with '_').
    /// Flags given next to it win over the file's settings.
    #[arg(long, value_name = "FILE", verbatim_doc_comment)]
    config: Option<PathBuf>,

    /// Most connections open at once per VM, for VMs that do not set their own
    /// max-connections [default: 16384]
    #[arg(long, value_name = "N", value_parser = max_connections_value)]
    max_connections: Option<usize>,

    /// Bytes of guest data the daemon may hold for host ends that do not read, over all
    /// VMs and connections (suffix K, M or G for KiB, MiB, GiB). Each connection's window
    /// is reserved from it; past it new connections get smaller windows [default: 256M]
    #[arg(long, value_name = "BYTES", value_parser = max_buffered_value)]
    max_buffered: Option<usize>,

    /// Load a plugin for every VM: KIND=PATH|builtin:NAME[,name=NAME][,config=STRING]
    /// with KIND one of policy, bridge, serializer. Policy plugins form a chain in the
    /// order given (the first deny wins). Without any --plugin the built-in defaults load
    /// (policy allow-group, serializer serializer-postcard).
    #[arg(long = "plugin", value_name = "SPEC", value_parser = plugin_value, verbatim_doc_comment)]
    plugins: Vec<crate::spec::PluginSpec>,

    /// Where plugins may route connections: unix:DIR (sockets inside DIR),
    /// tcp:HOST:PORT (HOST an IP address or localhost; PORT may be *) or
    /// vsock:CID:PORT (a host AF_VSOCK address, not a sibling VM; PORT may be *). Repeatable.
    #[arg(long = "allow-route", value_name = "ROUTE", value_parser = route_value, verbatim_doc_comment)]
    allow_routes: Vec<super::RouteSpec>,

    /// Keep compiled plugins in DIR (created 0700) so later starts skip compilation.
    #[arg(long, value_name = "DIR")]
    plugin_cache: Option<PathBuf>,

    /// Serve `vhost-plug ctl` on this unix socket (created 0600; only root and this user).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,

    /// Serve Prometheus metrics (GET /metrics) on unix:PATH (created 0600) or a loopback
    /// IP:PORT such as 127.0.0.1:9100.
    #[arg(long, value_name = "ADDR", value_parser = metrics_value)]
    metrics: Option<super::MetricsAddr>,

    /// Sandbox the daemon with Landlock as it starts: read-only filesystem except its own
    /// socket directories, the plugin cache and --landlock-rw directories; TCP connects only
    /// to --allow-route ports; no exec. Fails to start if the kernel has no Landlock.
    #[arg(long, verbatim_doc_comment)]
    landlock: bool,

    /// With --landlock: a directory the daemon may still write files in (`ctl save`
    /// targets). Repeatable.
    #[arg(long = "landlock-rw", value_name = "DIR", verbatim_doc_comment)]
    landlock_rw: Vec<PathBuf>,

    /// Log line format (on stderr).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    /// Log filter, e.g. `debug` or `info,vhost_plug::device=debug` (overrides VHOST_PLUG_LOG
    /// and RUST_LOG) [default: info]
    #[arg(long, value_name = "FILTER", value_parser = log_level_value)]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

/// One VM described by flags (the peer's original single-VM form).
#[derive(Debug, Args)]
struct SingleVm {
    /// Context identifier of the guest: 3 or more, unique in this daemon [default: 3]
    #[arg(long, value_name = "CID", value_parser = cid_value, conflicts_with_all = ["config", "vm"])]
    guest_cid: Option<u64>,

    /// Unix socket the VMM connects to (vhost-user control path); required with this form
    #[arg(long, value_name = "PATH", value_parser = path_value, conflicts_with_all = ["config", "vm"])]
    socket: Option<PathBuf>,

    /// Unix socket host programs connect to (hybrid vsock); required with this form
    #[arg(
        long,
        value_name = "PATH",
        value_parser = path_value,
        conflicts_with_all = ["config", "vm", "forward_cid", "forward_listen"]
    )]
    uds_path: Option<PathBuf>,

    /// Instead of --uds-path: send the guest's connections to this host AF_VSOCK CID (same
    /// port), e.g. 1 for this host's loopback
    #[arg(
        long,
        value_name = "CID",
        value_parser = forward_cid_value,
        conflicts_with_all = ["config", "vm", "uds_path"]
    )]
    forward_cid: Option<u32>,

    /// With --forward-cid: host AF_VSOCK ports joined by '+' to listen on; a connection to
    /// port P goes to the guest's port P
    #[arg(
        long,
        value_name = "PORTS",
        value_parser = forward_listen_value,
        conflicts_with_all = ["config", "vm", "uds_path"]
    )]
    forward_listen: Option<ForwardPorts>,

    /// Per-connection buffer size in bytes, 1 to 64 MiB [default: 65536]
    #[arg(long, value_name = "BYTES", value_parser = tx_buffer_size_value, conflicts_with_all = ["config", "vm"])]
    tx_buffer_size: Option<u32>,

    /// Largest vring size accepted, a power of two up to 32768 [default: 32768]
    #[arg(long, value_name = "N", value_parser = queue_size_value, conflicts_with_all = ["config", "vm"])]
    queue_size: Option<u16>,

    /// Sibling groups joined by '+'; VMs sharing a group reach each other [default: default]
    #[arg(long, value_name = "GROUPS", conflicts_with_all = ["config", "vm"])]
    groups: Option<String>,
}

impl SingleVm {
    fn is_used(&self) -> bool {
        let SingleVm {
            guest_cid,
            socket,
            uds_path,
            forward_cid,
            forward_listen,
            tx_buffer_size,
            queue_size,
            groups,
        } = self;
        guest_cid.is_some()
            || socket.is_some()
            || uds_path.is_some()
            || forward_cid.is_some()
            || forward_listen.is_some()
            || tx_buffer_size.is_some()
            || queue_size.is_some()
            || groups.is_some()
    }

    fn into_spec(self) -> Result<VmSpec, ConfigError> {
        let mut cmd = Cli::command();
        if self.forward_listen.is_some() && self.forward_cid.is_none() {
            return Err(cmd
                .error(
                    ErrorKind::MissingRequiredArgument,
                    "--forward-listen needs --forward-cid (the vsock forwarding backend)",
                )
                .into());
        }
        for (missing, flag) in [
            (self.socket.is_none(), "--socket <PATH>"),
            (
                self.uds_path.is_none() && self.forward_cid.is_none(),
                "--uds-path <PATH> (or --forward-cid <CID>)",
            ),
        ] {
            if missing {
                return Err(cmd
                    .error(
                        ErrorKind::MissingRequiredArgument,
                        format!("{flag} is required to describe a VM with flags"),
                    )
                    .into());
            }
        }
        Ok(VmSpec {
            guest_cid: self.guest_cid,
            socket: self.socket,
            uds_path: self.uds_path,
            tx_buffer_size: self.tx_buffer_size,
            queue_size: self.queue_size,
            // The peer trims the whole --groups value (not the --vm one).
            groups: self.groups.map(|g| split_groups(g.trim())),
            max_connections: None,
            plugins: None,
            allow_routes: Vec::new(),
            connect_wait: None,
            forward_cid: self.forward_cid,
            forward_listen: self.forward_listen.map(|p| p.0),
            warnings: Vec::new(),
        })
    }
}

pub(super) fn parse<I, T>(args: I) -> Result<Invocation, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut cli = Cli::try_parse_from(args)?;
    if let Some(command) = cli.command {
        return Ok(Invocation::Command(command));
    }
    let mut warnings = Vec::new();
    let specs: Vec<(VmSpec, Origin)> = if let Some(path) = cli.config.take_if(|p| toml::is_toml(p))
    {
        let file = toml::load(&path)?;
        merge_toml_settings(&mut cli, &file);
        file.specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| (spec, Origin::Toml(path.clone(), i)))
            .collect()
    } else if let Some(path) = cli.config {
        let loaded = yaml::load(&path)?;
        warnings.extend(loaded.warnings);
        loaded
            .specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| (spec, Origin::File(path.clone(), i)))
            .collect()
    } else if !cli.vm.is_empty() {
        cli.vm
            .into_iter()
            .enumerate()
            .map(|(i, spec)| (spec, Origin::VmArg(i)))
            .collect()
    } else if cli.single.is_used() {
        vec![(cli.single.into_spec()?, Origin::Flags)]
    } else {
        return Err(Cli::command()
            .error(
                ErrorKind::MissingRequiredArgument,
                "no VM to serve: give --socket and --uds-path, one or more --vm, or --config FILE",
            )
            .into());
    };

    // Checked after the TOML file's `[sandbox]` is merged in, which may set `landlock`.
    if !cli.landlock && !cli.landlock_rw.is_empty() {
        return Err(Cli::command()
            .error(
                ErrorKind::MissingRequiredArgument,
                "--landlock-rw needs --landlock (or `[sandbox] landlock = true` in the TOML file)",
            )
            .into());
    }
    let max_connections = cli.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    let max_buffered = cli
        .max_buffered
        .unwrap_or(crate::config::DEFAULT_MAX_BUFFERED);
    let vms = finish_vms(specs, max_connections, &mut warnings)?;
    Ok(Invocation::Daemon(DaemonConfig {
        vms,
        log_format: cli.log_format,
        log_level: cli.log_level,
        plugins: cli.plugins,
        allow_routes: cli.allow_routes,
        control_socket: cli.control_socket,
        plugin_cache: cli.plugin_cache,
        metrics: cli.metrics,
        landlock: cli.landlock,
        landlock_rw: cli.landlock_rw,
        max_buffered,
        warnings,
    }))
}

/// The TOML file's daemon-wide settings, where the command line did not give its own:
/// `--plugin` replaces the file's plugins, `--allow-route` adds to its routes.
fn merge_toml_settings(cli: &mut Cli, file: &toml::Loaded) {
    if cli.plugins.is_empty() {
        cli.plugins = file.plugins.clone();
    }
    cli.allow_routes
        .splice(0..0, file.allow_routes.iter().cloned());
    cli.control_socket = cli.control_socket.take().or(file.control_socket.clone());
    cli.plugin_cache = cli.plugin_cache.take().or(file.plugin_cache.clone());
    cli.max_connections = cli.max_connections.or(file.max_connections);
    cli.max_buffered = cli.max_buffered.or(file.max_buffered);
    cli.landlock |= file.landlock;
    cli.landlock_rw
        .splice(0..0, file.landlock_rw.iter().cloned());
}

fn plugin_value(value: &str) -> Result<crate::spec::PluginSpec, String> {
    value
        .parse()
        .map_err(|e: crate::spec::SpecError| e.to_string())
}

fn log_level_value(value: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(value)
        .map(|_| value.to_string())
        .map_err(|e| e.to_string())
}

fn metrics_value(value: &str) -> Result<super::MetricsAddr, String> {
    value.parse()
}

fn route_value(value: &str) -> Result<super::RouteSpec, String> {
    value.parse()
}

fn number_value<T>(value: &str, check: fn(u64) -> Result<T, String>) -> Result<T, String> {
    parse_number(value).and_then(check)
}

fn cid_value(value: &str) -> Result<u64, String> {
    number_value(value, check_guest_cid)
}

fn tx_buffer_size_value(value: &str) -> Result<u32, String> {
    number_value(value, check_tx_buffer_size)
}

fn queue_size_value(value: &str) -> Result<u16, String> {
    number_value(value, check_queue_size)
}

fn max_connections_value(value: &str) -> Result<usize, String> {
    number_value(value, check_max_connections)
}

/// A byte count with an optional binary suffix: `1048576`, `1024K`, `1M`, `1G`.
fn max_buffered_value(value: &str) -> Result<usize, String> {
    let (digits, unit) = match value.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&value[..i], 1u64 << 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&value[..i], 1 << 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&value[..i], 1 << 30),
        _ => (value, 1),
    };
    let n = parse_number(digits)?
        .checked_mul(unit)
        .ok_or_else(|| format!("`{value}` is too large"))?;
    check_max_buffered(n)
}

fn forward_cid_value(value: &str) -> Result<u32, String> {
    check_forward_cid(parse_number(value)?)
}

/// The ports of `--forward-listen` (one flag value, so clap must not see a `Vec`).
#[derive(Clone, Debug)]
struct ForwardPorts(Vec<u32>);

fn forward_listen_value(value: &str) -> Result<ForwardPorts, String> {
    parse_forward_listen(value).map(ForwardPorts)
}

fn path_value(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    check_path(&path)?;
    Ok(path)
}

fn in_key<T>(key: &str, r: Result<T, String>) -> Result<T, String> {
    r.map_err(|m| format!("{key}: {m}"))
}

/// One `--vm` value. Like the peer: the whole value is trimmed, items are split on `,`, every
/// item must be `key=value`, a repeated key keeps its last value, unknown keys are refused.
/// Unlike the peer, a value may itself contain `=` (the peer silently cuts it there).
pub(super) fn parse_vm_arg(arg: &str) -> Result<VmSpec, String> {
    let mut spec = VmSpec::default();
    for item in arg.trim().split(',') {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("expected key=value, found `{item}`"));
        };
        match key {
            "guest_cid" | "guest-cid" => spec.guest_cid = Some(in_key(key, cid_value(value))?),
            "socket" => spec.socket = Some(in_key(key, path_value(value))?),
            "uds_path" | "uds-path" => spec.uds_path = Some(in_key(key, path_value(value))?),
            "tx_buffer_size" | "tx-buffer-size" => {
                spec.tx_buffer_size = Some(in_key(key, tx_buffer_size_value(value))?)
            }
            "queue_size" | "queue-size" => {
                spec.queue_size = Some(in_key(key, queue_size_value(value))?)
            }
            "groups" => spec.groups = Some(split_groups(value)),
            "max_connections" | "max-connections" => {
                spec.max_connections = Some(in_key(key, max_connections_value(value))?)
            }
            "connect_wait" | "connect-wait" => {
                spec.connect_wait = in_key(key, super::parse_connect_wait(value))?
            }
            "forward_cid" | "forward-cid" => {
                spec.forward_cid = Some(in_key(key, forward_cid_value(value))?)
            }
            "forward_listen" | "forward-listen" => {
                spec.forward_listen = Some(in_key(key, parse_forward_listen(value))?)
            }
            _ => {
                return Err(format!(
                    "unknown key `{key}` (known keys: guest-cid, socket, uds-path, forward-cid, \
                     forward-listen, tx-buffer-size, queue-size, groups, max-connections, connect-wait)"
                ))
            }
        }
    }
    if spec.socket.is_none() {
        return Err("missing required key `socket`".into());
    }
    spec.check_backend("forward-listen", "uds-path")?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Subcommands and the daemon flags exclude each other.
    #[test]
    fn subcommands_exclude_daemon_flags() {
        let m = Cli::command()
            .try_get_matches_from([
                "vhost-plug",
                "ctl",
                "--socket",
                "/s",
                "--log-format",
                "json",
                "status",
            ])
            .expect("ctl parses");
        let (name, sub) = m.subcommand().expect("subcommand");
        assert_eq!(name, "ctl");
        assert_eq!(
            sub.get_one::<LogFormat>("log_format"),
            Some(&LogFormat::Json)
        );
        for args in [
            // Global options go after the subcommand name.
            &[
                "vhost-plug",
                "--log-format",
                "json",
                "ctl",
                "--socket",
                "/s",
                "status",
            ][..],
            &[
                "vhost-plug",
                "--vm",
                "socket=/a,uds-path=/b",
                "ctl",
                "--socket",
                "/s",
                "status",
            ],
            &["vhost-plug", "--config", "/c", "plugin", "check", "/p.wasm"],
            // ctl needs its socket and a command.
            &["vhost-plug", "ctl", "status"],
            &["vhost-plug", "ctl", "--socket", "/s"],
        ] {
            assert!(
                Cli::command().try_get_matches_from(args).is_err(),
                "{args:?}"
            );
        }
    }
}
