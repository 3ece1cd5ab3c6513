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
use crate::vm::Vm;

/// Runs until SIGINT or SIGTERM; then removes the sockets it created and returns.
pub fn run(cfg: DaemonConfig) -> anyhow::Result<()> {
    // The operator's directory, else the default location (see `plugin::cache`).
    let cache = match &cfg.plugin_cache {
        Some(dir) => Some(CacheDir::required(dir.clone())),
        None => CacheDir::default_location(),
    };
    if cfg.landlock {
        sandbox(&cfg, cache.as_ref())?;
    }
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let registry = Arc::new(Registry::default());
    let budget = Arc::new(crate::budget::Budget::new(cfg.max_buffered));
    let plugins = Arc::new(
        PluginSet::load(&cfg.plugins, &cfg.allow_routes, cache, registry.clone())
            .context("loading plugins")?,
    );
    let mut paths: Vec<OwnedPath> = Vec::new();
    let mut vms = Vec::new();
    for vm_cfg in cfg.vms {
        let cid = vm_cfg.guest_cid;
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
        );
        let vm = match vm {
            Ok(vm) => vm,
            Err(e) => {
                remove_all(&paths);
                return Err(e).with_context(|| format!("VM with CID {cid}"));
            }
        };
        paths.extend(vm.socket_paths().into_iter().map(OwnedPath::new));
        vms.push(vm);
    }
    if let Some(path) = &cfg.control_socket {
        let handles = vms.iter().map(Vm::handle).collect();
        let server = ControlServer::bind(path, handles, plugins.clone())
            .with_context(|| format!("control socket {}", path.display()))?;
        paths.push(OwnedPath::new(server.path().to_path_buf()));
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || server.run())
            .context("spawning control thread")?;
    }
    if let Some(addr) = &cfg.metrics {
        let handles = vms.iter().map(Vm::handle).collect();
        let server = match MetricsServer::bind(addr, handles) {
            Ok(s) => s,
            Err(e) => {
                remove_all(&paths);
                return Err(e).context("--metrics");
            }
        };
        paths.extend(server.path().map(|p| OwnedPath::new(p.to_path_buf())));
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || server.run())
            .context("spawning metrics thread")?;
    }
    let count = vms.len();
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
