//! Per-connection state and credit accounting of the guest driver, following the virtio spec
//! (5.10.6.3) and Linux's `virtio_transport_common.c`.

use std::collections::VecDeque;
use std::time::Instant;

use crate::packet::{PacketHeader, SEQ_EOM, SEQ_EOR, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Socket type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SockType {
    Stream,
    Seqpacket,
}

impl SockType {
    pub fn wire(self) -> u16 {
        match self {
            SockType::Stream => crate::packet::TYPE_STREAM,
            SockType::Seqpacket => crate::packet::TYPE_SEQPACKET,
        }
    }

    pub fn from_wire(t: u16) -> Option<SockType> {
        match t {
            crate::packet::TYPE_STREAM => Some(SockType::Stream),
            crate::packet::TYPE_SEQPACKET => Some(SockType::Seqpacket),
            _ => None,
        }
    }
}

/// Connection identity from the guest's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local_port: u32,
    pub peer_cid: u64,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// REQUEST sent, waiting for RESPONSE.
    Connecting,
    Established,
    /// The application closed; SHUTDOWN sent, waiting for the peer's RST until `deadline`.
    Closing {
        deadline: Instant,
    },
    /// The connection is over (RST received or sent); the handle may still read queued data.
    Closed,
}

/// Why a connection ended, as the application sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// Connect answered with RST.
    Refused,
    /// RST while connected, without a prior full SHUTDOWN from the peer.
    Reset,
    /// Peer shut down both directions (and possibly sent RST afterwards): a clean end.
    PeerClosed,
    /// A TRANSPORT_RESET event dropped the connection.
    TransportReset,
    /// The device sent something invalid for the state (e.g. a type mismatch).
    Protocol,
}

/// One received RW payload.
struct Chunk {
    data: Vec<u8>,
    off: usize,
    flags: u32,
}

/// Snapshot of a socket's credit counters, for assertions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditInfo {
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    pub last_fwd_cnt_sent: u32,
    pub rx_bytes: u32,
    pub tx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
}

pub(crate) struct Socket {
    pub ty: SockType,
    pub state: State,
    /// Flags the peer sent in SHUTDOWN (RCV: it receives no more; SEND: it sends no more).
    pub peer_shutdown: u32,
    /// Flags we sent in SHUTDOWN.
    pub local_shutdown: u32,
    pub end: Option<EndReason>,
    pub got_rst: bool,
    /// The application still holds a handle.
    pub handle_alive: bool,
    rx: VecDeque<Chunk>,
    rx_bytes: u32,
    complete_msgs: usize,
    buf_alloc: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    rx_total: u32,
    pub tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl Socket {
    pub fn new(ty: SockType, state: State, buf_alloc: u32) -> Self {
        Socket {
            ty,
            state,
            peer_shutdown: 0,
            local_shutdown: 0,
            end: None,
            got_rst: false,
            handle_alive: true,
            rx: VecDeque::new(),
            rx_bytes: 0,
            complete_msgs: 0,
            buf_alloc,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_total: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            bytes_received: 0,
            bytes_sent: 0,
        }
    }

    /// Every packet from the peer carries its receive buffer state.
    pub fn update_peer_credit(&mut self, h: &PacketHeader) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// Bytes we may send now: `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Stamps our credit state into an outgoing header.
    pub fn stamp(&mut self, h: &mut PacketHeader) {
        h.buf_alloc = self.buf_alloc;
        h.fwd_cnt = self.fwd_cnt;
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    /// Queues a received payload. Returns false (and queues nothing) if it exceeds the credit
    /// we gave: a peer bug.
    pub fn push_rx(&mut self, data: Vec<u8>, flags: u32) -> bool {
        let len = data.len() as u64;
        if len > u64::from(self.buf_alloc - self.rx_bytes) {
            return false;
        }
        let len = len as u32;
        self.rx_bytes += len;
        self.rx_total = self.rx_total.wrapping_add(len);
        self.bytes_received += u64::from(len);
        let eom = self.ty == SockType::Seqpacket && flags & SEQ_EOM != 0;
        if eom {
            self.complete_msgs += 1;
        }
        if len > 0 || eom {
            self.rx.push_back(Chunk {
                data,
                off: 0,
                flags,
            });
        }
        true
    }

    pub fn rx_bytes(&self) -> u32 {
        self.rx_bytes
    }

    pub fn has_rx(&self) -> bool {
        !self.rx.is_empty()
    }

    pub fn complete_msgs(&self) -> usize {
        self.complete_msgs
    }

    fn consumed(&mut self, n: u32) {
        self.rx_bytes -= n;
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    /// Stream read: copies queued bytes into `buf`.
    pub fn read_stream(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            let Some(c) = self.rx.front_mut() else { break };
            let take = (c.data.len() - c.off).min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&c.data[c.off..c.off + take]);
            c.off += take;
            n += take;
            if c.off == c.data.len() {
                self.rx.pop_front();
            }
        }
        self.consumed(n as u32);
        n
    }

    /// Seqpacket read of one complete message: returns (message length, EOR flag); bytes
    /// beyond `buf` are discarded. Call only when `complete_msgs() > 0`.
    pub fn read_msg(&mut self, buf: &mut [u8]) -> (usize, bool) {
        let mut total = 0usize;
        let mut copied = 0usize;
        let mut eor = false;
        while let Some(c) = self.rx.pop_front() {
            let len = c.data.len() - c.off;
            let take = len.min(buf.len() - copied);
            buf[copied..copied + take].copy_from_slice(&c.data[c.off..c.off + take]);
            copied += take;
            total += len;
            if c.flags & SEQ_EOM != 0 {
                eor = c.flags & SEQ_EOR != 0;
                self.complete_msgs -= 1;
                break;
            }
        }
        self.consumed(total as u32);
        (total, eor)
    }

    /// Linux's rule, stated exactly: the peer believes we have
    /// `buf_alloc - (rx_total - last_fwd_cnt_sent)` bytes free. When that falls below
    /// `threshold` and we have freed space it does not know about, tell it.
    pub fn needs_credit_update(&self, threshold: u32) -> bool {
        let unacked = self.rx_total.wrapping_sub(self.last_fwd_cnt_sent);
        let believed_free = self.buf_alloc.saturating_sub(unacked);
        believed_free < threshold && self.fwd_cnt != self.last_fwd_cnt_sent
    }

    /// The peer will send no more data: reads return EOF once the queue is empty.
    pub fn peer_done_sending(&self) -> bool {
        self.peer_shutdown & SHUTDOWN_SEND != 0 || self.state == State::Closed
    }

    /// We may not send (we shut down, or the peer will not receive, or the connection ended).
    pub fn send_closed(&self) -> bool {
        self.local_shutdown & SHUTDOWN_SEND != 0
            || self.peer_shutdown & SHUTDOWN_RCV != 0
            || !matches!(self.state, State::Established)
    }

    pub fn credit_info(&self) -> CreditInfo {
        CreditInfo {
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
            last_fwd_cnt_sent: self.last_fwd_cnt_sent,
            rx_bytes: self.rx_bytes,
            tx_cnt: self.tx_cnt,
            peer_buf_alloc: self.peer_buf_alloc,
            peer_fwd_cnt: self.peer_fwd_cnt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_window_and_wrap() {
        let mut s = Socket::new(SockType::Stream, State::Established, 1000);
        let h = PacketHeader {
            buf_alloc: 100,
            fwd_cnt: u32::MAX - 10,
            ..Default::default()
        };
        s.update_peer_credit(&h);
        s.tx_cnt = u32::MAX - 10;
        assert_eq!(s.peer_credit(), 100);
        s.tx_cnt = s.tx_cnt.wrapping_add(60);
        assert_eq!(s.peer_credit(), 40);
        // Peer shrank its buffer below what is in flight: no credit, no underflow.
        let h2 = PacketHeader { buf_alloc: 10, ..h };
        s.update_peer_credit(&h2);
        assert_eq!(s.peer_credit(), 0);
    }

    #[test]
    fn rx_bounded_by_buf_alloc_and_credit_update_rule() {
        let mut s = Socket::new(SockType::Stream, State::Established, 100);
        assert!(s.push_rx(vec![1; 60], 0));
        assert!(!s.push_rx(vec![2; 41], 0));
        assert!(s.push_rx(vec![3; 40], 0));
        assert_eq!(s.rx_bytes(), 100);
        // Nothing consumed yet: nothing to advertise.
        assert!(!s.needs_credit_update(30));
        let mut buf = [0u8; 70];
        assert_eq!(s.read_stream(&mut buf), 70);
        assert_eq!(&buf[..60], &[1; 60][..]);
        assert_eq!(&buf[60..], &[3; 10][..]);
        // Peer believes 0 bytes free; we freed 70.
        assert!(s.needs_credit_update(30));
        let mut h = PacketHeader::default();
        s.stamp(&mut h);
        assert_eq!(h.fwd_cnt, 70);
        assert!(!s.needs_credit_update(30));
    }

    #[test]
    fn seqpacket_messages_and_truncation() {
        let mut s = Socket::new(SockType::Seqpacket, State::Established, 1000);
        assert!(s.push_rx(b"hel".to_vec(), 0));
        assert_eq!(s.complete_msgs(), 0);
        assert!(s.push_rx(b"lo".to_vec(), SEQ_EOM | SEQ_EOR));
        assert!(s.push_rx(Vec::new(), SEQ_EOM));
        assert_eq!(s.complete_msgs(), 2);
        let mut buf = [0u8; 4];
        assert_eq!(s.read_msg(&mut buf), (5, true));
        assert_eq!(&buf, b"hell");
        assert_eq!(s.read_msg(&mut buf), (0, false));
        assert_eq!(s.rx_bytes(), 0);
        assert_eq!(s.credit_info().fwd_cnt, 5);
    }
}
