//! Many VMs in one daemon: 1,000 VMs from a TOML config start and serve (50 of them, chosen
//! at random, each take a simulated VMM and echo data), and a VM whose plugin cannot start
//! refuses its own VMM while the others serve.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vhost_plug_tests::data::Pattern;
use vhost_plug_tests::harness::{echo_stream, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_listen, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::{DaemonKind, SockType, VmSpec};

/// Generous: 1,000 VMs start in well under a second on an idle machine, but CI machines
/// are shared.
const STARTUP: Duration = Duration::from_secs(60);

/// The daemon process, killed on drop.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `vhost-plug --config FILE` and waits for every VM's vhost-user socket.
fn start(config: &Path, vms: &[VmSpec]) -> Result<Running> {
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
    let t0 = Instant::now();
    let mut ready = 0;
    while ready < vms.len() {
        if vms[ready].socket.exists() {
            ready += 1;
            continue;
        }
        if let Some(status) = d.child.try_wait()? {
            bail!("daemon exited ({status}): {}", d.stderr());
        }
        ensure!(
            t0.elapsed() < STARTUP,
            "{ready} of {} sockets after {STARTUP:?}: {}",
            vms.len(),
            d.stderr()
        );
        thread::sleep(Duration::from_millis(5));
    }
    eprintln!("[density] {} VMs ready after {:?}", vms.len(), t0.elapsed());
    Ok(d)
}

/// A `[[vm]]` table; `extra` is appended inside it.
fn vm_table(spec: &VmSpec, extra: &str) -> String {
    format!(
        "[[vm]]\nguest-cid = {}\nsocket = \"{}\"\nuds-path = \"{}\"\n{extra}\n",
        spec.guest_cid,
        spec.socket.display(),
        spec.uds_path.display()
    )
}

/// The guest connects to a host program that echoes, sends `len` bytes of a pattern and
/// reads them back unchanged.
fn guest_echo(vm: &TestVm, port: u32, len: usize) -> Result<()> {
    let cid = vm.spec.guest_cid;
    let listener = host_listen(&vm.spec.uds_path, port)?;
    let echo = thread::spawn(move || -> Result<u64> {
        let s = accept_timeout(&listener, HOST_TIMEOUT)?;
        Ok(echo_stream(s)?)
    });
    let sock = vm
        .guest
        .connect_timeout(HOST_CID, port, SockType::Stream, HOST_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("cid {cid}: connect to port {port}: {e}"))?;
    let data = Pattern::bytes(cid, len);
    let back = thread::scope(|sc| -> Result<Vec<u8>> {
        let sender = sc.spawn(|| sock.send(&data));
        let mut back = vec![0u8; len];
        let mut at = 0;
        while at < len {
            let n = sock.recv(&mut back[at..])?;
            ensure!(n > 0, "cid {cid}: stream ended after {at} of {len} bytes");
            at += n;
        }
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(back)
    })?;
    ensure!(back == data, "cid {cid}: echoed bytes differ");
    sock.close()?;
    let echoed = echo
        .join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    ensure!(
        echoed == len as u64,
        "cid {cid}: host echoed {echoed} of {len}"
    );
    Ok(())
}

/// A small xorshift generator; the seed is printed so a failing choice can be replayed
/// (`DENSITY_SEED=N`).
fn pick(n: usize, of: usize) -> Vec<usize> {
    let seed = std::env::var("DENSITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("[density] DENSITY_SEED={seed}");
    let mut x = seed;
    let mut chosen: Vec<usize> = Vec::new();
    while chosen.len() < n.min(of) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % of as u64) as usize;
        if !chosen.contains(&i) {
            chosen.push(i);
        }
    }
    chosen
}

#[test]
fn a_thousand_vms_from_a_toml_config_start_and_serve() -> Result<()> {
    const VMS: u64 = 1000;
    let dir = tempfile::Builder::new()
        .prefix("vhost-plug-density")
        .tempdir()?;
    let specs: Vec<VmSpec> = (0..VMS).map(|i| VmSpec::new(dir.path(), 3 + i)).collect();
    let config = dir.path().join("vhost-plug.toml");
    let text: String = specs.iter().map(|s| vm_table(s, "")).collect();
    std::fs::write(&config, text)?;
    let mut daemon = start(&config, &specs)?;
    // Every VM has its host-side sockets too.
    for s in &specs {
        ensure!(s.uds_path.exists(), "{} missing", s.uds_path.display());
    }
    let chosen = pick(50, specs.len());
    let mut attached = Vec::new();
    for &i in &chosen {
        let vm = TestVm::boot(specs[i].clone(), Default::default(), Default::default())
            .with_context(|| format!("booting cid {}: {}", specs[i].guest_cid, daemon.stderr()))?;
        guest_echo(&vm, 5000, 64 << 10)
            .with_context(|| format!("cid {}: {}", specs[i].guest_cid, daemon.stderr()))?;
        // Kept attached: all 50 are live at once by the end.
        attached.push(vm);
    }
    // With all of them attached, each still echoes.
    for vm in &attached {
        guest_echo(vm, 5001, 4096)?;
    }
    ensure!(daemon.running(), "daemon exited: {}", daemon.stderr());
    for vm in attached {
        vm.shutdown();
    }
    Ok(())
}

/// The test fixture whose memory is larger than a plugin may have, so that it can never be
/// instantiated (host/build.rs builds it into `<target>/wasm-plugins`).
fn big_memory_wasm() -> Result<PathBuf> {
    let bin = DaemonKind::VhostPlug.binary()?;
    let target = bin
        .parent()
        .and_then(Path::parent)
        .context("target dir of the daemon binary")?;
    let p = target.join("wasm-plugins/wasm32-wasip2/release/hostile_big_memory.wasm");
    ensure!(p.is_file(), "plugin {} not built", p.display());
    Ok(p)
}

#[test]
fn a_vm_whose_plugin_cannot_start_fails_alone() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("vhost-plug-density")
        .tempdir()?;
    let specs: Vec<VmSpec> = (3..6).map(|cid| VmSpec::new(dir.path(), cid)).collect();
    let plugin = big_memory_wasm()?;
    let broken = format!(
        "[vm.plugins]\npolicy = [{{ path = \"{}\", name = \"too-big\" }}]\n",
        plugin.display()
    );
    let text = format!(
        "{}{}{}",
        vm_table(&specs[0], ""),
        vm_table(&specs[1], &broken),
        vm_table(&specs[2], "")
    );
    let config = dir.path().join("vhost-plug.toml");
    std::fs::write(&config, text)?;
    // The plugin loads (it is a valid policy plugin): the daemon starts.
    let mut daemon = start(&config, &specs)?;
    let a = TestVm::boot(specs[0].clone(), Default::default(), Default::default())?;
    // The VMM of CID 4 is refused, twice: its plugin cannot be instantiated.
    for attempt in 0..2 {
        let sim = vhost_plug_tests::sim::SimConfig {
            connect_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        match TestVm::boot(specs[1].clone(), sim, Default::default()) {
            Ok(_) => bail!("attempt {attempt}: the VMM of CID 4 was served"),
            Err(e) => eprintln!("[density] CID 4 refused as expected: {e:#}"),
        }
    }
    let log = daemon.stderr();
    ensure!(
        log.lines()
            .any(|l| l.contains("cid=4") && l.contains("plugins cannot start")),
        "no refusal logged for CID 4: {log}"
    );
    // The others attach and serve, before and after the refusals.
    let c = TestVm::boot(specs[2].clone(), Default::default(), Default::default())?;
    guest_echo(&a, 6000, 64 << 10)?;
    guest_echo(&c, 6000, 64 << 10)?;
    ensure!(daemon.running(), "daemon exited: {}", daemon.stderr());
    a.shutdown();
    c.shutdown();
    Ok(())
}
