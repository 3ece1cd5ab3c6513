//! What a new daemon receives in a live upgrade (upgrade.rs, the layer above) and gives its VM
//! threads: a live session (`vm` message) as an [`Adoption`], a pre-handed one (`parked`)
//! held untouched, and whether the old daemon died (the condition for taking the held ones
//! over), and the inherited channel itself.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::relay::{Record, WireRecord};
use crate::session::Adoption;

/// The environment variable naming the channel fd in the new process.
pub const ENV_FD: &str = "VHOST_PLUG_UPGRADE_FD";
/// How long the new daemon waits, after the channel closed without `done` or `abort`, to see
/// its parent (the old daemon) gone before it takes the remaining VMs over.
const DEATH_TIMEOUT: Duration = Duration::from_secs(10);
/// New daemon: the old daemon's pid (this process's parent when it started).
static OLD_PID: OnceLock<u32> = OnceLock::new();

/// New daemon, at start-up: notes its parent, the old daemon.
pub fn note_old_daemon() {
    OLD_PID.get_or_init(std::os::unix::process::parent_id);
}

#[derive(Debug, Serialize, Deserialize)]
/// One VM's session as pre-handed (`parked`): its fds travel beside it.
pub struct ParkedVm {
    pub cid: u64,
    pub frontend: bool,
    pub record: WireRecord,
    pub record_fds: usize,
}

/// A pre-handed VM, held untouched until it is adopted or taken over.
pub struct Held {
    pub frontend: Option<UnixStream>,
    pub record: Record,
}

/// A pre-handed session as received.
pub fn hold(p: ParkedVm, fds: Vec<OwnedFd>) -> Result<Held, String> {
    let need = usize::from(p.frontend) + p.record_fds;
    if need != fds.len() {
        return Err(format!("{} fds, {need} announced", fds.len()));
    }
    let mut fds = fds.into_iter();
    let frontend = if p.frontend {
        fds.next().map(UnixStream::from)
    } else {
        None
    };
    let record = Record::import(&p.record, fds.collect()).map_err(|e| e.to_string())?;
    Ok(Held { frontend, record })
}

/// Whether the old daemon (this process's parent at start) has exited: once it has, this
/// process has another parent. Waits up to [`DEATH_TIMEOUT`], as the channel closes while
/// the dying process releases its files, a little before it is gone.
pub fn old_daemon_gone() -> bool {
    let Some(&old) = OLD_PID.get() else {
        return false;
    };
    let deadline = Instant::now() + DEATH_TIMEOUT;
    loop {
        if std::os::unix::process::parent_id() != old {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub type Answer = mpsc::Receiver<Result<(), String>>;

/// A `vm` message's session, for a VM thread to adopt, and where its answer comes.
pub fn adoption(
    frontend: bool,
    record: &WireRecord,
    record_fds: usize,
    bases: Vec<(u32, u16)>,
    blob: Vec<u8>,
    fds: Vec<OwnedFd>,
) -> Result<(Adoption, Answer), String> {
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
    Ok((a, result))
}

/// The VM thread's answer, waited for up to `timeout`.
pub fn answered(result: Answer, timeout: Duration) -> Result<(), String> {
    result
        .recv_timeout(timeout)
        .map_err(|_| "the VM's thread did not answer".to_string())?
}

/// New daemon: the channel named by [`ENV_FD`], if this process was started by an upgrade.
pub fn inherited_channel() -> Option<UnixStream> {
    let v = std::env::var(ENV_FD).ok()?;
    // SAFETY: called at start-up, before any other thread of this process exists.
    unsafe { std::env::remove_var(ENV_FD) };
    crate::handed::note_old_daemon();
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
