//! Live upgrade (issue 19) with the simulated VMM: `vhost-plug ctl upgrade` starts a new
//! daemon process and hands it the running VM (vhost-user socket, memory, rings,
//! connections, plugin states); the VMM keeps its one vhost-user connection throughout.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test upgrade -- --nocapture`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vhost_plug_tests::checks::raise_fd_limit;
use vhost_plug_tests::data::{recv_digest, send_until};
use vhost_plug_tests::harness::{ctl, landlock_abi, Setup};
use vhost_plug_tests::host::{
    accept_timeout, host_connect, host_listen, SeqpacketListener, HOST_TIMEOUT,
};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::upgrade::{saved_hits, upgrade, Current};
use vhost_plug_tests::{DaemonKind, GuestSocket, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(10);
const UPGRADES: usize = 10;
const CONNS: u32 = 1000;

/// The allowlist plugin counts hits per rule in its state; the JSON serializer lets the test
/// read that state.
const PLUGINS: &[&str] = &[
    "--plugin",
    "policy=builtin:port-allowlist,name=allowlist,config=allow=2:*,3:*",
    "--plugin",
    "serializer=builtin:serializer-json",
];

fn daemon(dir: &Path, extra: &[&str]) -> Result<(Setup, PathBuf)> {
    let control = dir.join("vhost-plug.ctl");
    let c = control.display().to_string();
    let mut args = vec!["--control-socket", c.as_str()];
    args.extend_from_slice(PLUGINS);
    args.extend_from_slice(extra);
    let s = Setup::with(DaemonKind::VhostPlug, |d| vec![VmSpec::new(d, 3)], &args)?;
    Ok((s, control))
}

/// 1,000 idle connections with unread bytes, a SEQPACKET connection and a checksummed
/// stream each way stay open across 10 upgrades: nothing lost or duplicated, no reset, the
/// VMM's one vhost-user connection served throughout, the plugin's state carried along.
#[test]
fn connections_and_streams_survive_ten_upgrades() -> Result<()> {
    raise_fd_limit(8 * 1024)?;
    let dir = tempfile::tempdir()?;
    // In its Landlock sandbox where the kernel has one: an upgrade needs no more than the
    // sandbox allows (its own binary executed again, its socket directories).
    let rw = dir.path().display().to_string();
    let sandbox: Vec<&str> = if landlock_abi() > 0 {
        vec!["--landlock", "--landlock-rw", &rw]
    } else {
        Vec::new()
    };
    let (s, control) = daemon(dir.path(), &sandbox)?;
    ensure!(
        sandbox.is_empty() || s.daemon.stderr().contains("landlock sandbox"),
        "the daemon did not enter its sandbox"
    );
    let mut current = Current(None);
    let uds = s.vms[0].uds_path.clone();
    let vm = s.boot(0)?;
    let first_pid = s.daemon.pid().context("daemon pid")?;

    let hl = host_listen(&uds, 6200)?;
    let mut conns: Vec<(GuestSocket, std::os::unix::net::UnixStream)> = Vec::new();
    for i in 0..CONNS {
        let gs = vm
            .guest
            .connect_timeout(HOST_CID, 6200, SockType::Stream, PROMPT)
            .map_err(|e| anyhow::anyhow!("guest connect {i}: {e}"))?;
        let h = accept_timeout(&hl, HOST_TIMEOUT)?;
        gs.send(&vec![i as u8; (i % 7) as usize + 1])?;
        conns.push((gs, h));
    }
    let sl = SeqpacketListener::for_port(&uds, 6300)?;
    let g_seq = vm
        .guest
        .connect_timeout(HOST_CID, 6300, SockType::Seqpacket, PROMPT)
        .map_err(|e| anyhow::anyhow!("guest seqpacket connect: {e}"))?;
    let h_seq = sl.accept(HOST_TIMEOUT)?;
    let hits_before = saved_hits(&control, dir.path(), "before.state", "2:*")?;

    let gl = vm.guest.listen(6001, SockType::Stream)?;
    let (h_h2g, _) = host_connect(&uds, 6001)?;
    let g_h2g = gl.accept(PROMPT)?;
    let sl6000 = host_listen(&uds, 6000)?;
    let g_g2h = vm
        .guest
        .connect_timeout(HOST_CID, 6000, SockType::Stream, PROMPT)
        .map_err(|e| anyhow::anyhow!("guest connect 6000: {e}"))?;
    let h_g2h = accept_timeout(&sl6000, HOST_TIMEOUT)?;

    let stop = AtomicBool::new(false);
    let mut pids = vec![first_pid];
    let mut pauses = Vec::new();
    // Open fds of each new daemon: fds the old one does not mark close-on-exec would pile up
    // in every generation.
    let mut fd_counts = Vec::new();
    let res = thread::scope(|sc| -> Result<()> {
        let g_tx = sc.spawn(|| send_until(&g_g2h, 21, &stop));
        let h_rx = sc.spawn(|| recv_digest(&h_g2h, u64::MAX, 65536));
        let h_tx = sc.spawn(|| send_until(&h_h2g, 22, &stop));
        let g_rx = sc.spawn(|| recv_digest(&g_h2g, u64::MAX, 65536));
        let r = (|| -> Result<()> {
            for round in 0..UPGRADES {
                thread::sleep(Duration::from_millis(50));
                let (pid, v) = upgrade(&control, &[])?;
                current.0 = Some(pid);
                ensure!(!pids.contains(&pid), "round {round}: pid {pid} again");
                pids.push(pid);
                pauses.push(v["pause_us"][0].as_u64().unwrap_or(0));
                fd_counts.push(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count());
                eprintln!("[upgrade] round {round}: {v}");
                // The SEQPACKET connection keeps its message bounds both ways.
                let msg = format!("round {round}");
                g_seq.send(msg.as_bytes())?;
                let mut b = [0u8; 64];
                let (n, trunc) = h_seq.recv(&mut b, PROMPT)?;
                ensure!(
                    !trunc && &b[..n] == msg.as_bytes(),
                    "seqpacket guest -> host"
                );
                h_seq.send(msg.as_bytes())?;
                let mut b = [0u8; 64];
                let got = g_seq
                    .recv_msg(&mut b)?
                    .context("seqpacket: end of stream")?;
                ensure!(
                    &b[..got.len] == msg.as_bytes(),
                    "seqpacket host -> guest (round {round})"
                );
            }
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        let sent_g = g_tx.join().map_err(|_| anyhow::anyhow!("panic"))??;
        g_g2h.shutdown(false, true)?;
        let sent_h = h_tx.join().map_err(|_| anyhow::anyhow!("panic"))??;
        h_h2g.shutdown(std::net::Shutdown::Write)?;
        let got_h = h_rx.join().map_err(|_| anyhow::anyhow!("panic"))??;
        let got_g = g_rx.join().map_err(|_| anyhow::anyhow!("panic"))??;
        r?;
        ensure!(
            sent_g == got_h,
            "guest -> host: sent {sent_g:?}, got {got_h:?}"
        );
        ensure!(
            sent_h == got_g,
            "host -> guest: sent {sent_h:?}, got {got_g:?}"
        );
        eprintln!(
            "[upgrade] streams across {UPGRADES} upgrades: {} MiB guest -> host, {} MiB host -> guest",
            sent_g.bytes >> 20,
            sent_h.bytes >> 20
        );
        Ok(())
    });
    res.with_context(|| format!("daemon log:\n{}", s.daemon.stderr()))?;

    // Every idle connection: its early bytes arrive once, and both directions still work.
    for (i, (gs, h)) in conns.iter_mut().enumerate() {
        let want = vec![i as u8; i % 7 + 1];
        let mut got = vec![0u8; want.len()];
        h.set_read_timeout(Some(PROMPT))?;
        h.read_exact(&mut got)?;
        ensure!(got == want, "connection {i}: early bytes changed");
        h.write_all(b"ok")?;
        let mut r = [0u8; 2];
        (&*gs).read_exact(&mut r)?;
        ensure!(
            &r == b"ok",
            "connection {i}: host -> guest after the upgrades"
        );
    }
    ensure!(
        vm.guest.events().is_empty(),
        "the guest saw events {:?}: an upgrade must not reset the transport",
        vm.guest.events()
    );
    vm.guest.health()?;
    // The VMM's connection is the one it opened: the newest daemon answers on it.
    ensure!(
        vm.sim.is_connected(),
        "the VMM lost its vhost-user connection"
    );
    let (ok, st) = ctl(&control, &["status"])?;
    ensure!(
        ok && st["vms"][0]["connections"].as_u64() == Some(u64::from(CONNS) + 3),
        "status after the upgrades: {st}"
    );
    // The plugin's state moved with every upgrade: its hit count went on from where it was.
    let hits_after = saved_hits(&control, dir.path(), "after.state", "2:*")?;
    ensure!(
        hits_after == hits_before + 1 && hits_before == u64::from(CONNS) + 1,
        "allowlist hits of 2:* {hits_before} before, {hits_after} after (one guest connect since)"
    );
    // Transient fds (a control connection, a save file) aside, every generation holds the
    // same: 1,003 connections, one VM's session.
    let (first, last) = (fd_counts[0], fd_counts[fd_counts.len() - 1]);
    ensure!(
        last <= first + 8,
        "open fds per new daemon across {UPGRADES} upgrades: {fd_counts:?}"
    );
    pauses.sort_unstable();
    eprintln!(
        "[upgrade] {} daemons, pause per upgrade with {} connections: median {} µs, max {} µs",
        pids.len(),
        CONNS + 3,
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
    drop(current);
    Ok(())
}

/// A new binary that cannot start, one that refuses (it serves other VMs), and one that
/// speaks another record version: each time the old daemon keeps serving, untouched.
#[test]
fn a_failed_upgrade_leaves_the_old_daemon_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, control) = daemon(dir.path(), &[])?;
    let uds = s.vms[0].uds_path.clone();
    let vm = s.boot(0)?;
    let hl = host_listen(&uds, 6400)?;
    let gs = vm
        .guest
        .connect_timeout(HOST_CID, 6400, SockType::Stream, PROMPT)
        .map_err(|e| anyhow::anyhow!("guest connect: {e}"))?;
    let mut h = accept_timeout(&hl, HOST_TIMEOUT)?;
    h.set_read_timeout(Some(PROMPT))?;
    let real = DaemonKind::VhostPlug.binary()?;

    // Fails to start: its plugin file does not exist.
    let bad_plugin = dir.path().join("fails.sh");
    script(
        &bad_plugin,
        &format!(
            "exec '{}' \"$@\" --plugin policy=/nonexistent/plugin.wasm",
            real.display()
        ),
    )?;
    // Refuses: its configuration has another VM.
    let other = VmSpec::new(&dir.path().join("other"), 9);
    std::fs::create_dir_all(dir.path().join("other"))?;
    let refuses = dir.path().join("refuses.sh");
    script(
        &refuses,
        &format!("exec '{}' \"$@\" --vm '{}'", real.display(), other.to_arg()),
    )?;
    let peer = upgrade_peer()?;
    let cases: [(&str, &Path, &str); 4] = [
        (
            "missing binary",
            Path::new("/nonexistent/vhost-plug"),
            "cannot start",
        ),
        ("fails to start", &bad_plugin, "exited before it took over"),
        ("refuses", &refuses, "refused"),
        ("record version 999", &peer, "record version 999"),
    ];
    for (name, bin, expect) in cases {
        let b = bin.display().to_string();
        let (ok, v) = ctl(&control, &["upgrade", "--binary", &b])?;
        ensure!(!ok, "{name}: the upgrade succeeded: {v}");
        let err = v["error"].as_str().unwrap_or_default();
        ensure!(
            err.contains(expect),
            "{name}: error {err:?}, expected {expect:?}"
        );
        // The old daemon still serves the VM, both ways, on the same connection.
        gs.send(name.as_bytes())?;
        let mut got = vec![0u8; name.len()];
        h.read_exact(&mut got)?;
        ensure!(
            got == name.as_bytes(),
            "{name}: guest -> host after the failure"
        );
        h.write_all(b"still")?;
        let mut r = [0u8; 5];
        (&gs).read_exact(&mut r)?;
        ensure!(&r == b"still", "{name}: host -> guest after the failure");
        let (ok, st) = ctl(&control, &["status"])?;
        ensure!(
            ok && st["vms"][0]["frontend"] == true,
            "{name}: status {st}"
        );
        ensure!(s.daemon.pid().is_some(), "{name}: the old daemon is gone");
    }
    ensure!(
        vm.guest.events().is_empty(),
        "guest events {:?}",
        vm.guest.events()
    );
    vm.guest.health()?;
    Ok(())
}

fn script(path: &Path, body: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The `upgrade_peer` test binary: speaks the channel with record version 999.
fn upgrade_peer() -> Result<PathBuf> {
    Ok(PathBuf::from(env!("CARGO_BIN_EXE_upgrade_peer")))
}
