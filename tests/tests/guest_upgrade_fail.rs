//! Failed and interrupted live upgrades (issue 19 point 2) under a real QEMU guest (TCG, the
//! rig of `guest_qemu.rs`). The guest (scenario `upfail` of tests/guest/init) runs an echo
//! server on 5032, makes a new guest -> host connection to host port 5033 for each host
//! connection to its port 5034 (relaying both ways), and sends "tick\n" every 0.2 s on one
//! guest -> host connection to host port 5035 until that connection fails.
//!
//! Run alone: `cargo test --release -p vhost-plug-tests --test guest_upgrade_fail -- --nocapture`.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use anyhow::{ensure, Context, Result};

use vhost_plug_tests::harness::ctl;
use vhost_plug_tests::host::{accept_timeout, host_listen};
use vhost_plug_tests::qemu::{connect_retry, guest_lock, read_to_eof, QemuRig as Rig, STEP};
use vhost_plug_tests::upgrade::{new_pid, status_when_up, upgrade, Current};
use vhost_plug_tests::DaemonKind;

const CID: u64 = 3;
const TICK: &[u8] = b"tick\n";

/// The host's ends of the connections held open across the upgrade, and the listener of the
/// guest's on-demand connections.
struct Open {
    echo: UnixStream,
    ticks: UnixStream,
    relay: UnixListener,
    qemu_pid: u32,
}

/// Starts the daemon (`env` for it), boots the guest and opens the connections.
fn start(name: &str, env: &[(&str, &str)]) -> Result<(Rig, Open, tempfile::TempDir)> {
    let ctl_dir = tempfile::tempdir()?;
    let c = ctl_dir.path().join("vhost-plug.ctl").display().to_string();
    let mut rig = Rig::new_env(
        DaemonKind::VhostPlug,
        name,
        CID,
        &["--control-socket", &c],
        env,
    )?;
    let r = (|| -> Result<Open> {
        let uds = rig.uds().to_path_buf();
        let relay = host_listen(&uds, 5033)?;
        let l_ticks = host_listen(&uds, 5035)?;
        rig.boot(&["upfail"])?;
        rig.expect("READY", "upfail", STEP)?;
        let qemu_pid = rig.qemu.as_ref().context("no QEMU")?.pid();
        let mut echo = connect_retry(&uds, 5032, b"")?;
        echo.set_read_timeout(Some(STEP))?;
        let mut ticks = accept_timeout(&l_ticks, STEP).context("no tick connection")?;
        ticks.set_read_timeout(Some(STEP))?;
        echo_ok(&mut echo, "before")?;
        tick_ok(&mut ticks)?;
        let mut o = Open {
            echo,
            ticks,
            relay,
            qemu_pid,
        };
        fresh_both_ways(&uds, &mut o, "before")?;
        Ok(o)
    })();
    match r {
        Ok(o) => Ok((rig, o, ctl_dir)),
        Err(e) => {
            rig.keep_log();
            Err(e.context(rig.diagnostics()))
        }
    }
}

/// One line through the guest's echo server on `s`, checked.
fn echo_ok(s: &mut UnixStream, tag: &str) -> Result<()> {
    let m = format!("echo {tag}\n");
    s.write_all(m.as_bytes())?;
    let mut b = vec![0u8; m.len()];
    s.read_exact(&mut b)
        .with_context(|| format!("echo connection {tag}"))?;
    ensure!(b == m.as_bytes(), "{tag}: echo differs: {b:?}");
    Ok(())
}

/// The next tick of the guest's tick stream.
fn tick_ok(s: &mut UnixStream) -> Result<()> {
    let mut b = [0u8; TICK.len()];
    s.read_exact(&mut b).context("tick stream")?;
    ensure!(b == TICK, "tick stream: got {b:?}");
    Ok(())
}

/// A new host -> guest connection (port 5034) that makes the guest open a new guest -> host
/// one (port 5033); a line goes each way through both.
fn fresh_both_ways(uds: &Path, o: &mut Open, tag: &str) -> Result<()> {
    let mut h = connect_retry(uds, 5034, b"")?;
    h.set_read_timeout(Some(STEP))?;
    let m = format!("to host {tag}\n");
    h.write_all(m.as_bytes())?;
    let mut g = accept_timeout(&o.relay, STEP)
        .with_context(|| format!("{tag}: the guest did not connect to host port 5033"))?;
    g.set_read_timeout(Some(STEP))?;
    let mut b = vec![0u8; m.len()];
    g.read_exact(&mut b)
        .with_context(|| format!("{tag}: guest -> host"))?;
    ensure!(b == m.as_bytes(), "{tag}: guest -> host got {b:?}");
    let r = format!("to guest {tag}\n");
    g.write_all(r.as_bytes())?;
    g.shutdown(Shutdown::Write)?;
    let mut b = vec![0u8; r.len()];
    h.read_exact(&mut b)
        .with_context(|| format!("{tag}: host -> guest"))?;
    ensure!(b == r.as_bytes(), "{tag}: host -> guest got {b:?}");
    h.shutdown(Shutdown::Write)?;
    Ok(())
}

/// QEMU kept its process and its one vhost-user connection (every daemon logs to the same
/// file, and QEMU does not reconnect).
fn qemu_unchanged(rig: &mut Rig, o: &Open) -> Result<()> {
    let q = rig.qemu.as_mut().context("no QEMU")?;
    ensure!(q.exited().is_none(), "QEMU exited");
    ensure!(q.pid() == o.qemu_pid, "QEMU's PID changed");
    let log = rig.daemon.stderr();
    let connects = log.matches("frontend connected").count();
    let disconnects = log.matches("frontend disconnected").count();
    ensure!(
        connects == 1 && disconnects == 0,
        "QEMU connected {connects} times and disconnected {disconnects} times"
    );
    Ok(())
}

fn script(path: &Path, body: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Two failed upgrades leave the old daemon serving the guest: a `--binary` that cannot
/// start, then a new daemon that refuses the VM (test-only `VHOST_PLUG_UPGRADE_REFUSE`)
/// after the old one quiesced it. The open echo connection (host -> guest) and tick stream
/// (guest -> host) go on with every byte checked, new connections work both ways, QEMU's PID
/// and vhost-user connection are unchanged, and a following `ctl upgrade` succeeds with the
/// same connections still working.
#[test]
fn a_failed_upgrade_leaves_the_old_daemon_serving_the_guest() -> Result<()> {
    let _lock = guest_lock();
    let (mut rig, mut o, dir) = start("upgrade_fail", &[])?;
    let mut current = Current(None);
    let r = failed(&mut rig, &mut o, dir.path(), &mut current);
    if r.is_err() {
        rig.keep_log();
    }
    r.with_context(|| rig.diagnostics())?;
    rig.kill_qemu();
    Ok(())
}

fn failed(rig: &mut Rig, o: &mut Open, dir: &Path, current: &mut Current) -> Result<()> {
    let uds = rig.uds().to_path_buf();
    let control = dir.join("vhost-plug.ctl");
    let old_pid = rig.daemon.pid().context("no daemon")?;

    let missing = dir.join("missing-binary").display().to_string();
    let (ok, v) = ctl(&control, &["upgrade", "--binary", &missing])?;
    ensure!(!ok, "the upgrade to a missing binary succeeded: {v}");
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        err.contains("cannot start"),
        "missing binary: error {err:?}"
    );
    eprintln!("[guest_upgrade_fail] missing binary: {err}");
    echo_ok(&mut o.echo, "after the missing binary")?;
    tick_ok(&mut o.ticks)?;
    fresh_both_ways(&uds, o, "after the missing binary")?;

    let real = DaemonKind::VhostPlug.binary()?;
    let refuses = dir.join("refuses.sh");
    script(
        &refuses,
        &format!(
            "VHOST_PLUG_UPGRADE_REFUSE={CID} exec '{}' \"$@\"",
            real.display()
        ),
    )?;
    let mark = rig.daemon.log_mark();
    let b = refuses.display().to_string();
    let (ok, v) = ctl(&control, &["upgrade", "--binary", &b])?;
    ensure!(!ok, "the upgrade to a refusing daemon succeeded: {v}");
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        err.contains("refused by fault injection"),
        "refusing daemon: error {err:?}"
    );
    eprintln!("[guest_upgrade_fail] refusing daemon: {err}");
    let refusing = new_pid(&rig.daemon.log_since(mark))?;
    ensure!(
        !Path::new(&format!("/proc/{refusing}")).exists(),
        "the refusing daemon {refusing} still runs"
    );
    ensure!(rig.daemon.is_running(), "the old daemon is gone");
    ensure!(rig.daemon.pid() == Some(old_pid), "the old daemon changed");
    echo_ok(&mut o.echo, "after the refusal")?;
    tick_ok(&mut o.ticks)?;
    fresh_both_ways(&uds, o, "after the refusal")?;
    qemu_unchanged(rig, o)?;

    let (pid, v) = upgrade(&control, &[])?;
    current.0 = Some(pid);
    ensure!(v["vms"] == 1, "upgrade: {v}");
    echo_ok(&mut o.echo, "after the upgrade")?;
    tick_ok(&mut o.ticks)?;
    fresh_both_ways(&uds, o, "after the upgrade")?;
    qemu_unchanged(rig, o)?;
    let log = rig.daemon.stderr();
    let adopted = log.matches("session adopted from the old daemon").count();
    ensure!(adopted == 1, "{adopted} adoptions logged");
    Ok(())
}

/// The old daemon SIGKILLed mid-upgrade, after it pre-handed the VM and before the VM moved
/// (test-only fault point `parked`): the new daemon takes the VM over from the pre-handed
/// session. QEMU's PID and vhost-user connection are unchanged (QEMU does not reconnect, so
/// a guest whose vsock works after kept that connection), and new connections work both
/// ways. The connections open at the kill are lost, and with QEMU the guest is not told:
/// QEMU owns the event queue, so the new daemon cannot send a TRANSPORT_RESET. Precisely:
/// - the host ends of the old connections died with the old daemon: the echo connection
///   reads EOF at once, the tick stream EOF after the ticks the old daemon had delivered;
/// - the guest's end of the tick stream stays open until the guest next sends on it: the new
///   daemon rejects that packet (OP_RW, "no such connection") with a RST, and the guest's
///   following write fails with EPIPE (socat exits 1 with "write(..., 5): Broken pipe"). The
///   guest's end of the old echo connection, which it never sends on, stays open.
#[test]
fn the_old_daemon_killed_mid_upgrade_leaves_the_guest_with_the_new_one() -> Result<()> {
    let _lock = guest_lock();
    let (mut rig, mut o, dir) = start("upgrade_killed", &[("VHOST_PLUG_UPGRADE_FAULT", "parked")])?;
    let mut current = Current(None);
    let r = killed(&mut rig, &mut o, dir.path(), &mut current);
    if r.is_err() {
        rig.keep_log();
    }
    r.with_context(|| rig.diagnostics())?;
    rig.kill_qemu();
    Ok(())
}

fn killed(rig: &mut Rig, o: &mut Open, dir: &Path, current: &mut Current) -> Result<()> {
    let uds = rig.uds().to_path_buf();
    let control = dir.join("vhost-plug.ctl");
    let mark = rig.daemon.log_mark();
    let ctl_path = control.clone();
    let upgrading = std::thread::spawn(move || ctl(&ctl_path, &["upgrade"]));
    rig.daemon
        .wait_log(mark, &["upgrade fault point parked reached"], STEP)
        .context("the old daemon did not reach the fault point `parked`")?;
    current.0 = Some(new_pid(&rig.daemon.log_since(mark))?);
    rig.daemon.kill();
    let r = upgrading
        .join()
        .map_err(|_| anyhow::anyhow!("ctl panicked"))?;
    ensure!(!matches!(r, Ok((true, _))), "ctl upgrade succeeded: {r:?}");
    let st = status_when_up(&control, STEP)?;
    ensure!(
        st["vms"].as_array().map(Vec::len) == Some(1),
        "status from the new daemon: {st}"
    );

    // The host ends of the old connections died with the old daemon.
    let mut b = [0u8; 1];
    ensure!(
        o.echo.read(&mut b)? == 0,
        "the host end of the old echo connection is alive"
    );
    let rest = read_to_eof(&mut o.ticks, STEP)?;
    ensure!(
        rest.len() % TICK.len() == 0 && rest.chunks(TICK.len()).all(|c| c == TICK),
        "the old tick stream ended with {rest:?}"
    );

    // The guest's vsock works through the same vhost-user connection.
    fresh_both_ways(&uds, o, "after the kill")?;
    let mut echo = connect_retry(&uds, 5032, b"")?;
    echo.set_read_timeout(Some(STEP))?;
    echo_ok(&mut echo, "new after the kill")?;
    qemu_unchanged(rig, o)?;
    let log = rig.daemon.log_since(mark);
    ensure!(
        log.matches("took over a VM").count() == 1,
        "the new daemon did not take the VM over"
    );

    // The guest's next tick on the old stream gets a RST.
    let gone = rig.expect("GONE", "upfail", STEP)?;
    eprintln!("[guest_upgrade_fail] old tick stream: {}", gone.rest);
    ensure!(
        gone.rest.starts_with("rc=1 err=write(") && gone.rest.ends_with(", 5): Broken pipe"),
        "the guest's old tick stream ended with {:?}",
        gone.rest
    );
    let log = rig.daemon.log_since(mark);
    ensure!(
        log.lines().any(|l| l.contains("rejecting guest packet")
            && l.contains("dst_port=5035 op=5")
            && l.contains("no such connection")),
        "the new daemon did not reject the old tick stream's packet"
    );
    Ok(())
}
