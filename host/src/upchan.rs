//! The channel between an old and a new daemon during a live upgrade: a unix SOCK_SEQPACKET
//! socketpair whose new end the new process inherits. Each message is a JSON header, an
//! optional binary blob (a VM's state) and fds (SCM_RIGHTS), sent as: one prefix message
//! carrying the lengths and the first fds, more fd-only messages while fds remain, then the
//! header and blob bytes in chunks.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::scm::{recv_with_fds, send_with_fds};

/// Fds per message (the kernel's limit is 253).
const FDS_PER_MSG: usize = 250;
const CHUNK: usize = 32 * 1024;
const MAX_HEADER: usize = 4 << 20;
const MAX_BLOB: usize = 64 << 20;
const MAX_FDS: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum ChanError {
    #[error("upgrade channel: {0}")]
    Io(#[from] io::Error),
    #[error("upgrade channel closed by the other daemon")]
    Closed,
    #[error("upgrade channel: {0}")]
    Malformed(String),
}

/// A received message.
pub struct Received<T> {
    pub header: T,
    pub blob: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// A SOCK_SEQPACKET socketpair for the channel (both ends close-on-exec).
pub fn pair() -> io::Result<(UnixStream, UnixStream)> {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: socketpair writes two fds into `fds`, which we then own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe {
        use std::os::fd::FromRawFd;
        (
            UnixStream::from_raw_fd(fds[0]),
            UnixStream::from_raw_fd(fds[1]),
        )
    })
}

pub fn send<T: Serialize>(
    s: &UnixStream,
    header: &T,
    blob: &[u8],
    fds: &[OwnedFd],
) -> Result<(), ChanError> {
    let json = serde_json::to_vec(header).map_err(|e| ChanError::Malformed(e.to_string()))?;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut prefix = Vec::with_capacity(16);
    prefix.extend_from_slice(&(json.len() as u32).to_le_bytes());
    prefix.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    prefix.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    let mut batches = raw.chunks(FDS_PER_MSG);
    send_with_fds(s, &prefix, batches.next().unwrap_or(&[]))?;
    for b in batches {
        send_with_fds(s, b"F", b)?;
    }
    for c in json.chunks(CHUNK).chain(blob.chunks(CHUNK)) {
        send_with_fds(s, c, &[])?;
    }
    Ok(())
}

pub fn recv<T: DeserializeOwned>(s: &UnixStream) -> Result<Received<T>, ChanError> {
    let mut prefix = [0u8; 16];
    let (n, mut fds) = recv_with_fds(s, &mut prefix, FDS_PER_MSG)?;
    if n == 0 {
        return Err(ChanError::Closed);
    }
    if n != 16 {
        return Err(ChanError::Malformed(format!("{n}-byte prefix")));
    }
    let json_len = u32::from_le_bytes(prefix[0..4].try_into().unwrap_or_default()) as usize;
    let nfds = u32::from_le_bytes(prefix[4..8].try_into().unwrap_or_default()) as usize;
    let blob_len = u64::from_le_bytes(prefix[8..16].try_into().unwrap_or_default());
    if json_len > MAX_HEADER || nfds > MAX_FDS || blob_len > MAX_BLOB as u64 {
        return Err(ChanError::Malformed("message too large".into()));
    }
    let mut one = [0u8; 1];
    while fds.len() < nfds {
        let (n, more) = recv_with_fds(s, &mut one, FDS_PER_MSG)?;
        if n == 0 {
            return Err(ChanError::Closed);
        }
        if more.is_empty() {
            return Err(ChanError::Malformed("fd message without fds".into()));
        }
        fds.extend(more);
    }
    if fds.len() != nfds {
        return Err(ChanError::Malformed(format!(
            "{} fds, {nfds} announced",
            fds.len()
        )));
    }
    let mut data = vec![0u8; json_len + blob_len as usize];
    let mut got = 0;
    while got < data.len() {
        let end = (got + CHUNK).min(data.len());
        let (n, extra) = recv_with_fds(s, &mut data[got..end], 0)?;
        if n == 0 {
            return Err(ChanError::Closed);
        }
        if !extra.is_empty() {
            return Err(ChanError::Malformed("fds in a data chunk".into()));
        }
        got += n;
    }
    let blob = data.split_off(json_len);
    let header = serde_json::from_slice(&data).map_err(|e| ChanError::Malformed(e.to_string()))?;
    Ok(Received { header, blob, fds })
}
