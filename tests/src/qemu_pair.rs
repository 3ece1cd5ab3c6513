//! Two real Linux guests in one sibling group of one daemon, for `tests/guest_pair.rs`.
//!
//! Both boot at once from the same image ([`GuestKernel`] picks the kernel): guest A with
//! `vpt=pair_a`, guest B with `vpt=pair_b`, each with `vpeer=<the other's CID>`. Their `/init`
//! (`tests/guest/init`) runs `vsockpair` (`tests/guest/vsockpair.c`), which does the socket
//! calls between the two guests and reports one `@@ CASE <name> pass|fail ...` line per case
//! and `@@ PAIRDONE role=<a|b> kernel=<release> ...` at the end on each console.
//!
//! Each guest gets 2 vCPUs like the single-guest rig: the races the cases look for (a close
//! whose two shutdown bits arrive apart) need the daemon's VM threads to run in parallel.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::daemon::{Daemon, DaemonKind, VmSpec};
use crate::qemu::{guest_image_for, strip_ansi, GuestImage, GuestKernel, Qemu, BOOT_TIMEOUT};
use crate::qemu_console::{Console, Marker, Next};

/// Bound for a whole run of the cases: the guest bounds each blocking step by 20 s, so even
/// a daemon that loses every packet ends within this.
pub const PAIR_TIMEOUT: Duration = Duration::from_secs(660);
/// Bound for the guests' poweroff after their last case.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);

/// One guest's verdict on one case.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub pass: bool,
    /// The key=value results of a pass, or the reason of a failure.
    pub detail: String,
}

/// What one guest reported, in case order.
#[derive(Clone, Debug, Default)]
pub struct SideReport {
    /// The guest's `uname -r`.
    pub kernel: String,
    pub cases: Vec<(String, CaseResult)>,
}

impl SideReport {
    pub fn case(&self, name: &str) -> Option<&CaseResult> {
        self.cases.iter().find(|(n, _)| n == name).map(|(_, r)| r)
    }
}

/// A daemon serving two VMs that share one group, and a QEMU guest for each.
pub struct GuestPair {
    // Field order is drop order: QEMU before the daemon, both before the directory.
    qemus: [Option<Qemu>; 2],
    pub daemon: Daemon,
    /// A's and B's VM.
    pub specs: [VmSpec; 2],
    consoles: [Console; 2],
    image: GuestImage,
    name: String,
    dir: TempDir,
}

impl GuestPair {
    /// Builds the image of `kernel` if needed and starts `kind` serving CIDs `cids` (A, B),
    /// both in sibling group `group`, with `extra_args`; `name` labels the kept serial logs.
    pub fn start(
        kind: DaemonKind,
        kernel: GuestKernel,
        name: &str,
        cids: [u64; 2],
        group: &str,
        extra_args: &[&str],
    ) -> Result<GuestPair> {
        let image = guest_image_for(kernel)?;
        let dir = tempfile::Builder::new()
            .prefix("vhost-plug-pair")
            .tempdir()
            .context("creating temp dir")?;
        let specs = cids.map(|cid| VmSpec::new(dir.path(), cid).groups(&[group]));
        let daemon = Daemon::spawn(kind, dir.path(), &specs, extra_args)?;
        let consoles =
            ["a", "b"].map(|r| Console::new(&dir.path().join(format!("serial-{r}.log"))));
        Ok(GuestPair {
            qemus: [None, None],
            daemon,
            specs,
            consoles,
            image,
            name: name.to_string(),
            dir,
        })
    }

    /// Boots both guests at once and waits until both report `@@ UP`.
    pub fn boot(&mut self) -> Result<()> {
        let cids = [self.specs[0].guest_cid, self.specs[1].guest_cid];
        for (i, role) in ["a", "b"].into_iter().enumerate() {
            let stderr = self.dir.path().join(format!("qemu-{role}.stderr"));
            let args = format!("vpt=pair_{role} vpeer={}", cids[1 - i]);
            self.qemus[i] = Some(Qemu::spawn(
                &self.image,
                &self.specs[i].socket,
                self.consoles[i].path(),
                &stderr,
                &args,
            )?);
        }
        for i in 0..2 {
            self.wait_for(i, "UP", BOOT_TIMEOUT)
                .with_context(|| format!("guest {} did not come up", side(i)))?;
        }
        Ok(())
    }

    /// Waits for guest `i`'s next `@@ <kind>` line, skipping others.
    fn wait_for(&mut self, i: usize, kind: &str, timeout: Duration) -> Result<Marker> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.consoles[i].next(deadline, self.qemus[i].as_mut()) {
                Next::Marker(m) if m.kind == kind => return Ok(m),
                Next::Marker(m) if m.kind == "FATAL" => {
                    bail!("guest {}: fatal: {} {}", side(i), m.scenario, m.rest)
                }
                Next::Marker(_) => {}
                Next::Exited(st) => {
                    bail!("guest {}: QEMU exited ({st}) before `@@ {kind}`", side(i))
                }
                Next::TimedOut => bail!("guest {}: no `@@ {kind}` within {timeout:?}", side(i)),
            }
        }
    }

    /// Collects both guests' case lines up to their `@@ PAIRDONE`.
    pub fn reports(&mut self) -> Result<[SideReport; 2]> {
        let deadline = Instant::now() + PAIR_TIMEOUT;
        let mut out = [SideReport::default(), SideReport::default()];
        for (i, report) in out.iter_mut().enumerate() {
            loop {
                let m = match self.consoles[i].next(deadline, self.qemus[i].as_mut()) {
                    Next::Marker(m) => m,
                    Next::Exited(st) => bail!(
                        "guest {}: QEMU exited ({st}) after {} case(s), before `@@ PAIRDONE`",
                        side(i),
                        report.cases.len()
                    ),
                    Next::TimedOut => bail!(
                        "guest {}: no `@@ PAIRDONE` within {PAIR_TIMEOUT:?} ({} case(s) reported)",
                        side(i),
                        report.cases.len()
                    ),
                };
                match m.kind.as_str() {
                    "CASE" => {
                        let (verdict, detail) = m.rest.split_once(' ').unwrap_or((&m.rest, ""));
                        let result = CaseResult {
                            pass: verdict == "pass",
                            detail: detail.to_string(),
                        };
                        report.cases.push((m.scenario.clone(), result));
                    }
                    "PAIRDONE" => {
                        report.kernel = m.value("kernel").unwrap_or_default();
                        break;
                    }
                    "FATAL" => bail!("guest {}: fatal: {} {}", side(i), m.scenario, m.rest),
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Waits for both guests' `@@ DONE` and QEMU's exit.
    pub fn finish(&mut self) -> Result<()> {
        for i in 0..2 {
            self.wait_for(i, "DONE", FINISH_TIMEOUT)?;
            if let Some(q) = self.qemus[i].as_mut() {
                q.wait_exit(FINISH_TIMEOUT)?;
            }
        }
        Ok(())
    }

    pub fn kill_qemus(&mut self) {
        for q in self.qemus.iter_mut().flatten() {
            q.kill();
        }
    }

    /// Copies both serial logs to `target/<image dir>/logs/` (kept after the temp dir).
    pub fn keep_logs(&self) {
        let logs = self.image.dir.join("logs");
        if std::fs::create_dir_all(&logs).is_ok() {
            for (i, c) in self.consoles.iter().enumerate() {
                let to = logs.join(format!("{}-{}.log", self.name, side(i)));
                let _ = std::fs::copy(c.path(), to);
            }
        }
    }

    /// Serial tails, QEMU stderr and the daemon's stderr, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for i in 0..2 {
            let qemu_err = self.qemus[i]
                .as_ref()
                .map(|q| file_tail(q.stderr_path(), 10))
                .unwrap_or_default();
            out.push_str(&format!(
                "--- guest {} serial log ({}), last lines ---\n{}\n--- guest {} QEMU stderr ---\n{}\n",
                side(i),
                self.consoles[i].path().display(),
                self.consoles[i].tail(30),
                side(i),
                qemu_err,
            ));
        }
        out.push_str(&format!(
            "--- daemon stderr ({}), last lines ---\n{}",
            self.daemon.stderr_path().display(),
            crate::qemu::tail(strip_ansi(&self.daemon.stderr()).as_bytes(), 40),
        ));
        out
    }
}

fn side(i: usize) -> &'static str {
    if i == 0 {
        "A"
    } else {
        "B"
    }
}

fn file_tail(path: &Path, n: usize) -> String {
    crate::qemu::tail(&std::fs::read(path).unwrap_or_default(), n)
}
