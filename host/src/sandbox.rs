//! Optional self-sandboxing with Landlock (`--landlock`).
//!
//! Applied at the start of `daemon::run`, before any thread exists: Landlock restricts the
//! calling thread and the threads it creates later, so every worker inherits it. The rules
//! are written for Landlock ABI 7 and requested best-effort: an older kernel enforces what it
//! knows; a kernel without Landlock is an error, since the operator asked for it.
//!
//! What the daemon keeps:
//! - read access to files and directories everywhere (plugins to load or swap in, state
//!   files to `ctl load`, `/proc/self`), never execute;
//! - in the directories of its own sockets (vhost-user, hybrid `uds-path`, control, metrics):
//!   creating and removing sockets;
//! - in the plugin cache and each `--landlock-rw DIR`: creating, writing, truncating and
//!   replacing regular files (`ctl save` targets go there);
//! - TCP: connecting only to the ports of `--allow-route tcp:` entries (unrestricted when one
//!   of them allows any port), binding only the `--metrics` port;
//! - no signals to processes outside the sandbox, no abstract unix sockets outside it.

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use crate::config::MetricsAddr;
use crate::config::{DaemonConfig, RouteSpec};
use crate::plugin::tcp_route_port;

/// The Landlock ABI the rules are written and tested for.
const TARGET_ABI: ABI = ABI::V7;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("--landlock: this kernel does not support Landlock (or it is disabled)")]
    Unsupported,
    #[error("--landlock: cannot open {path}: {reason}")]
    Path { path: PathBuf, reason: String },
    #[error("--landlock: {0}")]
    Ruleset(#[from] landlock::RulesetError),
}

/// How much of the sandbox the kernel enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    Full,
    /// The kernel's Landlock is older than ABI 7: some rights are not restricted.
    Partial,
}

/// What the sandbox allows, derived from the daemon's configuration.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Directories where sockets are created and removed.
    pub socket_dirs: Vec<PathBuf>,
    /// Directories where regular files are written.
    pub write_dirs: Vec<PathBuf>,
    /// TCP ports the daemon may connect to; `None`: any (a route allows every port).
    pub connect_ports: Option<Vec<u16>>,
    /// TCP ports the daemon may bind.
    pub bind_ports: Vec<u16>,
    /// Files the daemon may execute: its own binary and that binary's ELF interpreter, for
    /// a live upgrade (`ctl upgrade` starts the daemon's own path again).
    pub exec_files: Vec<PathBuf>,
}

impl Plan {
    pub fn new(cfg: &DaemonConfig) -> Plan {
        let mut plan = Plan {
            exec_files: own_executables(),
            ..Plan::default()
        };
        let mut socket_file = |p: &Path| push_unique(&mut plan.socket_dirs, parent_dir(p));
        for vm in &cfg.vms {
            socket_file(&vm.socket);
            if vm.forward.is_none() {
                socket_file(&vm.uds_path);
            }
        }
        if let Some(p) = &cfg.control_socket {
            socket_file(p);
        }
        match &cfg.metrics {
            Some(MetricsAddr::Unix(p)) => socket_file(p),
            Some(MetricsAddr::Tcp(a)) => plan.bind_ports.push(a.port()),
            None => {}
        }
        if let Some(dir) = &cfg.plugin_cache {
            push_unique(&mut plan.write_dirs, dir.clone());
        }
        for dir in &cfg.landlock_rw {
            push_unique(&mut plan.write_dirs, dir.clone());
        }
        let routes = cfg
            .allow_routes
            .iter()
            .chain(cfg.vms.iter().flat_map(|v| &v.allow_routes));
        // A malformed route stops the daemon when its plugins load; it needs no rule here.
        let ports: Option<Vec<u16>> = routes
            .filter_map(|r| match r {
                RouteSpec::Tcp(t) => tcp_route_port(t).ok(),
                RouteSpec::UnixDir(_) | RouteSpec::Vsock(_) => None,
            })
            .collect();
        plan.connect_ports = ports.map(|mut p| {
            p.sort_unstable();
            p.dedup();
            p
        });
        plan
    }
}

/// Restricts this thread and every thread it creates from now on.
pub fn apply(plan: &Plan) -> Result<Enforcement, SandboxError> {
    let abi = TARGET_ABI;
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let sockets = AccessFs::MakeSock | AccessFs::RemoveFile;
    let files: BitFlags<AccessFs> =
        AccessFs::WriteFile | AccessFs::MakeReg | AccessFs::RemoveFile | AccessFs::Truncate;
    let mut net: BitFlags<AccessNet> = AccessNet::BindTcp.into();
    if plan.connect_ports.is_some() {
        net |= AccessNet::ConnectTcp;
    }
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(net)?
        .scope(Scope::from_all(abi))?
        .create()?
        .add_rule(PathBeneath::new(path_fd(Path::new("/"))?, read))?;
    for dir in &plan.socket_dirs {
        ruleset = ruleset.add_rule(PathBeneath::new(path_fd(dir)?, sockets))?;
    }
    for dir in &plan.write_dirs {
        ruleset = ruleset.add_rule(PathBeneath::new(path_fd(dir)?, files))?;
    }
    for f in &plan.exec_files {
        let x = AccessFs::Execute | AccessFs::ReadFile;
        ruleset = ruleset.add_rule(PathBeneath::new(path_fd(f)?, x))?;
    }
    for &port in plan.connect_ports.iter().flatten() {
        ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::ConnectTcp))?;
    }
    for &port in &plan.bind_ports {
        ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::BindTcp))?;
    }
    match ruleset.restrict_self()?.ruleset {
        RulesetStatus::FullyEnforced => Ok(Enforcement::Full),
        RulesetStatus::PartiallyEnforced => Ok(Enforcement::Partial),
        RulesetStatus::NotEnforced => Err(SandboxError::Unsupported),
    }
}

/// This process's executable and the dynamic loader mapped into it (executing a dynamically
/// linked binary opens its interpreter for execution too).
fn own_executables() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::env::current_exe().into_iter().collect();
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        let loader = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| {
                Path::new(p)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("ld-linux") || n.starts_with("ld-musl"))
            });
        if let Some(l) = loader {
            push_unique(&mut v, PathBuf::from(l));
        }
    }
    v
}

fn path_fd(path: &Path) -> Result<PathFd, SandboxError> {
    PathFd::new(path).map_err(|e| SandboxError::Path {
        path: path.to_path_buf(),
        reason: std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string),
    })
}

/// The directory a socket file lives in (`.` for a bare file name).
fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn push_unique(v: &mut Vec<PathBuf>, p: PathBuf) {
    if !v.contains(&p) {
        v.push(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;

    #[test]
    fn plan_from_config() {
        let mut cfg = DaemonConfig::new(vec![VmConfig::new(3, "/run/a/vhost.sock", "vm3.vsock")]);
        cfg.control_socket = Some("/run/a/ctl.sock".into());
        cfg.metrics = Some(MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap()));
        cfg.plugin_cache = Some("/var/cache/vp".into());
        cfg.landlock_rw = vec!["/var/lib/vp".into()];
        cfg.allow_routes = vec![
            "tcp:127.0.0.1:8080".parse().unwrap(),
            "unix:/srv/routes".parse().unwrap(),
        ];
        let plan = Plan::new(&cfg);
        assert_eq!(
            plan.socket_dirs,
            [PathBuf::from("/run/a"), PathBuf::from(".")]
        );
        assert_eq!(
            plan.write_dirs,
            [PathBuf::from("/var/cache/vp"), PathBuf::from("/var/lib/vp")]
        );
        assert_eq!(plan.connect_ports, Some(vec![8080]));
        assert_eq!(plan.bind_ports, [9100]);

        cfg.allow_routes.push("tcp:localhost:*".parse().unwrap());
        assert_eq!(Plan::new(&cfg).connect_ports, None, "any port: no TCP rule");
    }

    /// Landlock binds the calling thread only, so the test sandboxes a thread of its own.
    #[test]
    fn apply_restricts_the_calling_thread() {
        use std::io::ErrorKind::PermissionDenied;
        use std::net::{TcpListener, TcpStream};
        let dir = tempfile::tempdir().unwrap();
        let (rw, ro) = (dir.path().join("rw"), dir.path().join("ro"));
        std::fs::create_dir(&rw).unwrap();
        std::fs::create_dir(&ro).unwrap();
        let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
        let denied = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, d) = (allowed.local_addr().unwrap(), denied.local_addr().unwrap());
        let plan = Plan {
            write_dirs: vec![rw.clone()],
            connect_ports: Some(vec![a.port()]),
            ..Plan::default()
        };
        std::thread::spawn(move || {
            match apply(&plan) {
                Err(SandboxError::Unsupported) => return,
                r => r.unwrap(),
            };
            std::fs::write(rw.join("f"), b"x").unwrap();
            assert_eq!(std::fs::read(rw.join("f")).unwrap(), b"x");
            let e = std::fs::write(ro.join("f"), b"x").unwrap_err();
            assert_eq!(e.kind(), PermissionDenied, "write outside the plan");
            TcpStream::connect(a).unwrap();
            let e = TcpStream::connect(d).unwrap_err();
            assert_eq!(
                e.kind(),
                PermissionDenied,
                "connect to a port outside the plan"
            );
            let e = TcpListener::bind("127.0.0.1:0").unwrap_err();
            assert_eq!(e.kind(), PermissionDenied, "bind outside the plan");
            let e = std::process::Command::new("/bin/true")
                .status()
                .unwrap_err();
            assert_eq!(e.kind(), PermissionDenied, "exec");
        })
        .join()
        .unwrap();
    }
}
