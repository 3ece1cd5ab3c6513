//! The control socket and in-place plugin swap, end to end through `vhost-plug ctl`.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;

use anyhow::{bail, ensure, Context, Result};
use vhost_plug_tests::harness::{ctl, Setup, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_listen, port_path, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::{ConnectError, DaemonKind, GuestSocket, SockType, VmSpec};

fn connect(
    vm: &TestVm,
    port: u32,
) -> Result<Option<(GuestSocket, std::os::unix::net::UnixStream)>> {
    let _ = std::fs::remove_file(port_path(&vm.spec.uds_path, port));
    let l = host_listen(&vm.spec.uds_path, port)?;
    match vm
        .guest
        .connect_timeout(HOST_CID, port, SockType::Stream, HOST_TIMEOUT)
    {
        Ok(g) => Ok(Some((g, accept_timeout(&l, HOST_TIMEOUT)?))),
        Err(ConnectError::Refused) => Ok(None),
        Err(e) => bail!("port {port}: {e}"),
    }
}

#[test]
fn status_plugins_and_in_place_swap() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("ctl.sock");
    let sock_s = sock.display().to_string();
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3)],
        &[
            "--control-socket",
            &sock_s,
            "--plugin",
            "policy=builtin:port-allowlist-v1,name=acl,config=allow=2:1234",
        ],
    )?;
    let mode = std::fs::metadata(&sock)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "control socket mode {mode:o}");
    let vm = s.boot(0)?;

    let (g, mut h) = connect(&vm, 1234)?.context("1234 must be allowed")?;
    ensure!(connect(&vm, 1235)?.is_none(), "1235 must be denied by v1");

    let (ok, st) = ctl(&sock, &["status"])?;
    ensure!(ok, "status failed: {st}");
    let vm0 = &st["vms"][0];
    ensure!(vm0["cid"] == 3 && vm0["frontend"] == true, "status: {st}");
    ensure!(vm0["connections"].as_u64() == Some(1), "status: {st}");
    ensure!(vm0["plugins"][0] == "acl", "status: {st}");

    let (ok, pl) = ctl(&sock, &["plugins"])?;
    ensure!(ok, "plugins failed: {pl}");
    let p = &pl["plugins"][0];
    ensure!(
        p["calls"].as_u64() >= Some(2) && p["denials"].as_u64() == Some(1),
        "{pl}"
    );

    // v1 -> v2 in place; the open connection keeps working, the new rules apply.
    let (ok, sw) = ctl(
        &sock,
        &[
            "swap",
            "policy=builtin:port-allowlist,name=acl,config=allow=2:1234,2:1235",
        ],
    )?;
    ensure!(ok, "swap v1 -> v2 failed: {sw}");
    let pause = sw["swapped"][0]["pause_us"].as_u64().context("pause")?;
    eprintln!("[control] swap pause {pause} us");
    g.send(b"after-swap")?;
    let mut b = [0u8; 10];
    h.read_exact(&mut b)?;
    ensure!(&b == b"after-swap");
    ensure!(connect(&vm, 1235)?.is_some(), "1235 must be allowed by v2");

    // v2 state cannot go back into v1: refused, v2 stays.
    let (ok, back) = ctl(
        &sock,
        &[
            "swap",
            "policy=builtin:port-allowlist-v1,name=acl,config=allow=2:1234",
        ],
    )?;
    ensure!(!ok, "v2 -> v1 swap must be refused: {back}");
    ensure!(
        back["error"].as_str().unwrap_or("").contains("schema"),
        "error does not name the schema: {back}"
    );
    ensure!(connect(&vm, 1235)?.is_some(), "v2 must still be in place");

    let (ok, bad) = ctl(&sock, &["swap", "policy=/nonexistent.wasm"])?;
    ensure!(!ok && bad["error"].is_string(), "{bad}");
    Ok(())
}
