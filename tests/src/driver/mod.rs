//! A guest virtio-vsock driver on split rings, modelled on Linux's
//! `virtio_transport_common.c` / `virtio_transport.c`, with a blocking, time-bounded API.
//!
//! A worker thread services interrupts (call eventfds); application threads send and receive
//! through [`GuestSocket`] handles. All waits are bounded by a timeout.

mod api;
mod engine;
mod log;
mod proto;
mod socket;
mod worker;

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use self::api::{GuestListener, GuestSocket, RecvMsg};
pub use self::engine::{CidSource, DriverStats, RingState};
pub use self::log::{Direction, LoggedPacket};
pub use self::socket::{CreditInfo, EndReason, SockKey, SockType};

use self::engine::{Core, CoreParts, Listener};
use crate::mem::GuestMem;
use crate::packet::{PacketHeader, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, TYPE_STREAM};
use crate::ring::{RingAddrs, SplitRing};
use crate::sim::{SimVmm, EVENT_QUEUE, RX_QUEUE, TX_QUEUE, VIRTIO_RING_F_EVENT_IDX};

/// How rx buffers are laid out in descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxLayout {
    /// Header and payload in two descriptors (classic Linux).
    Split,
    /// Header and payload in one descriptor (Linux >= 6.2).
    Single,
}

/// How tx packets are laid out in descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxLayout {
    /// Header descriptor, then a payload descriptor when there is payload.
    Split,
    /// Header and payload in one descriptor.
    Single,
}

/// Driver knobs. Defaults follow Linux.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    pub rx_layout: RxLayout,
    pub tx_layout: TxLayout,
    /// Payload bytes per rx buffer (Linux: 4 KiB).
    pub rx_buf_size: u32,
    /// Largest payload per tx packet (Linux: 64 KiB).
    pub max_pkt: u32,
    /// Receive buffer advertised per socket (Linux: 256 KiB).
    pub buf_alloc: u32,
    /// Send CREDIT_UPDATE when the peer believes less than this is free (Linux: 64 KiB).
    pub credit_update_threshold: u32,
    /// Event queue buffers to keep posted.
    pub event_bufs: u16,
    /// Default bound on every blocking call.
    pub timeout: Duration,
    /// How long a closed socket waits for the peer's RST before sending one.
    pub close_timeout: Duration,
    /// Pending connections per listener.
    pub backlog: usize,
    /// Packet headers kept in the log.
    pub packet_log_capacity: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            rx_layout: RxLayout::Split,
            tx_layout: TxLayout::Split,
            rx_buf_size: 4096,
            max_pkt: 64 * 1024,
            buf_alloc: 256 * 1024,
            credit_update_threshold: 64 * 1024,
            event_bufs: 8,
            timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            backlog: 1024,
            packet_log_capacity: 65536,
        }
    }
}

/// Why `connect` failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The device answered with RST.
    Refused,
    /// No answer within the timeout.
    TimedOut,
    /// The driver cannot do this (e.g. SEQPACKET not negotiated).
    Unsupported(String),
    /// Driver or device failure.
    Failed(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Refused => write!(f, "connection refused (RST)"),
            ConnectError::TimedOut => write!(f, "connect timed out"),
            ConnectError::Unsupported(s) => write!(f, "unsupported: {s}"),
            ConnectError::Failed(s) => write!(f, "connect failed: {s}"),
        }
    }
}

impl std::error::Error for ConnectError {}

pub(crate) struct Shared {
    core: Mutex<Core>,
    cv: Condvar,
}

impl Shared {
    /// Locks the core; a panic elsewhere does not make the state unusable for diagnosis.
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until notified or `deadline`; returns the guard and whether the deadline passed.
    fn wait_until<'a>(
        &'a self,
        guard: MutexGuard<'a, Core>,
        deadline: Instant,
    ) -> (MutexGuard<'a, Core>, bool) {
        let now = Instant::now();
        if now >= deadline {
            return (guard, true);
        }
        let (g, _) = self
            .cv
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(|e| e.into_inner());
        (g, Instant::now() >= deadline)
    }
}

/// A running guest driver.
pub struct Guest {
    shared: Arc<Shared>,
    stop: EventFd,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
    timeout: Duration,
}

/// One queue's plumbing, for [`Guest::start_with`].
pub struct QueueParts {
    pub addrs: RingAddrs,
    /// Written by the driver to notify the device (the driver keeps this handle).
    pub kick: EventFd,
    /// Written by the device to interrupt the driver.
    pub call: EventFd,
}

/// Everything a driver needs besides memory, for running against something other than a
/// vhost-user backend (e.g. an in-process fake device).
pub struct GuestParts {
    pub rx: QueueParts,
    pub tx: QueueParts,
    pub evt: Option<QueueParts>,
    pub event_idx: bool,
    pub seqpacket: bool,
    pub cid: u64,
    /// Re-reads `guest_cid` after TRANSPORT_RESET.
    pub cid_source: Option<CidSource>,
}

fn queue_parts(sim: &SimVmm, idx: usize) -> Result<Option<QueueParts>> {
    let q = sim.queue(idx).context("queue missing")?;
    if !q.active {
        return Ok(None);
    }
    Ok(Some(QueueParts {
        addrs: q.addrs,
        kick: q.kick.try_clone().context("dup kick eventfd")?,
        call: q.call.try_clone().context("dup call eventfd")?,
    }))
}

impl Guest {
    /// Starts the driver on the vrings `sim` set up: posts rx and event buffers and kicks.
    pub fn start(sim: &mut SimVmm, cfg: DriverConfig) -> Result<Guest> {
        let mut fe = sim.frontend_handle()?;
        let parts = GuestParts {
            rx: queue_parts(sim, RX_QUEUE)?.context("rx queue not set up")?,
            tx: queue_parts(sim, TX_QUEUE)?.context("tx queue not set up")?,
            evt: queue_parts(sim, EVENT_QUEUE)?,
            event_idx: sim.has_feature(VIRTIO_RING_F_EVENT_IDX),
            seqpacket: sim.has_feature(crate::packet::VIRTIO_VSOCK_F_SEQPACKET),
            cid: sim.guest_cid(),
            cid_source: Some(Box::new(move || crate::sim::read_cid(&mut fe))),
        };
        Self::start_with(sim.guest_mem_mut(), parts, cfg)
    }

    /// Starts the driver on rings in `mem`; its buffers are allocated from `mem`.
    pub fn start_with(mem: &mut GuestMem, parts: GuestParts, cfg: DriverConfig) -> Result<Guest> {
        let ring = |q: &QueueParts| SplitRing::new(mem.memory().clone(), q.addrs, parts.event_idx);
        let rx = (ring(&parts.rx), parts.rx.kick);
        let tx = (ring(&parts.tx), parts.tx.kick);
        let (evt, call_evt) = match parts.evt {
            Some(q) => (Some((ring(&q), q.kick)), Some(q.call)),
            None => (None, None),
        };
        let fds = worker::WorkerFds {
            call_rx: parts.rx.call,
            call_tx: parts.tx.call,
            call_evt,
            stop: EventFd::new(EFD_NONBLOCK).context("stop eventfd")?,
            wake: EventFd::new(EFD_NONBLOCK).context("wake eventfd")?,
        };
        let core_parts = CoreParts {
            rx,
            tx,
            evt,
            cid: parts.cid,
            seqpacket: parts.seqpacket,
            cid_source: parts.cid_source,
        };
        let timeout = cfg.timeout;
        let core = Core::new(cfg, mem, core_parts)?;
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            cv: Condvar::new(),
        });
        let stop = fds.stop.try_clone().context("dup stop eventfd")?;
        let wake = fds.wake.try_clone().context("dup wake eventfd")?;
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("guest-vsock".into())
            .spawn(move || worker::run(s2, fds))
            .context("spawning driver thread")?;
        Ok(Guest {
            shared,
            stop,
            wake,
            thread: Some(thread),
            timeout,
        })
    }

    /// The CID the driver uses (re-read after TRANSPORT_RESET).
    pub fn guest_cid(&self) -> u64 {
        self.shared.lock().cid
    }

    /// Whether SEQPACKET was negotiated.
    pub fn seqpacket_enabled(&self) -> bool {
        self.shared.lock().seqpacket
    }

    /// Whether the backend was given the event queue.
    pub fn has_event_queue(&self) -> bool {
        self.shared.lock().has_event_queue()
    }

    /// Connects to `cid:port`, bounded by the default timeout.
    pub fn connect(&self, cid: u64, port: u32, ty: SockType) -> Result<GuestSocket, ConnectError> {
        self.connect_timeout(cid, port, ty, self.timeout)
    }

    /// Connects to `cid:port`; `Refused` on RST, `TimedOut` if no answer within `timeout`.
    pub fn connect_timeout(
        &self,
        cid: u64,
        port: u32,
        ty: SockType,
        timeout: Duration,
    ) -> Result<GuestSocket, ConnectError> {
        api::connect(&self.shared, cid, port, ty, timeout, self.timeout)
    }

    /// Listens on `port`.
    pub fn listen(&self, port: u32, ty: SockType) -> Result<GuestListener> {
        let mut core = self.shared.lock();
        core.check_alive()?;
        if ty == SockType::Seqpacket && !core.seqpacket {
            anyhow::bail!("SEQPACKET was not negotiated");
        }
        if core.listeners.contains_key(&port) {
            anyhow::bail!("port {port} already has a listener");
        }
        let cap = core.cfg.backlog;
        core.listeners.insert(
            port,
            Listener {
                ty,
                backlog: Default::default(),
                cap,
            },
        );
        Ok(GuestListener::new(
            self.shared.clone(),
            port,
            ty,
            self.timeout,
        ))
    }

    /// Puts `hdr` and `payload` on the tx queue exactly as given (no socket state, no
    /// validation), waiting up to the default timeout for ring space.
    pub fn send_raw(&self, hdr: &PacketHeader, payload: &[u8], layout: TxLayout) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut core = self.shared.lock();
        loop {
            core.check_alive()?;
            if core.submit(hdr, payload, layout)? {
                core.kick_tx()?;
                return Ok(());
            }
            let (g, timed_out) = self.shared.wait_until(core, deadline);
            core = g;
            if timed_out {
                anyhow::bail!(
                    "no tx ring space for a raw packet within {:?}",
                    self.timeout
                );
            }
        }
    }

    /// Puts a raw descriptor chain on the tx queue (see [`crate::ring::RawDesc`]) and kicks,
    /// waiting up to the default timeout for ring space. The descriptors are freed when the
    /// device returns the head, as for any chain.
    pub fn send_raw_chain(&self, descs: &[crate::ring::RawDesc]) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut core = self.shared.lock();
        loop {
            core.check_alive()?;
            if core.submit_raw_chain(descs)? {
                core.kick_tx()?;
                return Ok(());
            }
            let (g, timed_out) = self.shared.wait_until(core, deadline);
            core = g;
            if timed_out {
                anyhow::bail!("no tx ring space for a raw chain within {:?}", self.timeout);
            }
        }
    }

    /// Publishes `head` on the tx available ring without any descriptor behind it (e.g. an
    /// index beyond the queue size) and kicks.
    pub fn send_raw_head(&self, head: u16) -> Result<()> {
        let mut core = self.shared.lock();
        core.check_alive()?;
        core.publish_raw_tx_head(head)?;
        core.kick_tx()
    }

    /// A REQUEST header from this guest, for raw tests to modify.
    pub fn request_header(&self, src_port: u32, dst_cid: u64, dst_port: u32) -> PacketHeader {
        let core = self.shared.lock();
        PacketHeader {
            src_cid: core.cid,
            dst_cid,
            src_port,
            dst_port,
            len: 0,
            type_: crate::packet::TYPE_STREAM,
            op: OP_REQUEST,
            flags: 0,
            buf_alloc: core.cfg.buf_alloc,
            fwd_cnt: 0,
        }
    }

    /// Sequence number the next logged packet will get.
    pub fn log_seq(&self) -> u64 {
        self.shared.lock().log.next_seq()
    }

    /// Sends a CREDIT_REQUEST on `sock` (STREAM header, the socket's current credit) and waits
    /// up to `timeout` for the device's CREDIT_UPDATE to it.
    pub fn request_credit(&self, sock: &GuestSocket, timeout: Duration) -> Result<LoggedPacket> {
        let seq = self.log_seq();
        let info = sock.credit_info().context("no such connection")?;
        let h = PacketHeader {
            src_cid: self.guest_cid(),
            dst_cid: sock.peer_cid(),
            src_port: sock.local_port(),
            dst_port: sock.peer_port(),
            len: 0,
            type_: TYPE_STREAM,
            op: OP_CREDIT_REQUEST,
            flags: 0,
            buf_alloc: info.buf_alloc,
            fwd_cnt: info.fwd_cnt,
        };
        self.send_raw(&h, &[], TxLayout::Split)?;
        self.wait_packet(seq, timeout, |h| {
            h.op == OP_CREDIT_UPDATE && h.dst_port == sock.local_port()
        })
        .context("no CREDIT_UPDATE")
    }

    /// Logged packets with `seq >= since` (both directions; oldest may have been dropped).
    pub fn packets_since(&self, since: u64) -> Vec<LoggedPacket> {
        self.shared.lock().log.since(since).copied().collect()
    }

    /// Waits up to `timeout` for a packet from the device, logged at or after `since`, that
    /// matches `pred`.
    pub fn wait_packet(
        &self,
        since: u64,
        timeout: Duration,
        pred: impl Fn(&PacketHeader) -> bool,
    ) -> Option<LoggedPacket> {
        let deadline = Instant::now() + timeout;
        let mut core = self.shared.lock();
        let mut from = since;
        loop {
            if let Some(p) = core
                .log
                .since(from)
                .find(|p| p.dir == Direction::FromDevice && pred(&p.hdr))
            {
                return Some(*p);
            }
            from = core.log.next_seq().max(since);
            let (g, timed_out) = self.shared.wait_until(core, deadline);
            core = g;
            if timed_out {
                return core
                    .log
                    .since(from)
                    .find(|p| p.dir == Direction::FromDevice && pred(&p.hdr))
                    .copied();
            }
        }
    }

    /// Event ids received on the event queue (bounded, newest last).
    pub fn events(&self) -> Vec<u32> {
        self.shared.lock().events.iter().copied().collect()
    }

    /// Waits until more than `count` events were received in total.
    pub fn wait_events(&self, count: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut core = self.shared.lock();
        loop {
            if core.events_total > count {
                return true;
            }
            let (g, timed_out) = self.shared.wait_until(core, deadline);
            core = g;
            if timed_out {
                return core.events_total > count;
            }
        }
    }

    /// Parks the interrupt thread: from return until [`Guest::resume_interrupts`] it reads no
    /// call eventfd and services no ring, so a test can read the call eventfds itself
    /// ([`crate::SimVmm::take_call`]) to see whether the device signalled. Interrupts that
    /// were pending when this was called are serviced before it returns.
    pub fn pause_interrupts(&self) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut core = self.shared.lock();
        core.pause_requested = true;
        self.wake.write(1).context("waking the driver thread")?;
        while !core.parked {
            core.check_alive()?;
            let (g, timed_out) = self.shared.wait_until(core, deadline);
            core = g;
            if timed_out && !core.parked {
                core.pause_requested = false;
                anyhow::bail!("driver thread did not park within {:?}", self.timeout);
            }
        }
        Ok(())
    }

    /// Lets the interrupt thread run again after [`Guest::pause_interrupts`].
    pub fn resume_interrupts(&self) {
        self.shared.lock().pause_requested = false;
        self.shared.cv.notify_all();
        // A failed write only delays the thread until its condition variable wakes it.
        let _ = self.wake.write(1);
    }

    /// Services every ring now, as if each had interrupted: consumes used entries, re-posts
    /// rx and event buffers, sends queued control packets, kicks as the rings ask.
    pub fn service_all(&self) {
        {
            let mut core = self.shared.lock();
            core.service_tx();
            core.service_rx();
            core.service_evt();
        }
        self.shared.cv.notify_all();
    }

    /// Holds the driver still: while the guard lives no driver code runs (application
    /// threads block in their calls, the interrupt thread blocks before servicing), so guest
    /// memory changes only if the device writes it. Call no other `Guest` method meanwhile.
    pub fn freeze(&self) -> Frozen<'_> {
        Frozen {
            _core: self.shared.lock(),
        }
    }

    /// Replaces the function that re-reads `guest_cid` after TRANSPORT_RESET (e.g. with one
    /// reading the destination VMM's config after a simulated migration).
    pub fn set_cid_source(&self, src: CidSource) {
        self.shared.lock().cid_source = Some(src);
    }

    /// The driver's view of queue `idx` (0 rx, 1 tx, 2 event); `None` for an event queue
    /// the backend was not given.
    pub fn ring_state(&self, idx: usize) -> Option<RingState> {
        self.shared.lock().ring_state(idx)
    }

    /// Device misbehaviour the driver saw (credit overruns, bad lengths, foreign CIDs, ...).
    pub fn violations(&self) -> Vec<String> {
        self.shared.lock().violations.iter().cloned().collect()
    }

    /// Ok if the driver is running and saw no device misbehaviour.
    pub fn health(&self) -> Result<()> {
        self.check_health(false)
    }

    /// Like [`Guest::health`], but tolerates rx buffers returned blank (a known bug of
    /// vhost-device-vsock 0.3.0 after a connection is removed).
    pub fn health_tolerating_blank_rx(&self) -> Result<()> {
        self.check_health(true)
    }

    fn check_health(&self, tolerate_blank: bool) -> Result<()> {
        let core = self.shared.lock();
        if !tolerate_blank && core.stats.blank_rx > 0 {
            anyhow::bail!(
                "the device returned {} rx buffers as used without writing a packet header",
                core.stats.blank_rx
            );
        }
        if let Some(f) = &core.fatal {
            anyhow::bail!("guest driver failed: {f}");
        }
        if core.violation_count > 0 {
            anyhow::bail!(
                "{} device protocol violations, latest: {:?}",
                core.violation_count,
                core.violations
            );
        }
        Ok(())
    }

    pub fn stats(&self) -> DriverStats {
        self.shared.lock().stats
    }

    /// Sockets in the table (connected, closing or ended but still held).
    pub fn socket_count(&self) -> usize {
        self.shared.lock().sockets.len()
    }

    /// Stops the worker thread; further calls fail. Idempotent.
    pub fn stop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.cv.notify_all();
        // A failed write leaves the worker to notice `stopped` within its poll bound.
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// See [`Guest::freeze`].
pub struct Frozen<'a> {
    _core: MutexGuard<'a, Core>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}
