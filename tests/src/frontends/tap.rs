//! A wire tap between a frontend and a backend: a unix socket that forwards every vhost-user
//! message both ways unchanged (file descriptors included) and records each frontend request
//! with its header flags, so a test can compare what a profile sends with its VMM's source.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

/// vhost-user header: request, flags, payload size (all u32 LE).
const HDR: usize = 12;
/// Largest payload forwarded (vhost-user's own limit is 4 KiB of config plus headers; memory
/// tables of 8 regions are 328 bytes). Larger means the stream is not vhost-user.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Most fds one vhost-user message carries.
const MAX_FDS: usize = 8;
/// `NEED_REPLY` header flag.
pub const NEED_REPLY: u32 = 1 << 3;

/// One frontend request as seen on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub request: u32,
    pub flags: u32,
}

/// A running tap; the record is complete once both sides closed.
pub struct Tap {
    path: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<JoinHandle<()>>,
}

impl Tap {
    /// Listens at `path`; the first connection there is forwarded to `backend`.
    pub fn start(path: &Path, backend: &Path) -> Result<Tap> {
        let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        let backend = backend.to_path_buf();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rec = seen.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-tap".into())
            .spawn(move || {
                let Ok((front, _)) = l.accept() else { return };
                let Ok(back) = UnixStream::connect(&backend) else {
                    return;
                };
                let (Ok(f2), Ok(b2)) = (front.try_clone(), back.try_clone()) else {
                    return;
                };
                let up = std::thread::spawn(move || forward(front, back, Some(rec)));
                forward(b2, f2, None);
                let _ = up.join();
            })
            .context("spawning the tap")?;
        Ok(Tap {
            path: path.to_path_buf(),
            seen,
            thread: Some(thread),
        })
    }

    /// Where the frontend connects.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for both directions to end, then returns every frontend request in order.
    pub fn finish(mut self) -> Vec<Seen> {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Copies messages from `from` to `to` until either side ends, recording requests in `rec`.
fn forward(mut from: UnixStream, mut to: UnixStream, rec: Option<Arc<Mutex<Vec<Seen>>>>) {
    let mut payload = vec![0u8; MAX_PAYLOAD];
    loop {
        let mut hdr = [0u8; HDR];
        let Ok(fds) = recv_with_fds(&from, &mut hdr) else {
            break;
        };
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_PAYLOAD || from.read_exact(&mut payload[..size]).is_err() {
            break;
        }
        if let Some(rec) = &rec {
            if let Ok(mut v) = rec.lock() {
                v.push(Seen { request, flags });
            }
        }
        let mut msg = hdr.to_vec();
        msg.extend_from_slice(&payload[..size]);
        let sent = if fds.is_empty() {
            to.write_all(&msg).is_ok()
        } else {
            send_with_fds(&to, &msg, &fds).is_ok()
        };
        if !sent {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// Reads exactly `buf.len()` bytes; returns the fds that came with them.
fn recv_with_fds(s: &UnixStream, buf: &mut [u8]) -> std::io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::new();
    let mut got = 0;
    while got < buf.len() {
        let mut iov = libc::iovec {
            iov_base: buf[got..].as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len() - got,
        };
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        mh.msg_controllen = space as _;
        // SAFETY: `mh` describes `iov` (inside `buf`) and `cbuf`, both valid for the call.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n <= 0 {
            return Err(if n == 0 {
                std::io::ErrorKind::UnexpectedEof.into()
            } else {
                std::io::Error::last_os_error()
            });
        }
        // SAFETY: the kernel filled `mh.msg_control`; the CMSG_* macros walk it within
        // `msg_controllen`, and SCM_RIGHTS data is an array of fds we now own.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&mh);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&mh, c);
            }
        }
        got += n as usize;
    }
    Ok(fds)
}

fn send_with_fds(s: &UnixStream, msg: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let bytes = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    mh.msg_controllen = space as _;
    // SAFETY: `cbuf` holds CMSG_SPACE(bytes) bytes, so the first header and its data fit; the
    // fds are open (owned by `fds`) for the duration of the call; `mh` is valid for sendmsg.
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&mh);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c) as *mut RawFd, raw.len());
        libc::sendmsg(s.as_raw_fd(), &mh, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The fds went with the first byte; the rest of the message follows as plain bytes.
    let mut w = s;
    w.write_all(&msg[n as usize..])
}
