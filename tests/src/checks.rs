//! Checks shared by the robustness suites (hostile guest, hostile host, VMM faults, soak):
//! "this VM still serves a checksummed echo", resource readings, scratch guest memory.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use vm_memory::Bytes;

use crate::data::{digest, Pattern};
use crate::harness::{echo_guest, echo_stream, exchange, TestVm};
use crate::host::{accept_timeout, host_connect, host_listen, port_path, HOST_TIMEOUT};
use crate::packet::HOST_CID;
use crate::{Daemon, Guest, SockType, VmSpec};

/// Bytes each echo check moves each way: several credit windows and rx buffers.
pub const ECHO_BYTES: usize = 300 * 1024;

/// Guest -> host: the guest connects to host port `port`, a host thread echoes, the guest
/// checks the CRC of what came back. Returns the digest's CRC.
pub fn guest_echo(vm: &TestVm, port: u32, seed: u64) -> Result<u32> {
    guest_echo_on(&vm.guest, &vm.spec, port, seed)
}

/// [`guest_echo`] for a driver behind any VMM.
pub fn guest_echo_on(guest: &Guest, spec: &VmSpec, port: u32, seed: u64) -> Result<u32> {
    let _ = std::fs::remove_file(port_path(&spec.uds_path, port));
    let l = host_listen(&spec.uds_path, port)?;
    let g = guest
        .connect(HOST_CID, port, SockType::Stream)
        .map_err(|e| anyhow!("cid {} connect to host port {port}: {e}", spec.guest_cid))?;
    let h = accept_timeout(&l, HOST_TIMEOUT)?;
    let echo = std::thread::spawn(move || echo_stream(h));
    let data = Pattern::bytes(seed, ECHO_BYTES);
    let back = exchange(&g, &data).context("guest echo exchange")?;
    g.shutdown(false, true)?;
    let echoed = echo
        .join()
        .map_err(|_| anyhow!("host echo thread panicked"))??;
    let (want, got) = (digest(&data), digest(&back));
    ensure!(
        want == got && echoed == data.len() as u64,
        "cid {}: echo differs (sent {want:?}, got {got:?}, host echoed {echoed})",
        spec.guest_cid
    );
    g.close()?;
    let _ = std::fs::remove_file(port_path(&spec.uds_path, port));
    Ok(got.crc)
}

/// Host -> guest: a host program connects to guest port `port` through the hybrid socket,
/// the guest echoes, the host checks the CRC.
pub fn host_echo(vm: &TestVm, port: u32, seed: u64) -> Result<u32> {
    host_echo_on(&vm.guest, &vm.spec, port, seed)
}

/// [`host_echo`] for a driver behind any VMM.
pub fn host_echo_on(guest: &Guest, spec: &VmSpec, port: u32, seed: u64) -> Result<u32> {
    let gl = guest.listen(port, SockType::Stream)?;
    let (h, _) = host_connect(&spec.uds_path, port)?;
    let g = gl.accept(HOST_TIMEOUT)?;
    std::thread::scope(|sc| {
        let e = sc.spawn(|| echo_guest(&g));
        let data = Pattern::bytes(seed, ECHO_BYTES);
        let back = exchange(&h, &data).context("host echo exchange");
        h.shutdown(std::net::Shutdown::Write)?;
        let echoed = e
            .join()
            .map_err(|_| anyhow!("guest echo thread panicked"))??;
        let back = back?;
        let (want, got) = (digest(&data), digest(&back));
        ensure!(
            want == got && echoed == data.len() as u64,
            "cid {}: host echo differs (sent {want:?}, got {got:?})",
            spec.guest_cid
        );
        Ok(got.crc)
    })
}

/// Both directions on `vm`, ports `port` and `port + 1`; prints one line.
pub fn serves(vm: &TestVm, port: u32, what: &str) -> Result<()> {
    let a = guest_echo(vm, port, u64::from(port))
        .with_context(|| format!("{what}: guest->host echo"))?;
    let b = host_echo(vm, port + 1, u64::from(port) + 1)
        .with_context(|| format!("{what}: host->guest echo"))?;
    eprintln!(
        "[serves] cid {} after {what}: echo {} KiB each way ok (crc {a:08x} / {b:08x})",
        vm.spec.guest_cid,
        ECHO_BYTES / 1024
    );
    Ok(())
}

/// Resident set size and open fds of the daemon, printed with `label`.
pub fn resources(d: &Daemon, label: &str) -> Result<(u64, usize)> {
    let rss = d.rss_kib()?;
    let fds = d.open_fds()?;
    eprintln!("[resources] {label}: VmRSS {rss} KiB, {fds} fds");
    Ok((rss, fds))
}

/// The daemon's fd count once it stopped changing (three equal readings 100 ms apart, within
/// 10 s): a baseline not taken while a frontend session is being torn down or set up.
pub fn settled_fds(d: &Daemon) -> Result<usize> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last = d.open_fds()?;
    let mut same = 0;
    while same < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let n = d.open_fds()?;
        same = if n == last { same + 1 } else { 0 };
        last = n;
    }
    Ok(last)
}

/// Waits up to `timeout` for the daemon's fd count to come down to at most `want`; returns
/// the last count.
pub fn wait_fds(d: &Daemon, want: usize, timeout: Duration) -> Result<usize> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let n = d.open_fds()?;
        if n <= want || std::time::Instant::now() >= deadline {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon's open fds by kind (`socket`, `anon_inode:[eventfd]`, `pipe`, ...), for failure
/// messages about fd counts.
pub fn fd_summary(d: &Daemon) -> String {
    let Some(pid) = d.pid() else {
        return "daemon gone".into();
    };
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            let t = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let kind = t.split(':').next().unwrap_or("").to_string();
            let kind = if kind == "anon_inode" { t } else { kind };
            *kinds.entry(kind).or_default() += 1;
        }
    }
    format!("{kinds:?}")
}

/// Raises this process's soft open-file limit to its hard limit (the daemons it spawns
/// inherit it) and fails, saying why, if that is below `need`: tests that hold thousands of
/// sockets must not run into a 1024 default.
pub fn raise_fd_limit(need: u64) -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit; raising the soft limit up to the hard one is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
    }
    ensure!(
        lim.rlim_cur >= need,
        "this test needs {need} open files; the hard limit is {} (raise it with ulimit -Hn)",
        lim.rlim_cur
    );
    Ok(lim.rlim_cur)
}

/// Copies `bytes` into fresh guest memory of `vm` (outside every driver buffer) and returns
/// its guest address.
pub fn scratch(vm: &mut TestVm, bytes: &[u8]) -> Result<u64> {
    let a = vm
        .sim
        .guest_mem_mut()
        .alloc(bytes.len().max(1) as u64, 64)?;
    vm.sim
        .memory()
        .write_slice(bytes, a)
        .context("writing scratch guest memory")?;
    Ok(a.0)
}
