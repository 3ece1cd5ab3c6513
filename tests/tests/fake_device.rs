//! The guest driver against an in-process fake device (device side of `virtio-queue`), so
//! that its protocol handling is checked without any daemon: handshake, credit updates,
//! credit overruns, RST handling, SEQPACKET fragmentation, TRANSPORT_RESET and blank rx
//! buffers, for every descriptor layout with and without EVENT_IDX.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vhost_plug_tests::driver::{EndReason, GuestParts, QueueParts};
use vhost_plug_tests::mem::GuestMem;
use vhost_plug_tests::packet::*;
use vhost_plug_tests::ring::RingAddrs;
use vhost_plug_tests::{ConnectError, DriverConfig, Guest, RxLayout, SockType, TxLayout};

const WAIT: Duration = Duration::from_secs(5);
const GUEST_CID: u64 = 3;

/// The device side of the three queues.
struct FakeDevice {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    calls: Vec<EventFd>,
}

impl FakeDevice {
    fn signal(&mut self, idx: usize) -> Result<()> {
        let q = &mut self.queues[idx];
        if !q.event_idx_enabled() || q.needs_notification(&self.mem)? {
            self.calls[idx].write(1)?;
        }
        Ok(())
    }

    /// Next packet the driver put on tx: (header, payload).
    fn pop_tx(&mut self) -> Result<(PacketHeader, Vec<u8>)> {
        let deadline = Instant::now() + WAIT;
        loop {
            let chain = self.queues[1].pop_descriptor_chain(&self.mem);
            if let Some(chain) = chain {
                let head = chain.head_index();
                let mut bytes = Vec::new();
                for d in chain {
                    if d.is_write_only() {
                        bail!("device-writable descriptor in a tx chain");
                    }
                    let mut b = vec![0u8; d.len() as usize];
                    self.mem.read_slice(&mut b, d.addr())?;
                    bytes.extend_from_slice(&b);
                }
                self.queues[1].add_used(&self.mem, head, 0)?;
                self.signal(1)?;
                let hdr_bytes: [u8; HDR_LEN] = bytes
                    .get(..HDR_LEN)
                    .context("tx chain shorter than a header")?
                    .try_into()?;
                let hdr = PacketHeader::from_bytes(&hdr_bytes);
                let data = bytes
                    .get(HDR_LEN..HDR_LEN + hdr.len as usize)
                    .context("tx chain shorter than header.len")?
                    .to_vec();
                return Ok((hdr, data));
            }
            if Instant::now() > deadline {
                bail!("the driver sent nothing within {WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Pops tx packets until one matches `op`, skipping control packets of other kinds.
    fn pop_op(&mut self, op: u16) -> Result<(PacketHeader, Vec<u8>)> {
        for _ in 0..64 {
            let (h, d) = self.pop_tx()?;
            if h.op == op {
                return Ok((h, d));
            }
        }
        bail!("no {} among 64 packets", op_name(op))
    }

    /// Writes `bytes` into the next buffer of queue `idx` and returns it as used with
    /// `used_len` (defaults to the bytes written).
    fn fill(&mut self, idx: usize, bytes: &[u8], used_len: Option<u32>) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        let chain = loop {
            if let Some(c) = self.queues[idx].pop_descriptor_chain(&self.mem) {
                break c;
            }
            if Instant::now() > deadline {
                bail!("no buffer posted on queue {idx}");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let head = chain.head_index();
        let mut off = 0;
        for d in chain {
            if !d.is_write_only() {
                bail!("device-readable descriptor in queue {idx}");
            }
            let n = (d.len() as usize).min(bytes.len() - off);
            self.mem.write_slice(&bytes[off..off + n], d.addr())?;
            off += n;
        }
        if off < bytes.len() {
            bail!("buffer too small: {} of {} bytes", off, bytes.len());
        }
        let len = used_len.unwrap_or(bytes.len() as u32);
        self.queues[idx].add_used(&self.mem, head, len)?;
        self.signal(idx)
    }

    fn push_rx(&mut self, hdr: PacketHeader, data: &[u8]) -> Result<()> {
        let hdr = PacketHeader {
            len: data.len() as u32,
            ..hdr
        };
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        self.fill(0, &bytes, None)
    }
}

struct Rig {
    dev: FakeDevice,
    guest: Guest,
    cid: Arc<AtomicU64>,
}

fn rig(event_idx: bool, rx: RxLayout, tx: TxLayout, cfg: DriverConfig) -> Result<Rig> {
    let mut mem = GuestMem::new(32 << 20)?;
    let mut parts = Vec::new();
    let mut queues = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..3 {
        let addrs = RingAddrs::alloc(&mut mem, 64)?;
        let mut q = Queue::new(64).map_err(|e| anyhow!("{e:?}"))?;
        q.try_set_desc_table_address(addrs.desc)
            .map_err(|e| anyhow!("{e:?}"))?;
        q.try_set_avail_ring_address(addrs.avail)
            .map_err(|e| anyhow!("{e:?}"))?;
        q.try_set_used_ring_address(addrs.used)
            .map_err(|e| anyhow!("{e:?}"))?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        calls.push(call.try_clone()?);
        queues.push(q);
        parts.push(QueueParts { addrs, kick, call });
    }
    let cid = Arc::new(AtomicU64::new(GUEST_CID));
    let c2 = cid.clone();
    let mut it = parts.into_iter();
    let (Some(rxq), Some(txq), Some(evq)) = (it.next(), it.next(), it.next()) else {
        bail!("three queues");
    };
    let gp = GuestParts {
        rx: rxq,
        tx: txq,
        evt: Some(evq),
        event_idx,
        seqpacket: true,
        cid: GUEST_CID,
        cid_source: Some(Box::new(move || Ok(c2.load(Ordering::SeqCst)))),
    };
    let cfg = DriverConfig {
        rx_layout: rx,
        tx_layout: tx,
        ..cfg
    };
    let guest = Guest::start_with(&mut mem, gp, cfg)?;
    let dev = FakeDevice {
        mem: mem.memory().clone(),
        queues,
        calls,
    };
    Ok(Rig { dev, guest, cid })
}

fn host_hdr(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: HOST_CID,
        dst_cid: GUEST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 65536,
        ..Default::default()
    }
}

/// Guest connects to 2:1234; the device accepts. Returns the guest's port.
fn establish(r: &mut Rig, ty: SockType) -> Result<vhost_plug_tests::GuestSocket> {
    std::thread::scope(|sc| {
        let g = &r.guest;
        let conn = sc.spawn(move || g.connect(HOST_CID, 1234, ty));
        let (req, _) = r.dev.pop_tx()?;
        if req.op != OP_REQUEST
            || req.src_cid != GUEST_CID
            || req.dst_cid != HOST_CID
            || req.dst_port != 1234
            || req.type_ != ty_wire(ty)
        {
            bail!("unexpected request {req:?}");
        }
        let mut resp = host_hdr(OP_RESPONSE, 1234, req.src_port);
        resp.type_ = ty_wire(ty);
        r.dev.push_rx(resp, &[])?;
        conn.join()
            .map_err(|_| anyhow!("connect thread panicked"))?
            .map_err(|e| anyhow!("{e}"))
    })
}

fn ty_wire(ty: SockType) -> u16 {
    match ty {
        SockType::Stream => TYPE_STREAM,
        SockType::Seqpacket => TYPE_SEQPACKET,
    }
}

fn variants() -> Vec<(bool, RxLayout, TxLayout)> {
    let mut v = Vec::new();
    for ei in [false, true] {
        for rx in [RxLayout::Split, RxLayout::Single] {
            for tx in [TxLayout::Split, TxLayout::Single] {
                v.push((ei, rx, tx));
            }
        }
    }
    v
}

fn small_window() -> DriverConfig {
    DriverConfig {
        buf_alloc: 16384,
        credit_update_threshold: 8192,
        rx_buf_size: 4096,
        ..DriverConfig::default()
    }
}

fn stream_credit_cycle(ei: bool, rx: RxLayout, tx: TxLayout) -> Result<()> {
    let mut r = rig(ei, rx, tx, small_window())?;
    let s = establish(&mut r, SockType::Stream)?;
    let port = s.local_port();
    // Guest -> device data.
    s.send(&[7u8; 100])?;
    let (h, d) = r.dev.pop_op(OP_RW)?;
    if h.len != 100 || d != [7u8; 100] || h.buf_alloc != 16384 {
        bail!("bad RW {h:?}");
    }
    // Device fills the whole 16 KiB window.
    for i in 0..4u8 {
        r.dev.push_rx(host_hdr(OP_RW, 1234, port), &[i; 4096])?;
    }
    // Let all four arrive before reading, so one read frees the whole window.
    let deadline = Instant::now() + WAIT;
    while s.credit_info().context("socket gone")?.rx_bytes != 16384 {
        if Instant::now() > deadline {
            bail!("rx data not queued");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut buf = vec![0u8; 16384];
    let mut got = 0;
    while got < buf.len() {
        let n = s.recv(&mut buf[got..])?;
        if n == 0 {
            bail!("EOF");
        }
        got += n;
    }
    if buf[4096] != 1 || buf[16383] != 3 {
        bail!("payload order");
    }
    // The peer now believes 0 bytes are free: the driver must advertise.
    let (cu, _) = r.dev.pop_op(OP_CREDIT_UPDATE)?;
    if cu.fwd_cnt != 16384 || cu.buf_alloc != 16384 || cu.dst_port != 1234 {
        bail!("bad credit update {cu:?}");
    }
    // CREDIT_REQUEST is answered.
    r.dev
        .push_rx(host_hdr(OP_CREDIT_REQUEST, 1234, port), &[])?;
    let (cu, _) = r.dev.pop_op(OP_CREDIT_UPDATE)?;
    if cu.fwd_cnt != 16384 {
        bail!("bad credit update {cu:?}");
    }
    if let Err(e) = r.guest.health() {
        bail!("unexpected violation: {e:#}");
    }
    // Overrun: 16 KiB window, device sends 20 KiB without reading.
    for _ in 0..5 {
        r.dev.push_rx(host_hdr(OP_RW, 1234, port), &[9u8; 4096])?;
    }
    let deadline = Instant::now() + WAIT;
    while r.guest.health().is_ok() {
        if Instant::now() > deadline {
            bail!("credit overrun not detected");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let v = r.guest.violations();
    if !v.iter().any(|m| m.contains("credit overrun")) {
        bail!("violations {v:?}");
    }
    // Peer credit limits what the guest sends: device advertised 65536 with fwd_cnt 0 and
    // 100 bytes are in flight.
    let info = s.credit_info().context("socket gone")?;
    if info.peer_buf_alloc != 65536 || info.tx_cnt != 100 {
        bail!("credit info {info:?}");
    }
    Ok(())
}

#[test]
fn stream_handshake_data_and_credit_all_layouts() {
    for (ei, rx, tx) in variants() {
        stream_credit_cycle(ei, rx, tx)
            .unwrap_or_else(|e| panic!("event_idx={ei} rx={rx:?} tx={tx:?}: {e:#}"));
    }
}

#[test]
fn refused_connect_and_rst_for_unknown_socket() {
    let mut r = rig(
        true,
        RxLayout::Split,
        TxLayout::Split,
        DriverConfig::default(),
    )
    .unwrap();
    std::thread::scope(|sc| {
        let g = &r.guest;
        let conn = sc.spawn(move || g.connect(HOST_CID, 99, SockType::Stream));
        let (req, _) = r.dev.pop_tx().unwrap();
        r.dev
            .push_rx(host_hdr(OP_RST, 99, req.src_port), &[])
            .unwrap();
        assert_eq!(conn.join().unwrap().err(), Some(ConnectError::Refused));
    });
    // Data for a socket that does not exist is answered with RST.
    r.dev
        .push_rx(host_hdr(OP_RW, 555, 40000), b"stray")
        .unwrap();
    let (rst, _) = r.dev.pop_op(OP_RST).unwrap();
    assert_eq!(
        (rst.src_port, rst.dst_port, rst.dst_cid),
        (40000, 555, HOST_CID)
    );
    // A REQUEST to a port nobody listens on, too.
    r.dev.push_rx(host_hdr(OP_REQUEST, 556, 7000), &[]).unwrap();
    let (rst, _) = r.dev.pop_op(OP_RST).unwrap();
    assert_eq!(rst.dst_port, 556);
    r.guest.health().unwrap();
}

#[test]
fn listen_accept_and_peer_shutdown() {
    let mut r = rig(
        false,
        RxLayout::Single,
        TxLayout::Split,
        DriverConfig::default(),
    )
    .unwrap();
    let l = r.guest.listen(7000, SockType::Stream).unwrap();
    r.dev
        .push_rx(host_hdr(OP_REQUEST, 1025, 7000), &[])
        .unwrap();
    let (resp, _) = r.dev.pop_op(OP_RESPONSE).unwrap();
    assert_eq!((resp.src_port, resp.dst_port), (7000, 1025));
    let s = l.accept(WAIT).unwrap();
    assert_eq!((s.peer_cid(), s.peer_port()), (HOST_CID, 1025));
    r.dev.push_rx(host_hdr(OP_RW, 1025, 7000), b"abc").unwrap();
    let mut sd = host_hdr(OP_SHUTDOWN, 1025, 7000);
    sd.flags = SHUTDOWN_SEND;
    r.dev.push_rx(sd, &[]).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(s.recv(&mut b).unwrap(), 3);
    assert_eq!(s.recv(&mut b).unwrap(), 0, "EOF after SHUTDOWN(SEND)");
    // Half-closed: the guest may still send.
    s.send(b"xy").unwrap();
    let (rw, d) = r.dev.pop_op(OP_RW).unwrap();
    assert_eq!((rw.len, d.as_slice()), (2, &b"xy"[..]));
    // Graceful close: SHUTDOWN(both), then RST from the device completes it.
    s.close().unwrap();
    let (sd, _) = r.dev.pop_op(OP_SHUTDOWN).unwrap();
    assert_eq!(sd.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    r.dev.push_rx(host_hdr(OP_RST, 1025, 7000), &[]).unwrap();
    let deadline = Instant::now() + WAIT;
    while r.guest.socket_count() != 0 {
        assert!(Instant::now() < deadline, "socket not released");
        std::thread::sleep(Duration::from_millis(2));
    }
    r.guest.health().unwrap();
}

#[test]
fn seqpacket_fragments_and_reassembly() {
    let cfg = DriverConfig {
        max_pkt: 65536,
        ..DriverConfig::default()
    };
    let mut r = rig(true, RxLayout::Split, TxLayout::Split, cfg).unwrap();
    let s = establish(&mut r, SockType::Seqpacket).unwrap();
    let port = s.local_port();
    // Device advertised 65536: a larger message is refused like Linux (EMSGSIZE).
    let e = s.send_msg(&[1u8; 70000], false).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
    // Give more credit, then a 70000-byte message goes as 65536 + 4464 with EOM|EOR last.
    let mut cu = host_hdr(OP_CREDIT_UPDATE, 1234, port);
    cu.type_ = TYPE_SEQPACKET;
    cu.buf_alloc = 1 << 20;
    r.dev.push_rx(cu, &[]).unwrap();
    let deadline = Instant::now() + WAIT;
    while s.credit_info().unwrap().peer_buf_alloc != 1 << 20 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    s.send_msg(&[5u8; 70000], true).unwrap();
    let (a, _) = r.dev.pop_op(OP_RW).unwrap();
    let (b, _) = r.dev.pop_op(OP_RW).unwrap();
    assert_eq!((a.len, a.flags), (65536, 0));
    assert_eq!((b.len, b.flags), (4464, SEQ_EOM | SEQ_EOR));
    // Device -> guest: three fragments form one message; a short buffer truncates.
    let mut frag = host_hdr(OP_RW, 1234, port);
    frag.type_ = TYPE_SEQPACKET;
    r.dev.push_rx(frag, &[1u8; 4000]).unwrap();
    r.dev.push_rx(frag, &[2u8; 4000]).unwrap();
    r.dev
        .push_rx(
            PacketHeader {
                flags: SEQ_EOM,
                ..frag
            },
            &[3u8; 10],
        )
        .unwrap();
    r.dev
        .push_rx(
            PacketHeader {
                flags: SEQ_EOM | SEQ_EOR,
                ..frag
            },
            b"next",
        )
        .unwrap();
    let mut buf = vec![0u8; 5000];
    let m = s.recv_msg(&mut buf).unwrap().unwrap();
    assert_eq!(
        (m.len, m.copied, m.truncated, m.eor),
        (8010, 5000, true, false)
    );
    assert_eq!(buf[3999..4001], [1, 2]);
    let m = s.recv_msg(&mut buf).unwrap().unwrap();
    assert_eq!((m.len, m.eor, &buf[..4]), (4, true, &b"next"[..]));
    r.guest.health().unwrap();
}

#[test]
fn transport_reset_event_drops_connections_and_rereads_cid() {
    let mut r = rig(
        true,
        RxLayout::Split,
        TxLayout::Split,
        DriverConfig::default(),
    )
    .unwrap();
    let s = establish(&mut r, SockType::Stream).unwrap();
    r.cid.store(42, Ordering::SeqCst);
    r.dev
        .fill(2, &EVENT_TRANSPORT_RESET.to_le_bytes(), None)
        .unwrap();
    assert!(r.guest.wait_events(0, WAIT));
    assert_eq!(r.guest.events(), vec![EVENT_TRANSPORT_RESET]);
    assert_eq!(r.guest.guest_cid(), 42);
    assert_eq!(s.end_reason(), Some(EndReason::TransportReset));
    let e = s.recv(&mut [0u8; 4]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    // The event buffer was re-posted: a second event arrives too.
    r.dev
        .fill(2, &EVENT_TRANSPORT_RESET.to_le_bytes(), None)
        .unwrap();
    assert!(r.guest.wait_events(1, WAIT));
    r.guest.health().unwrap();
}

#[test]
fn blank_rx_buffer_and_bad_lengths_are_reported() {
    let mut r = rig(
        false,
        RxLayout::Split,
        TxLayout::Split,
        DriverConfig::default(),
    )
    .unwrap();
    // Used without writing anything (the header was zeroed when posted).
    r.dev.fill(0, &[], Some(HDR_LEN as u32)).unwrap();
    let deadline = Instant::now() + WAIT;
    while r.guest.stats().blank_rx == 0 {
        assert!(Instant::now() < deadline, "blank buffer not seen");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(r.guest.health().is_err());
    assert!(r.guest.health_tolerating_blank_rx().is_ok());
    // A header claiming more payload than the used length covers.
    let mut h = host_hdr(OP_RW, 1, 2);
    h.len = 100;
    r.dev.fill(0, &h.to_bytes(), Some(HDR_LEN as u32)).unwrap();
    let deadline = Instant::now() + WAIT;
    while r.guest.violations().is_empty() {
        assert!(Instant::now() < deadline, "short used len not reported");
        std::thread::sleep(Duration::from_millis(2));
    }
    // A packet for another CID.
    let mut h = host_hdr(OP_RW, 1, 2);
    h.dst_cid = 9;
    r.dev.push_rx(h, b"x").unwrap();
    let deadline = Instant::now() + WAIT;
    while !r.guest.violations().iter().any(|v| v.contains("for cid 9")) {
        assert!(Instant::now() < deadline, "foreign cid not reported");
        std::thread::sleep(Duration::from_millis(2));
    }
}
