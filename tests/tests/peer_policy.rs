//! Host peer identity in policy: a host program's `CONNECT` is judged by who the program is
//! (uid, gid, cgroup, as the kernel reports them for its socket), a WIT 0.1.0 plugin in the
//! same chain keeps deciding as before, the audit plugin records the identity, and the
//! decisions are counted per outcome on the metrics endpoint. Driven by the simulated VMM; the
//! host program is this test process, so its identity is known.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test peer_policy -- --nocapture`.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use prometheus_parse::{Scrape, Value};
use vhost_plug_tests::harness::{recv_exact, Setup};
use vhost_plug_tests::host::{host_connect, HOST_TIMEOUT};
use vhost_plug_tests::state::{json_plugin_states, snapshot, state_cfg, StateReader};
use vhost_plug_tests::{DaemonKind, DriverConfig, QueueSet, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(10);

/// This process's cgroup v2 path (the `0::` line of /proc/self/cgroup).
fn own_cgroup() -> Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .context("no cgroup v2 line in /proc/self/cgroup")
}

fn scrape(addr: &str) -> Result<Scrape> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(PROMPT))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (_, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    Ok(Scrape::parse(body.lines().map(|l| Ok(l.to_string())))?)
}

fn decisions(sc: &Scrape, initiator: &str, outcome: &str) -> Result<f64> {
    let found: Vec<f64> = sc
        .samples
        .iter()
        .filter(|x| {
            x.metric == "vhost_plug_policy_decisions_total"
                && x.labels.get("cid") == Some("3")
                && x.labels.get("initiator") == Some(initiator)
                && x.labels.get("outcome") == Some(outcome)
        })
        .filter_map(|x| match x.value {
            Value::Counter(v) => Some(v),
            _ => None,
        })
        .collect();
    match found[..] {
        [v] => Ok(v),
        _ => bail!("{} samples for {initiator}/{outcome}", found.len()),
    }
}

/// The host program may connect to `port` (its CONNECT gets OK and bytes flow).
fn host_allowed(vm: &vhost_plug_tests::harness::TestVm, port: u32) -> Result<()> {
    let l = vm.guest.listen(port, SockType::Stream)?;
    let (mut h, _) = host_connect(&vm.spec.uds_path, port)
        .with_context(|| format!("host connect to guest port {port}"))?;
    let g = l.accept(PROMPT)?;
    h.write_all(b"id")?;
    ensure!(recv_exact(&g, 2)? == b"id");
    Ok(())
}

/// The host program's CONNECT to `port` is closed without OK (a guest listener is there).
fn host_denied(vm: &vhost_plug_tests::harness::TestVm, port: u32) -> Result<()> {
    let _l = vm.guest.listen(port, SockType::Stream)?;
    match host_connect(&vm.spec.uds_path, port) {
        Err(_) => Ok(()),
        Ok(_) => bail!("host connect to guest port {port} was allowed"),
    }
}

#[test]
fn host_peer_identity_decides() -> Result<()> {
    // SAFETY: no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let cgroup = own_cgroup()?;
    let rules = format!(
        "allow=uid={uid}:5000,uid={}:5001,gid={gid}:5002,cgroup={cgroup}:5003,cgroup={cgroup}/elsewhere:5004,*:5005",
        uid.wrapping_add(1)
    );
    let peers = format!("policy=builtin:peer-allowlist,config={rules}");
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3)],
        &[
            "--metrics",
            "127.0.0.1:0",
            "--plugin",
            &peers,
            // Built against WIT 0.1.0: it sees no identity and judges by port alone.
            "--plugin",
            "policy=builtin:port-allowlist-v1,config=allow=2:*,3:5000,3:5001,3:5002,3:5003,3:5004",
            "--plugin",
            "policy=builtin:audit",
            "--plugin",
            "serializer=builtin:serializer-json",
        ],
    )?;
    let metrics = s.daemon.metrics_addr(PROMPT)?;
    let mut vm = s.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;

    host_allowed(&vm, 5000).context("own uid")?;
    host_denied(&vm, 5001).context("another uid")?;
    host_allowed(&vm, 5002).context("own gid")?;
    host_allowed(&vm, 5003).context("own cgroup")?;
    host_denied(&vm, 5004).context("a cgroup below ours")?;
    // peer-allowlist allows anyone on 5005; the 0.1.0 plugin denies it.
    host_denied(&vm, 5005).context("denied by the WIT 0.1.0 plugin")?;

    // Three allowed, three denied (two by peer-allowlist, one by port-allowlist-v1).
    let deadline = Instant::now() + PROMPT;
    loop {
        let sc = scrape(&metrics)?;
        let got = (
            decisions(&sc, "host", "allow")?,
            decisions(&sc, "host", "deny")?,
            decisions(&sc, "host", "failure")?,
            decisions(&sc, "guest", "allow")?,
        );
        if got == (3.0, 3.0, 0.0, 0.0) {
            break;
        }
        ensure!(Instant::now() < deadline, "host decisions {got:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The audit trail names this process for the allowed connections that have closed.
    let pid = std::process::id();
    let deadline = Instant::now() + HOST_TIMEOUT;
    loop {
        let blob = snapshot(&mut vm, HOST_TIMEOUT)?;
        let ids = audit_identities(&blob)?;
        let ours = ids
            .iter()
            .filter(|i| **i == (pid, uid, gid, cgroup.clone()));
        if ours.count() >= 3 {
            ensure!(
                ids.iter().all(|i| *i == (pid, uid, gid, cgroup.clone())),
                "audit identities {ids:?}"
            );
            break;
        }
        ensure!(Instant::now() < deadline, "audit identities {ids:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// (pid, uid, gid, cgroup) of every closed connection the audit plugin recorded an identity
/// for (state schema 2).
fn audit_identities(blob: &[u8]) -> Result<Vec<(u32, u32, u32, String)>> {
    let states = json_plugin_states(blob)?;
    let st = states
        .iter()
        .find(|p| p.name == "audit")
        .context("no audit state")?;
    ensure!(st.schema == 2, "audit schema {}", st.schema);
    let mut r = StateReader::new(&st.data);
    for _ in 0..4 {
        r.u64()?;
    }
    let n = r.u32()?;
    let mut out = Vec::new();
    for _ in 0..n {
        let _ = (r.u64()?, r.u64()?, r.u32()?);
        let _ = (r.u64()?, r.u64()?, r.u64()?, r.u32()?);
        if r.u32()? == 1 {
            let (pid, uid, gid) = (r.u32()?, r.u32()?, r.u32()?);
            out.push((pid, uid, gid, String::from_utf8(r.bytes()?.to_vec())?));
        }
    }
    ensure!(r.is_empty(), "bytes left after the audit state");
    Ok(out)
}
