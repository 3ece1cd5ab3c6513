//! Guest -> device: the tx queue. Packets are validated, then their payload goes straight
//! from guest memory to the host socket with one sendmsg over the chain's segments.

use std::net::Shutdown;
use std::os::fd::AsRawFd;

use tracing::{debug, warn};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

use super::batch::TxBatch;
use super::host::send_proxy_header;
use super::{Device, MAX_PKT_PAYLOAD};
use crate::afvsock;
use crate::conn::{pending, AcceptReply, Conn, ConnKey, State};
use crate::frame::{self, FrameHeader};
use crate::gate::{Admission, Request, Target};
use crate::mem::GuestMemAtomic;
use crate::siblings::SiblingConnect;
use crate::sys::{self, UnixKind};
use crate::vsock::chain::ChainBuf;
use crate::vsock::header::*;

impl Device {
    /// Consumes the tx queue. Stops early when too many RST replies wait for rx buffers.
    /// The data packets of a walk leave in one `sendmsg` per connection ([`super::batch`]);
    /// their chains go to the used ring once that is done.
    pub fn process_tx(&mut self, vring: &VringRwLock<GuestMemAtomic>) {
        let Some(atomic) = self.mem.clone() else {
            return;
        };
        let mem = atomic.memory();
        let mut vr = vring.get_mut();
        if !vr.get_queue().ready() || !vr.is_enabled() {
            return;
        }
        let mut used = false;
        let mut batch = TxBatch::default();
        loop {
            if let Err(e) = vr.disable_notification() {
                warn!(error = %e, "tx queue: cannot disable notifications");
            }
            while !self.tx_stalled {
                let Some(chain) = vr.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                    break;
                };
                let head = chain.head_index();
                used = true;
                let buf = match ChainBuf::new(&mem, chain, false, HDR_LEN + MAX_PKT_PAYLOAD) {
                    Ok(buf) => buf,
                    Err(e) => {
                        if self.guest_log() {
                            warn!(cid = self.cfg.guest_cid, error = %e, "bad tx descriptor chain")
                        }
                        self.finish_batch(&mut batch, &mut vr);
                        if let Err(e) = vr.add_used(head, 0) {
                            warn!(error = %e, "tx queue: add_used failed");
                        }
                        continue;
                    }
                };
                let mut joinable = self.tx_batchable(&buf);
                if let Some((idx, h)) = joinable {
                    let window = self.window_bytes(idx);
                    if !batch.fits(idx, h.len as usize, buf.segment_count(), window) {
                        self.finish_batch(&mut batch, &mut vr);
                        // Sending may have left bytes buffered or reset the connection: then
                        // this packet must queue behind them, or meet the reset, as usual.
                        joinable = self.tx_batchable(&buf);
                    }
                }
                if let Some((idx, h)) = joinable {
                    self.batch_rw(&mut batch, idx, &h, head, buf);
                    continue;
                }
                self.finish_batch(&mut batch, &mut vr);
                self.handle_packet(&buf);
                if let Err(e) = vr.add_used(head, 0) {
                    warn!(error = %e, "tx queue: add_used failed");
                }
            }
            self.finish_batch(&mut batch, &mut vr);
            if self.tx_stalled {
                break;
            }
            match vr.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!(error = %e, "tx queue: cannot enable notifications");
                    break;
                }
            }
        }
        if used && vr.needs_notification().unwrap_or(true) {
            if let Err(e) = vr.signal_used_queue() {
                debug!(error = %e, "tx queue: signal failed");
            }
        }
    }

    /// Sends a batch and returns its chains to the used ring.
    fn finish_batch(&mut self, batch: &mut TxBatch<'_>, vr: &mut VringState<GuestMemAtomic>) {
        if batch.is_empty() {
            return;
        }
        self.send_batch(batch);
        for p in batch.drain() {
            if let Err(e) = vr.add_used(p.head, 0) {
                warn!(error = %e, "tx queue: add_used failed");
            }
        }
    }

    fn handle_packet(&mut self, buf: &ChainBuf<'_>) {
        let h = match buf.read_header() {
            Ok(h) => h,
            Err(e) => {
                if self.guest_log() {
                    warn!(cid = self.cfg.guest_cid, error = %e, "malformed tx packet");
                }
                return;
            }
        };
        let Some(kind) = SockType::from_wire(h.type_) else {
            return self.reply_rst(&h, "unknown socket type");
        };
        if kind == SockType::Seqpacket && !self.seqpacket() {
            return self.reply_rst(&h, "SEQPACKET not negotiated");
        }
        if h.src_cid != self.cfg.guest_cid {
            return self.reply_rst(&h, "spoofed source CID");
        }
        if h.dst_cid != HOST_CID {
            if let Err(e) = self.registry.check(self.cfg.guest_cid, h.dst_cid) {
                return self.reply_rst(&h, &e.to_string());
            }
        }
        let payload_len = h.len as usize;
        if payload_len > buf.len() - HDR_LEN {
            let why = "payload length beyond the descriptor chain";
            return match self.lookup(&h) {
                Some(idx) => {
                    if self.guest_log() {
                        warn!(cid = self.cfg.guest_cid, len = h.len, why);
                    }
                    self.reset(idx, why)
                }
                None => self.reply_rst(&h, why),
            };
        }
        let Some(idx) = self.lookup(&h) else {
            return match h.op {
                OP_REQUEST => self.guest_connect(&h, kind),
                // Both ends closing at once: the guest's RST crosses ours.
                OP_RST => debug!(
                    cid = self.cfg.guest_cid,
                    port = h.src_port,
                    "RST for a closed connection"
                ),
                _ => self.reply_rst(&h, "no such connection"),
            };
        };
        let span = self.conns[idx].span.clone();
        let _entered = span.enter();
        if self.conns[idx].kind != kind {
            return self.violation(idx, "socket type changed");
        }
        if self.conns[idx].pending & pending::RST != 0 {
            return; // already being torn down
        }
        if self.conns[idx].state == State::Waiting {
            // The guest refused it and has no such connection; a late RST changes nothing.
            if h.op != OP_RST {
                self.reply_rst(&h, "no such connection (host connect waiting)");
            }
            return;
        }
        self.check_credit(idx, &h);
        let c = &mut self.conns[idx];
        c.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        // Our CREDIT_REQUEST is answered once the guest has credit again, by whatever packet.
        // A CREDIT_UPDATE that still gives none (Linux answers every CREDIT_REQUEST at once)
        // does not end the wait: asking again would only start a request/update storm.
        if c.peer_credit() > 0 {
            c.credit_requested = false;
        }
        match h.op {
            OP_RW => self.guest_rw(idx, &h, buf),
            OP_RESPONSE => self.guest_response(idx),
            OP_SHUTDOWN => self.guest_shutdown(idx, h.flags),
            OP_RST => {
                debug!(cid = self.cfg.guest_cid, key = ?self.conns[idx].key, "guest reset");
                self.conns[idx].was_reset = true;
                if !self.guest_refused(idx) {
                    self.remove(idx);
                }
                return;
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.conns[idx].pending |= pending::CREDIT_UPDATE,
            OP_REQUEST => self.violation(idx, "REQUEST on an open connection"),
            _ => self.violation(idx, "unknown operation"),
        }
        self.wake_rx(idx);
    }

    /// Resets a connection whose guest broke the protocol, saying so in the log.
    pub(super) fn violation(&mut self, idx: usize, why: &str) {
        if self.conns.contains(idx) && self.guest_log() {
            let key = self.conns[idx].key;
            warn!(
                cid = self.cfg.guest_cid,
                ?key,
                why,
                "guest protocol violation; resetting the connection"
            );
        }
        self.reset(idx, why)
    }

    /// Logs a `fwd_cnt` that moved backwards or past the bytes sent: more bytes in flight
    /// than before. The connection simply gets no credit while the record says so.
    pub(super) fn check_credit(&mut self, idx: usize, h: &Header) {
        let c = &self.conns[idx];
        let before = c.tx_cnt.wrapping_sub(c.peer_fwd_cnt);
        let now = c.tx_cnt.wrapping_sub(h.fwd_cnt);
        if now > before && self.guest_log() {
            let c = &self.conns[idx];
            warn!(
                cid = self.cfg.guest_cid,
                key = ?c.key,
                fwd_cnt = h.fwd_cnt,
                previous = c.peer_fwd_cnt,
                sent = c.tx_cnt,
                "guest fwd_cnt inconsistent (backwards or past the bytes sent)"
            );
        }
    }

    pub(super) fn lookup(&self, h: &Header) -> Option<usize> {
        self.keys
            .get(&ConnKey {
                local_cid: h.dst_cid,
                local_port: h.dst_port,
                peer_port: h.src_port,
            })
            .copied()
    }

    /// The guest opens a connection: the gate decides, then the target is connected.
    fn guest_connect(&mut self, h: &Header, kind: SockType) {
        if self.at_capacity() {
            return self.reply_rst(h, "connection limit reached");
        }
        let (id, target) = match self.admit(Request {
            src: (h.src_cid, h.src_port),
            dst: (h.dst_cid, h.dst_port),
            kind,
            from_guest: true,
            peer: None,
        }) {
            Admission::Admit { id, target } => (id, target),
            Admission::Refuse(why) => return self.reply_rst(h, &why),
        };
        let ukind = UnixKind::from(kind);
        let sibling = match target {
            Target::Vsock { .. } => true,
            Target::Default => h.dst_cid != HOST_CID,
            Target::Unix(_)
            | Target::Tcp(_)
            | Target::ProxyUnix(_)
            | Target::ProxyTcp(_)
            | Target::HostVsock { .. } => false,
        };
        let tcp = matches!(target, Target::Tcp(_) | Target::ProxyTcp(_));
        let connecting = |(fd, done)| {
            let state = if done {
                State::Established
            } else {
                State::Connecting { proxy: false }
            };
            (fd, state)
        };
        let forward_cid = self.cfg.forward.as_ref().map(|f| f.cid);
        let afvsock = match target {
            Target::Default => h.dst_cid == HOST_CID && forward_cid.is_some(),
            Target::HostVsock { .. } => true,
            _ => false,
        };
        let opened = match target {
            Target::Default if h.dst_cid == HOST_CID && forward_cid.is_some() => {
                let cid = forward_cid.unwrap_or(afvsock::CID_ANY);
                afvsock::connect(cid, h.dst_port, ukind).map(connecting)
            }
            Target::Default if h.dst_cid == HOST_CID => {
                let mut path = self.cfg.uds_path.clone().into_os_string();
                path.push(format!("_{}", h.dst_port));
                sys::connect(std::path::Path::new(&path), ukind).map(|fd| (fd, State::Established))
            }
            Target::Default => self.sibling_open(h, kind, h.dst_cid, h.dst_port),
            Target::Vsock { cid, port } => self.sibling_open(h, kind, cid, port),
            Target::HostVsock { cid, port } => afvsock::connect(cid, port, ukind).map(connecting),
            Target::Unix(path) => sys::connect(&path, ukind).map(|fd| (fd, State::Established)),
            Target::Tcp(addr) if kind == SockType::Stream => {
                sys::tcp_connect(&addr).map(connecting)
            }
            Target::ProxyUnix(path) => {
                let a = self.proxy_addrs(id, h.src_port, h.dst_cid, h.dst_port);
                sys::connect(&path, ukind).and_then(|fd| {
                    send_proxy_header(fd.as_raw_fd(), &a)?;
                    Ok((fd, State::Established))
                })
            }
            Target::ProxyTcp(addr) if kind == SockType::Stream => {
                let a = self.proxy_addrs(id, h.src_port, h.dst_cid, h.dst_port);
                sys::tcp_connect(&addr).and_then(|(fd, done)| {
                    if done {
                        send_proxy_header(fd.as_raw_fd(), &a)?;
                        Ok((fd, State::Established))
                    } else {
                        Ok((fd, State::Connecting { proxy: true }))
                    }
                })
            }
            Target::Tcp(_) | Target::ProxyTcp(_) => {
                Err(std::io::Error::other("SEQPACKET cannot go over TCP"))
            }
        };
        let (fd, state) = match opened {
            Ok(o) => o,
            Err(e) => {
                debug!(cid = self.cfg.guest_cid, error = %e, "connect failed");
                self.never_opened(id);
                return self.reply_rst(h, &format!("connect failed: {e}"));
            }
        };
        let key = ConnKey {
            local_cid: h.dst_cid,
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        let mut conn = Conn::new(0, key, kind, fd, state);
        conn.id = id;
        conn.tcp = tcp;
        conn.afvsock = afvsock;
        conn.framed = sibling && kind == SockType::Seqpacket;
        conn.window = self.window_for(sibling);
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        if state == State::Established {
            conn.pending = pending::RESPONSE;
        }
        match self.insert(conn, true) {
            Ok(idx) => self.wake_rx(idx),
            Err(e) => {
                warn!(error = %e, "cannot watch host socket");
                self.never_opened(id);
                self.reply_rst(h, "cannot watch host socket");
            }
        }
    }

    /// Mails a socketpair end to sibling VM `cid`, whose guest will be asked to accept on
    /// `port`; our end answers once it did. The pair is a unix stream for both socket types:
    /// SEQPACKET travels in frames ([`crate::frame`]).
    fn sibling_open(
        &self,
        h: &Header,
        kind: SockType,
        cid: u64,
        port: u32,
    ) -> std::io::Result<(std::os::fd::OwnedFd, State)> {
        let (mine, theirs) = sys::socketpair(UnixKind::Stream)?;
        let msg = SiblingConnect {
            from_cid: self.cfg.guest_cid,
            from_port: h.src_port,
            to_port: port,
            kind,
            fd: theirs,
        };
        self.registry
            .deliver(cid, msg)
            .map_err(std::io::Error::other)?;
        Ok((mine, State::SiblingConnecting))
    }

    fn guest_response(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        let State::Requesting(reply) = c.state else {
            return self.violation(idx, "unexpected RESPONSE");
        };
        let fd = c.fd.as_raw_fd();
        let res = match reply {
            AcceptReply::HybridOk => {
                let line = format!("OK {}\n", c.key.local_port);
                sys::send(fd, line.as_bytes()).map(|n| n == line.len())
            }
            AcceptReply::SiblingAck => sys::send(fd, &[1]).map(|n| n == 1),
            AcceptReply::Forwarded => Ok(true),
        };
        match res {
            Ok(true) => {
                c.set_state(State::Established);
                if c.wait.take().is_some() {
                    self.handshakes -= 1;
                }
                let c = &mut self.conns[idx];
                // Bytes the host sent right after its CONNECT line are waiting.
                c.readable = true;
                self.sense_peer_shutdown(idx, EventSet::empty());
            }
            _ => self.reset(idx, "host end went away before the guest accepted"),
        }
    }

    fn guest_rw(&mut self, idx: usize, h: &Header, buf: &ChainBuf<'_>) {
        let c = &mut self.conns[idx];
        if c.state != State::Established {
            return self.violation(idx, "data before the connection was established");
        }
        if c.guest_shut_send {
            return self.violation(idx, "data after SHUTDOWN(SEND)");
        }
        let len = h.len as usize;
        c.rx_cnt = c.rx_cnt.wrapping_add(h.len);
        c.bytes_from_guest += u64::from(h.len);
        if let Some(s) = &self.stats {
            s.counters
                .bytes_from_guest
                .fetch_add(u64::from(h.len), std::sync::atomic::Ordering::Relaxed);
        }
        if c.host_shut_rcv || c.host_hup {
            // Sent before the guest saw our SHUTDOWN(RCV) (or while it is still queued behind
            // data, for a host end that closed): nobody will read it. Counted as
            // forwarded so the guest's credit stays consistent.
            c.fwd_cnt = c.fwd_cnt.wrapping_add(h.len);
            return;
        }
        let ok = if c.framed {
            framed_from_guest(c, buf, len, h.flags, &mut self.iov)
        } else if c.is_seqpacket() {
            seq_from_guest(c, buf, len, h.flags & SEQ_EOM != 0, &mut self.iov)
        } else {
            stream_from_guest(c, buf, len, &mut self.iov)
        };
        match ok {
            // The host end shut its read side or closed: the guest's sends must fail now.
            Err(e) if sys::is_epipe(&e) => c.host_stopped_receiving(),
            Err(e) => {
                let why = format!("host socket write failed: {e}");
                self.reset(idx, &why)
            }
            Ok(()) if c.buf.len() + c.partial_msg.len() > c.window.size() as usize => {
                self.violation(idx, "guest sent beyond its credit")
            }
            Ok(()) => {
                if c.needs_credit_update() {
                    c.pending |= pending::CREDIT_UPDATE;
                }
            }
        }
    }

    /// The guest's SHUTDOWN. RCV alone is applied to the host socket at once (SHUT_RD: the
    /// host program's writes fail with EPIPE). SEND waits until the buffered guest bytes are
    /// out; RCV arriving with it waits too, so both reach the host end in one
    /// `shutdown(SHUT_RDWR)`, behind the data: the other end sees a close, never a
    /// half-close first.
    fn guest_shutdown(&mut self, idx: usize, flags: u32) {
        let c = &mut self.conns[idx];
        let fd = c.fd.as_raw_fd();
        let rcv = flags & SHUTDOWN_RCV != 0 && !c.guest_shut_rcv;
        let send = flags & SHUTDOWN_SEND != 0;
        if rcv {
            c.guest_shut_rcv = true;
            if !send && !c.guest_shut_send {
                let _ = sys::shutdown(fd, Shutdown::Read);
            }
        }
        if send {
            c.guest_shut_send = true;
        }
        self.finish_guest_shutdown(idx);
    }

    /// Once the buffered guest bytes are out, applies the guest's SHUTDOWN(SEND) to the host
    /// socket (with its RCV if that is still owed), and completes a full close with the RST
    /// the guest waits for.
    pub(super) fn finish_guest_shutdown(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if !c.buf.is_empty() || !c.guest_shut_send || c.shut_wr_done {
            return;
        }
        let how = if c.guest_shut_rcv {
            Shutdown::Both
        } else {
            Shutdown::Write
        };
        let _ = sys::shutdown(c.fd.as_raw_fd(), how);
        c.shut_wr_done = true;
        if c.guest_shut_rcv {
            c.pending = pending::RST;
        }
    }

    /// Writes buffered guest bytes that the host socket can take now.
    pub(super) fn flush(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if c.buf.is_empty() {
            return;
        }
        match flush_buf(c, &mut self.iov) {
            Ok(()) => {
                // A guest left with little credit (a full buffer means none) learns what
                // went out.
                if c.needs_credit_update() {
                    c.pending |= pending::CREDIT_UPDATE;
                }
                self.finish_guest_shutdown(idx);
                self.wake_rx(idx);
            }
            Err(e) if sys::is_epipe(&e) => {
                c.host_stopped_receiving();
                self.finish_guest_shutdown(idx);
                self.wake_rx(idx);
            }
            Err(e) => {
                let why = format!("host socket write failed: {e}");
                self.reset(idx, &why)
            }
        }
    }
}

/// Sends one guest packet as a frame ([`crate::frame`]) straight from guest memory,
/// buffering what the socket does not take.
fn framed_from_guest(
    c: &mut Conn,
    buf: &ChainBuf<'_>,
    len: usize,
    flags: u32,
    iov: &mut Vec<libc::iovec>,
) -> std::io::Result<()> {
    let hdr = FrameHeader::new(len as u32, flags).to_bytes();
    let total = frame::HEADER_LEN + len;
    let mut sent = 0;
    if c.buf.is_empty() {
        buf.send_iovecs(HDR_LEN, len, iov);
        iov.insert(
            0,
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
        );
        sent = match sys::send_iov(c.fd.as_raw_fd(), iov) {
            Ok(n) => n,
            Err(e) if sys::would_block(&e) => 0,
            Err(e) => return Err(e),
        };
        let payload = sent.saturating_sub(frame::HEADER_LEN);
        c.fwd_cnt = c.fwd_cnt.wrapping_add(payload as u32);
    }
    if sent < total {
        let head = frame::HEADER_LEN.saturating_sub(sent);
        let mut rest = Vec::with_capacity(total - sent);
        rest.extend_from_slice(&hdr[frame::HEADER_LEN - head..]);
        let from = sent.saturating_sub(frame::HEADER_LEN);
        buf.copy_out(HDR_LEN + from, len - from, &mut rest);
        c.buf.push_framed(rest, head);
    }
    Ok(())
}

/// Sends `len` payload bytes of a stream packet, buffering what the socket does not take.
fn stream_from_guest(
    c: &mut Conn,
    buf: &ChainBuf<'_>,
    len: usize,
    iov: &mut Vec<libc::iovec>,
) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mut sent = 0;
    if c.buf.is_empty() {
        buf.send_iovecs(HDR_LEN, len, iov);
        sent = match sys::send_iov(c.fd.as_raw_fd(), iov) {
            Ok(n) => n,
            Err(e) if sys::would_block(&e) => 0,
            Err(e) => return Err(e),
        };
        c.fwd_cnt = c.fwd_cnt.wrapping_add(sent as u32);
    }
    if sent < len {
        let mut rest = Vec::with_capacity(len - sent);
        buf.copy_out(HDR_LEN + sent, len - sent, &mut rest);
        c.buf.push(rest);
    }
    Ok(())
}

/// Handles one SEQPACKET packet: a whole message (EOM) goes out with one sendmsg straight
/// from guest memory; pieces of a longer message are collected first.
fn seq_from_guest(
    c: &mut Conn,
    buf: &ChainBuf<'_>,
    len: usize,
    eom: bool,
    iov: &mut Vec<libc::iovec>,
) -> std::io::Result<()> {
    if eom && c.partial_msg.is_empty() && c.buf.is_empty() {
        buf.send_iovecs(HDR_LEN, len, iov);
        match sys::send_iov(c.fd.as_raw_fd(), iov) {
            Ok(_) => {
                c.fwd_cnt = c.fwd_cnt.wrapping_add(len as u32);
                return Ok(());
            }
            Err(e) if sys::would_block(&e) => {}
            Err(e) => return Err(e),
        }
    }
    buf.copy_out(HDR_LEN, len, &mut c.partial_msg);
    if eom {
        let msg = std::mem::take(&mut c.partial_msg);
        c.buf.push_msg(msg);
        flush_buf(c, iov)?;
    }
    Ok(())
}

/// Writes as much of the buffer as the socket takes.
fn flush_buf(c: &mut Conn, iov: &mut Vec<libc::iovec>) -> std::io::Result<()> {
    let fd = c.fd.as_raw_fd();
    // Whole messages on a SEQPACKET socket; bytes (frames included) on a stream.
    let msgs = c.is_seqpacket() && !c.framed;
    while !c.buf.is_empty() {
        let max = if msgs { 1 } else { 64 };
        c.buf.iovecs(max, iov);
        match sys::send_iov(fd, iov) {
            Ok(n) => {
                let n = if msgs {
                    c.buf.pop_msg()
                } else {
                    c.buf.consume(n)
                };
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
            }
            Err(e) if sys::would_block(&e) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
