//! `--landlock`: the daemon sandboxes itself (host/src/sandbox.rs) and still does its whole
//! job: echoes both ways, a second frontend session, plugin cache writes, the metrics
//! endpoint on loopback TCP, a TCP bridge route, `ctl save` into a `--landlock-rw`
//! directory, and removing its sockets on SIGTERM. Writing anywhere else is refused by the
//! kernel and the daemon keeps serving. On a kernel without Landlock the daemon must refuse
//! to start, saying why.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test sandbox -- --nocapture`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use vhost_plug_tests::checks::serves;
use vhost_plug_tests::data::Pattern;
use vhost_plug_tests::harness::{ctl, echo, exchange, landlock_abi, Setup};
use vhost_plug_tests::host::HOST_TIMEOUT;
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::{DaemonKind, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(10);

/// A sandboxed daemon and the directory of the paths its arguments name (dropped after it).
struct Sandboxed {
    s: Setup,
    _paths: tempfile::TempDir,
}

/// Starts a sandboxed daemon for VM 3, or checks that it refuses to start without Landlock
/// (then returns `None`).
fn sandboxed(dir_args: impl FnOnce(&Path) -> Vec<String>) -> Result<Option<Sandboxed>> {
    let tmp = tempfile::tempdir()?;
    let args = dir_args(tmp.path());
    let mut all: Vec<&str> = vec!["--landlock"];
    all.extend(args.iter().map(String::as_str));
    let r = Setup::with(DaemonKind::VhostPlug, |d| vec![VmSpec::new(d, 3)], &all);
    if landlock_abi() == 0 {
        let Err(e) = r else {
            bail!("the daemon started with --landlock on a kernel without Landlock");
        };
        let msg = format!("{e:#}");
        ensure!(
            msg.contains("does not support Landlock"),
            "no clear refusal: {msg}"
        );
        eprintln!("[sandbox] no Landlock in this kernel: the daemon refused to start, as it must");
        return Ok(None);
    }
    Ok(Some(Sandboxed { s: r?, _paths: tmp }))
}

#[test]
fn sandboxed_daemon_serves_and_writes_only_where_allowed() -> Result<()> {
    let mut paths = None;
    let Some(mut sb) = sandboxed(|d| {
        let state = d.join("state");
        let other = d.join("other");
        std::fs::create_dir(&state).ok();
        std::fs::create_dir(&other).ok();
        let ctl_sock = d.join("ctl.sock");
        let cache = d.join("cache");
        paths = Some((
            state.clone(),
            other.clone(),
            ctl_sock.clone(),
            cache.clone(),
        ));
        vec![
            "--landlock-rw".into(),
            state.display().to_string(),
            "--control-socket".into(),
            ctl_sock.display().to_string(),
            "--plugin-cache".into(),
            cache.display().to_string(),
            "--metrics".into(),
            "127.0.0.1:0".into(),
        ]
    })?
    else {
        return Ok(());
    };
    let (state, other, ctl_sock, cache) = paths.context("paths")?;
    let s = &mut sb.s;
    let log = s.daemon.stderr();
    ensure!(
        log.contains("landlock sandbox fully enforced") || log.contains("partially enforced"),
        "no sandbox line:\n{log}"
    );

    // Compiled plugins were written to the cache after the sandbox was entered.
    let cached = std::fs::read_dir(&cache)?.count();
    ensure!(cached >= 2, "plugin cache holds {cached} files");

    let vm = s.boot(0)?;
    serves(&vm, 5000, "sandboxed daemon")?;

    // The metrics endpoint was bound inside the sandbox (the --metrics port rule).
    let addr = s.daemon.metrics_addr(PROMPT)?;
    let mut m = TcpStream::connect(&addr)?;
    m.set_read_timeout(Some(PROMPT))?;
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    m.read_to_string(&mut resp)?;
    ensure!(resp.starts_with("HTTP/1.1 200 OK"), "metrics: {resp:.200}");
    ensure!(
        resp.contains("vhost_plug_"),
        "metrics body without our metrics"
    );

    // ctl save: allowed under --landlock-rw, refused by the kernel elsewhere.
    let ok_file = state.join("vm3.state");
    let (ok, v) = ctl(&ctl_sock, &["save", &ok_file.display().to_string()])?;
    ensure!(
        ok && ok_file.exists(),
        "save into --landlock-rw failed: {v}"
    );
    let bad_file = other.join("vm3.state");
    let (ok, v) = ctl(&ctl_sock, &["save", &bad_file.display().to_string()])?;
    ensure!(!ok, "save outside --landlock-rw succeeded: {v}");
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(err.contains("Permission denied"), "unclear refusal: {v}");
    ensure!(!bad_file.exists(), "a file was left outside --landlock-rw");
    let leftovers = std::fs::read_dir(&other)?.count();
    ensure!(
        leftovers == 0,
        "{leftovers} files left in the refused directory"
    );
    eprintln!("[sandbox] ctl save: allowed dir ok; other dir refused: {err}");

    // A new frontend session on the same vhost-user socket.
    drop(vm);
    let vm = s.boot(0)?;
    serves(&vm, 5100, "a second frontend session in the sandbox")?;
    drop(vm);

    // SIGTERM: a clean exit that removes its sockets (socket-directory rule).
    let spec = s.vms[0].clone();
    s.daemon.signal(libc::SIGTERM)?;
    let status = s.daemon.wait_exit(PROMPT)?;
    ensure!(status.success(), "exit status {status}");
    for p in [&spec.socket, &spec.uds_path, &ctl_sock] {
        ensure!(!p.exists(), "{} left behind", p.display());
    }
    Ok(())
}

#[test]
fn sandboxed_daemon_bridges_to_an_allowed_tcp_route() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let server = std::thread::spawn(move || -> Result<u64> {
        let (mut c, _) = listener.accept()?;
        c.set_read_timeout(Some(HOST_TIMEOUT))?;
        Ok(echo(&mut c)?)
    });
    let Some(sb) = sandboxed(|_| {
        vec![
            "--plugin".into(),
            format!("bridge=builtin:tcp-bridge,config=map=7000=127.0.0.1:{port}"),
            "--allow-route".into(),
            format!("tcp:127.0.0.1:{port}"),
        ]
    })?
    else {
        return Ok(());
    };
    let vm = sb.s.boot(0)?;
    let g = vm
        .guest
        .connect_timeout(HOST_CID, 7000, SockType::Stream, PROMPT)
        .map_err(|e| anyhow::anyhow!("bridged connect in the sandbox: {e}"))?;
    let data = Pattern::bytes(11, 1 << 20);
    let back = exchange(&g, &data)?;
    ensure!(back == data, "bytes through the TCP bridge changed");
    g.shutdown(false, true)?;
    let echoed = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    ensure!(echoed == data.len() as u64, "server echoed {echoed}");
    eprintln!("[sandbox] 1 MiB through the TCP bridge to the allowed port {port}");
    Ok(())
}
