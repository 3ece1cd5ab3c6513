//! Density and cold start (bench group `density`): both daemons serving 1, 10, 100 and
//! 1,000 idle VMs (time until every vhost-user socket exists, RSS, anonymous memory,
//! threads, file descriptors), then 100 VMs attached by simulated VMMs, each moving data over
//! one connection at the same time (aggregate throughput, daemon CPU, RSS, threads).
//!
//! vhost-plug runs with its default plugins and its default artifact cache pointed at a
//! fresh directory: the first start (empty cache, plugins compiled) is reported on its own
//! row; the timed starts after it find the cache filled, as every start after the first
//! one on a host does.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::rig::{cpu_secs, rss_kib};
use super::stats::median;
use crate::daemon::{DaemonKind, VmSpec};
use crate::data::{recv_digest, send_pattern};
use crate::harness::{Setup, TestVm};
use crate::host::{accept_timeout, host_listen, HOST_TIMEOUT};
use crate::packet::HOST_CID;
use crate::SockType;

/// VM counts of the idle part.
pub const COUNTS: [usize; 4] = [1, 10, 100, 1000];
/// Bound on one start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause before sampling an idle daemon, so start-up work has finished.
const SETTLE: Duration = Duration::from_millis(500);

/// One idle start.
#[derive(Clone, Copy, Debug, Default)]
pub struct Idle {
    pub ready_ms: f64,
    pub rss_kib: f64,
    /// Anonymous (private, not file-backed) memory: what the daemon cannot share.
    pub anon_kib: f64,
    pub threads: f64,
    pub fds: f64,
}

/// What the daemon did with `vms` VMs attached and each moving data.
#[derive(Clone, Copy, Debug, Default)]
pub struct Busy {
    pub vms: usize,
    pub mib_s: f64,
    pub daemon_pct: f64,
    pub rss_kib: f64,
    pub threads: f64,
}

/// Everything the group measured for one daemon.
#[derive(Clone, Debug, Default)]
pub struct DaemonRun {
    /// Per VM count: medians of the repetitions, or why the daemon could not do it.
    pub idle: Vec<(usize, Result<Idle, String>)>,
    /// vhost-plug only: the first start with an empty artifact cache.
    pub first_start_ms: Option<f64>,
    pub busy: Option<Result<Busy, String>>,
}

fn status_field(pid: u32, name: &str) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {name} in /proc/{pid}/status"))
}

fn sample(pid: u32) -> Result<(f64, f64, f64, f64)> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let anon = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no Anonymous in smaps_rollup")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as f64;
    Ok((
        rss_kib(pid)? as f64,
        anon,
        status_field(pid, "Threads:")?,
        fds,
    ))
}

/// A daemon killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `kind` with `n` VMs in `dir`, times until every vhost-user socket exists, lets it
/// settle and samples it.
fn start_idle(kind: DaemonKind, n: usize, dir: &Path, cache: &Path) -> Result<Idle> {
    let specs: Vec<VmSpec> = (0..n as u64).map(|i| VmSpec::new(dir, 3 + i)).collect();
    let mut cmd = Command::new(kind.binary()?);
    for s in &specs {
        cmd.arg("--vm").arg(s.to_arg());
    }
    let log = dir.join(format!("{}-{n}.stderr", kind.name()));
    cmd.env("XDG_CACHE_HOME", cache)
        .env_remove("CACHE_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let t0 = Instant::now();
    let mut p = Proc(cmd.spawn().context("spawning the daemon")?);
    let mut ready = 0;
    while ready < specs.len() {
        if specs[ready].socket.exists() {
            ready += 1;
            continue;
        }
        if let Some(st) = p.0.try_wait()? {
            let err = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("exited ({st}) with {ready} of {n} sockets: {}", tail(&err));
        }
        if t0.elapsed() > START_TIMEOUT {
            bail!("{ready} of {n} sockets after {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let ready_ms = t0.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(SETTLE);
    let (rss_kib, anon_kib, threads, fds) = sample(p.0.id())?;
    drop(p);
    for s in &specs {
        for f in [s.socket.clone(), s.uds_path.clone(), seqpacket(&s.uds_path)] {
            let _ = std::fs::remove_file(f);
        }
    }
    Ok(Idle {
        ready_ms,
        rss_kib,
        anon_kib,
        threads,
        fds,
    })
}

fn seqpacket(uds: &Path) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(".seqpacket");
    PathBuf::from(p)
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(600)..]
}

fn med(v: &[Idle], f: impl Fn(&Idle) -> f64) -> f64 {
    median(&v.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

/// The idle part for every daemon, repetitions interleaved between the daemons. A daemon
/// that fails at some count is not tried at larger ones.
pub fn idle(
    kinds: &[DaemonKind],
    reps: usize,
    work: &Path,
    log: &dyn Fn(String),
) -> Result<Vec<(DaemonKind, DaemonRun)>> {
    let cache = work.join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let mut runs: Vec<(DaemonKind, DaemonRun)> =
        kinds.iter().map(|&k| (k, DaemonRun::default())).collect();
    for (k, run) in runs.iter_mut() {
        if *k == DaemonKind::VhostPlug {
            let dir = tempdir(work)?;
            let first = start_idle(*k, 1, dir.path(), &cache)?;
            log(format!(
                "vhost-plug first start (empty cache): {:.1} ms",
                first.ready_ms
            ));
            run.first_start_ms = Some(first.ready_ms);
        }
    }
    for n in COUNTS {
        let mut samples: Vec<Vec<Idle>> = vec![Vec::new(); runs.len()];
        let mut failed: Vec<Option<String>> = vec![None; runs.len()];
        let reps = if n >= 1000 { reps.min(3) } else { reps };
        for rep in 0..reps {
            for (i, (k, run)) in runs.iter().enumerate() {
                let gave_up = run.idle.iter().any(|(_, r)| r.is_err());
                if gave_up || failed[i].is_some() {
                    continue;
                }
                let dir = tempdir(work)?;
                match start_idle(*k, n, dir.path(), &cache) {
                    Ok(s) => {
                        log(format!(
                            "rep {rep} {} {n} VMs: ready {:.1} ms, RSS {:.0} KiB (anon {:.0}), \
                             {} threads, {} fds",
                            k.name(),
                            s.ready_ms,
                            s.rss_kib,
                            s.anon_kib,
                            s.threads,
                            s.fds
                        ));
                        samples[i].push(s);
                    }
                    Err(e) => {
                        log(format!("{} {n} VMs failed: {e:#}", k.name()));
                        failed[i] = Some(format!("{e:#}"));
                    }
                }
            }
        }
        for (i, (_, run)) in runs.iter_mut().enumerate() {
            if run.idle.iter().any(|(_, r)| r.is_err()) {
                continue;
            }
            let r = match (&failed[i], samples[i].is_empty()) {
                (Some(e), _) => Err(e.clone()),
                (None, true) => continue,
                (None, false) => {
                    let s = &samples[i];
                    Ok(Idle {
                        ready_ms: med(s, |x| x.ready_ms),
                        rss_kib: med(s, |x| x.rss_kib),
                        anon_kib: med(s, |x| x.anon_kib),
                        threads: med(s, |x| x.threads),
                        fds: med(s, |x| x.fds),
                    })
                }
            };
            run.idle.push((n, r));
        }
    }
    Ok(runs)
}

fn tempdir(work: &Path) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("density")
        .tempdir_in(work)
        .context("temp dir")
}

/// `vms` VMs attached by simulated VMMs; each guest sends `bytes` to a host program over one
/// connection, all at once. Data is checksummed.
pub fn busy(kind: DaemonKind, vms: usize, bytes: u64, work: &Path) -> Result<Busy> {
    std::env::set_var("XDG_CACHE_HOME", work.join("cache"));
    let setup = Setup::with(
        kind,
        |dir| (0..vms as u64).map(|i| VmSpec::new(dir, 3 + i)).collect(),
        &[],
    )?;
    let pid = setup.daemon.pid().context("daemon pid")?;
    let mut guests: Vec<TestVm> = Vec::with_capacity(vms);
    for i in 0..vms {
        guests.push(setup.boot(i).with_context(|| format!("booting VM {i}"))?);
    }
    let port = 7000;
    let mut pairs = Vec::with_capacity(vms);
    for vm in &guests {
        let l = host_listen(&vm.spec.uds_path, port)?;
        let g = vm
            .guest
            .connect(HOST_CID, port, SockType::Stream)
            .map_err(|e| anyhow!("cid {}: connect: {e}", vm.spec.guest_cid))?;
        let h = accept_timeout(&l, HOST_TIMEOUT)?;
        h.set_read_timeout(Some(HOST_TIMEOUT))?;
        pairs.push((vm.spec.guest_cid, g, h));
    }
    let cpu0 = cpu_secs(pid)?;
    let t0 = Instant::now();
    let mut mid = None;
    std::thread::scope(|sc| -> Result<()> {
        let mut handles = Vec::new();
        for (cid, g, h) in &pairs {
            let tx = sc.spawn(move || send_pattern(g, *cid, bytes, 64 << 10));
            let rx = sc.spawn(move || recv_digest(h, bytes, 64 << 10));
            handles.push((*cid, tx, rx));
        }
        // Halfway, while every connection moves data.
        std::thread::sleep(Duration::from_millis(300));
        mid = sample(pid).ok();
        for (cid, tx, rx) in handles {
            let sent = tx.join().map_err(|_| anyhow!("sender panicked"))??;
            let got = rx.join().map_err(|_| anyhow!("receiver panicked"))??;
            if sent != got {
                bail!("cid {cid}: data corrupted");
            }
        }
        Ok(())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid)? - cpu0;
    let (rss_kib, _, threads, _) = match mid {
        Some(s) => s,
        None => sample(pid)?,
    };
    drop(pairs);
    for g in guests {
        g.shutdown();
    }
    Ok(Busy {
        vms,
        mib_s: (bytes * vms as u64) as f64 / f64::from(1u32 << 20) / secs,
        daemon_pct: cpu / secs * 100.0,
        rss_kib,
        threads,
    })
}

fn busy_of(r: Option<&DaemonRun>) -> Option<&Result<Busy, String>> {
    r.and_then(|r| r.busy.as_ref())
}

fn get(runs: &[(DaemonKind, DaemonRun)], k: DaemonKind) -> Option<&DaemonRun> {
    runs.iter().find(|(x, _)| *x == k).map(|(_, r)| r)
}

fn at(run: Option<&DaemonRun>, n: usize) -> Option<&Idle> {
    run?.idle
        .iter()
        .find(|(c, _)| *c == n)
        .and_then(|(_, r)| r.as_ref().ok())
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// Cost of each VM beyond the first: (value at the largest count - value at 1) / (count-1).
fn per_vm(run: Option<&DaemonRun>, f: impl Fn(&Idle) -> f64) -> Option<(usize, f64)> {
    let one = at(run, 1)?;
    let (n, last) = run?
        .idle
        .iter()
        .rev()
        .find_map(|(n, r)| r.as_ref().ok().filter(|_| *n > 1).map(|x| (*n, x)))?;
    Some((n, (f(last) - f(one)) / (n - 1) as f64))
}

/// The section for BENCHMARKS.md: per-count table, per-VM costs and the targets.
pub fn markdown(runs: &[(DaemonKind, DaemonRun)]) -> String {
    let plug = get(runs, DaemonKind::VhostPlug);
    let peer = get(runs, DaemonKind::Peer);
    let mut s = String::from(
        "| VMs | daemon | ready (ms) | RSS (KiB) | anonymous (KiB) | threads | fds |\n\
         |---:|---|---:|---:|---:|---:|---:|\n",
    );
    for n in COUNTS {
        for (k, run) in runs {
            let r = run.idle.iter().find(|(c, _)| *c == n);
            match r {
                Some((_, Ok(x))) => {
                    let _ = writeln!(
                        s,
                        "| {n} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} |",
                        k.name(),
                        x.ready_ms,
                        x.rss_kib,
                        x.anon_kib,
                        x.threads,
                        x.fds
                    );
                }
                Some((_, Err(e))) => {
                    let e: String = e.chars().take(120).collect();
                    let _ = writeln!(s, "| {n} | {} | failed: {e} | | | | |", k.name());
                }
                None => {}
            }
        }
    }
    let _ = writeln!(
        s,
        "\n| target | vhost-plug | vhost-device-vsock | met |\n|---|---:|---:|---|"
    );
    let met = |ok: Option<bool>| match ok {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    };
    let ready1000 = at(plug, 1000).map(|x| x.ready_ms);
    let _ = writeln!(
        s,
        "| 1,000 VMs ready in < 2,000 ms | {} | {} | {} |",
        cell(ready1000, 0),
        cell(at(peer, 1000).map(|x| x.ready_ms), 0),
        met(ready1000.map(|v| v < 2000.0))
    );
    let (c1, p1) = (
        at(plug, 1).map(|x| x.ready_ms),
        at(peer, 1).map(|x| x.ready_ms),
    );
    let _ = writeln!(
        s,
        "| one-VM start (cache filled) <= peer + 30 ms | {} | {} | {} |",
        cell(c1, 1),
        cell(p1, 1),
        met(c1.zip(p1).map(|(a, b)| a <= b + 30.0))
    );
    if let Some(f) = plug.and_then(|r| r.first_start_ms) {
        let _ = writeln!(
            s,
            "| one-VM first start, empty cache (plugins compiled; no target) | {f:.0} | - | - |"
        );
    }
    let (r1, q1) = (
        at(plug, 1).map(|x| x.rss_kib),
        at(peer, 1).map(|x| x.rss_kib),
    );
    let _ = writeln!(
        s,
        "| RSS with one idle VM <= 2x peer (KiB) | {} | {} | {} |",
        cell(r1, 0),
        cell(q1, 0),
        met(r1.zip(q1).map(|(a, b)| a <= 2.0 * b))
    );
    let (rv, qv) = (per_vm(plug, |x| x.rss_kib), per_vm(peer, |x| x.rss_kib));
    let _ = writeln!(
        s,
        "| RSS per further idle VM <= 100 KiB (at {} VMs) | {} | {} | {} |",
        rv.or(qv).map_or(0, |x| x.0),
        cell(rv.map(|x| x.1), 1),
        cell(qv.map(|x| x.1), 1),
        met(rv.map(|x| x.1 <= 100.0))
    );
    let (tv, uv) = (per_vm(plug, |x| x.threads), per_vm(peer, |x| x.threads));
    let _ = writeln!(
        s,
        "| threads per idle VM <= 2 | {} | {} | {} |",
        cell(tv.map(|x| x.1), 2),
        cell(uv.map(|x| x.1), 2),
        met(tv.map(|x| x.1 <= 2.0))
    );
    if busy_of(plug).is_some() || busy_of(peer).is_some() {
        let vms = [busy_of(plug), busy_of(peer)]
            .into_iter()
            .flatten()
            .find_map(|b| b.as_ref().ok().map(|b| b.vms))
            .unwrap_or(0);
        let _ = writeln!(
            s,
            "\n| {vms} VMs attached, one connection each moving data | vhost-plug | \
             vhost-device-vsock | ratio |\n|---|---:|---:|---:|"
        );
        let row = |label: &str, f: &dyn Fn(&Busy) -> f64, s: &mut String| {
            let a = busy_of(plug).and_then(|b| b.as_ref().ok()).map(f);
            let b = busy_of(peer).and_then(|b| b.as_ref().ok()).map(f);
            let ratio = a.zip(b).filter(|(_, b)| *b != 0.0).map(|(a, b)| a / b);
            let _ = writeln!(
                s,
                "| {label} | {} | {} | {} |",
                cell(a, 0),
                cell(b, 0),
                cell(ratio, 2)
            );
        };
        row("aggregate throughput (MiB/s)", &|b| b.mib_s, &mut s);
        row("daemon CPU (% of a core)", &|b| b.daemon_pct, &mut s);
        row(
            "daemon RSS during the transfer (KiB)",
            &|b| b.rss_kib,
            &mut s,
        );
        row("daemon threads", &|b| b.threads, &mut s);
        for (k, r) in runs {
            if let Some(Err(e)) = &r.busy {
                let _ = writeln!(s, "\n- attached VMs on {} failed: {e}", k.name());
            }
        }
    }
    s
}

/// `density.csv`: one line per daemon and VM count, for the plot.
pub fn csv(runs: &[(DaemonKind, DaemonRun)]) -> String {
    let mut s = String::from("daemon,vms,ready_ms,rss_kib,anon_kib,threads,fds\n");
    for (k, run) in runs {
        for (n, r) in &run.idle {
            if let Ok(x) = r {
                let _ = writeln!(
                    s,
                    "{},{n},{:.2},{:.0},{:.0},{:.0},{:.0}",
                    k.name(),
                    x.ready_ms,
                    x.rss_kib,
                    x.anon_kib,
                    x.threads,
                    x.fds
                );
            }
        }
    }
    s
}
