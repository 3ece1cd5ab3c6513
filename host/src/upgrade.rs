//! Live upgrade: a running daemon hands every VM to a new daemon process without the VMMs
//! noticing (`vhost-plug ctl upgrade`, `systemctl reload`).
//!
//! The old daemon starts the new binary with its own arguments and one end of a
//! SOCK_SEQPACKET socketpair ([`crate::upchan`]) named by `VHOST_PLUG_UPGRADE_FD`. Then:
//! 1. new -> old `hello` with its record version; a different version is refused and the new
//!    process exits; nothing has moved.
//! 2. old -> new `listeners`: the VMs' listening sockets (vhost-user, stream, seqpacket); the
//!    new daemon builds its VMs on them (same configuration required) and answers `ready`.
//! 3. one VM at a time: the old VM thread quiesces its session at a message and packet
//!    boundary (relay idle, rings stopped by its own GET_VRING_BASE, connections detached),
//!    old -> new `vm` with the vhost-user socket, the setup record and its fds, the next
//!    avail indices, the state blob (plugin states, connection table) and the connection
//!    sockets; the new VM thread adopts it and answers `adopted`, and only then the old one
//!    lets go. `failed` (or silence) makes the old one resume the VM.
//! 4. old -> new `done`; the old daemon exits, the new one binds the control socket and
//!    tells systemd its PID.
//!
//! At every instant one process serves a VM: the old one until it has the new one's answer
//! for that VM, which has not touched it before adopting it.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};

use crate::relay::{Record, WireRecord};
use crate::session::{Adoption, UpgradeCmd, Verdict};
use crate::upchan::{self, ChanError};
use crate::vm::VmHandle;

/// Version of the hand-over record; both sides must speak the same one.
pub const RECORD_VERSION: u32 = 1;
/// The environment variable naming the channel fd in the new process.
pub const ENV_FD: &str = "VHOST_PLUG_UPGRADE_FD";
/// How long the new daemon may take to start (load and compile its plugins) and speak.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one step of the exchange may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum UpgradeError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("the new daemon exited before it took over ({status})")]
    Exited { status: String },
    #[error("the new daemon speaks hand-over record version {theirs}, this one {ours}")]
    Version { theirs: u32, ours: u32 },
    #[error("the new daemon refused: {0}")]
    Refused(String),
    #[error("VM {cid}: {reason}")]
    Vm { cid: u64, reason: String },
    #[error("{0}")]
    Chan(#[from] ChanError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected message from the other daemon")]
    Protocol,
    #[error("an upgrade is already running")]
    Busy,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
enum Wire {
    Hello {
        record_version: u32,
        version: String,
        pid: u32,
    },
    Refused {
        reason: String,
    },
    Listeners {
        record_version: u32,
        vms: Vec<u64>,
        /// Open connections over all VMs: the fds the new daemon is about to receive.
        connections: usize,
    },
    Ready,
    Vm {
        cid: u64,
        frontend: bool,
        record: WireRecord,
        record_fds: usize,
        bases: Vec<(u32, u16)>,
    },
    Adopted {
        cid: u64,
    },
    Failed {
        cid: u64,
        reason: String,
    },
    Done,
}

/// This daemon's executable, as started (a package upgrade replaces the file behind the
/// path; `/proc/self/exe` would keep naming the old one).
static EXE: OnceLock<Option<PathBuf>> = OnceLock::new();
/// Set once every VM has moved: the daemon exits and leaves the sockets to the new one.
static COMPLETED: AtomicBool = AtomicBool::new(false);
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Notes the executable's path; call at start-up, before anything can replace it.
pub fn remember_exe() {
    EXE.get_or_init(|| std::env::current_exe().ok());
}

/// Whether this daemon handed all its VMs over and is to exit.
pub fn completed() -> bool {
    COMPLETED.load(Ordering::Acquire)
}

/// Outcome of an upgrade, for `ctl upgrade`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub pid: u32,
    pub vms: usize,
    /// Per VM: how long it was served by nobody (quiesced here until adopted there), µs.
    pub pause_us: Vec<u64>,
    pub total_ms: u64,
}

fn post<T>(
    v: &VmHandle,
    make: impl FnOnce(mpsc::Sender<T>) -> UpgradeCmd,
) -> Result<T, UpgradeError> {
    let (tx, rx) = mpsc::channel();
    v.upgrade.post(make(tx))?;
    rx.recv_timeout(STEP_TIMEOUT).map_err(|_| UpgradeError::Vm {
        cid: v.cid,
        reason: "the VM's thread did not answer".into(),
    })
}

/// Old daemon: the whole upgrade. On error nothing that was not adopted has left.
pub fn run_old(binary: Option<PathBuf>, vms: &[VmHandle]) -> Result<Report, UpgradeError> {
    if RUNNING.swap(true, Ordering::AcqRel) {
        return Err(UpgradeError::Busy);
    }
    let r = upgrade(binary, vms);
    RUNNING.store(false, Ordering::Release);
    r
}

fn upgrade(binary: Option<PathBuf>, vms: &[VmHandle]) -> Result<Report, UpgradeError> {
    let t0 = Instant::now();
    let binary = binary
        .or_else(|| EXE.get().cloned().flatten())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
    let (chan, theirs) = upchan::pair()?;
    let mut child = spawn(&binary, &theirs)?;
    drop(theirs);
    let pid = child.id();
    info!(pid, binary = %binary.display(), "live upgrade: new daemon started");
    let r = exchange(&chan, vms, pid, t0);
    if r.is_err() {
        // It exits on its own once the channel closes; this makes sure.
        drop(chan);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
    r
}

fn spawn(binary: &PathBuf, theirs: &UnixStream) -> Result<std::process::Child, UpgradeError> {
    use std::os::unix::process::CommandExt;
    let fd: RawFd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(binary);
    cmd.args(std::env::args_os().skip(1))
        .env(ENV_FD, fd.to_string())
        .stdin(std::process::Stdio::null());
    // SAFETY: only fcntl, async-signal-safe, runs between fork and exec: the channel end
    // is inherited (everything else stays close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| UpgradeError::Spawn {
        binary: binary.clone(),
        source,
    })
}

fn exchange(
    chan: &UnixStream,
    vms: &[VmHandle],
    pid: u32,
    t0: Instant,
) -> Result<Report, UpgradeError> {
    chan.set_read_timeout(Some(START_TIMEOUT))?;
    let hello = match upchan::recv::<Wire>(chan) {
        Ok(m) => m.header,
        Err(ChanError::Closed) => {
            return Err(UpgradeError::Exited {
                status: "closed the upgrade channel".into(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    match hello {
        Wire::Hello { record_version, .. } if record_version != RECORD_VERSION => {
            let e = UpgradeError::Version {
                theirs: record_version,
                ours: RECORD_VERSION,
            };
            let _ = upchan::send(
                chan,
                &Wire::Refused {
                    reason: e.to_string(),
                },
                &[],
                &[],
            );
            return Err(e);
        }
        Wire::Hello { .. } => {}
        _ => return Err(UpgradeError::Protocol),
    }
    let mut fds = Vec::with_capacity(vms.len() * 3);
    for v in vms {
        fds.extend(post(v, UpgradeCmd::Listeners)??);
    }
    let connections: usize = vms
        .iter()
        .map(|v| v.stats.connections.load(Ordering::Relaxed))
        .sum();
    let listeners = Wire::Listeners {
        record_version: RECORD_VERSION,
        vms: vms.iter().map(|v| v.cid).collect(),
        connections,
    };
    // Room for the duplicates the quiesce makes, grown now rather than during a pause.
    crate::scm::reserve_fds(chan, connections + 64 * vms.len());
    upchan::send(chan, &listeners, &[], &fds)?;
    drop(fds);
    match upchan::recv::<Wire>(chan)?.header {
        Wire::Ready => {}
        Wire::Refused { reason } => return Err(UpgradeError::Refused(reason)),
        _ => return Err(UpgradeError::Protocol),
    }
    chan.set_read_timeout(Some(STEP_TIMEOUT))?;
    let mut pause_us = Vec::with_capacity(vms.len());
    for v in vms {
        let q0 = Instant::now();
        let q = post(v, UpgradeCmd::Quiesce)?
            .map_err(|reason| UpgradeError::Vm { cid: v.cid, reason })?;
        let verdict = q.verdict.clone();
        match hand_one(chan, v.cid, q) {
            Ok(()) => {
                let _ = verdict.send(Verdict::Release);
                pause_us.push(q0.elapsed().as_micros() as u64);
            }
            Err(e) => {
                let _ = verdict.send(Verdict::Resume);
                warn!(cid = v.cid, error = %e, "live upgrade stopped; this daemon keeps the VM");
                return Err(e);
            }
        }
    }
    upchan::send(chan, &Wire::Done, &[], &[])?;
    COMPLETED.store(true, Ordering::Release);
    let total_ms = t0.elapsed().as_millis() as u64;
    info!(pid, vms = vms.len(), total_ms, "live upgrade done; exiting");
    Ok(Report {
        pid,
        vms: vms.len(),
        pause_us,
        total_ms,
    })
}

fn hand_one(chan: &UnixStream, cid: u64, q: crate::session::Quiesced) -> Result<(), UpgradeError> {
    let mut fds = Vec::new();
    let frontend = q.frontend.is_some();
    fds.extend(q.frontend);
    let record_fds = q.record_fds.len();
    fds.extend(q.record_fds);
    fds.extend(q.conn_fds);
    let msg = Wire::Vm {
        cid,
        frontend,
        record: q.record,
        record_fds,
        bases: q.bases.into_iter().collect(),
    };
    upchan::send(chan, &msg, &q.blob, &fds)?;
    match upchan::recv::<Wire>(chan)?.header {
        Wire::Adopted { cid: c } if c == cid => Ok(()),
        Wire::Failed { reason, .. } => Err(UpgradeError::Vm { cid, reason }),
        _ => Err(UpgradeError::Protocol),
    }
}

/// New daemon: the channel named by [`ENV_FD`], if this process was started by an upgrade.
pub fn inherited_channel() -> Option<UnixStream> {
    let v = std::env::var(ENV_FD).ok()?;
    // SAFETY: called at start-up, before any other thread of this process exists.
    unsafe { std::env::remove_var(ENV_FD) };
    let fd: RawFd = v.parse().ok()?;
    // SAFETY: fstat on an fd number writes only into `st`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if fd < 3
        || unsafe { libc::fstat(fd, &mut st) } != 0
        || st.st_mode & libc::S_IFMT != libc::S_IFSOCK
    {
        warn!(fd, "{ENV_FD} does not name a socket; starting normally");
        return None;
    }
    // SAFETY: the old daemon passed us this fd for exactly this; nothing else owns it.
    let s = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: fcntl on our own fd.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(s)
}

/// New daemon: says hello and receives the listening sockets, 3 per VM in `cids` order.
pub fn receive_listeners(
    chan: &UnixStream,
    cids: &[u64],
) -> Result<Vec<[OwnedFd; 3]>, UpgradeError> {
    let hello = Wire::Hello {
        record_version: RECORD_VERSION,
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
    };
    upchan::send(chan, &hello, &[], &[])?;
    chan.set_read_timeout(Some(STEP_TIMEOUT))?;
    let m = upchan::recv::<Wire>(chan)?;
    let refuse = |reason: String| {
        let _ = upchan::send(
            chan,
            &Wire::Refused {
                reason: reason.clone(),
            },
            &[],
            &[],
        );
        UpgradeError::Refused(reason)
    };
    match m.header {
        Wire::Listeners { record_version, .. } if record_version != RECORD_VERSION => {
            Err(refuse(format!(
                "hand-over record version {record_version}, this daemon speaks {RECORD_VERSION}"
            )))
        }
        Wire::Listeners { vms, .. } if vms != cids => Err(refuse(format!(
            "the old daemon serves VMs {vms:?}, this configuration {cids:?}"
        ))),
        Wire::Listeners { .. } if m.fds.len() != cids.len() * 3 => {
            Err(refuse("listening sockets missing".into()))
        }
        Wire::Listeners { connections, .. } => {
            crate::scm::reserve_fds(chan, connections.min(1 << 20) + 64 * cids.len());
            let mut it = m.fds.into_iter();
            let mut out = Vec::new();
            while let (Some(a), Some(b), Some(c)) = (it.next(), it.next(), it.next()) {
                out.push([a, b, c]);
            }
            Ok(out)
        }
        Wire::Refused { reason } => Err(UpgradeError::Refused(reason)),
        _ => Err(UpgradeError::Protocol),
    }
}

pub fn send_ready(chan: &UnixStream) -> Result<(), UpgradeError> {
    Ok(upchan::send(chan, &Wire::Ready, &[], &[])?)
}

/// New daemon: adopts VMs until `done` (true) or until the old daemon goes away (false).
/// `vms` maps a CID to its thread's adoption queue. Returns how many VMs were adopted.
pub fn adopt_all(
    chan: &UnixStream,
    mut vms: BTreeMap<u64, mpsc::Sender<Adoption>>,
) -> (usize, bool) {
    let _ = chan.set_read_timeout(None);
    let mut adopted = 0;
    loop {
        let m = match upchan::recv::<Wire>(chan) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, adopted, "live upgrade: the old daemon went away");
                return (adopted, false);
            }
        };
        let upchan::Received { header, blob, fds } = m;
        match header {
            Wire::Done => {
                info!(adopted, "live upgrade: every VM adopted");
                return (adopted, true);
            }
            Wire::Vm {
                cid,
                frontend,
                record,
                record_fds,
                bases,
            } => {
                let r = adopt_one(
                    &mut vms, cid, frontend, &record, record_fds, bases, blob, fds,
                );
                let answer = match r {
                    Ok(()) => {
                        adopted += 1;
                        Wire::Adopted { cid }
                    }
                    Err(reason) => Wire::Failed { cid, reason },
                };
                if upchan::send(chan, &answer, &[], &[]).is_err() {
                    return (adopted, false);
                }
            }
            _ => return (adopted, false),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn adopt_one(
    vms: &mut BTreeMap<u64, mpsc::Sender<Adoption>>,
    cid: u64,
    frontend: bool,
    record: &WireRecord,
    record_fds: usize,
    bases: Vec<(u32, u16)>,
    blob: Vec<u8>,
    fds: Vec<OwnedFd>,
) -> Result<(), String> {
    let tx = vms
        .remove(&cid)
        .ok_or(format!("no VM with CID {cid} here"))?;
    let mut fds = fds.into_iter();
    let front = if frontend {
        Some(UnixStream::from(fds.next().ok_or("no vhost-user socket")?))
    } else {
        None
    };
    let rfds: Vec<OwnedFd> = fds.by_ref().take(record_fds).collect();
    let record = Record::import(record, rfds).map_err(|e| e.to_string())?;
    let (done, result) = mpsc::channel();
    let a = Adoption {
        frontend: front,
        record,
        bases: bases.into_iter().collect(),
        blob,
        conn_fds: fds.collect(),
        done,
    };
    tx.send(a)
        .map_err(|_| "the VM's thread is gone".to_string())?;
    result
        .recv_timeout(STEP_TIMEOUT)
        .map_err(|_| "the VM's thread did not answer".to_string())?
}

/// New daemon: waits (bounded) until the old process has closed its end of the channel,
/// i.e. exited, so the control and metrics sockets can be bound again.
pub fn wait_old_exit(chan: &UnixStream) {
    let _ = chan.set_read_timeout(Some(Duration::from_secs(10)));
    let mut b = [0u8; 64];
    loop {
        match crate::scm::recv_with_fds(chan, &mut b, 0) {
            Ok((0, _)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
