//! Plugins end to end: the daemon with policy and bridge plugins, driven by the simulated
//! VMM. Hostile plugins must fail closed (RST for that connection) while the daemon and other
//! VMs keep serving.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vhost_plug_tests::data::Pattern;
use vhost_plug_tests::harness::{echo, exchange, Setup, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_connect, host_listen, port_path, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::state::{json_plugin_states, snapshot, state_cfg, StateReader};
use vhost_plug_tests::{ConnectError, DaemonKind, DriverConfig, QueueSet, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(5);

/// Where host/build.rs leaves the plugin components: `<target>/wasm-plugins/...`.
fn wasm(name: &str) -> Result<String> {
    let bin = DaemonKind::VhostPlug.binary()?;
    let target = bin
        .parent()
        .and_then(|p| p.parent())
        .context("target dir of the daemon binary")?;
    let p: PathBuf = target.join(format!("wasm-plugins/wasm32-wasip2/release/{name}.wasm"));
    ensure!(p.is_file(), "plugin {} not built", p.display());
    Ok(p.display().to_string())
}

fn setup(cids: &[u64], args: &[&str]) -> Result<Setup> {
    Setup::with(
        DaemonKind::VhostPlug,
        |dir| cids.iter().map(|c| VmSpec::new(dir, *c)).collect(),
        args,
    )
}

/// The guest connects to host port `port` (a listener is there) and exchanges some bytes.
fn listen(vm: &TestVm, port: u32) -> Result<std::os::unix::net::UnixListener> {
    // A listener of an earlier step may have left its socket file behind.
    let _ = std::fs::remove_file(port_path(&vm.spec.uds_path, port));
    host_listen(&vm.spec.uds_path, port)
}

fn guest_reaches_host(vm: &TestVm, port: u32) -> Result<()> {
    let listener = listen(vm, port)?;
    let sock = vm
        .guest
        .connect_timeout(HOST_CID, port, SockType::Stream, PROMPT)
        .map_err(|e| anyhow::anyhow!("connect to port {port}: {e}"))?;
    let mut host = accept_timeout(&listener, HOST_TIMEOUT)?;
    sock.send(b"ping")?;
    let mut b = [0u8; 4];
    host.read_exact(&mut b)?;
    ensure!(&b == b"ping", "bytes changed on the way");
    sock.close()?;
    Ok(())
}

/// The guest's connect to host port `port` (with a listener present) is refused with RST.
fn guest_refused(vm: &TestVm, port: u32) -> Result<()> {
    let _listener = listen(vm, port)?;
    match vm
        .guest
        .connect_timeout(HOST_CID, port, SockType::Stream, PROMPT)
    {
        Err(ConnectError::Refused) => Ok(()),
        Err(e) => bail!("port {port}: expected RST, got {e}"),
        Ok(_) => bail!("port {port}: connect was allowed"),
    }
}

#[test]
fn port_allowlist_allows_and_denies() -> Result<()> {
    let s = setup(
        &[3],
        &[
            "--plugin",
            "policy=builtin:port-allowlist,config=allow=2:1234,3:5000",
        ],
    )?;
    let vm = s.boot(0)?;
    guest_reaches_host(&vm, 1234)?;
    guest_refused(&vm, 1235)?;

    // Host to guest: the destination is the guest's (cid 3) port.
    let allowed = vm.guest.listen(5000, SockType::Stream)?;
    let (mut h, _) = host_connect(&vm.spec.uds_path, 5000)?;
    let g = allowed.accept(PROMPT)?;
    h.write_all(b"hi")?;
    let mut b = [0u8; 2];
    (&g).read_exact(&mut b)?;
    ensure!(&b == b"hi");
    let _other = vm.guest.listen(5001, SockType::Stream)?;
    ensure!(
        host_connect(&vm.spec.uds_path, 5001).is_err(),
        "host connect to a denied guest port got OK"
    );
    Ok(())
}

/// One closed connection in the audit plugin's state (schema 2).
#[derive(Debug)]
struct AuditRecord {
    dst_port: u32,
    to_guest: u64,
    from_guest: u64,
    reset: bool,
}

/// (connections, resets, bytes to guest, bytes from guest, last records) from the `audit`
/// plugin's state in a serializer-json blob.
fn audit_state(blob: &[u8]) -> Result<(u64, u64, u64, u64, Vec<AuditRecord>)> {
    let states = json_plugin_states(blob)?;
    let st = states
        .iter()
        .find(|p| p.name == "audit")
        .with_context(|| format!("no audit state among {states:?}"))?;
    ensure!(st.schema == 2, "audit state schema {}", st.schema);
    let mut r = StateReader::new(&st.data);
    let totals = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
    let n = r.u32()?;
    let mut last = Vec::new();
    for _ in 0..n {
        let (_id, _dst_cid, dst_port) = (r.u64()?, r.u64()?, r.u32()?);
        let (to_guest, from_guest, _ms, reset) = (r.u64()?, r.u64()?, r.u64()?, r.u32()?);
        // Guest-initiated connections carry no host-program identity.
        ensure!(r.u32()? == 0, "a guest connection with a host identity");
        last.push(AuditRecord {
            dst_port,
            to_guest,
            from_guest,
            reset: reset != 0,
        });
    }
    ensure!(r.is_empty(), "bytes left after the audit state");
    Ok((totals.0, totals.1, totals.2, totals.3, last))
}

#[test]
fn audit_records_every_closed_connection() -> Result<()> {
    let s = setup(
        &[3],
        &[
            "--plugin",
            "policy=builtin:audit",
            "--plugin",
            "serializer=builtin:serializer-json",
        ],
    )?;
    let mut vm = s.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
    // Three connections with known byte counts each way, closed cleanly by the guest.
    for i in 0..3u32 {
        let port = 9100 + i;
        let listener = listen(&vm, port)?;
        let sock = vm
            .guest
            .connect_timeout(HOST_CID, port, SockType::Stream, PROMPT)
            .map_err(|e| anyhow::anyhow!("connect to port {port}: {e}"))?;
        let mut host = accept_timeout(&listener, HOST_TIMEOUT)?;
        let up = vec![7u8; 1000 * (i as usize + 1)];
        sock.send(&up)?;
        let mut got = vec![0u8; up.len()];
        host.read_exact(&mut got)?;
        ensure!(got == up, "bytes changed on the way");
        host.write_all(&vec![9u8; 10 * (i as usize + 1)])?;
        let mut back = vec![0u8; 10 * (i as usize + 1)];
        (&sock).read_exact(&mut back)?;
        sock.close()?;
        drop(host);
    }
    // A fourth to a port without a listener ends in RST.
    match vm
        .guest
        .connect_timeout(HOST_CID, 9199, SockType::Stream, PROMPT)
    {
        Err(ConnectError::Refused) => {}
        other => bail!("connect to a port without a listener: {:?}", other.err()),
    }
    // on-close runs when the daemon forgets a connection, which may trail the guest's close.
    let deadline = Instant::now() + HOST_TIMEOUT;
    let (conns, resets, to_guest, from_guest, last) = loop {
        let a = audit_state(&snapshot(&mut vm, HOST_TIMEOUT)?)?;
        if a.0 >= 4 || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(
        conns == 4,
        "audit counted {conns} closed connections, expected 4: {last:?}"
    );
    ensure!(resets == 1, "audit counted {resets} resets, expected 1");
    ensure!(
        (to_guest, from_guest) == (60, 6000),
        "audit byte totals to/from guest {to_guest}/{from_guest}, expected 60/6000"
    );
    let mut summary: Vec<_> = last
        .iter()
        .map(|r| (r.dst_port, r.to_guest, r.from_guest, r.reset))
        .collect();
    // Closes may complete in any order.
    summary.sort_unstable();
    ensure!(
        summary
            == [
                (9100, 10, 1000, false),
                (9101, 20, 2000, false),
                (9102, 30, 3000, false),
                (9199, 0, 0, true)
            ],
        "audit trail {last:?}"
    );
    Ok(())
}

#[test]
fn port_allowlist_v2_rate_limits_per_vm() -> Result<()> {
    let s = setup(
        &[3],
        &[
            "--plugin",
            "policy=builtin:port-allowlist,config=allow=*:*;rate=1;burst=3",
        ],
    )?;
    let vm = s.boot(0)?;
    for _ in 0..3 {
        guest_reaches_host(&vm, 1234)?;
    }
    // At most one token comes back per second; three quick tries cannot all pass.
    let refused = (0..3).filter(|_| guest_refused(&vm, 1234).is_ok()).count();
    ensure!(
        refused >= 2,
        "only {refused} of 3 connects over the burst were refused"
    );
    Ok(())
}

fn tcp_echo_server() -> Result<(TcpListener, u16)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

#[test]
fn tcp_bridge_routes_guest_ports_to_tcp() -> Result<()> {
    let (listener, tport) = tcp_echo_server()?;
    let server = thread::spawn(move || -> Result<u64> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(HOST_TIMEOUT))?;
        Ok(echo(&mut s)?)
    });
    let map = format!("bridge=builtin:tcp-bridge,config=map=7000=127.0.0.1:{tport}");
    let allow = format!("tcp:127.0.0.1:{tport}");
    let s = setup(&[3], &["--plugin", &map, "--allow-route", &allow])?;
    let vm = s.boot(0)?;
    let sock = vm
        .guest
        .connect_timeout(HOST_CID, 7000, SockType::Stream, PROMPT)
        .map_err(|e| anyhow::anyhow!("bridged connect: {e}"))?;
    let data = Pattern::bytes(7, 1 << 20);
    let back = exchange(&sock, &data)?;
    ensure!(back == data, "bytes through the TCP bridge changed");
    sock.shutdown(false, true)?;
    let echoed = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    ensure!(echoed == data.len() as u64);
    // No mapping for 7001: the bridge refuses it.
    match vm
        .guest
        .connect_timeout(HOST_CID, 7001, SockType::Stream, PROMPT)
    {
        Err(ConnectError::Refused) => Ok(()),
        other => bail!("unmapped port: expected RST, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn bridge_route_outside_the_allowlist_is_refused() -> Result<()> {
    let (_listener, tport) = tcp_echo_server()?;
    let map = format!("bridge=builtin:tcp-bridge,config=map=7000=127.0.0.1:{tport}");
    // No --allow-route: the host refuses what the plugin chose.
    let s = setup(&[3], &["--plugin", &map])?;
    let vm = s.boot(0)?;
    guest_refused(&vm, 7000)?;
    ensure!(s.daemon.stderr().contains("not allowed") || s.daemon.stderr().contains("allow"));
    Ok(())
}

/// A hostile plugin misbehaves for port 666 only: that connection is refused, the next one
/// on the same VM and connections of another VM are served.
fn hostile(name: &str) -> Result<()> {
    let plugin = format!("policy={}", wasm(name)?);
    let s = setup(&[3, 4], &["--plugin", &plugin])?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    guest_refused(&a, 666)?;
    guest_reaches_host(&a, 1234)?;
    guest_reaches_host(&b, 1234)?;
    guest_refused(&b, 666)?;
    guest_reaches_host(&b, 1235)?;
    Ok(())
}

#[test]
fn hostile_endless_loop_fails_closed() -> Result<()> {
    hostile("hostile_loop")
}

/// A plugin that sleeps 30 s in WASI (`poll` on a clock) is refused while the guest still
/// waits for its answer, not after the sleep.
#[test]
fn hostile_sleep_fails_closed() -> Result<()> {
    hostile("hostile_sleep")
}

#[test]
fn hostile_trap_fails_closed() -> Result<()> {
    hostile("hostile_trap")
}

#[test]
fn hostile_huge_allocation_fails_closed() -> Result<()> {
    hostile("hostile_alloc")
}

#[test]
fn hostile_huge_deny_string_fails_closed() -> Result<()> {
    hostile("hostile_huge_deny")
}

#[test]
fn hostile_redirect_outside_allowlist_fails_closed() -> Result<()> {
    hostile("hostile_bad_redirect")
}

#[test]
fn plugins_get_no_filesystem_network_or_environment() -> Result<()> {
    // A TCP service on the host the plugin tries to reach.
    let (listener, port) = tcp_echo_server()?;
    listener.set_nonblocking(true)?;
    let plugin = format!("policy={},config={port}", wasm("hostile_escape")?);
    let s = setup(&[3], &["--plugin", &plugin])?;
    let vm = s.boot(0)?;
    guest_refused(&vm, 666)?;
    let log = s.daemon.stderr();
    ensure!(
        log.contains("sandbox held") && !log.contains("sandbox escaped"),
        "the plugin got out of its sandbox or did not say: {log}"
    );
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => bail!("the plugin reached a host TCP service: {other:?}"),
    }
    guest_reaches_host(&vm, 1234)?;
    Ok(())
}

#[test]
fn repeated_failures_quarantine_the_plugin_of_that_vm_only() -> Result<()> {
    let plugin = format!("policy={}", wasm("hostile_trap")?);
    let s = setup(&[3, 4], &["--plugin", &plugin])?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    for _ in 0..5 {
        guest_refused(&a, 666)?;
    }
    // Quarantined: every decision is deny until the plugin is replaced.
    guest_refused(&a, 1234)?;
    ensure!(s.daemon.stderr().contains("quarantine"));
    guest_reaches_host(&b, 1234)?;
    Ok(())
}

#[test]
fn wrong_world_plugin_is_refused_at_start() -> Result<()> {
    let plugin = format!("policy={}", wasm("hostile_wrong_world")?);
    match setup(&[3], &["--plugin", &plugin]) {
        Ok(_) => bail!("daemon started with a plugin of the wrong world"),
        Err(e) => {
            let msg = format!("{e:#}");
            ensure!(
                msg.contains("on-close"),
                "error does not say what is missing: {msg}"
            );
            Ok(())
        }
    }
}

#[test]
fn policy_plugin_without_stateful_is_refused_at_start() -> Result<()> {
    let plugin = format!("policy={}", wasm("hostile_no_stateful")?);
    match setup(&[3], &["--plugin", &plugin]) {
        Ok(_) => bail!("daemon started with a policy plugin that exports no `stateful`"),
        Err(e) => {
            let msg = format!("{e:#}");
            ensure!(
                msg.contains("missing export `vhost-plug:plugin/stateful@0.1.0`"),
                "error does not name the missing export: {msg}"
            );
            Ok(())
        }
    }
}

#[test]
fn precompiled_plugin_cache_is_written_and_reused() -> Result<()> {
    let cache = tempfile::tempdir()?;
    let dir = cache.path().join("cwasm");
    let dir_s = dir.display().to_string();
    let args = [
        "--plugin-cache",
        dir_s.as_str(),
        "--plugin",
        "policy=builtin:port-allowlist,config=allow=2:1234",
    ];
    for round in 0..2 {
        let s = setup(&[3], &args)?;
        let vm = s.boot(0)?;
        guest_reaches_host(&vm, 1234)?;
        guest_refused(&vm, 1235)?;
        let n = std::fs::read_dir(&dir)?.count();
        // The policy and the default serializer.
        ensure!(n == 2, "round {round}: {n} cached artifacts");
    }
    Ok(())
}

#[test]
fn per_vm_plugins_from_the_yaml_config() -> Result<()> {
    // Two VMs from one YAML file: CID 3 with its own allowlist, CID 4 with the global default.
    let dir = tempfile::tempdir()?;
    let specs = [VmSpec::new(dir.path(), 3), VmSpec::new(dir.path(), 4)];
    let yaml = dir.path().join("vms.yaml");
    std::fs::write(
        &yaml,
        format!(
            "vms:
  - guest_cid: 3
    socket: {}
    uds_path: {}
    plugins: ['policy=builtin:port-allowlist,config=allow=2:1234']
  - guest_cid: 4
    socket: {}
    uds_path: {}
",
            specs[0].socket.display(),
            specs[0].uds_path.display(),
            specs[1].socket.display(),
            specs[1].uds_path.display()
        ),
    )?;
    // Daemon::spawn builds --vm arguments; a --config daemon is started by hand.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let log = dir.path().join("daemon.stderr");
    let mut daemon = Kill(
        std::process::Command::new(DaemonKind::VhostPlug.binary()?)
            .arg("--config")
            .arg(&yaml)
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();
    let wait = std::time::Instant::now();
    while !(specs[0].socket.exists() && specs[1].socket.exists()) {
        ensure!(
            daemon.0.try_wait()?.is_none(),
            "daemon exited: {}",
            stderr()
        );
        ensure!(wait.elapsed() < HOST_TIMEOUT, "sockets did not appear");
        thread::sleep(Duration::from_millis(20));
    }
    let boot = |spec: &VmSpec| {
        TestVm::boot(spec.clone(), Default::default(), Default::default()).with_context(stderr)
    };
    let a = boot(&specs[0])?;
    let b = boot(&specs[1])?;
    guest_reaches_host(&a, 1234)?;
    guest_refused(&a, 1235)?;
    guest_reaches_host(&b, 1235)?;
    Ok(())
}
