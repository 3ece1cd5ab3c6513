//! The QEMU guest of the forwarding-backend tests and benchmark: a TCG guest (Debian's
//! kernel, `vsock_loopback`) whose `/init` (`tests/guest/init_forward`) runs the `fwdguest`
//! binary with the daemons inside the guest ([`crate::forward`]). This machine's kernel has
//! no vsock loopback; the guest's does, so `forward-cid=1` reaches AF_VSOCK sockets of the
//! same guest. The guest has no virtio device: the daemons talk vhost-user to the simulated
//! VMM next to them.
//!
//! The image (`target/guest-forward`) is built by `tests/guest/build_forward.sh` from the
//! binaries of this build: vhost-plug, fwdguest and the reference vhost-device-vsock.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::daemon::DaemonKind;
use crate::qemu::GuestKernel;
use crate::qemu_console::{Console, Marker, Next};

/// Boot plus every case; a loaded machine's TCG is slow, so the bound is generous.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// The directory of the running executable's profile (`target/release`).
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the executable")?;
    let mut dir = exe.parent().context("executable has no parent")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    Ok(dir.to_path_buf())
}

/// Builds the guest image with `fwdguest` (its path: cargo's `CARGO_BIN_EXE_fwdguest` for
/// tests, else next to the running executable) for `kernel`.
pub fn build_image(fwdguest: Option<&Path>, kernel: GuestKernel) -> Result<(PathBuf, PathBuf)> {
    let profile = profile_dir()?;
    let fwdguest = match fwdguest {
        Some(p) => p.to_path_buf(),
        None => profile.join("fwdguest"),
    };
    let out = profile
        .parent()
        .context("profile dir has no parent")?
        .join(match kernel {
            GuestKernel::Default => "guest-forward",
            GuestKernel::Debian612 => "guest-forward-6.12",
        });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build_forward.sh");
    let mut bins = vec![
        DaemonKind::VhostPlug.binary()?,
        fwdguest,
        DaemonKind::Peer.binary()?,
    ];
    // `FWDBENCH_PERF=<path of perf>`: the benchmark profiles each daemon's counted round
    // trips with it inside the guest and prints the report on the serial console.
    if let Some(perf) = std::env::var_os("FWDBENCH_PERF") {
        bins.push(PathBuf::from(perf));
    }
    let o = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .arg(kernel.package())
        .args(&bins)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !o.status.success() {
        bail!(
            "{} failed ({}); it needs `apt-get install qemu-system-x86 {} busybox-static \
             binutils` (tests/run.sh does it):\n{}{}",
            script.display(),
            o.status,
            kernel.package(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok((out.join("vmlinuz"), out.join("initrd.img")))
}

/// Boots the image with `fwd=<mode>` and collects every `@@` marker up to `@@ DONE` (or a
/// `FATAL`, or QEMU's exit). The serial log is kept next to the image (`<mode>.log`).
pub fn run(kernel: &Path, initrd: &Path, mode: &str) -> Result<Vec<Marker>> {
    let dir = initrd.parent().context("initrd has no parent")?;
    let serial = dir.join(format!("{mode}.log"));
    let _ = std::fs::remove_file(&serial);
    let mut qemu = crate::qemu::Qemu::spawn_plain(
        kernel,
        initrd,
        &serial,
        &dir.join(format!("{mode}.qemu.stderr")),
        &format!("fwd={mode}"),
    )?;
    let mut console = Console::new(&serial);
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut markers = Vec::new();
    loop {
        match console.next(deadline, Some(&mut qemu)) {
            Next::Marker(m) => {
                let end = m.kind == "DONE" || m.kind == "FATAL";
                markers.push(m);
                if end {
                    break;
                }
            }
            Next::Exited(st) => {
                bail!(
                    "QEMU exited ({st}) before `@@ DONE`; serial log {}:\n{}",
                    serial.display(),
                    console.tail(40)
                )
            }
            Next::TimedOut => bail!(
                "no `@@ DONE` within {RUN_TIMEOUT:?}; serial log {}:\n{}",
                serial.display(),
                console.tail(40)
            ),
        }
    }
    let _ = qemu.wait_exit(Duration::from_secs(30));
    Ok(markers)
}
