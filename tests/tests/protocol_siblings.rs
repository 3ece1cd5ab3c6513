//! The op-by-op protocol table of docs/architecture.md ("Protocol conformance"), guest <->
//! sibling guest path: two simulated VMs in one group of one vhost-plug daemon. The real-guest
//! versions of these cases (Linux 6.1 and 6.12 guests) are in tests/tests/guest_qemu*.rs.

use std::io::{ErrorKind, Read};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vhost_plug_tests::driver::{Direction, LoggedPacket};
use vhost_plug_tests::harness::{Setup, TestVm};
use vhost_plug_tests::packet::*;
use vhost_plug_tests::{ConnectError, DaemonKind, DriverConfig, SimConfig, SockType};
use vhost_plug_tests::{GuestSocket, VmSpec};

const PROMPT: Duration = Duration::from_secs(5);

/// Two VMs (CIDs 3 and 4) in one group; `tx` sets both VMs' tx-buffer-size.
fn siblings(tx: Option<u32>) -> Result<Setup> {
    Setup::with(
        DaemonKind::VhostPlug,
        |d| {
            [3, 4]
                .into_iter()
                .map(|cid| {
                    let v = VmSpec::new(d, cid).groups(&["g"]);
                    match tx {
                        Some(n) => v.tx_buffer_size(n),
                        None => v,
                    }
                })
                .collect()
        },
        &[],
    )
}

/// Boots both VMs; the guest of VM 4 posts rx buffers of `rx_buf` bytes.
fn boot(s: &Setup, rx_buf: u32) -> Result<(TestVm, TestVm)> {
    let a = s.boot(0)?;
    let drv = DriverConfig {
        rx_buf_size: rx_buf,
        ..DriverConfig::default()
    };
    let b = s.boot_with(1, SimConfig::default(), drv)?;
    Ok((a, b))
}

/// A connection from VM 3's guest to VM 4's guest on `port`: (VM 3's end, VM 4's end).
fn connect(a: &TestVm, b: &TestVm, port: u32, ty: SockType) -> Result<(GuestSocket, GuestSocket)> {
    let l = b.guest.listen(port, ty)?;
    let mut ga = a.guest.connect(4, port, ty)?;
    let mut gb = l.accept(PROMPT)?;
    ga.set_timeout(PROMPT);
    gb.set_timeout(PROMPT);
    Ok((ga, gb))
}

fn shutdowns(vm: &TestVm, seq: u64, port: u32) -> Vec<u32> {
    vm.guest
        .packets_since(seq)
        .iter()
        .filter(|p: &&LoggedPacket| {
            p.dir == Direction::FromDevice && p.hdr.op == OP_SHUTDOWN && p.hdr.dst_port == port
        })
        .map(|p| p.hdr.flags)
        .collect()
}

/// Seven one-byte messages, only the fourth with MSG_EOR: seven messages of one byte arrive,
/// EOR on the fourth alone.
#[test]
fn seqpacket_bounds_and_eor_reach_the_sibling_exactly() -> Result<()> {
    let s = siblings(None)?;
    let (a, b) = boot(&s, 4096)?;
    let (ga, gb) = connect(&a, &b, 8000, SockType::Seqpacket)?;
    for i in 0..7u8 {
        ga.send_msg(&[i], i == 3)?;
    }
    let mut buf = [0u8; 16];
    for i in 0..7u8 {
        let m = gb.recv_msg(&mut buf)?.context("EOF")?;
        ensure!(
            m.len == 1 && buf[0] == i && m.eor == (i == 3),
            "message {i}: {m:?} byte {}",
            buf[0]
        );
    }
    // And the other way.
    for i in 0..7u8 {
        gb.send_msg(&[i], i == 5)?;
    }
    for i in 0..7u8 {
        let m = ga.recv_msg(&mut buf)?.context("EOF")?;
        ensure!(m.len == 1 && m.eor == (i == 5), "back {i}: {m:?}");
    }
    a.guest.health()?;
    b.guest.health()
}

/// A message spanning several packets (64 KiB each) arrives whole in 4 KiB rx buffers, with
/// its EOR; a 256 KiB message passes (the window lets it through); an empty message too.
#[test]
fn seqpacket_message_spanning_packets_and_rx_buffers() -> Result<()> {
    let s = siblings(None)?;
    let (a, b) = boot(&s, 4096)?;
    let (ga, gb) = connect(&a, &b, 8010, SockType::Seqpacket)?;
    let mut buf = vec![0u8; 300_000];
    std::thread::scope(|sc| -> Result<()> {
        let sender = sc.spawn(|| -> Result<()> {
            for (i, size) in [200_000usize, 262_144, 0, 70_000].into_iter().enumerate() {
                let data = vhost_plug_tests::data::Pattern::bytes(i as u64, size);
                ga.send_msg(&data, i != 1)?;
            }
            Ok(())
        });
        for (i, size) in [200_000usize, 262_144, 0, 70_000].into_iter().enumerate() {
            let data = vhost_plug_tests::data::Pattern::bytes(i as u64, size);
            let m = gb.recv_msg(&mut buf)?.context("EOF")?;
            ensure!(
                m.len == size && !m.truncated && m.eor == (i != 1) && buf[..size] == data[..],
                "message {i} ({size} bytes): {m:?}"
            );
        }
        sender.join().map_err(|_| anyhow::anyhow!("panic"))?
    })?;
    a.guest.health()?;
    b.guest.health()
}

/// Even with an explicit 64 KiB tx-buffer-size, a sibling connection advertises enough for a
/// 256 KiB SEQPACKET message (Linux guests refuse to send one larger than buf_alloc).
#[test]
fn sibling_window_takes_a_256k_message_whatever_tx_buffer_size() -> Result<()> {
    let s = siblings(Some(65_536))?;
    let (a, b) = boot(&s, 4096)?;
    let (ga, gb) = connect(&a, &b, 8020, SockType::Seqpacket)?;
    let info = ga.credit_info().context("credit")?;
    ensure!(info.peer_buf_alloc >= 262_144, "{info:?}");
    let data = vhost_plug_tests::data::Pattern::bytes(9, 262_144);
    let mut buf = vec![0u8; 262_144];
    std::thread::scope(|sc| -> Result<()> {
        let t = sc.spawn(|| ga.send_msg(&data, true));
        let m = gb.recv_msg(&mut buf)?.context("EOF")?;
        ensure!(m.len == data.len() && m.eor && buf == data, "{m:?}");
        t.join().map_err(|_| anyhow::anyhow!("panic"))??;
        Ok(())
    })
}

/// SHUT_RD on one side: the other guest's next send fails with EPIPE, for both socket types.
#[test]
fn shut_rd_makes_the_sibling_send_fail() -> Result<()> {
    let s = siblings(None)?;
    let (a, b) = boot(&s, 4096)?;
    for (port, ty) in [(8030, SockType::Stream), (8031, SockType::Seqpacket)] {
        let (ga, gb) = connect(&a, &b, port, ty)?;
        let seq = a.guest.log_seq();
        gb.shutdown(true, false)?;
        a.guest
            .wait_packet(seq, PROMPT, |h| {
                h.op == OP_SHUTDOWN && h.flags == SHUTDOWN_RCV && h.dst_port == ga.local_port()
            })
            .with_context(|| format!("{ty:?}: no SHUTDOWN(RCV) reached the sender"))?;
        match ga.send(b"x") {
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
            other => bail!("{ty:?}: send after the sibling's SHUT_RD: {other:?}"),
        }
        // The reverse direction still carries data.
        gb.send(b"y")?;
        let mut c = [0u8; 1];
        ensure!(
            ga.recv(&mut c)? == 1 && c[0] == b'y',
            "{ty:?}: reverse data"
        );
    }
    a.guest.health()?;
    b.guest.health()
}

/// Send one byte, then close: the receiver gets the byte, then one SHUTDOWN(RCV|SEND) (never
/// the bits apart), so its send fails with EPIPE, it reads the byte, then EOF. Repeated to
/// catch the ordering race.
#[test]
fn send_then_close_arrives_as_one_close_behind_the_data() -> Result<()> {
    let s = siblings(None)?;
    let (a, b) = boot(&s, 4096)?;
    let l = a.guest.listen(8040, SockType::Stream)?;
    for round in 0..30 {
        let gb = b.guest.connect(3, 8040, SockType::Stream)?;
        let mut ga = l.accept(PROMPT)?;
        ga.set_timeout(PROMPT);
        let seq = a.guest.log_seq();
        gb.send(b"1")?;
        gb.close()?;
        a.guest
            .wait_packet(seq, PROMPT, |h| {
                h.op == OP_SHUTDOWN && h.dst_port == ga.local_port()
            })
            .with_context(|| format!("round {round}: no SHUTDOWN"))?;
        let got = shutdowns(&a, seq, ga.local_port());
        ensure!(
            got == vec![SHUTDOWN_RCV | SHUTDOWN_SEND],
            "round {round}: SHUTDOWN flags {got:?}"
        );
        match ga.send(b"x") {
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
            other => bail!("round {round}: send after the peer closed: {other:?}"),
        }
        let mut c = [0u8; 2];
        ensure!(ga.recv(&mut c)? == 1 && c[0] == b'1', "round {round}: data");
        ensure!(ga.recv(&mut c)? == 0, "round {round}: EOF");
    }
    a.guest.health()?;
    b.guest.health()
}

/// Connecting to a sibling port nobody listens on is refused at once.
#[test]
fn connect_to_an_unbound_sibling_port_is_reset_at_once() -> Result<()> {
    let s = siblings(None)?;
    let (a, _b) = boot(&s, 4096)?;
    for ty in [SockType::Stream, SockType::Seqpacket] {
        let t0 = Instant::now();
        match a.guest.connect_timeout(4, 8050, ty, PROMPT) {
            Err(ConnectError::Refused) => {}
            other => bail!("{ty:?}: {:?}", other.map(|_| ())),
        }
        ensure!(
            t0.elapsed() < PROMPT,
            "{ty:?}: refusal took {:?}",
            t0.elapsed()
        );
    }
    a.guest.health()
}

/// RST from one guest ends the sibling's connection at once. A unix socketpair has no reset,
/// so the sibling sees a close: SHUTDOWN(RCV|SEND) in one packet, answered by its RST.
#[test]
fn rst_ends_the_sibling_connection_as_a_close() -> Result<()> {
    let s = siblings(None)?;
    let (a, b) = boot(&s, 4096)?;
    let (ga, gb) = connect(&a, &b, 8060, SockType::Stream)?;
    let seq = b.guest.log_seq();
    ga.reset()?;
    ensure!(
        gb.wait_closed(PROMPT),
        "the sibling's connection did not end"
    );
    let got = shutdowns(&b, seq, gb.local_port());
    ensure!(got == vec![SHUTDOWN_RCV | SHUTDOWN_SEND], "{got:?}");
    b.guest.health()
}

/// CREDIT_REQUEST on a sibling connection is answered by the device with CREDIT_UPDATE.
#[test]
fn credit_request_is_answered_on_a_sibling_connection() -> Result<()> {
    let s = siblings(None)?;
    let (a, b) = boot(&s, 4096)?;
    let (ga, _gb) = connect(&a, &b, 8070, SockType::Stream)?;
    let p = a.guest.request_credit(&ga, PROMPT)?;
    ensure!(p.hdr.buf_alloc == 262_144, "{:?}", p.hdr);
    a.guest.health()
}

/// Half-close between siblings: SHUT_WR on one side is EOF on the other, which may still
/// send back.
#[test]
fn half_close_between_siblings() -> Result<()> {
    let s = siblings(None)?;
    let (a, b) = boot(&s, 4096)?;
    let (ga, gb) = connect(&a, &b, 8080, SockType::Stream)?;
    let seq = b.guest.log_seq();
    ga.send(b"abc")?;
    ga.shutdown(false, true)?;
    let mut buf = [0u8; 3];
    (&gb).read_exact(&mut buf)?;
    ensure!(gb.recv(&mut buf)? == 0, "no EOF");
    ensure!(
        shutdowns(&b, seq, gb.local_port()) == vec![SHUTDOWN_SEND],
        "{:?}",
        shutdowns(&b, seq, gb.local_port())
    );
    gb.send(b"back")?;
    let mut back = [0u8; 4];
    (&ga).read_exact(&mut back)?;
    ensure!(&back == b"back");
    a.guest.health()?;
    b.guest.health()
}

/// A hundred connections between two guests at once, both socket types.
#[test]
fn hundred_sibling_connections() -> Result<()> {
    let s = siblings(None)?;
    let (a, b) = boot(&s, 4096)?;
    let ls = b.guest.listen(8090, SockType::Stream)?;
    let lq = b.guest.listen(8091, SockType::Seqpacket)?;
    let mut conns = Vec::new();
    for i in 0..100 {
        let (port, ty, l) = if i % 2 == 0 {
            (8090, SockType::Stream, &ls)
        } else {
            (8091, SockType::Seqpacket, &lq)
        };
        let ga = a.guest.connect(4, port, ty)?;
        let gb = l.accept(PROMPT)?;
        conns.push((ga, gb));
    }
    for (i, (ga, gb)) in conns.iter().enumerate() {
        let msg = format!("sibling conn {i}");
        ga.send(msg.as_bytes())?;
        let mut got = vec![0u8; 64];
        let n = gb.recv(&mut got)?;
        ensure!(
            &got[..n] == msg.as_bytes(),
            "connection {i}: {:?}",
            &got[..n]
        );
    }
    drop(conns);
    a.guest.health()?;
    b.guest.health()
}

/// Many messages while the receiving guest does not read: the socketpair fills, frames are cut
/// anywhere (even inside a header) and wait in the sender's buffer, and once the receiver
/// reads, every message arrives whole with its own EOR.
#[test]
fn seqpacket_frames_survive_a_full_socketpair() -> Result<()> {
    let s = siblings(None)?;
    let (a, b) = boot(&s, 4096)?;
    let (ga, gb) = connect(&a, &b, 8100, SockType::Seqpacket)?;
    let sizes: Vec<usize> = (0..400).map(|i| (i * 7919) % 5000).collect();
    std::thread::scope(|sc| -> Result<()> {
        let sender = sc.spawn(|| -> Result<()> {
            for (i, &n) in sizes.iter().enumerate() {
                ga.send_msg(
                    &vhost_plug_tests::data::Pattern::bytes(i as u64, n),
                    i % 3 == 0,
                )?;
            }
            Ok(())
        });
        // Let the sender run into a full socketpair before reading anything.
        std::thread::sleep(Duration::from_millis(500));
        let mut buf = vec![0u8; 8192];
        for (i, &n) in sizes.iter().enumerate() {
            let m = gb.recv_msg(&mut buf)?.context("EOF")?;
            ensure!(
                m.len == n
                    && m.eor == (i % 3 == 0)
                    && buf[..n] == vhost_plug_tests::data::Pattern::bytes(i as u64, n)[..],
                "message {i} ({n} bytes): {m:?}"
            );
        }
        sender.join().map_err(|_| anyhow::anyhow!("panic"))?
    })?;
    a.guest.health()?;
    b.guest.health()
}
