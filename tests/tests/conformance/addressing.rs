//! SEQPACKET bounds, spoofed addresses, siblings, VMM reconnect and driver variants.

use super::*;

/// Message sizes; 100 000 bytes takes two tx packets (64 KiB max each) and needs a peer
/// buffer above 64 KiB, hence `tx-buffer-size=262144` in these scenarios.
const SEQ_SIZES_G2H: [usize; 5] = [1, 100, 4096, 100_000, 3];
const SEQ_SIZES_H2G: [usize; 4] = [5, 100_000, 2, 1000];

pub(super) fn seqpacket_setup(
    kind: DaemonKind,
) -> Result<Setup, vhost_plug_tests::harness::Failure> {
    Setup::with(
        kind,
        |d| vec![VmSpec::new(d, 3).tx_buffer_size(262_144)],
        &[],
    )
    .code("setup")
}

pub(super) fn seqpacket_guest_to_host(kind: DaemonKind) -> Outcome {
    with_setup(seqpacket_setup(kind)?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        ensure(
            vm.guest.seqpacket_enabled(),
            "seqpacket-not-negotiated",
            || format!("offered features {:#x}", vm.sim.offered_features()),
        )?;
        let hl = SeqpacketListener::for_port(&vm.spec.uds_path, 1400).code("host-listen")?;
        let gs = vm
            .guest
            .connect(HOST_CID, 1400, SockType::Seqpacket)
            .code("seqpacket-connect")?;
        let host = hl.accept(PROMPT).code("seqpacket-host-accept")?;
        let mut buf = vec![0u8; 128 * 1024];
        for (i, size) in SEQ_SIZES_G2H.into_iter().enumerate() {
            let data = Pattern::bytes(200 + i as u64, size);
            gs.send_msg(&data, i % 2 == 0).code("seqpacket-send")?;
            let (n, trunc) = host.recv(&mut buf, PROMPT).code("seqpacket-boundary")?;
            ensure(
                n == size && !trunc && buf[..n] == data[..],
                "seqpacket-boundary",
                || format!("message {i}: sent {size} bytes, host got {n} (truncated {trunc})"),
            )?;
        }
        for (i, size) in SEQ_SIZES_H2G.into_iter().enumerate() {
            let data = Pattern::bytes(300 + i as u64, size);
            host.send(&data).code("seqpacket-host-send")?;
            let m = gs
                .recv_msg(&mut buf)
                .code("seqpacket-boundary")?
                .ok_or_else(|| fail("seqpacket-boundary", "guest got EOF"))?;
            ensure(
                m.len == size && buf[..m.len] == data[..],
                "seqpacket-boundary",
                || format!("message {i}: host sent {size} bytes, guest got {m:?}"),
            )?;
        }
        healthy(kind, &vm.guest)
    })
}

pub(super) fn seqpacket_host_to_guest(kind: DaemonKind) -> Outcome {
    with_setup(seqpacket_setup(kind)?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        ensure(
            vm.guest.seqpacket_enabled(),
            "seqpacket-not-negotiated",
            || format!("offered features {:#x}", vm.sim.offered_features()),
        )?;
        let gl = vm
            .guest
            .listen(1401, SockType::Seqpacket)
            .code("guest-listen")?;
        let (host, assigned) =
            host_seqpacket_connect(&vm.spec.uds_path, 1401).code("no-seqpacket-host-socket")?;
        let gs = gl.accept(PROMPT).code("seqpacket-accept")?;
        ensure(gs.peer_port() == assigned, "ok-port-mismatch", || {
            format!("guest sees port {}, OK said {assigned}", gs.peer_port())
        })?;
        let mut buf = vec![0u8; 128 * 1024];
        for (i, size) in SEQ_SIZES_H2G.into_iter().enumerate() {
            let data = Pattern::bytes(400 + i as u64, size);
            host.send(&data).code("seqpacket-host-send")?;
            let m = gs
                .recv_msg(&mut buf)
                .code("seqpacket-boundary")?
                .ok_or_else(|| fail("seqpacket-boundary", "guest got EOF"))?;
            ensure(
                m.len == size && buf[..m.len] == data[..],
                "seqpacket-boundary",
                || format!("message {i}: host sent {size}, guest got {m:?}"),
            )?;
        }
        for (i, size) in SEQ_SIZES_G2H.into_iter().enumerate() {
            let data = Pattern::bytes(500 + i as u64, size);
            gs.send_msg(&data, true).code("seqpacket-send")?;
            let (n, trunc) = host.recv(&mut buf, PROMPT).code("seqpacket-boundary")?;
            ensure(
                n == size && !trunc && buf[..n] == data[..],
                "seqpacket-boundary",
                || format!("message {i}: sent {size}, host got {n} (truncated {trunc})"),
            )?;
        }
        healthy(kind, &vm.guest)
    })
}

/// Sends a raw REQUEST from `vm` and waits for an RST to `src_port`.
pub(super) fn raw_request_gets_rst(
    vm: &TestVm,
    src_cid: u64,
    src_port: u32,
    dst_cid: u64,
    dst_port: u32,
) -> anyhow::Result<bool> {
    let seq = vm.guest.log_seq();
    let mut h = vm.guest.request_header(src_port, dst_cid, dst_port);
    h.src_cid = src_cid;
    vm.guest.send_raw(&h, &[], TxLayout::Split)?;
    Ok(vm
        .guest
        .wait_packet(seq, PROMPT, |p| p.op == OP_RST && p.dst_port == src_port)
        .is_some())
}

pub(super) fn spoofed_src_cid(kind: DaemonKind) -> Outcome {
    with_setup(Setup::new(kind, &[3, 4]).code("setup")?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        let _vm4 = setup.boot(1).code("boot")?;
        let hl = host_listen(&vm.spec.uds_path, 1500).code("host-listen")?;
        // A CID nobody has, then the sibling's CID (impersonation).
        for (src_cid, src_port) in [(99u64, 2000u32), (4, 2001)] {
            let rst =
                raw_request_gets_rst(&vm, src_cid, src_port, HOST_CID, 1500).code("raw-send")?;
            let forwarded =
                wait_readable(hl.as_raw_fd(), Duration::from_millis(300)).code("host-poll")?;
            ensure(!forwarded, "spoof-src-forwarded", || {
                format!("REQUEST with src_cid {src_cid} reached the host listener")
            })?;
            ensure(rst, "spoof-src-no-rst", || {
                format!("no RST within {PROMPT:?} for a REQUEST with src_cid {src_cid}")
            })?;
        }
        Ok(())
    })
}

pub(super) fn grouped(dir: &std::path::Path) -> Vec<VmSpec> {
    vec![
        VmSpec::new(dir, 3).groups(&["a"]),
        VmSpec::new(dir, 4).groups(&["a", "c"]),
        VmSpec::new(dir, 5).groups(&["b"]),
    ]
}

pub(super) fn spoofed_dst_cid(kind: DaemonKind) -> Outcome {
    with_setup(Setup::with(kind, grouped, &[]).code("setup")?, |setup| {
        let vm3 = setup.boot(0).code("boot")?;
        let vm5 = setup.boot(2).code("boot")?;
        let _l5 = vm5
            .guest
            .listen(1600, SockType::Stream)
            .code("guest-listen")?;
        let seq5 = vm5.guest.log_seq();
        let rst = raw_request_gets_rst(&vm3, 3, 2002, 5, 1600).code("raw-send")?;
        let leaked = vm5
            .guest
            .wait_packet(seq5, Duration::from_millis(300), |p| {
                p.op == OP_REQUEST && p.src_cid == 3
            })
            .is_some();
        ensure(!leaked, "cross-group-forwarded", || {
            "a REQUEST from cid 3 (group a) reached cid 5 (group b)".into()
        })?;
        ensure(rst, "spoof-dst-no-rst", || {
            "no RST for a REQUEST to a CID outside the group".into()
        })?;
        let rst = raw_request_gets_rst(&vm3, 3, 2003, 77, 1600).code("raw-send")?;
        ensure(rst, "unknown-dst-no-rst", || {
            "no RST for a REQUEST to an unknown CID".into()
        })
    })
}

/// Echo between two guests of one group: small messages, then writes larger than the
/// receiver's rx buffers (Linux guests send up to 64 KiB per packet, post 4 KiB buffers).
pub(super) fn siblings_same_group(kind: DaemonKind) -> Outcome {
    with_setup(Setup::with(kind, grouped, &[]).code("setup")?, |setup| {
        let vm3 = setup.boot(0).code("boot")?;
        let vm4 = setup.boot(1).code("boot")?;
        let l4 = vm4
            .guest
            .listen(1700, SockType::Stream)
            .code("guest-listen")?;
        let with_violations = |mut f: vhost_plug_tests::harness::Failure| {
            f.detail.push_str(&format!(
                "\nviolations seen by cid 3: {:?}\nviolations seen by cid 4: {:?}",
                vm3.guest.violations(),
                vm4.guest.violations()
            ));
            f
        };
        thread::scope(|sc| {
            let server = sc.spawn(|| -> anyhow::Result<(u64, u64)> {
                let s = l4.accept(HOST_TIMEOUT)?;
                Ok((echo_guest(&s)?, s.peer_cid()))
            });
            let client = || -> Result<u64, vhost_plug_tests::harness::Failure> {
                let mut s = vm3
                    .guest
                    .connect(4, 1700, SockType::Stream)
                    .code("sibling-connect")?;
                s.set_timeout(PROMPT);
                let mut total = 0;
                for (i, size) in [1usize, 1000, 4000].into_iter().enumerate() {
                    let data = Pattern::bytes(600 + i as u64, size);
                    let back = exchange(&s, &data).code("sibling-echo")?;
                    ensure(back == data, "sibling-echo", || "echo differs".into())?;
                    total += size as u64;
                }
                let data = Pattern::bytes(610, 300_000);
                let back = exchange(&s, &data).code("sibling-large-packets")?;
                ensure(back == data, "sibling-large-packets", || {
                    "echo differs".into()
                })?;
                total += data.len() as u64;
                s.close().code("close")?;
                Ok(total)
            };
            let c = client();
            let server = join(server);
            let sent = c?;
            let (echoed, peer) = server.code("sibling-echo")?;
            ensure(echoed == sent && peer == 3, "sibling-echo", || {
                format!("echoed {echoed} of {sent} bytes to cid {peer}")
            })
        })
        .map_err(with_violations)?;
        healthy(kind, &vm3.guest)?;
        healthy(kind, &vm4.guest)
    })
}

/// A guest cannot connect to a guest of another group: refused at once.
pub(super) fn siblings_cross_group(kind: DaemonKind) -> Outcome {
    with_setup(Setup::with(kind, grouped, &[]).code("setup")?, |setup| {
        let vm3 = setup.boot(0).code("boot")?;
        let vm5 = setup.boot(2).code("boot")?;
        let l5 = vm5
            .guest
            .listen(1701, SockType::Stream)
            .code("guest-listen")?;
        let seq5 = vm5.guest.log_seq();
        match vm3.guest.connect_timeout(5, 1701, SockType::Stream, PROMPT) {
            Ok(_) => return Err(fail("cross-group-reachable", "cid 3 connected to cid 5")),
            Err(ConnectError::TimedOut) => {
                return Err(fail(
                    "cross-group-no-rst",
                    "connect across groups was neither refused nor answered",
                ))
            }
            Err(ConnectError::Refused) => {}
            Err(e) => return Err(fail("cross-group-connect-error", e.to_string())),
        }
        let leaked = vm5
            .guest
            .wait_packet(seq5, Duration::from_millis(100), |p| p.src_cid == 3)
            .is_some();
        ensure(
            !leaked && l5.accept(Duration::from_millis(1)).is_err(),
            "cross-group-reachable",
            || "cid 5 (group b) received a packet from cid 3 (group a)".into(),
        )?;
        healthy(kind, &vm3.guest)
    })
}

pub(super) fn vmm_disconnect_reconnect(kind: DaemonKind) -> Outcome {
    with_setup(Setup::new(kind, &[3]).code("setup")?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        let spec = vm.spec.clone();
        let gl = vm
            .guest
            .listen(1800, SockType::Stream)
            .code("guest-listen")?;
        let (mut h1, _) = host_connect(&spec.uds_path, 1800).code("host-connect")?;
        let g1 = gl.accept(PROMPT).code("accept")?;
        let hl = host_listen(&spec.uds_path, 1801).code("host-listen")?;
        let g2 = vm
            .guest
            .connect(HOST_CID, 1801, SockType::Stream)
            .code("connect")?;
        let mut h2 = accept_timeout(&hl, PROMPT).code("host-accept")?;
        // Drive traffic both ways so both connections are live in the daemon.
        h1.write_all(b"abc").code("host-write")?;
        let mut b3 = [0u8; 3];
        (&g1).read_exact(&mut b3).code("guest-read")?;
        g2.send(b"xyz").code("guest-send")?;
        h2.read_exact(&mut b3).code("host-read")?;
        // The VMM goes away without closing anything.
        let TestVm {
            mut guest, mut sim, ..
        } = vm;
        guest.stop();
        sim.disconnect();
        host_expect_eof(&mut h1, PROMPT).code("no-eof-after-disconnect")?;
        host_expect_eof(&mut h2, PROMPT).code("no-eof-after-disconnect")?;
        drop((g1, g2, gl, guest, sim));
        // A new VMM on the same socket.
        let vm = TestVm::boot(spec.clone(), SimConfig::default(), DriverConfig::default())
            .code("reconnect-failed")?;
        let gs = vm
            .guest
            .connect(HOST_CID, 1801, SockType::Stream)
            .code("serve-after-reconnect")?;
        let mut h = accept_timeout(&hl, PROMPT).code("serve-after-reconnect")?;
        gs.send(b"again").code("serve-after-reconnect")?;
        let mut b5 = [0u8; 5];
        h.read_exact(&mut b5).code("serve-after-reconnect")?;
        ensure(&b5 == b"again", "serve-after-reconnect", || {
            format!("{b5:?}")
        })?;
        let gl = vm
            .guest
            .listen(1802, SockType::Stream)
            .code("guest-listen")?;
        let (hc, _) = host_connect(&spec.uds_path, 1802).code("serve-after-reconnect")?;
        let gc = gl.accept(PROMPT).code("serve-after-reconnect")?;
        let data = Pattern::bytes(700, 100_000);
        thread::scope(|sc| {
            let e = sc.spawn(|| echo_guest(&gc));
            let back = exchange(&hc, &data);
            drop(hc);
            let echoed = e
                .join()
                .map_err(|_| fail("serve-after-reconnect", "panic"))?;
            let back = back.code("serve-after-reconnect")?;
            echoed.code("serve-after-reconnect")?;
            ensure(back == data, "serve-after-reconnect", || {
                "echo differs".into()
            })
        })?;
        healthy(kind, &vm.guest)
    })
}

pub(super) fn driver_variants(kind: DaemonKind) -> Outcome {
    let variants = [
        (
            false,
            RxLayout::Split,
            TxLayout::Split,
            QueueSet::All,
            4096u32,
        ),
        (
            true,
            RxLayout::Single,
            TxLayout::Single,
            QueueSet::All,
            4096,
        ),
        (
            false,
            RxLayout::Single,
            TxLayout::Split,
            QueueSet::RxTx,
            1024,
        ),
        (
            true,
            RxLayout::Split,
            TxLayout::Single,
            QueueSet::RxTx,
            65536,
        ),
    ];
    for (event_idx, rx, tx, queues, rx_buf) in variants {
        let name =
            format!("event_idx={event_idx} rx={rx:?} tx={tx:?} queues={queues:?} rx_buf={rx_buf}");
        let sim = SimConfig {
            event_idx,
            queues,
            queue_size: 128,
            ..SimConfig::default()
        };
        let drv = DriverConfig {
            rx_layout: rx,
            tx_layout: tx,
            rx_buf_size: rx_buf,
            ..DriverConfig::default()
        };
        with_setup(Setup::new(kind, &[3]).code("setup")?, |setup| {
            let vm = setup.boot_with(0, sim, drv).code("boot")?;
            ensure(
                vm.guest.has_event_queue() == (queues == QueueSet::All),
                "variant-failed",
                || format!("{name}: event queue ownership"),
            )?;
            let r = one_way(&vm, 5100, 1900, 8 << 20);
            r.map_err(|f| fail("variant-failed", format!("{name}: {f}")))?;
            healthy(kind, &vm.guest).map_err(|f| fail("variant-failed", format!("{name}: {f}")))
        })?;
    }
    Ok(())
}
