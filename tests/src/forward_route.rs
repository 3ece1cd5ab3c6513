//! A bridge plugin's `host-vsock` route (WIT 0.3.0), end to end in the forwarding guest
//! ([`crate::forward`]): a daemon whose VM has the ordinary unix backend loads `tcp-bridge`
//! with `map=7001=vsock:1:5201,...` and `--allow-route vsock:1:5201`; the guest's connections
//! to host ports 7001/7002 are connected over AF_VSOCK to CID 1 (`VMADDR_CID_LOCAL`) ports
//! 5201/5202, where listeners of this guest answer. Checksummed streams both ways, SEQPACKET
//! bounds both ways, a route to an address the allowlist does not name is refused (RST), and
//! the metrics endpoint counts the AF_VSOCK connections and their bytes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::driver::{ConnectError, SockType};
use crate::forward::{both_ways, g2h, messages_both_ways, STEP};
use crate::harness::Setup;
use crate::packet::HOST_CID;
use crate::vsockhost::VsockSocket;
use crate::{DaemonKind, VmSpec};

/// Bytes each way of the routed stream.
const ROUTE_BYTES: u64 = 1 << 20;

/// The bridge's map: two allowed targets and one the allowlist does not name.
const BRIDGE: &str = "bridge=builtin:tcp-bridge,config=map=7001=vsock:1:5201,\
                      7002=vsock:1:5202,7003=vsock:1:5203";

/// One sample of the metrics text: the value of the line `name{labels...}` whose labels
/// include every one of `want`.
fn sample(text: &str, name: &str, want: &[&str]) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (labels, value) = rest.split_once("} ")?;
        let labels: Vec<&str> = labels.split(',').collect();
        if want.iter().all(|w| labels.contains(w)) {
            value.trim().parse::<f64>().ok().map(|v| v as u64)
        } else {
            None
        }
    })
}

fn scrape(path: &Path) -> Result<String> {
    let mut s = UnixStream::connect(path).with_context(|| format!("{}", path.display()))?;
    s.set_read_timeout(Some(STEP))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (_, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    Ok(body.to_string())
}

/// Waits (up to [`STEP`]) until the AF_VSOCK metrics of VM 4 reach `opened` guest
/// connections and `bytes` each way (byte totals are added when a connection closes).
fn await_metrics(path: &Path, opened: u64, bytes: u64) -> Result<()> {
    let until = Instant::now() + STEP;
    loop {
        let text = scrape(path)?;
        let cid = "cid=\"4\"";
        let got = (
            sample(
                &text,
                "vhost_plug_afvsock_connections_opened_total",
                &[cid, "initiator=\"guest\""],
            ),
            sample(
                &text,
                "vhost_plug_afvsock_bytes_total",
                &[cid, "direction=\"guest_to_host\""],
            ),
            sample(
                &text,
                "vhost_plug_afvsock_bytes_total",
                &[cid, "direction=\"host_to_guest\""],
            ),
        );
        if got == (Some(opened), Some(bytes), Some(bytes)) {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("AF_VSOCK metrics {got:?}, expected opened={opened} bytes={bytes} each way");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `route` case: a `host-vsock` bridge route, allowed and refused.
pub fn host_vsock_route() -> Result<String> {
    let metrics_dir = tempfile::Builder::new()
        .prefix("vhost-plug-metrics")
        .tempdir()?;
    let metrics = metrics_dir.path().join("metrics.sock");
    let metrics_arg = format!("unix:{}", metrics.display());
    let setup = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 4)],
        &[
            "--plugin",
            BRIDGE,
            "--allow-route",
            "vsock:1:5201",
            "--allow-route",
            "vsock:1:5202",
            "--metrics",
            &metrics_arg,
        ],
    )?;
    let vm = setup.boot(0)?;

    let l = VsockSocket::listen(5201, SockType::Stream)?;
    let (g, h) = g2h(&vm, &l, 7001, SockType::Stream)?;
    both_ways(&g, &h, ROUTE_BYTES)?;
    drop((g, h));

    let l = VsockSocket::listen(5202, SockType::Seqpacket)?;
    let (g, h) = g2h(&vm, &l, 7002, SockType::Seqpacket)?;
    let msg_bytes = messages_both_ways(&g, &h)?;
    drop((g, h));

    // 5203 is listened on, but the allowlist does not name it: the guest sees RST and the
    // listener never sees a connection.
    let l = VsockSocket::listen(5203, SockType::Stream)?;
    for ty in [SockType::Stream, SockType::Seqpacket] {
        match vm.guest.connect_timeout(HOST_CID, 7003, ty, STEP) {
            Err(ConnectError::Refused) => {}
            other => bail!(
                "{ty:?} route to an unlisted address: {:?}",
                other.map(|_| ())
            ),
        }
    }
    ensure!(
        l.accept(Duration::ZERO).is_err(),
        "a refused route reached its target"
    );
    let log = setup.daemon.stderr();
    ensure!(
        log.contains("not in the --allow-route list"),
        "the daemon log does not say why the route was refused"
    );

    await_metrics(&metrics, 2, ROUTE_BYTES + msg_bytes as u64)?;
    vm.guest.health()?;
    Ok(format!("bytes={ROUTE_BYTES} messages_bytes={msg_bytes}"))
}
