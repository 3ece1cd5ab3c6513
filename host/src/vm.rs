//! One VM: its listening sockets and the loop that serves one frontend after another.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use thiserror::Error;
use tracing::{error, info, warn};
use vhost::vhost_user::Listener;

use crate::config::VmConfig;
use crate::device::{DeviceConfig, Listeners};
use crate::gate::{Gate, PluginSet};
use crate::handover::Slots;
use crate::migration::StatePlugins;
use crate::plugin::Serializer;
use crate::session::{
    Adoption, Handed, Parked, Session, SessionEnv, UpgradeCmd, UpgradeSlot, Verdict,
};
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
    #[error("cannot listen on host vsock port {port} (forward-listen): {source}")]
    ListenVsock { port: u32, source: std::io::Error },
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
    Session(#[from] crate::session::SessionError),
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
    /// Live upgrade: where the upgrade driver reaches the VM's thread.
    pub upgrade: Arc<UpgradeSlot>,
}

/// How a VM's thread goes on after a session or an upgrade step.
enum Flow {
    Continue,
    /// The VM moved to another daemon: this thread ends.
    Exit,
}

pub struct Vm {
    cfg: VmConfig,
    registry: Arc<Registry>,
    budget: Arc<crate::budget::Budget>,
    /// The hybrid vsock listeners (none with the forwarding backend).
    stream: Option<OwnedFd>,
    seqpacket: Option<OwnedFd>,
    /// `forward-listen`: (listener, port).
    forward: Vec<(OwnedFd, u32)>,
    listener: Listener,
    /// Outlives frontend sessions, so plugin state survives a VMM reconnect.
    gate: Arc<std::sync::Mutex<Gate>>,
    serializer: Arc<std::sync::Mutex<Serializer>>,
    stats: Arc<VmStats>,
    handover: Arc<Slots>,
    upgrade: Arc<UpgradeSlot>,
    /// Pre-handed to a new daemon in a running upgrade: frontends wait in the backlog.
    parked: bool,
}

/// Where a VM's listening sockets come from: bound here, or handed over by an old daemon
/// (vhost-user first, then stream and seqpacket, or the `forward-listen` ones in
/// configuration order: what [`Vm::listener_dups`] gives).
pub enum Sockets {
    Bind,
    Adopted(Vec<OwnedFd>),
}

impl Vm {
    /// Creates the host-side listeners (they persist across frontend sessions, so host
    /// programs can connect while no VMM is attached and are served when one is).
    pub fn new(
        cfg: VmConfig,
        registry: Arc<Registry>,
        budget: Arc<crate::budget::Budget>,
        plugins: &PluginSet,
        sockets: Sockets,
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
        let (listener, stream, seqpacket, forward) = match sockets {
            Sockets::Bind => {
                let (stream, seqpacket, forward) = match &cfg.forward {
                    None => (
                        Some(listen(cfg.uds_path.clone(), UnixKind::Stream)?),
                        Some(listen(seqpacket_path(&cfg.uds_path), UnixKind::Seqpacket)?),
                        Vec::new(),
                    ),
                    Some(f) => {
                        let forward = f
                            .listen
                            .iter()
                            .map(|&port| {
                                crate::afvsock::listen(port, UnixKind::Stream, 1024)
                                    .map(|fd| (fd, port))
                                    .map_err(|source| VmError::ListenVsock { port, source })
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        (None, None, forward)
                    }
                };
                let _ = std::fs::remove_file(&cfg.socket);
                // Not `Listener::new`: that one unlinks the path when dropped, and after a
                // live upgrade the path belongs to the new daemon (the daemon removes what it
                // still owns on exit).
                let l = UnixListener::bind(&cfg.socket).map_err(|e| VmError::VhostSocket {
                    path: cfg.socket.clone(),
                    source: vhost::vhost_user::Error::SocketError(e),
                })?;
                (l, stream, seqpacket, forward)
            }
            Sockets::Adopted(fds) => {
                let (l, stream, seqpacket, forward) = adopted_sockets(&cfg, fds)?;
                (UnixListener::from(l), stream, seqpacket, forward)
            }
        };
        let listener = Listener::from(listener);
        registry.add_vm(cfg.guest_cid, cfg.groups.clone());
        Ok(Vm {
            cfg,
            registry,
            budget,
            stream,
            seqpacket,
            forward,
            listener,
            gate,
            serializer,
            stats,
            handover: Arc::default(),
            upgrade: Arc::new(UpgradeSlot::new()?),
            parked: false,
        })
    }

    pub fn cid(&self) -> u64 {
        self.cfg.guest_cid
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
            upgrade: self.upgrade.clone(),
        }
    }

    /// Files this VM created, to remove on exit.
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cfg.socket.clone()];
        if self.stream.is_some() {
            paths.push(self.cfg.uds_path.clone());
            paths.push(seqpacket_path(&self.cfg.uds_path));
        }
        paths
    }

    /// Serves frontends on the vhost-user socket, one after another, until the VM moves to
    /// another daemon in a live upgrade.
    pub fn run(mut self) -> Result<(), VmError> {
        info!(cid = self.cfg.guest_cid, socket = ?self.cfg.socket, "waiting for a frontend");
        while let Flow::Continue = self.serve_one()? {}
        info!(cid = self.cfg.guest_cid, "VM handed over to the new daemon");
        Ok(())
    }

    /// New daemon of a live upgrade: adopts the VM's session as handed over, then serves as
    /// usual. If the upgrade ends before this VM's turn (`adoption` closes), the thread ends.
    /// `prepared` is told once the VM's plugin instances exist: they are made before the old
    /// daemon pauses the VM, not during the pause.
    pub fn run_adopting(
        mut self,
        prepared: mpsc::Sender<()>,
        adoption: mpsc::Receiver<Handed>,
    ) -> Result<(), VmError> {
        let started = self.gate.lock().unwrap_or_else(|p| p.into_inner()).start();
        if let Err(e) = started {
            warn!(cid = self.cfg.guest_cid, error = %e, "plugins cannot start");
        }
        let _ = prepared.send(());
        drop(prepared);
        let a = match adoption.recv() {
            Ok(Handed::Adopt(a)) => a,
            Ok(Handed::TakeOver { frontend, record }) => {
                if let Some(f) = frontend {
                    if let Some(s) = self.take_over(f, record) {
                        if let Flow::Exit = self.serve_session(s)? {
                            return Ok(());
                        }
                    }
                }
                return self.run();
            }
            Err(_) => return Ok(()),
        };
        let done = a.done.clone();
        match self.adopt(a) {
            Ok(session) => {
                let _ = done.send(Ok(()));
                if let Some(s) = session {
                    if let Flow::Exit = self.serve_session(s)? {
                        return Ok(());
                    }
                }
                self.run()
            }
            Err(e) => {
                warn!(cid = self.cfg.guest_cid, error = %e, "cannot adopt the VM");
                let _ = done.send(Err(e.to_string()));
                Ok(())
            }
        }
    }

    fn adopt(&mut self, a: Adoption) -> Result<Option<Session>, VmError> {
        let Some(frontend) = a.frontend else {
            // No frontend: only the plugin states move.
            let state = self.state_plugins();
            let st = {
                let mut s = self.serializer.lock().unwrap_or_else(|p| p.into_inner());
                crate::migration::decode_checked(&a.blob, &mut s, &self.facts())
                    .map_err(crate::session::SessionError::from)?
            };
            state
                .import(&st.plugins)
                .map_err(crate::session::SessionError::from)?;
            return Ok(None);
        };
        self.gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .start()?;
        let mut session = Session::start(self.env(), frontend)?;
        if let Err(e) = session.adopt(a.record, &a.bases, &a.blob, a.conn_fds) {
            session.end(true);
            return Err(e.into());
        }
        info!(
            cid = self.cfg.guest_cid,
            "session adopted from the old daemon"
        );
        Ok(Some(session))
    }

    /// Serves a frontend from its pre-handed setup (the old daemon died before handing the
    /// VM over); `None` if that fails, and then the frontend's socket is closed: nothing else
    /// could serve it.
    fn take_over(&mut self, frontend: UnixStream, record: crate::relay::Record) -> Option<Session> {
        let cid = self.cfg.guest_cid;
        if !self.plugins_started() {
            return None;
        }
        let mut session = match Session::start(self.env(), frontend) {
            Ok(s) => s,
            Err(e) => {
                error!(cid, error = %e, "cannot take the VM over");
                return None;
            }
        };
        match session.take_over(record) {
            Ok(()) => Some(session),
            Err(e) => {
                error!(cid, error = %e, "cannot take the VM over");
                session.end(false);
                None
            }
        }
    }

    fn plugins_started(&self) -> bool {
        let r = self.gate.lock().unwrap_or_else(|p| p.into_inner()).start();
        if let Err(e) = &r {
            error!(cid = self.cfg.guest_cid, error = %e, "plugins cannot start");
        }
        r.is_ok()
    }

    fn facts(&self) -> crate::migration::DeviceFacts {
        crate::migration::DeviceFacts {
            guest_cid: self.cfg.guest_cid,
            offered_features: crate::backend::OFFERED_FEATURES,
            max_connections: self.cfg.max_connections,
        }
    }

    fn state_plugins(&self) -> StatePlugins {
        StatePlugins {
            gate: self.gate.clone(),
            serializer: self.serializer.clone(),
        }
    }

    fn env(&self) -> SessionEnv<'_> {
        SessionEnv {
            dev_cfg: DeviceConfig {
                guest_cid: self.cfg.guest_cid,
                uds_path: self.cfg.uds_path.clone(),
                forward: self.cfg.forward.clone(),
                buf_alloc: self.cfg.tx_buffer_size,
                max_connections: self.cfg.max_connections,
                budget: self.budget.clone(),
                connect_wait: self.cfg.connect_wait,
            },
            queue_size: usize::from(self.cfg.queue_size),
            registry: &self.registry,
            state: self.state_plugins(),
            handover: self.handover.clone(),
            stats: self.stats.clone(),
            gate: self.gate.clone(),
            listeners: Listeners {
                stream: self.stream.as_ref().map(AsRawFd::as_raw_fd),
                seqpacket: self.seqpacket.as_ref().map(AsRawFd::as_raw_fd),
                forward: self
                    .forward
                    .iter()
                    .map(|(fd, port)| (fd.as_raw_fd(), *port))
                    .collect(),
            },
        }
    }

    /// Blocks until a frontend connects or the upgrade driver calls (`true`). Nothing of a
    /// session (device, vring worker thread, plugin instances) exists before that, so an
    /// idle VM costs one blocked thread.
    fn wait_frontend(&self) -> Result<bool, VmError> {
        let mut pfd = [
            libc::pollfd {
                // poll skips a negative fd: a parked VM accepts no frontend.
                fd: if self.parked {
                    -1
                } else {
                    self.listener.as_raw_fd()
                },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.upgrade.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `pfd` is a valid array of pollfds for the duration of the call.
            let n = unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) };
            if n > 0 {
                return Ok(pfd[1].revents != 0);
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

    /// Duplicates of the VM's listening sockets for a live upgrade, in the order
    /// [`Sockets::Adopted`] takes them.
    fn listener_dups(&self) -> std::io::Result<Vec<OwnedFd>> {
        let l = self.listener.as_raw_fd();
        // SAFETY: the listener lives as long as `self`; the borrow ends with the dup.
        let l = unsafe { std::os::fd::BorrowedFd::borrow_raw(l) };
        let mut out = vec![l.try_clone_to_owned()?];
        for fd in self.stream.iter().chain(&self.seqpacket) {
            out.push(fd.try_clone()?);
        }
        for (fd, _) in &self.forward {
            out.push(fd.try_clone()?);
        }
        Ok(out)
    }

    /// An upgrade command while no frontend is connected.
    fn upgrade_idle(&mut self) -> Result<Flow, VmError> {
        match self.upgrade.take() {
            Some(UpgradeCmd::Listeners(tx)) => {
                let _ = tx.send(self.listener_dups());
                Ok(Flow::Continue)
            }
            Some(UpgradeCmd::Park(tx)) => {
                self.parked = true;
                let _ = tx.send(Ok(Parked {
                    frontend: None,
                    record: Default::default(),
                    record_fds: Vec::new(),
                }));
                Ok(Flow::Continue)
            }
            Some(UpgradeCmd::Unpark) => {
                self.parked = false;
                Ok(Flow::Continue)
            }
            Some(UpgradeCmd::Quiesce(tx)) => {
                let blob = self
                    .state_plugins()
                    .export()
                    .and_then(|plugins| {
                        let st = crate::plugin::types::DeviceState {
                            guest_cid: self.cfg.guest_cid,
                            acked_features: 0,
                            event_queue: crate::plugin::types::EventQueueState {
                                owner: crate::plugin::types::EventQueueOwner::Frontend,
                                driver_live: false,
                            },
                            plugins,
                            connections: Vec::new(),
                        };
                        crate::migration::encode(&self.serializer, &st)
                    })
                    .map_err(|e| e.to_string());
                let (vtx, vrx) = mpsc::channel();
                let q = blob.map(|blob| crate::session::Quiesced {
                    frontend: None,
                    record: Default::default(),
                    record_fds: Vec::new(),
                    bases: Default::default(),
                    blob,
                    conn_fds: Vec::new(),
                    verdict: vtx,
                });
                let sent = q.is_ok();
                let _ = tx.send(q);
                if sent && matches!(vrx.recv(), Ok(Verdict::Release)) {
                    return match self.released(&vrx) {
                        Back::Gone => Ok(Flow::Exit),
                        Back::Idle => Ok(Flow::Continue),
                        Back::Serve(s) => self.serve_session(s),
                    };
                }
                Ok(Flow::Continue)
            }
            None => Ok(Flow::Continue),
        }
    }

    fn serve_one(&mut self) -> Result<Flow, VmError> {
        if self.wait_frontend()? {
            return self.upgrade_idle();
        }
        if !self.plugins_ready() {
            return Ok(Flow::Continue);
        }
        let Some(frontend) = self
            .listener
            .accept()
            .map_err(|source| VmError::VhostSocket {
                path: self.cfg.socket.clone(),
                source,
            })?
        else {
            return Ok(Flow::Continue);
        };
        let session = Session::start(self.env(), frontend)?;
        info!(cid = self.cfg.guest_cid, "frontend connected");
        self.serve_session(session)
    }

    /// A VM handed to the new daemon: waits until the upgrade ends (the driver drops its
    /// sender) or is rolled back and the new daemon hands the VM back, then serves it again.
    fn released(&mut self, verdict: &mpsc::Receiver<Verdict>) -> Back {
        let cid = self.cfg.guest_cid;
        let Ok(Verdict::Return(a)) = verdict.recv() else {
            return Back::Gone;
        };
        self.parked = false;
        let done = a.done.clone();
        match self.adopt(a) {
            Ok(s) => {
                let _ = done.send(Ok(()));
                info!(cid, "VM handed back by the new daemon: upgrade rolled back");
                s.map_or(Back::Idle, Back::Serve)
            }
            Err(e) => {
                // The new daemon resumes it.
                warn!(cid, error = %e, "cannot take the VM back");
                let _ = done.send(Err(e.to_string()));
                Back::Gone
            }
        }
    }

    /// Relays the session until the frontend leaves or the VM moves to a new daemon.
    fn serve_session(&mut self, mut session: Session) -> Result<Flow, VmError> {
        let cid = self.cfg.guest_cid;
        loop {
            match session.relay(&self.upgrade) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::debug!(cid, error = %e, "session over");
                    session.end(false);
                    self.upgrade.note_change();
                    return Ok(Flow::Continue);
                }
            }
            match self.upgrade.take() {
                Some(UpgradeCmd::Listeners(tx)) => {
                    let _ = tx.send(self.listener_dups());
                }
                Some(UpgradeCmd::Park(tx)) => {
                    self.parked = true;
                    let _ = tx.send(session.park().map_err(|e| e.to_string()));
                }
                Some(UpgradeCmd::Unpark) => self.parked = false,
                Some(UpgradeCmd::Quiesce(tx)) => match session.quiesce() {
                    Ok((q, verdict)) => {
                        let bases = q.bases.clone();
                        let _ = tx.send(Ok(q));
                        match verdict.recv() {
                            Ok(Verdict::Release) => {
                                session.end(true);
                                match self.released(&verdict) {
                                    Back::Gone => return Ok(Flow::Exit),
                                    Back::Idle => return Ok(Flow::Continue),
                                    Back::Serve(s) => session = s,
                                }
                            }
                            Ok(Verdict::Resume | Verdict::Return(_)) | Err(_) => {
                                if let Err(e) = session.resume(&bases) {
                                    error!(cid, error = %e, "cannot resume after an abandoned upgrade");
                                    session.end(false);
                                    return Ok(Flow::Continue);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                },
                None => {}
            }
        }
    }
}

/// Where a released VM goes on ([`Vm::released`]).
enum Back {
    /// It lives in the new daemon: this thread ends.
    Gone,
    /// Back here without a frontend.
    Idle,
    /// Back here with its session.
    Serve(Session),
}

/// The VM's listening sockets of [`Sockets::Adopted`], checked against its configuration:
/// the backend's kind and, for `forward-listen`, the ports.
#[allow(clippy::type_complexity)]
fn adopted_sockets(
    cfg: &VmConfig,
    fds: Vec<OwnedFd>,
) -> Result<
    (
        OwnedFd,
        Option<OwnedFd>,
        Option<OwnedFd>,
        Vec<(OwnedFd, u32)>,
    ),
    VmError,
> {
    let mismatch = |what: String| {
        VmError::Io(std::io::Error::other(format!(
            "listening sockets of the old daemon: {what}"
        )))
    };
    let mut it = fds.into_iter();
    let l = it.next().ok_or_else(|| mismatch("none".into()))?;
    match &cfg.forward {
        None => {
            let (Some(stream), Some(seqpacket), None) = (it.next(), it.next(), it.next()) else {
                return Err(mismatch("not the stream and seqpacket sockets".into()));
            };
            Ok((l, Some(stream), Some(seqpacket), Vec::new()))
        }
        Some(f) => {
            let rest: Vec<OwnedFd> = it.collect();
            let ports = rest
                .iter()
                .map(|fd| crate::afvsock::local_port(fd.as_raw_fd()))
                .collect::<std::io::Result<Vec<u32>>>()
                .map_err(|e| mismatch(format!("not AF_VSOCK listeners ({e})")))?;
            if ports != f.listen {
                return Err(mismatch(format!(
                    "forward-listen ports {ports:?}, this configuration {:?}",
                    f.listen
                )));
            }
            Ok((l, None, None, rest.into_iter().zip(ports).collect()))
        }
    }
}

/// The frontend's vhost-user socket, as handed over.
pub fn frontend_stream(fd: OwnedFd) -> UnixStream {
    UnixStream::from(fd)
}
