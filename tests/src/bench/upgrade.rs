//! Live upgrade (`vhost-plug ctl upgrade`) under a simulated VM holding `conns` idle
//! connections: how long the guest sees no answer, and how long the whole upgrade takes.
//! vhost-device-vsock has no live upgrade (restarting it under a running VM ends the
//! VM's vsock), so this section runs vhost-plug only.
//!
//! The guest pings a host echo program over one more connection, 1 byte at a time, for the
//! whole run; the guest-visible pause of an upgrade is the longest round trip that overlaps
//! it. The daemon's own figure (`pause_us` of `ctl upgrade`: VM quiesced here until adopted
//! there) and the whole upgrade (`ctl upgrade` wall time: new process started, plugins
//! loaded, every VM moved, old process gone) are reported beside it.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::harness::Setup;
use crate::host::{accept_timeout, host_listen, HOST_TIMEOUT};
use crate::packet::HOST_CID;
use crate::upgrade::{upgrade, Current};
use crate::{DaemonKind, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct UpgradeRun {
    pub conns: usize,
    /// Per upgrade, µs.
    pub guest_pause_us: Vec<u64>,
    pub daemon_pause_us: Vec<u64>,
    pub total_ms: Vec<u64>,
    /// Longest round trip outside the upgrades, µs (the baseline of the pause figure).
    pub baseline_max_us: u64,
}

/// `reps` upgrades in a row under one VM with `conns` idle connections.
pub fn run(conns: usize, reps: usize, work: &Path) -> Result<UpgradeRun> {
    let control = work.join("upgrade.ctl");
    let c = control.display().to_string();
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3)],
        &["--control-socket", &c],
    )?;
    let mut current = Current(None);
    let uds = s.vms[0].uds_path.clone();
    let vm = s.boot(0)?;
    let hl = host_listen(&uds, 7000)?;
    let mut idle = Vec::with_capacity(conns);
    for i in 0..conns {
        let g = vm
            .guest
            .connect_timeout(HOST_CID, 7000, SockType::Stream, PROMPT)
            .map_err(|e| anyhow::anyhow!("guest connect {i}: {e}"))?;
        idle.push((g, accept_timeout(&hl, HOST_TIMEOUT)?));
    }
    let pl = host_listen(&uds, 7001)?;
    let g = vm
        .guest
        .connect_timeout(HOST_CID, 7001, SockType::Stream, PROMPT)
        .map_err(|e| anyhow::anyhow!("guest connect: {e}"))?;
    let mut h = accept_timeout(&pl, HOST_TIMEOUT)?;
    let stop = AtomicBool::new(false);
    let pings: Mutex<Vec<(Instant, Duration)>> = Mutex::new(Vec::new());
    let mut windows = Vec::new();
    let mut out = UpgradeRun {
        conns,
        ..UpgradeRun::default()
    };
    thread::scope(|sc| -> Result<()> {
        let echo = sc.spawn(move || -> std::io::Result<()> {
            let mut b = [0u8; 1];
            while h.read(&mut b)? == 1 {
                h.write_all(&b)?;
            }
            Ok(())
        });
        let pinger = sc.spawn(|| -> Result<()> {
            let mut b = [0u8; 1];
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                g.send(b"p")?;
                (&g).read_exact(&mut b)?;
                pings
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lock"))?
                    .push((t, t.elapsed()));
            }
            g.shutdown(false, true)?;
            Ok(())
        });
        let r = (|| -> Result<()> {
            thread::sleep(Duration::from_millis(300));
            for _ in 0..reps {
                let t = Instant::now();
                let (pid, v) = upgrade(&control, &[])?;
                let wall = t.elapsed();
                current.0 = Some(pid);
                windows.push((t, t + wall));
                out.total_ms.push(wall.as_millis() as u64);
                out.daemon_pause_us
                    .push(v["pause_us"][0].as_u64().context("pause_us")?);
                thread::sleep(Duration::from_millis(300));
            }
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        pinger
            .join()
            .map_err(|_| anyhow::anyhow!("pinger panicked"))??;
        echo.join()
            .map_err(|_| anyhow::anyhow!("echo panicked"))?
            .context("host echo")?;
        r
    })?;
    let pings = pings.into_inner().map_err(|_| anyhow::anyhow!("lock"))?;
    let overlaps =
        |(t, d): &(Instant, Duration), (a, b): &(Instant, Instant)| *t < *b && *t + *d > *a;
    for w in &windows {
        let max = pings
            .iter()
            .filter(|p| overlaps(p, w))
            .map(|p| p.1)
            .max()
            .unwrap_or_default();
        out.guest_pause_us.push(max.as_micros() as u64);
    }
    out.baseline_max_us = pings
        .iter()
        .filter(|p| !windows.iter().any(|w| overlaps(p, w)))
        .map(|p| p.1.as_micros() as u64)
        .max()
        .unwrap_or(0);
    drop(idle);
    drop(current);
    Ok(out)
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

pub fn markdown(r: &UpgradeRun) -> String {
    let mut s = String::from(
        "| connections | upgrades | guest-visible pause, median / max (ms) | daemon pause \
         (quiesced -> adopted), median / max (ms) | whole upgrade, median / max (ms) | \
         longest round trip outside upgrades (ms) |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    let ms = |us: u64| us as f64 / 1000.0;
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
    let _ = writeln!(
        s,
        "| {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {} / {} | {:.1} |",
        r.conns + 1,
        r.guest_pause_us.len(),
        ms(median(&r.guest_pause_us)),
        ms(max(&r.guest_pause_us)),
        ms(median(&r.daemon_pause_us)),
        ms(max(&r.daemon_pause_us)),
        median(&r.total_ms),
        max(&r.total_ms),
        ms(r.baseline_max_us),
    );
    s
}

/// The section of the `bench` binary, with its heading: sockets under `BENCH_SOCKET_DIR` if
/// set, else `out`.
pub fn section(out: &Path, conns: usize, reps: usize, log: &dyn Fn(String)) -> String {
    let base = std::env::var_os("BENCH_SOCKET_DIR").map_or_else(|| out.to_path_buf(), Into::into);
    let work = base.join(format!("vhost-plug-upgrade-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&work) {
        return format!("upgrade: creating {}: {e}\n", work.display());
    }
    let r = run(conns, reps.max(3), &work);
    let _ = std::fs::remove_dir_all(&work);
    let body = match r {
        Ok(r) => {
            log(format!("upgrade {r:?}"));
            markdown(&r)
        }
        Err(e) => format!("upgrade failed: {e:#}\n"),
    };
    format!("\n### Live upgrade (`ctl upgrade`; vhost-device-vsock has none)\n\n{body}")
}
