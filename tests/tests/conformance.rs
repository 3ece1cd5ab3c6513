//! Conformance scenarios, each run against vhost-plug (must pass) and against the reference
//! daemon vhost-device-vsock 0.3.0 (must match the documented expected-difference table, so
//! that a change in either daemon's behaviour is noticed).
//!
//! Run with output: `cargo test -p vhost-plug-tests --release --test conformance -- --nocapture`
//! (each test prints one `[conformance]` summary line).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::thread::{self, ScopedJoinHandle};
use std::time::{Duration, Instant};

use vhost_plug_tests::data::{digest, recv_digest, send_pattern, Pattern};
use vhost_plug_tests::harness::{
    echo_guest, echo_stream, ensure, exchange, fail, Code, Outcome, Setup, TestVm,
};
use vhost_plug_tests::host::{
    accept_timeout, host_connect, host_connect_with, host_listen, host_seqpacket_connect,
    wait_readable, SeqpacketListener, HOST_TIMEOUT,
};
use vhost_plug_tests::packet::{HOST_CID, OP_REQUEST, OP_RST};
use vhost_plug_tests::{
    ConnectError, DaemonKind, DriverConfig, QueueSet, RxLayout, SimConfig, SockType, TxLayout,
    VmSpec,
};

/// Bound for things a correct daemon does at once (RST, EOF, delivery of queued bytes).
const PROMPT: Duration = Duration::from_secs(5);

// ----- expected differences -------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Pass,
    /// Fails with this failure code.
    Fails(&'static str),
}

/// How vhost-device-vsock 0.3.0 behaves in each scenario, with the reason from its source.
const PEER_EXPECTED: &[(&str, Expect, &str)] = &[
    ("guest_to_host_echo", Expect::Pass, ""),
    ("host_to_guest_echo", Expect::Pass, ""),
    (
        "connect_ok_port",
        Expect::Fails("ok-port-mismatch"),
        "the OK line carries the guest's port (peer_port), not the host-side port it \
         allocated (the guest sees host ports 0, 1, ...)",
    ),
    (
        "bytes_after_connect",
        Expect::Fails("bytes-after-connect-lost"),
        "read_local_stream_port() parses the CONNECT line through a BufReader that is then \
         dropped: bytes that arrived with the line are discarded",
    ),
    (
        "half_close_host_write",
        Expect::Fails("guest-send-after-host-shutwr-failed"),
        "EOF on the host socket is sent as SHUTDOWN(RCV|SEND), so the guest may no longer send",
    ),
    (
        "half_close_guest_write",
        Expect::Fails("no-eof-after-guest-shutdown"),
        "a guest SHUTDOWN with only one flag is ignored; the host socket is never shut down",
    ),
    (
        "connect_refused",
        Expect::Fails("no-rst"),
        "enq_rst() only logs: a failed connect to <uds>_<port> is never answered",
    ),
    ("sustained_64mib", Expect::Pass, ""),
    ("big_transfer", Expect::Pass, ""),
    ("thousand_connections", Expect::Pass, ""),
    (
        "seqpacket_guest_to_host",
        Expect::Fails("seqpacket-not-negotiated"),
        "VIRTIO_VSOCK_F_SEQPACKET is not offered",
    ),
    (
        "seqpacket_host_to_guest",
        Expect::Fails("seqpacket-not-negotiated"),
        "VIRTIO_VSOCK_F_SEQPACKET is not offered",
    ),
    (
        "spoofed_src_cid",
        Expect::Fails("spoof-src-no-rst"),
        "packets with a foreign src_cid are dropped silently (no RST)",
    ),
    (
        "spoofed_dst_cid",
        Expect::Fails("spoof-dst-no-rst"),
        "packets to a CID outside the group are dropped silently (no RST)",
    ),
    (
        "siblings_same_group",
        Expect::Fails("sibling-large-packets"),
        "packets are forwarded to the sibling as they are: a 64 KiB packet is copied into a \
         4 KiB rx buffer with its header len unchanged",
    ),
    (
        "siblings_cross_group",
        Expect::Fails("cross-group-no-rst"),
        "a connect to a guest of another group is dropped silently, so it times out",
    ),
    ("vmm_disconnect_reconnect", Expect::Pass, ""),
    ("driver_variants", Expect::Pass, ""),
];

fn peer_expected(name: &str) -> Expect {
    PEER_EXPECTED
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, e, _)| *e)
        .unwrap_or_else(|| panic!("scenario {name} is missing from PEER_EXPECTED"))
}

fn run(kind: DaemonKind, name: &str, scenario: fn(DaemonKind) -> Outcome) {
    let t0 = Instant::now();
    let outcome = scenario(kind);
    let secs = t0.elapsed().as_secs_f64();
    let observed = match &outcome {
        Ok(()) => "pass",
        Err(f) => f.code,
    };
    let line = |verdict: &str| {
        eprintln!(
            "[conformance] {:<18} {:<26} {:<40} {:>6.1}s  {verdict}",
            kind.name(),
            name,
            observed,
            secs
        )
    };
    if let Err(f) = &outcome {
        let d = f.detail.lines().next().unwrap_or("");
        eprintln!("              {name}: {}", &d[..d.len().min(400)]);
    }
    match kind {
        DaemonKind::VhostPlug => match outcome {
            Ok(()) => line("ok"),
            Err(f) => {
                line("FAIL");
                panic!("{name} failed against vhost-plug: {f}");
            }
        },
        DaemonKind::Peer => {
            let exp = peer_expected(name);
            let matches = match (&exp, &outcome) {
                (Expect::Pass, Ok(())) => true,
                (Expect::Fails(code), Err(f)) => f.code == *code,
                _ => false,
            };
            if matches {
                line("as expected");
            } else {
                line("DRIFT");
                panic!(
                    "{name} against {}: expected {exp:?}, observed {outcome:?}. If the \
                     difference is intended, update PEER_EXPECTED.",
                    kind.name()
                );
            }
        }
    }
}

// ----- helpers ----------------------------------------------------------------------------

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Runs `body` with a daemon; on failure appends the daemon's stderr; checks it is alive.
fn with_setup(mut setup: Setup, body: impl FnOnce(&mut Setup) -> Outcome) -> Outcome {
    let r = body(&mut setup).and_then(|()| {
        let running = setup.daemon.is_running();
        ensure(running, "daemon-exited", || "the daemon exited".into())
    });
    r.map_err(|mut f| {
        f.detail.push_str("\n--- daemon stderr (tail) ---\n");
        f.detail.push_str(tail(&setup.daemon.stderr(), 6000));
        f
    })
}

fn join<T>(h: ScopedJoinHandle<'_, anyhow::Result<T>>) -> anyhow::Result<T> {
    h.join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked")))
}

/// The driver saw no device misbehaviour. Blank rx buffers are a documented bug of the
/// reference daemon (its rx path pops connection keys of removed connections and still
/// returns the buffer), tolerated for it only.
fn healthy(kind: DaemonKind, guest: &vhost_plug_tests::Guest) -> Outcome {
    match kind {
        DaemonKind::VhostPlug => guest.health().code("driver-health"),
        DaemonKind::Peer => guest.health_tolerating_blank_rx().code("driver-health"),
    }
}

/// Reads from a host stream expecting end of stream (0 or a reset) within `t`.
fn host_expect_eof(s: &mut UnixStream, t: Duration) -> anyhow::Result<()> {
    s.set_read_timeout(Some(t))?;
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => Ok(()),
        Ok(n) => anyhow::bail!("expected end of stream, read {n} bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(e.into()),
    }
}

// ----- scenarios ----------------------------------------------------------------------------

fn guest_to_host_echo(kind: DaemonKind) -> Outcome {
    with_setup(Setup::new(kind, &[3]).code("setup")?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        let listener = host_listen(&vm.spec.uds_path, 1234).code("host-listen")?;
        thread::scope(|sc| {
            let server = sc.spawn(|| -> anyhow::Result<u64> {
                let s = accept_timeout(&listener, HOST_TIMEOUT)?;
                Ok(echo_stream(s)?)
            });
            let guest_side = || -> Result<u64, vhost_plug_tests::harness::Failure> {
                let sock = vm
                    .guest
                    .connect(HOST_CID, 1234, SockType::Stream)
                    .code("connect")?;
                let mut total = 0;
                for (i, size) in [1usize, 1000, 200_000, 3 * 65536 + 7]
                    .into_iter()
                    .enumerate()
                {
                    let data = Pattern::bytes(i as u64, size);
                    let back = exchange(&sock, &data).code("echo-io")?;
                    ensure(back == data, "echo-corrupt", || {
                        format!("message {i} ({size} bytes) came back different")
                    })?;
                    total += size as u64;
                }
                sock.close().code("close")?;
                Ok(total)
            };
            let sent = guest_side();
            let echoed = join(server).code("host-echo")?;
            let sent = sent?;
            ensure(echoed == sent, "echo-count", || {
                format!("host echoed {echoed} bytes, guest sent {sent}")
            })
        })?;
        healthy(kind, &vm.guest)
    })
}

fn host_to_guest_echo(kind: DaemonKind) -> Outcome {
    with_setup(Setup::new(kind, &[3]).code("setup")?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        let listener = vm
            .guest
            .listen(5000, SockType::Stream)
            .code("guest-listen")?;
        thread::scope(|sc| {
            let guest = sc.spawn(|| -> anyhow::Result<u64> {
                let s = listener.accept(HOST_TIMEOUT)?;
                Ok(echo_guest(&s)?)
            });
            let host_side = || -> Result<u64, vhost_plug_tests::harness::Failure> {
                let (s, _) = host_connect(&vm.spec.uds_path, 5000).code("host-connect")?;
                let mut total = 0;
                for (i, size) in [5usize, 4096, 300_000].into_iter().enumerate() {
                    let data = Pattern::bytes(100 + i as u64, size);
                    let back = exchange(&s, &data).code("echo-io")?;
                    ensure(back == data, "echo-corrupt", || {
                        format!("message {i} ({size} bytes) came back different")
                    })?;
                    total += size as u64;
                }
                drop(s);
                Ok(total)
            };
            let host = host_side();
            let echoed = join(guest).code("guest-echo")?;
            let sent = host?;
            ensure(echoed == sent, "echo-count", || {
                format!("guest echoed {echoed}, host sent {sent}")
            })
        })?;
        healthy(kind, &vm.guest)
    })
}

/// `OK <n>` names the host-side port the guest sees as its peer, distinct per connection.
fn connect_ok_port(kind: DaemonKind) -> Outcome {
    with_setup(Setup::new(kind, &[3]).code("setup")?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        let listener = vm
            .guest
            .listen(5010, SockType::Stream)
            .code("guest-listen")?;
        let mut seen = Vec::new();
        let mut keep = Vec::new();
        for _ in 0..3 {
            let (s, assigned) = host_connect(&vm.spec.uds_path, 5010).code("host-connect")?;
            let g = listener.accept(PROMPT).code("accept")?;
            ensure(
                g.peer_cid() == HOST_CID && g.peer_port() == assigned,
                "ok-port-mismatch",
                || {
                    format!(
                        "guest sees peer {}:{}, OK line said host port {assigned}",
                        g.peer_cid(),
                        g.peer_port()
                    )
                },
            )?;
            seen.push(assigned);
            keep.push((s, g));
        }
        seen.sort_unstable();
        seen.dedup();
        ensure(seen.len() == 3, "ok-port-reused", || {
            format!("three live connections got ports {seen:?}")
        })?;
        healthy(kind, &vm.guest)
    })
}

fn bytes_after_connect(kind: DaemonKind) -> Outcome {
    with_setup(Setup::new(kind, &[3]).code("setup")?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        let listener = vm
            .guest
            .listen(5001, SockType::Stream)
            .code("guest-listen")?;
        let (mut host, _) =
            host_connect_with(&vm.spec.uds_path, 5001, b"HELLO").code("host-connect")?;
        let mut gs = listener.accept(PROMPT).code("accept")?;
        gs.set_timeout(PROMPT);
        let mut buf = [0u8; 5];
        (&gs)
            .read_exact(&mut buf)
            .code("bytes-after-connect-lost")?;
        ensure(&buf == b"HELLO", "bytes-after-connect-corrupt", || {
            format!("guest read {:?}", String::from_utf8_lossy(&buf))
        })?;
        host.write_all(b"WORLD").code("host-write")?;
        (&gs).read_exact(&mut buf).code("stream-after-connect")?;
        ensure(&buf == b"WORLD", "stream-after-connect", || {
            format!("guest read {:?}", String::from_utf8_lossy(&buf))
        })?;
        healthy(kind, &vm.guest)
    })
}

fn half_close_host_write(kind: DaemonKind) -> Outcome {
    with_setup(Setup::new(kind, &[3]).code("setup")?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        let listener = vm
            .guest
            .listen(5002, SockType::Stream)
            .code("guest-listen")?;
        let (mut host, _) = host_connect(&vm.spec.uds_path, 5002).code("host-connect")?;
        let mut gs = listener.accept(PROMPT).code("accept")?;
        gs.set_timeout(PROMPT);
        host.write_all(b"ping").code("host-write")?;
        host.shutdown(Shutdown::Write).code("host-shutdown")?;
        let mut buf = [0u8; 4];
        (&gs).read_exact(&mut buf).code("guest-read")?;
        ensure(&buf == b"ping", "guest-read", || format!("{buf:?}"))?;
        let n = gs.recv(&mut buf).code("no-eof-after-host-shutdown")?;
        ensure(n == 0, "no-eof-after-host-shutdown", || {
            format!("read {n} bytes instead of EOF")
        })?;
        gs.send(b"after-eof")
            .code("guest-send-after-host-shutwr-failed")?;
        host.set_read_timeout(Some(PROMPT)).code("host-timeout")?;
        let mut back = [0u8; 9];
        host.read_exact(&mut back)
            .code("host-missing-data-after-shutwr")?;
        ensure(
            &back == b"after-eof",
            "host-missing-data-after-shutwr",
            || format!("{back:?}"),
        )?;
        gs.close().code("close")?;
        host_expect_eof(&mut host, PROMPT).code("no-eof-after-close")?;
        healthy(kind, &vm.guest)
    })
}

fn half_close_guest_write(kind: DaemonKind) -> Outcome {
    with_setup(Setup::new(kind, &[3]).code("setup")?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        let listener = host_listen(&vm.spec.uds_path, 1235).code("host-listen")?;
        let mut gs = vm
            .guest
            .connect(HOST_CID, 1235, SockType::Stream)
            .code("connect")?;
        gs.set_timeout(PROMPT);
        let mut host = accept_timeout(&listener, PROMPT).code("host-accept")?;
        gs.send(b"ping").code("guest-send")?;
        gs.shutdown(false, true).code("guest-shutdown")?;
        let mut buf = [0u8; 4];
        host.set_read_timeout(Some(PROMPT)).code("host-timeout")?;
        host.read_exact(&mut buf).code("host-read")?;
        ensure(&buf == b"ping", "host-read", || format!("{buf:?}"))?;
        host_expect_eof(&mut host, PROMPT).code("no-eof-after-guest-shutdown")?;
        host.write_all(b"back")
            .code("host-write-after-guest-shutwr")?;
        (&gs)
            .read_exact(&mut buf)
            .code("guest-missing-data-after-shutwr")?;
        ensure(&buf == b"back", "guest-missing-data-after-shutwr", || {
            format!("{buf:?}")
        })?;
        drop(host);
        let mut b = [0u8; 1];
        let n = gs.recv(&mut b).code("no-eof-after-host-close")?;
        ensure(n == 0, "no-eof-after-host-close", || {
            format!("read {n} bytes")
        })?;
        healthy(kind, &vm.guest)
    })
}

fn connect_refused(kind: DaemonKind) -> Outcome {
    with_setup(Setup::new(kind, &[3]).code("setup")?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        match vm
            .guest
            .connect_timeout(HOST_CID, 4444, SockType::Stream, PROMPT)
        {
            Err(ConnectError::Refused) => {}
            Err(ConnectError::TimedOut) => {
                return Err(fail("no-rst", format!("no answer within {PROMPT:?}")))
            }
            Err(e) => return Err(fail("connect-error", e.to_string())),
            Ok(_) => return Err(fail("connected-to-nothing", "connect succeeded")),
        }
        // The driver keeps working after a refusal.
        let listener = host_listen(&vm.spec.uds_path, 4445).code("host-listen")?;
        let gs = vm
            .guest
            .connect(HOST_CID, 4445, SockType::Stream)
            .code("connect-after-refusal")?;
        let mut host = accept_timeout(&listener, PROMPT).code("host-accept")?;
        gs.send(b"x").code("send")?;
        let mut b = [0u8; 1];
        host.read_exact(&mut b).code("host-read")?;
        healthy(kind, &vm.guest)
    })
}

fn one_way(
    vm: &TestVm,
    port_h2g: u32,
    port_g2h: u32,
    total: u64,
) -> Result<(f64, f64), vhost_plug_tests::harness::Failure> {
    // host -> guest
    let listener = vm
        .guest
        .listen(port_h2g, SockType::Stream)
        .code("guest-listen")?;
    let (host, _) = host_connect(&vm.spec.uds_path, port_h2g).code("host-connect")?;
    let gs = listener.accept(PROMPT).code("accept")?;
    let t0 = Instant::now();
    let (sent, got) = thread::scope(|sc| {
        let tx = sc.spawn(|| -> anyhow::Result<_> { Ok(send_pattern(&host, 1, total, 65536)?) });
        let got = recv_digest(&gs, total, 65536);
        (join(tx), got)
    });
    let h2g = t0.elapsed().as_secs_f64();
    let sent = sent.code("h2g-host-send")?;
    let got = got.code("h2g-stall")?;
    ensure(sent == got, "h2g-corrupt", || {
        format!("sent {sent:?}, got {got:?}")
    })?;
    drop(gs);
    drop(host);
    // guest -> host
    let hl = host_listen(&vm.spec.uds_path, port_g2h).code("host-listen")?;
    let gs = vm
        .guest
        .connect(HOST_CID, port_g2h, SockType::Stream)
        .code("connect")?;
    let host = accept_timeout(&hl, PROMPT).code("host-accept")?;
    let t0 = Instant::now();
    let (sent, got) = thread::scope(|sc| {
        let tx = sc.spawn(|| -> anyhow::Result<_> { Ok(send_pattern(&gs, 2, total, 65536)?) });
        let got = recv_digest(&host, total, 65536);
        (join(tx), got)
    });
    let g2h = t0.elapsed().as_secs_f64();
    let sent = sent.code("g2h-stall")?;
    let got = got.code("g2h-host-recv")?;
    ensure(sent == got, "g2h-corrupt", || {
        format!("sent {sent:?}, got {got:?}")
    })?;
    Ok((h2g, g2h))
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
}

fn sustained_64mib(kind: DaemonKind) -> Outcome {
    with_setup(Setup::new(kind, &[3]).code("setup")?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        let total = 64u64 << 20;
        let (h2g, g2h) = one_way(&vm, 5003, 1236, total)?;
        eprintln!(
            "[perf] {} sustained 64 MiB: host->guest {:.2}s ({:.0} MiB/s), guest->host {:.2}s \
             ({:.0} MiB/s), driver {:?}",
            kind.name(),
            h2g,
            mib_s(total, h2g),
            g2h,
            mib_s(total, g2h),
            vm.guest.stats()
        );
        healthy(kind, &vm.guest)
    })
}

fn big_bytes() -> u64 {
    std::env::var("VHOST_PLUG_BIG_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30)
}

fn big_transfer(kind: DaemonKind) -> Outcome {
    with_setup(Setup::new(kind, &[3]).code("setup")?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        let total = big_bytes();
        let hl = host_listen(&vm.spec.uds_path, 1237).code("host-listen")?;
        let gs = vm
            .guest
            .connect(HOST_CID, 1237, SockType::Stream)
            .code("connect")?;
        let host = accept_timeout(&hl, PROMPT).code("host-accept")?;
        let t0 = Instant::now();
        let (g_sent, g_got, h_sent, h_got) = thread::scope(|sc| {
            let g_tx =
                sc.spawn(|| -> anyhow::Result<_> { Ok(send_pattern(&gs, 21, total, 65536)?) });
            let g_rx = sc.spawn(|| -> anyhow::Result<_> { Ok(recv_digest(&gs, total, 65536)?) });
            let h_tx =
                sc.spawn(|| -> anyhow::Result<_> { Ok(send_pattern(&host, 22, total, 65536)?) });
            let h_got = recv_digest(&host, total, 65536);
            (join(g_tx), join(g_rx), join(h_tx), h_got)
        });
        let secs = t0.elapsed().as_secs_f64();
        let g_sent = g_sent.code("g2h-stall")?;
        let h_got = h_got.code("g2h-host-recv")?;
        let h_sent = h_sent.code("h2g-host-send")?;
        let g_got = g_got.code("h2g-stall")?;
        ensure(g_sent == h_got, "g2h-corrupt", || {
            format!("sent {g_sent:?} got {h_got:?}")
        })?;
        ensure(h_sent == g_got, "h2g-corrupt", || {
            format!("sent {h_sent:?} got {g_got:?}")
        })?;
        eprintln!(
            "[perf] {} big transfer: {} MiB each way, full duplex, one connection: {:.2}s \
             ({:.0} MiB/s per direction); driver {:?}",
            kind.name(),
            total >> 20,
            secs,
            mib_s(total, secs),
            vm.guest.stats()
        );
        healthy(kind, &vm.guest)
    })
}

fn thousand_connections(kind: DaemonKind) -> Outcome {
    const N: usize = 1000;
    const SIZE: usize = 16 * 1024;
    const WORKERS: usize = 8;
    with_setup(Setup::new(kind, &[3]).code("setup")?, |setup| {
        let vm = setup.boot(0).code("boot")?;
        let hl = host_listen(&vm.spec.uds_path, 1300).code("host-listen")?;
        let t0 = Instant::now();
        let (connect_s, xfer_s) = thread::scope(|sc| {
            let acceptor = sc.spawn(|| -> anyhow::Result<u64> {
                let mut echoers = Vec::with_capacity(N);
                for _ in 0..N {
                    let s = accept_timeout(&hl, HOST_TIMEOUT)?;
                    echoers.push(
                        thread::Builder::new()
                            .stack_size(64 * 1024)
                            .spawn(move || echo_stream(s))?,
                    );
                }
                let mut total = 0;
                for e in echoers {
                    total += e
                        .join()
                        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
                }
                Ok(total)
            });
            let guest_side = || -> Result<(f64, f64), vhost_plug_tests::harness::Failure> {
                let mut socks = Vec::with_capacity(N);
                for i in 0..N {
                    let s = vm
                        .guest
                        .connect(HOST_CID, 1300, SockType::Stream)
                        .map_err(|e| fail("connect", format!("connection {i}: {e}")))?;
                    socks.push(s);
                }
                let connect_s = t0.elapsed().as_secs_f64();
                ensure(vm.guest.socket_count() >= N, "connect", || {
                    format!("only {} sockets open", vm.guest.socket_count())
                })?;
                let t1 = Instant::now();
                let errors: Vec<String> = thread::scope(|sc2| {
                    let handles: Vec<_> = socks
                        .chunks(N.div_ceil(WORKERS))
                        .enumerate()
                        .map(|(w, chunk)| {
                            sc2.spawn(move || {
                                let mut errs = Vec::new();
                                for (j, s) in chunk.iter().enumerate() {
                                    let idx = w * N.div_ceil(WORKERS) + j;
                                    let data = Pattern::bytes(1000 + idx as u64, SIZE);
                                    let mut back = vec![0u8; SIZE];
                                    let r =
                                        s.send(&data).and_then(|()| (&*s).read_exact(&mut back));
                                    match r {
                                        Err(e) => errs.push(format!("conn {idx}: {e}")),
                                        Ok(()) if digest(&back) != digest(&data) => {
                                            errs.push(format!("conn {idx}: checksum mismatch"))
                                        }
                                        Ok(()) => {}
                                    }
                                }
                                errs
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .flat_map(|h| {
                            h.join()
                                .unwrap_or_else(|_| vec!["worker panicked".to_string()])
                        })
                        .collect()
                });
                let xfer_s = t1.elapsed().as_secs_f64();
                ensure(errors.is_empty(), "conn-failed", || {
                    format!(
                        "{} of {N} connections failed: {:?}",
                        errors.len(),
                        &errors[..errors.len().min(5)]
                    )
                })?;
                drop(socks);
                Ok((connect_s, xfer_s))
            };
            let g = guest_side();
            let echoed = join(acceptor).code("host-echo")?;
            let times = g?;
            ensure(echoed == (N * SIZE) as u64, "echo-count", || {
                format!("host echoed {echoed} bytes, want {}", N * SIZE)
            })?;
            Ok(times)
        })?;
        eprintln!(
            "[perf] {} {N} concurrent connections: connect {:.2}s ({:.0}/s), {} KiB echo each \
             {:.2}s",
            kind.name(),
            connect_s,
            N as f64 / connect_s.max(1e-9),
            SIZE / 1024,
            xfer_s
        );
        healthy(kind, &vm.guest)
    })
}

/// Message sizes; 100 000 bytes takes two tx packets (64 KiB max each) and needs a peer
/// buffer above 64 KiB, hence `tx-buffer-size=262144` in these scenarios.
const SEQ_SIZES_G2H: [usize; 5] = [1, 100, 4096, 100_000, 3];
const SEQ_SIZES_H2G: [usize; 4] = [5, 100_000, 2, 1000];

fn seqpacket_setup(kind: DaemonKind) -> Result<Setup, vhost_plug_tests::harness::Failure> {
    Setup::with(
        kind,
        |d| vec![VmSpec::new(d, 3).tx_buffer_size(262_144)],
        &[],
    )
    .code("setup")
}

fn seqpacket_guest_to_host(kind: DaemonKind) -> Outcome {
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

fn seqpacket_host_to_guest(kind: DaemonKind) -> Outcome {
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
fn raw_request_gets_rst(
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

fn spoofed_src_cid(kind: DaemonKind) -> Outcome {
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

fn grouped(dir: &std::path::Path) -> Vec<VmSpec> {
    vec![
        VmSpec::new(dir, 3).groups(&["a"]),
        VmSpec::new(dir, 4).groups(&["a", "c"]),
        VmSpec::new(dir, 5).groups(&["b"]),
    ]
}

fn spoofed_dst_cid(kind: DaemonKind) -> Outcome {
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
fn siblings_same_group(kind: DaemonKind) -> Outcome {
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
fn siblings_cross_group(kind: DaemonKind) -> Outcome {
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

fn vmm_disconnect_reconnect(kind: DaemonKind) -> Outcome {
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

fn driver_variants(kind: DaemonKind) -> Outcome {
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

// ----- tests ------------------------------------------------------------------------------

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod peer {
            $(
                #[test]
                fn $name() {
                    super::run(vhost_plug_tests::DaemonKind::Peer, stringify!($name), super::$name);
                }
            )*
        }
        mod vhost_plug {
            $(
                #[test]
                fn $name() {
                    super::run(vhost_plug_tests::DaemonKind::VhostPlug, stringify!($name), super::$name);
                }
            )*
        }
        /// Every scenario has an entry in the expected-difference table and vice versa.
        #[test]
        fn expected_table_is_complete() {
            let names = [$(stringify!($name)),*];
            for n in names {
                peer_expected(n);
            }
            for (n, _, _) in PEER_EXPECTED {
                assert!(names.contains(n), "PEER_EXPECTED names unknown scenario {n}");
            }
            for (n, e, why) in PEER_EXPECTED {
                eprintln!("[expected] vhost-device-vsock {n:<26} {e:?} {why}");
                if let Expect::Fails(_) = e {
                    assert!(!why.is_empty(), "{n}: document why the peer differs");
                }
            }
        }
    };
}

scenarios!(
    guest_to_host_echo,
    host_to_guest_echo,
    connect_ok_port,
    bytes_after_connect,
    half_close_host_write,
    half_close_guest_write,
    connect_refused,
    sustained_64mib,
    big_transfer,
    thousand_connections,
    seqpacket_guest_to_host,
    seqpacket_host_to_guest,
    spoofed_src_cid,
    spoofed_dst_cid,
    siblings_same_group,
    siblings_cross_group,
    vmm_disconnect_reconnect,
    driver_variants,
);
