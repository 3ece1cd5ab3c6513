//! Host-side AF_VSOCK sockets for the forwarding tests: the program on the far side of a
//! daemon started with `forward-cid` / `forward-listen`. Blocking, with timeouts; STREAM and
//! SEQPACKET. Needs a kernel with a vsock transport for the address used (the tests run in
//! a QEMU guest with `vsock_loopback`, CID 1).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::driver::SockType;

/// `VMADDR_CID_LOCAL`: this host's own vsock address (vsock_loopback).
pub const CID_LOCAL: u32 = 1;

/// One AF_VSOCK socket (listener or connection).
pub struct VsockSocket {
    fd: OwnedFd,
}

fn raw_type(ty: SockType) -> libc::c_int {
    match ty {
        SockType::Stream => libc::SOCK_STREAM,
        SockType::Seqpacket => libc::SOCK_SEQPACKET,
    }
}

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all zeroes is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn socket(ty: SockType) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the descriptor is owned by the OwnedFd below.
    let fd = cvt(unsafe { libc::socket(libc::AF_VSOCK, raw_type(ty) | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl VsockSocket {
    /// Listens on `port` (any CID).
    pub fn listen(port: u32, ty: SockType) -> Result<VsockSocket> {
        let fd = socket(ty).context("AF_VSOCK socket (is vsock loaded?)")?;
        let a = addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `a` is a valid sockaddr_vm of ADDR_LEN bytes.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&a as *const libc::sockaddr_vm).cast(),
                ADDR_LEN,
            )
        })
        .with_context(|| format!("bind vsock port {port}"))?;
        // SAFETY: plain syscall on our socket.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 256) }).context("listen")?;
        Ok(VsockSocket { fd })
    }

    /// Connects to (`cid`, `port`), blocking (the kernel bounds it, 2 s by default).
    pub fn connect(cid: u32, port: u32, ty: SockType) -> io::Result<VsockSocket> {
        let fd = socket(ty)?;
        let a = addr(cid, port);
        // SAFETY: `a` is a valid sockaddr_vm of ADDR_LEN bytes.
        cvt(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&a as *const libc::sockaddr_vm).cast(),
                ADDR_LEN,
            )
        })?;
        Ok(VsockSocket { fd })
    }

    /// Connects, retrying for up to `timeout` while nothing listens there yet.
    pub fn connect_retry(cid: u32, port: u32, ty: SockType, timeout: Duration) -> Result<Self> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match Self::connect(cid, port, ty) {
                Ok(s) => return Ok(s),
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(e).with_context(|| format!("vsock connect {cid}:{port}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Accepts one connection within `timeout`.
    pub fn accept(&self, timeout: Duration) -> Result<VsockSocket> {
        if !crate::host::wait_readable(self.fd.as_raw_fd(), timeout)? {
            bail!("no vsock connection within {timeout:?}");
        }
        // SAFETY: null address pointers are allowed by accept4.
        let fd = cvt(unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })
        .context("accept")?;
        // SAFETY: fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(VsockSocket { fd })
    }

    /// Read and write timeouts (SO_RCVTIMEO / SO_SNDTIMEO).
    pub fn set_timeout(&self, t: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: `tv` is a valid timeval of the given size.
            cvt(unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            })?;
        }
        Ok(())
    }

    /// The peer's (CID, port).
    pub fn peer_addr(&self) -> io::Result<(u32, u32)> {
        let mut a = addr(0, 0);
        let mut len = ADDR_LEN;
        // SAFETY: `a` has room for a sockaddr_vm and `len` says so.
        cvt(unsafe {
            libc::getpeername(
                self.fd.as_raw_fd(),
                (&mut a as *mut libc::sockaddr_vm).cast(),
                &mut len,
            )
        })?;
        Ok((a.svm_cid, a.svm_port))
    }

    /// One SEQPACKET message (or stream bytes).
    pub fn send_msg(&self, data: &[u8]) -> io::Result<usize> {
        // SAFETY: `data` is valid for reads of its length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// One SEQPACKET message: its bytes (up to `buf`'s length) and whether it was longer.
    pub fn recv_msg(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain old data; all zeroes is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // SAFETY: the iovec points at `buf`, writable for its length.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((n as usize, msg.msg_flags & libc::MSG_TRUNC != 0))
    }

    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        let how = match how {
            std::net::Shutdown::Read => libc::SHUT_RD,
            std::net::Shutdown::Write => libc::SHUT_WR,
            std::net::Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: plain syscall on our socket.
        cvt(unsafe { libc::shutdown(self.fd.as_raw_fd(), how) }).map(|_| ())
    }
}

impl AsRawFd for VsockSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Read for &VsockSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for &VsockSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send_msg(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
