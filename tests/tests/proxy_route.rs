//! One listener for every guest: with `proxy-bridge` loaded for all VMs, guest connections to
//! a mapped host port from two VMs arrive at ONE unix socket (and at one TCP listener), each
//! starting with a PROXY protocol v2 header that names the guest. The header is parsed with
//! the `ppp` crate (an independent implementation of the spec), and the guest's bytes follow
//! it unchanged in both directions. Driven by the simulated VMM.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test proxy_route -- --nocapture`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use anyhow::{ensure, Result};
use vhost_plug_tests::harness::{recv_exact, Setup, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_connect, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::proxy_header::{read_header, Named};
use vhost_plug_tests::{DaemonKind, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(10);

/// Guest of `vm` connects to host port `port`; the connection arrives at `accept`, whose
/// header must name this guest; bytes then flow both ways.
fn one_connection<S: Read + Write>(
    vm: &TestVm,
    port: u32,
    accept: impl FnOnce() -> Result<S>,
) -> Result<Named> {
    let g = vm
        .guest
        .connect_timeout(HOST_CID, port, SockType::Stream, PROMPT)
        .map_err(|e| anyhow::anyhow!("guest {} connect: {e}", vm.spec.guest_cid))?;
    let mut h = accept()?;
    let named = read_header(&mut h)?;
    ensure!(
        (named.src_cid, named.dst_cid, named.dst_port) == (vm.spec.guest_cid as u32, 2, port),
        "header {named:?} for guest {}",
        vm.spec.guest_cid
    );
    ensure!(named.src_port >= 1024, "guest port {}", named.src_port);
    g.send(b"from the guest")?;
    let mut b = [0u8; 14];
    h.read_exact(&mut b)?;
    ensure!(
        &b == b"from the guest",
        "guest bytes after the header: {b:?}"
    );
    h.write_all(b"back")?;
    ensure!(recv_exact(&g, 4)? == b"back");
    g.close()?;
    Ok(named)
}

#[test]
fn every_guest_reaches_one_unix_socket() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("all-vms.sock");
    let listener = UnixListener::bind(&sock)?;
    let bridge = format!(
        "bridge=builtin:proxy-bridge,config=map=1234=unix:{}",
        sock.display()
    );
    let allow = format!("unix:{}", dir.path().display());
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3), VmSpec::new(d, 4)],
        &["--plugin", &bridge, "--allow-route", &allow],
    )?;
    let (vm3, vm4) = (s.boot(0)?, s.boot(1)?);
    let mut ids = Vec::new();
    for vm in [&vm3, &vm4, &vm3] {
        let n = one_connection(vm, 1234, || accept_timeout(&listener, HOST_TIMEOUT))?;
        ids.push(n.id);
    }
    ids.sort_unstable();
    ids.dedup();
    ensure!(ids.len() == 3, "connection ids repeat: {ids:?}");

    // Other ports and host-initiated connections keep their default targets.
    let l = vhost_plug_tests::host::host_listen(&vm4.spec.uds_path, 1235)?;
    let g = vm4
        .guest
        .connect_timeout(HOST_CID, 1235, SockType::Stream, PROMPT)
        .map_err(|e| anyhow::anyhow!("unmapped port: {e}"))?;
    let mut plain = accept_timeout(&l, HOST_TIMEOUT)?;
    g.send(b"no header")?;
    let mut b = [0u8; 9];
    plain.read_exact(&mut b)?;
    ensure!(&b == b"no header", "unmapped port got {b:?}");
    let gl = vm3.guest.listen(5000, SockType::Stream)?;
    let (mut h, _) = host_connect(&vm3.spec.uds_path, 5000)?;
    let g = gl.accept(PROMPT)?;
    h.write_all(b"hi")?;
    ensure!(recv_exact(&g, 2)? == b"hi");
    Ok(())
}

/// Accepts one TCP connection within [`HOST_TIMEOUT`].
fn tcp_accept(l: &TcpListener) -> Result<std::net::TcpStream> {
    l.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + HOST_TIMEOUT;
    loop {
        match l.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(false)?;
                c.set_read_timeout(Some(HOST_TIMEOUT))?;
                return Ok(c);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                ensure!(
                    std::time::Instant::now() < deadline,
                    "no TCP connection arrived"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[test]
fn every_guest_reaches_one_tcp_listener() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let bridge = format!("bridge=builtin:proxy-bridge,config=map=7000=tcp:{addr}");
    let allow = format!("tcp:{addr}");
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3), VmSpec::new(d, 4)],
        &["--plugin", &bridge, "--allow-route", &allow],
    )?;
    let (vm3, vm4) = (s.boot(0)?, s.boot(1)?);
    for vm in [&vm4, &vm3] {
        one_connection(vm, 7000, || tcp_accept(&listener))?;
    }
    Ok(())
}
