//! A real Linux guest under QEMU (TCG) in front of a daemon, for `tests/guest_qemu.rs` and the
//! QEMU section of the benchmark.
//!
//! `tests/guest/build.sh` builds the guest (the host's Debian kernel, an initramfs with
//! busybox, socat, the virtio-vsock modules and the `vsockt` helper); QEMU boots it with a
//! `vhost-user-vsock-pci` device on the daemon's socket. The guest's `/init`
//! (`tests/guest/init`) runs the scenarios named on the kernel command line (`vpt=a,b,c`) in
//! order and reports on the serial console with `@@` marker lines, which [`QemuRig::expect`]
//! waits for.
//!
//! Needs qemu-system-x86, linux-image-amd64, busybox-static and socat (`tests/run.sh` and
//! `scripts/bench.sh` install them; `tests/run.sh` also installs the 6.12 kernel,
//! [`GuestKernel::Debian612`]). One guest (or one sibling pair, [`crate::qemu_pair`]) at a
//! time per process ([`guest_lock`]): TCG wants both cores.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;

use crate::daemon::{Daemon, DaemonKind, VmSpec};
use crate::host::host_connect_with;
pub use crate::qemu_console::{tail, Console, Marker, Next};

/// Boot to `@@ UP` (about 5 s on an idle machine).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound for one scenario step that moves little data.
pub const STEP: Duration = Duration::from_secs(30);

static GUEST_LOCK: Mutex<()> = Mutex::new(());

/// Serialises guest boots within a process: TCG needs the machine's cores.
pub fn guest_lock() -> MutexGuard<'static, ()> {
    GUEST_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which of Debian's guest kernels to boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestKernel {
    /// `linux-image-amd64`: 6.1 on Debian 12.
    Default,
    /// `linux-image-6.12-amd64`: Debian 12's 6.12.
    Debian612,
}

impl GuestKernel {
    /// The Debian meta-package whose kernel is booted.
    pub fn package(self) -> &'static str {
        match self {
            GuestKernel::Default => "linux-image-amd64",
            GuestKernel::Debian612 => "linux-image-6.12-amd64",
        }
    }

    /// The image's directory under the cargo target directory.
    fn dir_name(self) -> &'static str {
        match self {
            GuestKernel::Default => "guest",
            GuestKernel::Debian612 => "guest-6.12",
        }
    }

    fn index(self) -> usize {
        match self {
            GuestKernel::Default => 0,
            GuestKernel::Debian612 => 1,
        }
    }
}

/// The guest kernel and initramfs.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `target/guest`.
    pub dir: PathBuf,
}

/// The cargo target directory, from the running executable (`<target>/<profile>/deps/<test>`
/// for tests, `<target>/<profile>/<bin>` for binaries).
fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the executable")?;
    let mut dir = exe.parent().context("executable has no parent")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    Ok(dir
        .parent()
        .context("profile dir has no parent")?
        .to_path_buf())
}

/// Builds (or reuses) `target/guest/{vmlinuz,initrd.img}` (the default kernel) once per
/// process.
pub fn guest_image() -> Result<GuestImage> {
    guest_image_for(GuestKernel::Default)
}

/// Builds (or reuses) the image of `kernel` once per process.
pub fn guest_image_for(kernel: GuestKernel) -> Result<GuestImage> {
    type Built = OnceLock<std::result::Result<GuestImage, String>>;
    static IMAGES: [Built; 2] = [OnceLock::new(), OnceLock::new()];
    IMAGES[kernel.index()]
        .get_or_init(|| build_image(kernel).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn build_image(kernel: GuestKernel) -> Result<GuestImage> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let dir = target_dir()?.join(kernel.dir_name());
    let out = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .arg(kernel.package())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}); the guest needs `apt-get install qemu-system-x86 \
             {} busybox-static socat` (tests/run.sh does it):\n{}{}",
            script.display(),
            out.status,
            kernel.package(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        dir,
    })
}

/// One QEMU process; SIGKILLed on drop.
pub struct Qemu {
    child: Child,
    stderr: PathBuf,
}

/// The kernel arguments that make the guest's `/init` run `scenarios` in order.
pub fn scenario_args(scenarios: &[&str]) -> String {
    format!("vpt={}", scenarios.join(","))
}

impl Qemu {
    /// Boots `image` with a `vhost-user-vsock-pci` device on `socket`, 2 vCPUs and 512 MiB
    /// of shared memory; the serial console goes to `serial`. `guest_args` are added to the
    /// kernel command line for the guest's `/init` ([`scenario_args`]).
    pub fn spawn(
        image: &GuestImage,
        socket: &Path,
        serial: &Path,
        stderr: &Path,
        guest_args: &str,
    ) -> Result<Qemu> {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-smp", "2", "-m", "512M"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=c0,path={}", socket.display()))
            .args(["-device", "vhost-user-vsock-pci,chardev=c0"]);
        Self::boot(
            cmd,
            &image.kernel,
            &image.initrd,
            serial,
            stderr,
            guest_args,
        )
    }

    /// Boots `kernel` and `initrd` without any device (2 vCPUs, 1 GiB): the guest of the
    /// forwarding tests ([`crate::qemu_forward`]) runs its daemons and VMM inside.
    pub fn spawn_plain(
        kernel: &Path,
        initrd: &Path,
        serial: &Path,
        stderr: &Path,
        guest_args: &str,
    ) -> Result<Qemu> {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-smp", "2", "-m", "1024M"]);
        Self::boot(cmd, kernel, initrd, serial, stderr, guest_args)
    }

    /// Adds the kernel, the console and the no-display, no-network, no-reboot options every
    /// guest here shares to `cmd`, and starts it.
    fn boot(
        mut cmd: Command,
        kernel: &Path,
        initrd: &Path,
        serial: &Path,
        stderr: &Path,
        guest_args: &str,
    ) -> Result<Qemu> {
        let err = File::create(stderr).with_context(|| format!("creating {}", stderr.display()))?;
        let child = cmd
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 quiet {guest_args}"))
            .args([
                "-display",
                "none",
                "-vga",
                "none",
                "-nic",
                "none",
                "-no-reboot",
            ])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .context("spawning qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
        Ok(Qemu {
            child,
            stderr: stderr.to_path_buf(),
        })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where QEMU's own stderr goes.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the guest's poweroff.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.exited() {
                ensure!(st.success(), "QEMU exited with {st}");
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("QEMU still running {timeout:?} after the guest's DONE")
    }

    /// CPU seconds QEMU (all vCPU and I/O threads) has used so far.
    pub fn cpu_secs(&self) -> Result<f64> {
        crate::bench::rig::cpu_secs(self.child.id())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A daemon serving one VM plus the QEMU guests booted against it, one at a time.
pub struct QemuRig {
    // Field order is drop order: QEMU goes before the daemon, both before the directory.
    pub qemu: Option<Qemu>,
    pub daemon: Daemon,
    pub spec: VmSpec,
    image: GuestImage,
    name: String,
    /// Guests booted so far.
    pub boots: usize,
    /// The current boot's serial console.
    console: Console,
    dir: TempDir,
}

impl QemuRig {
    /// Builds the guest image if needed and starts `kind` for guest CID `cid` with
    /// `extra_args`; `name` labels the kept serial logs.
    pub fn new(kind: DaemonKind, name: &str, cid: u64, extra_args: &[&str]) -> Result<QemuRig> {
        Self::new_with(kind, name, cid, extra_args, |spec| spec)
    }

    /// [`QemuRig::new`] with the VM's `--vm` settings changed by `adjust` (e.g.
    /// `connect-wait`).
    pub fn new_with(
        kind: DaemonKind,
        name: &str,
        cid: u64,
        extra_args: &[&str],
        adjust: impl FnOnce(VmSpec) -> VmSpec,
    ) -> Result<QemuRig> {
        Self::new_full(kind, name, cid, extra_args, &[], adjust)
    }

    /// [`QemuRig::new`] with extra environment variables for the daemon (e.g. the live
    /// upgrade's test-only fault points).
    pub fn new_env(
        kind: DaemonKind,
        name: &str,
        cid: u64,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<QemuRig> {
        Self::new_full(kind, name, cid, extra_args, env, |spec| spec)
    }

    fn new_full(
        kind: DaemonKind,
        name: &str,
        cid: u64,
        extra_args: &[&str],
        env: &[(&str, &str)],
        adjust: impl FnOnce(VmSpec) -> VmSpec,
    ) -> Result<QemuRig> {
        let image = guest_image()?;
        let dir = tempfile::Builder::new()
            .prefix("vhost-plug-guest")
            .tempdir()
            .context("creating temp dir")?;
        let spec = adjust(VmSpec::new(dir.path(), cid));
        let daemon = Daemon::spawn_with_env(
            kind,
            dir.path(),
            std::slice::from_ref(&spec),
            extra_args,
            env,
        )?;
        Ok(QemuRig {
            qemu: None,
            daemon,
            spec,
            image,
            name: name.to_string(),
            boots: 0,
            console: Console::new(Path::new("")),
            dir,
        })
    }

    /// The VM's hybrid vsock socket (host programs connect here).
    pub fn uds(&self) -> &Path {
        &self.spec.uds_path
    }

    /// Boots a guest running `scenarios`; returns once it reports `@@ UP`.
    pub fn boot(&mut self, scenarios: &[&str]) -> Result<()> {
        self.boots += 1;
        let serial = self.dir.path().join(format!("serial{}.log", self.boots));
        let stderr = self.dir.path().join(format!("qemu{}.stderr", self.boots));
        self.console = Console::new(&serial);
        self.qemu = Some(Qemu::spawn(
            &self.image,
            &self.spec.socket,
            &serial,
            &stderr,
            &scenario_args(scenarios),
        )?);
        self.expect("UP", "", BOOT_TIMEOUT)
            .context("guest did not come up")?;
        Ok(())
    }

    /// Waits for the next `@@ <kind> <scenario>` line, skipping others; a FAIL of
    /// `scenario`, a FATAL or QEMU's exit end the wait with an error.
    pub fn expect(&mut self, kind: &str, scenario: &str, timeout: Duration) -> Result<Marker> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = match self.console.next(deadline, self.qemu.as_mut()) {
                Next::Marker(m) => m,
                Next::Exited(st) => {
                    bail!("QEMU exited ({st}) while waiting for `@@ {kind} {scenario}`")
                }
                Next::TimedOut => {
                    bail!("no `@@ {kind} {scenario}` on the serial console within {timeout:?}")
                }
            };
            if m.kind == kind && m.scenario == scenario {
                return Ok(m);
            }
            if m.kind == "FAIL" {
                bail!("guest: scenario {} failed: {}", m.scenario, m.rest);
            }
            if m.kind == "FATAL" {
                bail!("guest: fatal: {} {}", m.scenario, m.rest);
            }
            if m.kind == "DONE" {
                bail!("guest finished without `@@ {kind} {scenario}`");
            }
        }
    }

    /// Waits for the guest's DONE and QEMU's exit.
    pub fn finish(&mut self) -> Result<()> {
        self.expect("DONE", "", STEP)?;
        if let Some(q) = self.qemu.as_mut() {
            q.wait_exit(STEP)?;
        }
        Ok(())
    }

    pub fn kill_qemu(&mut self) {
        if let Some(q) = self.qemu.as_mut() {
            q.kill();
        }
    }

    /// Copies this boot's serial log to `target/guest/logs/` (kept after the temp dir).
    pub fn keep_log(&self) {
        let logs = self.image.dir.join("logs");
        if std::fs::create_dir_all(&logs).is_ok() {
            let _ = std::fs::copy(
                self.console.path(),
                logs.join(format!("{}-boot{}.log", self.name, self.boots)),
            );
        }
    }

    /// Serial tail, QEMU stderr and daemon stderr, for failure messages.
    pub fn diagnostics(&self) -> String {
        let qemu_err = self
            .qemu
            .as_ref()
            .map(|q| tail(&std::fs::read(&q.stderr).unwrap_or_default(), 20))
            .unwrap_or_default();
        format!(
            "--- serial log of boot {} ({}), last lines ---\n{}\n--- QEMU stderr ---\n{}\n\
             --- daemon stderr ({}), last lines ---\n{}",
            self.boots,
            self.console.path().display(),
            self.console.tail(40),
            qemu_err,
            self.daemon.stderr_path().display(),
            tail(strip_ansi(&self.daemon.stderr()).as_bytes(), 40),
        )
    }
}

/// Drops `ESC [ ... letter` sequences (the daemon colours its log even into a file).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `sha256sum` of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning sha256sum")?;
    child
        .stdin
        .take()
        .context("sha256sum stdin")?
        .write_all(data)
        .context("writing to sha256sum")?;
    let out = child.wait_with_output().context("sha256sum")?;
    ensure!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8(out.stdout).context("sha256sum output")?;
    Ok(text.split_whitespace().next().unwrap_or("").to_string())
}

/// CONNECT to a guest port (sending `first` with the CONNECT line), retrying for up to
/// [`STEP`] while the guest is not (yet) listening.
pub fn connect_retry(uds: &Path, port: u32, first: &[u8]) -> Result<UnixStream> {
    let deadline = Instant::now() + STEP;
    loop {
        match host_connect_with(uds, port, first) {
            Ok((s, _)) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("CONNECT {port} for {STEP:?}"))
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Reads until EOF, bounded by `timeout` overall.
pub fn read_to_eof(s: &mut UnixStream, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "no EOF within {timeout:?} ({} bytes read)",
            out.len()
        );
        s.set_read_timeout(Some(left.min(Duration::from_secs(5))))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context(format!("read after {} bytes", out.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(strip_ansi("\x1b[2mwarn\x1b[0m x"), "warn x");
    }
}
