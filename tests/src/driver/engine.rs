//! The driver's shared state: rings and their buffer pools, transmit (with ordered control
//! packets), and the interrupt-side servicing of the rx, tx and event queues. The packet
//! state machine is in `proto.rs`. Everything here runs under the `Shared::core` mutex, from
//! the worker thread (interrupt side) or from application threads (send/recv side).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::log::{Direction, PacketLog};
use super::socket::{SockKey, SockType, Socket};
use super::{DriverConfig, RxLayout, TxLayout};
use crate::mem::GuestMem;
use crate::packet::*;
use crate::ring::{Desc, RawDesc, SplitRing};

/// Control packets waiting for tx space, at most.
const CTRL_QUEUE_MAX: usize = 16384;
/// Violations kept verbatim, at most.
const VIOLATIONS_MAX: usize = 256;
/// Events kept, at most.
pub(super) const EVENTS_MAX: usize = 1024;
/// Offset of the payload in a split-layout buffer (cache-line aligned).
const SPLIT_DATA_OFF: u64 = 64;
/// Ephemeral ports handed to `connect`.
pub(crate) const EPHEMERAL_FIRST: u32 = 49152;

/// Reads the device config's `guest_cid` again (after TRANSPORT_RESET).
pub type CidSource = Box<dyn FnMut() -> Result<u64> + Send>;

/// The driver's view of one ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingState {
    /// Shadow of `avail->idx`: chains published so far.
    pub avail_idx: u16,
    /// Used entries consumed so far.
    pub last_used: u16,
    /// Chains the device holds.
    pub in_flight: usize,
}

/// Counters for assertions and reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct DriverStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub kicks: u64,
    pub interrupts: u64,
    pub credit_updates_sent: u64,
    pub credit_requests_received: u64,
    /// Rx buffers the device returned as used without writing a packet header.
    pub blank_rx: u64,
}

pub(crate) struct Listener {
    pub ty: SockType,
    pub backlog: VecDeque<SockKey>,
    pub cap: usize,
}

/// One queue with its pool of fixed buffers.
pub(crate) struct Queue {
    pub ring: SplitRing,
    pub kick: EventFd,
    slots: Vec<GuestAddress>,
    by_head: Vec<Option<usize>>,
    /// Heads of raw chains (no buffer of ours behind them).
    raw: Vec<bool>,
    free: Vec<usize>,
}

impl Queue {
    fn new(ring: SplitRing, kick: EventFd, slots: Vec<GuestAddress>) -> Self {
        let n = usize::from(ring.size());
        let free = (0..slots.len()).rev().collect();
        Queue {
            ring,
            kick,
            slots,
            by_head: vec![None; n],
            raw: vec![false; n],
            free,
        }
    }

    fn post(&mut self, slot: usize, descs: &[Desc]) -> Result<()> {
        let head = self.ring.add(descs)?;
        self.by_head[usize::from(head)] = Some(slot);
        Ok(())
    }

    /// True (and forgotten) if `head` was a raw chain's.
    fn take_raw(&mut self, head: u16) -> bool {
        self.raw
            .get_mut(usize::from(head))
            .is_some_and(std::mem::take)
    }

    fn take(&mut self, head: u16) -> Result<usize> {
        self.by_head
            .get_mut(usize::from(head))
            .and_then(Option::take)
            .with_context(|| format!("used head {head} carries no buffer of ours"))
    }

    /// Kicks the device if the ring's suppression state asks for it.
    fn kick_if_needed(&mut self, stats: &mut DriverStats) -> Result<()> {
        if self.ring.kick_needed()? {
            self.kick.write(1).context("writing kick eventfd")?;
            stats.kicks += 1;
        }
        Ok(())
    }
}

/// Inputs to build the core: rings set up by the simulated VMM.
pub(crate) struct CoreParts {
    pub rx: (SplitRing, EventFd),
    pub tx: (SplitRing, EventFd),
    pub evt: Option<(SplitRing, EventFd)>,
    pub cid: u64,
    pub seqpacket: bool,
    pub cid_source: Option<CidSource>,
}

pub(crate) struct Core {
    pub cfg: DriverConfig,
    pub(super) mem: GuestMemoryMmap,
    pub cid: u64,
    pub seqpacket: bool,
    rx: Queue,
    tx: Queue,
    /// What each tx slot's payload area holds when it is a piece of a caller's prebuilt
    /// buffer ([`Core::submit_prefilled`]); `None` once anything else was written there.
    tx_content: Vec<Option<SlotContent>>,
    evt: Option<Queue>,
    pub sockets: HashMap<SockKey, Socket>,
    pub listeners: HashMap<u32, Listener>,
    ctrl: VecDeque<PacketHeader>,
    pub log: PacketLog,
    pub events: VecDeque<u32>,
    pub events_total: u64,
    pub violations: VecDeque<String>,
    pub violation_count: u64,
    pub(super) next_port: u32,
    pub fatal: Option<String>,
    pub stopped: bool,
    /// The interrupt thread is asked to park (see `Guest::pause_interrupts`).
    pub pause_requested: bool,
    /// The interrupt thread is parked: it reads no call eventfd until resumed.
    pub parked: bool,
    pub(super) cid_source: Option<CidSource>,
    pub stats: DriverStats,
}

/// A tx slot's payload area holds bytes `[off, off + len)` of the prebuilt buffer `tag`,
/// laid out for `layout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SlotContent {
    tag: u64,
    off: usize,
    len: usize,
    layout: TxLayout,
}

fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Core {
    pub fn new(cfg: DriverConfig, gm: &mut GuestMem, parts: CoreParts) -> Result<Self> {
        if cfg.rx_buf_size == 0 || cfg.max_pkt == 0 || cfg.buf_alloc == 0 {
            bail!("rx_buf_size, max_pkt and buf_alloc must be non-zero");
        }
        let mem = gm.memory().clone();
        let qsize = u64::from(parts.rx.0.size());
        let rx_per = match cfg.rx_layout {
            RxLayout::Split => 2,
            RxLayout::Single => 1,
        };
        let rx_count = qsize / rx_per;
        let rx_slot = round_up(SPLIT_DATA_OFF + u64::from(cfg.rx_buf_size), 64);
        let rx_slots = (0..rx_count)
            .map(|_| gm.alloc(rx_slot, 64))
            .collect::<Result<Vec<_>>>()?;
        let tx_qsize = u64::from(parts.tx.0.size());
        let tx_per = match cfg.tx_layout {
            TxLayout::Split => 2,
            TxLayout::Single => 1,
        };
        let tx_count = (tx_qsize / tx_per).min(256);
        let tx_slot = round_up(SPLIT_DATA_OFF + u64::from(cfg.max_pkt), 64);
        let tx_slots = (0..tx_count)
            .map(|_| gm.alloc(tx_slot, 64))
            .collect::<Result<Vec<_>>>()?;
        let evt = match parts.evt {
            Some((ring, kick)) => {
                let n = u64::from(ring.size()).min(u64::from(cfg.event_bufs.max(1)));
                let slots = (0..n).map(|_| gm.alloc(8, 8)).collect::<Result<Vec<_>>>()?;
                Some(Queue::new(ring, kick, slots))
            }
            None => None,
        };
        let log_cap = cfg.packet_log_capacity;
        let mut core = Core {
            cfg,
            mem,
            cid: parts.cid,
            seqpacket: parts.seqpacket,
            rx: Queue::new(parts.rx.0, parts.rx.1, rx_slots),
            tx_content: vec![None; tx_slots.len()],
            tx: Queue::new(parts.tx.0, parts.tx.1, tx_slots),
            evt,
            sockets: HashMap::new(),
            listeners: HashMap::new(),
            ctrl: VecDeque::new(),
            log: PacketLog::new(log_cap),
            events: VecDeque::new(),
            events_total: 0,
            violations: VecDeque::new(),
            violation_count: 0,
            next_port: EPHEMERAL_FIRST,
            fatal: None,
            stopped: false,
            pause_requested: false,
            parked: false,
            cid_source: parts.cid_source,
            stats: DriverStats::default(),
        };
        while let Some(slot) = core.rx.free.pop() {
            core.post_rx(slot)?;
        }
        if let Some(evt) = core.evt.as_mut() {
            while let Some(slot) = evt.free.pop() {
                let addr = evt.slots[slot];
                evt.post(
                    slot,
                    &[Desc {
                        addr,
                        len: 8,
                        write: true,
                    }],
                )?;
            }
        }
        core.kick_all()?;
        Ok(core)
    }

    fn post_rx(&mut self, slot: usize) -> Result<()> {
        let addr = self.rx.slots[slot];
        // A zeroed header makes a buffer the device returns without writing a packet
        // recognisable (instead of replaying the stale header of an earlier packet).
        self.mem
            .write_slice(&[0u8; HDR_LEN], addr)
            .context("clearing rx header")?;
        let n = self.cfg.rx_buf_size;
        let descs: &[Desc] = match self.cfg.rx_layout {
            RxLayout::Split => &[
                Desc {
                    addr,
                    len: HDR_LEN as u32,
                    write: true,
                },
                Desc {
                    addr: GuestAddress(addr.0 + SPLIT_DATA_OFF),
                    len: n,
                    write: true,
                },
            ],
            RxLayout::Single => &[Desc {
                addr,
                len: HDR_LEN as u32 + n,
                write: true,
            }],
        };
        self.rx.post(slot, descs)
    }

    fn kick_all(&mut self) -> Result<()> {
        self.rx.kick_if_needed(&mut self.stats)?;
        self.tx.kick_if_needed(&mut self.stats)?;
        if let Some(e) = self.evt.as_mut() {
            e.kick_if_needed(&mut self.stats)?;
        }
        Ok(())
    }

    /// Fails API calls once the driver is unusable.
    pub fn check_alive(&self) -> std::io::Result<()> {
        if let Some(f) = &self.fatal {
            return Err(std::io::Error::other(format!("guest driver failed: {f}")));
        }
        if self.stopped {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "guest driver stopped",
            ));
        }
        Ok(())
    }

    pub fn violation(&mut self, msg: String) {
        self.violation_count += 1;
        if self.violations.len() == VIOLATIONS_MAX {
            self.violations.pop_front();
        }
        self.violations.push_back(msg);
    }

    pub fn fail(&mut self, msg: String) {
        if self.fatal.is_none() {
            self.fatal = Some(msg);
        }
    }

    // ----- transmit -----------------------------------------------------------------------

    /// Room for one packet with `payload_len` bytes in `layout`.
    pub fn tx_room(&self, payload_len: usize, layout: TxLayout) -> bool {
        let descs = match layout {
            TxLayout::Split if payload_len > 0 => 2,
            _ => 1,
        };
        !self.tx.free.is_empty() && self.tx.ring.num_free() >= descs
    }

    /// Whether application data may go now (control packets keep their order ahead of it).
    pub fn data_room(&self, payload_len: usize) -> bool {
        self.ctrl.is_empty() && self.tx_room(payload_len, self.cfg.tx_layout)
    }

    /// Places one packet on the tx ring (no kick). Returns false if there is no room.
    pub fn submit(&mut self, hdr: &PacketHeader, payload: &[u8], layout: TxLayout) -> Result<bool> {
        self.submit_prefilled(hdr, payload, layout, None)
    }

    /// Like [`Core::submit`]; with `piece = Some((tag, off))`, `payload` is bytes
    /// `[off, off + payload.len())` of a buffer the caller never changes under that tag, and a
    /// slot that already holds them is posted without copying them again (a benchmark's
    /// prebuilt payload: only the header is written per packet).
    pub fn submit_prefilled(
        &mut self,
        hdr: &PacketHeader,
        payload: &[u8],
        layout: TxLayout,
        piece: Option<(u64, usize)>,
    ) -> Result<bool> {
        if payload.len() as u64 > u64::from(self.cfg.max_pkt) {
            bail!(
                "payload of {} bytes exceeds the tx buffer size {}",
                payload.len(),
                self.cfg.max_pkt
            );
        }
        if !self.tx_room(payload.len(), layout) {
            return Ok(false);
        }
        let Some(slot) = self.tx.free.pop() else {
            return Ok(false);
        };
        let addr = self.tx.slots[slot];
        let held = self.tx_content.get(slot).copied().flatten();
        let want = piece.map(|(tag, off)| SlotContent {
            tag,
            off,
            len: payload.len(),
            layout,
        });
        // The slot already holds these bytes (same piece of the same buffer, at least as long).
        let prefilled = match (held, want) {
            (Some(h), Some(w)) => {
                h.tag == w.tag && h.off == w.off && h.layout == w.layout && h.len >= w.len
            }
            _ => false,
        };
        if !payload.is_empty() {
            if let Some(c) = self.tx_content.get_mut(slot) {
                *c = if prefilled { held } else { want };
            }
        }
        let res = (|| -> Result<()> {
            self.mem
                .write_slice(&hdr.to_bytes(), addr)
                .context("writing tx header")?;
            match layout {
                TxLayout::Split => {
                    let data = GuestAddress(addr.0 + SPLIT_DATA_OFF);
                    let head = Desc {
                        addr,
                        len: HDR_LEN as u32,
                        write: false,
                    };
                    if payload.is_empty() {
                        return self.tx.post(slot, &[head]);
                    }
                    if !prefilled {
                        self.mem
                            .write_slice(payload, data)
                            .context("writing tx payload")?;
                    }
                    let body = Desc {
                        addr: data,
                        len: payload.len() as u32,
                        write: false,
                    };
                    self.tx.post(slot, &[head, body])
                }
                TxLayout::Single => {
                    let data = GuestAddress(addr.0 + HDR_LEN as u64);
                    if !prefilled {
                        self.mem
                            .write_slice(payload, data)
                            .context("writing tx payload")?;
                    }
                    self.tx.post(
                        slot,
                        &[Desc {
                            addr,
                            len: (HDR_LEN + payload.len()) as u32,
                            write: false,
                        }],
                    )
                }
            }
        })();
        if let Err(e) = res {
            if let Some(c) = self.tx_content.get_mut(slot) {
                *c = None;
            }
            self.tx.free.push(slot);
            return Err(e);
        }
        self.log.push(Direction::ToDevice, *hdr);
        self.stats.tx_packets += 1;
        self.stats.tx_bytes += payload.len() as u64;
        Ok(true)
    }

    /// Places a raw descriptor chain on the tx ring (no kick). False if there is no room.
    pub fn submit_raw_chain(&mut self, descs: &[RawDesc]) -> Result<bool> {
        if self.tx.ring.num_free() < descs.len() {
            return Ok(false);
        }
        let head = self.tx.ring.add_raw(descs)?;
        if let Some(r) = self.tx.raw.get_mut(usize::from(head)) {
            *r = true;
        }
        Ok(true)
    }

    /// Puts a bare head index on the tx available ring (no kick).
    pub fn publish_raw_tx_head(&mut self, head: u16) -> Result<()> {
        self.tx.ring.publish_raw_head(head)
    }

    pub fn kick_tx(&mut self) -> Result<()> {
        self.tx.kick_if_needed(&mut self.stats)
    }

    /// Sends a header-only packet, queueing it (in order) if the ring is full.
    pub fn send_ctrl(&mut self, hdr: PacketHeader) {
        if self.ctrl.is_empty() {
            let layout = self.cfg.tx_layout;
            match self.submit(&hdr, &[], layout) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    self.fail(format!("tx submit: {e:#}"));
                    return;
                }
            }
        }
        if self.ctrl.len() >= CTRL_QUEUE_MAX {
            self.violation(format!(
                "driver control queue overflow ({CTRL_QUEUE_MAX} packets): the device does not \
                 return tx buffers; dropped {} to port {}",
                op_name(hdr.op),
                hdr.dst_port
            ));
            return;
        }
        self.ctrl.push_back(hdr);
    }

    fn flush_ctrl(&mut self) {
        let layout = self.cfg.tx_layout;
        while let Some(h) = self.ctrl.front().copied() {
            match self.submit(&h, &[], layout) {
                Ok(true) => {
                    self.ctrl.pop_front();
                }
                Ok(false) => break,
                Err(e) => {
                    self.fail(format!("tx submit: {e:#}"));
                    break;
                }
            }
        }
    }

    /// A header for socket `key`, stamped with its credit state.
    pub fn sock_hdr(
        &mut self,
        key: SockKey,
        op: u16,
        flags: u32,
        len: u32,
    ) -> Option<PacketHeader> {
        let cid = self.cid;
        let sock = self.sockets.get_mut(&key)?;
        let mut h = PacketHeader {
            src_cid: cid,
            dst_cid: key.peer_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len,
            type_: sock.ty.wire(),
            op,
            flags,
            ..Default::default()
        };
        sock.stamp(&mut h);
        Some(h)
    }

    pub fn send_sock_ctrl(&mut self, key: SockKey, op: u16, flags: u32) {
        if let Some(h) = self.sock_hdr(key, op, flags, 0) {
            if op == OP_CREDIT_UPDATE {
                self.stats.credit_updates_sent += 1;
            }
            self.send_ctrl(h);
        }
    }

    // ----- interrupt side ------------------------------------------------------------------

    /// Processes the used ring of tx: frees buffers, sends queued control packets.
    pub fn service_tx(&mut self) {
        if let Err(e) = self.service_tx_inner() {
            self.fail(format!("tx queue: {e:#}"));
        }
    }

    fn service_tx_inner(&mut self) -> Result<()> {
        loop {
            while let Some(u) = self.tx.ring.pop_used()? {
                if self.tx.take_raw(u.head) {
                    continue;
                }
                let slot = self.tx.take(u.head)?;
                self.tx.free.push(slot);
            }
            if !self.tx.ring.enable_notifications()? {
                break;
            }
        }
        self.flush_ctrl();
        self.kick_tx()
    }

    pub fn service_rx(&mut self) {
        if let Err(e) = self.service_rx_inner() {
            self.fail(format!("rx queue: {e:#}"));
        }
        if let Err(e) = self.kick_tx() {
            self.fail(format!("tx kick: {e:#}"));
        }
    }

    fn service_rx_inner(&mut self) -> Result<()> {
        loop {
            while let Some(u) = self.rx.ring.pop_used()? {
                let slot = self.rx.take(u.head)?;
                self.receive(slot, u.len)?;
                self.post_rx(slot)?;
            }
            if !self.rx.ring.enable_notifications()? {
                break;
            }
        }
        self.rx.kick_if_needed(&mut self.stats)
    }

    fn receive(&mut self, slot: usize, used_len: u32) -> Result<()> {
        let addr = self.rx.slots[slot];
        let mut raw = [0u8; HDR_LEN];
        self.mem
            .read_slice(&mut raw, addr)
            .context("reading rx header")?;
        if raw == [0u8; HDR_LEN] {
            self.stats.blank_rx += 1;
            return Ok(());
        }
        let hdr = PacketHeader::from_bytes(&raw);
        self.log.push(Direction::FromDevice, hdr);
        self.stats.rx_packets += 1;
        if (used_len as usize) < HDR_LEN {
            self.violation(format!(
                "rx used len {used_len} is shorter than a header ({})",
                op_name(hdr.op)
            ));
            return Ok(());
        }
        if hdr.len > self.cfg.rx_buf_size {
            self.violation(format!(
                "rx packet len {} exceeds the posted buffer {}",
                hdr.len, self.cfg.rx_buf_size
            ));
            return Ok(());
        }
        if u64::from(used_len) < HDR_LEN as u64 + u64::from(hdr.len) {
            self.violation(format!(
                "rx used len {used_len} does not cover header + len {}",
                hdr.len
            ));
            return Ok(());
        }
        let data_addr = match self.cfg.rx_layout {
            RxLayout::Split => GuestAddress(addr.0 + SPLIT_DATA_OFF),
            RxLayout::Single => GuestAddress(addr.0 + HDR_LEN as u64),
        };
        let mut data = vec![0u8; hdr.len as usize];
        if !data.is_empty() {
            self.mem
                .read_slice(&mut data, data_addr)
                .context("reading rx payload")?;
        }
        self.stats.rx_bytes += data.len() as u64;
        self.dispatch(hdr, data);
        Ok(())
    }

    pub fn service_evt(&mut self) {
        if let Err(e) = self.service_evt_inner() {
            self.fail(format!("event queue: {e:#}"));
        }
    }

    fn service_evt_inner(&mut self) -> Result<()> {
        let Some(mut evt) = self.evt.take() else {
            return Ok(());
        };
        let res = (|| -> Result<()> {
            loop {
                while let Some(u) = evt.ring.pop_used()? {
                    let slot = evt.take(u.head)?;
                    let addr = evt.slots[slot];
                    let id: u32 = u32::from_le(self.mem.read_obj(addr).context("reading event")?);
                    if u.len < 4 {
                        self.violation(format!("event used len {} < 4", u.len));
                    } else {
                        self.on_event(id);
                    }
                    evt.post(
                        slot,
                        &[Desc {
                            addr,
                            len: 8,
                            write: true,
                        }],
                    )?;
                }
                if !evt.ring.enable_notifications()? {
                    break;
                }
            }
            evt.kick_if_needed(&mut self.stats)
        })();
        self.evt = Some(evt);
        res
    }

    pub fn has_event_queue(&self) -> bool {
        self.evt.is_some()
    }

    /// The driver's view of queue `idx` (0 rx, 1 tx, 2 event).
    pub fn ring_state(&self, idx: usize) -> Option<RingState> {
        let q = match idx {
            0 => &self.rx,
            1 => &self.tx,
            2 => self.evt.as_ref()?,
            _ => return None,
        };
        Some(RingState {
            avail_idx: q.ring.avail_idx(),
            last_used: q.ring.last_used(),
            in_flight: q.ring.in_flight(),
        })
    }

    pub fn count_interrupt(&mut self) {
        self.stats.interrupts += 1;
    }

    /// Time until the next close deadline, bounded by `max`.
    pub fn poll_timeout(&mut self, max: Duration) -> Duration {
        let now = Instant::now();
        let next = self.expire(now);
        if let Err(e) = self.kick_tx() {
            self.fail(format!("tx kick: {e:#}"));
        }
        match next {
            Some(d) => d.saturating_duration_since(now).min(max),
            None => max,
        }
    }
}
