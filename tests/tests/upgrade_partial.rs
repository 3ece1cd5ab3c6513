//! Live upgrade (issue 19) where the new daemon fails the 2nd VM of three after the 1st moved:
//! the upgrade rolls back (the new daemon hands the 1st VM back and exits), the old daemon
//! serves all three with their connections, and a retry moves all three to one new daemon.
//! The refusal is test-only fault injection (`VHOST_PLUG_UPGRADE_REFUSE`, host/src/upgrade.rs).
//!
//! Run: `cargo test -p vhost-plug-tests --release --test upgrade_partial -- --nocapture`.

use std::path::Path;

use anyhow::{ensure, Result};
use vhost_plug_tests::harness::{ctl, Setup, TestVm};
use vhost_plug_tests::upgrade::{both_ways, new_pid, open_conns, upgrade, Conns, Current};
use vhost_plug_tests::{DaemonKind, VmSpec};

const CIDS: [u64; 3] = [3, 4, 5];

/// Every VM: the VMM's vhost-user socket answered, its connections work both ways, and the
/// guest saw no event (no reset).
fn all_served(booted: &mut [(TestVm, Conns)], tag: &str) -> Result<()> {
    for (i, (vm, conns)) in booted.iter_mut().enumerate() {
        let cid = CIDS[i];
        ensure!(
            vm.sim.read_guest_cid()? == cid,
            "{tag}: VM {cid}: wrong guest CID over the VMM's socket"
        );
        both_ways(conns, &format!("{tag}: VM {cid}"))?;
        ensure!(
            vm.guest.events().is_empty(),
            "{tag}: VM {cid}: guest events {:?}",
            vm.guest.events()
        );
        vm.guest.health()?;
    }
    Ok(())
}

#[test]
fn a_vm_refused_mid_upgrade_rolls_back_and_a_retry_moves_all() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let control = dir.path().join("vhost-plug.ctl");
    let c = control.display().to_string();
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| CIDS.iter().map(|&cid| VmSpec::new(d, cid)).collect(),
        &["--control-socket", &c],
    )?;
    let mut current = Current(None);
    let res = (|| -> Result<()> {
        let mut booted = Vec::new();
        for i in 0..CIDS.len() {
            let vm = s.boot(i)?;
            let conns = open_conns(&vm, 7000)?;
            booted.push((vm, conns));
        }
        let real = DaemonKind::VhostPlug.binary()?;
        let refuses = dir.path().join("refuses-4.sh");
        script(
            &refuses,
            &format!(
                "VHOST_PLUG_UPGRADE_REFUSE=4 exec '{}' \"$@\"",
                real.display()
            ),
        )?;
        let mark = s.daemon.log_mark();
        let b = refuses.display().to_string();
        let (ok, v) = ctl(&control, &["upgrade", "--binary", &b])?;
        ensure!(!ok, "the upgrade succeeded: {v}");
        let err = v["error"].as_str().unwrap_or_default();
        ensure!(
            err.contains("refused by fault injection") && err.contains("1 of 1 VMs handed back"),
            "error {err:?}"
        );
        let log = s.daemon.log_since(mark);
        let pid = new_pid(&log)?;
        ensure!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the new daemon {pid} still runs after the rollback"
        );
        ensure!(
            log.matches("handed back by the new daemon").count() == 1,
            "the 1st VM was not handed back"
        );
        ensure!(s.daemon.pid().is_some(), "the old daemon is gone");
        all_served(&mut booted, "after the rollback")?;
        let (ok, st) = ctl(&control, &["status"])?;
        ensure!(
            ok && st["vms"].as_array().map(Vec::len) == Some(3),
            "status {st}"
        );

        // A retry moves every VM to one new daemon.
        let (pid, v) = upgrade(&control, &[])?;
        current.0 = Some(pid);
        ensure!(v["vms"] == 3, "retry: {v}");
        all_served(&mut booted, "after the retry")?;
        let (ok, st) = ctl(&control, &["status"])?;
        ensure!(
            ok && st["vms"].as_array().map(Vec::len) == Some(3),
            "status {st}"
        );
        Ok(())
    })();
    res.map_err(|e| e.context(format!("daemon log:\n{}", s.daemon.stderr())))
}

fn script(path: &Path, body: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}
