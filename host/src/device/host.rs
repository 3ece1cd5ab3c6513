//! Host-side events: listeners, the CONNECT handshake, sibling requests and readiness of
//! connected host sockets.

use std::os::fd::{AsRawFd, OwnedFd};

use tracing::{debug, warn};
use vmm_sys_util::epoll::{EpollEvent, EventSet};

use super::{
    Device, MAX_HANDSHAKES, TOKEN_CONNS, TOKEN_LISTEN_FWD, TOKEN_LISTEN_SEQ, TOKEN_LISTEN_STREAM,
    TOKEN_RETRY, TOKEN_SIBLING, TOKEN_TIMER,
};
use crate::afvsock;
use crate::conn::{pending, AcceptReply, Conn, ConnKey, Initiator, State};
use crate::connect::{parse_connect_line, MAX_CONNECT_LINE};
use crate::gate::{Admission, Request, Target};
use crate::proxy::VsockAddrs;
use crate::siblings::SiblingConnect;
use crate::sys;
use crate::vsock::header::{SockType, HOST_CID};

/// Connections accepted per listener wakeup, so one busy listener cannot starve the rings.
const ACCEPT_BATCH: usize = 64;

impl Device {
    /// Handles everything the host-socket epoll reports.
    pub fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(error = %e, "host epoll wait failed");
                    return;
                }
            };
            for ev in &events[..n] {
                let evset = EventSet::from_bits_truncate(ev.events);
                match ev.data() {
                    TOKEN_LISTEN_STREAM => self.accept(SockType::Stream),
                    TOKEN_LISTEN_SEQ => self.accept(SockType::Seqpacket),
                    TOKEN_SIBLING => self.sibling_requests(),
                    TOKEN_TIMER => self.expire_handshakes(),
                    TOKEN_CONNS => self.publish_conns(),
                    TOKEN_RETRY => self.retry_due(),
                    tok if tok >= TOKEN_LISTEN_FWD && tok - TOKEN_LISTEN_FWD < 1 << 32 => {
                        self.accept_forward((tok - TOKEN_LISTEN_FWD) as usize)
                    }
                    tok => self.conn_event(tok, evset),
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept(&mut self, kind: SockType) {
        let Some(l) = &self.listeners else { return };
        let fd = match kind {
            SockType::Stream => l.stream,
            SockType::Seqpacket => l.seqpacket,
        };
        let Some(fd) = fd else { return };
        for _ in 0..ACCEPT_BATCH {
            let sock = match sys::accept(fd) {
                Ok(s) => s,
                Err(e) if sys::would_block(&e) => return,
                Err(e) => {
                    warn!(error = %e, "accept on uds path failed");
                    return;
                }
            };
            if self.at_capacity() || self.handshakes >= MAX_HANDSHAKES {
                warn!(
                    cid = self.cfg.guest_cid,
                    "too many host connections; closing a new one"
                );
                continue;
            }
            self.host_connected(sock, kind);
        }
    }

    /// A host program connected to `forward-listen` port number `i`: the guest is asked to
    /// accept on the same port, from the host program's port (the peer's choice) unless a
    /// connection already uses that pair.
    fn accept_forward(&mut self, i: usize) {
        let Some(&(fd, port)) = self.listeners.as_ref().and_then(|l| l.forward.get(i)) else {
            return;
        };
        for _ in 0..ACCEPT_BATCH {
            let (sock, peer_cid, peer_port) = match afvsock::accept(fd) {
                Ok(s) => s,
                Err(e) if sys::would_block(&e) => return,
                Err(e) => {
                    warn!(error = %e, port, "accept on forward-listen port failed");
                    return;
                }
            };
            if self.at_capacity() {
                warn!(
                    cid = self.cfg.guest_cid,
                    "too many host connections; closing a new one"
                );
                continue;
            }
            debug!(
                cid = self.cfg.guest_cid,
                peer_cid, peer_port, port, "forwarded connect"
            );
            self.forward_connected(sock, peer_port, port);
        }
    }

    /// Asks the gate about a host program's connection into this guest. Returns the
    /// connection id and the guest port it goes to (a plugin may redirect it to another port
    /// of this guest), or `None` when it is refused or redirected off this guest.
    fn admit_host_connect(&self, req: Request) -> Option<(u64, u32)> {
        let asked = req.dst.1;
        match self.admit(req) {
            Admission::Admit {
                id,
                target: Target::Default,
            } => Some((id, asked)),
            Admission::Admit {
                id,
                target: Target::Vsock { cid, port },
            } if cid == self.cfg.guest_cid => Some((id, port)),
            Admission::Admit { id, .. } => {
                warn!(
                    cid = self.cfg.guest_cid,
                    "host connect redirected off this guest; closing"
                );
                self.never_opened(id);
                None
            }
            Admission::Refuse(why) => {
                debug!(cid = self.cfg.guest_cid, port = asked, %why, "host connect refused");
                None
            }
        }
    }

    fn forward_connected(&mut self, sock: OwnedFd, host_port: u32, guest_port: u32) {
        let taken = |p| {
            self.keys.contains_key(&ConnKey {
                local_cid: HOST_CID,
                local_port: p,
                peer_port: guest_port,
            })
        };
        let local_port = if taken(host_port) {
            self.alloc_host_port(guest_port)
        } else {
            host_port
        };
        let Some((id, port)) = self.admit_host_connect(Request {
            src: (HOST_CID, local_port),
            dst: (self.cfg.guest_cid, guest_port),
            kind: SockType::Stream,
            from_guest: false,
            peer: None,
        }) else {
            return;
        };
        let key = ConnKey {
            local_cid: HOST_CID,
            local_port,
            peer_port: port,
        };
        if self.keys.contains_key(&key) {
            // A policy redirected onto a pair in use.
            debug!(
                cid = self.cfg.guest_cid,
                port, "host connect collides; closing"
            );
            return self.never_opened(id);
        }
        let mut conn = Conn::new(
            0,
            key,
            SockType::Stream,
            sock,
            State::Requesting(AcceptReply::Forwarded),
        );
        conn.initiator = Initiator::Host;
        conn.id = id;
        conn.afvsock = true;
        conn.window = self.window_for(false);
        conn.pending = pending::REQUEST;
        match self.insert(conn, true) {
            Ok(idx) => self.wake_rx(idx),
            Err(e) => {
                warn!(error = %e, "cannot watch host socket");
                self.never_opened(id);
            }
        }
    }

    fn host_connected(&mut self, sock: OwnedFd, kind: SockType) {
        let key = ConnKey {
            local_cid: HOST_CID,
            local_port: 0,
            peer_port: 0,
        };
        let peer = crate::peer::PeerIdentity::of_socket(sock.as_raw_fd()).map(Box::new);
        let mut conn = Conn::new(0, key, kind, sock, State::AwaitConnectLine);
        conn.initiator = Initiator::Host;
        conn.peer = peer;
        match self.insert(conn, false) {
            Ok(idx) => {
                self.handshakes += 1;
                self.conns[idx].readable = true;
                self.read_connect_line(idx);
            }
            Err(e) => warn!(error = %e, "cannot watch host socket"),
        }
    }

    /// Consumes exactly the CONNECT line, leaving any bytes after it in the socket for the
    /// guest, and offers the connection to the guest.
    fn read_connect_line(&mut self, idx: usize) {
        let span = self.conns[idx].span.clone();
        let _entered = span.enter();
        let c = &mut self.conns[idx];
        let fd = c.fd.as_raw_fd();
        let mut line = [0u8; MAX_CONNECT_LINE];
        let n = match sys::peek(fd, &mut line) {
            Ok(0) => return self.remove(idx),
            Ok(n) => n,
            Err(e) if sys::would_block(&e) => {
                c.readable = false;
                return;
            }
            Err(_) => return self.remove(idx),
        };
        let end = match line[..n].iter().position(|&b| b == b'\n') {
            Some(p) => p + 1,
            // A SEQPACKET CONNECT message needs no newline.
            None if c.is_seqpacket() => n,
            None if n == MAX_CONNECT_LINE => {
                warn!(cid = self.cfg.guest_cid, "overlong CONNECT line; closing");
                return self.remove(idx);
            }
            None => return,
        };
        // Consume the line (or the whole first message) and nothing more.
        let mut sink = [0u8; MAX_CONNECT_LINE];
        if sys::recv(fd, &mut sink[..end]).ok() != Some(end) {
            return self.remove(idx);
        }
        let text = line[..end].strip_suffix(b"\n").unwrap_or(&line[..end]);
        let Some(asked) = parse_connect_line(text) else {
            warn!(
                cid = self.cfg.guest_cid,
                line = %String::from_utf8_lossy(text),
                "bad CONNECT line; closing"
            );
            return self.remove(idx);
        };
        let local_port = self.alloc_host_port(asked);
        let kind = self.conns[idx].kind;
        let peer = self.conns[idx].peer.take().map(|p| *p);
        let Some((id, port)) = self.admit_host_connect(Request {
            src: (HOST_CID, local_port),
            dst: (self.cfg.guest_cid, asked),
            kind,
            from_guest: false,
            peer,
        }) else {
            return self.remove(idx);
        };
        let window = self.window_for(false);
        let c = &mut self.conns[idx];
        c.window = window;
        c.id = id;
        c.key = ConnKey {
            local_cid: HOST_CID,
            local_port,
            peer_port: port,
        };
        c.set_state(State::Requesting(AcceptReply::HybridOk));
        c.pending = pending::REQUEST;
        c.span.record("local_port", port);
        c.span.record("peer_port", local_port);
        // A connect that may wait for the guest keeps its handshake slot until accepted.
        match self.cfg.connect_wait {
            Some(d) => {
                c.wait = Some(Box::new(crate::connwait::ConnectWait::new(
                    std::time::Instant::now(),
                    d,
                )))
            }
            None => self.handshakes -= 1,
        }
        self.keys.insert(self.conns[idx].key, idx);
        self.publish_count();
        self.note_opened(Initiator::Host);
        // The addresses are in the connection's span.
        debug!("host connect");
        self.wake_rx(idx);
    }

    fn sibling_requests(&mut self) {
        let Some(inbox) = &self.inbox else { return };
        let _ = inbox.wake.read();
        let mut reqs = Vec::new();
        while let Ok(r) = inbox.rx.try_recv() {
            reqs.push(r);
        }
        for r in reqs {
            self.sibling_connect(r);
        }
    }

    fn sibling_connect(&mut self, r: SiblingConnect) {
        let key = ConnKey {
            local_cid: r.from_cid,
            local_port: r.from_port,
            peer_port: r.to_port,
        };
        if self.at_capacity() || self.keys.contains_key(&key) {
            // Dropping the socket tells the other VM to reset its guest.
            warn!(
                cid = self.cfg.guest_cid,
                from = r.from_cid,
                "refusing sibling connection"
            );
            return;
        }
        if r.kind == SockType::Seqpacket && !self.seqpacket() {
            return;
        }
        let mut conn = Conn::new(
            0,
            key,
            r.kind,
            r.fd,
            State::Requesting(AcceptReply::SiblingAck),
        );
        conn.pending = pending::REQUEST;
        conn.initiator = Initiator::Sibling;
        conn.framed = r.kind == SockType::Seqpacket;
        conn.window = self.window_for(true);
        match self.insert(conn, true) {
            Ok(idx) => self.wake_rx(idx),
            Err(e) => warn!(error = %e, "cannot watch sibling socket"),
        }
    }

    fn conn_event(&mut self, tok: u64, ev: EventSet) {
        let idx = (tok & 0xffff_ffff) as usize;
        let gen = (tok >> 32) as u32;
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        if c.gen != gen {
            return;
        }
        let span = c.span.clone();
        let _entered = span.enter();
        if ev
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            c.readable = true;
        }
        if ev.contains(EventSet::HANG_UP) {
            c.host_hup = true;
        }
        if ev.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
            c.hangup_seen = true;
        }
        if ev.contains(EventSet::OUT) {
            self.flush(idx);
        }
        if self.conns.contains(idx) {
            self.sense_peer_shutdown(idx, ev);
        }
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        match c.state {
            State::AwaitConnectLine => self.read_connect_line(idx),
            State::SiblingConnecting => self.sibling_answer(idx),
            State::Connecting { proxy } => self.connected(idx, ev, proxy),
            State::Requesting(_) | State::Established => self.wake_rx(idx),
            // Only a full close ends the wait: a host that shut its write side after the
            // CONNECT line still wants the answer.
            State::Waiting if c.host_hup => {
                debug!("host went away while waiting for the guest");
                self.remove(idx)
            }
            State::Waiting => {}
        }
    }

    /// Notices a host end that takes no more bytes (a close, or SHUT_RD) before the guest
    /// sends into it: HUP says both directions are shut; on a unix stream a zero-length send
    /// fails with EPIPE once the peer shut its read side (that wakes our socket, so every
    /// event is a chance to look). Our own SHUT_WR also sets what these see, so nothing is
    /// concluded after it. A close whose data or EOF is still to be read is told behind them,
    /// RCV and SEND in one SHUTDOWN ([`super::rx`]'s end of stream); a bare SHUT_RD is told
    /// at once. Called on every socket event and when a connection becomes established (an
    /// edge-triggered event that came during the handshake was consumed without a look).
    pub(super) fn sense_peer_shutdown(&mut self, idx: usize, ev: EventSet) {
        let c = &mut self.conns[idx];
        if c.state != State::Established || c.host_shut_rcv || c.shut_wr_done {
            return;
        }
        let fd = c.fd.as_raw_fd();
        let hup = ev.contains(EventSet::HANG_UP);
        let stopped = hup
            || (c.probes_peer_shutdown()
                && matches!(sys::probe_send(fd), Err(e) if sys::is_epipe(&e)));
        if !stopped {
            return;
        }
        // A peer that stopped receiving and also sent its last byte closed (or shut both
        // ways): AF_VSOCK shows that as RDHUP, not HUP, while that last data is unread.
        let both =
            hup || sys::poll_now(fd).is_ok_and(|r| r & (libc::POLLHUP | libc::POLLRDHUP) != 0);
        if both && c.may_read_host() {
            c.host_hup = true;
            c.readable = true;
        } else {
            c.host_stopped_receiving();
        }
        self.wake_rx(idx);
    }

    /// A non-blocking connect (TCP route, AF_VSOCK forward) finished, one way or the other.
    fn connected(&mut self, idx: usize, ev: EventSet, proxy: bool) {
        if !ev.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
            return;
        }
        let c = &self.conns[idx];
        let fd = c.fd.as_raw_fd();
        let addrs = self.proxy_addrs(c.id, c.key.peer_port, c.key.local_cid, c.key.local_port);
        let connected = sys::take_error(fd).and_then(|e| match e {
            Some(e) => Err(e),
            None if proxy => send_proxy_header(fd, &addrs),
            None => Ok(()),
        });
        let c = &mut self.conns[idx];
        match connected {
            Ok(()) => {
                c.set_state(State::Established);
                c.pending |= pending::RESPONSE;
                self.sense_peer_shutdown(idx, EventSet::empty());
                self.wake_rx(idx);
            }
            Err(e) => self.reset(idx, &format!("connect failed: {e}")),
        }
    }

    /// The addresses a PROXY header names for a guest connection from `guest_port` to
    /// `(cid, port)`.
    pub(super) fn proxy_addrs(&self, id: u64, guest_port: u32, cid: u64, port: u32) -> VsockAddrs {
        VsockAddrs {
            src_cid: u32::try_from(self.cfg.guest_cid).unwrap_or(u32::MAX),
            src_port: guest_port,
            dst_cid: u32::try_from(cid).unwrap_or(u32::MAX),
            dst_port: port,
            id,
        }
    }

    /// The sibling VM's guest accepted (one byte) or refused (the socket closed).
    fn sibling_answer(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        let mut b = [0u8; 1];
        match sys::recv(c.fd.as_raw_fd(), &mut b) {
            Ok(1) => {
                c.set_state(State::Established);
                c.pending |= pending::RESPONSE;
                self.sense_peer_shutdown(idx, EventSet::empty());
                self.wake_rx(idx);
            }
            Err(e) if sys::would_block(&e) => c.readable = false,
            _ => self.reset(idx, "sibling refused the connection"),
        }
    }
}

/// Writes the PROXY v2 header on a just-connected socket. It is the first thing written, so
/// the socket buffer is empty and it goes out whole; anything else is an error.
pub(super) fn send_proxy_header(fd: std::os::fd::RawFd, a: &VsockAddrs) -> std::io::Result<()> {
    let h = crate::proxy::header_v2(a);
    match sys::send(fd, &h)? {
        n if n == h.len() => Ok(()),
        n => Err(std::io::Error::other(format!(
            "PROXY header cut short ({n} of {} bytes sent)",
            h.len()
        ))),
    }
}
