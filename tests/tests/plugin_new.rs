//! `vhost-plug plugin new`: the scaffolded crates build on their own (outside the repository),
//! `vhost-plug plugin check` accepts them, and the policy template's verdicts hold in the
//! daemon.
//!
//! The builds share `<target>/wasm-plugins` with host/build.rs, so the SDK's dependencies
//! (wit-bindgen) are compiled once; each scaffold then builds in seconds.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vhost_plug_tests::harness::Setup;
use vhost_plug_tests::host::{accept_timeout, host_listen, port_path, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::{ConnectError, DaemonKind, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(5);

fn vhost_plug(args: &[&str]) -> Result<Output> {
    Ok(Command::new(DaemonKind::VhostPlug.binary()?)
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

fn target_dir() -> Result<PathBuf> {
    let bin = DaemonKind::VhostPlug.binary()?;
    Ok(bin
        .parent()
        .and_then(Path::parent)
        .context("target dir of the daemon binary")?
        .join("wasm-plugins"))
}

/// Scaffolds `name` for `world` in `dir`, builds it as a user would and returns the `.wasm`.
fn scaffold_and_build(dir: &Path, name: &str, world: &str) -> Result<PathBuf> {
    let d = dir.to_str().context("utf-8 temp dir")?;
    let out = vhost_plug(&["plugin", "new", name, "--world", world, "--dir", d])?;
    ensure!(out.status.success(), "plugin new: {out:?}");
    let root = dir.join(name);
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains(&root.display().to_string()),
        "plugin new does not say where: {out:?}"
    );
    let target = target_dir()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null());
    // As host/build.rs does: host-build settings stay out of the wasm build (and then its
    // artifacts are reused).
    for var in [
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        build.env_remove(var);
    }
    let t = Instant::now();
    let build = build.output()?;
    ensure!(
        build.status.success(),
        "cargo build of the {world} scaffold failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    eprintln!("[plugin-new] {world} scaffold built in {:?}", t.elapsed());
    let wasm = target
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    ensure!(wasm.is_file(), "{} not built", wasm.display());

    let check = vhost_plug(&["plugin", "check", wasm.to_str().context("utf-8 path")?])?;
    let stdout = String::from_utf8_lossy(&check.stdout);
    ensure!(check.status.success(), "plugin check refused it: {check:?}");
    ensure!(
        stdout.contains(&format!(
            "{world} plugin (world vhost-plug:plugin/{world}-plugin@"
        )),
        "plugin check says: {stdout}"
    );
    Ok(wasm)
}

#[test]
fn scaffolded_plugins_build_check_and_run() -> Result<()> {
    // Outside the repository, as a user's own directory would be.
    let dir = tempfile::Builder::new()
        .prefix("vhost-plug-new")
        .tempdir()?;
    let policy = scaffold_and_build(dir.path(), "scaffold-test-policy", "policy")?;
    let bridge = scaffold_and_build(dir.path(), "scaffold-test-bridge", "bridge")?;
    let serializer = scaffold_and_build(dir.path(), "scaffold-test-serializer", "serializer")?;

    // A second `plugin new` with the same name refuses to overwrite.
    let again = vhost_plug(&[
        "plugin",
        "new",
        "scaffold-test-policy",
        "--dir",
        dir.path().to_str().context("utf-8")?,
    ])?;
    ensure!(!again.status.success(), "overwrote an existing crate");
    ensure!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // The daemon runs all three: the policy refuses port 2222, the bridge sends port 7000 to
    // a unix socket of its map (allowed by --allow-route), the serializer loads.
    let policy = format!("policy={},config=deny=2222", policy.display());
    let svc_dir = tempfile::Builder::new()
        .prefix("vhost-plug-svc")
        .tempdir()?;
    let svc = svc_dir.path().join("svc.sock");
    let bridge = format!(
        "bridge={},config=map=7000=unix:{}",
        bridge.display(),
        svc.display()
    );
    let serializer = format!("serializer={}", serializer.display());
    let allow = format!("unix:{}", svc_dir.path().display());
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3)],
        &[
            "--plugin",
            &policy,
            "--plugin",
            &bridge,
            "--plugin",
            &serializer,
            "--allow-route",
            &allow,
        ],
    )?;
    let vm = s.boot(0)?;

    let _ = std::fs::remove_file(port_path(&vm.spec.uds_path, 2222));
    let _l = host_listen(&vm.spec.uds_path, 2222)?;
    match vm
        .guest
        .connect_timeout(HOST_CID, 2222, SockType::Stream, PROMPT)
    {
        Err(ConnectError::Refused) => {}
        Err(e) => bail!("port 2222: expected RST, got {e}"),
        Ok(_) => bail!("port 2222: the scaffolded policy allowed it"),
    }
    let stderr = s.daemon.stderr();
    ensure!(stderr.contains("port 2222 refused (1 so far)"), "{stderr}");

    let listener = std::os::unix::net::UnixListener::bind(&svc)?;
    let sock = vm
        .guest
        .connect_timeout(HOST_CID, 7000, SockType::Stream, PROMPT)
        .map_err(|e| anyhow::anyhow!("port 7000 through the bridge: {e}"))?;
    let mut host = accept_timeout(&listener, HOST_TIMEOUT)?;
    sock.send(b"bridged")?;
    let mut b = [0u8; 7];
    host.read_exact(&mut b)?;
    ensure!(&b == b"bridged", "bytes changed on the way");
    sock.close()?;
    Ok(())
}
