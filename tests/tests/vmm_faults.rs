//! The VMM side failing: its vhost-user connection closes in the middle of a transfer, in the
//! middle of a device-state save, and in the middle of a load. Each time the daemon must log
//! the end of that frontend session, close the host peers of that VM (they see end of
//! stream), leave the other VM untouched, and serve the next frontend of the same VM; the
//! daemon's fds come back to where they were.
//!
//! Run with output: `cargo test --release -p vhost-plug-tests --test vmm_faults -- --nocapture`

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost_plug_tests::checks::{serves, settled_fds, wait_fds};
use vhost_plug_tests::data::{digest, recv_digest, send_pattern, Pattern};
use vhost_plug_tests::harness::{exchange, Setup, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_connect, host_listen, port_path, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::{DaemonKind, DriverConfig, GuestSocket, SimConfig, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(5);

fn setup() -> Result<Setup> {
    Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3), VmSpec::new(d, 4)],
        &[],
    )
}

fn state_cfg() -> SimConfig {
    SimConfig {
        extra_protocol_features: VhostUserProtocolFeatures::DEVICE_STATE,
        ..SimConfig::default()
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads a host stream until end of stream or reset, within `t`: the daemon closed it.
fn sees_eof(s: &mut UnixStream, t: Duration) -> Result<()> {
    s.set_read_timeout(Some(t))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e).context("host peer saw no end of stream"),
        }
    }
}

/// Host peers of `vm` in both directions, with bytes already moved on both: (host end of a
/// guest-initiated connection, host end of a host-initiated one, the two guest sockets).
fn host_peers(vm: &TestVm, port: u32) -> Result<(UnixStream, UnixStream, Vec<GuestSocket>)> {
    let _ = std::fs::remove_file(port_path(&vm.spec.uds_path, port));
    let l = host_listen(&vm.spec.uds_path, port)?;
    let g1 = vm
        .guest
        .connect(HOST_CID, port, SockType::Stream)
        .map_err(|e| anyhow!("{e}"))?;
    let mut h1 = accept_timeout(&l, HOST_TIMEOUT)?;
    let gl = vm.guest.listen(port + 1, SockType::Stream)?;
    let (mut h2, _) = host_connect(&vm.spec.uds_path, port + 1)?;
    let g2 = gl.accept(HOST_TIMEOUT)?;
    g1.send(b"ping")?;
    h1.read_exact(&mut [0u8; 4])?;
    h2.write_all(b"pong")?;
    (&g2).read_exact(&mut [0u8; 4])?;
    Ok((h1, h2, vec![g1, g2]))
}

/// The next frontend of `spec`'s VM is served.
fn next_frontend_serves(s: &Setup, idx: usize, port: u32, what: &str) -> Result<()> {
    let vm = TestVm::boot(
        s.vms[idx].clone(),
        SimConfig::default(),
        DriverConfig::default(),
    )
    .with_context(|| format!("new frontend after {what}"))?;
    serves(&vm, port, what)?;
    vm.shutdown();
    Ok(())
}

#[test]
fn vmm_closes_mid_transfer() -> Result<()> {
    const BYTES: u64 = 64 << 20;
    let mut s = setup()?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let fds0 = settled_fds(&s.daemon)?;
    // VM 3: a guest -> host stream and a host -> guest stream, both far from done.
    let l = host_listen(&a.spec.uds_path, 3000)?;
    let g_up = a
        .guest
        .connect(HOST_CID, 3000, SockType::Stream)
        .map_err(|e| anyhow!("{e}"))?;
    let mut h_up = accept_timeout(&l, HOST_TIMEOUT)?;
    let gl = a.guest.listen(3001, SockType::Stream)?;
    let (h_down, _) = host_connect(&a.spec.uds_path, 3001)?;
    let g_down = gl.accept(HOST_TIMEOUT)?;
    // VM 4: a checksummed echo that runs across the fault.
    let lb = host_listen(&b.spec.uds_path, 3002)?;
    let gb = b
        .guest
        .connect(HOST_CID, 3002, SockType::Stream)
        .map_err(|e| anyhow!("{e}"))?;
    let hb = accept_timeout(&lb, HOST_TIMEOUT)?;
    let mark = s.daemon.log_mark();
    let (up_sent, down_got, b_ok) = std::thread::scope(|sc| -> Result<_> {
        let up = sc.spawn(|| send_pattern(&g_up, 1, BYTES, 64 * 1024));
        let down_writer = sc.spawn(|| send_pattern(&h_down, 2, BYTES, 64 * 1024));
        let down_reader = sc.spawn(|| recv_digest(&g_down, BYTES, 64 * 1024));
        let b_echo = sc.spawn(|| vhost_plug_tests::harness::echo_stream(hb));
        let b_side = sc.spawn(|| -> Result<bool> {
            let data = Pattern::bytes(3, 16 << 20);
            let back = exchange(&gb, &data)?;
            gb.shutdown(false, true)?;
            Ok(digest(&back) == digest(&data))
        });
        // Let bytes flow, then the VMM of VM 3 dies without a word.
        let mut first = vec![0u8; 1 << 20];
        h_up.read_exact(&mut first)?;
        a.guest.pause_interrupts()?;
        let TestVm {
            mut guest, mut sim, ..
        } = a;
        sim.disconnect();
        sees_eof(&mut h_up, PROMPT).context("host peer of the guest->host stream")?;
        let down = down_writer.join().map_err(|_| anyhow!("writer panicked"))?;
        ensure!(
            down.is_err(),
            "the host -> guest writer finished {BYTES} bytes into a dead VM"
        );
        guest.stop();
        let up_sent = up.join().map_err(|_| anyhow!("panicked"))?;
        let down_got = down_reader.join().map_err(|_| anyhow!("panicked"))?;
        let b_ok = b_side.join().map_err(|_| anyhow!("panicked"))??;
        b_echo.join().map_err(|_| anyhow!("panicked"))??;
        Ok((up_sent, down_got, b_ok))
    })?;
    eprintln!(
        "[mid-transfer] VM 3 streams cut: guest->host {}, host->guest {}",
        match &up_sent {
            Ok(d) => format!("finished {} bytes", d.bytes),
            Err(e) => format!("stopped ({e})"),
        },
        match &down_got {
            Ok(d) => format!("{} bytes, then end of stream", d.bytes),
            Err(e) => format!("stopped ({e})"),
        }
    );
    ensure!(b_ok, "VM 4's echo across the fault differs");
    let line = s
        .daemon
        .wait_log(mark, &["frontend disconnected", "cid=3"], PROMPT)
        .context("no log of VM 3's frontend leaving")?;
    eprintln!("[mid-transfer] {}", line.trim());
    serves(&b, 3100, "VM 3's VMM dying mid-transfer")?;
    next_frontend_serves(&s, 0, 3110, "the VMM dying mid-transfer")?;
    drop(b);
    let fds = wait_fds(&s.daemon, fds0, PROMPT)?;
    eprintln!("[mid-transfer] daemon fds {fds0} -> {fds}");
    ensure!(fds <= fds0, "fds {fds0} -> {fds}");
    ensure!(s.daemon.is_running(), "daemon exited");
    Ok(())
}

/// SAVE is started on a stopped device, then the VMM closes the connection without reading
/// the state or asking CHECK_DEVICE_STATE.
#[test]
fn vmm_closes_during_state_save() -> Result<()> {
    let mut s = setup()?;
    let b = s.boot(1)?;
    let fds0 = settled_fds(&s.daemon)?;
    for keep_reading_end in [false, true] {
        let mut a = s.boot_with(0, state_cfg(), DriverConfig::default())?;
        let (mut h1, mut h2, guest_socks) = host_peers(&a, 3200)?;
        a.guest.pause_interrupts()?;
        a.sim.stop_vrings()?;
        let (r, w) = pipe()?;
        let mark = s.daemon.log_mark();
        let own = a
            .sim
            .frontend()?
            .set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                w,
            )
            .map_err(|e| anyhow!("SET_DEVICE_STATE_FD(SAVE): {e}"))?;
        let reader = keep_reading_end.then_some(r);
        a.sim.disconnect();
        sees_eof(&mut h1, PROMPT)?;
        sees_eof(&mut h2, PROMPT)?;
        s.daemon
            .wait_log(mark, &["frontend disconnected", "cid=3"], PROMPT)
            .context("no log of the frontend leaving during SAVE")?;
        drop(guest_socks);
        a.shutdown();
        drop((reader, own));
        let what = format!(
            "a VMM leaving during SAVE (state pipe {})",
            if keep_reading_end {
                "left open, unread"
            } else {
                "closed"
            }
        );
        next_frontend_serves(&s, 0, 3210, &what)?;
        serves(&b, 3220, &what)?;
    }
    drop(b);
    let fds = wait_fds(&s.daemon, fds0, PROMPT)?;
    eprintln!("[save] daemon fds {fds0} -> {fds}");
    ensure!(fds <= fds0, "fds {fds0} -> {fds}");
    ensure!(s.daemon.is_running(), "daemon exited");
    Ok(())
}

/// LOAD is started on a fresh frontend, part of a valid state is written, then the VMM
/// closes the connection, first keeping the state pipe open (the daemon's reader waits on
/// it), then closing it; the daemon serves the next frontend either way and its fds come
/// back once the pipe is gone.
#[test]
fn vmm_closes_during_state_load() -> Result<()> {
    let mut s = setup()?;
    let b = s.boot(1)?;
    // A valid state to cut in half.
    let blob = {
        let mut a = s.boot_with(0, state_cfg(), DriverConfig::default())?;
        a.guest.pause_interrupts()?;
        a.sim.stop_vrings()?;
        let blob = a.sim.save_state(PROMPT)?;
        a.shutdown();
        blob
    };
    eprintln!("[load] saved state: {} bytes", blob.len());
    let fds0 = settled_fds(&s.daemon)?;
    let kinds0 = vhost_plug_tests::checks::fd_summary(&s.daemon);
    for close_pipe_first in [false, true] {
        let sim = vhost_plug_tests::SimVmm::connect(
            &s.vms[0].socket,
            SimConfig {
                start_vrings: false,
                ..state_cfg()
            },
        )?;
        let (r, w) = pipe()?;
        let mark = s.daemon.log_mark();
        let own = sim
            .frontend()?
            .set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                r,
            )
            .map_err(|e| anyhow!("SET_DEVICE_STATE_FD(LOAD): {e}"))?;
        let mut w = std::fs::File::from(w);
        w.write_all(&blob[..blob.len() / 2])?;
        let mut w = Some(w);
        if close_pipe_first {
            w = None;
        }
        drop(sim);
        s.daemon
            .wait_log(mark, &["frontend disconnected", "cid=3"], PROMPT)
            .context("no log of the frontend leaving during LOAD")?;
        let what = format!(
            "a VMM leaving during LOAD (state pipe {})",
            if close_pipe_first {
                "closed first"
            } else {
                "still open"
            }
        );
        next_frontend_serves(&s, 0, 3300, &what)?;
        serves(&b, 3310, &what)?;
        drop((w, own));
        let fds = wait_fds(&s.daemon, fds0, PROMPT)?;
        eprintln!("[load] {what}: daemon fds {fds0} -> {fds} once the pipe is closed");
        ensure!(
            fds <= fds0,
            "fds {fds0} -> {fds}: {} (before: {kinds0})",
            vhost_plug_tests::checks::fd_summary(&s.daemon)
        );
    }
    ensure!(s.daemon.is_running(), "daemon exited");
    Ok(())
}

/// Frontends coming and going (some leaving mid-connection) leave no fds behind.
#[test]
fn frontend_sessions_leave_no_fds_behind() -> Result<()> {
    let mut s = setup()?;
    let b = s.boot(1)?;
    next_frontend_serves(&s, 0, 3400, "a first session")?;
    let fds0 = settled_fds(&s.daemon)?;
    for i in 0..20u32 {
        let a = s.boot(0)?;
        let (_h1, _h2, socks) = host_peers(&a, 3410)?;
        if i % 2 == 0 {
            drop(socks);
            a.shutdown();
        } else {
            // Crash style: the VMM goes before the guest closes anything.
            let TestVm {
                mut guest, mut sim, ..
            } = a;
            sim.disconnect();
            guest.stop();
            drop(socks);
        }
    }
    let fds = wait_fds(&s.daemon, fds0, PROMPT)?;
    eprintln!("[sessions] 20 frontend sessions: daemon fds {fds0} -> {fds}");
    serves(&b, 3420, "20 frontend sessions")?;
    ensure!(fds <= fds0, "fds {fds0} -> {fds} after 20 sessions");
    ensure!(s.daemon.is_running(), "daemon exited");
    Ok(())
}

/// A VMM could shrink guest memory under the daemon (SIGBUS); the daemon says so for memory
/// that is not sealed against it, and not for sealed memory (QEMU's memfd default).
#[test]
fn unsealed_guest_memory_is_reported() -> Result<()> {
    const LINE: &str = "guest memory is not sealed against shrinking";
    let s = setup()?;
    let sealed = s.boot(0)?;
    serves(&sealed, 3500, "sealed guest memory")?;
    ensure!(
        !s.daemon.stderr().contains(LINE),
        "sealed memory reported as shrinkable:\n{}",
        s.daemon.stderr()
    );
    let unsealed = s.boot_with(
        1,
        SimConfig {
            seal_memory: false,
            ..SimConfig::default()
        },
        DriverConfig::default(),
    )?;
    let line = s
        .daemon
        .stderr()
        .lines()
        .find(|l| l.contains(LINE))
        .map(str::to_string)
        .context("no report of unsealed guest memory")?;
    ensure!(line.contains("cid=4"), "reported for the wrong VM: {line}");
    eprintln!("[memory] {}", line.trim());
    serves(&unsealed, 3600, "unsealed guest memory")?;
    Ok(())
}
