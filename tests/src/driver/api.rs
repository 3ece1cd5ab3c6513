//! Blocking, time-bounded socket API of the guest driver.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::engine::Core;
use super::socket::{CreditInfo, EndReason, SockKey, SockType, Socket, State};
use super::{ConnectError, Shared};
use crate::packet::*;

fn io_err(e: anyhow::Error) -> io::Error {
    io::Error::other(format!("{e:#}"))
}

fn timed_out(what: &str, key: SockKey, t: Duration, extra: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "{what} on guest port {} (peer {}:{}) made no progress for {t:?}{extra}",
            key.local_port, key.peer_cid, key.peer_port
        ),
    )
}

fn ended_error(s: &Socket) -> io::Error {
    match s.end {
        Some(EndReason::Reset) | Some(EndReason::TransportReset) | Some(EndReason::Protocol) => {
            io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("connection reset ({:?})", s.end),
            )
        }
        _ => io::Error::new(io::ErrorKind::BrokenPipe, "connection closed for sending"),
    }
}

pub(crate) fn connect(
    shared: &Arc<Shared>,
    cid: u64,
    port: u32,
    ty: SockType,
    timeout: Duration,
    op_timeout: Duration,
) -> Result<GuestSocket, ConnectError> {
    let deadline = Instant::now() + timeout;
    let mut core = shared.lock();
    core.check_alive()
        .map_err(|e| ConnectError::Failed(e.to_string()))?;
    if ty == SockType::Seqpacket && !core.seqpacket {
        return Err(ConnectError::Unsupported(
            "SEQPACKET was not negotiated".into(),
        ));
    }
    let local_port = core
        .alloc_port()
        .ok_or_else(|| ConnectError::Failed("no free local port".into()))?;
    let key = SockKey {
        local_port,
        peer_cid: cid,
        peer_port: port,
    };
    let buf_alloc = core.cfg.buf_alloc;
    core.sockets
        .insert(key, Socket::new(ty, State::Connecting, buf_alloc));
    core.send_sock_ctrl(key, OP_REQUEST, 0);
    core.kick_tx()
        .map_err(|e| ConnectError::Failed(format!("{e:#}")))?;
    let mut expired = false;
    loop {
        match core.sockets.get(&key).map(|s| (s.state, s.end)) {
            Some((State::Established, _)) => {
                return Ok(GuestSocket::new(shared.clone(), key, ty, op_timeout));
            }
            Some((State::Closed, end)) => {
                core.sockets.remove(&key);
                return Err(match end {
                    Some(EndReason::Refused) => ConnectError::Refused,
                    other => ConnectError::Failed(format!("connection ended: {other:?}")),
                });
            }
            Some(_) => {}
            None => return Err(ConnectError::Failed("socket vanished".into())),
        }
        if let Err(e) = core.check_alive() {
            core.sockets.remove(&key);
            return Err(ConnectError::Failed(e.to_string()));
        }
        if expired {
            core.reset_sock(key);
            // Best effort: the RST only tidies up the device side.
            let _ = core.kick_tx();
            return Err(ConnectError::TimedOut);
        }
        let (g, t) = shared.wait_until(core, deadline);
        core = g;
        expired = t;
    }
}

/// A received SEQPACKET message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvMsg {
    /// Full length of the message.
    pub len: usize,
    /// Bytes copied into the caller's buffer.
    pub copied: usize,
    /// The buffer was shorter than the message (the rest was discarded).
    pub truncated: bool,
    /// The message carried EOR.
    pub eor: bool,
}

/// A connected guest socket. Methods take `&self`, so one thread may send while another
/// receives. Dropping the handle closes it (graceful: SHUTDOWN, then RST after a timeout).
pub struct GuestSocket {
    shared: Arc<Shared>,
    key: SockKey,
    ty: SockType,
    timeout: Duration,
    released: bool,
}

impl GuestSocket {
    fn new(shared: Arc<Shared>, key: SockKey, ty: SockType, timeout: Duration) -> Self {
        GuestSocket {
            shared,
            key,
            ty,
            timeout,
            released: false,
        }
    }

    pub fn key(&self) -> SockKey {
        self.key
    }

    pub fn local_port(&self) -> u32 {
        self.key.local_port
    }

    pub fn peer_cid(&self) -> u64 {
        self.key.peer_cid
    }

    pub fn peer_port(&self) -> u32 {
        self.key.peer_port
    }

    pub fn sock_type(&self) -> SockType {
        self.ty
    }

    /// Bound on each blocking call without progress.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    fn with<R>(&self, f: impl FnOnce(&Socket) -> R) -> Option<R> {
        self.shared.lock().sockets.get(&self.key).map(f)
    }

    pub fn credit_info(&self) -> Option<CreditInfo> {
        self.with(|s| s.credit_info())
    }

    /// Why the connection ended, if it did.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.with(|s| s.end).flatten()
    }

    /// The peer sent RST on this connection.
    pub fn got_rst(&self) -> bool {
        self.with(|s| s.got_rst).unwrap_or(false)
    }

    /// SHUTDOWN flags the peer sent.
    pub fn peer_shutdown(&self) -> u32 {
        self.with(|s| s.peer_shutdown).unwrap_or(0)
    }

    /// (bytes sent, bytes received) on this connection.
    pub fn byte_counts(&self) -> (u64, u64) {
        self.with(|s| (s.bytes_sent, s.bytes_received))
            .unwrap_or((0, 0))
    }

    /// Waits until the connection has ended (RST from the peer, or our own RST).
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut core = self.shared.lock();
        loop {
            let closed = core
                .sockets
                .get(&self.key)
                .is_none_or(|s| s.state == State::Closed);
            if closed {
                return true;
            }
            let (g, t) = self.shared.wait_until(core, deadline);
            core = g;
            if t {
                return core
                    .sockets
                    .get(&self.key)
                    .is_none_or(|s| s.state == State::Closed);
            }
        }
    }

    /// Stream: sends all of `data`, waiting for credit and ring space as needed.
    /// Seqpacket: sends `data` as one message (same as `send_msg(data, false)`).
    pub fn send(&self, data: &[u8]) -> io::Result<()> {
        match self.ty {
            SockType::Stream => self.send_inner(data, None, None),
            SockType::Seqpacket => self.send_inner(data, Some(false), None),
        }
    }

    /// Stream: like [`GuestSocket::send`] for a prebuilt buffer the caller never changes
    /// while `tag` names it: tx slots that already hold a piece of it are posted again without
    /// copying the piece (only the header is rewritten), as a benchmark's guest does so that
    /// producing the bytes is not what limits it.
    pub fn send_prebuilt(&self, data: &[u8], tag: u64) -> io::Result<()> {
        if self.ty != SockType::Stream {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "send_prebuilt on a seqpacket socket",
            ));
        }
        self.send_inner(data, None, Some(tag))
    }

    /// Seqpacket: sends one message; the last fragment carries EOM, and EOR if `eor`.
    pub fn send_msg(&self, data: &[u8], eor: bool) -> io::Result<()> {
        if self.ty != SockType::Seqpacket {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "send_msg on a stream socket",
            ));
        }
        self.send_inner(data, Some(eor), None)
    }

    fn send_inner(&self, data: &[u8], seq: Option<bool>, tag: Option<u64>) -> io::Result<()> {
        let key = self.key;
        let mut deadline = Instant::now() + self.timeout;
        let mut core = self.shared.lock();
        if seq.is_some() {
            // Linux: a message larger than the peer's whole buffer can never be accepted.
            let peer_alloc = core
                .sockets
                .get(&key)
                .map(|s| s.credit_info().peer_buf_alloc);
            if let Some(alloc) = peer_alloc {
                if data.len() as u64 > u64::from(alloc) {
                    return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
                }
            }
        }
        let mut off = 0usize;
        let mut first = true;
        while off < data.len() || (first && data.is_empty() && seq.is_some()) {
            core.check_alive()?;
            let sock = core
                .sockets
                .get(&key)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "socket is gone"))?;
            if sock.send_closed() {
                return Err(ended_error(sock));
            }
            let max_pkt = core.cfg.max_pkt as usize;
            let credit = sock.peer_credit() as usize;
            let n = (data.len() - off).min(credit).min(max_pkt);
            let last = off + n == data.len();
            let can_send = n > 0 || data.is_empty();
            if can_send && core.data_room(n) {
                let flags = match seq {
                    Some(eor) if last => SEQ_EOM | if eor { SEQ_EOR } else { 0 },
                    _ => 0,
                };
                let Some(hdr) = core.sock_hdr(key, OP_RW, flags, n as u32) else {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "socket is gone",
                    ));
                };
                let layout = core.cfg.tx_layout;
                let piece = tag.map(|t| (t, off));
                if core
                    .submit_prefilled(&hdr, &data[off..off + n], layout, piece)
                    .map_err(io_err)?
                {
                    if let Some(s) = core.sockets.get_mut(&key) {
                        s.tx_cnt = s.tx_cnt.wrapping_add(n as u32);
                        s.bytes_sent += n as u64;
                    }
                    off += n;
                    first = false;
                    deadline = Instant::now() + self.timeout;
                    core.kick_tx().map_err(io_err)?;
                    continue;
                }
            }
            core.kick_tx().map_err(io_err)?;
            let (g, t) = self.shared.wait_until(core, deadline);
            core = g;
            if t {
                let info = core.sockets.get(&key).map(|s| s.credit_info());
                return Err(timed_out(
                    "send",
                    key,
                    self.timeout,
                    format!(" (credit state {info:?}, sent {off} of {})", data.len()),
                ));
            }
        }
        Ok(())
    }

    fn after_read(&self, core: &mut Core) -> io::Result<()> {
        core.after_read(self.key);
        core.kick_tx().map_err(io_err)
    }

    /// Reads available bytes (at least one, waiting if none); `Ok(0)` is end of stream.
    /// On a seqpacket socket this reads one message, truncated to `buf`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ty == SockType::Seqpacket {
            return Ok(self.recv_msg(buf)?.map_or(0, |m| m.copied));
        }
        let deadline = Instant::now() + self.timeout;
        let mut core = self.shared.lock();
        loop {
            core.check_alive()?;
            let sock = core
                .sockets
                .get_mut(&self.key)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "socket is gone"))?;
            if buf.is_empty() {
                return Ok(0);
            }
            if sock.has_rx() {
                let n = sock.read_stream(buf);
                self.after_read(&mut core)?;
                return Ok(n);
            }
            if sock.local_shutdown & SHUTDOWN_RCV != 0 {
                return Ok(0);
            }
            if sock.state == State::Closed && sock.end != Some(EndReason::PeerClosed) {
                return Err(ended_error(sock));
            }
            if sock.peer_done_sending() {
                return Ok(0);
            }
            let (g, t) = self.shared.wait_until(core, deadline);
            core = g;
            if t {
                let info = core.sockets.get(&self.key).map(|s| s.credit_info());
                return Err(timed_out(
                    "recv",
                    self.key,
                    self.timeout,
                    format!(" (credit state {info:?})"),
                ));
            }
        }
    }

    /// Seqpacket: receives one whole message; `Ok(None)` is end of stream.
    pub fn recv_msg(&self, buf: &mut [u8]) -> io::Result<Option<RecvMsg>> {
        if self.ty != SockType::Seqpacket {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "recv_msg on a stream socket",
            ));
        }
        let deadline = Instant::now() + self.timeout;
        let mut core = self.shared.lock();
        loop {
            core.check_alive()?;
            let sock = core
                .sockets
                .get_mut(&self.key)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "socket is gone"))?;
            if sock.complete_msgs() > 0 {
                let (len, eor) = sock.read_msg(buf);
                self.after_read(&mut core)?;
                return Ok(Some(RecvMsg {
                    len,
                    copied: len.min(buf.len()),
                    truncated: len > buf.len(),
                    eor,
                }));
            }
            if sock.local_shutdown & SHUTDOWN_RCV != 0 {
                return Ok(None);
            }
            if sock.state == State::Closed && sock.end != Some(EndReason::PeerClosed) {
                return Err(ended_error(sock));
            }
            if sock.peer_done_sending() {
                return Ok(None);
            }
            let (g, t) = self.shared.wait_until(core, deadline);
            core = g;
            if t {
                return Err(timed_out("recv_msg", self.key, self.timeout, String::new()));
            }
        }
    }

    /// Sends SHUTDOWN with RCV (`rd`) and/or SEND (`wr`); flags accumulate like Linux.
    pub fn shutdown(&self, rd: bool, wr: bool) -> io::Result<()> {
        let flags = if rd { SHUTDOWN_RCV } else { 0 } | if wr { SHUTDOWN_SEND } else { 0 };
        let mut core = self.shared.lock();
        core.check_alive()?;
        let sock = core
            .sockets
            .get_mut(&self.key)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "socket is gone"))?;
        if sock.state != State::Established {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "shutdown on a socket that is not connected",
            ));
        }
        if flags & !sock.local_shutdown == 0 {
            return Ok(());
        }
        sock.local_shutdown |= flags;
        let all = sock.local_shutdown;
        core.send_sock_ctrl(self.key, OP_SHUTDOWN, all);
        core.kick_tx().map_err(io_err)?;
        drop(core);
        self.shared.cv.notify_all();
        Ok(())
    }

    fn release(&mut self, abortive: bool) -> io::Result<()> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let mut core = self.shared.lock();
        if abortive {
            core.reset_sock(self.key);
        } else {
            core.close_sock(self.key);
        }
        let res = core.kick_tx().map_err(io_err);
        drop(core);
        self.shared.cv.notify_all();
        res
    }

    /// Graceful close: SHUTDOWN(both), then the driver waits for the peer's RST (sending its
    /// own after `close_timeout`) in the background.
    pub fn close(mut self) -> io::Result<()> {
        self.release(false)
    }

    /// Abortive close: RST now.
    pub fn reset(mut self) -> io::Result<()> {
        self.release(true)
    }
}

impl Drop for GuestSocket {
    fn drop(&mut self) {
        // Errors here mean the driver already stopped; nothing is left to close.
        let _ = self.release(false);
    }
}

impl io::Read for &GuestSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

impl io::Write for &GuestSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Read for GuestSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

impl io::Write for GuestSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening guest port.
pub struct GuestListener {
    shared: Arc<Shared>,
    port: u32,
    ty: SockType,
    timeout: Duration,
}

impl GuestListener {
    pub(crate) fn new(shared: Arc<Shared>, port: u32, ty: SockType, timeout: Duration) -> Self {
        GuestListener {
            shared,
            port,
            ty,
            timeout,
        }
    }

    pub fn port(&self) -> u32 {
        self.port
    }

    /// Waits up to `timeout` for an incoming connection.
    pub fn accept(&self, timeout: Duration) -> io::Result<GuestSocket> {
        let deadline = Instant::now() + timeout;
        let mut core = self.shared.lock();
        loop {
            core.check_alive()?;
            let next = core
                .listeners
                .get_mut(&self.port)
                .and_then(|l| l.backlog.pop_front());
            if let Some(key) = next {
                if core.sockets.contains_key(&key) {
                    return Ok(GuestSocket::new(
                        self.shared.clone(),
                        key,
                        self.ty,
                        self.timeout,
                    ));
                }
                continue;
            }
            let (g, t) = self.shared.wait_until(core, deadline);
            core = g;
            if t && core
                .listeners
                .get(&self.port)
                .is_none_or(|l| l.backlog.is_empty())
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no connection to guest port {} within {timeout:?}",
                        self.port
                    ),
                ));
            }
        }
    }
}

impl Drop for GuestListener {
    fn drop(&mut self) {
        let mut core = self.shared.lock();
        if let Some(l) = core.listeners.remove(&self.port) {
            for key in l.backlog {
                core.reset_sock(key);
            }
            // Best effort while tearing down.
            let _ = core.kick_tx();
        }
    }
}
