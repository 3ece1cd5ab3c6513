//! Same-host handover: a new daemon takes over a VM's connections from a running one.
//!
//! The operator arms the old daemon (`vhost-plug ctl --socket OLD handover --to NEW`). Its next
//! SAVE then carries the connection table, and before the blob is written to the frontend's
//! pipe the old daemon sends the sockets to the new daemon's control socket (SCM_RIGHTS),
//! tagged with the SHA-256 of the blob. The new daemon keeps them in the VM's [`Slots`] until
//! a LOAD of exactly that blob adopts them. The old daemon keeps its copies detached and silent
//! until its frontend leaves (handover done) or restarts the rings there (handover abandoned).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::ctlproto::Request;
use crate::scm;

/// Sockets per SCM_RIGHTS message (the kernel's limit is 253).
const FDS_PER_MSG: usize = 250;
/// How long either side waits for the other during the exchange.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum HandoverError {
    #[error("handover to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("handover to {path}: the new daemon refused: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("the state carries {conns} connections but no sockets were handed over for it")]
    NoSockets { conns: usize },
    #[error("the state names socket {index}, but {got} were handed over")]
    MissingSocket { index: u32, got: usize },
    #[error("expected {want} sockets, received {got}")]
    ShortFds { want: usize, got: usize },
    #[error("{count} sockets are more than this VM may hold ({max})")]
    TooMany { count: usize, max: usize },
}

/// Sockets received for a state blob that has not been loaded yet.
pub struct Incoming {
    pub digest: [u8; 32],
    pub fds: Vec<OwnedFd>,
}

/// A VM's handover slots, shared by the control socket and the VM's backend.
#[derive(Default)]
pub struct Slots {
    /// Old daemon: where the next SAVE sends its sockets.
    outgoing: Mutex<Option<PathBuf>>,
    /// New daemon: sockets waiting for their LOAD (a newer handover replaces them).
    incoming: Mutex<Option<Incoming>>,
}

impl Slots {
    /// Arms the next SAVE of this VM for a handover to the daemon behind `control`.
    pub fn arm(&self, control: PathBuf) {
        *self.outgoing.lock().unwrap_or_else(|p| p.into_inner()) = Some(control);
    }

    /// The armed handover target, if any; the SAVE consumes it.
    pub fn take_target(&self) -> Option<PathBuf> {
        self.outgoing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn put_incoming(&self, inc: Incoming) {
        *self.incoming.lock().unwrap_or_else(|p| p.into_inner()) = Some(inc);
    }

    /// The sockets handed over for the blob with this digest, if those are the ones waiting.
    pub fn take_incoming(&self, digest: &[u8; 32]) -> Option<Vec<OwnedFd>> {
        let mut slot = self.incoming.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(inc) if &inc.digest == digest => slot.take().map(|i| i.fds),
            _ => None,
        }
    }
}

pub fn digest(blob: &[u8]) -> [u8; 32] {
    Sha256::digest(blob).into()
}

pub fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_hex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let pair = std::str::from_utf8(&b[2 * i..2 * i + 2]).ok()?;
        *o = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// Old daemon: hands `fds` for the blob with `digest` to the new daemon's control socket and
/// waits until it has them all.
pub fn send(
    control: &Path,
    vm: u64,
    digest: &[u8; 32],
    fds: &[OwnedFd],
) -> Result<(), HandoverError> {
    let io = |source| HandoverError::Io {
        path: control.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(control).map_err(io)?;
    s.set_read_timeout(Some(PEER_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(PEER_TIMEOUT)).map_err(io)?;
    let req = Request::HandoverFds {
        vm,
        digest: hex(digest),
        count: fds.len(),
    };
    let line = serde_json::to_string(&req).map_err(|e| io(std::io::Error::other(e)))?;
    use std::io::Write;
    writeln!(s, "{line}").map_err(io)?;
    expect_ok(&mut s, control)?;
    for batch in fds.chunks(FDS_PER_MSG) {
        let raw: Vec<RawFd> = batch.iter().map(|f| f.as_raw_fd()).collect();
        scm::send_with_fds(&s, b"F", &raw).map_err(io)?;
    }
    expect_ok(&mut s, control)
}

/// Reads one answer line (byte by byte: nothing after it may be consumed) and checks `ok`.
fn expect_ok(s: &mut UnixStream, control: &Path) -> Result<(), HandoverError> {
    use std::io::Read;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 4096 {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(source) => {
                return Err(HandoverError::Io {
                    path: control.to_path_buf(),
                    source,
                })
            }
        }
    }
    let v: Value = serde_json::from_slice(&line).unwrap_or(Value::Null);
    if v["ok"] == Value::Bool(true) {
        return Ok(());
    }
    Err(HandoverError::Refused {
        path: control.to_path_buf(),
        reason: v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&line).into_owned()),
    })
}

/// New daemon: receives `count` sockets sent by [`send`] (after it was told to go ahead).
pub fn receive(s: &UnixStream, count: usize) -> Result<Vec<OwnedFd>, HandoverError> {
    let mut fds = Vec::with_capacity(count);
    while fds.len() < count {
        let mut byte = [0u8; 1];
        let (n, got) =
            scm::recv_with_fds(s, &mut byte, FDS_PER_MSG).map_err(|source| HandoverError::Io {
                path: PathBuf::from("(control client)"),
                source,
            })?;
        fds.extend(got);
        if n == 0 {
            break;
        }
    }
    if fds.len() != count {
        return Err(HandoverError::ShortFds {
            want: count,
            got: fds.len(),
        });
    }
    Ok(fds)
}
