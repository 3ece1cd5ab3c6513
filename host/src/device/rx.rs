//! Device -> guest: the rx queue. Control packets come first; data is read from the host
//! socket straight into the guest's rx buffer, never more than the guest's credit allows.

use std::os::fd::AsRawFd;

use tracing::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestAddressSpace;

use super::{Device, MAX_PKT_PAYLOAD, MAX_SEQ_MSG, MAX_STRAY_RST};
use crate::conn::{pending, Conn};
use crate::frame::{self, FrameHeader};
use crate::mem::{GuestMem, GuestMemAtomic};
use crate::sys;
use crate::vsock::chain::ChainBuf;
use crate::vsock::header::*;

/// Most rx buffers one stream recvmsg fills (Linux posts 4 KiB buffers: 16 of them hold one
/// 64 KiB write).
const MAX_BATCH_CHAINS: usize = 64;
/// Most payload bytes one stream recvmsg reads.
const MAX_BATCH_BYTES: usize = 128 * 1024;
/// Most iovecs of one recvmsg (Linux's UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;

enum Work {
    Stray(Header),
    Conn(usize),
}

/// What filling one rx buffer for a connection produced.
enum Fill {
    /// A packet of this many bytes (header included) was written.
    Packet(u32),
    /// Nothing to send after all; the buffer goes back to the ring.
    Nothing,
}

impl Device {
    /// Fills rx buffers while there is work and buffers. Returns true when the tx queue was
    /// stalled on RST replies and may run again.
    pub fn process_rx(&mut self, vring: &VringRwLock<GuestMemAtomic>) -> bool {
        let Some(atomic) = self.mem.clone() else {
            return false;
        };
        let mem = atomic.memory();
        let mut vr = vring.get_mut();
        if !vr.get_queue().ready() || !vr.is_enabled() {
            return false;
        }
        let mut used = false;
        while let Some(work) = self.next_work() {
            let chain = match vr.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                Some(c) => c,
                None => {
                    self.unpop_work(work);
                    // Re-arm the notification, then look once more to close the race with a
                    // driver that added buffers in between.
                    match vr.enable_notification() {
                        Ok(true) => continue,
                        _ => break,
                    }
                }
            };
            let head = chain.head_index();
            let buf = match ChainBuf::new(&mem, chain, true, HDR_LEN + MAX_PKT_PAYLOAD) {
                Ok(b) if b.len() >= HDR_LEN => b,
                Ok(_) | Err(_) => {
                    if self.guest_log() {
                        warn!(cid = self.cfg.guest_cid, "unusable rx descriptor chain");
                    }
                    let _ = vr.add_used(head, 0);
                    used = true;
                    self.unpop_work(work);
                    continue;
                }
            };
            if let Work::Conn(idx) = work {
                if buf.len() > HDR_LEN && self.batchable(idx) {
                    used |= self.fill_stream_batch(idx, head, buf, &mut vr, &mem);
                    continue;
                }
            }
            let fill = match work {
                Work::Stray(h) => {
                    buf.write_at(0, &h.to_le_bytes());
                    Fill::Packet(HDR_LEN as u32)
                }
                Work::Conn(idx) => self.fill_conn(idx, &buf),
            };
            match fill {
                Fill::Packet(n) => {
                    if let Err(e) = vr.add_used(head, n) {
                        warn!(error = %e, "rx queue: add_used failed");
                    }
                    used = true;
                }
                Fill::Nothing => vr.get_queue_mut().go_to_previous_position(),
            }
        }
        if used && vr.needs_notification().unwrap_or(true) {
            if let Err(e) = vr.signal_used_queue() {
                debug!(error = %e, "rx queue: signal failed");
            }
        }
        if self.tx_stalled && self.stray_rst.len() < MAX_STRAY_RST / 2 {
            self.tx_stalled = false;
            return true;
        }
        false
    }

    fn next_work(&mut self) -> Option<Work> {
        if let Some(h) = self.stray_rst.pop_front() {
            return Some(Work::Stray(h));
        }
        while let Some(idx) = self.rx_list.pop_front() {
            if let Some(c) = self.conns.get_mut(idx) {
                c.in_rx_list = false;
                if c.wants_rx() {
                    return Some(Work::Conn(idx));
                }
            }
        }
        None
    }

    fn unpop_work(&mut self, w: Work) {
        match w {
            Work::Stray(h) => self.stray_rst.push_front(h),
            Work::Conn(idx) => {
                if let Some(c) = self.conns.get_mut(idx) {
                    c.in_rx_list = true;
                    self.rx_list.push_front(idx);
                }
            }
        }
    }

    /// Whether the next rx packet of connection `idx` is stream data that may span several
    /// rx buffers (no control packet waiting, credit left).
    fn batchable(&self, idx: usize) -> bool {
        self.conns.get(idx).is_some_and(|c| {
            !c.is_seqpacket()
                && c.pending & !pending::CREDIT_UPDATE == 0
                && c.may_read_host()
                && c.readable
                && c.peer_credit() > 0
        })
    }

    /// Stream data: pops more rx buffers after `first` until they hold the guest's credit
    /// (bounded by [`MAX_BATCH_BYTES`] and [`MAX_BATCH_CHAINS`]), reads the host socket once
    /// over all their payload areas, then writes one OP_RW header per buffer that got data.
    /// Buffers left empty are put back on the ring (they are the last ones popped). Returns
    /// whether anything was added to the used ring.
    fn fill_stream_batch<'m>(
        &mut self,
        idx: usize,
        first_head: u16,
        first: ChainBuf<'m>,
        vr: &mut vhost_user_backend::VringState<GuestMemAtomic>,
        mem: &'m GuestMem,
    ) -> bool {
        let guest_cid = self.cfg.guest_cid;
        let c = &mut self.conns[idx];
        if c.window.is_short() {
            c.window.grow();
        }
        // No more buffers than the bytes already queued need (a small message takes one; the
        // first buffer still sees end of stream or EAGAIN).
        let queued = sys::queued_bytes(c.fd.as_raw_fd()).ok();
        let cap = (c.peer_credit() as usize)
            .min(MAX_BATCH_BYTES)
            .min(queued.unwrap_or(MAX_BATCH_BYTES).max(1));
        let mut bufs: Vec<(u16, ChainBuf<'m>, usize)> = Vec::with_capacity(MAX_BATCH_CHAINS);
        let iov = &mut self.iov;
        iov.clear();
        let mut part = Vec::new();
        let mut want = 0usize;
        let mut next = Some((first_head, first));
        while let Some((head, buf)) = next.take() {
            let take = (buf.len() - HDR_LEN).min(cap - want);
            buf.iovecs(HDR_LEN, take, &mut part);
            if !bufs.is_empty() && iov.len() + part.len() > MAX_IOVECS {
                vr.get_queue_mut().go_to_previous_position();
                break;
            }
            iov.extend_from_slice(&part);
            want += take;
            bufs.push((head, buf, take));
            if want >= cap || bufs.len() >= MAX_BATCH_CHAINS {
                break;
            }
            let Some(chain) = vr.get_queue_mut().pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match ChainBuf::new(mem, chain, true, HDR_LEN + MAX_PKT_PAYLOAD) {
                Ok(b) if b.len() > HDR_LEN => next = Some((head, b)),
                // Left for the one-buffer path, which reports it.
                _ => vr.get_queue_mut().go_to_previous_position(),
            }
        }
        let mut h = c.header_to_guest(guest_cid, OP_RW);
        let mut remove = false;
        // Packets written, from the front of `bufs`: (head, bytes incl. header).
        let mut done: Vec<(u16, u32)> = Vec::with_capacity(bufs.len());
        match sys::recv_iov(c.fd.as_raw_fd(), iov) {
            Ok((0, _)) => {
                end_of_stream(c, &mut h);
                bufs[0].1.write_at(0, &h.to_le_bytes());
                done.push((bufs[0].0, HDR_LEN as u32));
            }
            Ok((n, _)) => {
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                c.bytes_to_guest += n as u64;
                if let Some(s) = &self.stats {
                    s.counters
                        .bytes_to_guest
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
                if c.drained_by(n, want, queued) {
                    c.readable = false;
                }
                let mut left = n;
                for (head, buf, take) in &bufs {
                    if left == 0 {
                        break;
                    }
                    let k = left.min(*take);
                    buf.mark_dirty(HDR_LEN, k);
                    h.len = k as u32;
                    buf.write_at(0, &h.to_le_bytes());
                    left -= k;
                    done.push((*head, (HDR_LEN + k) as u32));
                }
            }
            Err(e) if sys::would_block(&e) => c.readable = false,
            Err(e) => {
                warn!(cid = guest_cid, key = ?c.key, error = %e, "host socket read failed");
                c.was_reset = true;
                h.op = OP_RST;
                bufs[0].1.write_at(0, &h.to_le_bytes());
                done.push((bufs[0].0, HDR_LEN as u32));
                remove = true;
            }
        }
        if !done.is_empty() {
            // Every packet carries our fwd_cnt, so it is also a credit update.
            c.last_fwd_sent = c.fwd_cnt;
            c.pending &= !pending::CREDIT_UPDATE;
        }
        // The buffers that got nothing are the last ones popped.
        for _ in done.len()..bufs.len() {
            vr.get_queue_mut().go_to_previous_position();
        }
        for &(head, len) in &done {
            if let Err(e) = vr.add_used(head, len) {
                warn!(error = %e, "rx queue: add_used failed");
            }
        }
        if remove {
            self.remove(idx);
        } else {
            self.wake_rx(idx);
        }
        !done.is_empty()
    }

    fn fill_conn(&mut self, idx: usize, buf: &ChainBuf<'_>) -> Fill {
        let span = self.conns[idx].span.clone();
        let _entered = span.enter();
        let guest_cid = self.cfg.guest_cid;
        let c = &mut self.conns[idx];
        if c.window.is_short() {
            c.window.grow();
        }
        let mut h = c.header_to_guest(guest_cid, 0);
        let mut remove = false;
        if c.pending & pending::RST != 0 {
            h.op = OP_RST;
            remove = true;
        } else if c.pending & pending::REQUEST != 0 {
            h.op = OP_REQUEST;
            c.pending &= !pending::REQUEST;
        } else if c.pending & pending::RESPONSE != 0 {
            h.op = OP_RESPONSE;
            c.pending &= !pending::RESPONSE;
        } else if c.pending & pending::SHUTDOWN != 0 {
            h.op = OP_SHUTDOWN;
            h.flags = c.shutdown_flags;
            c.pending &= !pending::SHUTDOWN;
        } else if c.pending & pending::CREDIT_REQUEST != 0 {
            h.op = OP_CREDIT_REQUEST;
            c.pending &= !pending::CREDIT_REQUEST;
        } else if c.pending & pending::CREDIT_UPDATE != 0 {
            h.op = OP_CREDIT_UPDATE;
        } else {
            match read_host(c, buf, &mut self.iov, &mut h) {
                Ok(true) => {}
                Ok(false) => return Fill::Nothing,
                Err(e) => {
                    warn!(cid = guest_cid, key = ?c.key, error = %e, "host socket read failed");
                    c.was_reset = true;
                    h.op = OP_RST;
                    h.len = 0;
                    remove = true;
                }
            }
        }
        // Every packet carries our fwd_cnt, so it is also a credit update.
        c.last_fwd_sent = c.fwd_cnt;
        c.pending &= !pending::CREDIT_UPDATE;
        buf.write_at(0, &h.to_le_bytes());
        let n = HDR_LEN as u32 + h.len;
        if let (OP_RW, Some(s)) = (h.op, &self.stats) {
            s.counters
                .bytes_to_guest
                .fetch_add(u64::from(h.len), std::sync::atomic::Ordering::Relaxed);
        }
        if remove {
            self.remove(idx);
        } else {
            self.wake_rx(idx);
        }
        Fill::Packet(n)
    }
}

/// Reads host data (or end of stream) into `buf` and completes `h` for it.
/// Returns false when there was nothing to send.
fn read_host(
    c: &mut Conn,
    buf: &ChainBuf<'_>,
    iov: &mut Vec<libc::iovec>,
    h: &mut Header,
) -> std::io::Result<bool> {
    let credit = c.peer_credit() as usize;
    let room = buf.len() - HDR_LEN;
    if credit == 0 {
        if c.credit_requested {
            return Ok(false);
        }
        c.credit_requested = true;
        h.op = OP_CREDIT_REQUEST;
        return Ok(true);
    }
    let fd = c.fd.as_raw_fd();
    if c.framed {
        return read_frame(c, buf, credit.min(room), iov, h);
    }
    if c.is_seqpacket() {
        return read_host_msg(c, buf, credit.min(room), h);
    }
    let want = credit.min(room);
    buf.iovecs(HDR_LEN, want, iov);
    match sys::recv_iov(fd, iov) {
        Ok((0, _)) => {
            end_of_stream(c, h);
            Ok(true)
        }
        Ok((n, _)) => {
            if c.drained_by(n, want, None) {
                c.readable = false;
            }
            buf.mark_dirty(HDR_LEN, n);
            c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
            c.bytes_to_guest += n as u64;
            h.op = OP_RW;
            h.len = n as u32;
            Ok(true)
        }
        Err(e) if sys::would_block(&e) => {
            c.readable = false;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The host closed its sending side: tell the guest with SHUTDOWN, behind all the data. If the
/// host end is closed both ways by now (a close, not a half-close), RCV goes in the same
/// packet, with every bit told before. After our own SHUT_WR (the guest's SHUTDOWN(SEND))
/// the socket's state cannot say whether the host end still receives, and it no longer
/// matters: SEND alone.
fn end_of_stream(c: &mut Conn, h: &mut Header) {
    c.host_eof = true;
    c.readable = false;
    let fd = c.fd.as_raw_fd();
    // AF_VSOCK tells a peer's close whose last bytes were still unread as RDHUP only, never
    // HUP; a zero-length send failing with EPIPE says it stopped receiving too.
    let hup = !c.shut_wr_done
        && (c.host_hup
            || sys::poll_now(fd).is_ok_and(|r| r & libc::POLLHUP != 0)
            || (c.probes_peer_shutdown()
                && matches!(sys::probe_send(fd), Err(e) if sys::is_epipe(&e))));
    if hup {
        c.host_stopped_receiving();
    }
    c.queue_shutdown(SHUTDOWN_SEND);
    c.pending &= !pending::SHUTDOWN;
    h.op = OP_SHUTDOWN;
    h.flags = c.shutdown_flags;
}

/// A sibling's SEQPACKET frame ([`crate::frame`]): reads its header, then up to `max` of its
/// payload straight into `buf`. The packet with the frame's last byte carries its EOM/EOR.
fn read_frame(
    c: &mut Conn,
    buf: &ChainBuf<'_>,
    max: usize,
    iov: &mut Vec<libc::iovec>,
    h: &mut Header,
) -> std::io::Result<bool> {
    let fd = c.fd.as_raw_fd();
    if !c.in_frame {
        let mut hb = [0u8; frame::HEADER_LEN];
        let n = match sys::peek(fd, &mut hb) {
            Ok(0) => {
                end_of_stream(c, h);
                return Ok(true);
            }
            Ok(n) => n,
            Err(e) if sys::would_block(&e) => {
                c.readable = false;
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        if n < frame::HEADER_LEN {
            // The rest of the header comes with its own wakeup, unless the sender is gone.
            let gone = sys::poll_now(fd).is_ok_and(|r| r & libc::POLLRDHUP != 0);
            if gone {
                return Err(std::io::Error::other("sibling ended inside a frame header"));
            }
            c.readable = false;
            return Ok(false);
        }
        let fh = FrameHeader::parse(&hb, MAX_PKT_PAYLOAD as u32)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        sys::recv(fd, &mut hb)?;
        c.in_frame = true;
        c.frame_left = fh.len;
        c.frame_flags = fh.flags;
    }
    let mut n = 0;
    if c.frame_left > 0 {
        let want = (c.frame_left as usize).min(max);
        buf.iovecs(HDR_LEN, want, iov);
        n = match sys::recv_iov(fd, iov) {
            Ok((0, _)) => return Err(std::io::Error::other("sibling ended inside a frame")),
            Ok((n, _)) => n,
            Err(e) if sys::would_block(&e) => {
                c.readable = false;
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        buf.mark_dirty(HDR_LEN, n);
        c.frame_left -= n as u32;
        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
        c.bytes_to_guest += n as u64;
    }
    h.op = OP_RW;
    h.len = n as u32;
    if c.frame_left == 0 {
        h.flags = c.frame_flags;
        c.in_frame = false;
    }
    Ok(true)
}

thread_local! {
    /// Where the part of an unpeekable SEQPACKET message beyond the rx buffer lands (one per
    /// VM worker thread, allocated on first use).
    static OVERFLOW: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A SEQPACKET message from a socket that cannot peek at its length (AF_VSOCK before Linux
/// 6.3): one `recvmsg` into the rx buffer and, for the part beyond it, a per-thread overflow
/// buffer; a message that fits (the common case) still goes straight into guest memory.
fn read_host_msg_unpeeked(
    c: &mut Conn,
    buf: &ChainBuf<'_>,
    max: usize,
    h: &mut Header,
) -> std::io::Result<bool> {
    let fd = c.fd.as_raw_fd();
    OVERFLOW.with(|o| {
        let mut over = o.borrow_mut();
        over.resize(MAX_SEQ_MSG, 0);
        let mut iov = Vec::with_capacity(5);
        buf.iovecs(HDR_LEN, max, &mut iov);
        iov.push(libc::iovec {
            iov_base: over.as_mut_ptr().cast(),
            iov_len: MAX_SEQ_MSG.saturating_sub(max),
        });
        let (n, truncated) = match sys::recv_iov(fd, &iov) {
            Ok(r) => r,
            Err(e) if sys::would_block(&e) => {
                c.readable = false;
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            end_of_stream(c, h);
            return Ok(true);
        }
        if truncated {
            return Err(std::io::Error::other(format!(
                "SEQPACKET message exceeds {MAX_SEQ_MSG} bytes"
            )));
        }
        let here = n.min(max);
        buf.mark_dirty(HDR_LEN, here);
        c.tx_cnt = c.tx_cnt.wrapping_add(here as u32);
        c.bytes_to_guest += here as u64;
        h.op = OP_RW;
        h.len = here as u32;
        if n > max {
            c.out_msg = over[..n - max].to_vec();
            c.out_off = 0;
        } else {
            h.flags = SEQ_EOM;
        }
        Ok(true)
    })
}

/// SEQPACKET: a message that fits goes straight into the rx buffer with EOM; a larger one
/// is read whole into the connection and sent in credit-sized pieces.
fn read_host_msg(
    c: &mut Conn,
    buf: &ChainBuf<'_>,
    max: usize,
    h: &mut Header,
) -> std::io::Result<bool> {
    let fd = c.fd.as_raw_fd();
    if c.out_off >= c.out_msg.len() {
        let len = match sys::next_msg_len(fd) {
            Ok(0) => {
                end_of_stream(c, h);
                return Ok(true);
            }
            Ok(n) => n,
            Err(e) if sys::would_block(&e) => {
                c.readable = false;
                return Ok(false);
            }
            // AF_VSOCK SEQPACKET before Linux 6.3 cannot peek (6.1 says ENOMEM, leaving
            // the message queued).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOMEM)) => {
                return read_host_msg_unpeeked(c, buf, max, h)
            }
            Err(e) => return Err(e),
        };
        if len <= max {
            let mut iov = Vec::with_capacity(4);
            buf.iovecs(HDR_LEN, len, &mut iov);
            let (n, _) = sys::recv_iov(fd, &iov)?;
            buf.mark_dirty(HDR_LEN, n);
            c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
            c.bytes_to_guest += n as u64;
            h.op = OP_RW;
            h.len = n as u32;
            h.flags = SEQ_EOM;
            return Ok(true);
        }
        if len > MAX_SEQ_MSG {
            return Err(std::io::Error::other(format!(
                "SEQPACKET message of {len} bytes exceeds {MAX_SEQ_MSG}"
            )));
        }
        let mut msg = vec![0u8; len];
        let n = sys::recv(fd, &mut msg)?;
        msg.truncate(n);
        c.out_msg = msg;
        c.out_off = 0;
    }
    let chunk = (c.out_msg.len() - c.out_off).min(max);
    buf.write_at(HDR_LEN, &c.out_msg[c.out_off..c.out_off + chunk]);
    c.out_off += chunk;
    c.tx_cnt = c.tx_cnt.wrapping_add(chunk as u32);
    c.bytes_to_guest += chunk as u64;
    h.op = OP_RW;
    h.len = chunk as u32;
    if c.out_off == c.out_msg.len() {
        h.flags = SEQ_EOM;
        c.out_msg = Vec::new();
        c.out_off = 0;
    }
    Ok(true)
}
