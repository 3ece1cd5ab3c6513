//! Operator tools: `vhost-plug ctl conns` against the open connections, `vhost-plug state
//! inspect` on a state saved through the simulated VMM and on damaged files, and the
//! per-connection span in JSON log lines.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test ops -- --nocapture`.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use vhost_plug_tests::harness::{ctl, recv_exact, Setup, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_connect, host_listen, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::state::state_cfg;
use vhost_plug_tests::{DaemonKind, DriverConfig, QueueSet, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(10);
const XFER: Duration = Duration::from_secs(10);

/// Runs `vhost-plug ARGS...`; returns success, stdout and stderr.
fn run(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(DaemonKind::VhostPlug.binary()?)
        .args(args)
        .output()
        .context("running vhost-plug")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn boot_with_state(s: &Setup) -> Result<TestVm> {
    s.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())
}

/// The `connections` rows of a `ctl conns` answer.
fn rows(v: &Value) -> Result<&Vec<Value>> {
    v["connections"].as_array().context("no connections list")
}

#[test]
fn ctl_conns_lists_open_connections() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("ctl.sock");
    let sock_s = sock.display().to_string();
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3), VmSpec::new(d, 4)],
        &["--control-socket", &sock_s],
    )?;
    let r = (|| -> Result<()> {
        // No VMM yet: nothing to list, and no wait.
        let (ok, v) = ctl(&sock, &["conns"])?;
        ensure!(ok && rows(&v)?.is_empty(), "{v}");

        let vm = s.boot(0)?;
        let uds = vm.spec.uds_path.clone();
        // Guest -> host port 1234: 100 bytes up, 30 down.
        let l = host_listen(&uds, 1234)?;
        let g = vm
            .guest
            .connect_timeout(HOST_CID, 1234, SockType::Stream, PROMPT)
            .map_err(|e| anyhow::anyhow!("connect: {e}"))?;
        let mut h = accept_timeout(&l, HOST_TIMEOUT)?;
        g.send(&[1u8; 100])?;
        let mut b = [0u8; 100];
        h.read_exact(&mut b)?;
        h.write_all(&[2u8; 30])?;
        recv_exact(&g, 30)?;
        // Host -> guest port 5000: 50 bytes down.
        let gl = vm.guest.listen(5000, SockType::Stream)?;
        let (mut h2, assigned) = host_connect(&uds, 5000)?;
        let g2 = gl.accept(PROMPT)?;
        h2.write_all(&[3u8; 50])?;
        recv_exact(&g2, 50)?;

        let (ok, v) = ctl(&sock, &["conns"])?;
        ensure!(ok, "conns failed: {v}");
        let list = rows(&v)?;
        ensure!(list.len() == 2, "want 2 connections: {v}");
        let find = |dir: &str| {
            list.iter()
                .find(|r| r["direction"] == dir)
                .with_context(|| format!("no {dir} connection in {v}"))
        };
        let out = find("guest")?;
        ensure!(out["vm"] == 3 && out["kind"] == "stream", "{out}");
        ensure!(out["local_port"] == g.local_port(), "{out}");
        ensure!(out["peer_cid"] == 2 && out["peer_port"] == 1234, "{out}");
        ensure!(out["state"] == "established", "{out}");
        ensure!(
            out["bytes_from_guest"] == 100 && out["bytes_to_guest"] == 30,
            "{out}"
        );
        ensure!(out["tx_buffered"] == 0, "{out}");
        let alloc = out["peer_buf_alloc"].as_u64().context("peer_buf_alloc")?;
        let fwd = out["peer_fwd_cnt"].as_u64().context("peer_fwd_cnt")?;
        let credit = out["peer_credit"].as_u64().context("peer_credit")?;
        ensure!(alloc > 0 && fwd <= 30, "{out}");
        ensure!(credit == alloc - (30 - fwd), "credit {credit}: {out}");
        let inc = find("host")?;
        ensure!(inc["vm"] == 3 && inc["local_port"] == 5000, "{inc}");
        ensure!(
            inc["peer_cid"] == 2 && inc["peer_port"] == assigned,
            "{inc} (assigned {assigned})"
        );
        ensure!(
            inc["bytes_to_guest"] == 50 && inc["bytes_from_guest"] == 0,
            "{inc}"
        );

        // Filters: this VM, the idle one, an unknown one.
        let (ok, v3) = ctl(&sock, &["conns", "--vm", "3"])?;
        ensure!(ok && rows(&v3)?.len() == 2, "{v3}");
        let (ok, v4) = ctl(&sock, &["conns", "--vm", "4"])?;
        ensure!(ok && rows(&v4)?.is_empty(), "{v4}");
        let (ok, v9) = ctl(&sock, &["conns", "--vm", "9"])?;
        ensure!(!ok && v9["error"] == "no such VM", "{v9}");

        // Guest 3 -> guest 4 (same default group): an outgoing row on 3, a sibling one on 4.
        let vm4 = s.boot(1)?;
        let l4 = vm4.guest.listen(6000, SockType::Stream)?;
        let gs = vm
            .guest
            .connect_timeout(4, 6000, SockType::Stream, PROMPT)
            .map_err(|e| anyhow::anyhow!("connect to VM 4: {e}"))?;
        let g4 = l4.accept(PROMPT)?;
        gs.send(b"sib")?;
        recv_exact(&g4, 3)?;
        let (ok, v4) = ctl(&sock, &["conns", "--vm", "4"])?;
        ensure!(ok && rows(&v4)?.len() == 1, "{v4}");
        let sib = &rows(&v4)?[0];
        ensure!(
            sib["direction"] == "sibling" && sib["vm"] == 4 && sib["local_port"] == 6000,
            "{sib}"
        );
        ensure!(
            sib["peer_cid"] == 3 && sib["peer_port"] == gs.local_port(),
            "{sib}"
        );
        ensure!(sib["bytes_to_guest"] == 3, "{sib}");
        let (_, v3) = ctl(&sock, &["conns", "--vm", "3"])?;
        ensure!(
            rows(&v3)?.iter().any(|r| r["direction"] == "guest"
                && r["peer_cid"] == 4
                && r["peer_port"] == 6000
                && r["bytes_from_guest"] == 3),
            "{v3}"
        );
        drop((gs, g4));

        // One closes: it leaves the list.
        drop(g2);
        drop(h2);
        let deadline = Instant::now() + PROMPT;
        loop {
            let (_, v) = ctl(&sock, &["conns"])?;
            let left = rows(&v)?;
            if left.len() == 1 {
                ensure!(
                    left[0]["direction"] == "guest" && left[0]["peer_cid"] == 2,
                    "{v}"
                );
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "closed connection still listed: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Time to answer, measured.
        let t0 = Instant::now();
        ctl(&sock, &["conns"])?;
        eprintln!("[ops] ctl conns answered in {:?}", t0.elapsed());
        drop((g, h));
        Ok(())
    })();
    r.with_context(|| format!("daemon stderr:\n{}", s.daemon.stderr()))
}

fn inspect(file: &Path, extra: &[&str]) -> Result<(bool, String, String)> {
    let f = file.display().to_string();
    let mut args = vec!["state", "inspect", &f];
    args.extend_from_slice(extra);
    run(&args)
}

/// Saves the state of a VM with a plugin whose state is known, through the simulated VMM.
fn saved_state(serializer: &str) -> Result<Vec<u8>> {
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3)],
        &[
            "--plugin",
            "policy=builtin:port-allowlist,name=acl,config=allow=2:1234",
            "--plugin",
            serializer,
        ],
    )?;
    let r = (|| -> Result<Vec<u8>> {
        let mut vm = boot_with_state(&s)?;
        // One packet exchange (a refused connect) makes sure the device has seen the driver's
        // rings in use; a state saved before that is not "live" (it has nothing to reset).
        let _ = vm
            .guest
            .connect_timeout(HOST_CID, 1, SockType::Stream, Duration::from_secs(5));
        vm.guest.pause_interrupts()?;
        let bases = vm.sim.stop_vrings()?;
        let blob = vm.sim.save_state(XFER)?;
        vm.sim.resume_vrings(&bases)?;
        vm.guest.resume_interrupts();
        Ok(blob)
    })();
    r.with_context(|| format!("daemon stderr:\n{}", s.daemon.stderr()))
}

#[test]
fn state_inspect_decodes_saved_states_and_refuses_damaged_ones() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (serializer, name) in [
        (
            "serializer=builtin:serializer-postcard",
            "serializer-postcard",
        ),
        ("serializer=builtin:serializer-json", "serializer-json"),
    ] {
        let blob = saved_state(serializer)?;
        let file = dir.path().join(format!("{name}.state"));
        std::fs::write(&file, &blob)?;
        let (ok, out, err) = inspect(&file, &[])?;
        ensure!(ok, "{name}: inspect failed: {err}");
        let v: Value = serde_json::from_str(&out).with_context(|| out.clone())?;
        ensure!(v["serializer"] == name, "{v}");
        let st = &v["state"];
        ensure!(st["guest_cid"] == 3, "{v}");
        ensure!(
            st["event_queue"]["owner"] == "backend" && st["event_queue"]["driver_live"] == true,
            "{v}"
        );
        ensure!(
            st["connections"].as_array().is_some_and(|c| c.is_empty()),
            "{v}"
        );
        let plugins = st["plugins"].as_array().context("plugins")?;
        ensure!(
            plugins.len() == 1 && plugins[0]["name"] == "acl",
            "plugin states: {v}"
        );
        ensure!(plugins[0]["schema"].as_u64().is_some(), "{v}");
        eprintln!("[ops] {name}: {} byte state inspected", blob.len());

        // Damaged copies: each refused with a message naming the damage.
        let mut flipped = blob.clone();
        if let Some(b) = flipped.last_mut() {
            *b ^= 0x55;
        }
        let mut magic = blob.clone();
        magic[0] = b'X';
        for (what, bytes, want) in [
            ("checksum", flipped, "checksum"),
            ("truncated", blob[..blob.len() - 3].to_vec(), "payload is"),
            ("header cut", blob[..12].to_vec(), "truncated"),
            ("magic", magic, "bad magic"),
            ("empty", Vec::new(), "bad magic"),
        ] {
            let f = dir
                .path()
                .join(format!("{name}-{}.state", what.replace(' ', "-")));
            std::fs::write(&f, &bytes)?;
            let (ok, out, err) = inspect(&f, &[])?;
            ensure!(!ok && out.is_empty(), "{name} {what}: accepted: {out}");
            ensure!(
                err.contains(want),
                "{name} {what}: stderr {err:?}, want {want:?}"
            );
        }
        // A serializer that cannot read this payload: its refusal is reported.
        if name == "serializer-json" {
            let (ok, _, err) = inspect(&file, &["--serializer", "/nonexistent.wasm"])?;
            ensure!(!ok && err.contains("nonexistent"), "{err}");
        }
    }
    // A state framed for a serializer that is not built in.
    let unknown = {
        let payload = b"{}";
        let name = b"my-serializer";
        let mut b = b"VHPLUGST".to_vec();
        b.extend_from_slice(&1u16.to_le_bytes());
        b.push(name.len() as u8);
        b.extend_from_slice(name);
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        b.extend_from_slice(payload);
        b
    };
    let f = dir.path().join("unknown.state");
    std::fs::write(&f, unknown)?;
    let (ok, _, err) = inspect(&f, &[])?;
    ensure!(
        !ok && err.contains("my-serializer") && err.contains("--serializer"),
        "{err}"
    );
    let (ok, _, err) = inspect(&dir.path().join("missing.state"), &[])?;
    ensure!(!ok && err.contains("missing.state"), "{err}");
    Ok(())
}

/// JSON log lines about a connection carry its span: vm, local_port, peer_cid, peer_port.
#[test]
fn connection_log_lines_carry_the_connection_span() -> Result<()> {
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3)],
        &["--log-format", "json", "--log-level", "debug"],
    )?;
    let r = (|| -> Result<()> {
        let vm = s.boot(0)?;
        let uds = vm.spec.uds_path.clone();
        let l = host_listen(&uds, 1234)?;
        let g = vm
            .guest
            .connect_timeout(HOST_CID, 1234, SockType::Stream, PROMPT)
            .map_err(|e| anyhow::anyhow!("connect: {e}"))?;
        let h = accept_timeout(&l, HOST_TIMEOUT)?;
        let guest_port = g.local_port();
        let gl = vm.guest.listen(5000, SockType::Stream)?;
        let (h2, assigned) = host_connect(&uds, 5000)?;
        let g2 = gl.accept(PROMPT)?;
        // Closing: the device logs it inside the connection's span.
        drop(g);
        drop(g2);
        let want = [
            (u64::from(guest_port), 1234u64, "connection closed"),
            (5000, u64::from(assigned), "host connect"),
        ];
        let deadline = Instant::now() + PROMPT;
        loop {
            let log = s.daemon.stderr();
            let lines: Vec<Value> = log
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            ensure!(!lines.is_empty(), "no JSON log lines: {log}");
            let found = want.iter().all(|(local, peer, msg)| {
                lines.iter().any(|l| {
                    let span = &l["span"];
                    l["fields"]["message"] == *msg
                        && span["name"] == "conn"
                        && span["vm"] == 3
                        && span["local_port"] == *local
                        && span["peer_cid"] == 2
                        && span["peer_port"] == *peer
                })
            });
            if found {
                break;
            }
            if Instant::now() >= deadline {
                bail!("no {want:?} lines with their conn span in:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop((h, h2));
        Ok(())
    })();
    r.with_context(|| format!("daemon stderr:\n{}", s.daemon.stderr()))
}

/// Guest connections to host port `port`, each accepted and closed.
fn connect_n(vm: &TestVm, port: u32, n: usize) -> Result<()> {
    let l = host_listen(&vm.spec.uds_path, port)?;
    for _ in 0..n {
        let g = vm
            .guest
            .connect_timeout(HOST_CID, port, SockType::Stream, PROMPT)
            .map_err(|e| anyhow::anyhow!("connect: {e}"))?;
        let _h = accept_timeout(&l, HOST_TIMEOUT)?;
        g.close()?;
    }
    let _ = std::fs::remove_file(vhost_plug_tests::host::port_path(&vm.spec.uds_path, port));
    Ok(())
}

#[test]
fn ctl_save_and_load_take_plugin_state_to_disk_and_back() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("ctl.sock");
    let sock_s = sock.display().to_string();
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3), VmSpec::new(d, 4)],
        &[
            "--control-socket",
            &sock_s,
            "--plugin",
            "policy=builtin:port-allowlist-v1,name=acl,config=allow=2:1234",
            "--plugin",
            "serializer=builtin:serializer-json",
        ],
    )?;
    let r = (|| -> Result<()> {
        let vm = boot_with_state(&s)?;
        connect_n(&vm, 1234, 3)?;
        let f1 = dir.path().join("three.state");
        let f1_s = f1.display().to_string();
        let (ok, v) = ctl(&sock, &["save", &f1_s])?;
        ensure!(!ok, "save without --vm on a two-VM daemon: {v}");
        let (ok, v) = ctl(&sock, &["save", &f1_s, "--vm", "3"])?;
        ensure!(ok, "ctl save: {v}");
        let mode = std::fs::metadata(&f1)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "state file mode {mode:o}");
        // What was saved: CID 3, live driver, the acl plugin with 3 hits on its one rule.
        let (ok, out, err) = inspect(&f1, &[])?;
        ensure!(ok, "inspect: {err}");
        let j: Value = serde_json::from_str(&out)?;
        ensure!(j["state"]["guest_cid"] == 3, "{j}");
        ensure!(j["state"]["event_queue"]["driver_live"] == true, "{j}");
        ensure!(j["state"]["plugins"][0]["name"] == "acl", "{j}");

        connect_n(&vm, 1234, 2)?;
        let f2 = dir.path().join("five.state");
        let (ok, v) = ctl(&sock, &["save", &f2.display().to_string(), "--vm", "3"])?;
        ensure!(ok, "{v}");
        ensure!(
            std::fs::read(&f1)? != std::fs::read(&f2)?,
            "hit counters not in the state"
        );

        // Back to three hits: saving again gives the first file byte for byte.
        let (ok, v) = ctl(&sock, &["load", &f1_s, "--vm", "3"])?;
        ensure!(ok && v["plugins"][0] == "acl", "ctl load: {v}");
        let f3 = dir.path().join("again.state");
        let (ok, v) = ctl(&sock, &["save", &f3.display().to_string(), "--vm", "3"])?;
        ensure!(ok, "{v}");
        ensure!(
            std::fs::read(&f1)? == std::fs::read(&f3)?,
            "the state after load differs from the file loaded"
        );

        // Refusals change nothing: another VM's file, a damaged file, a missing file.
        let (ok, v) = ctl(&sock, &["load", &f1_s, "--vm", "4"])?;
        ensure!(
            !ok && v["error"].as_str().is_some_and(|e| e.contains("CID")),
            "{v}"
        );
        let bad = dir.path().join("bad.state");
        let mut bytes = std::fs::read(&f1)?;
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20;
        std::fs::write(&bad, &bytes)?;
        let (ok, v) = ctl(&sock, &["load", &bad.display().to_string(), "--vm", "3"])?;
        ensure!(
            !ok && v["error"].as_str().is_some_and(|e| e.contains("checksum")),
            "{v}"
        );
        let (ok, v) = ctl(&sock, &["load", "no-such.state", "--vm", "3"])?;
        ensure!(!ok, "{v}");
        let f4 = dir.path().join("after-refusals.state");
        let (ok, v) = ctl(&sock, &["save", &f4.display().to_string(), "--vm", "3"])?;
        ensure!(ok, "{v}");
        ensure!(
            std::fs::read(&f1)? == std::fs::read(&f4)?,
            "a refused load changed the state"
        );
        vm.shutdown();
        Ok(())
    })();
    r.with_context(|| format!("daemon stderr:\n{}", s.daemon.stderr()))
}
