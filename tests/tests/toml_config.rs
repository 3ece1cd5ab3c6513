//! The daemon started from a TOML config file: a per-VM policy plugin (a `.wasm` file given by
//! a path relative to the config file, with a config string) applies to its VM only, and the
//! file's control socket serves `vhost-plug ctl`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vhost_plug_tests::harness::TestVm;
use vhost_plug_tests::host::{accept_timeout, host_listen, port_path, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::{ConnectError, DaemonKind, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(5);

/// The example policy plugin host/build.rs leaves in `<target>/wasm-plugins`.
fn deny_ports_wasm() -> Result<PathBuf> {
    let bin = DaemonKind::VhostPlug.binary()?;
    let target = bin
        .parent()
        .and_then(Path::parent)
        .context("target dir of the daemon binary")?;
    let p = target.join("wasm-plugins/wasm32-wasip2/release/deny_ports.wasm");
    ensure!(p.is_file(), "plugin {} not built", p.display());
    Ok(p)
}

/// The daemon process, killed on drop.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `vhost-plug --config FILE` and waits for `sockets` to appear.
fn start(config: &Path, sockets: &[&Path]) -> Result<Running> {
    let log = config.with_extension("stderr");
    let child = Command::new(DaemonKind::VhostPlug.binary()?)
        .arg("--config")
        .arg(config)
        .env("VHOST_PLUG_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let mut d = Running { child, log };
    let start = Instant::now();
    while !sockets.iter().all(|s| s.exists()) {
        if let Some(status) = d.child.try_wait()? {
            bail!("daemon exited ({status}): {}", d.stderr());
        }
        ensure!(
            start.elapsed() < HOST_TIMEOUT,
            "sockets did not appear: {}",
            d.stderr()
        );
        thread::sleep(Duration::from_millis(20));
    }
    Ok(d)
}

/// The guest connects to host port `port` (a listener is there) and sends a few bytes.
fn guest_reaches_host(vm: &TestVm, port: u32) -> Result<()> {
    let _ = std::fs::remove_file(port_path(&vm.spec.uds_path, port));
    let listener = host_listen(&vm.spec.uds_path, port)?;
    let sock = vm
        .guest
        .connect_timeout(HOST_CID, port, SockType::Stream, PROMPT)
        .map_err(|e| anyhow::anyhow!("cid {}: connect to port {port}: {e}", vm.spec.guest_cid))?;
    let mut host = accept_timeout(&listener, HOST_TIMEOUT)?;
    sock.send(b"ping")?;
    let mut b = [0u8; 4];
    std::io::Read::read_exact(&mut host, &mut b)?;
    ensure!(&b == b"ping", "bytes changed on the way");
    sock.close()?;
    Ok(())
}

/// The guest's connect to host port `port` (a listener is there) is refused with RST.
fn guest_refused(vm: &TestVm, port: u32) -> Result<()> {
    let _ = std::fs::remove_file(port_path(&vm.spec.uds_path, port));
    let _listener = host_listen(&vm.spec.uds_path, port)?;
    match vm
        .guest
        .connect_timeout(HOST_CID, port, SockType::Stream, PROMPT)
    {
        Err(ConnectError::Refused) => Ok(()),
        Err(e) => bail!(
            "cid {}: port {port}: expected RST, got {e}",
            vm.spec.guest_cid
        ),
        Ok(_) => bail!(
            "cid {}: port {port}: connect was allowed",
            vm.spec.guest_cid
        ),
    }
}

#[test]
fn per_vm_policy_plugin_from_the_toml_config() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("vhost-plug-toml")
        .tempdir()?;
    let specs = [VmSpec::new(dir.path(), 3), VmSpec::new(dir.path(), 4)];
    // The plugin next to the config file, named relative to it.
    std::fs::create_dir(dir.path().join("plugins"))?;
    std::fs::copy(deny_ports_wasm()?, dir.path().join("plugins/deny.wasm"))?;
    let control = dir.path().join("control.sock");
    let config = dir.path().join("vhost-plug.toml");
    std::fs::write(
        &config,
        format!(
            r#"control-socket = "control.sock"

[[vm]]
guest-cid = 3
socket = "{}"
uds-path = "{}"

[vm.plugins]
policy = [{{ path = "plugins/deny.wasm", name = "deny", config = "deny=2222,2223" }}]

[[vm]]
guest-cid = 4
socket = "{}"
uds-path = "{}"
"#,
            specs[0].socket.display(),
            specs[0].uds_path.display(),
            specs[1].socket.display(),
            specs[1].uds_path.display(),
        ),
    )?;
    let daemon = start(&config, &[&specs[0].socket, &specs[1].socket, &control])?;
    let boot = |spec: &VmSpec| {
        TestVm::boot(spec.clone(), Default::default(), Default::default())
            .with_context(|| daemon.stderr())
    };
    let (a, b) = (boot(&specs[0])?, boot(&specs[1])?);

    // CID 3 runs the plugin: its listed ports are refused, others pass.
    guest_refused(&a, 2222)?;
    guest_refused(&a, 2223)?;
    guest_reaches_host(&a, 2224)?;
    // CID 4 has the daemon's plugins (the built-in default policy): the same port passes.
    guest_reaches_host(&b, 2222)?;
    guest_reaches_host(&b, 2223)?;

    // The plugin logged its refusals through the daemon's logger.
    let log = daemon.stderr();
    ensure!(
        log.contains("port 2222 is closed") || log.contains("port 2222 refused"),
        "{log}"
    );

    // The control socket from the file answers, and shows which VM has which plugins.
    let out = Command::new(DaemonKind::VhostPlug.binary()?)
        .args(["ctl", "--socket"])
        .arg(&control)
        .arg("status")
        .output()?;
    ensure!(out.status.success(), "ctl status: {out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let plugins_of = |cid: u64| -> Vec<String> {
        status["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["cid"] == cid)
            .flat_map(|v| v["plugins"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p.as_str().map(String::from))
            .collect()
    };
    eprintln!(
        "[toml] cid 3 plugins {:?}, cid 4 plugins {:?}",
        plugins_of(3),
        plugins_of(4)
    );
    ensure!(plugins_of(3).contains(&"deny".to_string()), "{status}");
    ensure!(!plugins_of(4).contains(&"deny".to_string()), "{status}");
    ensure!(!plugins_of(4).is_empty(), "{status}");
    Ok(())
}

#[test]
fn a_bad_toml_config_names_file_field_and_line() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("vhost-plug-toml")
        .tempdir()?;
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[[vm]]\nsocket = \"/tmp/a\"\nuds-path = \"/tmp/b\"\n\n[vm.plugins]\n\
         policy = [{ path = \"missing.wasm\" }]\n",
    )?;
    let out = Command::new(DaemonKind::VhostPlug.binary()?)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2),
        "exit {:?}: {stderr}",
        out.status
    );
    let want = format!(
        "{}:6:20: vm[0].plugins.policy[0].path: plugin file ",
        config.display()
    );
    ensure!(stderr.contains(&want), "expected `{want}` in: {stderr}");
    Ok(())
}
