//! systemd readiness (`Type=notify`): with `NOTIFY_SOCKET` set, the daemon sends `READY=1`
//! once its sockets exist and `STOPPING=1` when it exits; also from inside its Landlock
//! sandbox. The test plays systemd with a datagram socket of its own, at a path as systemd's
//! `/run/systemd/notify` (an abstract `@name` is not supported: the sd-notify crate connects
//! to paths only).
//!
//! One test in this binary: it sets `NOTIFY_SOCKET` in its own environment for the daemon
//! it spawns.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test systemd -- --nocapture`.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vhost_plug_tests::checks::serves;
use vhost_plug_tests::harness::{landlock_abi, Setup};
use vhost_plug_tests::{DaemonKind, VmSpec};

const PROMPT: Duration = Duration::from_secs(10);

fn recv(rx: &UnixDatagram) -> Result<String> {
    let mut buf = [0u8; 1024];
    let n = rx.recv(&mut buf).context("no message from the daemon")?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn notifies_systemd_when_ready_and_when_stopping() -> Result<()> {
    let mut runs = vec![&[][..]];
    if landlock_abi() > 0 {
        runs.push(&["--landlock"][..]);
    }
    for args in runs {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path)?;
        rx.set_read_timeout(Some(PROMPT))?;
        std::env::set_var("NOTIFY_SOCKET", &path);
        let started = Setup::with(DaemonKind::VhostPlug, |d| vec![VmSpec::new(d, 3)], args);
        std::env::remove_var("NOTIFY_SOCKET");
        let mut s = started?;

        let ready = recv(&rx)?;
        ensure!(
            ready.lines().any(|l| l == "READY=1"),
            "first message: {ready:?}"
        );
        ensure!(ready.contains("STATUS=serving 1 VM(s)"), "{ready:?}");
        ensure!(s.vms[0].socket.exists() && s.vms[0].uds_path.exists());
        eprintln!("[systemd] {args:?}: {:?}", ready.trim());
        let vm = s.boot(0)?;
        serves(&vm, 4000, "READY=1")?;
        drop(vm);

        s.daemon.signal(libc::SIGTERM)?;
        let stopping = recv(&rx)?;
        ensure!(
            stopping.lines().any(|l| l == "STOPPING=1"),
            "after SIGTERM: {stopping:?}"
        );
        s.daemon.wait_exit(PROMPT)?;
    }
    Ok(())
}
