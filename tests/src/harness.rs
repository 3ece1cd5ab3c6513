//! Test fixtures: a temp dir with a daemon serving some VMs, and booted simulated guests.

use std::path::Path;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::daemon::{Daemon, DaemonKind, VmSpec};
use crate::driver::{DriverConfig, Guest};
use crate::sim::{SimConfig, SimVmm};

/// A daemon in its own temp dir.
pub struct Setup {
    pub daemon: Daemon,
    pub vms: Vec<VmSpec>,
    // Dropped last: the daemon must be gone before its directory.
    pub dir: TempDir,
}

impl Setup {
    /// One VM per CID, all in the default group.
    pub fn new(kind: DaemonKind, cids: &[u64]) -> Result<Setup> {
        Self::with(
            kind,
            |dir| cids.iter().map(|c| VmSpec::new(dir, *c)).collect(),
            &[],
        )
    }

    /// VMs built by `specs` inside the temp dir, plus extra daemon arguments.
    pub fn with(
        kind: DaemonKind,
        specs: impl FnOnce(&Path) -> Vec<VmSpec>,
        extra_args: &[&str],
    ) -> Result<Setup> {
        let dir = tempfile::Builder::new()
            .prefix("vhost-plug-test")
            .tempdir()
            .context("creating temp dir")?;
        let vms = specs(dir.path());
        let daemon = Daemon::spawn(kind, dir.path(), &vms, extra_args)?;
        Ok(Setup { daemon, vms, dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Boots VM `i` with default VMM and driver settings.
    pub fn boot(&self, i: usize) -> Result<TestVm> {
        self.boot_with(i, SimConfig::default(), DriverConfig::default())
    }

    pub fn boot_with(&self, i: usize, sim: SimConfig, drv: DriverConfig) -> Result<TestVm> {
        let spec = self.vms.get(i).context("no such VM")?.clone();
        TestVm::boot(spec, sim, drv)
            .with_context(|| format!("daemon stderr:\n{}", self.daemon.stderr()))
    }
}

/// A simulated VM: VMM connection plus running guest driver.
pub struct TestVm {
    // Field order is drop order: stop the driver before the VMM disconnects.
    pub guest: Guest,
    pub sim: SimVmm,
    pub spec: VmSpec,
}

impl TestVm {
    pub fn boot(spec: VmSpec, sim_cfg: SimConfig, drv: DriverConfig) -> Result<TestVm> {
        let mut sim = SimVmm::connect(&spec.socket, sim_cfg)?;
        let guest = Guest::start(&mut sim, drv)?;
        Ok(TestVm { guest, sim, spec })
    }

    /// The VMM goes away: driver stopped, vhost-user connection closed.
    pub fn shutdown(mut self) {
        self.guest.stop();
        self.sim.disconnect();
    }
}

/// A scenario's failure, classified by a short stable `code` so that expected differences
/// of other daemons can be tabulated and drift detected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.code, self.detail)
    }
}

/// Result of a scenario.
pub type Outcome = std::result::Result<(), Failure>;

/// Builds a [`Failure`].
pub fn fail(code: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        code,
        detail: detail.into(),
    }
}

/// Attaches a failure code to any error.
pub trait Code<T> {
    fn code(self, code: &'static str) -> std::result::Result<T, Failure>;
}

impl<T, E: std::fmt::Display> Code<T> for std::result::Result<T, E> {
    fn code(self, code: &'static str) -> std::result::Result<T, Failure> {
        self.map_err(|e| Failure {
            code,
            detail: format!("{e:#}"),
        })
    }
}

/// Fails with `code` unless `cond`.
pub fn ensure(cond: bool, code: &'static str, detail: impl FnOnce() -> String) -> Outcome {
    if cond {
        Ok(())
    } else {
        Err(fail(code, detail()))
    }
}

/// Echoes `s` until end of stream (a reset counts as one); returns bytes echoed.
pub fn echo<S: std::io::Read + std::io::Write>(s: &mut S) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(total),
            Err(e) => return Err(e),
        };
        s.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Echoes a host stream until end of stream, then half-closes; returns bytes echoed.
pub fn echo_stream(mut s: std::os::unix::net::UnixStream) -> std::io::Result<u64> {
    let total = echo(&mut s)?;
    // The peer may already be gone; the byte count is what matters.
    let _ = s.shutdown(std::net::Shutdown::Write);
    Ok(total)
}

/// Echoes a guest socket until end of stream; returns bytes echoed.
pub fn echo_guest(s: &crate::driver::GuestSocket) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.recv(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        s.send(&buf[..n])?;
        total += n as u64;
    }
}

/// Sends `data` on one thread while reading the same number of bytes back on this one.
pub fn exchange<S>(s: &S, data: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: Sync,
    for<'a> &'a S: std::io::Read + std::io::Write,
{
    use std::io::{Read, Write};
    std::thread::scope(|sc| {
        let sender = sc.spawn(|| {
            let mut w = s;
            w.write_all(data)
        });
        let mut back = vec![0u8; data.len()];
        let mut r = s;
        let res = r.read_exact(&mut back);
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("sender thread panicked")));
        sent?;
        res?;
        Ok(back)
    })
}

/// Runs `vhost-plug ctl --socket SOCKET ARGS...`: (exit status success, JSON answer).
pub fn ctl(socket: &Path, args: &[&str]) -> Result<(bool, serde_json::Value)> {
    let out = std::process::Command::new(DaemonKind::VhostPlug.binary()?)
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .context("running vhost-plug ctl")?;
    let v = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "ctl output: {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.success(), v))
}

/// Reads exactly `n` bytes from a guest socket.
pub fn recv_exact(g: &crate::GuestSocket, n: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; n];
    let mut at = 0;
    while at < n {
        let k = g.recv(&mut out[at..])?;
        anyhow::ensure!(k > 0, "guest socket closed after {at} of {n} bytes");
        at += k;
    }
    Ok(out)
}

/// The kernel's Landlock ABI version; 0 without Landlock (the daemon's `--landlock` then
/// refuses to start).
pub fn landlock_abi() -> i64 {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only returns
    // the ABI version (or an error); it reads and writes no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    v.max(0)
}
