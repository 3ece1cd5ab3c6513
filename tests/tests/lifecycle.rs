//! Daemon lifecycle: one VMM going away leaves other VMs alone; SIGTERM and SIGINT exit
//! cleanly and remove the sockets the daemon created.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{ensure, Result};
use vhost_plug_tests::data::Pattern;
use vhost_plug_tests::harness::{exchange, Setup, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_listen, seqpacket_path, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::{DaemonKind, SockType, VmSpec};

#[test]
fn a_vmm_leaving_does_not_disturb_other_vms() -> Result<()> {
    let s = Setup::new(DaemonKind::VhostPlug, &[3, 4])?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let la = host_listen(&a.spec.uds_path, 1000)?;
    let lb = host_listen(&b.spec.uds_path, 1000)?;
    let ga = a
        .guest
        .connect(HOST_CID, 1000, SockType::Stream)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let gb = b
        .guest
        .connect(HOST_CID, 1000, SockType::Stream)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ha = accept_timeout(&la, HOST_TIMEOUT)?;
    let mut hb = accept_timeout(&lb, HOST_TIMEOUT)?;
    ga.send(b"a")?;
    let mut one = [0u8; 1];
    ha.read_exact(&mut one)?;

    // VM 3's VMM disappears mid-connection.
    let TestVm {
        mut guest, mut sim, ..
    } = a;
    guest.stop();
    sim.disconnect();
    ha.set_read_timeout(Some(HOST_TIMEOUT))?;
    ensure!(ha.read(&mut one)? == 0, "host peer of VM 3 did not see EOF");
    drop(ga);

    // VM 4's connection keeps moving data, both ways, checksummed by comparison.
    let echo = std::thread::spawn(move || -> Result<()> {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = hb.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            hb.write_all(&buf[..n])?;
        }
    });
    let data = Pattern::bytes(4, 4 << 20);
    let back = exchange(&gb, &data)?;
    ensure!(back == data, "VM 4's bytes changed after VM 3's VMM left");
    gb.shutdown(false, true)?;
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo panicked"))??;
    ensure!(
        s.daemon.stderr().contains("frontend"),
        "no log of the frontend leaving"
    );
    Ok(())
}

fn exits_cleanly_on(signal: libc::c_int) -> Result<()> {
    let mut s = Setup::with(
        DaemonKind::VhostPlug,
        |dir| vec![VmSpec::new(dir, 3), VmSpec::new(dir, 4)],
        &[],
    )?;
    let vm = s.boot(0)?;
    let created: Vec<_> = s
        .vms
        .iter()
        .flat_map(|v| {
            [
                v.socket.clone(),
                v.uds_path.clone(),
                seqpacket_path(&v.uds_path),
            ]
        })
        .collect();
    for p in &created {
        ensure!(p.exists(), "{} missing while running", p.display());
    }
    s.daemon.signal(signal)?;
    let status = s.daemon.wait_exit(Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "exit status {status} after signal {signal}"
    );
    for p in &created {
        ensure!(!p.exists(), "{} left behind", p.display());
    }
    drop(vm);
    Ok(())
}

#[test]
fn sigterm_exits_cleanly_and_removes_sockets() -> Result<()> {
    exits_cleanly_on(libc::SIGTERM)
}

#[test]
fn sigint_exits_cleanly_and_removes_sockets() -> Result<()> {
    exits_cleanly_on(libc::SIGINT)
}
