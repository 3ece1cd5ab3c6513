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

use anyhow::{bail, ensure, Context, Result};
use ppp::v2::{AddressFamily, Addresses, Command, Header, Protocol};
use vhost_plug_tests::harness::{recv_exact, Setup, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_connect, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::{DaemonKind, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(10);

/// What the header said about one connection.
#[derive(Debug, PartialEq, Eq)]
struct Named {
    src_cid: u32,
    dst_cid: u32,
    src_port: u32,
    dst_port: u32,
    id: u64,
}

/// Reads exactly one PROXY v2 header from `s` (its fixed part tells the length) and parses it
/// with `ppp`.
fn read_header(s: &mut impl Read) -> Result<Named> {
    let mut head = vec![0u8; 16];
    s.read_exact(&mut head).context("PROXY header")?;
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    head.resize(16 + len, 0);
    s.read_exact(&mut head[16..]).context("PROXY header TLVs")?;
    let h = Header::try_from(&head[..]).map_err(|e| anyhow::anyhow!("ppp: {e:?}"))?;
    ensure!(h.command == Command::Proxy, "command {:?}", h.command);
    ensure!(h.protocol == Protocol::Stream, "protocol {:?}", h.protocol);
    ensure!(h.address_family() == AddressFamily::Unix);
    ensure!(
        h.as_bytes().len() == 262,
        "header length {}",
        h.as_bytes().len()
    );
    let Addresses::Unix(unix) = h.addresses else {
        bail!("addresses {:?}", h.addresses);
    };
    let name = |a: &[u8; 108]| {
        let end = a.iter().position(|b| *b == 0).unwrap_or(a.len());
        String::from_utf8_lossy(&a[..end]).into_owned()
    };
    let names = (name(&unix.source), name(&unix.destination));
    let (mut vsock, mut id) = (None, None);
    for tlv in h.tlvs() {
        let tlv = tlv.map_err(|e| anyhow::anyhow!("ppp tlv: {e:?}"))?;
        let v = &tlv.value;
        match tlv.kind {
            0xE0 => {
                ensure!(v.len() == 16, "vsock TLV of {} bytes", v.len());
                let u = |i: usize| u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
                vsock = Some((u(0), u(4), u(8), u(12)));
            }
            0x05 => {
                ensure!(v.len() == 8, "unique id of {} bytes", v.len());
                id = Some(u64::from_be_bytes(v[..8].try_into()?));
            }
            k => bail!("unexpected TLV {k:#x}"),
        }
    }
    let (src_cid, dst_cid, src_port, dst_port) = vsock.context("no vsock TLV")?;
    ensure!(
        names
            == (
                format!("vsock:{src_cid}:{src_port}"),
                format!("vsock:{dst_cid}:{dst_port}")
            ),
        "address names {names:?} against the TLV"
    );
    Ok(Named {
        src_cid,
        dst_cid,
        src_port,
        dst_port,
        id: id.context("no unique id TLV")?,
    })
}

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
