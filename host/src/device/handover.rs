//! The connection table in a same-host handover (see [`crate::handover`]): records for the
//! saved state, detaching on the old daemon and adopting on the new one.
//!
//! What moves: established connections and host/sibling connects waiting for the guest (with
//! their credit counters, owed control packets and unsent bytes), and host connections whose
//! CONNECT line is incomplete (only peeked so far, so nothing was consumed). A guest connect
//! still waiting for its TCP or sibling target, a SEQPACKET connection holding more than one
//! unsent message or a partial one, and a connection already being reset are recorded as
//! `closing`: the new daemon sends the guest an RST for them. AF_VSOCK sockets of the
//! forwarding backend move like the unix ones (the kernel keeps the connection while any
//! descriptor of it is open).

use std::os::fd::OwnedFd;

use tracing::{info, warn};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::Device;
use std::os::fd::AsRawFd;

use crate::budget::Window;
use crate::conn::{pending, AcceptReply, Conn, ConnKey, State};
use crate::gate::Gate;
use crate::plugin::types::{ConnState, Connection, Credit, OwedOps, ShutdownFlags, SocketType};
use crate::vsock::header::{Header, SockType, HOST_CID, OP_RST, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// `local-port` of a record for a host connection whose CONNECT line is not complete.
const AWAITING_LINE: u32 = 0;

const OWED: [(u8, OwedOps); 6] = [
    (pending::REQUEST, OwedOps::REQUEST),
    (pending::RESPONSE, OwedOps::RESPONSE),
    (pending::RST, OwedOps::RST),
    (pending::SHUTDOWN, OwedOps::SHUTDOWN),
    (pending::CREDIT_UPDATE, OwedOps::CREDIT_UPDATE),
    (pending::CREDIT_REQUEST, OwedOps::CREDIT_REQUEST),
];

fn shut_flags(rcv: bool, send: bool) -> ShutdownFlags {
    let mut f = ShutdownFlags::empty();
    if rcv {
        f |= ShutdownFlags::NO_MORE_RECEIVE;
    }
    if send {
        f |= ShutdownFlags::NO_MORE_SEND;
    }
    f
}

/// The record of `c`; `None` as fd index means the connection cannot move (it is `closing`).
fn record(c: &Conn, fd_index: Option<u32>) -> Connection {
    let seq_movable = if c.framed {
        // Frame state is not recorded: only a connection between frames moves.
        c.buf.is_empty() && !c.in_frame
    } else {
        !c.is_seqpacket() || (c.buf.chunk_count() <= 1 && c.partial_msg.is_empty())
    };
    let state = match c.state {
        _ if c.pending & pending::RST != 0 || !seq_movable || fd_index.is_none() => {
            ConnState::Closing
        }
        State::Established => ConnState::Established,
        State::Requesting(_) | State::AwaitConnectLine | State::Waiting => ConnState::Connecting,
        State::SiblingConnecting | State::Connecting { .. } => ConnState::Closing,
    };
    let movable = state != ConnState::Closing;
    let mut owed = OwedOps::empty();
    for (bit, op) in OWED {
        if c.pending & bit != 0 {
            owed |= op;
        }
    }
    if c.state == State::Waiting {
        // The guest refused the last request: the new daemon asks again.
        owed |= OwedOps::REQUEST;
    }
    Connection {
        local_cid: c.key.local_cid,
        local_port: if c.state == State::AwaitConnectLine {
            AWAITING_LINE
        } else {
            c.key.local_port
        },
        peer_port: c.key.peer_port,
        kind: match c.kind {
            SockType::Stream => SocketType::Stream,
            SockType::Seqpacket => SocketType::Seqpacket,
        },
        state,
        credit: Credit {
            rx_cnt: c.rx_cnt,
            fwd_cnt: c.fwd_cnt,
            last_fwd_sent: c.last_fwd_sent,
            tx_cnt: c.tx_cnt,
            peer_buf_alloc: c.peer_buf_alloc,
            peer_fwd_cnt: c.peer_fwd_cnt,
        },
        peer_shutdown: shut_flags(c.guest_shut_rcv, c.guest_shut_send),
        local_shutdown: shut_flags(
            c.shutdown_flags & SHUTDOWN_RCV != 0,
            c.shutdown_flags & SHUTDOWN_SEND != 0,
        ),
        pending_to_guest: if movable {
            c.out_msg.get(c.out_off..).unwrap_or_default().to_vec()
        } else {
            Vec::new()
        },
        pending_to_host: if movable { c.buf.to_vec() } else { Vec::new() },
        fd_index: if movable { fd_index } else { None },
        id: c.id,
        owed: if movable { owed } else { OwedOps::RST },
        credit_requested: c.credit_requested,
        bytes_to_guest: c.bytes_to_guest,
        bytes_from_guest: c.bytes_from_guest,
    }
}

impl Device {
    /// Takes every connection out of service for a handover SAVE: returns their records and a
    /// duplicate of each movable socket (in fd-index order). The originals stay here, out of
    /// the epoll and silent, until [`Device::reattach`] or the end of the session.
    pub fn detach_for_handover(&mut self) -> (Vec<Connection>, Vec<OwnedFd>) {
        // A handover SAVE that failed left them detached: they are part of this one too.
        self.reattach();
        let mut records = Vec::with_capacity(self.conns.len());
        let mut fds = Vec::new();
        let idxs: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for idx in idxs {
            let c = self.conns.remove(idx);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                std::os::fd::AsRawFd::as_raw_fd(&c.fd),
                EpollEvent::default(),
            );
            let dup = match c.fd.try_clone() {
                Ok(fd) => Some(fd),
                Err(e) => {
                    warn!(cid = self.cfg.guest_cid, key = ?c.key, error = %e, "cannot duplicate a socket for handover; it will be reset");
                    None
                }
            };
            let rec = record(&c, dup.as_ref().map(|_| fds.len() as u32));
            if let (Some(fd), Some(_)) = (dup, rec.fd_index) {
                fds.push(fd);
            }
            records.push(rec);
            self.detached.push(c);
        }
        self.keys.clear();
        self.rx_list.clear();
        self.handshakes = 0;
        self.retries.clear();
        self.publish_count();
        info!(
            cid = self.cfg.guest_cid,
            connections = records.len(),
            sockets = fds.len(),
            "connections detached for handover"
        );
        (records, fds)
    }

    /// Live upgrade: stops (`false`) or restarts taking host connections. Stopped, new ones
    /// wait in the listen backlog, which moves to the new daemon with the listening sockets.
    pub fn take_host_connections(&mut self, on: bool) {
        let Some(l) = self.listeners.as_ref() else {
            return;
        };
        let fwd = l
            .forward
            .iter()
            .enumerate()
            .map(|(i, (fd, _))| (Some(*fd), super::TOKEN_LISTEN_FWD + i as u64));
        let all: Vec<_> = [
            (l.stream, super::TOKEN_LISTEN_STREAM),
            (l.seqpacket, super::TOKEN_LISTEN_SEQ),
        ]
        .into_iter()
        .chain(fwd)
        .filter_map(|(fd, tok)| Some((fd?, tok)))
        .collect();
        for (fd, tok) in all {
            let op = if on {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            if let Err(e) = self.epoll.ctl(op, fd, EpollEvent::new(EventSet::IN, tok)) {
                warn!(cid = self.cfg.guest_cid, error = %e, "listening socket in the epoll");
            }
        }
    }

    /// The rings run here again after a handover SAVE: the handover was abandoned and the
    /// detached connections carry on where they stopped.
    pub fn reattach(&mut self) {
        if self.detached.is_empty() {
            return;
        }
        let n = self.detached.len();
        for mut c in std::mem::take(&mut self.detached) {
            c.in_rx_list = false;
            c.readable = true;
            self.adopt(c);
        }
        info!(
            cid = self.cfg.guest_cid,
            connections = n,
            "handover abandoned; connections resumed"
        );
    }

    /// Drops detached connections without a word to anyone: their sockets live on in the
    /// daemon that took them over.
    pub fn forget_detached(&mut self) {
        self.detached.clear();
    }

    /// Puts a connection (rebuilt or reattached) into the table and the epoll.
    fn adopt(&mut self, c: Conn) {
        let awaiting = c.state == State::AwaitConnectLine;
        let handshake = c.in_handshake();
        let slot = c.holds_handshake();
        let waiting = c.state == State::Waiting;
        let key = c.key;
        match self.insert(c, !awaiting) {
            Ok(idx) => {
                if slot {
                    self.handshakes += 1;
                }
                if waiting {
                    self.schedule_retry(idx, std::time::Instant::now());
                }
                if handshake {
                    self.arm_timer();
                }
                self.wake_rx(idx);
            }
            Err(e) => {
                warn!(cid = self.cfg.guest_cid, ?key, error = %e, "cannot watch an adopted socket; resetting it");
                if !awaiting {
                    self.push_rst(key, SockType::Stream);
                }
            }
        }
    }

    fn push_rst(&mut self, key: ConnKey, kind: SockType) {
        self.stray_rst.push_back(Header {
            src_cid: key.local_cid,
            dst_cid: self.cfg.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: kind.wire(),
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// New daemon: rebuilds the connection table of a handover state. `records` were checked
    /// (unique keys, fd indices in range of `fds`, count within the connection limit).
    pub fn adopt_connections(&mut self, records: &[Connection], fds: Vec<OwnedFd>) {
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut max_id = 0;
        for r in records {
            let kind = match r.kind {
                SocketType::Stream => SockType::Stream,
                SocketType::Seqpacket => SockType::Seqpacket,
            };
            let key = ConnKey {
                local_cid: r.local_cid,
                local_port: r.local_port,
                peer_port: r.peer_port,
            };
            let fd = r
                .fd_index
                .and_then(|i| fds.get_mut(i as usize))
                .and_then(Option::take);
            let (state, fd) = match (r.state, fd) {
                (ConnState::Established, Some(fd)) => (State::Established, fd),
                (ConnState::Connecting, Some(fd)) if r.local_port == AWAITING_LINE => {
                    (State::AwaitConnectLine, fd)
                }
                (ConnState::Connecting, Some(fd)) => (
                    State::Requesting(if r.local_cid == HOST_CID && self.cfg.forward.is_some() {
                        AcceptReply::Forwarded
                    } else if r.local_cid == HOST_CID {
                        AcceptReply::HybridOk
                    } else {
                        AcceptReply::SiblingAck
                    }),
                    fd,
                ),
                _ => {
                    if r.local_port != AWAITING_LINE {
                        self.push_rst(key, kind);
                    }
                    if r.id != 0 {
                        self.never_opened(r.id);
                    }
                    continue;
                }
            };
            // A SEQPACKET connection over a unix stream is a framed sibling connection.
            let framed = kind == SockType::Seqpacket
                && crate::sys::socket_type(fd.as_raw_fd()).ok() == Some(libc::SOCK_STREAM);
            let afvsock = crate::afvsock::is_vsock(fd.as_raw_fd());
            let mut c = Conn::new(0, key, kind, fd, state);
            c.framed = framed;
            c.afvsock = afvsock;
            if state != State::AwaitConnectLine {
                // The guest knows the window of the old daemon; it must not shrink.
                let want = if r.local_cid == HOST_CID {
                    self.cfg.buf_alloc
                } else {
                    self.cfg.buf_alloc.max(super::MAX_SEQ_MSG as u32)
                };
                c.window = Window::reserve_all(&self.cfg.budget, want);
            }
            if state == State::AwaitConnectLine {
                c.key = ConnKey {
                    local_cid: HOST_CID,
                    local_port: 0,
                    peer_port: 0,
                };
            }
            c.id = r.id;
            max_id = max_id.max(r.id);
            c.bytes_to_guest = r.bytes_to_guest;
            c.bytes_from_guest = r.bytes_from_guest;
            c.rx_cnt = r.credit.rx_cnt;
            c.fwd_cnt = r.credit.fwd_cnt;
            c.last_fwd_sent = r.credit.last_fwd_sent;
            c.tx_cnt = r.credit.tx_cnt;
            c.peer_buf_alloc = r.credit.peer_buf_alloc;
            c.peer_fwd_cnt = r.credit.peer_fwd_cnt;
            c.credit_requested = r.credit_requested;
            c.guest_shut_rcv = r.peer_shutdown.contains(ShutdownFlags::NO_MORE_RECEIVE);
            c.guest_shut_send = r.peer_shutdown.contains(ShutdownFlags::NO_MORE_SEND);
            c.host_eof = r.local_shutdown.contains(ShutdownFlags::NO_MORE_SEND);
            c.host_shut_rcv = r.local_shutdown.contains(ShutdownFlags::NO_MORE_RECEIVE);
            c.shutdown_flags = (if r.local_shutdown.contains(ShutdownFlags::NO_MORE_RECEIVE) {
                SHUTDOWN_RCV
            } else {
                0
            }) | (if c.host_eof { SHUTDOWN_SEND } else { 0 });
            for (bit, op) in OWED {
                if r.owed.contains(op) {
                    c.pending |= bit;
                }
            }
            if !r.pending_to_host.is_empty() {
                if c.is_seqpacket() {
                    c.buf.push_msg(r.pending_to_host.clone());
                } else {
                    c.buf.push(r.pending_to_host.clone());
                }
            }
            c.out_msg = r.pending_to_guest.clone();
            c.readable = true;
            if let (State::Requesting(AcceptReply::HybridOk), Some(d)) =
                (state, self.cfg.connect_wait)
            {
                // The old daemon's deadline is not in the record: this daemon's wait starts.
                c.wait = Some(Box::new(crate::connwait::ConnectWait::new(
                    std::time::Instant::now(),
                    d,
                )));
            }
            self.adopt(c);
        }
        Gate::reserve_ids(max_id);
        info!(
            cid = self.cfg.guest_cid,
            connections = self.conns.len(),
            "connections adopted from handover"
        );
    }
}
