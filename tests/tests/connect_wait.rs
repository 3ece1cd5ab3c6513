//! `connect-wait`: a host program's `CONNECT` that the guest refuses is asked again with
//! backoff until the VM's deadline; the program gets `OK` once the guest listens, or its
//! socket closed at the deadline. Off (the default), a refusal closes the socket at once, as
//! vhost-device-vsock does. Waiting connections hold handshake slots (1024 per VM) and table
//! entries (`max-connections`), and are removed when the host program goes away. Driven by
//! the simulated VMM, whose guest answers a REQUEST to a port without a listener with RST.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test connect_wait -- --nocapture`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vhost_plug_tests::driver::{Direction, LoggedPacket};
use vhost_plug_tests::harness::{recv_exact, Setup, TestVm};
use vhost_plug_tests::host::{host_connect, HOST_TIMEOUT};
use vhost_plug_tests::packet::{OP_REQUEST, OP_RST};
use vhost_plug_tests::{DaemonKind, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(10);
/// The daemon's handshake slots per VM (`MAX_HANDSHAKES` in host/src/device/mod.rs).
const MAX_HANDSHAKES: usize = 1024;

fn setup(wait: Option<&str>, extra: &[&str]) -> Result<(Setup, TestVm)> {
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| {
            let vm = VmSpec::new(d, 3);
            vec![match wait {
                Some(w) => vm.connect_wait(w),
                None => vm,
            }]
        },
        extra,
    )?;
    let vm = s.boot(0)?;
    Ok((s, vm))
}

/// Packets of the given direction and op to or from guest port `port`, logged since `since`.
fn count(vm: &TestVm, since: u64, dir: Direction, op: u16, port: u32) -> Vec<LoggedPacket> {
    vm.guest
        .packets_since(since)
        .into_iter()
        .filter(|p| p.dir == dir && p.hdr.op == op)
        .filter(|p| match dir {
            Direction::FromDevice => p.hdr.dst_port == port,
            Direction::ToDevice => p.hdr.src_port == port,
        })
        .collect()
}

/// Waits (bounded by [`PROMPT`]) until the guest refused `n` requests to `port`.
fn wait_refusals(vm: &TestVm, since: u64, port: u32, n: usize) -> Result<()> {
    let deadline = Instant::now() + PROMPT;
    while count(vm, since, Direction::ToDevice, OP_RST, port).len() < n {
        ensure!(
            Instant::now() < deadline,
            "the guest refused fewer than {n} requests"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Sends `CONNECT port` and reads the whole answer up to the first newline or the close.
fn connect_line(uds: &std::path::Path, port: u32) -> Result<UnixStream> {
    let mut s = UnixStream::connect(uds).context("connecting to the uds path")?;
    s.set_read_timeout(Some(HOST_TIMEOUT))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    Ok(s)
}

/// The host end was closed without a reply line (a close with our CONNECT line unread shows
/// as a reset).
fn closed_without_reply(s: &mut UnixStream) -> Result<()> {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Ok(n) => bail!(
            "got {:?} instead of a close",
            String::from_utf8_lossy(&b[..n])
        ),
        Err(e) => Err(e).context("waiting for the close"),
    }
}

/// A host program the daemon closes at once: its CONNECT line may meet the close already
/// (EPIPE / ECONNRESET on the write), else it reads the close.
fn turned_away(uds: &std::path::Path, port: u32) -> Result<()> {
    let mut s = UnixStream::connect(uds).context("connecting to the uds path")?;
    s.set_read_timeout(Some(HOST_TIMEOUT))?;
    match s.write_all(format!("CONNECT {port}\n").as_bytes()) {
        Ok(()) => closed_without_reply(&mut s),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e).context("sending the CONNECT line"),
    }
}

#[test]
fn refused_twice_then_accepted() -> Result<()> {
    let (s, vm) = setup(Some("30s"), &[])?;
    let since = vm.guest.log_seq();
    let uds = s.vms[0].uds_path.clone();
    let host = std::thread::spawn(move || host_connect(&uds, 7000));
    wait_refusals(&vm, since, 7000, 2)?;
    let l = vm.guest.listen(7000, SockType::Stream)?;
    let g = l
        .accept(PROMPT)
        .context("the guest never got the connection")?;
    let (mut h, port) = host.join().expect("host thread").context("host connect")?;
    // Every request asked for the same connection: same host port, same guest port.
    let reqs = count(&vm, since, Direction::FromDevice, OP_REQUEST, 7000);
    ensure!(reqs.len() >= 3, "{} requests", reqs.len());
    ensure!(
        reqs.iter().all(|p| p.hdr.src_port == port),
        "requests from other ports than {port}"
    );
    h.write_all(b"after the wait")?;
    ensure!(recv_exact(&g, 14)? == b"after the wait");
    g.send(b"back")?;
    let mut b = [0u8; 4];
    h.read_exact(&mut b)?;
    ensure!(&b == b"back");
    vm.guest.health()?;
    Ok(())
}

#[test]
fn bytes_sent_with_the_connect_line_wait_too() -> Result<()> {
    let (s, vm) = setup(Some("30s"), &[])?;
    let since = vm.guest.log_seq();
    let mut h = connect_line(&s.vms[0].uds_path, 7001)?;
    h.write_all(b"early")?;
    wait_refusals(&vm, since, 7001, 1)?;
    let l = vm.guest.listen(7001, SockType::Stream)?;
    let g = l.accept(PROMPT)?;
    let mut line = [0u8; 3];
    h.read_exact(&mut line)?;
    ensure!(&line == b"OK ", "reply {line:?}");
    ensure!(recv_exact(&g, 5)? == b"early");
    Ok(())
}

#[test]
fn never_listening_closes_at_the_deadline() -> Result<()> {
    let (s, vm) = setup(Some("1s"), &[])?;
    let since = vm.guest.log_seq();
    let start = Instant::now();
    let mut h = connect_line(&s.vms[0].uds_path, 7002)?;
    closed_without_reply(&mut h)?;
    // The deadline is a lower bound on when the socket closes.
    ensure!(start.elapsed() >= Duration::from_secs(1), "closed early");
    let reqs = count(&vm, since, Direction::FromDevice, OP_REQUEST, 7002).len();
    let rsts = count(&vm, since, Direction::ToDevice, OP_RST, 7002).len();
    ensure!(reqs >= 3, "only {reqs} requests in a 1 s wait");
    ensure!(reqs == rsts, "{reqs} requests, {rsts} refusals");
    vm.guest.health()?;
    Ok(())
}

#[test]
fn off_by_default_a_refusal_closes_at_once() -> Result<()> {
    let (s, vm) = setup(None, &[])?;
    let since = vm.guest.log_seq();
    let mut h = connect_line(&s.vms[0].uds_path, 7003)?;
    closed_without_reply(&mut h)?;
    let reqs = count(&vm, since, Direction::FromDevice, OP_REQUEST, 7003).len();
    ensure!(reqs == 1, "{reqs} requests without connect-wait");
    Ok(())
}

/// The open-connection gauge of VM 3.
fn open_connections(addr: &str) -> Result<f64> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(PROMPT))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let line = text
        .lines()
        .find(|l| l.starts_with("vhost_plug_connections_open{") && l.contains("cid=\"3\""))
        .context("no connections_open sample")?;
    let v = line.rsplit(' ').next().unwrap_or_default();
    v.parse().with_context(|| format!("bad sample {line}"))
}

#[test]
fn a_host_that_leaves_while_waiting_is_removed() -> Result<()> {
    let (s, vm) = setup(Some("60s"), &["--metrics", "127.0.0.1:0"])?;
    let metrics = s.daemon.metrics_addr(PROMPT)?;
    let since = vm.guest.log_seq();
    let h = connect_line(&s.vms[0].uds_path, 7004)?;
    wait_refusals(&vm, since, 7004, 2)?;
    ensure!(
        open_connections(&metrics)? == 1.0,
        "the waiting connection is not counted"
    );
    drop(h);
    let deadline = Instant::now() + PROMPT;
    while open_connections(&metrics)? != 0.0 {
        ensure!(Instant::now() < deadline, "the waiting connection stayed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Nothing asks the guest any more: a listener now gets no connection.
    let after = vm.guest.log_seq();
    let l = vm.guest.listen(7004, SockType::Stream)?;
    ensure!(
        l.accept(Duration::from_millis(1200)).is_err(),
        "asked again after the close"
    );
    ensure!(count(&vm, after, Direction::FromDevice, OP_REQUEST, 7004).is_empty());
    Ok(())
}

#[test]
fn waiting_connections_hold_handshake_slots() -> Result<()> {
    let (s, vm) = setup(Some("60s"), &[])?;
    let since = vm.guest.log_seq();
    let uds = &s.vms[0].uds_path;
    let rss_before = s.daemon.rss_kib()?;
    let mut waiting = Vec::with_capacity(MAX_HANDSHAKES);
    for _ in 0..MAX_HANDSHAKES {
        waiting.push(connect_line(uds, 7005)?);
    }
    // Every slot is held by a waiting connection: the next host program is turned away.
    turned_away(uds, 7005).context("a connection past the handshake limit")?;
    wait_refusals(&vm, since, 7005, MAX_HANDSHAKES)?;
    let rss_waiting = s.daemon.rss_kib()?;
    eprintln!(
        "[connect_wait] daemon VmRSS {rss_before} KiB idle, {rss_waiting} KiB with \
         {MAX_HANDSHAKES} waiting connections ({:.2} KiB each)",
        (rss_waiting as f64 - rss_before as f64) / MAX_HANDSHAKES as f64
    );
    // The guest listens: every waiting connection gets its OK.
    let l = vm.guest.listen(7005, SockType::Stream)?;
    for (i, h) in waiting.iter_mut().enumerate() {
        let mut line = [0u8; 3];
        h.read_exact(&mut line)
            .with_context(|| format!("waiting connection {i}"))?;
        ensure!(&line == b"OK ", "connection {i}: reply {line:?}");
    }
    let mut accepted = 0;
    while l.accept(PROMPT).is_ok() {
        accepted += 1;
        if accepted == MAX_HANDSHAKES {
            break;
        }
    }
    ensure!(accepted == MAX_HANDSHAKES, "the guest accepted {accepted}");
    eprintln!(
        "[connect_wait] daemon VmRSS {} KiB once the same connections are established",
        s.daemon.rss_kib()?
    );
    // Accepted connections gave their slots back: a new one is taken and waits again.
    let since = vm.guest.log_seq();
    drop(l);
    let _h = connect_line(uds, 7006)?;
    wait_refusals(&vm, since, 7006, 2)?;
    Ok(())
}

#[test]
fn waiting_connections_count_against_max_connections() -> Result<()> {
    let (s, vm) = setup(Some("60s"), &["--max-connections", "4"])?;
    let since = vm.guest.log_seq();
    let uds = &s.vms[0].uds_path;
    let mut waiting = Vec::new();
    for _ in 0..4 {
        waiting.push(connect_line(uds, 7007)?);
    }
    wait_refusals(&vm, since, 7007, 4)?;
    turned_away(uds, 7007).context("a fifth connection on a VM limited to 4")?;
    let l = vm.guest.listen(7007, SockType::Stream)?;
    for (i, h) in waiting.iter_mut().enumerate() {
        let mut line = [0u8; 3];
        h.read_exact(&mut line)
            .with_context(|| format!("waiting connection {i}"))?;
        ensure!(&line == b"OK ", "connection {i}: reply {line:?}");
        l.accept(PROMPT)?;
    }
    Ok(())
}
