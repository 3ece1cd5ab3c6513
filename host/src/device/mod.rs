//! The vsock device of one VM: connection table, guest packet handling and host sockets.
//!
//! Runs on the VM's vring worker thread. Host sockets live in an epoll of their own whose fd
//! is one more event source of that worker, so one thread owns all state of a VM and no lock
//! is taken on the data path.

mod batch;
mod handover;
mod host;
mod loglimit;
mod rx;
mod tx;
mod wait;

/// The CONNECT line parser, public for the fuzz targets (`host/fuzz`).
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slab::Slab;
use tracing::{debug, info, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use crate::plugin::types::{DeviceState, EventQueueOwner, EventQueueState};
use crate::vsock::chain::ChainBuf;
use crate::vsock::header::EVENT_TRANSPORT_RESET;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::conn::{pending, Conn, ConnKey, Initiator};
use crate::gate::{Admission, Closed, Gate, Request, Target};
use crate::mem::GuestMemAtomic;
use crate::siblings::{Inbox, Registry};
use crate::stats::VmStats;
use crate::vsock::header::{Header, HOST_CID, OP_RST};

pub use crate::vsock::MAX_PKT_PAYLOAD;
/// Largest SEQPACKET message read from a host socket.
pub const MAX_SEQ_MSG: usize = 256 * 1024;
/// RST replies to packets without a connection that may wait for rx buffers.
pub const MAX_STRAY_RST: usize = 1024;
/// Host connections that may sit in the CONNECT handshake at once.
pub const MAX_HANDSHAKES: usize = 1024;

const TOKEN_LISTEN_STREAM: u64 = 1 << 63;
const TOKEN_LISTEN_SEQ: u64 = (1 << 63) | 1;
const TOKEN_SIBLING: u64 = (1 << 63) | 2;
const TOKEN_TIMER: u64 = (1 << 63) | 3;
/// `ctl conns` asks for a snapshot of the table ([`crate::connlist`]).
const TOKEN_CONNS: u64 = (1 << 63) | 4;
/// The next host connect waiting for the guest is due ([`wait`]).
const TOKEN_RETRY: u64 = (1 << 63) | 5;
/// `forward-listen` listener i has token `TOKEN_LISTEN_FWD + i`.
const TOKEN_LISTEN_FWD: u64 = (1 << 63) | (1 << 32);

/// How long a host program may take to send its CONNECT line, and a guest or sibling to
/// answer a connection request, before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Period of the handshake timer while any handshake is pending.
const TIMER_TICK: Duration = Duration::from_secs(1);

/// Static settings of a VM's device.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub guest_cid: u64,
    /// Hybrid vsock path: host programs connect here; guest connects reach `<uds_path>_<port>`.
    /// Empty with the forwarding backend.
    pub uds_path: PathBuf,
    /// The vsock forwarding backend: guest connects to the host reach AF_VSOCK
    /// (`forward.cid`, port), instead of `<uds_path>_<port>`.
    pub forward: Option<crate::config::Forward>,
    /// Our receive window per connection, advertised as `buf_alloc` (a sibling connection
    /// asks for at least [`MAX_SEQ_MSG`]).
    pub buf_alloc: u32,
    pub max_connections: usize,
    /// The daemon-wide budget every window is reserved from.
    pub budget: Arc<crate::budget::Budget>,
    /// How long a host connect the guest refuses is requested again (`connect-wait`);
    /// `None`: the host socket closes at the first refusal.
    pub connect_wait: Option<Duration>,
}

/// Host-side listening sockets of a VM; they outlive frontend sessions.
#[derive(Clone, Debug, Default)]
pub struct Listeners {
    /// The hybrid vsock sockets (`uds_path` and its `.seqpacket`), absent when forwarding.
    pub stream: Option<RawFd>,
    pub seqpacket: Option<RawFd>,
    /// `forward-listen`: one AF_VSOCK stream listener per port (fd, port).
    pub forward: Vec<(RawFd, u32)>,
}

pub struct Device {
    cfg: DeviceConfig,
    acked_features: u64,
    /// The frontend set up the event queue (crosvm style), so TRANSPORT_RESET is ours to send.
    event_queue_owned: bool,
    /// The driver has run the rings: a restore elsewhere needs a TRANSPORT_RESET.
    driver_live: bool,
    /// Restored from a state whose driver was live: send TRANSPORT_RESET once we can.
    pending_reset: bool,
    mem: Option<GuestMemAtomic>,
    epoll: Epoll,
    conns: Slab<Conn>,
    keys: HashMap<ConnKey, usize>,
    /// Connections with something for the rx queue, in service order.
    rx_list: VecDeque<usize>,
    /// RST replies to packets that match no connection.
    stray_rst: VecDeque<Header>,
    /// Guest packets are left in the tx queue until `stray_rst` has room again.
    tx_stalled: bool,
    handshakes: usize,
    next_gen: u32,
    next_port: u32,
    registry: Arc<Registry>,
    inbox: Option<Inbox>,
    listeners: Option<Listeners>,
    timer: TimerFd,
    timer_armed: bool,
    /// Host connects waiting for the guest, by when to ask again ([`wait`]); the timer
    /// exists only for a VM with `connect-wait`.
    retries: BinaryHeap<wait::Due>,
    retry_timer: Option<TimerFd>,
    gate: Option<Arc<Mutex<Gate>>>,
    stats: Option<Arc<VmStats>>,
    /// Written by `ctl conns` to have the table copied out ([`crate::connlist`]).
    conns_wake: Arc<EventFd>,
    iov: Vec<libc::iovec>,
    /// Connections handed over to another daemon (see [`Device::detach_for_handover`]).
    detached: Vec<Conn>,
    /// Rate limit of the log lines this guest's bad packets and buffers cause.
    guest_log: loglimit::LogLimit,
}

// SAFETY: the raw iovec pointers in the scratch vector are only used while a syscall runs and
// never outlive the call that filled them; everything else in `Device` is Send.
unsafe impl Send for Device {}

/// A connection's state for `ctl conns`.
fn state_name(c: &Conn) -> &'static str {
    use crate::conn::State;
    if c.pending & pending::RST != 0 {
        return "closing";
    }
    match c.state {
        State::AwaitConnectLine => "await-connect-line",
        State::Requesting(_) => "requesting",
        State::SiblingConnecting => "sibling-connecting",
        State::Connecting { .. } => "connecting",
        State::Waiting => "waiting",
        State::Established if c.guest_shut_send || c.host_eof => "half-closed",
        State::Established => "established",
    }
}

fn token(idx: usize, gen: u32) -> u64 {
    (u64::from(gen) << 32) | idx as u64
}

impl Device {
    pub fn new(cfg: DeviceConfig, registry: Arc<Registry>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TIMER),
        )?;
        let retry_timer = match cfg.connect_wait {
            Some(_) => {
                let t = TimerFd::new()?;
                epoll.ctl(
                    ControlOperation::Add,
                    t.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_RETRY),
                )?;
                Some(t)
            }
            None => None,
        };
        let conns_wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        epoll.ctl(
            ControlOperation::Add,
            conns_wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_CONNS),
        )?;
        Ok(Device {
            cfg,
            acked_features: 0,
            event_queue_owned: false,
            driver_live: false,
            pending_reset: false,
            mem: None,
            epoll,
            conns: Slab::new(),
            keys: HashMap::new(),
            rx_list: VecDeque::new(),
            stray_rst: VecDeque::new(),
            tx_stalled: false,
            handshakes: 0,
            next_gen: 1,
            next_port: 1024,
            registry,
            inbox: None,
            listeners: None,
            timer,
            timer_armed: false,
            retries: BinaryHeap::new(),
            retry_timer,
            gate: None,
            stats: None,
            conns_wake,
            iov: Vec::with_capacity(64),
            detached: Vec::new(),
            guest_log: loglimit::LogLimit::default(),
        })
    }

    /// Starts taking host and sibling connections; called once a frontend is connected, so
    /// that until then host programs wait in the listen backlog.
    pub fn attach(&mut self, listeners: Listeners, inbox: Inbox) -> std::io::Result<()> {
        let fwd = listeners
            .forward
            .iter()
            .enumerate()
            .map(|(i, (fd, _))| (*fd, TOKEN_LISTEN_FWD + i as u64));
        let fds: Vec<(RawFd, u64)> = [
            (listeners.stream, TOKEN_LISTEN_STREAM),
            (listeners.seqpacket, TOKEN_LISTEN_SEQ),
        ]
        .into_iter()
        .filter_map(|(fd, tok)| Some((fd?, tok)))
        .chain(fwd)
        .chain([(inbox.wake.as_raw_fd(), TOKEN_SIBLING)])
        .collect();
        for (fd, tok) in fds {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, tok),
            )?;
        }
        self.listeners = Some(listeners);
        self.inbox = Some(inbox);
        Ok(())
    }

    /// The fd that becomes readable when a host socket needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn guest_cid(&self) -> u64 {
        self.cfg.guest_cid
    }

    pub fn max_connections(&self) -> usize {
        self.cfg.max_connections
    }

    /// Counters the control socket and the metrics endpoint read; `ctl conns` reaches this
    /// device through them until the session ends.
    pub fn set_stats(&mut self, stats: Arc<VmStats>) {
        stats.conns.set_waker(Some(self.conns_wake.clone()));
        self.stats = Some(stats);
    }

    pub fn stats(&self) -> Option<Arc<VmStats>> {
        self.stats.clone()
    }

    /// A connection entered the table (keyed): counted by who opened it.
    fn note_opened(&self, who: Initiator) {
        if let Some(s) = &self.stats {
            s.counters.opened(who);
        }
    }

    /// The span entered while handling a connection. Fields are from the guest's side:
    /// `local_port` is the guest's port, `peer_cid`/`peer_port` the other end. At INFO, so
    /// a filter quieter than that (`VHOST_PLUG_LOG=warn`) makes it `Span::none()`, which costs
    /// nothing to enter. The ports of a host connection still reading its CONNECT line are
    /// recorded once known.
    fn conn_span(&self, c: &Conn) -> Arc<tracing::Span> {
        let span = tracing::info_span!(
            "conn",
            vm = self.cfg.guest_cid,
            local_port = tracing::field::Empty,
            peer_cid = c.key.local_cid,
            peer_port = tracing::field::Empty,
        );
        if c.state != crate::conn::State::AwaitConnectLine {
            span.record("local_port", c.key.peer_port);
            span.record("peer_port", c.key.local_port);
        }
        Arc::new(span)
    }

    /// Copies the table (at most [`crate::connlist::MAX_ROWS`] rows) for `ctl conns`.
    fn publish_conns(&mut self) {
        let _ = self.conns_wake.read();
        let Some(stats) = &self.stats else { return };
        if !stats.conns.wanted() {
            return;
        }
        let rows = self
            .conns
            .iter()
            .take(crate::connlist::MAX_ROWS)
            .map(|(_, c)| crate::connlist::ConnRow {
                vm: self.cfg.guest_cid,
                local_port: c.key.peer_port,
                peer_cid: c.key.local_cid,
                peer_port: c.key.local_port,
                kind: match c.kind {
                    crate::vsock::header::SockType::Stream => "stream",
                    crate::vsock::header::SockType::Seqpacket => "seqpacket",
                }
                .into(),
                direction: c.initiator.as_str().into(),
                state: state_name(c).into(),
                bytes_from_guest: c.bytes_from_guest,
                bytes_to_guest: c.bytes_to_guest,
                peer_buf_alloc: c.peer_buf_alloc,
                peer_fwd_cnt: c.peer_fwd_cnt,
                peer_credit: c.peer_credit(),
                tx_buffered: c.buf.len() + c.partial_msg.len(),
            })
            .collect();
        stats.conns.publish(rows, self.conns.len());
    }

    fn publish_count(&self) {
        if let Some(s) = &self.stats {
            s.connections
                .store(self.keys.len(), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Puts every new connection to `gate` (policy and bridge plugins).
    pub fn set_gate(&mut self, gate: Arc<Mutex<Gate>>) {
        self.gate = Some(gate);
    }

    /// Asks the gate about a new connection; without one, everything is admitted as is.
    fn admit(&self, r: Request) -> Admission {
        match &self.gate {
            None => Admission::Admit {
                id: 0,
                target: Target::Default,
            },
            Some(g) => match g.lock() {
                Ok(mut g) => g.admit(r),
                Err(_) => Admission::Refuse("plugin gate unavailable".into()),
            },
        }
    }

    /// The guest memory the device works on, once the frontend sent a table.
    pub fn memory(&self) -> Option<&GuestMemAtomic> {
        self.mem.as_ref()
    }

    pub fn set_memory(&mut self, mem: GuestMemAtomic) {
        self.mem = Some(mem);
    }

    /// Records the features the driver acked.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
        self.publish_facts();
    }

    /// Lets `ctl save` see what a SAVE would record about the device.
    fn publish_facts(&self) {
        if let Some(s) = &self.stats {
            let st = self.snapshot();
            let r = std::sync::atomic::Ordering::Relaxed;
            s.facts.acked_features.store(st.acked_features, r);
            s.facts
                .event_queue_owned
                .store(st.event_queue.owner == EventQueueOwner::Backend, r);
            s.facts.driver_live.store(st.event_queue.driver_live, r);
        }
    }

    /// Whether the driver acked SEQPACKET sockets.
    fn seqpacket(&self) -> bool {
        self.acked_features & (1 << crate::vsock::header::F_SEQPACKET) != 0
    }

    /// Notes which rings the frontend has running: event-queue ownership and driver liveness
    /// are part of the saved state. The driver counts as live once it has posted rx buffers
    /// (rings the frontend started for a driver that never got that far do not count).
    pub fn note_rings(
        &mut self,
        rx: &VringRwLock<GuestMemAtomic>,
        evq: Option<&VringRwLock<GuestMemAtomic>>,
    ) {
        // Both facts only ever turn true: once known, the rings are not looked at again.
        let before = (self.event_queue_owned, self.driver_live);
        if let (false, Some(evq)) = (self.event_queue_owned, evq) {
            self.event_queue_owned = evq.get_ref().get_queue().ready();
        }
        if !self.driver_live {
            let Some(atomic) = &self.mem else { return };
            let mem = atomic.memory();
            let state = rx.get_ref();
            let q = state.get_queue();
            if q.ready() {
                let posted = q
                    .avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                    .map(|i| i.0 != 0)
                    .unwrap_or(false);
                self.driver_live = posted || q.next_avail() != 0;
            }
        }
        if before != (self.event_queue_owned, self.driver_live) {
            self.publish_facts();
        }
    }

    /// The device part of a saved state (migration to another host: no connections).
    pub fn snapshot(&self) -> DeviceState {
        DeviceState {
            guest_cid: self.cfg.guest_cid,
            acked_features: self.acked_features,
            event_queue: EventQueueState {
                owner: if self.event_queue_owned {
                    EventQueueOwner::Backend
                } else {
                    EventQueueOwner::Frontend
                },
                // A restored live driver still owed its reset counts as live.
                driver_live: self.driver_live || self.pending_reset,
            },
            plugins: Vec::new(),
            connections: Vec::new(),
        }
    }

    /// The state for a same-host handover SAVE: the snapshot plus the connection table, and
    /// the sockets to send along (the connections leave service here).
    pub fn handover_snapshot(&mut self) -> (DeviceState, Vec<std::os::fd::OwnedFd>) {
        let mut st = self.snapshot();
        let (conns, fds) = self.detach_for_handover();
        st.connections = conns;
        (st, fds)
    }

    /// Applies a loaded (and already checked) state. `handed_over` holds the sockets of a
    /// same-host handover: the connections carry on and no TRANSPORT_RESET is due; without
    /// it this is a migration from another host.
    pub fn restore(&mut self, st: &DeviceState, handed_over: Option<Vec<std::os::fd::OwnedFd>>) {
        self.driver_live = false;
        match handed_over {
            Some(fds) => {
                self.pending_reset = false;
                self.adopt_connections(&st.connections, fds);
            }
            None => self.pending_reset = st.event_queue.driver_live,
        }
        self.publish_facts();
        debug!(
            cid = self.cfg.guest_cid,
            reset = self.pending_reset,
            "device state restored"
        );
    }

    /// After a restore, tells the driver to drop its connections and re-read its CID, if we
    /// own the event queue and it has a buffer.
    pub fn transport_reset(&mut self, evq: &VringRwLock<GuestMemAtomic>) {
        if !self.pending_reset {
            return;
        }
        let Some(atomic) = self.mem.clone() else {
            return;
        };
        let mem = atomic.memory();
        let mut vr = evq.get_mut();
        if !vr.get_queue().ready() || !vr.is_enabled() {
            return;
        }
        let Some(chain) = vr.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
            let _ = vr.enable_notification();
            return;
        };
        let head = chain.head_index();
        let used = match ChainBuf::new(&mem, chain, true, 4) {
            Ok(b) if b.len() == 4 => {
                b.write_at(0, &EVENT_TRANSPORT_RESET.to_le_bytes());
                4
            }
            _ => {
                if self.guest_log() {
                    warn!(cid = self.cfg.guest_cid, "unusable event queue buffer");
                }
                0
            }
        };
        if let Err(e) = vr.add_used(head, used) {
            warn!(error = %e, "event queue: add_used failed");
        }
        if vr.needs_notification().unwrap_or(true) {
            let _ = vr.signal_used_queue();
        }
        if used == 4 {
            info!(cid = self.cfg.guest_cid, "sent TRANSPORT_RESET");
            self.pending_reset = false;
            self.drop_all();
        }
    }

    /// Drops every connection without telling the guest (device reset or frontend gone):
    /// host peers see their sockets close.
    pub fn drop_all(&mut self) {
        let n = self.conns.len();
        for c in self.conns.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.fd.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.keys.clear();
        self.publish_count();
        self.rx_list.clear();
        self.stray_rst.clear();
        self.tx_stalled = false;
        self.handshakes = 0;
        self.retries.clear();
        self.forget_detached();
        if n > 0 {
            debug!(cid = self.cfg.guest_cid, n, "dropped all connections");
        }
    }

    fn insert(&mut self, mut conn: Conn, keyed: bool) -> std::io::Result<usize> {
        conn.span = self.conn_span(&conn);
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        conn.gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        self.epoll.ctl(
            ControlOperation::Add,
            conn.fd.as_raw_fd(),
            EpollEvent::new(
                EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
                token(idx, conn.gen),
            ),
        )?;
        if keyed {
            self.keys.insert(conn.key, idx);
        }
        let handshake = conn.in_handshake();
        let who = conn.initiator;
        let afvsock = conn.afvsock;
        entry.insert(conn);
        if keyed {
            self.publish_count();
            self.note_opened(who);
            if let (true, Some(s)) = (afvsock, &self.stats) {
                s.counters.afvsock_opened(who != Initiator::Host);
            }
        }
        if handshake {
            self.arm_timer();
        }
        Ok(idx)
    }

    fn remove(&mut self, idx: usize) {
        if let Some(c) = self.conns.try_remove(idx) {
            debug!(
                parent: &*c.span,
                bytes_from_guest = c.bytes_from_guest,
                bytes_to_guest = c.bytes_to_guest,
                reset = c.was_reset,
                "connection closed"
            );
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.fd.as_raw_fd(),
                EpollEvent::default(),
            );
            if self.keys.get(&c.key) == Some(&idx) {
                self.keys.remove(&c.key);
                self.publish_count();
            }
            if c.holds_handshake() {
                self.handshakes -= 1;
            }
            if let (true, Some(s)) = (c.afvsock, &self.stats) {
                s.counters
                    .afvsock_closed(c.bytes_from_guest, c.bytes_to_guest);
            }
            if c.id != 0 {
                if let Some(Ok(mut g)) = self.gate.as_ref().map(|g| g.lock()) {
                    g.closed(
                        c.id,
                        &Closed {
                            bytes_to_guest: c.bytes_to_guest,
                            bytes_from_guest: c.bytes_from_guest,
                            opened: c.opened,
                            reset: c.was_reset,
                        },
                    );
                }
            }
        }
    }

    /// Tells the policy that admitted connection `id` never opened.
    fn never_opened(&self, id: u64) {
        if let Some(Ok(mut g)) = self.gate.as_ref().map(|g| g.lock()) {
            g.never_opened(id);
        }
    }

    /// Puts a connection on the rx work list if it has something to send.
    fn wake_rx(&mut self, idx: usize) {
        if let Some(c) = self.conns.get_mut(idx) {
            if !c.in_rx_list && c.wants_rx() {
                c.in_rx_list = true;
                self.rx_list.push_back(idx);
            }
        }
    }

    /// Aborts a connection: RST to the guest, host socket closed once that is sent.
    fn reset(&mut self, idx: usize, why: &str) {
        if let Some(c) = self.conns.get_mut(idx) {
            debug!(cid = self.cfg.guest_cid, key = ?c.key, why, "reset connection");
            c.pending = pending::RST;
            c.was_reset = true;
            c.buf.clear();
            c.partial_msg = Vec::new();
            c.out_msg = Vec::new();
            c.out_off = 0;
            let _ = crate::sys::shutdown(c.fd.as_raw_fd(), std::net::Shutdown::Both);
            self.wake_rx(idx);
        }
    }

    /// Whether a line about the guest's misbehaviour may be logged now ([`loglimit`]). Before
    /// the first line after a pause it logs how many were left out.
    fn guest_log(&mut self) -> bool {
        match self.guest_log.check(std::time::Instant::now()) {
            loglimit::Verdict::Drop => false,
            loglimit::Verdict::Log { suppressed: 0 } => true,
            loglimit::Verdict::Log { suppressed } => {
                warn!(
                    cid = self.cfg.guest_cid,
                    suppressed, "left out log lines about this guest's bad packets (rate limit)"
                );
                true
            }
        }
    }

    /// Answers a guest packet that has no connection with RST.
    fn reply_rst(&mut self, h: &Header, why: &str) {
        if self.guest_log() {
            warn!(
                cid = self.cfg.guest_cid,
                src_cid = h.src_cid,
                src_port = h.src_port,
                dst_cid = h.dst_cid,
                dst_port = h.dst_port,
                op = h.op,
                why,
                "rejecting guest packet"
            );
        }
        if h.op == OP_RST {
            return;
        }
        self.stray_rst.push_back(Header {
            src_cid: h.dst_cid,
            dst_cid: self.cfg.guest_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            type_: h.type_,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
        if self.stray_rst.len() >= MAX_STRAY_RST {
            self.tx_stalled = true;
        }
    }

    /// A free local port for a host-initiated connection to guest port `peer_port`.
    fn alloc_host_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = if p == u32::MAX - 1 { 1024 } else { p + 1 };
            let key = ConnKey {
                local_cid: HOST_CID,
                local_port: p,
                peer_port,
            };
            if !self.keys.contains_key(&key) {
                return p;
            }
        }
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed {
            match self.timer.reset(TIMER_TICK, Some(TIMER_TICK)) {
                Ok(()) => self.timer_armed = true,
                Err(e) => warn!(error = %e, "cannot arm handshake timer"),
            }
        }
    }

    /// Drops handshakes that took longer than [`HANDSHAKE_TIMEOUT`]; disarms the timer
    /// when none is left.
    fn expire_handshakes(&mut self) {
        let _ = self.timer.wait();
        let mut expired = Vec::new();
        let mut pending = false;
        for (idx, c) in self.conns.iter() {
            if c.in_handshake() {
                if c.since.elapsed() >= HANDSHAKE_TIMEOUT {
                    expired.push((idx, c.state));
                } else {
                    pending = true;
                }
            }
        }
        for (idx, state) in expired {
            let span = self.conns[idx].span.clone();
            let _entered = span.enter();
            warn!(cid = self.cfg.guest_cid, ?state, "handshake timed out");
            match state {
                // Nothing was told to the guest yet.
                crate::conn::State::AwaitConnectLine => self.remove(idx),
                _ => self.reset(idx, "handshake timed out"),
            }
        }
        if !pending && self.timer.clear().is_ok() {
            self.timer_armed = false;
        }
    }

    /// Reserves the receive window of a connection about to be offered to the guest. A
    /// connection to or from a sibling VM asks for enough to take a whole SEQPACKET message
    /// of [`MAX_SEQ_MSG`] (Linux guests refuse to send a message larger than `buf_alloc`).
    fn window_for(&self, sibling: bool) -> crate::budget::Window {
        let want = if sibling {
            self.cfg.buf_alloc.max(MAX_SEQ_MSG as u32)
        } else {
            self.cfg.buf_alloc
        };
        crate::budget::Window::reserve(&self.cfg.budget, want)
    }

    fn at_capacity(&self) -> bool {
        self.conns.len() >= self.cfg.max_connections
    }
}
