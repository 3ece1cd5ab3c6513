//! The packet state machine of the driver (Linux's `virtio_transport_recv_pkt` and
//! friends): what each received packet does to the socket table, and connection teardown.

use std::time::Instant;

use super::engine::{Core, EPHEMERAL_FIRST, EVENTS_MAX};
use super::socket::{EndReason, SockKey, SockType, Socket, State};
use crate::packet::*;

impl Core {
    fn reply_rst(&mut self, h: &PacketHeader) {
        if h.op == OP_RST {
            return;
        }
        let rst = PacketHeader {
            src_cid: self.cid,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: h.type_,
            op: OP_RST,
            ..Default::default()
        };
        self.send_ctrl(rst);
    }

    /// After the application consumed bytes: advertise credit if the peer could stall.
    pub fn after_read(&mut self, key: SockKey) {
        let threshold = self.cfg.credit_update_threshold;
        let needs = self
            .sockets
            .get(&key)
            .is_some_and(|s| s.state == State::Established && s.needs_credit_update(threshold));
        if needs {
            self.send_sock_ctrl(key, OP_CREDIT_UPDATE, 0);
        }
    }

    // ----- ports, connect, close ---------------------------------------------------------

    fn port_in_use(&self, port: u32) -> bool {
        self.listeners.contains_key(&port) || self.sockets.keys().any(|k| k.local_port == port)
    }

    pub fn alloc_port(&mut self) -> Option<u32> {
        let span = u32::MAX - EPHEMERAL_FIRST;
        for _ in 0..span.min(1 << 20) {
            let p = self.next_port;
            self.next_port = if p == u32::MAX {
                EPHEMERAL_FIRST
            } else {
                p + 1
            };
            if !self.port_in_use(p) {
                return Some(p);
            }
        }
        None
    }

    /// The application drops its handle: Linux's `virtio_transport_close`.
    pub fn close_sock(&mut self, key: SockKey) {
        let timeout = self.cfg.close_timeout;
        let Some(sock) = self.sockets.get_mut(&key) else {
            return;
        };
        sock.handle_alive = false;
        match sock.state {
            State::Connecting => {
                self.send_sock_ctrl(key, OP_RST, 0);
                self.sockets.remove(&key);
            }
            State::Established => {
                if sock.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    self.send_sock_ctrl(key, OP_RST, 0);
                    self.sockets.remove(&key);
                } else {
                    let already = sock.local_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND;
                    sock.local_shutdown = SHUTDOWN_RCV | SHUTDOWN_SEND;
                    sock.state = State::Closing {
                        deadline: Instant::now() + timeout,
                    };
                    if !already {
                        self.send_sock_ctrl(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                    }
                }
            }
            State::Closing { .. } => {}
            State::Closed => {
                self.sockets.remove(&key);
            }
        }
    }

    /// Abortive close.
    pub fn reset_sock(&mut self, key: SockKey) {
        if let Some(s) = self.sockets.get(&key) {
            if s.state != State::Closed {
                self.send_sock_ctrl(key, OP_RST, 0);
            }
            self.sockets.remove(&key);
        }
    }

    fn end_sock(&mut self, key: SockKey, reason: EndReason) {
        let remove = match self.sockets.get_mut(&key) {
            Some(s) => {
                s.state = State::Closed;
                if s.end.is_none() {
                    s.end = Some(reason);
                }
                !s.handle_alive
            }
            None => false,
        };
        if remove {
            self.sockets.remove(&key);
        }
    }

    /// Closing sockets whose peer never answered get an RST. Returns the next deadline.
    pub fn expire(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut due = Vec::new();
        for (k, s) in &self.sockets {
            if let State::Closing { deadline } = s.state {
                if deadline <= now {
                    due.push(*k);
                } else {
                    next = Some(next.map_or(deadline, |n| n.min(deadline)));
                }
            }
        }
        for k in due {
            self.send_sock_ctrl(k, OP_RST, 0);
            self.sockets.remove(&k);
        }
        next
    }

    pub(super) fn dispatch(&mut self, h: PacketHeader, data: Vec<u8>) {
        if h.dst_cid != self.cid {
            self.violation(format!(
                "device delivered {} for cid {} to guest cid {}",
                op_name(h.op),
                h.dst_cid,
                self.cid
            ));
            self.reply_rst(&h);
            return;
        }
        let Some(ty) = SockType::from_wire(h.type_) else {
            self.reply_rst(&h);
            return;
        };
        let key = SockKey {
            local_port: h.dst_port,
            peer_cid: h.src_cid,
            peer_port: h.src_port,
        };
        if self.sockets.contains_key(&key) {
            self.on_socket_packet(key, ty, h, data);
            return;
        }
        if h.op == OP_REQUEST {
            self.on_request(key, ty, h);
            return;
        }
        self.reply_rst(&h);
    }

    fn on_request(&mut self, key: SockKey, ty: SockType, h: PacketHeader) {
        let buf_alloc = self.cfg.buf_alloc;
        let ok = match self.listeners.get(&key.local_port) {
            Some(l) => l.ty == ty && l.backlog.len() < l.cap,
            None => false,
        };
        if !ok || (ty == SockType::Seqpacket && !self.seqpacket) {
            self.reply_rst(&h);
            return;
        }
        let mut sock = Socket::new(ty, State::Established, buf_alloc);
        sock.update_peer_credit(&h);
        self.sockets.insert(key, sock);
        self.send_sock_ctrl(key, OP_RESPONSE, 0);
        if let Some(l) = self.listeners.get_mut(&key.local_port) {
            l.backlog.push_back(key);
        }
    }

    fn on_socket_packet(&mut self, key: SockKey, ty: SockType, h: PacketHeader, data: Vec<u8>) {
        let Some(sock) = self.sockets.get_mut(&key) else {
            return;
        };
        if sock.ty != ty {
            self.send_sock_ctrl(key, OP_RST, 0);
            self.end_sock(key, EndReason::Protocol);
            return;
        }
        sock.update_peer_credit(&h);
        match sock.state {
            State::Connecting => match h.op {
                OP_RESPONSE => sock.state = State::Established,
                OP_RST => {
                    sock.got_rst = true;
                    self.end_sock(key, EndReason::Refused);
                }
                _ => {
                    self.send_sock_ctrl(key, OP_RST, 0);
                    self.end_sock(key, EndReason::Protocol);
                }
            },
            State::Established => self.on_established(key, h, data),
            State::Closing { .. } => match h.op {
                OP_RST => {
                    self.sockets.remove(&key);
                }
                OP_SHUTDOWN => {
                    sock.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                    if sock.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                        self.send_sock_ctrl(key, OP_RST, 0);
                        self.sockets.remove(&key);
                    }
                }
                OP_CREDIT_REQUEST => self.send_sock_ctrl(key, OP_CREDIT_UPDATE, 0),
                _ => {}
            },
            State::Closed => {
                if h.op != OP_RST {
                    self.reply_rst(&h);
                }
            }
        }
    }

    fn on_established(&mut self, key: SockKey, h: PacketHeader, data: Vec<u8>) {
        let Some(sock) = self.sockets.get_mut(&key) else {
            return;
        };
        match h.op {
            OP_RW => {
                if sock.peer_shutdown & SHUTDOWN_SEND != 0 {
                    let msg = format!(
                        "RW of {} bytes on port {} after the peer's SHUTDOWN(SEND)",
                        data.len(),
                        key.local_port
                    );
                    self.violation(msg);
                    return;
                }
                if sock.local_shutdown & SHUTDOWN_RCV != 0 {
                    return;
                }
                let len = data.len();
                let flags = if sock.ty == SockType::Seqpacket {
                    h.flags & (SEQ_EOM | SEQ_EOR)
                } else {
                    0
                };
                if !sock.push_rx(data, flags) {
                    let (alloc, used) = (sock.credit_info().buf_alloc, sock.rx_bytes());
                    self.violation(format!(
                        "credit overrun on port {}: {len} bytes with {used} of {alloc} queued",
                        key.local_port
                    ));
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                self.stats.credit_requests_received += 1;
                self.send_sock_ctrl(key, OP_CREDIT_UPDATE, 0);
            }
            OP_SHUTDOWN => {
                sock.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if sock.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && !sock.has_rx() {
                    self.send_sock_ctrl(key, OP_RST, 0);
                    self.end_sock(key, EndReason::PeerClosed);
                }
            }
            OP_RST => {
                sock.got_rst = true;
                let reason = if sock.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    EndReason::PeerClosed
                } else {
                    EndReason::Reset
                };
                self.end_sock(key, reason);
            }
            _ => {
                self.send_sock_ctrl(key, OP_RST, 0);
                self.end_sock(key, EndReason::Protocol);
            }
        }
    }

    pub(super) fn on_event(&mut self, id: u32) {
        self.events_total += 1;
        if self.events.len() == EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back(id);
        if id != EVENT_TRANSPORT_RESET {
            self.violation(format!("unknown event id {id}"));
            return;
        }
        let keys: Vec<SockKey> = self.sockets.keys().copied().collect();
        for k in keys {
            self.end_sock(k, EndReason::TransportReset);
        }
        if let Some(src) = self.cid_source.as_mut() {
            match src() {
                Ok(cid) => self.cid = cid,
                Err(e) => {
                    let msg = format!("re-reading guest_cid after TRANSPORT_RESET: {e:#}");
                    self.violation(msg);
                }
            }
        }
    }
}
