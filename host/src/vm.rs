//! One VM: its listening sockets and the loop that serves one frontend after another.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tracing::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{VsockBackend, EXIT_EVENT, HOST_EVENT};
use crate::config::VmConfig;
use crate::device::{Device, DeviceConfig, Listeners};
use crate::gate::{Gate, PluginSet};
use crate::handover::Slots;
use crate::migration::StatePlugins;
use crate::plugin::Serializer;
use crate::siblings::Registry;
use crate::stats::VmStats;
use crate::sys::{self, UnixKind};

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vhost-user socket {path}: {source}")]
    VhostSocket {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("plugins: {0}")]
    Plugin(#[from] crate::plugin::PluginError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where host programs reach a VM: `<uds_path>` for streams and `<uds_path>.seqpacket` for
/// SEQPACKET connections.
pub fn seqpacket_path(uds_path: &std::path::Path) -> PathBuf {
    let mut p = uds_path.as_os_str().to_owned();
    p.push(".seqpacket");
    PathBuf::from(p)
}

/// Ends a session's vring workers when dropped.
struct StopWorkers(Arc<VsockBackend>);

impl Drop for StopWorkers {
    fn drop(&mut self) {
        self.0.stop_workers();
    }
}

/// What the control socket and the metrics endpoint can see and change of one VM: the one
/// narrow way the daemon layer reaches a running VM.
pub struct VmHandle {
    pub cid: u64,
    pub gate: Arc<Mutex<Gate>>,
    pub serializer: Arc<Mutex<Serializer>>,
    pub stats: Arc<VmStats>,
    pub handover: Arc<Slots>,
    /// Connection limit of the VM; bounds the sockets a handover may bring.
    pub max_connections: usize,
}

pub struct Vm {
    cfg: VmConfig,
    registry: Arc<Registry>,
    budget: Arc<crate::budget::Budget>,
    stream: OwnedFd,
    seqpacket: OwnedFd,
    listener: Listener,
    /// Outlives frontend sessions, so plugin state survives a VMM reconnect.
    gate: Arc<std::sync::Mutex<Gate>>,
    serializer: Arc<std::sync::Mutex<Serializer>>,
    stats: Arc<VmStats>,
    handover: Arc<Slots>,
}

impl Vm {
    /// Creates the host-side listeners (they persist across frontend sessions, so host
    /// programs can connect while no VMM is attached and are served when one is).
    pub fn new(
        cfg: VmConfig,
        registry: Arc<Registry>,
        budget: Arc<crate::budget::Budget>,
        plugins: &PluginSet,
    ) -> Result<Self, VmError> {
        let name = format!("cid-{}", cfg.guest_cid);
        let stats = Arc::new(VmStats::default());
        let mut gate = plugins.gate(&name)?;
        gate.set_stats(stats.clone());
        let gate = Arc::new(std::sync::Mutex::new(gate));
        let serializer = plugins.serializer_for(&name)?;
        let _ = stats
            .counters
            .serializer
            .set((serializer.name().to_string(), serializer.counters()));
        let serializer = Arc::new(std::sync::Mutex::new(serializer));
        let listen = |path: PathBuf, kind| {
            sys::listen(&path, kind, 1024).map_err(|source| VmError::Listen { path, source })
        };
        let stream = listen(cfg.uds_path.clone(), UnixKind::Stream)?;
        let seqpacket = listen(seqpacket_path(&cfg.uds_path), UnixKind::Seqpacket)?;
        let listener = Listener::new(&cfg.socket, true).map_err(|source| VmError::VhostSocket {
            path: cfg.socket.clone(),
            source,
        })?;
        registry.add_vm(cfg.guest_cid, cfg.groups.clone());
        Ok(Vm {
            cfg,
            registry,
            budget,
            stream,
            seqpacket,
            listener,
            gate,
            serializer,
            stats,
            handover: Arc::default(),
        })
    }

    /// What the control socket sees of this VM.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            cid: self.cfg.guest_cid,
            gate: self.gate.clone(),
            serializer: self.serializer.clone(),
            stats: self.stats.clone(),
            handover: self.handover.clone(),
            max_connections: self.cfg.max_connections,
        }
    }

    /// Files this VM created, to remove on exit.
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        vec![
            self.cfg.socket.clone(),
            self.cfg.uds_path.clone(),
            seqpacket_path(&self.cfg.uds_path),
        ]
    }

    /// Serves frontends on the vhost-user socket, one after another, forever.
    pub fn run(mut self) -> Result<(), VmError> {
        info!(cid = self.cfg.guest_cid, socket = ?self.cfg.socket, "waiting for a frontend");
        loop {
            self.serve_one()?;
        }
    }

    /// Blocks until a frontend connects. Nothing of a session (device, vring worker thread,
    /// plugin instances) exists before that, so an idle VM costs one blocked thread.
    fn wait_frontend(&self) -> Result<(), VmError> {
        let mut pfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: `pfd` is one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, -1) };
            if n > 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if n < 0 && e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
    }

    /// Instantiates the VM's policy and bridge plugins for a frontend that is connecting; if
    /// they cannot start, that frontend is refused (accepted and closed) and this VM waits
    /// for the next one. Other VMs are not affected.
    fn plugins_ready(&mut self) -> bool {
        let cid = self.cfg.guest_cid;
        let r = self.gate.lock().unwrap_or_else(|p| p.into_inner()).start();
        match r {
            Ok(()) => true,
            Err(e) => {
                error!(cid, error = %e, "plugins cannot start; frontend refused");
                if let Err(e) = self.listener.accept() {
                    warn!(cid, error = %e, "accepting the refused frontend");
                }
                false
            }
        }
    }

    fn serve_one(&mut self) -> Result<(), VmError> {
        let cid = self.cfg.guest_cid;
        self.wait_frontend()?;
        if !self.plugins_ready() {
            return Ok(());
        }
        let mut dev = Device::new(
            DeviceConfig {
                guest_cid: cid,
                uds_path: self.cfg.uds_path.clone(),
                buf_alloc: self.cfg.tx_buffer_size,
                max_connections: self.cfg.max_connections,
                budget: self.budget.clone(),
                connect_wait: self.cfg.connect_wait,
            },
            self.registry.clone(),
        )?;
        dev.set_gate(self.gate.clone());
        dev.set_stats(self.stats.clone());
        let state = StatePlugins {
            gate: self.gate.clone(),
            serializer: self.serializer.clone(),
        };
        let backend = Arc::new(VsockBackend::new(
            dev,
            usize::from(self.cfg.queue_size),
            state,
            self.handover.clone(),
        )?);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(format!("vsock-{cid}"), backend.clone(), mem)
            .map_err(|e| VmError::Daemon(e.to_string()))?;
        // Declared after `daemon`, so dropped before it: the workers are told to exit before
        // vhost-user-backend joins them, on every way out of this function.
        let _stop = StopWorkers(backend.clone());
        let host_fd = backend.device().epoll_fd();
        for h in daemon.get_epoll_handlers() {
            h.register_listener(host_fd, EventSet::IN, u64::from(HOST_EVENT))?;
            h.register_listener(backend.exit_fd(), EventSet::IN, u64::from(EXIT_EVENT))?;
        }
        daemon
            .start(&mut self.listener)
            .map_err(|e| VmError::Daemon(e.to_string()))?;
        info!(cid, "frontend connected");
        self.stats.frontend.store(true, Ordering::Relaxed);
        let inbox = self.registry.open(cid)?;
        backend.device().attach(
            Listeners {
                stream: self.stream.as_raw_fd(),
                seqpacket: self.seqpacket.as_raw_fd(),
            },
            inbox,
        )?;
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected
                | vhost::vhost_user::Error::PartialMessage
                | vhost::vhost_user::Error::SocketBroken(_),
            )) => info!(cid, "frontend disconnected"),
            Err(e) => warn!(cid, error = %e, "frontend session ended"),
        }
        self.registry.close(cid);
        self.stats.frontend.store(false, Ordering::Relaxed);
        self.stats.conns.set_waker(None);
        backend.stop_workers();
        backend.device().drop_all();
        Ok(())
    }
}
