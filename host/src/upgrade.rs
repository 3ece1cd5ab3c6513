//! Live upgrade: a running daemon hands every VM to a new daemon process without the VMMs
//! noticing (`vhost-plug ctl upgrade`, `systemctl reload`).
//!
//! The old daemon starts the new binary with its own arguments and one end of a
//! SOCK_SEQPACKET socketpair ([`crate::upchan`]) named by `VHOST_PLUG_UPGRADE_FD`. Then:
//! 1. new -> old `hello` with its record version; a different version is refused and the new
//!    process exits; nothing has moved.
//! 2. old -> new `listeners`: every VM's listening sockets (vhost-user, then stream and
//!    seqpacket or the `forward-listen` ones) and the metrics endpoint's, never closed; the new
//!    daemon builds on them (same configuration required) and answers `ready`.
//! 3. old -> new `parked`: for every VM, duplicates of its connected vhost-user socket and
//!    its setup record with the record's fds. The new daemon holds them and touches
//!    nothing (it never reads those sockets) unless the old process dies: then it takes
//!    every VM not yet handed over from them (rings resumed at the guest's used indices,
//!    a TRANSPORT_RESET for the connections that died with the old process).
//! 4. one VM at a time: the old VM thread quiesces its session at a message and packet
//!    boundary (relay idle, rings stopped by its own GET_VRING_BASE, connections detached),
//!    old -> new `vm` with the vhost-user socket, the setup record and its fds, the next
//!    avail indices, the state blob (plugin states, connection table) and the connection
//!    sockets; the new VM thread adopts it and answers `adopted`, and only then the old one
//!    lets go. `failed` (or silence) makes the old one resume the VM.
//! 5. old -> new `done`; the old daemon exits, the new one binds the control socket and
//!    tells systemd its PID.
//!
//! At every instant one process serves a VM: the old one until it has the new one's answer
//! for that VM, which has not touched it before adopting it, or until it is dead (the new
//! one takes over only once its parent process is gone). An old daemon that abandons the
//! upgrade says `abort` first and keeps every VM not adopted.
//!
//! Test-only fault injection: with `VHOST_PLUG_UPGRADE_FAULT=<step>` in its environment the
//! old daemon logs "upgrade fault point <step> reached" and stops there (waiting to be
//! killed) when it reaches `<step>`: `parked`, `quiesced:N`, `sent:N`, `released:N` (N counts
//! VMs from 1); `wait:<step>:<path>` pauses there until the file exists; several are
//! separated by commas. The new daemon is started without it. A new daemon with
//! `VHOST_PLUG_UPGRADE_REFUSE=<cid>` refuses to adopt that VM.
//!
//! A VM failing after others moved rolls the upgrade back: the old daemon says `give-back`,
//! the new one hands the VMs it adopted back the same way, says `done` and exits; the old
//! daemon serves every VM again and a retry starts from scratch.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};

use crate::handed::{adoption, answered, hold, old_daemon_gone, Held, ParkedVm};
pub use crate::handed::{inherited_channel, wait_old_exit, ENV_FD};
use crate::relay::{Record, WireRecord};
use crate::session::{Handed, UpgradeCmd, Verdict};
use crate::upchan::{self, ChanError};
use crate::vm::VmHandle;

/// Version of the hand-over record; both sides must speak the same one.
pub const RECORD_VERSION: u32 = 1;
/// Test-only fault injection (see the module documentation).
const ENV_FAULT: &str = "VHOST_PLUG_UPGRADE_FAULT";
/// Test-only: a new daemon with this CID in its environment refuses to adopt that VM.
const ENV_REFUSE: &str = "VHOST_PLUG_UPGRADE_REFUSE";
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
    #[error(
        "{cause}; upgrade rolled back: {back} of {of} VMs handed back, this daemon serves them"
    )]
    RolledBack {
        cause: String,
        back: usize,
        of: usize,
    },
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
        /// Listening sockets per VM in `vms` order (absent: 3 each), then the metrics one.
        counts: Option<Vec<usize>>,
        metrics: Option<bool>,
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
    /// One VM's session, pre-handed (fds: the vhost-user socket if `frontend`, then
    /// `record_fds` fds of its record). One message per VM, so the header stays small
    /// whatever the number of VMs.
    Parked(ParkedVm),
    /// The old daemon abandons the upgrade and keeps every VM not adopted.
    Abort,
    /// The old daemon abandons the upgrade after some VMs moved: the new one hands those
    /// back (`vm` messages the other way, answered by `adopted` or `failed`), then `done`.
    GiveBack,
    Done,
}

/// Test-only: stops here, for good, if [`ENV_FAULT`] names `step`; pauses here until the
/// file `<path>` exists if it names `wait:<step>:<path>`.
fn fault_point(step: &str) {
    static FAULT: OnceLock<Option<String>> = OnceLock::new();
    let Some(spec) = FAULT.get_or_init(|| std::env::var(ENV_FAULT).ok()) else {
        return;
    };
    for f in spec.split(',') {
        if f == step {
            warn!("upgrade fault point {step} reached");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        let go = f.strip_prefix("wait:").and_then(|w| w.strip_prefix(step));
        if let Some(path) = go.and_then(|r| r.strip_prefix(':')) {
            warn!("upgrade fault point {step} reached; waiting for {path}");
            while !std::path::Path::new(path).exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
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
    let r = upgrade(binary, vms).inspect_err(|_| crate::listenset::resume_metrics());
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
        .env_remove(ENV_FAULT)
        .stdin(std::process::Stdio::null());
    // Not every fd of this process is close-on-exec: eventfds and the fds the vhost-user
    // handler receives come from crates that do not ask for it. Inherited, they would pile
    // up in each generation of upgraded daemons (measured: one per VM plus ten per attached
    // VM, every upgrade), so all of them are made close-on-exec in the child first.
    let max_fd = open_files_limit();
    // SAFETY: only close_range and fcntl, async-signal-safe, run between fork and exec: the
    // channel end is the one fd above stderr the new process inherits.
    unsafe {
        cmd.pre_exec(move || {
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                // Kernels before 5.11: one fcntl per possible fd.
                for f in 3..max_fd {
                    libc::fcntl(f, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
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

/// The soft limit of open files (bounded): fds are below it.
fn open_files_limit() -> RawFd {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1 << 16;
    }
    r.rlim_cur.min(1 << 20) as RawFd
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
    let (mut fds, mut counts) = (Vec::with_capacity(vms.len() * 3), Vec::new());
    for v in vms {
        let n = fds.len();
        fds.extend(post(v, UpgradeCmd::Listeners)??);
        counts.push(fds.len() - n);
    }
    let connections: usize = vms
        .iter()
        .map(|v| v.stats.connections.load(Ordering::Relaxed))
        .sum();
    let listeners = Wire::Listeners {
        record_version: RECORD_VERSION,
        vms: vms.iter().map(|v| v.cid).collect(),
        connections,
        counts: Some(counts),
        metrics: Some(crate::listenset::append_metrics(&mut fds)),
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
    let pause_us = match hand_all(chan, vms) {
        Ok(p) => p,
        Err(e) => {
            // Every VM not handed serves frontends again; the new daemon lets go of them.
            for v in vms {
                let _ = v.upgrade.post(UpgradeCmd::Unpark);
            }
            let _ = upchan::send(chan, &Wire::Abort, &[], &[]);
            return Err(e);
        }
    };
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

/// Pre-hands every VM (`parked`), then hands them over one by one; returns each VM's pause.
fn hand_all(chan: &UnixStream, vms: &[VmHandle]) -> Result<Vec<u64>, UpgradeError> {
    park_all(chan, vms)?;
    fault_point("parked");
    let mut pause_us = Vec::with_capacity(vms.len());
    // VMs the new daemon serves, whose threads wait for the end of the upgrade or their
    // return.
    let mut released = BTreeMap::new();
    for (k, v) in vms.iter().enumerate() {
        let n = k + 1;
        if let Err(e) = repark_changed(chan, &vms[k..]) {
            return Err(roll_back(chan, released, e));
        }
        let q0 = Instant::now();
        let q = match post(v, UpgradeCmd::Quiesce)
            .and_then(|q| q.map_err(|reason| UpgradeError::Vm { cid: v.cid, reason }))
        {
            Ok(q) => q,
            Err(e) => return Err(roll_back(chan, released, e)),
        };
        fault_point(&format!("quiesced:{n}"));
        let verdict = q.verdict.clone();
        match hand_one(chan, v.cid, q, n) {
            Ok(()) => {
                let _ = verdict.send(Verdict::Release);
                released.insert(v.cid, verdict);
                pause_us.push(q0.elapsed().as_micros() as u64);
            }
            Err(e) => {
                let _ = verdict.send(Verdict::Resume);
                warn!(cid = v.cid, error = %e, "live upgrade stopped; this daemon keeps the VM");
                return Err(roll_back(chan, released, e));
            }
        }
        fault_point(&format!("released:{n}"));
    }
    Ok(pause_us)
}

/// A VM failed after others moved: asks the new daemon to hand those back (`give-back`) and
/// takes each into its waiting thread, so one daemon, this one, serves every VM again.
fn roll_back(
    chan: &UnixStream,
    mut released: BTreeMap<u64, mpsc::Sender<Verdict>>,
    cause: UpgradeError,
) -> UpgradeError {
    let of = released.len();
    if of == 0 {
        return cause;
    }
    warn!(vms = of, error = %cause, "live upgrade failed; taking back the VMs that moved");
    let mut back = 0;
    if upchan::send(chan, &Wire::GiveBack, &[], &[]).is_ok() {
        while let Ok(m) = upchan::recv::<Wire>(chan) {
            let upchan::Received { header, blob, fds } = m;
            let Wire::Vm {
                cid,
                frontend,
                record,
                record_fds,
                bases,
            } = header
            else {
                break;
            };
            let r = adoption(frontend, &record, record_fds, bases, blob, fds).and_then(|(a, r)| {
                let tx = released
                    .remove(&cid)
                    .ok_or(format!("VM {cid} did not move"))?;
                tx.send(Verdict::Return(a))
                    .map_err(|_| "the VM's thread is gone".to_string())?;
                answered(r, STEP_TIMEOUT)
            });
            let answer = match r {
                Ok(()) => {
                    back += 1;
                    Wire::Adopted { cid }
                }
                Err(reason) => Wire::Failed { cid, reason },
            };
            if upchan::send(chan, &answer, &[], &[]).is_err() {
                break;
            }
        }
    }
    info!(back, of, "live upgrade rolled back");
    UpgradeError::RolledBack {
        cause: cause.to_string(),
        back,
        of,
    }
}

/// Sends `parked` for every VM: its frontend socket and setup record, duplicated by its
/// thread at a message boundary.
fn park_all(chan: &UnixStream, vms: &[VmHandle]) -> Result<(), UpgradeError> {
    let t0 = Instant::now();
    for v in vms {
        v.upgrade.take_change();
    }
    let all: Vec<&VmHandle> = vms.iter().collect();
    let (fds, bytes) = park(chan, &all)?;
    info!(
        vms = vms.len(),
        fds,
        bytes,
        elapsed_us = t0.elapsed().as_micros() as u64,
        "live upgrade: every VM pre-handed"
    );
    Ok(())
}

/// Pre-hands again each VM of `vms` whose setup or frontend changed since (the new daemon
/// replaces what it holds), so a take-over uses the setup of the moment.
fn repark_changed(chan: &UnixStream, vms: &[VmHandle]) -> Result<(), UpgradeError> {
    let changed: Vec<&VmHandle> = vms.iter().filter(|v| v.upgrade.take_change()).collect();
    if !changed.is_empty() {
        park(chan, &changed)?;
        info!(
            vms = changed.len(),
            "live upgrade: changed sessions pre-handed again"
        );
    }
    Ok(())
}

/// Sends `parked` for `vms`; returns the fds and header bytes sent.
fn park(chan: &UnixStream, vms: &[&VmHandle]) -> Result<(usize, usize), UpgradeError> {
    let (mut nfds, mut bytes) = (0, 0);
    // Every VM thread is asked first and they answer in parallel: one wake-up each in
    // turn would cost 1,000 VMs 0.05-1 s on a busy machine.
    let mut asked = Vec::with_capacity(vms.len());
    for v in vms {
        let (tx, rx) = mpsc::channel();
        v.upgrade.post(UpgradeCmd::Park(tx))?;
        asked.push(rx);
    }
    for (v, rx) in vms.iter().zip(asked) {
        let no_answer = |_| UpgradeError::Vm {
            cid: v.cid,
            reason: "the VM's thread did not answer".into(),
        };
        let p = rx
            .recv_timeout(STEP_TIMEOUT)
            .map_err(no_answer)?
            .map_err(|reason| UpgradeError::Vm { cid: v.cid, reason })?;
        let msg = Wire::Parked(ParkedVm {
            cid: v.cid,
            frontend: p.frontend.is_some(),
            record: p.record,
            record_fds: p.record_fds.len(),
        });
        let mut fds = Vec::with_capacity(1 + p.record_fds.len());
        fds.extend(p.frontend);
        fds.extend(p.record_fds);
        nfds += fds.len();
        bytes += serde_json::to_vec(&msg).map(|v| v.len()).unwrap_or(0);
        upchan::send(chan, &msg, &[], &fds)?;
    }
    Ok((nfds, bytes))
}

fn hand_one(
    chan: &UnixStream,
    cid: u64,
    q: crate::session::Quiesced,
    n: usize,
) -> Result<(), UpgradeError> {
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
    fault_point(&format!("sent:{n}"));
    match upchan::recv::<Wire>(chan)?.header {
        Wire::Adopted { cid: c } if c == cid => Ok(()),
        Wire::Failed { reason, .. } => Err(UpgradeError::Vm { cid, reason }),
        _ => Err(UpgradeError::Protocol),
    }
}

/// New daemon: says hello and receives the listening sockets of the VMs in `cids` order.
pub fn receive_listeners(
    chan: &UnixStream,
    cids: &[u64],
) -> Result<crate::listenset::Inherited, UpgradeError> {
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
        Wire::Listeners {
            connections,
            counts,
            metrics,
            ..
        } => {
            crate::scm::reserve_fds(chan, connections.min(1 << 20) + 64 * cids.len());
            crate::listenset::split(m.fds, counts, metrics, cids.len())
                .ok_or_else(|| refuse("listening sockets missing".into()))
        }
        Wire::Refused { reason } => Err(UpgradeError::Refused(reason)),
        _ => Err(UpgradeError::Protocol),
    }
}

pub fn send_ready(chan: &UnixStream) -> Result<(), UpgradeError> {
    Ok(upchan::send(chan, &Wire::Ready, &[], &[])?)
}

/// New daemon: how the upgrade ended.
#[derive(Debug, Default)]
pub struct Outcome {
    /// VMs handed over live.
    pub adopted: usize,
    /// VMs taken over from their pre-handed setup after the old daemon died.
    pub taken_over: usize,
    /// This daemon serves every VM now (`done`, or the old daemon died).
    pub complete: bool,
}

/// New daemon: adopts VMs until `done`, `abort`, or the old daemon's death; in the last
/// case every VM not adopted is taken over from what `parked` brought. `vms` maps a CID to
/// its thread's queue.
pub fn adopt_all(
    chan: &UnixStream,
    mut vms: BTreeMap<u64, mpsc::Sender<Handed>>,
    handles: &[VmHandle],
) -> Outcome {
    let _ = chan.set_read_timeout(None);
    let mut out = Outcome::default();
    let mut adopted = Vec::new();
    let mut held: BTreeMap<u64, Held> = BTreeMap::new();
    loop {
        let m = match upchan::recv::<Wire>(chan) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, adopted = out.adopted, "live upgrade: the channel closed");
                break;
            }
        };
        let upchan::Received { header, blob, fds } = m;
        match header {
            Wire::Done => {
                info!(adopted = out.adopted, "live upgrade: every VM adopted");
                out.complete = true;
                return out;
            }
            Wire::Abort => {
                info!(
                    adopted = out.adopted,
                    "live upgrade abandoned by the old daemon"
                );
                return out;
            }
            Wire::GiveBack => {
                out.adopted = give_back(chan, &adopted, handles);
                return out;
            }
            Wire::Parked(p) => {
                let cid = p.cid;
                match hold(p, fds) {
                    Ok(h) => {
                        held.insert(cid, h);
                    }
                    Err(e) => warn!(cid, error = %e, "live upgrade: unusable pre-handed session"),
                }
            }
            Wire::Vm {
                cid,
                frontend,
                record,
                record_fds,
                bases,
            } => {
                // The live session replaces the pre-handed one (its sockets are the same).
                held.remove(&cid);
                let r = adopt_one(
                    &mut vms, cid, frontend, &record, record_fds, bases, blob, fds,
                );
                let answer = match r {
                    Ok(()) => {
                        out.adopted += 1;
                        adopted.push(cid);
                        Wire::Adopted { cid }
                    }
                    Err(reason) => Wire::Failed { cid, reason },
                };
                if upchan::send(chan, &answer, &[], &[]).is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    if !old_daemon_gone() {
        warn!("live upgrade: the channel broke but the old daemon lives; it keeps its VMs");
        return out;
    }
    for (cid, tx) in vms {
        let (frontend, record) = match held.remove(&cid) {
            Some(h) => (h.frontend, h.record),
            None => (None, Record::default()),
        };
        warn!(
            cid,
            frontend = frontend.is_some(),
            "live upgrade: the old daemon died before handing this VM over; taking it over"
        );
        if tx.send(Handed::TakeOver { frontend, record }).is_ok() {
            out.taken_over += 1;
        }
    }
    out.complete = true;
    out
}

/// New daemon, upgrade rolled back: hands the adopted VMs back the way they came (quiesce,
/// `vm`, release on `adopted`), then says `done`. Returns how many it keeps (the old daemon
/// failed to take them back: this one resumes them).
fn give_back(chan: &UnixStream, cids: &[u64], handles: &[VmHandle]) -> usize {
    let mut kept = 0;
    for &cid in cids {
        let Some(v) = handles.iter().find(|h| h.cid == cid) else {
            kept += 1;
            continue;
        };
        let q = match post(v, UpgradeCmd::Quiesce)
            .and_then(|q| q.map_err(|reason| UpgradeError::Vm { cid, reason }))
        {
            Ok(q) => q,
            Err(e) => {
                warn!(cid, error = %e, "cannot hand the VM back; keeping it");
                kept += 1;
                continue;
            }
        };
        let verdict = q.verdict.clone();
        match hand_one(chan, cid, q, 0) {
            Ok(()) => {
                let _ = verdict.send(Verdict::Release);
            }
            Err(e) => {
                let _ = verdict.send(Verdict::Resume);
                warn!(cid, error = %e, "cannot hand the VM back; keeping it");
                kept += 1;
            }
        }
    }
    let _ = upchan::send(chan, &Wire::Done, &[], &[]);
    info!(back = cids.len() - kept, kept, "live upgrade rolled back");
    kept
}

#[allow(clippy::too_many_arguments)]
fn adopt_one(
    vms: &mut BTreeMap<u64, mpsc::Sender<Handed>>,
    cid: u64,
    frontend: bool,
    record: &WireRecord,
    record_fds: usize,
    bases: Vec<(u32, u16)>,
    blob: Vec<u8>,
    fds: Vec<OwnedFd>,
) -> Result<(), String> {
    if std::env::var(ENV_REFUSE).ok() == Some(cid.to_string()) {
        return Err(format!(
            "VM {cid} refused by fault injection ({ENV_REFUSE})"
        ));
    }
    let tx = vms
        .remove(&cid)
        .ok_or(format!("no VM with CID {cid} here"))?;
    let (a, result) = adoption(frontend, record, record_fds, bases, blob, fds)?;
    tx.send(Handed::Adopt(a))
        .map_err(|_| "the VM's thread is gone".to_string())?;
    answered(result, STEP_TIMEOUT)
}
