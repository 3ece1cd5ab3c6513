//! Host AF_VSOCK sockets of the vsock forwarding backend (`forward-cid`, `forward-listen`):
//! non-blocking connect, listen and accept, with `libc`'s `sockaddr_vm`. The connected
//! sockets then go through the same `sendmsg`/`recvmsg`-on-guest-memory data path as the
//! unix ones ([`crate::sys`]): AF_VSOCK STREAM and SEQPACKET sockets answer the same calls
//! (EOF, `shutdown`, EPIPE on a zero-length stream send once the peer stopped receiving).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sys::{self, UnixKind};

/// Any CID (`VMADDR_CID_ANY`): listeners take connections addressed to every local CID.
pub const CID_ANY: u32 = libc::VMADDR_CID_ANY;

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all zeroes is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket(kind: UnixKind) -> io::Result<OwnedFd> {
    let ty = match kind {
        UnixKind::Stream => libc::SOCK_STREAM,
        UnixKind::Seqpacket => libc::SOCK_SEQPACKET,
    };
    // SAFETY: plain syscall; the returned descriptor is owned by the OwnedFd below.
    let fd = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// Starts a non-blocking connect to (`cid`, `port`). Returns the socket and whether it is
/// already connected; otherwise it becomes writable (or reports an error through
/// `SO_ERROR`, e.g. `ECONNRESET` when nothing listens there) once the peer answered.
pub fn connect(cid: u32, port: u32, kind: UnixKind) -> io::Result<(OwnedFd, bool)> {
    let fd = socket(kind)?;
    let a = addr(cid, port);
    // SAFETY: `a` is a valid sockaddr_vm of ADDR_LEN bytes.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&a as *const libc::sockaddr_vm).cast(),
            ADDR_LEN,
        )
    };
    Ok((fd, sys::connect_started(r)?))
}

/// Listens on `port` for any CID.
pub fn listen(port: u32, kind: UnixKind, backlog: i32) -> io::Result<OwnedFd> {
    let fd = socket(kind)?;
    let a = addr(CID_ANY, port);
    // SAFETY: `a` is a valid sockaddr_vm of ADDR_LEN bytes.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&a as *const libc::sockaddr_vm).cast(),
            ADDR_LEN,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain syscall on a socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Accepts one connection, non-blocking and close-on-exec; returns it with the peer's
/// (CID, port).
pub fn accept(listener: RawFd) -> io::Result<(OwnedFd, u32, u32)> {
    let mut a = addr(0, 0);
    let mut len = ADDR_LEN;
    // SAFETY: `a` has room for a sockaddr_vm and `len` says so.
    let fd = unsafe {
        libc::accept4(
            listener,
            (&mut a as *mut libc::sockaddr_vm).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((fd, a.svm_cid, a.svm_port))
}

/// The port a bound AF_VSOCK socket listens on.
pub fn local_port(fd: RawFd) -> io::Result<u32> {
    let mut a = addr(0, 0);
    let mut len = ADDR_LEN;
    // SAFETY: `a` has room for a sockaddr_vm and `len` says so.
    if unsafe { libc::getsockname(fd, (&mut a as *mut libc::sockaddr_vm).cast(), &mut len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(a.svm_port)
}

/// Whether `fd` is an AF_VSOCK socket (`SO_DOMAIN`): an adopted connection's socket says
/// which backend it belongs to.
pub fn is_vsock(fd: RawFd) -> bool {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `domain` and `len` are valid for getsockopt to write.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && domain == libc::AF_VSOCK
}
