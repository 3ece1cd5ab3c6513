//! Hand-built vhost-user requests, for a hostile VMM: the vhost crate's `Frontend` refuses to
//! send some invalid requests (zero-size regions, queue indices beyond the queue count), so
//! these are written to the connection's socket directly.

use std::os::fd::RawFd;

use anyhow::{bail, Context, Result};

/// `VHOST_USER_SET_MEM_TABLE`.
pub const SET_MEM_TABLE: u32 = 5;
/// `VHOST_USER_SET_VRING_NUM`.
pub const SET_VRING_NUM: u32 = 8;
/// `VHOST_USER_SET_VRING_ADDR`.
pub const SET_VRING_ADDR: u32 = 9;
/// `VHOST_USER_SET_VRING_KICK`.
pub const SET_VRING_KICK: u32 = 12;
/// `VHOST_USER_SET_VRING_ENABLE`.
pub const SET_VRING_ENABLE: u32 = 18;

const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const HDR_LEN: usize = 12;

/// One region of a `SET_MEM_TABLE` body.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
}

/// The body of `SET_MEM_TABLE` for `regions` (one fd each goes alongside).
pub fn mem_table_body(regions: &[Region]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 32 * regions.len());
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        for v in [r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

/// The body of a vring state request (`SET_VRING_NUM`, `SET_VRING_ENABLE`, ...).
pub fn vring_state_body(index: u32, num: u32) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&num.to_le_bytes());
    b
}

/// The body of `SET_VRING_ADDR` (flags 0, no log address).
pub fn vring_addr_body(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&0u32.to_le_bytes());
    for v in [desc, used, avail, 0u64] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// What the backend answered to a request sent with `NEED_REPLY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The ack value: 0 is success, anything else a refusal.
    Ack(u64),
    /// The backend closed the connection instead of answering.
    Closed,
}

/// Sends request `code` with `body` and `fds` on the vhost-user socket `sock` and, with
/// `NEED_REPLY`, reads the ack. `sock` must have a read timeout (the simulated VMM sets one)
/// so that a backend that never answers fails the call instead of hanging it.
pub fn request(sock: RawFd, code: u32, body: &[u8], fds: &[RawFd]) -> Result<Reply> {
    let mut msg = Vec::with_capacity(HDR_LEN + body.len());
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&(VERSION | NEED_REPLY).to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    send_with_fds(sock, &msg, fds).with_context(|| format!("sending vhost-user request {code}"))?;
    let mut hdr = [0u8; HDR_LEN + 8];
    let mut got = 0;
    while got < hdr.len() {
        // SAFETY: the buffer is valid for `hdr.len() - got` bytes from `got`.
        let n = unsafe {
            libc::recv(
                sock,
                hdr[got..].as_mut_ptr().cast(),
                hdr.len() - got,
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if e.kind() == std::io::ErrorKind::ConnectionReset {
                return Ok(Reply::Closed);
            }
            return Err(e).context("reading the vhost-user reply");
        }
        if n == 0 {
            if got == 0 {
                return Ok(Reply::Closed);
            }
            bail!("vhost-user reply cut short after {got} bytes");
        }
        got += n as usize;
    }
    let word = |o: usize| u32::from_le_bytes([hdr[o], hdr[o + 1], hdr[o + 2], hdr[o + 3]]);
    if word(0) != code || word(4) & REPLY == 0 || word(8) != 8 {
        bail!(
            "unexpected vhost-user reply: request {} flags {:#x} size {}",
            word(0),
            word(4),
            word(8)
        );
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&hdr[HDR_LEN..]);
    Ok(Reply::Ack(u64::from_le_bytes(v)))
}

fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut off = 0;
    while off < data.len() {
        let mut iov = libc::iovec {
            iov_base: data[off..].as_ptr() as *mut libc::c_void,
            iov_len: data.len() - off,
        };
        // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        // The fds go with the first byte; the rest is plain data.
        if off == 0 && !fds.is_empty() {
            mh.msg_control = cbuf.as_mut_ptr().cast();
            mh.msg_controllen = space as _;
            // SAFETY: `mh` has a control buffer of `space` bytes, enough for one header with
            // `fd_bytes` of data; CMSG_FIRSTHDR therefore returns a valid pointer into it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&mh);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    fd_bytes,
                );
            }
        }
        // SAFETY: `mh` points at live buffers (iov, control) for the duration of the call.
        let n = unsafe { libc::sendmsg(sock, &mh, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        off += n as usize;
    }
    Ok(())
}
