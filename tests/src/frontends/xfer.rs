//! The frontend's side of a `SET_DEVICE_STATE_FD` transfer, over the channel a VMM uses
//! (a pipe for crosvm, a unix socket pair for Cloud Hypervisor), every wait bounded.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::StateChannel;

/// Largest state the frontend reads (the daemon's own limit is 16 MiB).
const MAX_STATE: usize = 32 << 20;

/// Our end and the backend's end of a transfer channel. For a pipe, `ours` is the read end
/// when `we_read`, else the write end.
pub struct Channel {
    pub ours: OwnedFd,
    pub theirs: OwnedFd,
}

pub fn channel(kind: StateChannel, we_read: bool) -> Result<Channel> {
    match kind {
        StateChannel::Unsupported => bail!("this VMM does not transfer device state"),
        StateChannel::SocketPair => {
            let (a, b) = UnixStream::pair().context("socketpair for the device state")?;
            Ok(Channel {
                ours: a.into(),
                theirs: b.into(),
            })
        }
        StateChannel::Pipe => {
            let mut fds = [0 as RawFd; 2];
            // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return Err(std::io::Error::last_os_error()).context("pipe for the device state");
            }
            // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            Ok(if we_read {
                Channel { ours: r, theirs: w }
            } else {
                Channel { ours: w, theirs: r }
            })
        }
    }
}

fn wait(fd: RawFd, events: libc::c_short, deadline: Instant) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("device state transfer did not finish by the deadline");
        }
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `p` is a valid pollfd for the duration of the call and nfds is 1.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("poll on the device state channel");
            }
        }
    }
}

/// Reads `fd` to EOF, at most [`MAX_STATE`] bytes, by `deadline`.
pub fn read_to_eof(fd: OwnedFd, deadline: Instant) -> Result<Vec<u8>> {
    let raw = fd.as_raw_fd();
    let mut f = File::from(fd);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        wait(raw, libc::POLLIN, deadline)
            .with_context(|| format!("reading the state ({} bytes so far)", out.len()))?;
        match f.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                if out.len() + n > MAX_STATE {
                    bail!("device state larger than {MAX_STATE} bytes");
                }
                out.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the device state"),
        }
    }
}

/// Writes all of `data` to `fd` by `deadline`, then closes it (EOF ends the state).
pub fn write_and_close(fd: OwnedFd, data: &[u8], deadline: Instant) -> Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on an fd we own, with valid commands and flags.
    unsafe {
        let fl = libc::fcntl(raw, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
    let mut f = File::from(fd);
    let mut off = 0;
    while off < data.len() {
        wait(raw, libc::POLLOUT, deadline)
            .with_context(|| format!("writing the state ({off} of {} bytes)", data.len()))?;
        match f.write(&data[off..]) {
            Ok(n) => off += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(e).context("writing the device state"),
        }
    }
    Ok(())
}
