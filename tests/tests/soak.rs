//! Soak: a bounded random run against one daemon with two simulated VMs, mixing guest->host
//! and host->guest echoes of random sizes, guest-to-guest echoes, half-close, graceful close
//! and reset, suspend/resume of the vrings under traffic, refused connects, and in-place
//! plugin swaps over the control socket. Every byte is checked. The daemon's fd count must
//! come back to its post-warm-up value once connections drain, and its RSS may grow by at
//! most a few MiB: resource bounds, not timings.
//!
//! `VHOST_PLUG_SOAK_SECS` sets the duration (default 60), `VHOST_PLUG_SOAK_SEED` the seed
//! (default: from the clock; always printed, so a failing run can be repeated).
//!
//! Run: `VHOST_PLUG_SOAK_SECS=600 cargo test --release -p vhost-plug-tests --test soak -- --nocapture`

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::Value;
use vhost_plug_tests::checks::{resources, wait_fds};
use vhost_plug_tests::data::{digest, Pattern};
use vhost_plug_tests::harness::{echo_guest, echo_stream, exchange, Setup, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_connect, host_listen, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::{ConnectError, DaemonKind, Guest, GuestListener, SockType, VmSpec};

/// Host ports the guests connect to (allowed by the policy).
const HOST_PORTS: [u32; 4] = [5000, 5001, 5002, 5003];
/// Guest ports host programs connect to (allowed).
const GUEST_PORTS: [u32; 2] = [6000, 6001];
/// The port VM 4 listens on for VM 3.
const SIBLING_PORT: u32 = 6100;
/// A host port with a listener that the policy never allows.
const DENIED_PORT: u32 = 5999;
/// Largest single transfer.
const MAX_SIZE: usize = 4 << 20;
/// Allowed RSS growth between the post-warm-up reading and the end.
const RSS_SLACK_KIB: u64 = 8 * 1024;

/// splitmix64: small, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A size from 1 byte to `MAX_SIZE`, log-uniform, so small and large transfers both occur.
    fn size(&mut self) -> usize {
        let bits = self.below(23) as u32;
        1 + self.below(1u64 << bits) as usize % MAX_SIZE
    }
}

#[derive(Default)]
struct Stats {
    connections: u64,
    bytes: u64,
    ops: BTreeMap<&'static str, u64>,
}

impl Stats {
    fn op(&mut self, name: &'static str) {
        *self.ops.entry(name).or_default() += 1;
    }
}

/// A connect or swap refused: tolerated only when the daemon logged a plugin deadline.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refused(e: ConnectError, what: String) -> anyhow::Error {
    match e {
        ConnectError::Refused => anyhow!(Refused(format!("{what}: refused"))),
        e => anyhow!("{what}: {e}"),
    }
}

/// How a guest ends a connection after its echo.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// SHUTDOWN(SEND), wait for the host's end of stream, then close.
    HalfClose,
    /// Close at once (SHUTDOWN both, RST from the device).
    Close,
    /// RST.
    Reset,
}

fn policy(version: &str) -> String {
    let mut allow: Vec<String> = HOST_PORTS.iter().map(|p| format!("2:{p}")).collect();
    for cid in [3, 4] {
        allow.extend(GUEST_PORTS.iter().map(|p| format!("{cid}:{p}")));
    }
    allow.push(format!("4:{SIBLING_PORT}"));
    let limit = if version == "port-allowlist" {
        ";rate=100000;burst=100000"
    } else {
        ""
    };
    format!(
        "policy=builtin:{version},name=acl,config=allow={}{limit}",
        allow.join(",")
    )
}

/// The control socket's answer (it says whether it worked in `ok`; callers check it).
fn ctl(socket: &Path, args: &[&str]) -> Result<Value> {
    Ok(vhost_plug_tests::harness::ctl(socket, args)?.1)
}

/// Guest -> host echo of `size` bytes, ended with `close`.
fn guest_to_host(
    guest: &Guest,
    l: &UnixListener,
    port: u32,
    size: usize,
    seed: u64,
    close: Ending,
) -> Result<u64> {
    let g = guest
        .connect(HOST_CID, port, SockType::Stream)
        .map_err(|e| refused(e, format!("cid {} -> host port {port}", guest.guest_cid())))?;
    let h = accept_timeout(l, HOST_TIMEOUT)?;
    std::thread::scope(|sc| {
        let echo = sc.spawn(move || echo_stream(h));
        let data = Pattern::bytes(seed, size);
        let back = exchange(&g, &data).context("guest->host exchange")?;
        ensure!(
            digest(&back) == digest(&data),
            "guest->host echo of {size} bytes differs"
        );
        match close {
            Ending::HalfClose => {
                g.shutdown(false, true)?;
                let n = g.recv(&mut [0u8; 16])?;
                ensure!(n == 0, "{n} bytes after the host's end of stream");
                g.close()?;
            }
            Ending::Close => g.close()?,
            Ending::Reset => g.reset()?,
        }
        let echoed = echo.join().map_err(|_| anyhow!("host echo panicked"))??;
        ensure!(
            echoed == size as u64,
            "host echoed {echoed} of {size} bytes"
        );
        Ok(2 * size as u64)
    })
}

/// Host -> guest echo of `size` bytes; the host half-closes and expects the guest's end.
fn host_to_guest(vm: &TestVm, gl: &GuestListener, size: usize, seed: u64) -> Result<u64> {
    let (mut h, _) = host_connect(&vm.spec.uds_path, gl.port())
        .map_err(|e| anyhow!(Refused(format!("host -> guest port {}: {e:#}", gl.port()))))?;
    let g = gl.accept(HOST_TIMEOUT)?;
    std::thread::scope(|sc| {
        let echo = sc.spawn(move || {
            let r = echo_guest(&g);
            drop(g);
            r
        });
        let data = Pattern::bytes(seed, size);
        let back = exchange(&h, &data).context("host->guest exchange")?;
        h.shutdown(std::net::Shutdown::Write)?;
        let echoed = echo.join().map_err(|_| anyhow!("guest echo panicked"))??;
        ensure!(
            digest(&back) == digest(&data) && echoed == size as u64,
            "host->guest echo of {size} bytes differs"
        );
        let mut rest = [0u8; 16];
        let n = h.read(&mut rest)?;
        ensure!(n == 0, "{n} bytes after the guest closed");
        Ok(2 * size as u64)
    })
}

/// VM 3 -> VM 4 echo.
fn sibling(a: &TestVm, bl: &GuestListener, size: usize, seed: u64) -> Result<u64> {
    let g = a
        .guest
        .connect(4, SIBLING_PORT, SockType::Stream)
        .map_err(|e| refused(e, "cid 3 -> cid 4".into()))?;
    let peer = bl.accept(HOST_TIMEOUT)?;
    std::thread::scope(|sc| {
        let echo = sc.spawn(move || {
            let r = echo_guest(&peer);
            drop(peer);
            r
        });
        let data = Pattern::bytes(seed, size);
        let back = exchange(&g, &data).context("sibling exchange")?;
        g.shutdown(false, true)?;
        let echoed = echo
            .join()
            .map_err(|_| anyhow!("sibling echo panicked"))??;
        ensure!(
            digest(&back) == digest(&data) && echoed == size as u64,
            "sibling echo of {size} bytes differs"
        );
        g.close()?;
        Ok(2 * size as u64)
    })
}

/// Daemon connections of every VM as the control socket reports them.
fn connections(ctl_sock: &Path) -> Result<u64> {
    let st = ctl(ctl_sock, &["status"])?;
    let vms = st["vms"].as_array().context("status without vms")?;
    Ok(vms
        .iter()
        .map(|v| v["connections"].as_u64().unwrap_or(0))
        .sum())
}

fn wait_no_connections(ctl_sock: &Path, t: Duration) -> Result<u64> {
    let deadline = Instant::now() + t;
    loop {
        let n = connections(ctl_sock)?;
        if n == 0 || Instant::now() >= deadline {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn soak() -> Result<()> {
    let secs: u64 = match std::env::var("VHOST_PLUG_SOAK_SECS") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("VHOST_PLUG_SOAK_SECS={v}"))?,
        Err(_) => 60,
    };
    let seed: u64 = match std::env::var("VHOST_PLUG_SOAK_SEED") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("VHOST_PLUG_SOAK_SEED={v}"))?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    eprintln!("[soak] seed {seed} (VHOST_PLUG_SOAK_SEED), {secs} s (VHOST_PLUG_SOAK_SECS)");
    let mut rng = Rng(seed);

    let ctl_dir = tempfile::tempdir()?;
    let ctl_sock = ctl_dir.path().join("ctl.sock");
    let ctl_s = ctl_sock.display().to_string();
    let v1 = policy("port-allowlist-v1");
    let mut s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3), VmSpec::new(d, 4)],
        &["--control-socket", &ctl_s, "--plugin", &v1],
    )?;
    let mut vms = vec![s.boot(0)?, s.boot(1)?];
    let mut host_l: Vec<Vec<UnixListener>> = Vec::new();
    let mut guest_l: Vec<Vec<GuestListener>> = Vec::new();
    let mut denied_l = Vec::new();
    for vm in &vms {
        host_l.push(
            HOST_PORTS
                .iter()
                .map(|p| host_listen(&vm.spec.uds_path, *p))
                .collect::<Result<_>>()?,
        );
        guest_l.push(
            GUEST_PORTS
                .iter()
                .map(|p| vm.guest.listen(*p, SockType::Stream))
                .collect::<Result<_>>()?,
        );
        denied_l.push(host_listen(&vm.spec.uds_path, DENIED_PORT)?);
    }
    let sib_l = vms[1].guest.listen(SIBLING_PORT, SockType::Stream)?;

    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs);
    let warm_up = Duration::from_secs((secs / 10).clamp(3, 30));
    let mut baseline: Option<(usize, u64, u64, u64)> = None; // fds, rss, connections, bytes
    let mut st = Stats::default();
    let mut swaps = 0u32;
    let mut iteration = 0u64;
    while Instant::now() < end {
        iteration += 1;
        let op_seed = rng.next();
        let v = rng.below(2) as usize;
        let mark = s.daemon.log_mark();
        let res: Result<()> = match rng.below(100) {
            0..=34 => {
                let pi = rng.below(HOST_PORTS.len() as u64) as usize;
                let close = match rng.below(3) {
                    0 => Ending::HalfClose,
                    1 => Ending::Close,
                    _ => Ending::Reset,
                };
                let size = rng.size();
                st.op(match close {
                    Ending::HalfClose => "guest->host, half-close",
                    Ending::Close => "guest->host, close",
                    Ending::Reset => "guest->host, reset",
                });
                guest_to_host(
                    &vms[v].guest,
                    &host_l[v][pi],
                    HOST_PORTS[pi],
                    size,
                    op_seed,
                    close,
                )
                .map(|b| {
                    st.connections += 1;
                    st.bytes += b;
                })
            }
            35..=59 => {
                let gi = rng.below(GUEST_PORTS.len() as u64) as usize;
                st.op("host->guest");
                host_to_guest(&vms[v], &guest_l[v][gi], rng.size(), op_seed).map(|b| {
                    st.connections += 1;
                    st.bytes += b;
                })
            }
            60..=71 => {
                st.op("guest->guest");
                sibling(&vms[0], &sib_l, rng.size(), op_seed).map(|b| {
                    st.connections += 1;
                    st.bytes += b;
                })
            }
            72..=81 => {
                // Several guest->host echoes at once, on both VMs.
                st.op("parallel burst");
                let n = 2 + rng.below(6) as usize;
                let jobs: Vec<(usize, usize, usize, u64)> = (0..n)
                    .map(|i| {
                        (
                            i % 2,
                            i % HOST_PORTS.len(),
                            rng.size().min(1 << 20),
                            rng.next(),
                        )
                    })
                    .collect();
                // One port per job: accept order then cannot mix connections up.
                let mut seen = std::collections::HashSet::new();
                let jobs: Vec<_> = jobs
                    .into_iter()
                    .filter(|(vi, pi, _, _)| seen.insert((*vi, *pi)))
                    .collect();
                let (vms_r, host_r) = (&vms, &host_l);
                let results: Vec<Result<u64>> = std::thread::scope(|sc| {
                    let hs: Vec<_> = jobs
                        .iter()
                        .map(|(vi, pi, size, sd)| {
                            sc.spawn(move || {
                                guest_to_host(
                                    &vms_r[*vi].guest,
                                    &host_r[*vi][*pi],
                                    HOST_PORTS[*pi],
                                    *size,
                                    *sd,
                                    Ending::Close,
                                )
                            })
                        })
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("job panicked"))))
                        .collect()
                });
                results.into_iter().try_for_each(|r| {
                    st.connections += 1;
                    st.bytes += r?;
                    Ok(())
                })
            }
            82..=89 => {
                // Suspend and resume the vrings while a stream runs.
                st.op("suspend/resume under traffic");
                let size = rng.size().max(256 << 10);
                let pause = Duration::from_millis(rng.below(20));
                let pi = rng.below(HOST_PORTS.len() as u64) as usize;
                let l_ref = &host_l[v][pi];
                let TestVm { guest, sim, .. } = &mut vms[v];
                let guest: &Guest = guest;
                std::thread::scope(|sc| -> Result<u64> {
                    let t = sc.spawn(move || {
                        guest_to_host(guest, l_ref, HOST_PORTS[pi], size, op_seed, Ending::Close)
                    });
                    std::thread::sleep(pause);
                    guest.pause_interrupts()?;
                    let bases = sim.stop_vrings()?;
                    sim.resume_vrings(&bases)?;
                    guest.resume_interrupts();
                    t.join().map_err(|_| anyhow!("stream thread panicked"))?
                })
                .map(|b| {
                    st.connections += 1;
                    st.bytes += b;
                })
            }
            90..=94 => {
                st.op("refused connect");
                match vms[v].guest.connect_timeout(
                    HOST_CID,
                    DENIED_PORT,
                    SockType::Stream,
                    HOST_TIMEOUT,
                ) {
                    Err(ConnectError::Refused) => Ok(()),
                    Ok(_) => Err(anyhow!("port {DENIED_PORT} is not in the allowlist")),
                    Err(e) => Err(anyhow!("connect to the denied port: {e}")),
                }
            }
            _ => {
                st.op("plugin swap");
                swaps += 1;
                let spec = policy("port-allowlist");
                match ctl(&ctl_sock, &["swap", &spec]) {
                    Ok(sw) if sw["ok"] == true => {
                        if swaps == 1 {
                            eprintln!("[soak] first swap (v1 -> v2): {sw}");
                        }
                        Ok(())
                    }
                    Ok(sw) => {
                        let err = sw["error"].as_str().unwrap_or("").to_string();
                        // A plugin state export/import that missed its deadline on a loaded
                        // host: that VM keeps its old plugin (VMs listed in `swapped` have the
                        // new one; each VM's swap is all or nothing).
                        if err.contains("deadline expired") {
                            Err(anyhow!(Refused(format!("swap refused: {err}"))))
                        } else {
                            Err(anyhow!("swap failed: {sw}"))
                        }
                    }
                    Err(e) => Err(e),
                }
            }
        };
        // A plugin call that missed its 10 ms deadline on a loaded host fails closed: the
        // connect (or swap) is refused, nothing else changes. Tolerated only with the
        // daemon's log line saying so; everything else fails the run.
        let res = match res {
            Err(e)
                if e.downcast_ref::<Refused>().is_some()
                    && s.daemon.log_since(mark).contains("deadline expired") =>
            {
                st.op("refused: plugin deadline under load");
                eprintln!("[soak] iteration {iteration}: {e:#} (plugin deadline expired)");
                Ok(())
            }
            other => other,
        };
        res.with_context(|| {
            format!(
                "iteration {iteration} (seed {seed}); daemon log tail:\n{}",
                tail(&s.daemon.stderr(), 3000)
            )
        })?;
        if baseline.is_none() && t0.elapsed() >= warm_up {
            ensure!(
                wait_no_connections(&ctl_sock, Duration::from_secs(10))? == 0,
                "connections did not drain after warm-up"
            );
            std::thread::sleep(Duration::from_millis(200));
            let (rss, fds) = resources(&s.daemon, "soak start (after warm-up)")?;
            baseline = Some((fds, rss, st.connections, st.bytes));
        }
    }
    let (fds0, rss0, conns0, bytes0) = baseline.context("the run ended before warm-up")?;
    let open = wait_no_connections(&ctl_sock, Duration::from_secs(10))?;
    let fds1 = wait_fds(&s.daemon, fds0, Duration::from_secs(10))?;
    let (rss1, _) = resources(&s.daemon, "soak end")?;
    for vm in &vms {
        vm.guest.health()?;
    }
    eprintln!(
        "[soak] seed {seed}: {iteration} operations in {:.0?}, {} connections, {} bytes \
         checked ({:.1} MiB); after warm-up: {} connections, {} bytes",
        t0.elapsed(),
        st.connections,
        st.bytes,
        st.bytes as f64 / (1 << 20) as f64,
        st.connections - conns0,
        st.bytes - bytes0
    );
    for (op, n) in &st.ops {
        eprintln!("[soak]   {op:<30} {n}");
    }
    eprintln!(
        "[soak] fds {fds0} -> {fds1}; VmRSS {rss0} -> {rss1} KiB ({:+} KiB); open connections \
         at the end: {open}",
        rss1 as i64 - rss0 as i64
    );
    ensure!(open == 0, "{open} connections still open in the daemon");
    ensure!(fds1 <= fds0, "daemon fds {fds0} -> {fds1}");
    ensure!(
        rss1 <= rss0 + RSS_SLACK_KIB,
        "daemon RSS grew {} KiB (bound {RSS_SLACK_KIB})",
        rss1 - rss0
    );
    ensure!(s.daemon.is_running(), "daemon exited");
    vms.clear();
    Ok(())
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
