//! Command line and config file.
//!
//! `vhost-plug` accepts every command line and YAML config file that starts rust-vmm's
//! `vhost-device-vsock` 0.3.0 (the "peer"), with the same defaults, plus a few options of its
//! own. Three mutually exclusive ways describe the VMs to serve:
//!
//! * one VM from flags: `--guest-cid 3 --socket S --uds-path U [--tx-buffer-size N]
//!   [--queue-size N] [--groups a+b]`;
//! * one VM per `--vm key=value,...` (keys spelled with `-` or `_`, `groups=a+b`);
//! * `--config FILE`, a YAML file with a `vms:` list (field names with `_`, as the peer);
//! * `--config FILE.toml`, our own TOML file ([`toml`](self::toml) module): VMs plus plugins,
//!   route allowlists, limits, control socket and plugin cache in one place.
//!
//! Ours on top: `--max-buffered BYTES` (daemon-wide cap on held guest data),
//! `--max-connections N` (default for every VM), the per-VM key
//! `max-connections`/`max_connections`, the per-VM key `connect-wait`/`connect_wait` (a
//! host `CONNECT` the guest refuses is retried until then, [`wait`]), and
//! `--log-format text|json`.
//!
//! What the peer accepts but is unusable (CID below 3, a zero TX buffer, a queue size that is
//! not a power of two, two VMs on one CID or one socket path) is rejected here with a message
//! naming the flag, `--vm` or YAML field at fault.
//!
//! The peer's vsock forwarding backend is a VM's alternative to `uds-path`: `forward-cid C`
//! sends the guest's connections to host AF_VSOCK address C (same port), `forward-listen
//! P1+P2` listens on host AF_VSOCK ports and forwards those connections into the guest
//! ([`Forward`]). `uds-path` and `forward-cid` exclude each other as in the peer; a
//! `forward-listen` next to a `uds-path` is ignored as the peer does (with a warning); a
//! malformed `forward-listen` is an error naming the bad item (the peer panics).
//!
//! Subcommands (`vhost-plug ctl ...` and others) go into [`Command`]; when one is given the
//! daemon flags are refused (clap's `args_conflicts_with_subcommands`), and
//! [`parse_invocation_from`] returns it instead of a [`DaemonConfig`].

mod cli;
mod metrics_addr;
mod toml;
mod wait;
mod yaml;

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use cli::{Command, CtlCommand, PluginCommand, StateCommand};
pub use metrics_addr::MetricsAddr;
pub use wait::{parse_connect_wait, MAX_CONNECT_WAIT};

/// Guest CID when none is given (same as the peer).
pub const DEFAULT_GUEST_CID: u64 = 3;
/// Per-connection buffer size when none is given: Linux's `VIRTIO_VSOCK_DEFAULT_BUF_SIZE`,
/// the window Linux guests expect (the peer's default is 64 KiB; an explicit size keeps its
/// meaning).
pub const DEFAULT_TX_BUFFER_SIZE: u32 = 256 * 1024;
/// Largest accepted per-connection buffer size. The peer takes any `u32`, and allocates that
/// much per connection.
pub const MAX_TX_BUFFER_SIZE: u32 = 64 * 1024 * 1024;
/// Default cap on guest bytes held daemon-wide (`--max-buffered`): 1024 connections with
/// Linux's 256 KiB window.
pub const DEFAULT_MAX_BUFFERED: usize = 256 << 20;
/// The smallest window a connection is given, even past `--max-buffered` (one page: enough for
/// any guest to make progress).
pub const MIN_WINDOW: u32 = 4096;
/// Largest split-ring size (virtio spec; `virtio_queue::Queue::new` refuses anything larger).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Largest vring size we accept when none is given: any ring the virtio spec allows. crosvm
/// sizes every queue 32768 by default and ends the session when `SET_VRING_NUM` is refused
/// (the peer's default is 1024). The daemon allocates nothing per ring entry (work per event
/// is bounded by batch limits, not by the ring size), so the larger default costs no memory;
/// `tests/tests/frontends.rs` measures it.
pub const DEFAULT_QUEUE_SIZE: u16 = MAX_QUEUE_SIZE;
/// Sibling group every VM belongs to when none is given (same as the peer).
pub const DEFAULT_GROUP: &str = "default";
/// Connections per VM when neither `--max-connections` nor the VM's own key says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16384;

/// One VM served by the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// The guest's CID (3 ..= 0xffff_fffe).
    pub guest_cid: u64,
    /// vhost-user socket the VMM connects to.
    pub socket: PathBuf,
    /// Hybrid vsock socket host programs connect to; guest connections to port P go to
    /// `<uds_path>_P`. Empty when the VM uses the vsock forwarding backend (`forward`).
    pub uds_path: PathBuf,
    /// The peer's vsock forwarding backend, instead of `uds_path`.
    pub forward: Option<Forward>,
    /// Per-connection buffer, also the `buf_alloc` we advertise (1 ..= 64 MiB).
    pub tx_buffer_size: u32,
    /// Largest vring size we accept (a power of two, 1 ..= 32768).
    pub queue_size: u16,
    /// Sibling groups: VMs sharing a group can reach each other by CID.
    pub groups: Vec<String>,
    /// Most connections open at once for this VM (at least 1).
    pub max_connections: usize,
    /// This VM's own plugins (YAML `plugins:`); empty means the daemon's `--plugin` set.
    pub plugins: Vec<crate::spec::PluginSpec>,
    /// Routes this VM's plugins may use on top of the daemon's `allow_routes` (TOML
    /// `[vm.routes]`).
    pub allow_routes: Vec<RouteSpec>,
    /// How long a host `CONNECT` the guest refuses is retried (`connect-wait`, [`wait`]);
    /// `None`: refused at once, as vhost-device-vsock does.
    pub connect_wait: Option<std::time::Duration>,
}

impl VmConfig {
    /// A VM with the default buffer size, queue size, group and connection limit.
    pub fn new(guest_cid: u64, socket: impl Into<PathBuf>, uds_path: impl Into<PathBuf>) -> Self {
        VmConfig {
            guest_cid,
            socket: socket.into(),
            uds_path: uds_path.into(),
            tx_buffer_size: DEFAULT_TX_BUFFER_SIZE,
            queue_size: DEFAULT_QUEUE_SIZE,
            groups: vec![DEFAULT_GROUP.to_string()],
            max_connections: DEFAULT_MAX_CONNECTIONS,
            plugins: Vec::new(),
            allow_routes: Vec::new(),
            connect_wait: None,
            forward: None,
        }
    }

    /// A VM whose host side is the vsock forwarding backend instead of a hybrid socket.
    pub fn forwarding(guest_cid: u64, socket: impl Into<PathBuf>, forward: Forward) -> Self {
        VmConfig {
            uds_path: PathBuf::new(),
            forward: Some(forward),
            ..VmConfig::new(guest_cid, socket, PathBuf::new())
        }
    }
}

/// The peer's vsock forwarding backend (`forward-cid`, `forward-listen`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    /// Guest connections to the host (CID 2), port P, go to AF_VSOCK (`cid`, P).
    pub cid: u32,
    /// Host AF_VSOCK ports listened on (any CID); a connection to port P goes to guest port P.
    pub listen: Vec<u32>,
}

/// VMADDR_CID_ANY / VMADDR_PORT_ANY: wildcards, never a destination or a listening port.
const VSOCK_ANY: u32 = u32::MAX;

/// Format of the daemon's log lines (stderr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything the daemon needs to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The VMs, in the order given.
    pub vms: Vec<VmConfig>,
    pub log_format: LogFormat,
    /// Log filter directives (`--log-level`); `None`: VHOST_PLUG_LOG, RUST_LOG, else info.
    pub log_level: Option<String>,
    /// Plugins for every VM (`--plugin`); empty means the built-in defaults.
    pub plugins: Vec<crate::spec::PluginSpec>,
    /// Where plugins may send connections (`--allow-route`).
    pub allow_routes: Vec<RouteSpec>,
    /// The control socket for `vhost-plug ctl` (`--control-socket`).
    pub control_socket: Option<PathBuf>,
    /// Directory for precompiled plugin artifacts (`--plugin-cache`).
    pub plugin_cache: Option<PathBuf>,
    /// Prometheus endpoint (`--metrics`).
    pub metrics: Option<MetricsAddr>,
    /// Sandbox the daemon with Landlock (`--landlock`, see `sandbox`).
    pub landlock: bool,
    /// Directories the sandboxed daemon may still write files in (`--landlock-rw`).
    pub landlock_rw: Vec<PathBuf>,
    /// Cap on guest bytes held daemon-wide (`--max-buffered`; the daemon's `budget` module).
    pub max_buffered: usize,
    /// Things accepted for compatibility that the operator should know about (ignored YAML
    /// fields, ignored `forward-listen`, ...). Parsing happens before logging is set up, so
    /// the caller logs these once it is.
    pub warnings: Vec<String>,
}

impl DaemonConfig {
    /// A config serving `vms` with text logs and no warnings.
    pub fn new(vms: Vec<VmConfig>) -> Self {
        DaemonConfig {
            vms,
            log_format: LogFormat::Text,
            log_level: None,
            plugins: Vec::new(),
            allow_routes: Vec::new(),
            control_socket: None,
            plugin_cache: None,
            metrics: None,
            landlock: false,
            landlock_rw: Vec::new(),
            max_buffered: DEFAULT_MAX_BUFFERED,
            warnings: Vec::new(),
        }
    }

    /// Checks a config built in code with the same rules the parser applies.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vms.is_empty() {
            return Err(ConfigError::Invalid {
                what: "config".into(),
                message: "no VM to serve".into(),
            });
        }
        for (i, vm) in self.vms.iter().enumerate() {
            let what = |field: &str| format!("vms[{i}].{field}");
            let invalid = |field: &str, message: String| ConfigError::Invalid {
                what: what(field),
                message,
            };
            check_guest_cid(vm.guest_cid).map_err(|m| invalid("guest_cid", m))?;
            check_path(&vm.socket).map_err(|m| invalid("socket", m))?;
            match &vm.forward {
                None => check_path(&vm.uds_path).map_err(|m| invalid("uds_path", m))?,
                Some(f) => {
                    if !vm.uds_path.as_os_str().is_empty() {
                        return Err(invalid("uds_path", ONE_BACKEND.into()));
                    }
                    check_forward_cid(u64::from(f.cid)).map_err(|m| invalid("forward_cid", m))?;
                    check_forward_ports(&f.listen).map_err(|m| invalid("forward_listen", m))?;
                }
            }
            check_tx_buffer_size(u64::from(vm.tx_buffer_size))
                .map_err(|m| invalid("tx_buffer_size", m))?;
            check_queue_size(u64::from(vm.queue_size)).map_err(|m| invalid("queue_size", m))?;
            check_max_connections(vm.max_connections as u64)
                .map_err(|m| invalid("max_connections", m))?;
        }
        let labelled: Vec<_> = self
            .vms
            .iter()
            .enumerate()
            .map(|(i, vm)| (vm, Origin::Code(i)))
            .collect();
        check_unique(&labelled)
    }
}

/// A destination plugins may route to: `unix:DIR` (sockets inside DIR), `tcp:HOST:PORT`
/// (`HOST:*` for any port) or `vsock:CID:PORT` (`CID:*` for any port), a host AF_VSOCK
/// address. The `vsock:` prefix names the host kernel's CIDs, which a `host-vsock` route
/// reaches; sibling VMs (`vsock` routes) need no entry, they are checked against the VM's group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteSpec {
    UnixDir(PathBuf),
    Tcp(String),
    Vsock(String),
}

impl std::str::FromStr for RouteSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(dir) = s.strip_prefix("unix:") {
            if !dir.starts_with('/') {
                return Err(format!("unix route directory must be absolute: {dir}"));
            }
            Ok(RouteSpec::UnixDir(PathBuf::from(dir)))
        } else if let Some(t) = s.strip_prefix("tcp:") {
            Ok(RouteSpec::Tcp(t.to_string()))
        } else if let Some(v) = s.strip_prefix("vsock:") {
            crate::route::parse_vsock(v).map_err(|e| e.to_string())?;
            Ok(RouteSpec::Vsock(v.to_string()))
        } else {
            Err(format!(
                "expected unix:DIR, tcp:HOST:PORT or vsock:CID:PORT, got {s}"
            ))
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    /// Run the daemon.
    Daemon(DaemonConfig),
    /// Run a subcommand.
    Command(Command),
}

/// Why the command line or config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Refused by clap, or `--help`/`--version` (see [`ConfigError::exit`]). Bad `--vm`
    /// values and bad flag values arrive here too, formatted with the usage line.
    #[error("{0}")]
    Cli(#[from] clap::Error),
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid YAML or breaks the schema. `field` is the path to the
    /// offending value, like `vms[1].guest_cid` (absent for YAML syntax errors); `line` and
    /// `column` start at 1.
    #[error("{}:{line}:{column}: {}{message}", path.display(), field_prefix(.field))]
    Yaml {
        path: PathBuf,
        field: Option<String>,
        line: usize,
        column: usize,
        message: String,
    },
    /// The TOML config file is not valid TOML, breaks the schema or a rule (duplicate CID,
    /// missing plugin file, bad route). `field` is the path to the offending value, like
    /// `vm[1].guest-cid` (absent for TOML syntax errors); `line` and `column` start at 1.
    #[error("{}:{line}:{column}: {}{message}", path.display(), field_prefix(.field))]
    Toml {
        path: PathBuf,
        field: Option<String>,
        line: usize,
        column: usize,
        message: String,
    },
    /// The config file is wrong in a way that has no position (e.g. it is empty).
    #[error("{}: {message}", path.display())]
    ConfigFile { path: PathBuf, message: String },
    /// Two VMs claim one CID.
    #[error("guest CID {cid} is given to both {first} and {second}")]
    DuplicateCid {
        cid: u64,
        first: String,
        second: String,
    },
    /// Two sockets of the daemon (vhost-user or hybrid vsock) are at one path.
    #[error("path {} is used twice: as {first} and as {second}", path.display())]
    DuplicatePath {
        path: PathBuf,
        first: String,
        second: String,
    },
    /// Two VMs listen on one host AF_VSOCK port (`forward-listen`).
    #[error("host vsock port {port} is listened on by both {first} and {second}")]
    DuplicateForwardPort {
        port: u32,
        first: String,
        second: String,
    },
    /// A [`DaemonConfig`] built in code breaks a rule ([`DaemonConfig::validate`]).
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

fn field_prefix(field: &Option<String>) -> String {
    field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default()
}

impl ConfigError {
    /// Prints the error (or the help / version text) and gives the exit code: 0 for `--help`
    /// and `--version`, 2 for everything else.
    pub fn exit(&self) -> ExitCode {
        match self {
            ConfigError::Cli(e) => {
                let _ = e.print();
                ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
            }
            other => {
                eprintln!("error: {other}");
                ExitCode::from(2)
            }
        }
    }
}

/// Parses a daemon command line (`args` starts with the program name).
pub fn parse_from<I, T>(args: I) -> Result<DaemonConfig, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match parse_invocation_from(args)? {
        Invocation::Daemon(cfg) => Ok(cfg),
        Invocation::Command(_) => Err(ConfigError::Invalid {
            what: "command line".into(),
            message: "a subcommand was given where the daemon was expected".into(),
        }),
    }
}

/// Parses a command line that may name a subcommand (`args` starts with the program name).
pub fn parse_invocation_from<I, T>(args: I) -> Result<Invocation, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    cli::parse(args)
}

/// One VM as written by the user, before defaults. Per-field values are already checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct VmSpec {
    guest_cid: Option<u64>,
    socket: Option<PathBuf>,
    uds_path: Option<PathBuf>,
    tx_buffer_size: Option<u32>,
    queue_size: Option<u16>,
    groups: Option<Vec<String>>,
    max_connections: Option<usize>,
    plugins: Option<Vec<crate::spec::PluginSpec>>,
    allow_routes: Vec<RouteSpec>,
    connect_wait: Option<std::time::Duration>,
    /// `forward-cid`; excludes `uds_path` ([`VmSpec::check_backend`]).
    forward_cid: Option<u32>,
    /// `forward-listen`, already split and checked.
    forward_listen: Option<Vec<u32>>,
    warnings: Vec<String>,
}

/// The message when both backends are asked for (the peer's words).
const ONE_BACKEND: &str = "only one of uds-path or forward-cid can be provided";

impl VmSpec {
    /// The peer's rule between the two backends: exactly one of `uds_path` and
    /// `forward_cid`; a `forward_listen` next to a `uds_path` is dropped with a warning.
    /// `listen_name` is how the caller spells `forward-listen` in that warning. Errors are
    /// messages without a field name.
    fn check_backend(&mut self, listen_name: &str, uds_name: &str) -> Result<(), String> {
        match (&self.uds_path, self.forward_cid) {
            (Some(_), Some(_)) => Err(ONE_BACKEND.into()),
            (None, None) => Err(format!(
                "missing required key `{uds_name}` (or `{}`)",
                listen_name.replace("listen", "cid")
            )),
            (Some(_), None) => {
                if self.forward_listen.take().is_some() {
                    self.warnings.push(format!(
                        "{listen_name} is ignored next to {uds_name} (as vhost-device-vsock does)"
                    ));
                }
                Ok(())
            }
            (None, Some(_)) => Ok(()),
        }
    }

    /// Fills in defaults. `socket` must have been checked present, and the backend with
    /// [`VmSpec::check_backend`].
    fn finish(self, max_connections: usize) -> (VmConfig, Vec<String>) {
        let forward = self.forward_cid.map(|cid| Forward {
            cid,
            listen: self.forward_listen.unwrap_or_default(),
        });
        let vm = VmConfig {
            guest_cid: self.guest_cid.unwrap_or(DEFAULT_GUEST_CID),
            socket: self.socket.expect("socket checked present"),
            uds_path: self.uds_path.unwrap_or_default(),
            forward,
            tx_buffer_size: self.tx_buffer_size.unwrap_or(DEFAULT_TX_BUFFER_SIZE),
            queue_size: self.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
            groups: self
                .groups
                .unwrap_or_else(|| vec![DEFAULT_GROUP.to_string()]),
            max_connections: self.max_connections.unwrap_or(max_connections),
            plugins: self.plugins.unwrap_or_default(),
            allow_routes: self.allow_routes,
            connect_wait: self.connect_wait,
        };
        (vm, self.warnings)
    }
}

/// Where a VM was described, for messages about two VMs.
#[derive(Clone, Debug)]
enum Origin {
    Flags,
    VmArg(usize),
    File(PathBuf, usize),
    /// `[[vm]]` number i (from 0) of a TOML file.
    Toml(PathBuf, usize),
    Code(usize),
}

impl Origin {
    /// `field` spelled the way this origin spells it.
    fn field(&self, dashed: &str) -> String {
        match self {
            Origin::Flags => format!("--{dashed}"),
            Origin::VmArg(_) => format!("{dashed} of {self}"),
            Origin::File(..) | Origin::Code(_) => format!("{} of {self}", dashed.replace('-', "_")),
            Origin::Toml(..) => format!("{dashed} of {self}"),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flags => f.write_str("the command-line flags"),
            Origin::VmArg(i) => write!(f, "--vm #{}", i + 1),
            Origin::File(path, i) => write!(f, "vms[{i}] in {}", path.display()),
            Origin::Toml(path, i) => write!(f, "vm[{i}] in {}", path.display()),
            Origin::Code(i) => write!(f, "vms[{i}]"),
        }
    }
}

/// Fills in each VM's defaults (`max_connections` where the VM sets none), labels its warnings
/// with where it was described, then applies the rules across VMs.
fn finish_vms(
    specs: Vec<(VmSpec, Origin)>,
    max_connections: usize,
    warnings: &mut Vec<String>,
) -> Result<Vec<VmConfig>, ConfigError> {
    let mut vms = Vec::with_capacity(specs.len());
    let mut origins = Vec::with_capacity(specs.len());
    for (spec, origin) in specs {
        let (vm, spec_warnings) = spec.finish(max_connections);
        warnings.extend(spec_warnings.into_iter().map(|w| format!("{origin}: {w}")));
        vms.push(vm);
        origins.push(origin);
    }
    let labelled: Vec<_> = vms.iter().zip(origins).collect();
    check_unique(&labelled)?;
    Ok(vms)
}

/// Entry points of the fuzz targets (`host/fuzz`): the `--vm` value and YAML parsers without
/// clap and the file system (which would dominate each run), followed by the same defaults and
/// cross-VM rules as the command line.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    use super::{cli, finish_vms, yaml, ConfigError, Origin, VmConfig, DEFAULT_MAX_CONNECTIONS};

    /// The VMs of one `--vm` option per value, as the command line gives them.
    pub fn parse_vm_args(values: &[&str]) -> Result<Vec<VmConfig>, String> {
        let specs = values
            .iter()
            .enumerate()
            .map(|(i, v)| Ok((cli::parse_vm_arg(v)?, Origin::VmArg(i))))
            .collect::<Result<Vec<_>, String>>()?;
        finish_vms(specs, DEFAULT_MAX_CONNECTIONS, &mut Vec::new()).map_err(|e| e.to_string())
    }

    /// The VMs of a `--config` file holding `text`.
    pub fn parse_yaml(text: &str) -> Result<Vec<VmConfig>, ConfigError> {
        let path = Path::new("fuzz.yaml");
        let loaded = yaml::parse_str(path, text)?;
        let specs = loaded
            .specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| (spec, Origin::File(path.to_path_buf(), i)))
            .collect();
        let mut warnings = loaded.warnings;
        finish_vms(specs, DEFAULT_MAX_CONNECTIONS, &mut warnings)
    }
}

/// Rules across VMs: CIDs unique; every socket path (vhost-user and hybrid vsock, of all VMs)
/// distinct. Paths compare lexically (`a//b` equals `a/b`; symlinks are not resolved).
fn check_unique(vms: &[(&VmConfig, Origin)]) -> Result<(), ConfigError> {
    // Hash maps, not lists: a daemon with thousands of VMs checks them in linear time.
    // `Path`'s hash agrees with its lexical equality.
    let mut cids: std::collections::HashMap<u64, &Origin> = Default::default();
    let mut paths: std::collections::HashMap<&Path, String> = Default::default();
    // A host AF_VSOCK port is listened on for any CID: one VM per port.
    let mut ports: std::collections::HashMap<u32, &Origin> = Default::default();
    for (vm, origin) in vms {
        for port in vm.forward.iter().flat_map(|f| &f.listen) {
            if let Some(first) = ports.insert(*port, origin) {
                return Err(ConfigError::DuplicateForwardPort {
                    port: *port,
                    first: first.field("forward-listen"),
                    second: origin.field("forward-listen"),
                });
            }
        }
        if let Some(first) = cids.insert(vm.guest_cid, origin) {
            return Err(ConfigError::DuplicateCid {
                cid: vm.guest_cid,
                first: first.to_string(),
                second: origin.to_string(),
            });
        }
        for (path, field) in [(&vm.socket, "socket"), (&vm.uds_path, "uds-path")] {
            if path.as_os_str().is_empty() {
                continue; // no hybrid socket: the VM forwards over AF_VSOCK
            }
            let label = origin.field(field);
            if let Some(first) = paths.get(path.as_path()) {
                return Err(ConfigError::DuplicatePath {
                    path: path.clone(),
                    first: first.clone(),
                    second: label,
                });
            }
            paths.insert(path, label);
        }
    }
    Ok(())
}

fn check_guest_cid(cid: u64) -> Result<u64, String> {
    if cid < 3 {
        Err(format!(
            "guest CID {cid} is reserved (0: hypervisor, 1: local, 2: host); use 3 or more"
        ))
    } else if cid >= u64::from(u32::MAX) {
        Err(format!(
            "guest CID {cid} is out of range: virtio-vsock reserves the upper 32 bits and \
             0xffffffff means any CID; use at most 4294967294"
        ))
    } else {
        Ok(cid)
    }
}

fn check_forward_cid(cid: u64) -> Result<u32, String> {
    match u32::try_from(cid) {
        Ok(VSOCK_ANY) => Err(format!(
            "forward CID {VSOCK_ANY} means any CID and cannot be connected to; \
             use e.g. 1 (this host's loopback) or the CID of the VM to reach"
        )),
        Ok(c) => Ok(c),
        Err(_) => Err(format!(
            "forward CID {cid} is out of range (at most 4294967294)"
        )),
    }
}

/// `9001+9002` -> `[9001, 9002]`: decimal ports joined by `+`, each at most 4294967294
/// (4294967295 means any port), none twice.
fn parse_forward_listen(value: &str) -> Result<Vec<u32>, String> {
    let mut ports = Vec::new();
    for item in value.trim().split('+') {
        let port = item.trim().parse::<u32>().map_err(|e| {
            format!("`{value}` is not a list of ports joined by '+': `{item}`: {e}")
        })?;
        ports.push(port);
    }
    check_forward_ports(&ports)?;
    Ok(ports)
}

fn check_forward_ports(ports: &[u32]) -> Result<(), String> {
    for (i, p) in ports.iter().enumerate() {
        if *p == VSOCK_ANY {
            return Err(format!(
                "port {VSOCK_ANY} means any port and cannot be listened on"
            ));
        }
        if ports[..i].contains(p) {
            return Err(format!("port {p} is listed twice"));
        }
    }
    Ok(())
}

fn check_tx_buffer_size(size: u64) -> Result<u32, String> {
    if size == 0 {
        Err("TX buffer size must be greater than 0".into())
    } else if size > u64::from(MAX_TX_BUFFER_SIZE) {
        Err(format!(
            "TX buffer size {size} is too large; the limit is {MAX_TX_BUFFER_SIZE} (64 MiB)"
        ))
    } else {
        Ok(size as u32)
    }
}

fn check_queue_size(size: u64) -> Result<u16, String> {
    if size == 0 || size > u64::from(MAX_QUEUE_SIZE) || !size.is_power_of_two() {
        Err(format!(
            "queue size {size} is not a power of two between 1 and {MAX_QUEUE_SIZE}"
        ))
    } else {
        Ok(size as u16)
    }
}

fn check_max_connections(n: u64) -> Result<usize, String> {
    match usize::try_from(n) {
        Ok(0) => Err("max connections must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("max connections {n} is too large")),
    }
}

fn check_max_buffered(n: u64) -> Result<usize, String> {
    let min = u64::from(MIN_WINDOW);
    match usize::try_from(n) {
        Ok(n) if n as u64 >= min => Ok(n),
        Ok(_) => Err(format!("max buffered must be at least {min} bytes")),
        Err(_) => Err(format!("max buffered {n} is too large")),
    }
}

fn check_path(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        Err("path must not be empty".into())
    } else {
        Ok(())
    }
}

/// Parses a decimal number (leading `+` allowed, as Rust's and so the peer's parser).
fn parse_number(value: &str) -> Result<u64, String> {
    value
        .parse::<u64>()
        .map_err(|e| format!("`{value}` is not a non-negative integer: {e}"))
}

/// `a+b` -> `["a", "b"]`, kept literally as the peer does (`""` is a group named `""`).
fn split_groups(value: &str) -> Vec<String> {
    value.split('+').map(String::from).collect()
}

#[cfg(test)]
mod tests;
