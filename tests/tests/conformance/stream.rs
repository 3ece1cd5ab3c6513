//! Stream scenarios: echo both ways, CONNECT, half-close, refusal, bulk transfers, 1,000
//! connections.

use super::*;

pub(super) fn guest_to_host_echo(kind: DaemonKind) -> Outcome {
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

pub(super) fn host_to_guest_echo(kind: DaemonKind) -> Outcome {
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
pub(super) fn connect_ok_port(kind: DaemonKind) -> Outcome {
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

pub(super) fn bytes_after_connect(kind: DaemonKind) -> Outcome {
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

pub(super) fn half_close_host_write(kind: DaemonKind) -> Outcome {
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

pub(super) fn half_close_guest_write(kind: DaemonKind) -> Outcome {
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

pub(super) fn connect_refused(kind: DaemonKind) -> Outcome {
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

pub(super) fn one_way(
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

pub(super) fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
}

pub(super) fn sustained_64mib(kind: DaemonKind) -> Outcome {
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

pub(super) fn big_bytes() -> u64 {
    std::env::var("VHOST_PLUG_BIG_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30)
}

pub(super) fn big_transfer(kind: DaemonKind) -> Outcome {
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

pub(super) fn thousand_connections(kind: DaemonKind) -> Outcome {
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
