//! The op-by-op protocol table of docs/architecture.md ("Protocol conformance"), guest <->
//! host unix path: one test per row, against vhost-plug with a simulated VMM and guest driver
//! (which behaves like Linux's virtio transport: it answers SHUTDOWN(RCV|SEND) with RST,
//! refuses to send after SHUTDOWN(RCV), and checks the device's credit).

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vhost_plug_tests::driver::LoggedPacket;
use vhost_plug_tests::harness::{Setup, TestVm};
use vhost_plug_tests::host::{
    accept_timeout, host_connect, host_listen, port_path, SeqpacketListener,
};
use vhost_plug_tests::packet::*;
use vhost_plug_tests::{ConnectError, DaemonKind, SockType, VmSpec};

/// Bound for what a correct daemon does at once.
const PROMPT: Duration = Duration::from_secs(5);

fn setup(tx_buffer_size: Option<u32>) -> Result<Setup> {
    Setup::with(
        DaemonKind::VhostPlug,
        |d| {
            let v = VmSpec::new(d, 3);
            vec![match tx_buffer_size {
                Some(n) => v.tx_buffer_size(n),
                None => v,
            }]
        },
        &[],
    )
}

/// SHUTDOWN packets the device sent to guest port `port` since `seq`.
fn shutdowns(vm: &TestVm, seq: u64, port: u32) -> Vec<u32> {
    vm.guest
        .packets_since(seq)
        .iter()
        .filter(|p: &&LoggedPacket| {
            p.dir == vhost_plug_tests::driver::Direction::FromDevice
                && p.hdr.op == OP_SHUTDOWN
                && p.hdr.dst_port == port
        })
        .map(|p| p.hdr.flags)
        .collect()
}

/// A unix stream socket bound to `path` that never listens.
fn bind_only(path: &std::path::Path) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain syscall; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is fresh and owned by nothing else.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain old data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    ensure!(bytes.len() < addr.sun_path.len(), "path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: `addr` is a valid sockaddr_un.
    let r = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    ensure!(r == 0, "bind: {}", std::io::Error::last_os_error());
    Ok(owned)
}

/// A connected guest stream to a host listener on `port`.
fn pair(
    vm: &TestVm,
    l: &UnixListener,
    port: u32,
) -> Result<(
    vhost_plug_tests::GuestSocket,
    std::os::unix::net::UnixStream,
)> {
    let gs = vm.guest.connect(HOST_CID, port, SockType::Stream)?;
    let hs = accept_timeout(l, PROMPT)?;
    hs.set_read_timeout(Some(PROMPT))?;
    Ok((gs, hs))
}

/// REQUEST to a port nobody listens on, and to a socket file that does not listen: RST at
/// once (the connect fails in the daemon).
#[test]
fn request_to_unbound_or_unlistening_port_is_reset_at_once() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let t0 = Instant::now();
    match vm
        .guest
        .connect_timeout(HOST_CID, 7001, SockType::Stream, PROMPT)
    {
        Err(ConnectError::Refused) => {}
        other => bail!("unbound port: {:?}", other.map(|_| ())),
    }
    // A bound unix socket that never listens.
    let _bound = bind_only(&port_path(&vm.spec.uds_path, 7002))?;
    match vm
        .guest
        .connect_timeout(HOST_CID, 7002, SockType::Stream, PROMPT)
    {
        Err(ConnectError::Refused) => {}
        other => bail!("bound, not listening: {:?}", other.map(|_| ())),
    }
    ensure!(t0.elapsed() < PROMPT, "refusals took {:?}", t0.elapsed());
    vm.guest.health()
}

/// Default window: 256 KiB (Linux's VIRTIO_VSOCK_DEFAULT_BUF_SIZE); an explicit
/// tx-buffer-size wins.
#[test]
fn window_is_256k_by_default_and_an_explicit_size_wins() -> Result<()> {
    for (size, want) in [(None, 262_144u32), (Some(65_536), 65_536)] {
        let s = setup(size)?;
        let vm = s.boot(0)?;
        let l = host_listen(&vm.spec.uds_path, 7010)?;
        let (gs, _hs) = pair(&vm, &l, 7010)?;
        let info = gs.credit_info().context("credit")?;
        ensure!(
            info.peer_buf_alloc == want,
            "tx-buffer-size {size:?}: buf_alloc {}",
            info.peer_buf_alloc
        );
    }
    Ok(())
}

/// RST from the guest: the host socket closes at once.
#[test]
fn guest_rst_closes_the_host_socket() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let l = host_listen(&vm.spec.uds_path, 7020)?;
    let (gs, mut hs) = pair(&vm, &l, 7020)?;
    gs.reset()?;
    let mut b = [0u8; 8];
    match hs.read(&mut b) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
        other => bail!("host read after guest RST: {other:?}"),
    }
}

/// Guest SHUTDOWN(RCV): shutdown(SHUT_RD) on the host socket, so the host program's writes
/// fail with EPIPE; the guest may still send.
#[test]
fn guest_shut_rd_makes_host_writes_fail_with_epipe() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let l = host_listen(&vm.spec.uds_path, 7030)?;
    let (gs, mut hs) = pair(&vm, &l, 7030)?;
    gs.shutdown(true, false)?;
    let deadline = Instant::now() + PROMPT;
    loop {
        match hs.write(b"x") {
            Err(e) if e.kind() == ErrorKind::BrokenPipe => break,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            other => bail!("host write after guest SHUT_RD: {other:?}"),
        }
    }
    gs.send(b"still")?;
    let mut b = [0u8; 5];
    hs.read_exact(&mut b)?;
    ensure!(&b == b"still");
    vm.guest.health()
}

/// Host SHUT_RD on a unix stream: the daemon notices it (zero-length send fails with EPIPE)
/// and sends SHUTDOWN(RCV) at once, before the guest sends anything: its send fails.
#[test]
fn host_shut_rd_reaches_the_guest_before_it_sends() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let l = host_listen(&vm.spec.uds_path, 7040)?;
    let (gs, hs) = pair(&vm, &l, 7040)?;
    let seq = vm.guest.log_seq();
    hs.shutdown(Shutdown::Read)?;
    vm.guest
        .wait_packet(seq, PROMPT, |h| {
            h.op == OP_SHUTDOWN && h.flags == SHUTDOWN_RCV && h.dst_port == gs.local_port()
        })
        .context("no SHUTDOWN(RCV) after the host's SHUT_RD")?;
    match gs.send(b"x") {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
        other => bail!("guest send after host SHUT_RD: {other:?}"),
    }
    // The other direction still works.
    let mut hs = hs;
    hs.write_all(b"more")?;
    let mut b = [0u8; 4];
    (&gs).read_exact(&mut b)?;
    ensure!(&b == b"more");
    vm.guest.health()
}

/// Host SHUT_RD on a SEQPACKET socket cannot be probed (a zero-length send is a message):
/// the daemon's write fails with EPIPE and the guest gets SHUTDOWN(RCV) then.
#[test]
fn host_seqpacket_shut_rd_is_told_on_the_first_write() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let l = SeqpacketListener::for_port(&vm.spec.uds_path, 7045)?;
    let gs = vm.guest.connect(HOST_CID, 7045, SockType::Seqpacket)?;
    let hs = l.accept(PROMPT)?;
    hs.shutdown(Shutdown::Read)?;
    let seq = vm.guest.log_seq();
    gs.send_msg(b"lost", true)?;
    vm.guest
        .wait_packet(seq, PROMPT, |h| {
            h.op == OP_SHUTDOWN && h.flags & SHUTDOWN_RCV != 0 && h.dst_port == gs.local_port()
        })
        .context("no SHUTDOWN(RCV) after the write into a SHUT_RD socket")?;
    match gs.send_msg(b"x", false) {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
        other => bail!("guest send after SHUTDOWN(RCV): {other:?}"),
    }
    vm.guest.health()
}

/// A host program that writes and closes: the guest gets the data, then one SHUTDOWN with
/// RCV and SEND together, never a half-close first. Repeated to catch the ordering race.
#[test]
fn host_close_is_one_shutdown_behind_the_data() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let l = host_listen(&vm.spec.uds_path, 7050)?;
    for round in 0..40 {
        let (gs, mut hs) = pair(&vm, &l, 7050)?;
        let seq = vm.guest.log_seq();
        hs.write_all(b"z")?;
        drop(hs);
        let mut b = [0u8; 1];
        (&gs).read_exact(&mut b)?;
        ensure!(gs.recv(&mut b)? == 0, "round {round}: no EOF");
        let got = shutdowns(&vm, seq, gs.local_port());
        ensure!(
            got == vec![SHUTDOWN_RCV | SHUTDOWN_SEND],
            "round {round}: SHUTDOWN flags sent {got:?}"
        );
        match gs.send(b"y") {
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
            other => bail!("round {round}: send after the host closed: {other:?}"),
        }
    }
    vm.guest.health()
}

/// A host SHUT_WR then, later, close: SHUTDOWN(SEND), then SHUTDOWN(RCV|SEND).
#[test]
fn host_half_close_then_close_is_told_in_two_steps() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let l = host_listen(&vm.spec.uds_path, 7055)?;
    let (gs, hs) = pair(&vm, &l, 7055)?;
    let seq = vm.guest.log_seq();
    hs.shutdown(Shutdown::Write)?;
    let mut b = [0u8; 1];
    ensure!(gs.recv(&mut b)? == 0, "no EOF");
    gs.send(b"a")?;
    drop(hs);
    vm.guest
        .wait_packet(seq, PROMPT, |h| {
            h.op == OP_SHUTDOWN && h.flags == SHUTDOWN_RCV | SHUTDOWN_SEND
        })
        .context("no SHUTDOWN(RCV|SEND) after the close")?;
    let got = shutdowns(&vm, seq, gs.local_port());
    ensure!(
        got == vec![SHUTDOWN_SEND, SHUTDOWN_RCV | SHUTDOWN_SEND],
        "SHUTDOWN flags sent {got:?}"
    );
    Ok(())
}

/// Guest close (one SHUTDOWN with RCV|SEND) behind data: the host reads the data, then EOF,
/// and its writes fail (both directions shut in one shutdown(SHUT_RDWR)); the guest gets its
/// RST.
#[test]
fn guest_close_reaches_the_host_as_a_close_behind_the_data() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let l = host_listen(&vm.spec.uds_path, 7060)?;
    for round in 0..20 {
        let (gs, mut hs) = pair(&vm, &l, 7060)?;
        let port = gs.local_port();
        let seq = vm.guest.log_seq();
        gs.send(b"q")?;
        gs.close()?;
        let mut b = [0u8; 2];
        ensure!(hs.read(&mut b)? == 1 && b[0] == b'q', "round {round}: data");
        ensure!(hs.read(&mut b)? == 0, "round {round}: EOF");
        match hs.write(b"r") {
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
            other => bail!("round {round}: host write after guest close: {other:?}"),
        }
        vm.guest
            .wait_packet(seq, PROMPT, |h| h.op == OP_RST && h.dst_port == port)
            .with_context(|| format!("round {round}: no RST completing the close"))?;
    }
    vm.guest.health()
}

/// CREDIT_REQUEST is answered with CREDIT_UPDATE carrying our window and fwd_cnt.
#[test]
fn credit_request_is_answered() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let l = host_listen(&vm.spec.uds_path, 7070)?;
    let (gs, mut hs) = pair(&vm, &l, 7070)?;
    gs.send(b"12345")?;
    let mut b = [0u8; 5];
    hs.read_exact(&mut b)?;
    let p = vm.guest.request_credit(&gs, PROMPT)?;
    ensure!(
        p.hdr.buf_alloc == 262_144 && p.hdr.fwd_cnt == 5,
        "CREDIT_UPDATE {:?}",
        p.hdr
    );
    vm.guest.health()
}

/// Credit follows what the host program really read: while it does not read (peeking reads
/// nothing out), the guest's window fills and stays full; once it reads, CREDIT_UPDATE
/// reopens it and nothing was lost.
#[test]
fn credit_moves_only_when_the_host_reads() -> Result<()> {
    let s = setup(Some(65_536))?;
    let vm = s.boot(0)?;
    let l = host_listen(&vm.spec.uds_path, 7080)?;
    let (gs, hs) = pair(&vm, &l, 7080)?;
    // More than the kernel socket buffer plus our window: the guest must stall.
    let total = 1 << 20;
    let data = vhost_plug_tests::data::Pattern::bytes(7, total);
    std::thread::scope(|sc| -> Result<()> {
        let sender = sc.spawn(|| gs.send(&data));
        // Wait until the guest has no credit left and nothing moves any more (the kernel's
        // socket buffer and our window are full).
        let deadline = Instant::now() + 2 * PROMPT;
        let mut last = gs.credit_info().context("credit")?;
        let before = loop {
            std::thread::sleep(Duration::from_millis(200));
            let c = gs.credit_info().context("credit")?;
            if c == last && c.tx_cnt.wrapping_sub(c.peer_fwd_cnt) == c.peer_buf_alloc {
                break c;
            }
            ensure!(Instant::now() < deadline, "guest never stalled: {c:?}");
            last = c;
        };
        let mut peek = [0u8; 4096];
        // SAFETY: plain recv with MSG_PEEK into a local buffer.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&hs),
                peek.as_mut_ptr().cast(),
                peek.len(),
                libc::MSG_PEEK,
            )
        };
        ensure!(n > 0, "peek failed");
        std::thread::sleep(Duration::from_millis(200));
        let after = gs.credit_info().context("credit")?;
        ensure!(
            after.peer_fwd_cnt == before.peer_fwd_cnt,
            "fwd_cnt moved while the host only peeked: {before:?} -> {after:?}"
        );
        let mut got = vec![0u8; total];
        (&hs).read_exact(&mut got)?;
        ensure!(got == data, "data differs");
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(())
    })?;
    vm.guest.health()
}

/// SEQPACKET to a host program: one guest message (however many packets) is one unix
/// message; EOR has no unix equivalent and is dropped. Host messages reach the guest with
/// EOM and without EOR.
#[test]
fn seqpacket_host_messages_keep_bounds_and_eor_is_dropped() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let l = SeqpacketListener::for_port(&vm.spec.uds_path, 7090)?;
    let gs = vm.guest.connect(HOST_CID, 7090, SockType::Seqpacket)?;
    let hs = l.accept(PROMPT)?;
    let mut buf = vec![0u8; 300_000];
    for (i, size) in [1usize, 200_000, 0, 5].into_iter().enumerate() {
        let data = vhost_plug_tests::data::Pattern::bytes(i as u64, size);
        gs.send_msg(&data, i % 2 == 0)?;
        let (n, trunc) = hs.recv(&mut buf, PROMPT)?;
        ensure!(n == size && !trunc && buf[..n] == data[..], "message {i}");
    }
    for size in [3usize, 100_000] {
        hs.send(&vec![9u8; size])?;
        let m = gs.recv_msg(&mut buf)?.context("EOF")?;
        ensure!(m.len == size && !m.eor, "host message {size}: {m:?}");
    }
    vm.guest.health()
}

/// A hundred connections at once, each carrying its own bytes both ways.
#[test]
fn hundred_connections() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let l = host_listen(&vm.spec.uds_path, 7100)?;
    let mut conns = Vec::new();
    for _ in 0..100 {
        conns.push(pair(&vm, &l, 7100)?);
    }
    for (i, (gs, hs)) in conns.iter_mut().enumerate() {
        let msg = format!("conn {i}");
        gs.send(msg.as_bytes())?;
        let mut b = vec![0u8; msg.len()];
        hs.read_exact(&mut b)?;
        ensure!(b == msg.as_bytes(), "connection {i} got {b:?}");
        hs.write_all(&b)?;
        let mut back = vec![0u8; msg.len()];
        (&*gs).read_exact(&mut back)?;
        ensure!(back == b, "connection {i} echo");
    }
    ensure!(vm.guest.socket_count() >= 100);
    drop(conns);
    vm.guest.health()
}

/// The host-initiated side: REQUEST to the guest, its RESPONSE confirmed with `OK <port>`,
/// and a REQUEST the guest refuses (nobody listens) closes the host socket at once.
#[test]
fn host_connect_is_requested_and_a_refusal_closes_it() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let gl = vm.guest.listen(7110, SockType::Stream)?;
    let (mut hs, port) = host_connect(&vm.spec.uds_path, 7110)?;
    let gs = gl.accept(PROMPT)?;
    ensure!(
        gs.peer_port() == port,
        "OK {port}, guest sees {}",
        gs.peer_port()
    );
    hs.write_all(b"hi")?;
    let mut b = [0u8; 2];
    (&gs).read_exact(&mut b)?;
    // Nobody listens on 7111: the guest answers RST and the host sees the socket close.
    let t0 = Instant::now();
    let r = host_connect(&vm.spec.uds_path, 7111);
    ensure!(r.is_err(), "connect to a port nobody listens on succeeded");
    ensure!(t0.elapsed() < PROMPT, "refusal took {:?}", t0.elapsed());
    vm.guest.health()
}

/// A guest that does not read: once its credit is used up the device asks once with
/// CREDIT_REQUEST (the guest's answer gives no credit, so no second one), and the guest's
/// CREDIT_UPDATE after it reads lets the rest through.
#[test]
fn credit_request_once_when_the_guest_stalls() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let l = host_listen(&vm.spec.uds_path, 7120)?;
    let (gs, mut hs) = pair(&vm, &l, 7120)?;
    let seq = vm.guest.log_seq();
    let total = 1 << 20;
    let data = vhost_plug_tests::data::Pattern::bytes(3, total);
    std::thread::scope(|sc| -> Result<()> {
        let writer = sc.spawn(move || hs.write_all(&data).map(|_| hs));
        vm.guest
            .wait_packet(seq, PROMPT, |h| {
                h.op == OP_CREDIT_REQUEST && h.dst_port == gs.local_port()
            })
            .context("no CREDIT_REQUEST when the guest ran out of credit")?;
        std::thread::sleep(Duration::from_millis(500));
        let requests = vm
            .guest
            .packets_since(seq)
            .iter()
            .filter(|p| {
                p.dir == vhost_plug_tests::driver::Direction::FromDevice
                    && p.hdr.op == OP_CREDIT_REQUEST
            })
            .count();
        ensure!(requests == 1, "{requests} CREDIT_REQUESTs while stalled");
        let mut got = vec![0u8; total];
        (&gs).read_exact(&mut got)?;
        ensure!(
            got == vhost_plug_tests::data::Pattern::bytes(3, total),
            "data"
        );
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        Ok(())
    })?;
    vm.guest.health()
}

/// Many small guest packets, on one connection and on two at once, to a host program that
/// reads in small pieces, pausing now and then: the host socket fills and drains over and
/// over, the device sends runs of packets together and buffers what the socket does not
/// take, and every byte still arrives once and in order.
#[test]
fn small_packets_to_a_slow_reader_arrive_in_order() -> Result<()> {
    let s = setup(None)?;
    let vm = s.boot(0)?;
    let l = host_listen(&vm.spec.uds_path, 7070)?;
    let data = vhost_plug_tests::data::Pattern::bytes(11, 64 << 20);
    // A reordering needs the socket to take bytes again at just the wrong moment: a few
    // rounds make it likely to show. Two connections at once interleave in the tx queue.
    for round in 0..3 {
        let (ga, ha) = pair(&vm, &l, 7070)?;
        let (gb, hb) = pair(&vm, &l, 7070)?;
        std::thread::scope(|sc| -> Result<()> {
            let b = sc.spawn(|| small_packets_round(&gb, hb, &data[..16 << 20]));
            small_packets_round(&ga, ha, &data).with_context(|| format!("round {round}, a"))?;
            b.join()
                .map_err(|_| anyhow::anyhow!("second connection panicked"))?
                .with_context(|| format!("round {round}, b"))
        })?;
    }
    vm.guest.health()
}

fn small_packets_round(
    gs: &vhost_plug_tests::GuestSocket,
    mut hs: std::os::unix::net::UnixStream,
    data: &[u8],
) -> Result<()> {
    let got = std::thread::scope(|sc| -> Result<Vec<u8>> {
        let tx = sc.spawn(|| -> Result<()> {
            for chunk in data.chunks(4096) {
                gs.send(chunk)?;
            }
            Ok(())
        });
        let mut got = Vec::with_capacity(data.len());
        let mut buf = vec![0u8; 4096];
        let mut reads = 0u32;
        while got.len() < data.len() {
            let n = hs.read(&mut buf)?;
            ensure!(n > 0, "end of stream after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
            reads += 1;
            // Pauses let the host socket fill, so that the device has to buffer.
            if reads.is_multiple_of(512) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        tx.join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(got)
    })?;
    ensure!(
        got.len() == data.len(),
        "got {} of {} bytes",
        got.len(),
        data.len()
    );
    let first_bad = got.iter().zip(data).position(|(a, b)| a != b);
    ensure!(
        first_bad.is_none(),
        "bytes differ from offset {first_bad:?} on"
    );
    Ok(())
}
