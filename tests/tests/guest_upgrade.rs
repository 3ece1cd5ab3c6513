//! Live upgrade under a real QEMU guest (TCG, the rig of `guest_qemu.rs`): QEMU's
//! vhost-user-vsock can neither migrate nor reconnect, so the daemon is upgraded under it
//! with `vhost-plug ctl upgrade`, 10 times in a row, while the guest holds 100 idle
//! connections, a checksummed echo stream (host -> guest -> host) and a SEQPACKET
//! connection. QEMU must not notice: same PID, one vhost-user connection for the whole run,
//! no reset seen by the guest's programs, every byte once.
//!
//! Run alone: `cargo test --release -p vhost-plug-tests --test guest_upgrade -- --nocapture`.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::AtomicBool;
use std::thread;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use vhost_plug_tests::data::{recv_digest, send_until};
use vhost_plug_tests::host::SeqpacketListener;
use vhost_plug_tests::qemu::{connect_retry, guest_lock, QemuRig as Rig, STEP};
use vhost_plug_tests::upgrade::{saved_hits, upgrade, Current};
use vhost_plug_tests::DaemonKind;

const UPGRADES: usize = 10;
const IDLE: usize = 100;
/// SEQPACKET message sizes; keep in sync with SEND_SIZES / RECV_SIZES in vsockt.c.
const SEQ_GUEST_SEND: &[usize] = &[1, 2, 100, 1000, 4096, 4097, 20000, 65536, 3];
const SEQ_HOST_SEND: &[usize] = &[5, 3000, 1, 65000, 7];

/// Byte `j` of SEQPACKET message `k` (vsockt.c's `pat`).
fn pat(k: usize, j: usize) -> u8 {
    (k.wrapping_mul(31)
        .wrapping_add(j.wrapping_mul(7))
        .wrapping_add(1)) as u8
}

fn recv_seq(c: &vhost_plug_tests::host::SeqpacketConn, k: usize, buf: &mut [u8]) -> Result<()> {
    let size = SEQ_GUEST_SEND[k];
    let (n, trunc) = c
        .recv(buf, STEP)
        .with_context(|| format!("seqpacket: message {k}"))?;
    ensure!(
        n == size && !trunc,
        "seqpacket: message {k} has {n} bytes (truncated: {trunc}), the guest sent {size}"
    );
    if let Some(j) = (0..n).find(|&j| buf[j] != pat(k, j)) {
        bail!("seqpacket: message {k} byte {j} differs");
    }
    Ok(())
}

#[test]
fn qemu_guest_keeps_its_connections_across_ten_upgrades() -> Result<()> {
    let _lock = guest_lock();
    let ctl_dir = tempfile::tempdir()?;
    let control = ctl_dir.path().join("vhost-plug.ctl");
    let c = control.display().to_string();
    let mut rig = Rig::new(
        DaemonKind::VhostPlug,
        "upgrade",
        3,
        &[
            "--control-socket",
            &c,
            "--plugin",
            "policy=builtin:port-allowlist,name=allowlist,config=allow=2:*,3:*",
            "--plugin",
            "serializer=builtin:serializer-json",
        ],
    )?;
    let mut current = Current(None);
    let r = run(&mut rig, &control, ctl_dir.path(), &mut current);
    if r.is_err() {
        rig.keep_log();
    }
    r.with_context(|| rig.diagnostics())
}

fn run(
    rig: &mut Rig,
    control: &std::path::Path,
    dir: &std::path::Path,
    current: &mut Current,
) -> Result<()> {
    let uds = rig.uds().to_path_buf();
    let l_seq = SeqpacketListener::for_port(&uds, 5031)?;
    rig.boot(&["upgrade"])?;
    rig.expect("READY", "upgrade", STEP)?;
    let qemu_pid = rig.qemu.as_ref().context("no QEMU")?.pid();

    // 100 idle connections, each checked once before the upgrades.
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut s = connect_retry(&uds, 5030, b"")?;
        s.set_read_timeout(Some(STEP))?;
        let m = format!("idle {i}\n");
        s.write_all(m.as_bytes())?;
        let mut b = vec![0u8; m.len()];
        s.read_exact(&mut b)?;
        ensure!(b == m.as_bytes(), "idle connection {i}: echo differs");
        idle.push(s);
    }
    let seq = l_seq
        .accept(STEP)
        .context("the guest did not connect to SEQPACKET port 5031")?;
    let mut buf = vec![0u8; 1 << 17];
    let half = SEQ_GUEST_SEND.len() / 2;
    for k in 0..half {
        recv_seq(&seq, k, &mut buf)?;
    }
    let hits_before = saved_hits(control, dir, "before.state", "3:*")?;

    let stream = connect_retry(&uds, 5030, b"")?;
    let stop = AtomicBool::new(false);
    let mut pauses = Vec::new();
    let (sent, got) = thread::scope(|sc| -> Result<_> {
        let tx = sc.spawn(|| send_until(&stream, 41, &stop));
        let rx = sc.spawn(|| recv_digest(&stream, u64::MAX, 65536));
        let r = (|| -> Result<()> {
            for round in 0..UPGRADES {
                thread::sleep(Duration::from_millis(300));
                let (pid, v) = upgrade(control, &[])?;
                current.0 = Some(pid);
                pauses.push(v["pause_us"][0].as_u64().unwrap_or(0));
                eprintln!("[guest_upgrade] round {round}: {v}");
                // A guest SEQPACKET message that was waiting arrives whole after each one.
                if half + round < SEQ_GUEST_SEND.len() {
                    recv_seq(&seq, half + round, &mut buf)?;
                }
            }
            Ok(())
        })();
        thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let sent = tx
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        stream.shutdown(Shutdown::Write)?;
        let got = rx
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        r?;
        Ok((sent, got))
    })?;
    ensure!(
        sent == got,
        "echo stream across {UPGRADES} upgrades: sent {sent:?}, got back {got:?}"
    );
    eprintln!(
        "[guest_upgrade] echo stream: {} KiB each way across {UPGRADES} upgrades",
        sent.bytes >> 10
    );
    for k in (half + UPGRADES).min(SEQ_GUEST_SEND.len())..SEQ_GUEST_SEND.len() {
        recv_seq(&seq, k, &mut buf)?;
    }
    for (k, &size) in SEQ_HOST_SEND.iter().enumerate() {
        let m: Vec<u8> = (0..size).map(|j| pat(100 + k, j)).collect();
        seq.send(&m)
            .with_context(|| format!("seqpacket: sending {k}"))?;
    }
    seq.shutdown(Shutdown::Write)?;

    // Checked while the guest still runs (it powers off once its scenario is done).
    let q = rig.qemu.as_mut().context("no QEMU")?;
    ensure!(q.exited().is_none(), "QEMU exited");
    ensure!(q.pid() == qemu_pid, "QEMU's PID changed");
    // One vhost-user connection for the whole run (every daemon logs to the same file).
    let log = rig.daemon.stderr();
    let connects = log.matches("frontend connected").count();
    let disconnects = log.matches("frontend disconnected").count();
    ensure!(
        connects == 1 && disconnects == 0,
        "QEMU connected {connects} times and disconnected {disconnects} times"
    );
    let adopted = log.matches("session adopted from the old daemon").count();
    ensure!(adopted == UPGRADES, "{adopted} adoptions logged");
    // Every idle connection still echoes, then closes cleanly.
    for (i, s) in idle.iter_mut().enumerate() {
        let m = format!("after {i}\n");
        s.write_all(m.as_bytes())?;
        let mut b = vec![0u8; m.len()];
        s.read_exact(&mut b)
            .with_context(|| format!("idle connection {i} after the upgrades"))?;
        ensure!(b == m.as_bytes(), "idle connection {i}: echo differs");
        s.shutdown(Shutdown::Write)?;
    }
    drop(idle);
    drop(stream);
    let ok = rig.expect("OK", "upgrade", STEP)?;
    eprintln!("[guest_upgrade] guest: {}", ok.rest);

    // The policy plugin's counters went on from where they were.
    let hits_after = saved_hits(control, dir, "after.state", "3:*")?;
    ensure!(
        hits_after == hits_before + 1,
        "allowlist hits of 3:* {hits_before} before, {hits_after} after (one connect since)"
    );
    pauses.sort_unstable();
    eprintln!(
        "[guest_upgrade] pause per upgrade ({} connections): median {} µs, max {} µs",
        IDLE + 2,
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
    rig.finish()?;
    Ok(())
}
