//! One vsock connection: addressing, state, credit accounting and the bounded buffer of
//! guest bytes a host socket could not take yet. No I/O happens here.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::Instant;

use crate::budget::Window;
use crate::vsock::header::{Header, SockType, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Identifies a connection inside one VM: the non-guest end and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// CID of the non-guest end: the host (2) or a sibling VM.
    pub local_cid: u64,
    pub local_port: u32,
    pub peer_port: u32,
}

/// What the device still has to tell the guest about a connection.
pub mod pending {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const RST: u8 = 4;
    pub const SHUTDOWN: u8 = 8;
    pub const CREDIT_UPDATE: u8 = 16;
    pub const CREDIT_REQUEST: u8 = 32;
}

/// How a host- or sibling-initiated connection is confirmed once the guest accepts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptReply {
    /// Write `OK <local_port>\n` to the host socket (hybrid vsock).
    HybridOk,
    /// Write one byte to the sibling socketpair.
    SiblingAck,
    /// Nothing: an AF_VSOCK connection of the forwarding backend was accepted by the kernel
    /// already; the guest's RESPONSE only starts the data.
    Forwarded,
}

/// Who opened a connection (metrics and `ctl conns`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Initiator {
    /// The guest connected out (to a host program, a route or a sibling VM).
    #[default]
    Guest = 0,
    /// A host program connected through the uds path.
    Host = 1,
    /// Another VM's guest connected to this guest.
    Sibling = 2,
}

impl Initiator {
    pub fn as_str(self) -> &'static str {
        match self {
            Initiator::Guest => "guest",
            Initiator::Host => "host",
            Initiator::Sibling => "sibling",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// A host program connected to the uds path; its `CONNECT <port>` line is not complete.
    AwaitConnectLine,
    /// REQUEST sent (or queued) to the guest, waiting for RESPONSE.
    Requesting(AcceptReply),
    /// Guest connected to a sibling VM; waiting for that VM's guest to accept.
    SiblingConnecting,
    /// Guest connected to a TCP route or an AF_VSOCK address (forwarding backend); the
    /// non-blocking connect has not finished. `proxy`: the route wants a PROXY protocol v2 header first ([`crate::proxy`]).
    Connecting {
        proxy: bool,
    },
    /// A host connect the guest refused, to be requested again (`connect-wait`,
    /// [`crate::connwait`]); nothing is owed to the guest meanwhile.
    Waiting,
    Established,
}

/// Free space, as the guest believes it, at or below which it is sent our `fwd_cnt`: one full
/// packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`), so the update arrives while the guest can
/// still send its last packet of credit.
pub const CREDIT_UPDATE_FREE: u32 = 64 * 1024;

/// Guest bytes waiting for the host socket: whole chunks for a stream, whole messages for
/// SEQPACKET. Its payload never exceeds the window we advertised. A chunk of a framed
/// connection starts with frame header bytes ([`crate::frame`]), which are not payload.
#[derive(Default)]
pub struct TxBuf {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written (streams only).
    front_off: usize,
    /// Payload bytes queued (frame headers not counted).
    bytes: usize,
}

struct Chunk {
    data: Vec<u8>,
    /// Leading bytes of `data` that are frame header, not guest payload.
    framing: usize,
}

impl TxBuf {
    /// True when nothing is queued (an empty SEQPACKET message counts as something).
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Guest payload bytes queued.
    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn push(&mut self, chunk: Vec<u8>) {
        self.push_framed(chunk, 0);
    }

    /// Queues `chunk` whose first `framing` bytes are frame header.
    pub fn push_framed(&mut self, chunk: Vec<u8>, framing: usize) {
        let framing = framing.min(chunk.len());
        self.bytes += chunk.len() - framing;
        if !chunk.is_empty() {
            self.chunks.push_back(Chunk {
                data: chunk,
                framing,
            });
        }
    }

    /// Queues one whole SEQPACKET message (which may be empty).
    pub fn push_msg(&mut self, msg: Vec<u8>) {
        self.bytes += msg.len();
        self.chunks.push_back(Chunk {
            data: msg,
            framing: 0,
        });
    }

    /// Drops the front message after it was sent whole; returns its length.
    pub fn pop_msg(&mut self) -> usize {
        let n = self.chunks.pop_front().map_or(0, |m| m.data.len());
        self.bytes -= n;
        self.front_off = 0;
        n
    }

    /// The unwritten part of the front chunk.
    pub fn front(&self) -> Option<&[u8]> {
        self.chunks.front().map(|c| &c.data[self.front_off..])
    }

    /// Up to `max` iovecs over the buffered bytes, in order.
    pub fn iovecs(&self, max: usize, out: &mut Vec<libc::iovec>) {
        out.clear();
        for (i, c) in self.chunks.iter().take(max).enumerate() {
            let s = if i == 0 {
                &c.data[self.front_off..]
            } else {
                &c.data[..]
            };
            out.push(libc::iovec {
                iov_base: s.as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            });
        }
    }

    /// Drops `n` written bytes from the front; returns how many of them were payload.
    pub fn consume(&mut self, mut n: usize) -> usize {
        let mut payload = 0;
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = front.data.len() - self.front_off;
            let k = n.min(left);
            payload += (self.front_off + k).saturating_sub(self.front_off.max(front.framing));
            n -= k;
            if k == left {
                self.chunks.pop_front();
                self.front_off = 0;
            } else {
                self.front_off += k;
            }
        }
        self.bytes -= payload.min(self.bytes);
        payload
    }

    /// Drops everything; returns the payload bytes dropped.
    pub fn clear(&mut self) -> usize {
        let n = self.bytes;
        *self = TxBuf::default();
        n
    }

    /// Queued messages (SEQPACKET) or chunks (stream).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// A copy of every unwritten byte, in order.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes);
        for (i, c) in self.chunks.iter().enumerate() {
            out.extend_from_slice(if i == 0 {
                &c.data[self.front_off..]
            } else {
                &c.data
            });
        }
        out
    }
}

pub struct Conn {
    /// Distinguishes this connection from earlier ones that used the same table slot.
    pub gen: u32,
    pub key: ConnKey,
    pub kind: SockType,
    pub fd: OwnedFd,
    pub state: State,
    /// When `state` was entered; bounds how long a handshake may take.
    pub since: Instant,
    /// Id the connection gate gave it (0: not admitted yet); reported on close.
    pub id: u64,
    pub opened: Instant,
    /// Payload totals for the close report (the wire counters wrap).
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
    /// Ended by RST rather than an orderly shutdown.
    pub was_reset: bool,
    pub initiator: Initiator,
    /// The host program's identity, read at accept and handed to the gate with the CONNECT
    /// line (then gone: `None` for every established connection).
    pub peer: Option<Box<crate::peer::PeerIdentity>>,
    /// A host connect that waits for the guest to listen (`connect-wait`): set from the
    /// CONNECT line until the guest accepts; it holds one of the device's handshake slots
    /// all that time. Boxed: one pointer in every connection, the clock only in waiting ones.
    pub wait: Option<Box<crate::connwait::ConnectWait>>,
    /// Entered while the device handles this connection, so log lines carry its address
    /// (`Span::none()` until the device names it, and when logging is off). In an `Arc`:
    /// handlers clone it to enter it while they borrow the device mutably, and an `Arc` clone
    /// is one atomic add where a `Span` clone is a ref-count round trip through the
    /// subscriber's registry (about 190 ns against 100 ns per packet for clone + enter + exit,
    /// measured with the INFO JSON subscriber).
    pub span: std::sync::Arc<tracing::Span>,

    // Guest -> host direction: we are the receiver.
    /// Payload bytes received from the guest.
    pub rx_cnt: u32,
    /// Payload bytes handed to the host socket.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    pub last_fwd_sent: u32,
    pub buf: TxBuf,
    /// A SEQPACKET message from the guest still missing its EOM packet.
    pub partial_msg: Vec<u8>,
    /// The `buf_alloc` we advertise: our receive window, reserved from the daemon-wide
    /// [`crate::budget::Budget`] and given back when the connection is dropped.
    pub window: Window,

    // Host -> guest direction: we are the sender.
    pub tx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    pub credit_requested: bool,
    /// A SEQPACKET message read from the host that did not fit in one packet.
    pub out_msg: Vec<u8>,
    pub out_off: usize,

    /// The host socket may have bytes (edge-triggered readiness, cleared on EAGAIN, or by a
    /// stream read that took everything queued: see [`Conn::drained_by`]).
    pub readable: bool,
    /// An event reported the host end's hang-up (RDHUP, HUP or an error): its end of stream
    /// comes without another edge, so reads go on until EOF or EAGAIN.
    pub hangup_seen: bool,
    /// The host end hung up completely.
    pub host_hup: bool,
    /// The host end takes no more bytes (its SHUT_RD or close, or a write failed with
    /// EPIPE): the guest was or will be told SHUTDOWN(RCV); its bytes are dropped.
    pub host_shut_rcv: bool,
    /// We shut the host socket's write side (so its SEND_SHUTDOWN is ours, not the peer's).
    pub shut_wr_done: bool,
    /// The host socket carries frames ([`crate::frame`]): SEQPACKET between sibling VMs.
    pub framed: bool,
    /// The host socket is TCP (a bridge route): no probing for the peer's SHUT_RD.
    pub tcp: bool,
    /// The host socket is AF_VSOCK (the forwarding backend, or a `host-vsock` route):
    /// counted apart in the VM's metrics (`vhost_plug_afvsock_*`).
    pub afvsock: bool,
    /// Receiving a frame: payload bytes of it still in the socket.
    pub frame_left: u32,
    /// Receiving a frame: its EOM/EOR flags, sent with its last byte.
    pub frame_flags: u32,
    /// A frame header was read and its payload is not all delivered yet.
    pub in_frame: bool,
    /// Read returned end of stream; SHUTDOWN(SEND) is or was queued.
    pub host_eof: bool,
    /// The guest will send no more: shut the socket's write side once `buf` drains.
    pub guest_shut_send: bool,
    /// The guest will receive no more.
    pub guest_shut_rcv: bool,

    pub pending: u8,
    pub shutdown_flags: u32,
    /// Queued in the device's rx work list.
    pub in_rx_list: bool,
}

impl Conn {
    pub fn new(gen: u32, key: ConnKey, kind: SockType, fd: OwnedFd, state: State) -> Self {
        Conn {
            gen,
            key,
            kind,
            fd,
            state,
            since: Instant::now(),
            wait: None,
            id: 0,
            opened: Instant::now(),
            bytes_to_guest: 0,
            bytes_from_guest: 0,
            was_reset: false,
            initiator: Initiator::Guest,
            peer: None,
            span: std::sync::Arc::new(tracing::Span::none()),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            buf: TxBuf::default(),
            partial_msg: Vec::new(),
            window: Window::default(),
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            out_msg: Vec::new(),
            out_off: 0,
            readable: false,
            hangup_seen: false,
            host_hup: false,
            host_shut_rcv: false,
            shut_wr_done: false,
            framed: false,
            tcp: false,
            afvsock: false,
            frame_left: 0,
            frame_flags: 0,
            in_frame: false,
            host_eof: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            pending: 0,
            shutdown_flags: 0,
            in_rx_list: false,
        }
    }

    /// Records the guest's receive buffer state carried by every packet it sends.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// A header for a packet from our end to the guest, carrying our credit.
    pub fn header_to_guest(&self, guest_cid: u64, op: u16) -> Header {
        Header {
            src_cid: self.key.local_cid,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: self.kind.wire(),
            op,
            flags: 0,
            buf_alloc: self.window.size(),
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Bytes the guest can take now: `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`, and zero
    /// when a lying guest makes that negative.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the guest, judging by the last `fwd_cnt` we told it, may be about to stall and
    /// we have forwarded more since. Linux's rule (virtio_transport_common.c): the free space
    /// the guest believes we have fell to one full packet ([`CREDIT_UPDATE_FREE`]), or to
    /// half the window when that is less; a guest with more credit than that gets no update,
    /// since every update costs an rx buffer and an interrupt.
    pub fn needs_credit_update(&self) -> bool {
        let window = self.window.size();
        let believed_free = window.saturating_sub(self.rx_cnt.wrapping_sub(self.last_fwd_sent));
        self.fwd_cnt != self.last_fwd_sent && believed_free <= (window / 2).min(CREDIT_UPDATE_FREE)
    }

    /// Queues a SHUTDOWN to the guest carrying `flags` and every bit told before (Linux
    /// accumulates them too), so a close is never seen as a half-close.
    pub fn queue_shutdown(&mut self, flags: u32) {
        if self.shutdown_flags | flags != self.shutdown_flags {
            self.shutdown_flags |= flags;
            self.pending |= pending::SHUTDOWN;
        }
    }

    /// Marks the host end as taking no more bytes: the guest's queued bytes are dropped
    /// (counted as forwarded, so its credit stays consistent) and SHUTDOWN(RCV) is queued.
    pub fn host_stopped_receiving(&mut self) {
        if self.host_shut_rcv {
            return;
        }
        self.host_shut_rcv = true;
        let dropped = self.buf.clear() + self.partial_msg.len();
        self.partial_msg = Vec::new();
        self.fwd_cnt = self.fwd_cnt.wrapping_add(dropped as u32);
        let send = if self.host_eof { SHUTDOWN_SEND } else { 0 };
        self.queue_shutdown(SHUTDOWN_RCV | send);
    }

    /// Moves to `state` and restarts its clock.
    pub fn set_state(&mut self, state: State) {
        self.state = state;
        self.since = Instant::now();
    }

    /// Holds one of the device's handshake slots: its CONNECT line is incomplete, or it
    /// waits for the guest to listen.
    pub fn holds_handshake(&self) -> bool {
        self.state == State::AwaitConnectLine || self.wait.is_some()
    }

    /// Still waiting for the other side to accept or to finish its CONNECT line.
    pub fn in_handshake(&self) -> bool {
        self.state != State::Established
    }

    pub fn is_seqpacket(&self) -> bool {
        self.kind == SockType::Seqpacket
    }

    /// True when the host side may still deliver data to the guest.
    pub fn may_read_host(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.guest_shut_rcv
    }

    /// Whether a stream read of `n` bytes that asked for `want` (and found `queued` bytes
    /// queued just before, when known) emptied the socket as far as its events go. Every
    /// byte or end of stream that arrives after the event that made the socket readable
    /// raises a new edge, so a read that took everything queued before it needs no EAGAIN
    /// read after it to re-arm anything: saving that read and its rx buffer pop matters
    /// most to small messages, where it came between the data and the guest's interrupt.
    /// A hang-up already reported has no further edge to come: then only EOF ends reading.
    pub fn drained_by(&self, n: usize, want: usize, queued: Option<usize>) -> bool {
        !self.hangup_seen && (n < want || queued.is_some_and(|q| n >= q))
    }

    /// Whether a zero-length send can tell us the host end stopped receiving: only a unix
    /// stream socket answers it without side effects (EPIPE once the peer shut its read
    /// side); a SEQPACKET one would deliver an empty message, TCP never learns of SHUT_RD.
    pub fn probes_peer_shutdown(&self) -> bool {
        self.state == State::Established
            && !self.tcp
            && (self.framed || !self.is_seqpacket())
            && !self.host_shut_rcv
            && !self.shut_wr_done
            && !self.guest_shut_send
    }

    /// Whether this connection has anything for the rx queue right now.
    pub fn wants_rx(&self) -> bool {
        if self.pending != 0 {
            return true;
        }
        if !self.may_read_host() {
            return false;
        }
        if self.out_off < self.out_msg.len() {
            return self.peer_credit() > 0;
        }
        self.readable && (self.peer_credit() > 0 || !self.credit_requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        let (a, _b) = crate::sys::socketpair(crate::sys::UnixKind::Stream).expect("socketpair");
        Conn::new(
            1,
            ConnKey {
                local_cid: 2,
                local_port: 1,
                peer_port: 2,
            },
            SockType::Stream,
            a,
            State::Established,
        )
    }

    #[test]
    fn credit_is_zero_when_the_guest_lies() {
        let mut c = conn();
        c.update_peer_credit(1000, 0);
        c.tx_cnt = 400;
        assert_eq!(c.peer_credit(), 600);
        // fwd_cnt "going backwards" past tx_cnt makes in-flight huge: no credit.
        c.update_peer_credit(1000, 500);
        assert_eq!(c.peer_credit(), 0);
        // Counters wrap.
        c.tx_cnt = 5;
        c.update_peer_credit(1000, u32::MAX - 10);
        assert_eq!(c.peer_credit(), 1000 - 16);
    }

    #[test]
    fn credit_update_when_half_the_buffer_looks_used() {
        let mut c = conn();
        let budget = std::sync::Arc::new(crate::budget::Budget::new(1 << 20));
        c.window = Window::reserve(&budget, 65536);
        c.rx_cnt = 40_000;
        c.fwd_cnt = 40_000;
        assert!(c.needs_credit_update());
        c.last_fwd_sent = 40_000;
        assert!(!c.needs_credit_update());
        c.rx_cnt = 50_000;
        assert!(!c.needs_credit_update(), "nothing new was forwarded");
    }

    #[test]
    fn credit_update_for_a_large_window_once_one_packet_of_credit_is_left() {
        let mut c = conn();
        let budget = std::sync::Arc::new(crate::budget::Budget::new(1 << 20));
        c.window = Window::reserve(&budget, 262_144);
        c.rx_cnt = 150_000;
        c.fwd_cnt = 150_000;
        assert!(!c.needs_credit_update(), "112 KiB of credit left");
        c.rx_cnt = 262_144 - 65_536;
        c.fwd_cnt = c.rx_cnt;
        assert!(c.needs_credit_update(), "one packet of credit left");
    }

    #[test]
    fn a_read_of_everything_queued_drains_until_a_hang_up_was_seen() {
        let mut c = conn();
        // Asked for 4096, got 1 of 1 queued; and a short read without a FIONREAD figure.
        assert!(c.drained_by(1, 4096, Some(1)));
        assert!(c.drained_by(10, 4096, None));
        // The read stopped at the room or credit given, with more queued: read again.
        assert!(!c.drained_by(4096, 4096, Some(10_000)));
        assert!(!c.drained_by(4096, 4096, None));
        // End of stream comes without another edge once a hang-up was reported.
        c.hangup_seen = true;
        assert!(!c.drained_by(1, 4096, Some(1)));
        assert!(!c.drained_by(10, 4096, None));
    }

    #[test]
    fn txbuf_consumes_across_chunks() {
        let mut b = TxBuf::default();
        b.push(vec![1, 2, 3]);
        b.push(vec![4, 5]);
        assert_eq!(b.len(), 5);
        assert_eq!(b.consume(2), 2);
        assert_eq!(b.front(), Some(&[3u8][..]));
        let mut iov = Vec::new();
        b.iovecs(8, &mut iov);
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[0].iov_len + iov[1].iov_len, 3);
        b.consume(3);
        assert!(b.is_empty());
        assert_eq!(b.front(), None);
    }

    #[test]
    fn txbuf_counts_frame_headers_apart_from_payload() {
        let mut b = TxBuf::default();
        // Two frame header bytes, then three payload bytes; then a plain chunk.
        b.push_framed(vec![0xf0, 0xf1, 1, 2, 3], 2);
        b.push(vec![4, 5]);
        assert_eq!(b.len(), 5);
        assert_eq!(b.consume(1), 0, "a header byte is no payload");
        assert_eq!(b.consume(2), 1);
        assert_eq!(b.len(), 4);
        assert_eq!(b.consume(3), 3, "across the chunk boundary");
        assert_eq!(b.to_vec(), vec![5]);
        assert_eq!(b.clear(), 1);
        assert!(b.is_empty());
    }

    #[test]
    fn shutdown_bits_accumulate() {
        let mut c = conn();
        c.queue_shutdown(SHUTDOWN_RCV);
        assert_eq!(
            (c.pending, c.shutdown_flags),
            (pending::SHUTDOWN, SHUTDOWN_RCV)
        );
        c.pending = 0;
        c.queue_shutdown(SHUTDOWN_RCV);
        assert_eq!(c.pending, 0, "nothing new to tell");
        c.queue_shutdown(SHUTDOWN_SEND);
        assert_eq!(c.shutdown_flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
        assert_eq!(c.pending, pending::SHUTDOWN);
    }

    #[test]
    fn host_that_stops_receiving_drops_queued_bytes_as_forwarded() {
        let mut c = conn();
        c.buf.push(vec![0; 10]);
        c.rx_cnt = 10;
        c.host_stopped_receiving();
        assert!(c.buf.is_empty());
        assert_eq!(c.fwd_cnt, 10);
        assert_eq!(c.shutdown_flags, SHUTDOWN_RCV);
        assert!(!c.probes_peer_shutdown());
    }
}
