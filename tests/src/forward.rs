//! The vsock forwarding backend (`forward-cid`, `forward-listen`), end to end: a daemon and a
//! simulated VM run in a Linux guest with `vsock_loopback`, the daemon forwards to CID 1
//! (`VMADDR_CID_LOCAL`), and the "host programs" are AF_VSOCK sockets of that same guest
//! ([`crate::vsockhost`]). Run by the `fwdguest` binary inside the QEMU guest that
//! `tests/tests/guest_forward.rs` boots ([`crate::qemu_forward`]); each case reports one
//! `@@ OK <case> [key=value...]` or `@@ FAIL <case> <reason>` line.

use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::data::{recv_digest, send_pattern, Pattern};
use crate::driver::{ConnectError, Direction, GuestSocket, SockType};
use crate::harness::{echo, exchange, Setup, TestVm};
use crate::packet::{HOST_CID, OP_RST, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::vsockhost::{VsockSocket, CID_LOCAL};
use crate::{DaemonKind, VmSpec};

/// Bound of one step (TCG is slow; nothing here is a timing assertion).
pub const STEP: Duration = Duration::from_secs(60);
/// `forward-listen` ports of the test daemon.
pub const LISTEN: [u32; 2] = [6001, 6002];
/// Bytes each way of the checksummed streams.
const STREAM_BYTES: u64 = 4 << 20;

/// The cases `fwdguest test` runs, in order (`restart` and `upgrade` start their own daemon).
pub const CASES: [&str; 9] = [
    "streams",
    "half-close",
    "seqpacket",
    "rst",
    "listen",
    "conns100",
    "route",
    "restart",
    "upgrade",
];
/// Live upgrades in the `upgrade` case.
const UPGRADES: usize = 3;

/// A daemon of `kind` forwarding CID 3's connections to CID 1 and listening on `listen`.
pub fn forwarding_daemon(kind: DaemonKind, listen: &[u32]) -> Result<Setup> {
    Setup::with(
        kind,
        |d| vec![VmSpec::new(d, 3).forward(CID_LOCAL, listen)],
        &[],
    )
}

fn refused(e: ConnectError) -> anyhow::Error {
    anyhow::anyhow!("guest connect: {e}")
}

/// A guest connection to host port `port` and its end accepted on `l` (where the daemon
/// connected it over AF_VSOCK).
pub(crate) fn g2h(
    vm: &TestVm,
    l: &VsockSocket,
    port: u32,
    ty: SockType,
) -> Result<(GuestSocket, VsockSocket)> {
    let mut g = vm
        .guest
        .connect_timeout(HOST_CID, port, ty, STEP)
        .map_err(refused)?;
    g.set_timeout(STEP);
    let h = l.accept(STEP)?;
    h.set_timeout(STEP)?;
    Ok((g, h))
}

/// Checksummed bytes both ways at once, each side half-closing after its last byte: the
/// other side must read all of it and then end of stream.
pub(crate) fn both_ways(g: &GuestSocket, h: &VsockSocket, total: u64) -> Result<()> {
    thread::scope(|sc| -> Result<()> {
        let g_tx = sc.spawn(|| -> std::io::Result<_> {
            let d = send_pattern(g, 1, total, 65536)?;
            g.shutdown(false, true)?;
            Ok(d)
        });
        let h_tx = sc.spawn(|| -> std::io::Result<_> {
            let d = send_pattern(h, 2, total, 65536)?;
            h.shutdown(Shutdown::Write)?;
            Ok(d)
        });
        let h_rx = sc.spawn(|| recv_digest(h, u64::MAX, 65536));
        let got_g = recv_digest(g, u64::MAX, 65536).context("guest receive")?;
        let join = |r: thread::Result<std::io::Result<_>>, what: &str| {
            r.map_err(|_| anyhow::anyhow!("{what} panicked"))?
                .with_context(|| what.to_string())
        };
        let sent_g = join(g_tx.join(), "guest send")?;
        let sent_h = join(h_tx.join(), "host send")?;
        let got_h = join(h_rx.join(), "host receive")?;
        ensure!(
            sent_g == got_h,
            "guest -> host: sent {sent_g:?}, got {got_h:?}"
        );
        ensure!(
            sent_h == got_g,
            "host -> guest: sent {sent_h:?}, got {got_g:?}"
        );
        Ok(())
    })
}

/// Guest -> AF_VSOCK and back, 4 MiB each way at once, checksummed.
fn streams(vm: &TestVm) -> Result<String> {
    let l = VsockSocket::listen(5001, SockType::Stream)?;
    let (g, h) = g2h(vm, &l, 5001, SockType::Stream)?;
    let (cid, _) = h.peer_addr()?;
    both_ways(&g, &h, STREAM_BYTES)?;
    Ok(format!("bytes={STREAM_BYTES} host_saw_cid={cid}"))
}

/// Half-close and reset mapped both ways: the host end's SHUT_WR is the guest's end of
/// stream while the guest still sends; the guest's RST closes the host end.
fn half_close(vm: &TestVm) -> Result<String> {
    let l = VsockSocket::listen(5002, SockType::Stream)?;
    let (g, h) = g2h(vm, &l, 5002, SockType::Stream)?;
    h.shutdown(Shutdown::Write)?;
    let mut b = [0u8; 16];
    ensure!(
        g.recv(&mut b)? == 0,
        "guest did not see the host's SHUT_WR as EOF"
    );
    g.send(b"after")?;
    let mut got = [0u8; 5];
    std::io::Read::read_exact(&mut &h, &mut got)?;
    ensure!(&got == b"after", "host got {got:?} after its half-close");
    // The guest resets: the host end reads end of stream (vsock has no reset error).
    g.reset()?;
    let n = std::io::Read::read(&mut &h, &mut b);
    ensure!(
        matches!(n, Ok(0) | Err(_)),
        "host end still open after the guest's RST: {n:?}"
    );

    // And the other way: the host end closes; the guest reads EOF, then is reset.
    let (g, h) = g2h(vm, &l, 5002, SockType::Stream)?;
    let seq = vm.guest.log_seq();
    std::io::Write::write_all(&mut &h, b"bye")?;
    drop(h);
    let mut got = [0u8; 3];
    let mut at = 0;
    while at < 3 {
        let n = g.recv(&mut got[at..])?;
        ensure!(n > 0, "guest saw EOF before the host's last bytes");
        at += n;
    }
    ensure!(&got == b"bye", "guest got {got:?}");
    ensure!(g.recv(&mut b)? == 0, "guest did not see the host's close");
    // The close is one SHUTDOWN(RCV|SEND) behind the data, never SEND alone first.
    let got: Vec<u32> = vm
        .guest
        .packets_since(seq)
        .iter()
        .filter(|p| {
            p.dir == Direction::FromDevice
                && p.hdr.op == OP_SHUTDOWN
                && p.hdr.dst_port == g.local_port()
        })
        .map(|p| p.hdr.flags)
        .collect();
    ensure!(
        got == vec![SHUTDOWN_RCV | SHUTDOWN_SEND],
        "SHUTDOWN flags to the guest after the host's close: {got:?}"
    );
    match g.send(b"y") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => bail!("guest send after the host closed: {other:?}"),
    }
    Ok(String::new())
}

/// SEQPACKET keeps message bounds both ways, from 1 byte to 128 KiB.
fn seqpacket(vm: &TestVm) -> Result<String> {
    let l = VsockSocket::listen(5003, SockType::Seqpacket)?;
    let (g, h) = g2h(vm, &l, 5003, SockType::Seqpacket)?;
    let n = messages_both_ways(&g, &h)?;
    Ok(format!("message_bytes_each_way={n}"))
}

/// Messages of 1 byte to 128 KiB each way, bounds and bytes checked; returns the payload
/// bytes sent in each direction.
pub(crate) fn messages_both_ways(g: &GuestSocket, h: &VsockSocket) -> Result<usize> {
    let sizes = [1usize, 7, 1000, 4096, 65536, 131072];
    let mut buf = vec![0u8; 256 << 10];
    for (i, &n) in sizes.iter().enumerate() {
        let msg = Pattern::bytes(i as u64, n);
        g.send_msg(&msg, false)?;
        let (got, trunc) = h.recv_msg(&mut buf)?;
        ensure!(
            !trunc && got == n,
            "guest -> host message {i}: {got} bytes, {n} sent"
        );
        ensure!(
            buf[..got] == msg[..],
            "guest -> host message {i}: bytes differ"
        );
    }
    for (i, &n) in sizes.iter().enumerate() {
        let msg = Pattern::bytes(100 + i as u64, n);
        ensure!(h.send_msg(&msg)? == n, "host send of message {i} cut short");
        let r = g.recv_msg(&mut buf)?.context("guest: end of stream")?;
        ensure!(
            !r.truncated && r.len == n && r.copied == n,
            "host -> guest message {i}: {r:?}, {n} sent"
        );
        ensure!(
            buf[..n] == msg[..],
            "host -> guest message {i}: bytes differ"
        );
    }
    Ok(sizes.iter().sum())
}

/// Nothing listens at the forward address: the guest's connect is refused (RST), for both
/// socket types.
fn rst(vm: &TestVm) -> Result<String> {
    for ty in [SockType::Stream, SockType::Seqpacket] {
        match vm.guest.connect_timeout(HOST_CID, 5999, ty, STEP) {
            Err(ConnectError::Refused) => {}
            other => bail!("{ty:?} to an unlistened port: {:?}", other.map(|_| ())),
        }
    }
    Ok(String::new())
}

/// `forward-listen`: a host AF_VSOCK connect to (CID 1, port) reaches the guest's listener on
/// that port; checksummed both ways. A port the guest does not listen on is closed.
fn listen(vm: &TestVm) -> Result<String> {
    let gl = vm.guest.listen(LISTEN[0], SockType::Stream)?;
    let h = VsockSocket::connect_retry(CID_LOCAL, LISTEN[0], SockType::Stream, STEP)?;
    h.set_timeout(STEP)?;
    let mut g = gl.accept(STEP)?;
    g.set_timeout(STEP);
    ensure!(
        g.peer_cid() == HOST_CID,
        "guest sees the connection from CID {}",
        g.peer_cid()
    );
    both_ways(&g, &h, STREAM_BYTES)?;

    // Nobody in the guest listens on the second port: the guest refuses, the host end closes.
    let h = VsockSocket::connect_retry(CID_LOCAL, LISTEN[1], SockType::Stream, STEP)?;
    h.set_timeout(STEP)?;
    let mut b = [0u8; 1];
    let n = std::io::Read::read(&mut &h, &mut b);
    ensure!(
        matches!(n, Ok(0) | Err(_)),
        "host end to a closed guest port: {n:?}"
    );
    Ok(format!("bytes={STREAM_BYTES}"))
}

/// 100 connections at once, each echoing 32 KiB through the host end. Reports the daemon's
/// resident memory per open connection.
fn conns100(setup: &Setup, vm: &TestVm) -> Result<String> {
    const N: usize = 100;
    let l = VsockSocket::listen(5004, SockType::Stream)?;
    let rss0 = setup.daemon.rss_kib()?;
    let mut pairs = Vec::with_capacity(N);
    for _ in 0..N {
        pairs.push(g2h(vm, &l, 5004, SockType::Stream)?);
    }
    let rss1 = setup.daemon.rss_kib()?;
    thread::scope(|sc| -> Result<()> {
        let mut handles = Vec::new();
        for (i, (g, h)) in pairs.iter().enumerate() {
            handles.push(sc.spawn(move || -> Result<()> {
                let echoer = thread::scope(|s2| {
                    let e = s2.spawn(|| echo(&mut &*h));
                    let data = Pattern::bytes(i as u64, 32 << 10);
                    let back = exchange(g, &data).context("exchange")?;
                    ensure!(back == data, "connection {i}: echo differs");
                    g.shutdown(false, true)?;
                    e.join()
                        .map_err(|_| anyhow::anyhow!("echo panicked"))?
                        .context("echo")
                })?;
                ensure!(
                    echoer == 32 << 10,
                    "connection {i}: host echoed {echoer} bytes"
                );
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("connection thread panicked"))??;
        }
        Ok(())
    })?;
    let per_conn = (rss1.saturating_sub(rss0) * 1024) / N as u64;
    Ok(format!("connections={N} rss_bytes_per_conn={per_conn}"))
}

/// Runs one named case against the running daemon and VM (all but `restart`).
pub fn run_case(name: &str, setup: &Setup, vm: &TestVm) -> Result<String> {
    match name {
        "streams" => streams(vm),
        "half-close" => half_close(vm),
        "seqpacket" => seqpacket(vm),
        "rst" => rst(vm),
        "listen" => listen(vm),
        "conns100" => conns100(setup, vm),
        "route" => crate::forward_route::host_vsock_route(),
        other => bail!("unknown case {other}"),
    }
}

/// The daemon stops (SIGTERM) and starts again with the same command line; the VMM
/// reconnects. The `forward-listen` ports are listened on again and both directions work.
pub fn restart(setup: Setup, vm: TestVm) -> Result<String> {
    let t0 = Instant::now();
    vm.shutdown();
    drop(setup);
    let setup = forwarding_daemon(DaemonKind::VhostPlug, &LISTEN)?;
    let vm = setup.boot(0)?;
    let l = VsockSocket::listen(5005, SockType::Stream)?;
    let (g, h) = g2h(&vm, &l, 5005, SockType::Stream)?;
    both_ways(&g, &h, 1 << 20)?;
    let gl = vm.guest.listen(LISTEN[0], SockType::Stream)?;
    let h = VsockSocket::connect_retry(CID_LOCAL, LISTEN[0], SockType::Stream, STEP)?;
    h.set_timeout(STEP)?;
    let mut g = gl.accept(STEP)?;
    g.set_timeout(STEP);
    both_ways(&g, &h, 1 << 20)?;
    vm.guest.health()?;
    Ok(format!("ms={}", t0.elapsed().as_millis()))
}

/// Live upgrade of a forwarding VM (`vhost-plug ctl upgrade`, 3 times): a checksummed
/// stream flows each way over a connection forwarded to CID 1 throughout, and a
/// `forward-listen` connection is held open; both carry on with nothing lost or duplicated,
/// the guest sees no RST and no TRANSPORT_RESET, the simulated VMM keeps its one vhost-user
/// connection, and new connections both ways work after. Reports each upgrade's pause.
pub fn upgrade() -> Result<String> {
    let dir = tempfile::tempdir()?;
    let control = dir.path().join("ctl");
    let c = control.display().to_string();
    let setup = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3).forward(CID_LOCAL, &LISTEN)],
        &["--control-socket", &c],
    )?;
    let mut current = crate::upgrade::Current(None);
    let r = upgrade_on(&setup, &control, &mut current);
    drop(current);
    r.map_err(|e| {
        let log = setup.daemon.stderr();
        let tail: Vec<&str> = log.lines().rev().take(12).collect();
        anyhow::anyhow!("{e:#} || daemon log, newest first: {}", tail.join(" / "))
    })
}

fn upgrade_on(
    setup: &Setup,
    control: &std::path::Path,
    current: &mut crate::upgrade::Current,
) -> Result<String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let vm = setup.boot(0)?;
    let l = VsockSocket::listen(5006, SockType::Stream)?;
    let (g, h) = g2h(&vm, &l, 5006, SockType::Stream)?;
    let gl = vm.guest.listen(LISTEN[0], SockType::Stream)?;
    let held_h = VsockSocket::connect_retry(CID_LOCAL, LISTEN[0], SockType::Stream, STEP)?;
    held_h.set_timeout(STEP)?;
    let mut held_g = gl.accept(STEP)?;
    held_g.set_timeout(STEP);
    let seq = vm.guest.log_seq();
    let stop = AtomicBool::new(false);
    let mut pauses = Vec::new();
    thread::scope(|sc| -> Result<()> {
        let g_tx = sc.spawn(|| crate::data::send_until(&g, 31, &stop));
        let h_tx = sc.spawn(|| crate::data::send_until(&h, 32, &stop));
        let h_rx = sc.spawn(|| recv_digest(&h, u64::MAX, 65536));
        let g_rx = sc.spawn(|| recv_digest(&g, u64::MAX, 65536));
        let r = (|| -> Result<()> {
            for round in 0..UPGRADES {
                thread::sleep(Duration::from_millis(200));
                let (pid, v) = crate::upgrade::upgrade(control, &[])
                    .with_context(|| format!("upgrade {round}"))?;
                current.0 = Some(pid);
                pauses.push(v["pause_us"][0].as_u64().unwrap_or(0));
            }
            thread::sleep(Duration::from_millis(200));
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        let join = |r: thread::Result<std::io::Result<_>>, what: &str| {
            r.map_err(|_| anyhow::anyhow!("{what} panicked"))?
                .with_context(|| what.to_string())
        };
        let sent_g = join(g_tx.join(), "guest send")?;
        g.shutdown(false, true)?;
        let sent_h = join(h_tx.join(), "host send")?;
        h.shutdown(Shutdown::Write)?;
        let got_h = join(h_rx.join(), "host receive")?;
        let got_g = join(g_rx.join(), "guest receive")?;
        r?;
        ensure!(
            sent_g == got_h,
            "guest -> host: sent {sent_g:?}, got {got_h:?}"
        );
        ensure!(
            sent_h == got_g,
            "host -> guest: sent {sent_h:?}, got {got_g:?}"
        );
        Ok(())
    })?;
    let rsts = vm
        .guest
        .packets_since(seq)
        .iter()
        .filter(|p| p.hdr.op == OP_RST)
        .count();
    ensure!(rsts == 0, "{rsts} RST packets during the upgrades");
    // The held forward-listen connection, both ways.
    std::io::Write::write_all(&mut &held_h, b"held")?;
    let mut b = [0u8; 4];
    let mut at = 0;
    while at < 4 {
        let n = held_g.recv(&mut b[at..])?;
        ensure!(n > 0, "held connection: guest saw EOF");
        at += n;
    }
    ensure!(&b == b"held", "held connection host -> guest: {b:?}");
    held_g.send(b"back")?;
    std::io::Read::read_exact(&mut &held_h, &mut b)?;
    ensure!(&b == b"back", "held connection guest -> host: {b:?}");
    // New connections both ways, served by the newest daemon.
    let (g, h) = g2h(&vm, &l, 5006, SockType::Stream)?;
    both_ways(&g, &h, 1 << 20)?;
    let h = VsockSocket::connect_retry(CID_LOCAL, LISTEN[0], SockType::Stream, STEP)?;
    h.set_timeout(STEP)?;
    let mut g = gl.accept(STEP)?;
    g.set_timeout(STEP);
    both_ways(&g, &h, 1 << 20)?;
    ensure!(
        vm.guest.events().is_empty(),
        "the guest saw events {:?}",
        vm.guest.events()
    );
    vm.guest.health()?;
    ensure!(
        vm.sim.is_connected(),
        "the VMM lost its vhost-user connection"
    );
    let (ok, st) = crate::harness::ctl(control, &["status"])?;
    ensure!(
        ok && st["vms"][0]["frontend"] == true,
        "status after the upgrades: {st}"
    );
    vm.shutdown();
    // Where the pauses went, from the daemons' own log lines.
    let log = setup.daemon.stderr();
    let fields = |msg: &str, keys: &[&str]| -> String {
        log.lines()
            .filter(|l| l.contains(msg))
            .map(|l| {
                keys.iter()
                    .filter_map(|k| l.split_whitespace().find(|w| w.starts_with(k)))
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    Ok(format!(
        "upgrades={UPGRADES} pause_us={} quiesce={} adopt={}",
        pauses
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        fields(
            "quiesced for a live upgrade",
            &["stopped_us=", "encoded_us="]
        ),
        fields(
            "adopted a live-upgraded session",
            &["restored_us=", "replayed_us="]
        ),
    ))
}

/// One benchmark run of `kind`'s forward path in this guest: guest -> AF_VSOCK and back
/// throughput (MB/s, `BENCH_BYTES` each, one direction at a time) and the round trip of one
/// byte (microseconds, median of `RTT_ROUNDS`), on a connection forwarded to CID 1.
pub fn bench(kind: DaemonKind) -> Result<String> {
    const BENCH_BYTES: u64 = 32 << 20;
    const RTT_ROUNDS: usize = 2000;
    const COUNT_ROUNDS: usize = 1000;
    let setup = forwarding_daemon(kind, &[])?;
    let vm = setup.boot(0)?;
    let l = VsockSocket::listen(5101, SockType::Stream)?;
    let (g, h) = g2h(&vm, &l, 5101, SockType::Stream)?;
    let mbs = |bytes: u64, t: Duration| bytes as f64 / t.as_secs_f64() / 1e6;
    let (g2h_t, h2g_t) = thread::scope(|sc| -> Result<(Duration, Duration)> {
        let t0 = Instant::now();
        let rx = sc.spawn(|| recv_digest(&h, BENCH_BYTES, 65536));
        let sent = send_pattern(&g, 3, BENCH_BYTES, 65536)?;
        let got = rx
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        let g2h_t = t0.elapsed();
        ensure!(sent == got, "guest -> host: sent {sent:?}, got {got:?}");
        let t0 = Instant::now();
        let rx = sc.spawn(|| recv_digest(&g, BENCH_BYTES, 65536));
        let sent = send_pattern(&h, 4, BENCH_BYTES, 65536)?;
        let got = rx
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        ensure!(sent == got, "host -> guest: sent {sent:?}, got {got:?}");
        Ok((g2h_t, t0.elapsed()))
    })?;
    let mut rtts = round_trips(&g, &h, RTT_ROUNDS)?;
    // The same again, counted (not timed): system calls and context switches per round trip
    // of the daemon and of this process (simulated VMM and guest driver, the echoing host
    // program).
    let counts = if crate::syscount::available() {
        let daemon = setup.daemon.pid().context("daemon pid")?;
        let perf = std::path::Path::new("/bin/perf").exists().then(|| {
            let out = format!("/tmp/perf-{}.data", kind.name());
            std::process::Command::new("/bin/perf")
                .args([
                    "record",
                    "-q",
                    "-e",
                    "cpu-clock",
                    "-F",
                    "4000",
                    "-a",
                    "-o",
                    &out,
                ])
                .spawn()
                .map(|child| (child, out))
        });
        if perf.is_some() {
            thread::sleep(Duration::from_secs(2));
        }
        let rec = crate::syscount::Recorder::start(&[daemon, std::process::id()])?;
        round_trips(&g, &h, COUNT_ROUNDS)?;
        let (c, extra) = rec.stop()?;
        if let Some(Ok((child, out))) = perf {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let _ = child.wait_with_output();
            let _ = std::process::Command::new("/bin/perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "--percent-limit",
                    "0.7",
                    "--sort",
                    "comm,dso,sym",
                    "-i",
                    &out,
                ])
                .status();
            let _ = std::process::Command::new("/bin/perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "--sort",
                    "comm",
                    "-i",
                    &out,
                ])
                .status();
        }
        // `ev:key:count/round,...` for what happens at least once per 10 rounds.
        let mut ex: Vec<_> = extra
            .iter()
            .filter(|(_, v)| **v * 10 >= COUNT_ROUNDS as u64)
            .collect();
        ex.sort_by(|a, b| b.1.cmp(a.1));
        let ex = |which: &str| {
            ex.iter()
                .filter(|((e, _), _)| e.contains(which))
                .map(|((_, k), v)| {
                    format!(
                        "{}:{:.2}",
                        k.replace(' ', "_"),
                        **v as f64 / COUNT_ROUNDS as f64
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let n = COUNT_ROUNDS as u64;
        let per = |x: u64| x as f64 / n as f64;
        format!(
            " d_sys={:.2} d_vcsw={:.2} d_icsw={:.2} d_cpu_us={:.1} h_sys={:.2} h_vcsw={:.2} \
             h_cpu_us={:.1} d_calls={} h_calls={} vsock_ops={} wakeups={}",
            per(c[0].total_syscalls()),
            per(c[0].voluntary),
            per(c[0].involuntary),
            per(c[0].cpu_ns) / 1000.0,
            per(c[1].total_syscalls()),
            per(c[1].voluntary),
            per(c[1].cpu_ns) / 1000.0,
            crate::syscount::per_round(&c[0], n),
            crate::syscount::per_round(&c[1], n),
            ex("vsock"),
            ex("sched"),
        )
    } else {
        String::new()
    };
    rtts.sort();
    let rtt = rtts[rtts.len() / 2];
    Ok(format!(
        "g2h_mbs={:.1} h2g_mbs={:.1} rtt_us={:.1}{counts}",
        mbs(BENCH_BYTES, g2h_t),
        mbs(BENCH_BYTES, h2g_t),
        rtt.as_secs_f64() * 1e6
    ))
}

/// `rounds` one-byte round trips: the guest sends a byte, the host end echoes it. Returns
/// each one's time.
fn round_trips(g: &GuestSocket, h: &VsockSocket, rounds: usize) -> Result<Vec<Duration>> {
    let mut rtts = Vec::with_capacity(rounds);
    let mut b = [0u8; 1];
    thread::scope(|sc| -> Result<()> {
        let echo_one = sc.spawn(|| -> std::io::Result<()> {
            let mut b = [0u8; 1];
            for _ in 0..rounds {
                std::io::Read::read_exact(&mut &*h, &mut b)?;
                std::io::Write::write_all(&mut &*h, &b)?;
            }
            Ok(())
        });
        for _ in 0..rounds {
            let t0 = Instant::now();
            g.send(&b)?;
            ensure!(g.recv(&mut b)? == 1, "round trip: end of stream");
            rtts.push(t0.elapsed());
        }
        echo_one
            .join()
            .map_err(|_| anyhow::anyhow!("echo panicked"))?
            .context("echo")
    })?;
    Ok(rtts)
}
