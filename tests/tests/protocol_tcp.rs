//! The op-by-op protocol table of docs/architecture.md ("Protocol conformance"), guest <->
//! TCP bridge path (the built-in tcp-bridge plugin routes a guest port to a TCP address).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use vhost_plug_tests::driver::Direction;
use vhost_plug_tests::harness::{Setup, TestVm};
use vhost_plug_tests::packet::*;
use vhost_plug_tests::{ConnectError, DaemonKind, GuestSocket, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(5);
/// The guest port the bridge maps.
const PORT: u32 = 7000;

/// A daemon whose guest port 7000 goes to 127.0.0.1:`tport`.
fn bridged(tport: u16) -> Result<Setup> {
    let map = format!("bridge=builtin:tcp-bridge,config=map={PORT}=127.0.0.1:{tport}");
    let allow = format!("tcp:127.0.0.1:{tport}");
    Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3)],
        &["--plugin", &map, "--allow-route", &allow],
    )
}

/// A bridged connection: (guest socket, the TCP server's end).
fn pair(vm: &TestVm, l: &TcpListener) -> Result<(GuestSocket, TcpStream)> {
    let mut gs = vm
        .guest
        .connect_timeout(HOST_CID, PORT, SockType::Stream, PROMPT)
        .map_err(|e| anyhow::anyhow!("bridged connect: {e}"))?;
    gs.set_timeout(PROMPT);
    let (ts, _) = l.accept()?;
    ts.set_read_timeout(Some(PROMPT))?;
    Ok((gs, ts))
}

fn shutdowns(vm: &TestVm, seq: u64, port: u32) -> Vec<u32> {
    vm.guest
        .packets_since(seq)
        .iter()
        .filter(|p| {
            p.dir == Direction::FromDevice && p.hdr.op == OP_SHUTDOWN && p.hdr.dst_port == port
        })
        .map(|p| p.hdr.flags)
        .collect()
}

/// REQUEST to a mapped address nobody listens on: RST as soon as the TCP connect fails.
/// SEQPACKET cannot be bridged: RST.
#[test]
fn request_to_a_dead_tcp_address_or_as_seqpacket_is_reset() -> Result<()> {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let s = bridged(port)?;
    let vm = s.boot(0)?;
    let t0 = Instant::now();
    match vm
        .guest
        .connect_timeout(HOST_CID, PORT, SockType::Stream, PROMPT)
    {
        Err(ConnectError::Refused) => {}
        other => bail!("dead TCP address: {:?}", other.map(|_| ())),
    }
    match vm
        .guest
        .connect_timeout(HOST_CID, PORT, SockType::Seqpacket, PROMPT)
    {
        Err(ConnectError::Refused) => {}
        other => bail!("SEQPACKET over TCP: {:?}", other.map(|_| ())),
    }
    ensure!(t0.elapsed() < PROMPT, "refusals took {:?}", t0.elapsed());
    vm.guest.health()
}

/// Guest SHUTDOWN(SEND) is a FIN behind the data; the TCP end may still send back. A FIN
/// from the TCP end is SHUTDOWN(SEND) behind its data. TCP carries no SHUT_RD and cannot
/// tell a close from a FIN, so that SHUTDOWN has SEND only.
#[test]
fn fin_both_ways() -> Result<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let s = bridged(l.local_addr()?.port())?;
    let vm = s.boot(0)?;
    let (gs, mut ts) = pair(&vm, &l)?;
    gs.send(b"ping")?;
    gs.shutdown(false, true)?;
    let mut got = Vec::new();
    ts.read_to_end(&mut got)?;
    ensure!(got == b"ping", "{got:?}");
    let seq = vm.guest.log_seq();
    ts.write_all(b"pong")?;
    ts.shutdown(Shutdown::Write)?;
    let mut b = [0u8; 4];
    (&gs).read_exact(&mut b)?;
    ensure!(&b == b"pong");
    let mut e = [0u8; 1];
    ensure!(gs.recv(&mut e)? == 0, "no EOF");
    let got = shutdowns(&vm, seq, gs.local_port());
    ensure!(got == vec![SHUTDOWN_SEND], "{got:?}");
    vm.guest.health()
}

/// Guest RST closes the TCP connection at once.
#[test]
fn guest_rst_closes_the_tcp_connection() -> Result<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let s = bridged(l.local_addr()?.port())?;
    let vm = s.boot(0)?;
    let (gs, mut ts) = pair(&vm, &l)?;
    gs.reset()?;
    let mut b = [0u8; 8];
    match ts.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => bail!("TCP read after guest RST: {other:?}"),
    }
    vm.guest.health()
}

/// Guest SHUTDOWN(RCV): TCP has nothing to carry it, so the TCP end's bytes are no longer
/// delivered; the guest may still send.
#[test]
fn guest_shut_rd_stops_delivery_from_tcp() -> Result<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let s = bridged(l.local_addr()?.port())?;
    let vm = s.boot(0)?;
    let (gs, mut ts) = pair(&vm, &l)?;
    gs.shutdown(true, false)?;
    // The device takes the tx queue in order: once "up" reached the TCP end, the SHUTDOWN
    // before it was applied, so bytes the TCP end writes from now on must stay there.
    gs.send(b"up")?;
    let mut b = [0u8; 2];
    ts.read_exact(&mut b)?;
    ensure!(&b == b"up");
    let seq = vm.guest.log_seq();
    ts.write_all(b"unread")?;
    let rw = vm.guest.wait_packet(seq, Duration::from_millis(300), |h| {
        h.op == OP_RW && h.dst_port == gs.local_port()
    });
    ensure!(rw.is_none(), "data delivered after the guest's SHUT_RD");
    vm.guest.health()
}

/// CREDIT_REQUEST on a bridged connection is answered.
#[test]
fn credit_request_is_answered_on_a_bridged_connection() -> Result<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let s = bridged(l.local_addr()?.port())?;
    let vm = s.boot(0)?;
    let (gs, _ts) = pair(&vm, &l)?;
    let p = vm.guest.request_credit(&gs, PROMPT)?;
    ensure!(p.hdr.buf_alloc == 262_144, "{:?}", p.hdr);
    vm.guest.health()
}
