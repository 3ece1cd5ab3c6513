//! A daemon serving one VM plus that VM booted by the simulated VMM, and process sampling.

use std::cell::Cell;

use anyhow::{bail, Context, Result};

use crate::daemon::{DaemonKind, VmSpec};
use crate::harness::{Setup, TestVm};

/// Guest CID of every benchmark VM.
pub const CID: u64 = 3;

/// One daemon and one booted VM.
pub struct Rig {
    // Field order is drop order: the VMs go before their daemon.
    pub vm: TestVm,
    /// VMs beyond the first ([`Rig::with_vms`]), CIDs 4, 5, ...
    pub more: Vec<TestVm>,
    pub setup: Setup,
    next_port: Cell<u32>,
}

impl Rig {
    /// Starts `kind` with `extra_args` and boots its VM with default VMM and driver settings.
    /// `tx_buffer_size` sets the VM's `tx-buffer-size` (the daemon's per-connection buffer,
    /// advertised to the guest as `buf_alloc`); `None` keeps the daemon's default (64 KiB).
    pub fn new(kind: DaemonKind, extra_args: &[&str], tx_buffer_size: Option<u32>) -> Result<Rig> {
        Self::with_vms(kind, extra_args, tx_buffer_size, 1)
    }

    /// Like [`Rig::new`] with `vms` VMs (CIDs 3, 4, ...) served by the one daemon.
    pub fn with_vms(
        kind: DaemonKind,
        extra_args: &[&str],
        tx_buffer_size: Option<u32>,
        vms: usize,
    ) -> Result<Rig> {
        let spec = |dir: &std::path::Path| {
            (0..vms.max(1) as u64)
                .map(|i| {
                    let s = VmSpec::new(dir, CID + i);
                    match tx_buffer_size {
                        Some(n) => s.tx_buffer_size(n),
                        None => s,
                    }
                })
                .collect()
        };
        let setup = Setup::with(kind, spec, extra_args)
            .with_context(|| format!("starting {}", kind.name()))?;
        let vm = setup
            .boot(0)
            .with_context(|| format!("booting a VM on {}", kind.name()))?;
        let more = (1..vms)
            .map(|i| {
                setup
                    .boot(i)
                    .with_context(|| format!("booting VM {i} on {}", kind.name()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Rig {
            vm,
            more,
            setup,
            next_port: Cell::new(10_000),
        })
    }

    pub fn kind(&self) -> DaemonKind {
        self.setup.daemon.kind()
    }

    /// A port no earlier scenario of this rig used (host listeners and guest listeners).
    pub fn port(&self) -> u32 {
        let p = self.next_port.get();
        self.next_port.set(p + 1);
        p
    }

    /// Fails if the daemon exited or the guest driver saw a protocol violation.
    pub fn check(&mut self) -> Result<()> {
        if !self.setup.daemon.is_running() {
            bail!(
                "{} exited; stderr:\n{}",
                self.kind().name(),
                self.setup.daemon.stderr()
            );
        }
        for vm in std::iter::once(&self.vm).chain(&self.more) {
            let health = match self.kind() {
                // vhost-device-vsock 0.3.0 returns rx buffers blank after removing a connection.
                DaemonKind::Peer => vm.guest.health_tolerating_blank_rx(),
                DaemonKind::VhostPlug => vm.guest.health(),
            };
            health.with_context(|| {
                format!(
                    "guest driver of CID {} on {}",
                    vm.spec.guest_cid,
                    self.kind().name()
                )
            })?;
        }
        Ok(())
    }

    /// CPU seconds the daemon's threads have used so far, to the nanosecond (the sum over
    /// its live threads' schedstat; /proc/<pid>/stat counts 10 ms ticks, too coarse for
    /// transfers of a fraction of a second). Both daemons keep their threads for the life of
    /// a VM, so no thread's time is lost between two samples.
    pub fn cpu_secs(&self) -> Result<f64> {
        let pid = self.setup.daemon.pid().context("daemon has no pid")?;
        threads_cpu_secs(pid)
    }

    /// Resident set size of the daemon process in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.setup.daemon.pid().context("daemon has no pid")?;
        rss_kib(pid)
    }
}

/// CPU time (user + system, all threads) of process `pid` in seconds, from /proc/<pid>/stat.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_cpu_ticks(&text).with_context(|| format!("bad {path}: {text:?}"))?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok(ticks as f64 / hz as f64)
}

/// CPU seconds of every live thread of process `pid`, summed from
/// /proc/<pid>/task/*/schedstat (nanoseconds on a CPU).
pub fn threads_cpu_secs(pid: u32) -> Result<f64> {
    let dir = format!("/proc/{pid}/task");
    let mut ns = 0u64;
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        // A thread that ended since the listing has nothing to add.
        let Ok(text) = std::fs::read_to_string(e?.path().join("schedstat")) else {
            continue;
        };
        let first = text.split_whitespace().next().unwrap_or_default();
        ns += first
            .parse::<u64>()
            .with_context(|| format!("bad schedstat in {dir}: {text:?}"))?;
    }
    Ok(ns as f64 * 1e-9)
}

/// utime + stime (fields 14 and 15); the command name (field 2) may contain spaces and
/// parentheses, so fields are counted after its last ')'.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime = f.next()?.parse::<u64>().ok()?;
    let stime = f.next()?.parse::<u64>().ok()?;
    Some(utime + stime)
}

/// `VmRSS` of process `pid` in KiB, from /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss(&text).with_context(|| format!("no VmRSS line in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let n = words.next()?.parse::<u64>().ok()?;
    match words.next() {
        Some("kB") => Some(n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_parsing() {
        let s = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t    4321 kB\nThreads:\t2\n";
        assert_eq!(parse_vm_rss(s), Some(4321));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn cpu_ticks_parsing() {
        let s = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(s), Some(12));
        assert_eq!(parse_cpu_ticks("42 (x) S 1"), None);
        assert!(cpu_secs(std::process::id()).unwrap() >= 0.0);
        assert!(threads_cpu_secs(std::process::id()).unwrap() > 0.0);
    }
}
