//! Host-side programs of hybrid vsock: `CONNECT <port>` clients, `<uds>_<port>` listeners,
//! and their SOCK_SEQPACKET variants (std has no unix SEQPACKET sockets, so those use libc).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Default bound for host-side waits.
pub const HOST_TIMEOUT: Duration = Duration::from_secs(10);

/// `<uds_path>_<port>`: where guest connections to host port `port` go.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// `<uds_path>.seqpacket`: where host programs open SEQPACKET connections to the guest.
pub fn seqpacket_path(uds_path: &Path) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(".seqpacket");
    PathBuf::from(s)
}

fn parse_ok(line: &[u8]) -> Result<u32> {
    let text = std::str::from_utf8(line).context("handshake reply is not UTF-8")?;
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("OK"), Some(n), None) => n
            .parse::<u32>()
            .with_context(|| format!("bad port in handshake reply {text:?}")),
        _ => bail!("unexpected handshake reply {text:?}"),
    }
}

/// Connects to the guest's `port` through `uds_path`; returns the stream and the host port
/// the daemon assigned. Bounded by [`HOST_TIMEOUT`].
pub fn host_connect(uds_path: &Path, port: u32) -> Result<(UnixStream, u32)> {
    host_connect_with(uds_path, port, b"")
}

/// Like [`host_connect`], but `first` is written in the same `write` as the CONNECT line.
pub fn host_connect_with(uds_path: &Path, port: u32, first: &[u8]) -> Result<(UnixStream, u32)> {
    let mut s = UnixStream::connect(uds_path)
        .with_context(|| format!("connecting to {}", uds_path.display()))?;
    s.set_read_timeout(Some(HOST_TIMEOUT))?;
    s.set_write_timeout(Some(HOST_TIMEOUT))?;
    let mut msg = format!("CONNECT {port}\n").into_bytes();
    msg.extend_from_slice(first);
    s.write_all(&msg).context("writing CONNECT")?;
    // Read the reply byte by byte so nothing after the newline is consumed.
    let mut line = Vec::with_capacity(32);
    loop {
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => bail!(
                "connection closed before the OK line (got {:?}): the guest refused or the \
                 daemon dropped it",
                String::from_utf8_lossy(&line)
            ),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => {
                if line.len() >= 64 {
                    bail!(
                        "handshake reply too long: {:?}",
                        String::from_utf8_lossy(&line)
                    );
                }
                line.push(b[0]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the OK line"),
        }
    }
    let assigned = parse_ok(&line)?;
    Ok((s, assigned))
}

/// Binds `<uds_path>_<port>` for guest connections to host port `port`.
pub fn host_listen(uds_path: &Path, port: u32) -> Result<UnixListener> {
    let p = port_path(uds_path, port);
    UnixListener::bind(&p).with_context(|| format!("binding {}", p.display()))
}

/// Waits for `fd` to become readable (or hung up); false on timeout.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `p` is a valid pollfd for the duration of the call and nfds is 1.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(n > 0);
    }
}

/// `accept` bounded by `timeout`.
pub fn accept_timeout(l: &UnixListener, timeout: Duration) -> Result<UnixStream> {
    if !wait_readable(l.as_raw_fd(), timeout)? {
        bail!("no connection on the host listener within {timeout:?}");
    }
    let (s, _) = l.accept().context("accept")?;
    s.set_read_timeout(Some(HOST_TIMEOUT))?;
    s.set_write_timeout(Some(HOST_TIMEOUT))?;
    Ok(s)
}

fn sockaddr_un(path: &Path) -> Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        bail!("socket path too long: {}", path.display());
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn seqpacket_socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket(AF_UNIX, SOCK_SEQPACKET)");
    }
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A unix SOCK_SEQPACKET listener.
pub struct SeqpacketListener {
    fd: OwnedFd,
    path: PathBuf,
}

impl SeqpacketListener {
    pub fn bind(path: &Path) -> Result<Self> {
        let fd = seqpacket_socket()?;
        let (addr, len) = sockaddr_un(path)?;
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; `fd` is an open socket.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("binding {}", path.display()));
        }
        // SAFETY: `fd` is a bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 1024) } < 0 {
            return Err(io::Error::last_os_error()).context("listen");
        }
        Ok(SeqpacketListener {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Binds `<uds_path>_<port>` for guest SEQPACKET connections to host port `port`.
    pub fn for_port(uds_path: &Path, port: u32) -> Result<Self> {
        Self::bind(&port_path(uds_path, port))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn accept(&self, timeout: Duration) -> Result<SeqpacketConn> {
        if !wait_readable(self.fd.as_raw_fd(), timeout)? {
            bail!(
                "no SEQPACKET connection on {} within {timeout:?}",
                self.path.display()
            );
        }
        // SAFETY: `fd` is a listening socket; null address pointers are allowed.
        let c = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            return Err(io::Error::last_os_error()).context("accept4");
        }
        // SAFETY: `c` is a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(c) };
        Ok(SeqpacketConn { fd })
    }
}

/// A connected unix SOCK_SEQPACKET socket.
pub struct SeqpacketConn {
    fd: OwnedFd,
}

impl SeqpacketConn {
    pub fn connect(path: &Path) -> Result<Self> {
        let fd = seqpacket_socket()?;
        let (addr, len) = sockaddr_un(path)?;
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; `fd` is an open socket.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("connecting to {}", path.display()));
        }
        Ok(SeqpacketConn { fd })
    }

    /// Sends one message.
    pub fn send(&self, msg: &[u8]) -> Result<()> {
        // SAFETY: `msg` is a valid buffer of `msg.len()` bytes for the call.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error()).context("send on SEQPACKET socket");
        }
        if n as usize != msg.len() {
            bail!("short SEQPACKET send: {n} of {}", msg.len());
        }
        Ok(())
    }

    /// Receives one message into `buf` within `timeout`: (bytes copied, truncated).
    /// `(0, false)` is end of stream or an empty message.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> Result<(usize, bool)> {
        if !wait_readable(self.fd.as_raw_fd(), timeout)? {
            bail!("no SEQPACKET message within {timeout:?}");
        }
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        // SAFETY: `mh` points at one iovec describing `buf`, valid for the call.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut mh, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error()).context("recvmsg on SEQPACKET socket");
        }
        Ok((n as usize, mh.msg_flags & libc::MSG_TRUNC != 0))
    }

    /// shutdown(2).
    pub fn shutdown(&self, how: std::net::Shutdown) -> Result<()> {
        let h = match how {
            std::net::Shutdown::Read => libc::SHUT_RD,
            std::net::Shutdown::Write => libc::SHUT_WR,
            std::net::Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: `fd` is an open socket.
        if unsafe { libc::shutdown(self.fd.as_raw_fd(), h) } < 0 {
            return Err(io::Error::last_os_error()).context("shutdown");
        }
        Ok(())
    }
}

impl AsRawFd for SeqpacketConn {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Opens a SEQPACKET connection to the guest's `port` through `<uds_path>.seqpacket`: sends
/// the message `CONNECT <port>\n`, expects the message `OK <host port>\n`.
pub fn host_seqpacket_connect(uds_path: &Path, port: u32) -> Result<(SeqpacketConn, u32)> {
    let c = SeqpacketConn::connect(&seqpacket_path(uds_path))?;
    c.send(format!("CONNECT {port}\n").as_bytes())?;
    let mut buf = [0u8; 64];
    let (n, trunc) = c.recv(&mut buf, HOST_TIMEOUT)?;
    if n == 0 {
        bail!("SEQPACKET connection closed before the OK message");
    }
    if trunc {
        bail!("SEQPACKET handshake reply too long");
    }
    let line = buf[..n].strip_suffix(b"\n").unwrap_or(&buf[..n]);
    let assigned = parse_ok(line)?;
    Ok((c, assigned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_reply_parsing() {
        let p = Path::new("/tmp/x/vm3.vsock");
        assert_eq!(port_path(p, 1234), PathBuf::from("/tmp/x/vm3.vsock_1234"));
        assert_eq!(
            seqpacket_path(p),
            PathBuf::from("/tmp/x/vm3.vsock.seqpacket")
        );
        assert_eq!(parse_ok(b"OK 1073741824").unwrap(), 1_073_741_824);
        assert!(parse_ok(b"OK").is_err());
        assert!(parse_ok(b"NO 5").is_err());
        assert!(parse_ok(b"OK 5 6").is_err());
    }

    #[test]
    fn seqpacket_preserves_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sp");
        let l = SeqpacketListener::bind(&path).unwrap();
        let c = SeqpacketConn::connect(&path).unwrap();
        let s = l.accept(HOST_TIMEOUT).unwrap();
        c.send(b"one").unwrap();
        c.send(b"three").unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(s.recv(&mut buf, HOST_TIMEOUT).unwrap(), (3, false));
        assert_eq!(s.recv(&mut buf, HOST_TIMEOUT).unwrap(), (4, true));
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(s.recv(&mut buf, HOST_TIMEOUT).unwrap(), (0, false));
    }
}
