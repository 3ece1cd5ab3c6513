//! Same-host handover (issue 5, mode 2): a second daemon takes a running VM's connections
//! over. The old daemon is armed through its control socket (`ctl handover --to NEW`), the
//! simulated VMM suspends and saves on the old daemon and loads into the new one at the same
//! rings; the sockets travel between the daemons' control sockets (SCM_RIGHTS).
//!
//! Run: `cargo test -p vhost-plug-tests --release --test handover -- --nocapture`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vhost_plug_tests::data::{send_pattern, Digester};
use vhost_plug_tests::harness::{ctl, landlock_abi, Setup, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_connect, host_listen, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::sim::{read_cid, LoadReport};
use vhost_plug_tests::state::{state_cfg, suspend_and_save};
use vhost_plug_tests::{DaemonKind, DriverConfig, QueueSet, SimConfig, SimVmm, SockType, VmSpec};

const XFER: Duration = Duration::from_secs(10);
const PROMPT: Duration = Duration::from_secs(10);

/// A daemon serving CID 3 with a control socket; `uds` shares the old daemon's hybrid path.
fn daemon(ctl_dir: &Path, name: &str, uds: Option<&Path>, extra: &[&str]) -> Result<Setup> {
    daemon_waiting(ctl_dir, name, uds, extra, None)
}

/// [`daemon`] with the VM's `connect-wait`.
fn daemon_waiting(
    ctl_dir: &Path,
    name: &str,
    uds: Option<&Path>,
    extra: &[&str],
    wait: Option<&str>,
) -> Result<Setup> {
    let control = ctl_dir.join(format!("{name}.ctl"));
    let control = control.display().to_string();
    let mut args = vec!["--control-socket", control.as_str()];
    args.extend_from_slice(extra);
    Setup::with(
        DaemonKind::VhostPlug,
        |d| {
            let mut spec = VmSpec::new(d, 3);
            if let Some(u) = uds {
                spec.uds_path = u.to_path_buf();
            }
            if let Some(w) = wait {
                spec = spec.connect_wait(w);
            }
            vec![spec]
        },
        &args,
    )
}

fn conn_err(e: vhost_plug_tests::ConnectError) -> anyhow::Error {
    anyhow::anyhow!("guest connect: {e}")
}

fn control(ctl_dir: &Path, name: &str) -> PathBuf {
    ctl_dir.join(format!("{name}.ctl"))
}

fn expect_loaded(r: &LoadReport, what: &str) -> Result<()> {
    if let Err(e) = &r.check {
        bail!("{what}: CHECK_DEVICE_STATE failed: {e}");
    }
    if let Some(w) = &r.write_error {
        bail!("{what}: LOAD accepted but the blob was not fully written: {w}");
    }
    Ok(())
}

/// Arms `old` for a handover to `new`, suspends and saves the VM there, and loads the blob into
/// the new daemon at the same rings. Returns the new VMM connection (rings running) and the
/// blob; the old VMM is still connected.
fn hand_over(
    vm: &mut TestVm,
    old_ctl: &Path,
    new_ctl: &Path,
    new_socket: &Path,
) -> Result<(SimVmm, Vec<u8>)> {
    let to = new_ctl.display().to_string();
    let (ok, v) = ctl(old_ctl, &["handover", "--to", &to])?;
    ensure!(ok, "ctl handover: {v}");
    vm.guest.pause_interrupts()?;
    let t0 = Instant::now();
    let (bases, blob) = suspend_and_save(vm, XFER)?;
    let save = t0.elapsed();
    let target = vm
        .sim
        .migration_target(new_socket, state_cfg(QueueSet::All))?;
    let t1 = Instant::now();
    expect_loaded(&target.load_state(&blob, XFER)?, "LOAD on the new daemon")?;
    let load = t1.elapsed();
    let mut fe = target.frontend_handle()?;
    vm.guest.set_cid_source(Box::new(move || read_cid(&mut fe)));
    let mut target = target;
    target
        .resume_vrings(&bases)
        .context("resuming on the new daemon")?;
    vm.guest.resume_interrupts();
    eprintln!(
        "[handover] blob {} bytes, save {save:?}, load {load:?}",
        blob.len()
    );
    Ok((target, blob))
}

/// Both daemons run in their Landlock sandbox where the kernel has one: a handover needs no
/// more than the sandbox allows (sockets over the control socket, the hybrid path taken
/// over in the same directory).
#[test]
fn streams_of_100_mb_survive_a_handover() -> Result<()> {
    let total: u64 = 100 << 20;
    let ctl_dir = tempfile::tempdir()?;
    let sandbox: &[&str] = if landlock_abi() > 0 {
        &["--landlock"]
    } else {
        &[]
    };
    let old = daemon(ctl_dir.path(), "old", None, sandbox)?;
    ensure!(
        sandbox.is_empty() || old.daemon.stderr().contains("landlock sandbox"),
        "the old daemon did not enter its sandbox"
    );
    let uds = old.vms[0].uds_path.clone();
    let mut vm = old.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;

    // Guest -> host and host -> guest, each 100 MB, checksummed at both ends.
    let hl = host_listen(&uds, 6000)?;
    let g2h = vm
        .guest
        .connect_timeout(HOST_CID, 6000, SockType::Stream, PROMPT)
        .map_err(conn_err)?;
    let h_g2h = accept_timeout(&hl, HOST_TIMEOUT)?;
    let gl = vm.guest.listen(6001, SockType::Stream)?;
    let (h_h2g, _) = host_connect(&uds, 6001)?;
    let h2g = gl.accept(PROMPT)?;
    let gl_late = vm.guest.listen(6002, SockType::Stream)?;

    let paused = AtomicUsize::new(0);
    let go = AtomicBool::new(false);
    let res = thread::scope(|sc| -> Result<()> {
        let g_tx = sc.spawn(|| send_pattern(&g2h, 11, total, 65536));
        let h_rx = sc.spawn(|| recv_pausing(&h_g2h, total, &paused, &go));
        let h_tx = sc.spawn(|| send_pattern(&h_h2g, 12, total, 65536));
        let g_rx = sc.spawn(|| recv_pausing(&h2g, total, &paused, &go));

        // Both receivers stop half way, so the senders fill every buffer on the way (the
        // daemon's included); then the new daemon starts (it takes over the hybrid path: a
        // host connect from now on waits in its backlog) and the VM switches.
        let deadline = Instant::now() + PROMPT;
        while paused.load(Ordering::SeqCst) < 2 {
            ensure!(
                Instant::now() < deadline,
                "the streams did not get half way"
            );
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(Duration::from_millis(200));
        let new = daemon(ctl_dir.path(), "new", Some(&uds), sandbox)?;
        let late = sc.spawn(|| host_connect(&uds, 6002));
        let (target, _) = hand_over(
            &mut vm,
            &control(ctl_dir.path(), "old"),
            &control(ctl_dir.path(), "new"),
            &new.vms[0].socket,
        )?;
        // The old VMM leaves; the old daemon closes only its copies of the sockets.
        vm.sim.disconnect();
        go.store(true, Ordering::SeqCst);

        let (sent_g, got_h) = (join(g_tx)?, join(h_rx)?);
        let (sent_h, got_g) = (join(h_tx)?, join(g_rx)?);
        ensure!(
            sent_g == got_h,
            "guest -> host: sent {sent_g:?}, the host got {got_h:?}"
        );
        ensure!(
            sent_h == got_g,
            "host -> guest: sent {sent_h:?}, the guest got {got_g:?}"
        );
        // The connect made during the switch is served by the new daemon.
        let (mut late_h, _) = late
            .join()
            .map_err(|_| anyhow::anyhow!("late connect thread panicked"))??;
        let late_g = gl_late.accept(PROMPT)?;
        std::io::Write::write_all(&mut late_h, b"late")?;
        let mut b = [0u8; 4];
        std::io::Read::read_exact(&mut &late_g, &mut b)?;
        ensure!(&b == b"late", "bytes changed on the late connection");
        ensure!(
            vm.guest.events().is_empty(),
            "the guest saw events {:?}: a handover must not reset the transport",
            vm.guest.events()
        );
        vm.guest.health()?;
        let (ok, st) = ctl(&control(ctl_dir.path(), "new"), &["status"])?;
        ensure!(
            ok && st["vms"][0]["connections"].as_u64() == Some(3),
            "new daemon status {st}"
        );
        drop(target);
        drop(new);
        Ok(())
    });
    res.with_context(|| format!("old daemon stderr:\n{}", old.daemon.stderr()))
}

/// Reads `total` bytes; half way, counts itself in `paused` and waits for `go`.
fn recv_pausing(
    mut r: impl std::io::Read,
    total: u64,
    paused: &AtomicUsize,
    go: &AtomicBool,
) -> std::io::Result<vhost_plug_tests::data::Digest> {
    let mut d = Digester::default();
    let mut buf = vec![0u8; 65536];
    let mut got = 0u64;
    let mut waited = false;
    while got < total {
        if !waited && got >= total / 2 {
            waited = true;
            paused.fetch_add(1, Ordering::SeqCst);
            while !go.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(5));
            }
        }
        let want = (buf.len() as u64).min(total - got) as usize;
        let n = match r.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        d.update(&buf[..n]);
        got += n as u64;
    }
    Ok(d.finish())
}

fn join<T>(h: thread::ScopedJoinHandle<'_, std::io::Result<T>>) -> Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("stream thread panicked"))?
        .context("stream")
}

#[test]
fn an_abandoned_handover_resumes_on_the_old_daemon() -> Result<()> {
    let ctl_dir = tempfile::tempdir()?;
    let old = daemon(ctl_dir.path(), "old", None, &[])?;
    let new = daemon(ctl_dir.path(), "new", None, &[])?;
    let uds = old.vms[0].uds_path.clone();
    let mut vm = old.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
    let hl = host_listen(&uds, 6100)?;
    let gs = vm
        .guest
        .connect_timeout(HOST_CID, 6100, SockType::Stream, PROMPT)
        .map_err(conn_err)?;
    let mut h = accept_timeout(&hl, HOST_TIMEOUT)?;
    gs.send(b"before")?;
    let mut b = [0u8; 6];
    std::io::Read::read_exact(&mut h, &mut b)?;

    let to = control(ctl_dir.path(), "new").display().to_string();
    let (ok, v) = ctl(&control(ctl_dir.path(), "old"), &["handover", "--to", &to])?;
    ensure!(ok, "ctl handover: {v}");
    vm.guest.pause_interrupts()?;
    let (bases, blob) = suspend_and_save(&mut vm, XFER)?;
    ensure!(!blob.is_empty());
    // The VMM changes its mind: the rings run on the old daemon again.
    vm.sim.resume_vrings(&bases)?;
    vm.guest.resume_interrupts();
    gs.send(b"after!")?;
    std::io::Read::read_exact(&mut h, &mut b)?;
    ensure!(&b == b"after!", "bytes after the abandoned handover: {b:?}");
    std::io::Write::write_all(&mut h, b"back")?;
    let mut r = [0u8; 4];
    std::io::Read::read_exact(&mut &gs, &mut r)?;
    ensure!(&r == b"back");
    vm.guest.health()?;
    drop(new);
    Ok(())
}

/// A host connect waiting for the guest (`connect-wait`) moves as a connection request: the
/// new daemon asks the guest again and waits by its own `connect-wait`; the host program
/// keeps its socket and gets `OK` from the new daemon.
#[test]
fn a_waiting_host_connect_moves_in_a_handover() -> Result<()> {
    use vhost_plug_tests::driver::Direction;
    use vhost_plug_tests::packet::OP_RST;
    let ctl_dir = tempfile::tempdir()?;
    let old = daemon_waiting(ctl_dir.path(), "old", None, &[], Some("60s"))?;
    let uds = old.vms[0].uds_path.clone();
    let mut vm = old.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
    let refusals = |vm: &TestVm, since| {
        vm.guest
            .packets_since(since)
            .iter()
            .filter(|p| p.dir == Direction::ToDevice && p.hdr.op == OP_RST)
            .filter(|p| p.hdr.src_port == 6300)
            .count()
    };
    let wait_refusals = |vm: &TestVm, since| -> Result<()> {
        let deadline = Instant::now() + PROMPT;
        while refusals(vm, since) == 0 {
            ensure!(Instant::now() < deadline, "the guest was not asked");
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    };
    let since = vm.guest.log_seq();
    let host = thread::spawn({
        let uds = uds.clone();
        move || host_connect(&uds, 6300)
    });
    wait_refusals(&vm, since)?;

    let new = daemon_waiting(ctl_dir.path(), "new", Some(&uds), &[], Some("60s"))?;
    let since = vm.guest.log_seq();
    let (target, _) = hand_over(
        &mut vm,
        &control(ctl_dir.path(), "old"),
        &control(ctl_dir.path(), "new"),
        &new.vms[0].socket,
    )?;
    vm.sim.disconnect();
    // The new daemon asks and is refused too, then the guest starts listening.
    wait_refusals(&vm, since)?;
    let l = vm.guest.listen(6300, SockType::Stream)?;
    let g = l
        .accept(PROMPT)
        .context("the new daemon never asked again")?;
    let (mut h, _) = host
        .join()
        .map_err(|_| anyhow::anyhow!("host thread panicked"))??;
    std::io::Write::write_all(&mut h, b"moved")?;
    let mut b = [0u8; 5];
    std::io::Read::read_exact(&mut &g, &mut b)?;
    ensure!(&b == b"moved");
    vm.guest.health()?;
    drop(target);
    drop(new);
    Ok(())
}

/// A handover abandoned while a host connect waits for the guest: the connection carries on
/// waiting on the old daemon and gets `OK` once the guest listens.
#[test]
fn a_waiting_host_connect_survives_an_abandoned_handover() -> Result<()> {
    use vhost_plug_tests::driver::Direction;
    use vhost_plug_tests::packet::OP_RST;
    let ctl_dir = tempfile::tempdir()?;
    let old = daemon_waiting(ctl_dir.path(), "old", None, &[], Some("60s"))?;
    let new = daemon(ctl_dir.path(), "new", None, &[])?;
    let uds = old.vms[0].uds_path.clone();
    let mut vm = old.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
    let refused = |vm: &TestVm, since| {
        vm.guest
            .packets_since(since)
            .iter()
            .any(|p| p.dir == Direction::ToDevice && p.hdr.op == OP_RST && p.hdr.src_port == 6400)
    };
    let since = vm.guest.log_seq();
    let host = thread::spawn({
        let uds = uds.clone();
        move || host_connect(&uds, 6400)
    });
    let deadline = Instant::now() + PROMPT;
    while !refused(&vm, since) {
        ensure!(Instant::now() < deadline, "the guest was not asked");
        thread::sleep(Duration::from_millis(5));
    }
    let to = control(ctl_dir.path(), "new").display().to_string();
    let (ok, v) = ctl(&control(ctl_dir.path(), "old"), &["handover", "--to", &to])?;
    ensure!(ok, "ctl handover: {v}");
    vm.guest.pause_interrupts()?;
    let (bases, _) = suspend_and_save(&mut vm, XFER)?;
    vm.sim.resume_vrings(&bases)?;
    vm.guest.resume_interrupts();
    let l = vm.guest.listen(6400, SockType::Stream)?;
    let g = l
        .accept(PROMPT)
        .context("not asked again after the abandoned handover")?;
    let (mut h, _) = host
        .join()
        .map_err(|_| anyhow::anyhow!("host thread panicked"))??;
    std::io::Write::write_all(&mut h, b"stayed")?;
    let mut b = [0u8; 6];
    std::io::Read::read_exact(&mut &g, &mut b)?;
    ensure!(&b == b"stayed");
    vm.guest.health()?;
    drop(new);
    Ok(())
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(65536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn thousand_connections_round_trip_through_two_handovers() -> Result<()> {
    raise_fd_limit();
    let ctl_dir = tempfile::tempdir()?;
    let a = daemon(ctl_dir.path(), "a", None, &[])?;
    let uds = a.vms[0].uds_path.clone();
    let mut vm = a.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
    let hl = host_listen(&uds, 6200)?;
    let mut conns = Vec::new();
    for i in 0..1000u32 {
        let gs = vm
            .guest
            .connect_timeout(HOST_CID, 6200, SockType::Stream, PROMPT)
            .map_err(conn_err)?;
        let h = accept_timeout(&hl, HOST_TIMEOUT)?;
        // Some unread bytes each way so that counters differ between connections.
        gs.send(&vec![i as u8; (i % 7) as usize + 1])?;
        conns.push((gs, h));
    }
    thread::sleep(Duration::from_millis(200));

    let b = daemon(ctl_dir.path(), "b", Some(&uds), &[])?;
    let t0 = Instant::now();
    let (target, blob_a) = hand_over(
        &mut vm,
        &control(ctl_dir.path(), "a"),
        &control(ctl_dir.path(), "b"),
        &b.vms[0].socket,
    )
    .with_context(|| format!("new daemon stderr:\n{}", b.daemon.stderr()))?;
    let first = t0.elapsed();
    vm.sim.disconnect();
    vm.sim = target;

    let c = daemon(ctl_dir.path(), "c", Some(&uds), &[])?;
    let (target, blob_b) = hand_over(
        &mut vm,
        &control(ctl_dir.path(), "b"),
        &control(ctl_dir.path(), "c"),
        &c.vms[0].socket,
    )
    .with_context(|| format!("new daemon stderr:\n{}", c.daemon.stderr()))?;
    vm.sim.disconnect();
    vm.sim = target;

    // The second daemon's state is the first one's, byte for byte: same table (order, credit
    // counters, unsent bytes, owed packets, fd indices), same plugin states.
    ensure!(
        blob_a == blob_b,
        "the state changed across a handover round trip ({} vs {} bytes)",
        blob_a.len(),
        blob_b.len()
    );
    eprintln!(
        "[handover] 1,000 connections (serializer-postcard): blob {} bytes, ctl + suspend + \
         save + load + resume {first:?}",
        blob_a.len()
    );
    // Every connection still carries data after two handovers.
    for (i, (gs, h)) in conns.iter_mut().enumerate().step_by(97) {
        let want = vec![i as u8; i % 7 + 1];
        let mut got = vec![0u8; want.len()];
        std::io::Read::read_exact(h, &mut got)?;
        ensure!(got == want, "connection {i}: early bytes changed");
        std::io::Write::write_all(h, b"ok")?;
        let mut r = [0u8; 2];
        std::io::Read::read_exact(&mut &*gs, &mut r)?;
        ensure!(
            &r == b"ok",
            "connection {i}: host -> guest after the handovers"
        );
    }
    vm.guest.health()?;
    drop((b, c));
    Ok(())
}

#[test]
fn a_connection_table_without_its_sockets_is_refused() -> Result<()> {
    let ctl_dir = tempfile::tempdir()?;
    let a = daemon(ctl_dir.path(), "a", None, &[])?;
    let b = daemon(ctl_dir.path(), "b", None, &[])?;
    let uds = a.vms[0].uds_path.clone();
    let mut vm = a.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
    let hl = host_listen(&uds, 6300)?;
    let _gs = vm
        .guest
        .connect_timeout(HOST_CID, 6300, SockType::Stream, PROMPT)
        .map_err(conn_err)?;
    let _h = accept_timeout(&hl, HOST_TIMEOUT)?;
    // Armed to a third control socket nobody serves: the SAVE fails, nothing is sent.
    let nowhere = ctl_dir.path().join("nobody.ctl").display().to_string();
    let (ok, _) = ctl(
        &control(ctl_dir.path(), "a"),
        &["handover", "--to", &nowhere],
    )?;
    ensure!(ok);
    vm.guest.pause_interrupts()?;
    let bases = vm.sim.stop_vrings()?;
    ensure!(
        vm.sim.save_state(XFER).is_err(),
        "a handover SAVE succeeded although the new daemon could not be reached"
    );
    // A handover blob loaded without its sockets: armed at b, saved, but loaded into a fresh
    // daemon that never got them.
    let to = control(ctl_dir.path(), "b").display().to_string();
    let (ok, _) = ctl(&control(ctl_dir.path(), "a"), &["handover", "--to", &to])?;
    ensure!(ok);
    let blob = vm.sim.save_state(XFER)?;
    let fresh = daemon(ctl_dir.path(), "fresh", None, &[])?;
    let sim = SimVmm::connect(
        &fresh.vms[0].socket,
        SimConfig {
            start_vrings: false,
            ..state_cfg(QueueSet::All)
        },
    )?;
    let r = sim.load_state(&blob, XFER)?;
    ensure!(
        r.check.is_err(),
        "a connection table without sockets was loaded"
    );
    ensure!(
        fresh
            .daemon
            .stderr()
            .contains("no sockets were handed over"),
        "the log does not say why: {}",
        fresh.daemon.stderr()
    );
    // The source carries on.
    vm.sim.resume_vrings(&bases)?;
    vm.guest.resume_interrupts();
    drop(b);
    Ok(())
}
