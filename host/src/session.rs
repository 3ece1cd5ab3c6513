//! One frontend session of a VM: the device, its `vhost-user-backend` handler behind the
//! relay ([`crate::relay`]), and the live-upgrade steps done on the VM's own thread: quiesce
//! at a message boundary, hand the session over or resume it, and adopt a handed-over one.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use thiserror::Error;
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{VsockBackend, EXIT_EVENT, HOST_EVENT, OFFERED_FEATURES};
use crate::device::{Device, DeviceConfig, Listeners};
use crate::migration::{self, DeviceFacts, StatePlugins};
use crate::relay::{self, Record, RelayError, WireRecord};

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("{0}")]
    Relay(#[from] RelayError),
    #[error("state: {0}")]
    State(#[from] migration::StateError),
}

/// A request of the upgrade driver to a VM's thread.
pub enum UpgradeCmd {
    /// Duplicates of the VM's three listening sockets (vhost-user, stream, seqpacket).
    Listeners(mpsc::Sender<std::io::Result<Vec<OwnedFd>>>),
    /// Stop at a message and packet boundary and describe the session.
    Quiesce(mpsc::Sender<Result<Quiesced, String>>),
    /// Duplicates of the frontend's socket and of the recorded setup, so the new daemon
    /// can take the VM over if this process dies before handing it; until `Unpark` (or
    /// the hand-over) no new frontend is accepted, it waits in the listen backlog.
    Park(mpsc::Sender<Result<Parked, String>>),
    /// The upgrade was abandoned: accept frontends again.
    Unpark,
}

/// A VM's session as pre-handed at the start of an upgrade (see [`UpgradeCmd::Park`]).
pub struct Parked {
    /// The frontend's vhost-user socket (absent: no frontend is connected).
    pub frontend: Option<OwnedFd>,
    pub record: WireRecord,
    pub record_fds: Vec<OwnedFd>,
}

/// What the new daemon's VM thread is given by the upgrade.
pub enum Handed {
    /// The old daemon handed the live session over.
    Adopt(Adoption),
    /// The old daemon died before handing this VM: serve it from its pre-handed setup.
    TakeOver {
        frontend: Option<UnixStream>,
        record: Record,
    },
}

/// What the driver decides for a quiesced VM.
pub enum Verdict {
    /// The new daemon serves it now: leave silently, then wait until the upgrade ends (the
    /// driver drops its sender) or the VM comes back.
    Release,
    /// The hand-over failed: serve it again.
    Resume,
    /// After `Release`: the upgrade was rolled back and the new daemon handed the VM back.
    Return(Adoption),
}

/// A quiesced VM: everything a new daemon needs to carry on. The VM's thread waits on
/// `verdict` and touches nothing meanwhile.
pub struct Quiesced {
    /// The frontend's vhost-user socket (absent: no frontend is connected).
    pub frontend: Option<OwnedFd>,
    pub record: WireRecord,
    pub record_fds: Vec<OwnedFd>,
    /// Next avail index of each ring that was running.
    pub bases: BTreeMap<u32, u16>,
    /// The VM's state (device facts, plugin states, connection table), as a migration blob.
    pub blob: Vec<u8>,
    pub conn_fds: Vec<OwnedFd>,
    pub verdict: mpsc::Sender<Verdict>,
}

/// A session handed over by an old daemon, for a VM's thread to adopt.
pub struct Adoption {
    pub frontend: Option<UnixStream>,
    pub record: Record,
    pub bases: BTreeMap<u32, u16>,
    pub blob: Vec<u8>,
    pub conn_fds: Vec<OwnedFd>,
    pub done: mpsc::Sender<Result<(), String>>,
}

/// Where the driver leaves commands for a VM's thread; `wake` becomes readable.
pub struct UpgradeSlot {
    wake: EventFd,
    cmd: Mutex<Option<UpgradeCmd>>,
    /// The VM's setup record or frontend changed since the driver last looked: a session
    /// pre-handed before that is out of date.
    changed: std::sync::atomic::AtomicBool,
}

impl UpgradeSlot {
    pub fn new() -> std::io::Result<Self> {
        Ok(UpgradeSlot {
            wake: EventFd::new(EFD_NONBLOCK)?,
            cmd: Mutex::new(None),
            changed: Default::default(),
        })
    }

    pub fn post(&self, cmd: UpgradeCmd) -> std::io::Result<()> {
        *self.cmd.lock().unwrap_or_else(|p| p.into_inner()) = Some(cmd);
        self.wake.write(1)
    }

    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    pub fn note_change(&self) {
        self.changed.store(true, Ordering::Release);
    }

    /// Whether the setup or frontend changed since the last call.
    pub fn take_change(&self) -> bool {
        self.changed.swap(false, Ordering::AcqRel)
    }

    /// The posted command, if any (clears the wake-up).
    pub fn take(&self) -> Option<UpgradeCmd> {
        let _ = self.wake.read();
        self.cmd.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What a session is built from (owned by the VM, outliving sessions).
pub struct SessionEnv<'a> {
    pub dev_cfg: DeviceConfig,
    pub queue_size: usize,
    pub registry: &'a Arc<crate::siblings::Registry>,
    pub state: StatePlugins,
    pub handover: Arc<crate::handover::Slots>,
    pub stats: Arc<crate::stats::VmStats>,
    pub gate: Arc<Mutex<crate::gate::Gate>>,
    pub listeners: Listeners,
}

/// A live frontend session.
pub struct Session {
    pub backend: Arc<VsockBackend>,
    daemon: Option<VhostUserDaemon<Arc<VsockBackend>>>,
    /// Our end of the internal socket to the handler.
    internal: Option<UnixStream>,
    pub frontend: UnixStream,
    pub record: Record,
    state: StatePlugins,
    cid: u64,
    registry: Arc<crate::siblings::Registry>,
    stats: Arc<crate::stats::VmStats>,
}

/// Unique abstract-socket names for the internal connection.
static NEXT: AtomicU64 = AtomicU64::new(0);

impl Session {
    /// Builds the device and its handler and connects the handler to our end of an internal
    /// socket. The frontend is not read yet.
    pub fn start(env: SessionEnv<'_>, frontend: UnixStream) -> Result<Session, SessionError> {
        let cid = env.dev_cfg.guest_cid;
        let mut dev = Device::new(env.dev_cfg, env.registry.clone())?;
        dev.set_gate(env.gate);
        dev.set_stats(env.stats.clone());
        let backend = Arc::new(VsockBackend::new(
            dev,
            env.queue_size,
            StatePlugins {
                gate: env.state.gate.clone(),
                serializer: env.state.serializer.clone(),
            },
            env.handover,
        )?);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(format!("vsock-{cid}"), backend.clone(), mem)
            .map_err(|e| SessionError::Daemon(e.to_string()))?;
        let host_fd = backend.device().epoll_fd();
        for h in daemon.get_epoll_handlers() {
            h.register_listener(host_fd, EventSet::IN, u64::from(HOST_EVENT))?;
            h.register_listener(backend.exit_fd(), EventSet::IN, u64::from(EXIT_EVENT))?;
        }
        let internal = internal_connection(&mut daemon)?;
        let inbox = env.registry.open(cid)?;
        backend.device().attach(env.listeners, inbox)?;
        env.stats.frontend.store(true, Ordering::Relaxed);
        Ok(Session {
            backend,
            daemon: Some(daemon),
            internal: Some(internal),
            frontend,
            record: Record::default(),
            state: env.state,
            cid,
            registry: env.registry.clone(),
            stats: env.stats,
        })
    }

    fn internal(&self) -> Result<&UnixStream, SessionError> {
        self.internal
            .as_ref()
            .ok_or(SessionError::Relay(RelayError::Closed))
    }

    /// Relays frontend requests and handler replies as they come (the frontend may send
    /// several requests before it reads a reply, as QEMU does) until the frontend leaves, the
    /// handler ends the session, or the upgrade slot has a command. On a command the relay
    /// first drains the handler ([`relay::drain`]) and returns `true` with nothing in flight.
    pub fn relay(&mut self, slot: &UpgradeSlot) -> Result<bool, SessionError> {
        let internal = self
            .internal
            .as_ref()
            .ok_or(SessionError::Relay(RelayError::Closed))?;
        // Frontend GET_FEATURES requests whose replies are still to come.
        let mut features_pending = 0usize;
        loop {
            let mut pfd = [
                pollfd(self.frontend.as_raw_fd()),
                pollfd(internal.as_raw_fd()),
                pollfd(slot.fd()),
            ];
            // SAFETY: `pfd` is a valid array of pollfds for the duration of the call.
            let n = unsafe { libc::poll(pfd.as_mut_ptr(), pfd.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if pfd[1].revents != 0 {
                let Some(r) = relay::read_msg(internal)? else {
                    return Err(RelayError::Closed.into());
                };
                if r.code == relay::code::GET_FEATURES {
                    features_pending = features_pending.saturating_sub(1);
                }
                relay::write_msg(&self.frontend, &r)?;
                continue;
            }
            if pfd[0].revents != 0 {
                let Some(m) = relay::read_msg(&self.frontend)? else {
                    return Err(RelayError::Closed.into());
                };
                self.record.note(&m)?;
                if Record::changes(m.code) {
                    slot.note_change();
                }
                if m.code == relay::code::GET_FEATURES {
                    features_pending += 1;
                }
                relay::write_msg(internal, &m)?;
                if m.code == relay::code::SET_VRING_CALL {
                    // A used buffer signalled on the ring's previous call fd while the frontend
                    // was switching (QEMU unmasks rings this way after SET_VRING_ENABLE) would
                    // be lost; once the handler uses the new fd, one extra interrupt on it
                    // covers that window. The guest driver tolerates a spurious interrupt.
                    for r in relay::drain(internal, features_pending)? {
                        relay::write_msg(&self.frontend, &r)?;
                    }
                    features_pending = 0;
                    if let Some(fd) = m.fds.first() {
                        relay::signal(fd);
                    }
                }
                continue;
            }
            if pfd[2].revents != 0 {
                for r in relay::drain(internal, features_pending)? {
                    relay::write_msg(&self.frontend, &r)?;
                }
                return Ok(true);
            }
        }
    }

    /// Stops every running ring at a packet boundary and takes the connections out of
    /// service; returns the hand-over description (the frontend is not read meanwhile).
    pub fn quiesce(&mut self) -> Result<(Quiesced, mpsc::Receiver<Verdict>), SessionError> {
        let t0 = std::time::Instant::now();
        let internal = relay::dup_stream(self.internal()?)?;
        let mut bases = BTreeMap::new();
        for i in self.record.started_rings() {
            bases.insert(i, relay::stop_ring(&internal, i)?);
        }
        let stopped_us = t0.elapsed().as_micros() as u64;
        let (mut snap, conn_fds) = {
            let mut d = self.backend.device();
            d.take_host_connections(false);
            d.handover_snapshot()
        };
        let detached_us = t0.elapsed().as_micros() as u64;
        let blob = match self.state.export().and_then(|p| {
            snap.plugins = p;
            migration::encode(&self.state.serializer, &snap)
        }) {
            Ok(b) => b,
            Err(e) => {
                self.resume(&bases)?;
                return Err(e.into());
            }
        };
        let (record, record_fds) = self.record.export()?;
        info!(
            cid = self.cid,
            stopped_us,
            detached_us,
            encoded_us = t0.elapsed().as_micros() as u64,
            bytes = blob.len(),
            "quiesced for a live upgrade"
        );
        let (tx, rx) = mpsc::channel();
        Ok((
            Quiesced {
                frontend: Some(self.frontend.try_clone()?.into()),
                record,
                record_fds,
                bases,
                blob,
                conn_fds,
                verdict: tx,
            },
            rx,
        ))
    }

    /// Duplicates of the frontend's socket and of the setup record, taken at a message
    /// boundary (the relay has drained the handler).
    pub fn park(&self) -> Result<Parked, SessionError> {
        let (record, record_fds) = self.record.export()?;
        Ok(Parked {
            frontend: Some(self.frontend.try_clone()?.into()),
            record,
            record_fds,
        })
    }

    /// Serves a session whose previous daemon died without handing it over: the rings
    /// resume where the guest's used indices stand, and the guest is told to drop its
    /// connections (their host sockets died with that process) by a TRANSPORT_RESET, as
    /// after a migration. Plugin states start afresh.
    pub fn take_over(&mut self, record: Record) -> Result<(), SessionError> {
        let bases = record.used_indices()?;
        // Also when the rings are stopped now: the reset goes out once they run again.
        if record.has_rings() {
            let st = crate::plugin::types::DeviceState {
                guest_cid: self.cid,
                acked_features: 0,
                event_queue: crate::plugin::types::EventQueueState {
                    owner: crate::plugin::types::EventQueueOwner::Frontend,
                    driver_live: true,
                },
                plugins: Vec::new(),
                connections: Vec::new(),
            };
            self.backend.device().restore(&st, None);
        }
        let msgs = record.replay(&bases, true)?;
        relay::replay(self.internal()?, &msgs)?;
        record.wake_rings();
        self.record = record;
        info!(cid = self.cid, rings = ?bases, "took over a VM its old daemon did not hand over");
        Ok(())
    }

    /// Restarts the rings stopped by [`Session::quiesce`] and puts the connections back.
    pub fn resume(&mut self, bases: &BTreeMap<u32, u16>) -> Result<(), SessionError> {
        let msgs = self.record.replay(bases, false)?;
        relay::replay(self.internal()?, &msgs)?;
        let mut d = self.backend.device();
        d.reattach();
        d.take_host_connections(true);
        drop(d);
        info!(
            cid = self.cid,
            "upgrade abandoned; this daemon serves the VM again"
        );
        Ok(())
    }

    /// Rebuilds a handed-over session: plugin states and connections first (no ring runs
    /// yet, so no guest packet can miss its connection), then the setup replayed into our
    /// handler with the rings' next avail indices.
    pub fn adopt(
        &mut self,
        record: Record,
        bases: &BTreeMap<u32, u16>,
        blob: &[u8],
        conn_fds: Vec<OwnedFd>,
    ) -> Result<(), SessionError> {
        let t0 = std::time::Instant::now();
        restore_state(&self.state, &self.backend, blob, Some(conn_fds))?;
        let restored_us = t0.elapsed().as_micros() as u64;
        let msgs = record.replay(bases, true)?;
        self.record = record;
        relay::replay(self.internal()?, &msgs)?;
        info!(
            cid = self.cid,
            restored_us,
            replayed_us = t0.elapsed().as_micros() as u64,
            "adopted a live-upgraded session"
        );
        Ok(())
    }

    /// Ends the session. `silent`: the VM lives on in another daemon, so its connections
    /// are forgotten rather than closed in front of anyone (their sockets moved).
    pub fn end(mut self, silent: bool) {
        self.registry.close(self.cid);
        self.stats.frontend.store(false, Ordering::Relaxed);
        self.stats.conns.set_waker(None);
        self.backend.stop_workers();
        // The handler sees its socket close and ends its thread.
        self.internal = None;
        if let Some(mut d) = self.daemon.take() {
            match d.wait() {
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage
                    | vhost::vhost_user::Error::SocketBroken(_),
                )) => {}
                Err(e) => warn!(cid = self.cid, error = %e, "frontend session ended"),
            }
        }
        if silent {
            self.backend.device().forget_detached();
        }
        self.backend.device().drop_all();
        if !silent {
            info!(cid = self.cid, "frontend disconnected");
        }
    }
}

/// Decodes and checks a handed-over state blob, imports its plugin states and, if `conns`
/// is given, its connection table.
pub fn restore_state(
    state: &StatePlugins,
    backend: &VsockBackend,
    blob: &[u8],
    conns: Option<Vec<OwnedFd>>,
) -> Result<(), SessionError> {
    let (guest_cid, max_connections) = {
        let d = backend.device();
        (d.guest_cid(), d.max_connections())
    };
    let facts = DeviceFacts {
        guest_cid,
        offered_features: OFFERED_FEATURES,
        max_connections,
    };
    let st = {
        let mut s = state
            .serializer
            .lock()
            .map_err(|_| migration::StateError::Lock("serializer"))?;
        migration::decode_checked(blob, &mut s, &facts)?
    };
    state.import(&st.plugins)?;
    if let Some(fds) = conns {
        backend.device().restore(&st, Some(fds));
    }
    Ok(())
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Starts the handler on one end of a fresh connection and returns the other end.
/// `vhost-user-backend` accepts only from a listener, so the pair is made through a
/// listening socket in the abstract namespace that lives for this call only.
fn internal_connection(
    daemon: &mut VhostUserDaemon<Arc<VsockBackend>>,
) -> Result<UnixStream, SessionError> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!(
        "vhost-plug/{}/{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let ours = UnixStream::connect_addr(&addr)?;
    let mut l = Listener::from(listener);
    daemon
        .start(&mut l)
        .map_err(|e| SessionError::Daemon(e.to_string()))?;
    Ok(ours)
}
