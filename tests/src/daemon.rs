//! Spawning a backend daemon (vhost-plug or the reference vhost-device-vsock) for a test.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Which daemon to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DaemonKind {
    /// Our daemon (`host/`).
    VhostPlug,
    /// The reference daemon, vhost-device-vsock 0.3.0.
    Peer,
}

impl DaemonKind {
    pub fn name(self) -> &'static str {
        match self {
            DaemonKind::VhostPlug => "vhost-plug",
            DaemonKind::Peer => "vhost-device-vsock",
        }
    }

    /// Locates the binary: an environment override, else the cargo target directory of the
    /// running test executable (`<target>/<profile>/deps/<test>`).
    pub fn binary(self) -> Result<PathBuf> {
        let (var, hint) = match self {
            DaemonKind::VhostPlug => (
                "VHOST_PLUG_BIN",
                "build it with `cargo build --release -p vhost-plug`",
            ),
            DaemonKind::Peer => (
                "VHOST_DEVICE_VSOCK_BIN",
                "install it with `cargo install vhost-device-vsock --locked --version 0.3.0 \
                 --root target/peer`",
            ),
        };
        if let Some(p) = std::env::var_os(var) {
            let p = PathBuf::from(p);
            if !p.is_file() {
                bail!("{var}={} does not name a file", p.display());
            }
            return Ok(p);
        }
        let exe = std::env::current_exe().context("locating the test executable")?;
        let deps = exe.parent().context("test executable has no parent dir")?;
        let profile_dir = if deps.file_name().is_some_and(|n| n == "deps") {
            deps.parent().context("deps dir has no parent")?
        } else {
            deps
        };
        let candidate = match self {
            DaemonKind::VhostPlug => profile_dir.join("vhost-plug"),
            DaemonKind::Peer => profile_dir
                .parent()
                .context("profile dir has no parent")?
                .join("peer/bin/vhost-device-vsock"),
        };
        if !candidate.is_file() {
            bail!(
                "{} binary not found at {} (set {var} to override; {hint})",
                self.name(),
                candidate.display()
            );
        }
        Ok(candidate)
    }
}

/// One `--vm` argument.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub guest_cid: u64,
    /// vhost-user socket the VMM connects to.
    pub socket: PathBuf,
    /// Hybrid vsock base path for host programs.
    pub uds_path: PathBuf,
    pub tx_buffer_size: Option<u32>,
    /// Largest vring accepted (`queue-size=`); `None` is the daemon's default.
    pub queue_size: Option<u16>,
    /// Sibling groups (`groups=a+b`); empty means the daemon's default.
    pub groups: Vec<String>,
    /// `connect-wait=` (vhost-plug only), e.g. `5s`.
    pub connect_wait: Option<String>,
    /// The vsock forwarding backend instead of `uds_path`: `forward-cid=CID` and, when
    /// ports are given, `forward-listen=P1+P2`.
    pub forward: Option<(u32, Vec<u32>)>,
}

impl VmSpec {
    /// Socket paths inside `dir`, named after the CID.
    pub fn new(dir: &Path, guest_cid: u64) -> Self {
        VmSpec {
            guest_cid,
            socket: dir.join(format!("vhost{guest_cid}.sock")),
            uds_path: dir.join(format!("vm{guest_cid}.vsock")),
            tx_buffer_size: None,
            queue_size: None,
            groups: Vec::new(),
            connect_wait: None,
            forward: None,
        }
    }

    /// Forward guest connections to AF_VSOCK `cid` and listen on `listen` ports.
    pub fn forward(mut self, cid: u32, listen: &[u32]) -> Self {
        self.forward = Some((cid, listen.to_vec()));
        self
    }

    /// A host CONNECT the guest refuses is retried until `wait` (e.g. `5s`).
    pub fn connect_wait(mut self, wait: &str) -> Self {
        self.connect_wait = Some(wait.to_string());
        self
    }

    pub fn groups(mut self, groups: &[&str]) -> Self {
        self.groups = groups.iter().map(|g| g.to_string()).collect();
        self
    }

    pub fn tx_buffer_size(mut self, n: u32) -> Self {
        self.tx_buffer_size = Some(n);
        self
    }

    /// The value of `--vm`.
    pub fn to_arg(&self) -> String {
        let mut s = format!(
            "guest-cid={},socket={}",
            self.guest_cid,
            self.socket.display()
        );
        match &self.forward {
            None => s.push_str(&format!(",uds-path={}", self.uds_path.display())),
            Some((cid, listen)) => {
                s.push_str(&format!(",forward-cid={cid}"));
                if !listen.is_empty() {
                    let ports: Vec<String> = listen.iter().map(u32::to_string).collect();
                    s.push_str(&format!(",forward-listen={}", ports.join("+")));
                }
            }
        }
        if let Some(n) = self.tx_buffer_size {
            s.push_str(&format!(",tx-buffer-size={n}"));
        }
        if let Some(n) = self.queue_size {
            s.push_str(&format!(",queue-size={n}"));
        }
        if !self.groups.is_empty() {
            s.push_str(&format!(",groups={}", self.groups.join("+")));
        }
        if let Some(w) = &self.connect_wait {
            s.push_str(&format!(",connect-wait={w}"));
        }
        s
    }
}

/// A running daemon; killed on drop.
pub struct Daemon {
    kind: DaemonKind,
    child: Option<Child>,
    vms: Vec<VmSpec>,
    stderr_path: PathBuf,
}

/// How long to wait for a daemon's sockets.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// [`STARTUP_TIMEOUT`], or `VHOST_PLUG_STARTUP_SECS` seconds where start-up is slow (the
/// forwarding tests run the daemon inside an emulated guest, where compiling the built-in
/// plugins takes far longer).
fn startup_timeout() -> Duration {
    std::env::var("VHOST_PLUG_STARTUP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(STARTUP_TIMEOUT, Duration::from_secs)
}

impl Daemon {
    /// Starts `kind` serving `vms`; stderr goes to `<dir>/<name>.stderr`. Returns once every
    /// vhost-user socket exists (bounded by [`STARTUP_TIMEOUT`]).
    pub fn spawn(
        kind: DaemonKind,
        dir: &Path,
        vms: &[VmSpec],
        extra_args: &[&str],
    ) -> Result<Daemon> {
        Self::spawn_with_env(kind, dir, vms, extra_args, &[])
    }

    /// [`Daemon::spawn`] with extra environment variables for the daemon.
    pub fn spawn_with_env(
        kind: DaemonKind,
        dir: &Path,
        vms: &[VmSpec],
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        if vms.is_empty() {
            bail!("a daemon needs at least one VM");
        }
        let bin = kind.binary()?;
        let stderr_path = dir.join(format!("{}.stderr", kind.name()));
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let mut cmd = Command::new(&bin);
        for vm in vms {
            cmd.arg("--vm").arg(vm.to_arg());
        }
        cmd.args(extra_args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        match kind {
            DaemonKind::Peer if std::env::var_os("RUST_LOG").is_none() => {
                cmd.env("RUST_LOG", "info");
            }
            DaemonKind::VhostPlug
                if std::env::var_os("VHOST_PLUG_LOG").is_none()
                    && std::env::var_os("RUST_LOG").is_none() =>
            {
                cmd.env("VHOST_PLUG_LOG", "info");
            }
            _ => {}
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut d = Daemon {
            kind,
            child: Some(child),
            vms: vms.to_vec(),
            stderr_path,
        };
        d.wait_sockets(startup_timeout())?;
        Ok(d)
    }

    fn wait_sockets(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status()? {
                bail!(
                    "{} exited during startup ({status}); stderr:\n{}",
                    self.kind.name(),
                    self.stderr()
                );
            }
            if self.vms.iter().all(|vm| vm.socket.exists()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let missing: Vec<String> = self
                    .vms
                    .iter()
                    .filter(|vm| !vm.socket.exists())
                    .map(|vm| vm.socket.display().to_string())
                    .collect();
                bail!(
                    "{} did not create {missing:?} within {timeout:?}; stderr:\n{}",
                    self.kind.name(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `Some(status)` if the process has exited.
    pub fn exit_status(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().context("polling daemon"),
            None => bail!("daemon already killed"),
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.exit_status(), Ok(None))
    }

    pub fn kind(&self) -> DaemonKind {
        self.kind
    }

    pub fn vms(&self) -> &[VmSpec] {
        &self.vms
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` to the daemon process.
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        let pid = self.pid().context("daemon already killed")? as libc::pid_t;
        // SAFETY: sending a signal to our own child process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit (after [`Daemon::signal`]).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exit_status()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("daemon still running {timeout:?} after the signal");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address the daemon logged for `--metrics 127.0.0.1:0`, waiting up to `timeout`.
    pub fn metrics_addr(&self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.stderr();
            if let Some(line) = log.lines().find(|l| l.contains("metrics endpoint ready")) {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .context("no addr= in the ready line")?;
                return Ok(addr.to_string());
            }
            if Instant::now() >= deadline {
                bail!("no 'metrics endpoint ready' line; stderr:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Number of open file descriptors of the process (`/proc/<pid>/fd`).
    pub fn open_fds(&self) -> Result<usize> {
        let pid = self.pid().context("daemon already killed")?;
        let dir = format!("/proc/{pid}/fd");
        Ok(std::fs::read_dir(&dir)
            .with_context(|| format!("listing {dir}"))?
            .count())
    }

    /// Resident set size of the process in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.pid().context("daemon already killed")?;
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmRSS in {path}"))
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// What the daemon wrote to stderr so far (last 64 KiB).
    pub fn stderr(&self) -> String {
        match std::fs::read(&self.stderr_path) {
            Ok(b) => {
                let start = b.len().saturating_sub(64 * 1024);
                String::from_utf8_lossy(&b[start..]).into_owned()
            }
            Err(e) => format!("<cannot read {}: {e}>", self.stderr_path.display()),
        }
    }

    /// Bytes of stderr written so far: a mark for [`Daemon::log_since`] and
    /// [`Daemon::wait_log`].
    pub fn log_mark(&self) -> u64 {
        std::fs::metadata(&self.stderr_path).map_or(0, |m| m.len())
    }

    /// Stderr written after `mark` (at most the last 1 MiB of it).
    pub fn log_since(&self, mark: u64) -> String {
        let Ok(b) = std::fs::read(&self.stderr_path) else {
            return String::new();
        };
        let start = usize::try_from(mark)
            .unwrap_or(usize::MAX)
            .min(b.len())
            .max(b.len().saturating_sub(1 << 20));
        String::from_utf8_lossy(&b[start..]).into_owned()
    }

    /// Waits up to `timeout` for a stderr line written after `mark` that contains every one
    /// of `needles`; returns that line.
    pub fn wait_log(&self, mark: u64, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .log_since(mark)
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_owned);
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Already-exited children make kill fail; wait reaps either way.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_arg_format() {
        let v = VmSpec::new(Path::new("/t"), 3)
            .tx_buffer_size(4096)
            .groups(&["a", "b"]);
        assert_eq!(
            v.to_arg(),
            "guest-cid=3,socket=/t/vhost3.sock,uds-path=/t/vm3.vsock,tx-buffer-size=4096,groups=a+b"
        );
        assert_eq!(
            VmSpec::new(Path::new("/t"), 4).to_arg(),
            "guest-cid=4,socket=/t/vhost4.sock,uds-path=/t/vm4.vsock"
        );
    }
}
