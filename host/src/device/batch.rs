//! Guest -> host coalescing. The data packets taken from the tx queue in one walk are held
//! back, and each connection's run of them leaves for its host socket in one `sendmsg` over
//! all their payload segments: one syscall, fewer and larger socket buffers and one wakeup of
//! the host reader per connection and walk, where one packet at a time cost each of those per
//! packet. Several connections interleaved in the queue each get their own `sendmsg`.
//!
//! Only packets the one-at-a-time path would send straight to the host socket are held
//! (stream, established, nothing buffered, host end still reading, guest still sending); any
//! other packet first sends the batch, so every connection's bytes and every control packet
//! keep their order. A connection never has more payload in a batch than its window, so the
//! unsent tail it may leave in the pending buffer stays within the credit the guest was
//! given. The chains go back to the used ring in queue order once the batch is sent.

use std::os::fd::AsRawFd;

use smallvec::SmallVec;

use super::Device;
use crate::conn::{pending, State};
use crate::sys;
use crate::vsock::chain::ChainBuf;
use crate::vsock::header::{Header, SockType, HDR_LEN, HOST_CID, OP_RW};

/// Most packets in one batch: bounds the chains held back from the used ring.
const MAX_PACKETS: usize = 64;
/// Most iovecs in one `sendmsg` (Linux's UIO_MAXIOV).
const MAX_IOV: usize = 1024;

/// One tx chain whose payload waits in a batch.
pub(super) struct Batched<'m> {
    pub head: u16,
    buf: ChainBuf<'m>,
    idx: usize,
    len: usize,
}

/// Data packets waiting to be sent; lives for one walk of the tx queue, because its chains
/// borrow that walk's guest-memory guard. Eight 64 KiB packets fit inline.
#[derive(Default)]
pub(super) struct TxBatch<'m> {
    packets: SmallVec<[Batched<'m>; 8]>,
}

impl<'m> TxBatch<'m> {
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Whether `len` payload bytes in at most `segs` segments for connection `idx` can join,
    /// given its window; otherwise the batch must be sent first.
    pub fn fits(&self, idx: usize, len: usize, segs: usize, window: usize) -> bool {
        if self.packets.len() >= MAX_PACKETS {
            return false;
        }
        let (bytes, iovs) = self
            .packets
            .iter()
            .filter(|p| p.idx == idx)
            .fold((0, 0), |(b, i), p| (b + p.len, i + p.buf.segment_count()));
        bytes + len <= window && iovs + segs <= MAX_IOV
    }

    fn push(&mut self, idx: usize, head: u16, buf: ChainBuf<'m>, len: usize) {
        self.packets.push(Batched {
            head,
            buf,
            idx,
            len,
        });
    }

    /// The packets of a sent batch, in queue order, for the used ring.
    pub fn drain(&mut self) -> smallvec::Drain<'_, [Batched<'m>; 8]> {
        self.packets.drain(..)
    }
}

impl Device {
    /// The connection and header of a packet that may join a batch: a non-empty stream RW
    /// packet, within its chain, for an established connection to a host socket whose
    /// pending buffer is empty and whose host end still reads.
    pub(super) fn tx_batchable(&self, buf: &ChainBuf<'_>) -> Option<(usize, Header)> {
        let h = buf.read_header().ok()?;
        if h.op != OP_RW
            || h.len == 0
            || SockType::from_wire(h.type_) != Some(SockType::Stream)
            || h.src_cid != self.cfg.guest_cid
            || h.dst_cid != HOST_CID
            || h.len as usize > buf.len() - HDR_LEN
        {
            return None;
        }
        let idx = self.lookup(&h)?;
        let c = &self.conns[idx];
        let direct = c.kind == SockType::Stream
            && c.pending & pending::RST == 0
            && c.state == State::Established
            && !c.guest_shut_send
            && !c.host_shut_rcv
            && !c.host_hup
            && !c.framed
            && c.buf.is_empty();
        direct.then_some((idx, h))
    }

    /// The connection's window in bytes (the most a batch for it may hold).
    pub(super) fn window_bytes(&self, idx: usize) -> usize {
        self.conns[idx].window.size() as usize
    }

    /// Takes a batchable packet's credit and counters, as the one-at-a-time path does when
    /// the packet arrives, and queues its payload.
    pub(super) fn batch_rw<'m>(
        &mut self,
        batch: &mut TxBatch<'m>,
        idx: usize,
        h: &Header,
        head: u16,
        buf: ChainBuf<'m>,
    ) {
        self.check_credit(idx, h);
        let c = &mut self.conns[idx];
        c.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        if c.peer_credit() > 0 {
            c.credit_requested = false;
        }
        c.rx_cnt = c.rx_cnt.wrapping_add(h.len);
        c.bytes_from_guest += u64::from(h.len);
        if let Some(s) = &self.stats {
            s.counters
                .bytes_from_guest
                .fetch_add(u64::from(h.len), std::sync::atomic::Ordering::Relaxed);
        }
        batch.push(idx, head, buf, h.len as usize);
    }

    /// Sends each connection's packets of the batch in one `sendmsg`, connections in the
    /// order they first appear. The chains stay in the batch for the caller to return to the
    /// used ring ([`TxBatch::drain`]).
    pub(super) fn send_batch(&mut self, batch: &TxBatch<'_>) {
        for (i, p) in batch.packets.iter().enumerate() {
            if !batch.packets[..i].iter().any(|q| q.idx == p.idx) {
                self.send_run(batch, p.idx);
            }
        }
    }

    /// Sends connection `idx`'s packets of `batch` in one `sendmsg`; what the socket does not
    /// take goes to the connection's pending buffer.
    fn send_run(&mut self, batch: &TxBatch<'_>, idx: usize) {
        let run = || batch.packets.iter().filter(|p| p.idx == idx);
        let Some(first) = run().next() else {
            return;
        };
        let total: usize = run().map(|p| p.len).sum();
        self.iov.clear();
        for p in run() {
            p.buf.extend_send_iovecs(HDR_LEN, p.len, &mut self.iov);
        }
        let c = &mut self.conns[idx];
        let sent = match sys::send_iov(c.fd.as_raw_fd(), &self.iov) {
            Ok(n) => Ok(n),
            Err(e) if sys::would_block(&e) => Ok(0),
            Err(e) => Err(e),
        };
        match sent {
            Ok(sent) => {
                c.fwd_cnt = c.fwd_cnt.wrapping_add(sent as u32);
                if sent < total {
                    let mut rest = Vec::with_capacity(total - sent);
                    let mut skip = sent;
                    for p in run() {
                        if skip >= p.len {
                            skip -= p.len;
                            continue;
                        }
                        p.buf.copy_out(HDR_LEN + skip, p.len - skip, &mut rest);
                        skip = 0;
                    }
                    c.buf.push(rest);
                }
                if c.buf.len() + c.partial_msg.len() > c.window.size() as usize {
                    self.violation(idx, "guest sent beyond its credit");
                } else if c.needs_credit_update() {
                    c.pending |= pending::CREDIT_UPDATE;
                }
            }
            // As one packet at a time: the first packet's bytes meet the closed read side,
            // the later ones are counted as forwarded.
            Err(e) if sys::is_epipe(&e) => {
                c.host_stopped_receiving();
                c.fwd_cnt = c.fwd_cnt.wrapping_add((total - first.len) as u32);
            }
            Err(e) => {
                let why = format!("host socket write failed: {e}");
                self.reset(idx, &why)
            }
        }
        self.wake_rx(idx);
    }
}
