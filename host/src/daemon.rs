//! The daemon: every configured VM on its own thread, and a clean exit on SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{error, info, warn};

use crate::config::DaemonConfig;
use crate::control::ControlServer;
use crate::gate::PluginSet;
use crate::metrics::MetricsServer;
use crate::plugin::cache::CacheDir;
use crate::siblings::Registry;
use crate::vm::{Sockets, Vm};

/// Runs until SIGINT or SIGTERM; then removes the sockets it created and returns.
pub fn run(cfg: DaemonConfig) -> anyhow::Result<()> {
    // The operator's directory, else the default location (see `plugin::cache`).
    let cache = match &cfg.plugin_cache {
        Some(dir) => Some(CacheDir::required(dir.clone())),
        None => CacheDir::default_location(),
    };
    // Started by a live upgrade, the process already runs in the old daemon's Landlock domain
    // (inherited across exec, built from the same arguments); adding another layer each time
    // would reach Landlock's limit of 16 after 15 upgrades.
    if cfg.landlock && std::env::var_os(crate::upgrade::ENV_FD).is_none() {
        sandbox(&cfg, cache.as_ref())?;
    } else if cfg.landlock {
        info!("landlock sandbox inherited from the daemon this one upgrades");
    }
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    crate::upgrade::remember_exe();
    let chan = crate::upgrade::inherited_channel();
    let registry = Arc::new(Registry::default());
    let budget = Arc::new(crate::budget::Budget::new(cfg.max_buffered));
    let plugins = Arc::new(
        PluginSet::load(&cfg.plugins, &cfg.allow_routes, cache, registry.clone())
            .context("loading plugins")?,
    );
    // Started by a live upgrade: the listening sockets come from the old daemon (once the
    // plugins are ready, so a plugin that fails here fails before anything moved).
    let (mut adopted_sockets, metrics_fd) = match &chan {
        Some(c) => {
            let cids: Vec<u64> = cfg.vms.iter().map(|v| v.guest_cid).collect();
            let got = crate::upgrade::receive_listeners(c, &cids).context("live upgrade")?;
            (got.vms.into_iter().map(Some).collect(), got.metrics)
        }
        None => (Vec::new(), None),
    };
    let mut paths: Vec<OwnedPath> = Vec::new();
    let mut vms = Vec::new();
    for (i, vm_cfg) in cfg.vms.into_iter().enumerate() {
        let cid = vm_cfg.guest_cid;
        let sockets = match adopted_sockets.get_mut(i).and_then(Option::take) {
            Some(fds) => Sockets::Adopted(fds),
            None => Sockets::Bind,
        };
        // A VM with its own plugins or routes gets its own plugin set; the others share one.
        let own = if vm_cfg.plugins.is_empty() && vm_cfg.allow_routes.is_empty() {
            None
        } else {
            let specs = if vm_cfg.plugins.is_empty() {
                &cfg.plugins
            } else {
                &vm_cfg.plugins
            };
            let routes: Vec<_> = cfg
                .allow_routes
                .iter()
                .chain(&vm_cfg.allow_routes)
                .cloned()
                .collect();
            match plugins.sibling_set(specs, &routes, registry.clone()) {
                Ok(set) => Some(set),
                Err(e) => {
                    remove_all(&paths);
                    return Err(e).with_context(|| format!("plugins of the VM with CID {cid}"));
                }
            }
        };
        let vm = Vm::new(
            vm_cfg,
            registry.clone(),
            budget.clone(),
            own.as_ref().unwrap_or(&plugins),
            sockets,
        );
        let vm = match vm {
            Ok(vm) => vm,
            Err(e) => {
                remove_all(&paths);
                return Err(e).with_context(|| format!("VM with CID {cid}"));
            }
        };
        // Sockets handed over are the old daemon's until the upgrade is done.
        if chan.is_none() {
            paths.extend(vm.socket_paths().into_iter().map(OwnedPath::new));
        }
        vms.push(vm);
    }
    let ctl_handles: Vec<_> = vms.iter().map(Vm::handle).collect();
    let metrics_handles: Vec<_> = vms.iter().map(Vm::handle).collect();
    if let Some(c) = &chan {
        let vm_paths: Vec<_> = vms.iter().flat_map(Vm::socket_paths).collect();
        adopt(c, std::mem::take(&mut vms))?;
        crate::upgrade::wait_old_exit(c);
        paths.extend(vm_paths.into_iter().map(OwnedPath::new));
    }
    if let Some(path) = &cfg.control_socket {
        let handles = ctl_handles;
        let server = ControlServer::bind(path, handles, plugins.clone())
            .with_context(|| format!("control socket {}", path.display()))?;
        paths.push(OwnedPath::new(server.path().to_path_buf()));
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || server.run())
            .context("spawning control thread")?;
    }
    if let Some(addr) = &cfg.metrics {
        let server = match MetricsServer::bind(addr, metrics_fd, metrics_handles) {
            Ok(s) => s,
            Err(e) => {
                remove_all(&paths);
                return Err(e).context("--metrics");
            }
        };
        paths.extend(server.path().map(|p| OwnedPath::new(p.to_path_buf())));
        match server.listener_dup() {
            Ok(fd) => crate::listenset::offer_metrics(fd),
            Err(e) => warn!(error = %e, "a live upgrade will bind the metrics endpoint again"),
        }
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || server.run())
            .context("spawning metrics thread")?;
    }
    let count = if chan.is_some() {
        adopted_count()
    } else {
        vms.len()
    };
    for vm in vms {
        std::thread::Builder::new()
            .name("vm".into())
            .spawn(move || {
                if let Err(e) = vm.run() {
                    error!(error = %e, "VM stopped");
                }
            })
            .context("spawning VM thread")?;
    }
    // Every socket exists now: a VMM started after this finds them.
    match crate::residency::release_startup_pages() {
        Ok(r) => tracing::debug!(?r, "start-up code unmapped"),
        Err(e) => warn!(error = %e, "cannot release start-up memory"),
    }
    notify_systemd(&[
        sd_notify::NotifyState::MainPid(std::process::id()),
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving {count} VM(s)")),
    ]);
    if let Some(sig) = signals.forever().next() {
        info!(signal = sig, "exiting");
    }
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    remove_all(&paths);
    Ok(())
}

static ADOPTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn adopted_count() -> usize {
    ADOPTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// New daemon of a live upgrade: starts every VM's thread waiting for its session, then
/// adopts what the old daemon hands over. VMs it never gets end their threads.
fn adopt(chan: &std::os::unix::net::UnixStream, vms: Vec<Vm>) -> anyhow::Result<()> {
    let mut queues = std::collections::BTreeMap::new();
    let mut threads = Vec::new();
    let handles: Vec<_> = vms.iter().map(Vm::handle).collect();
    let (prepared, ready) = std::sync::mpsc::channel();
    for vm in vms {
        let (tx, rx) = std::sync::mpsc::channel();
        queues.insert(vm.cid(), tx);
        let prepared = prepared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("vm".into())
                .spawn(move || {
                    if let Err(e) = vm.run_adopting(prepared, rx) {
                        error!(error = %e, "VM stopped");
                    }
                })
                .context("spawning VM thread")?,
        );
    }
    drop(prepared);
    // Every VM's thread has its plugin instances (or is gone) once the senders are dropped.
    while ready.recv().is_ok() {}
    // If the old daemon is gone already, `adopt_all` sees the channel closed and takes over.
    if let Err(e) = crate::upgrade::send_ready(chan) {
        warn!(error = %e, "live upgrade: cannot say ready");
    }
    let out = crate::upgrade::adopt_all(chan, queues, &handles);
    let n = out.adopted + out.taken_over;
    ADOPTED.store(n, std::sync::atomic::Ordering::Relaxed);
    if n == 0 {
        anyhow::bail!("live upgrade: no VM was handed over");
    }
    if !out.complete {
        warn!(
            adopted = n,
            "live upgrade incomplete: the old daemon keeps the rest"
        );
    }
    Ok(())
}

/// Tells systemd (`Type=notify`, `NOTIFY_SOCKET`) how the daemon is doing; nothing without it.
fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// Enters the Landlock sandbox. Called before any thread exists, so all of them inherit it.
fn sandbox(cfg: &DaemonConfig, cache: Option<&CacheDir>) -> anyhow::Result<()> {
    // Landlock rules name existing directories.
    let mut plan = crate::sandbox::Plan::new(cfg);
    match cache {
        Some(c) if !c.best_effort => crate::sys::create_private_dir(&c.path)
            .with_context(|| format!("--plugin-cache {}", c.path.display()))?,
        Some(c) => match crate::sys::create_private_dir(&c.path) {
            Ok(()) if !plan.write_dirs.contains(&c.path) => plan.write_dirs.push(c.path.clone()),
            Ok(()) => {}
            Err(e) => warn!(dir = %c.path.display(), error = %e, "plugin cache unavailable"),
        },
        None => {}
    }
    let enforced = crate::sandbox::apply(&plan)?;
    match enforced {
        crate::sandbox::Enforcement::Full => info!(?plan, "landlock sandbox fully enforced"),
        crate::sandbox::Enforcement::Partial => warn!(
            ?plan,
            "landlock sandbox partially enforced: this kernel's Landlock is older than ABI 7"
        ),
    }
    Ok(())
}

/// A socket file this daemon created, known by its inode: after a same-host handover the
/// path may belong to the new daemon, and then it is left alone.
struct OwnedPath {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl OwnedPath {
    fn new(path: PathBuf) -> Self {
        let id = file_id(&path);
        OwnedPath { path, id }
    }
}

fn file_id(p: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn remove_all(paths: &[OwnedPath]) {
    for p in paths {
        if p.id.is_some() && file_id(&p.path) == p.id {
            let _ = std::fs::remove_file(&p.path);
        }
    }
}
