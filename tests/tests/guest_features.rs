//! Real-guest cases of issue 16's three features, in one QEMU (TCG) boot: a host `CONNECT`
//! that waits for the guest to listen (`connect-wait`), host programs judged by their identity
//! (`peer-allowlist` by uid), and one listener for every guest (a `proxy-unix` route with its
//! PROXY v2 header, parsed with the `ppp` crate). The guest side is `tests/guest/init`'s
//! `cwait`, `ident` and `proxy` scenarios; the rig is `vhost_plug_tests::qemu`, as in
//! `guest_qemu.rs`.
//!
//! Run alone: `cargo test --release -p vhost-plug-tests --test guest_features -- --nocapture`.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use vhost_plug_tests::harness::ctl;
use vhost_plug_tests::host::{accept_timeout, host_connect, host_listen, HOST_TIMEOUT};
use vhost_plug_tests::proxy_header::read_header;
use vhost_plug_tests::qemu::{guest_lock, read_to_eof, QemuRig, STEP};
use vhost_plug_tests::DaemonKind;

const GUEST_CID: u64 = 3;

/// `CONNECT port` whose answer is a close, not `OK` (a close with the line unread is a reset).
fn refused(uds: &Path, port: u32) -> Result<()> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(HOST_TIMEOUT))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
        Ok(n) => bail!(
            "CONNECT {port} answered {:?}",
            String::from_utf8_lossy(&b[..n])
        ),
        Err(e) => Err(e).with_context(|| format!("CONNECT {port}: no answer")),
    }
}

/// Waits until `ctl conns` shows a host connection to guest port `port` in state `waiting`:
/// the guest refused it and the daemon will ask again.
fn wait_until_waiting(control: &Path, port: u32) -> Result<()> {
    let deadline = Instant::now() + STEP;
    loop {
        let (ok, v) = ctl(control, &["conns"])?;
        ensure!(ok, "ctl conns: {v}");
        let rows = v["connections"].as_array().context("no connections list")?;
        if rows
            .iter()
            .any(|r| r["local_port"] == port && r["state"] == "waiting")
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "no waiting connection to port {port}: {v}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// connect-wait: CONNECT 5020 before the guest listens; `OK` once it does, then data.
fn cwait(rig: &mut QemuRig, control: &Path, go: &UnixListener) -> Result<()> {
    rig.expect("BEGIN", "cwait", STEP)?;
    let uds = rig.uds().to_path_buf();
    thread::scope(|sc| -> Result<()> {
        let host = sc.spawn(|| -> Result<()> {
            let (mut s, _) = host_connect(&uds, 5020).context("CONNECT 5020 with connect-wait")?;
            s.write_all(b"waited for the guest")?;
            Ok(())
        });
        wait_until_waiting(control, 5020)?;
        let mut g = accept_timeout(go, STEP).context("the guest did not ask for go")?;
        g.write_all(b"go\n")?;
        drop(g);
        host.join().expect("host thread")?;
        Ok(())
    })?;
    let ok = rig.expect("OK", "cwait", STEP)?;
    ensure!(
        ok.value("got")? == "waited.for.the.guest",
        "cwait: the guest got {}",
        ok.rest
    );
    Ok(())
}

/// peer-allowlist: this process's uid may reach 5021, not 5022 (both have guest listeners).
fn ident(rig: &mut QemuRig) -> Result<()> {
    rig.expect("READY", "ident", STEP)?;
    refused(rig.uds(), 5022).context("CONNECT 5022 is for another uid")?;
    let (mut s, _) = host_connect(rig.uds(), 5021).context("CONNECT 5021 is for our uid")?;
    s.write_all(b"uid allowed")?;
    drop(s);
    let ok = rig.expect("OK", "ident", STEP)?;
    ensure!(
        ok.value("got")? == "uid.allowed" && ok.value("denied_reached")? == "no",
        "ident: guest reports {}",
        ok.rest
    );
    Ok(())
}

/// proxy-unix route: the guest's connection to host port 5023 arrives at the one socket,
/// preceded by a PROXY v2 header naming the guest.
fn proxy(rig: &mut QemuRig, all: &UnixListener) -> Result<()> {
    rig.expect("BEGIN", "proxy", STEP)?;
    let mut s = accept_timeout(all, STEP).context("nothing reached the shared socket")?;
    let named = read_header(&mut s)?;
    ensure!(
        (named.src_cid, named.dst_cid, named.dst_port) == (GUEST_CID as u32, 2, 5023),
        "header {named:?}"
    );
    ensure!(named.src_port >= 1024, "guest port {}", named.src_port);
    // The guest's socat shuts its write side after the line, then waits for the answer.
    let got = read_to_eof(&mut s, STEP)?;
    ensure!(got == b"proxied\n", "bytes after the header: {got:?}");
    s.write_all(b"thanks\n")?;
    drop(s);
    let ok = rig.expect("OK", "proxy", STEP)?;
    ensure!(
        ok.value("reply")? == "thanks",
        "proxy: guest got {}",
        ok.rest
    );
    Ok(())
}

#[test]
fn guest_connect_wait_identity_and_proxy() {
    let _guard = guest_lock();
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let all_sock = dir.path().join("all-vms.sock");
    let control = dir.path().join("ctl.sock");
    // SAFETY: no preconditions.
    let uid = unsafe { libc::geteuid() };
    let peers = format!(
        "policy=builtin:peer-allowlist,config=allow=uid={uid}:5020,uid={uid}:5021,uid={}:5022",
        uid.wrapping_add(1)
    );
    let bridge = format!(
        "bridge=builtin:proxy-bridge,config=map=5023=unix:{}",
        all_sock.display()
    );
    let route = format!("unix:{}", dir.path().display());
    let control_s = control.display().to_string();
    let args = [
        "--plugin",
        &peers,
        "--plugin",
        &bridge,
        "--allow-route",
        &route,
        "--control-socket",
        &control_s,
    ];
    let mut rig = QemuRig::new_with(
        DaemonKind::VhostPlug,
        "guest_features",
        GUEST_CID,
        &args,
        |vm| vm.connect_wait("60s"),
    )
    .unwrap_or_else(|e| panic!("[guest_features] setup failed: {e:#}"));
    let result = (|| -> Result<()> {
        let all = UnixListener::bind(&all_sock)?;
        let go = host_listen(rig.uds(), 5024)?;
        rig.boot(&["cwait", "ident", "proxy"])?;
        cwait(&mut rig, &control, &go)?;
        ident(&mut rig)?;
        proxy(&mut rig, &all)?;
        rig.finish()
    })();
    rig.keep_log();
    if let Err(e) = result {
        let diag = rig.diagnostics();
        rig.kill_qemu();
        panic!("[guest_features] failed: {e:#}\n{diag}");
    }
    assert!(rig.daemon.is_running(), "the daemon exited");
    eprintln!(
        "[guest_features] ok in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
