//! Live upgrade (issue 19) with the old daemon killed (SIGKILL) mid-upgrade, with the
//! simulated VMM: three VMs with open connections; the old daemon stops at a chosen step
//! (test-only fault injection, `VHOST_PLUG_UPGRADE_FAULT`, see host/src/upgrade.rs) and is
//! killed there. Each time the new daemon serves every VM: the adopted ones with their
//! connections, the others taken over from what the old daemon pre-handed (a
//! TRANSPORT_RESET, then new connections work); no VMM sees its vhost-user socket close, and
//! `ctl` reaches the new daemon.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test upgrade_crash -- --nocapture`.

use std::io::Read;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vhost_plug_tests::harness::{ctl, Setup};
use vhost_plug_tests::packet::EVENT_TRANSPORT_RESET;
use vhost_plug_tests::upgrade::{both_ways, new_pid, open_conns, status_when_up, Current};
use vhost_plug_tests::{Daemon, DaemonKind, VmSpec};

const PROMPT: Duration = Duration::from_secs(10);
const CIDS: [u64; 3] = [3, 4, 5];

/// Killed after every VM was pre-handed, before any moved: all three are taken over.
#[test]
fn killed_after_the_pre_hand() -> Result<()> {
    crash_at("parked", 0)
}

/// Killed with the 2nd VM quiesced and its `vm` message not sent: the 1st stays adopted,
/// the 2nd and 3rd are taken over.
#[test]
fn killed_with_the_second_vm_quiesced() -> Result<()> {
    crash_at("quiesced:2", 1)
}

/// Killed with the 2nd VM's `vm` message sent whole but not answered: the new daemon adopts
/// it normally; the 3rd is taken over.
#[test]
fn killed_with_the_second_vm_sent() -> Result<()> {
    crash_at("sent:2", 2)
}

/// Killed between VMs (the 1st released, the 2nd not yet quiesced).
#[test]
fn killed_between_vms() -> Result<()> {
    crash_at("released:1", 1)
}

/// The VMM of the 3rd VM stops its rings while the old daemon is paused between VMs, then the
/// old daemon is killed with the 2nd VM quiesced: the new daemon takes the 3rd VM over as it
/// is now (pre-handed again after the change), rings stopped, not as at the pre-hand. No
/// reset while stopped; once the VMM restarts the rings, the reset and new connections.
#[test]
fn a_setup_changed_during_the_upgrade_is_taken_over_as_changed() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("vhost-plug-test")
        .tempdir()?;
    let go = dir.path().join("go");
    let control = dir.path().join("vhost-plug.ctl");
    let c = control.display().to_string();
    let fault = format!("wait:released:1:{},quiesced:2", go.display());
    let vms: Vec<VmSpec> = CIDS
        .iter()
        .map(|&cid| VmSpec::new(dir.path(), cid))
        .collect();
    let daemon = Daemon::spawn_with_env(
        DaemonKind::VhostPlug,
        dir.path(),
        &vms,
        &["--control-socket", &c],
        &[("VHOST_PLUG_UPGRADE_FAULT", &fault)],
    )?;
    let mut s = Setup { daemon, vms, dir };
    let mut current = Current(None);
    let res = (|| -> Result<()> {
        let mut booted = Vec::new();
        for i in 0..CIDS.len() {
            booted.push(s.boot(i)?);
        }
        let mark = s.daemon.log_mark();
        let ctl_path = control.clone();
        let upgrading = std::thread::spawn(move || ctl(&ctl_path, &["upgrade"]));
        s.daemon
            .wait_log(mark, &["upgrade fault point released:1 reached"], PROMPT)
            .context("the old daemon did not pause at released:1")?;
        let bases = booted[2].sim.stop_vrings()?;
        std::fs::write(&go, b"")?;
        s.daemon
            .wait_log(mark, &["upgrade fault point quiesced:2 reached"], PROMPT)
            .context("the old daemon did not reach quiesced:2")?;
        let log = s.daemon.log_since(mark);
        ensure!(
            log.contains("changed sessions pre-handed again"),
            "the 3rd VM was not pre-handed again"
        );
        current.0 = Some(new_pid(&log)?);
        s.daemon.kill();
        let _ = upgrading.join();
        status_when_up(&control, PROMPT)?;
        let vm = &mut booted[2];
        ensure!(vm.sim.read_guest_cid()? == CIDS[2], "VM 5: wrong guest CID");
        ensure!(
            vm.guest.events().is_empty(),
            "VM 5: events {:?} while its rings are stopped",
            vm.guest.events()
        );
        vm.sim.resume_vrings(&bases)?;
        ensure!(
            vm.guest.wait_events(0, PROMPT) && vm.guest.events() == vec![EVENT_TRANSPORT_RESET],
            "VM 5: events {:?} after its rings restarted",
            vm.guest.events()
        );
        let mut fresh = open_conns(vm, 7100)?;
        both_ways(&mut fresh, "VM 5 taken over")?;
        Ok(())
    })();
    res.with_context(|| format!("daemon log:\n{}", s.daemon.stderr()))
}

/// Upgrades with the old daemon stopping at `step`, kills it there, and checks that the
/// first `adopted` VMs kept their connections and the others were taken over.
fn crash_at(step: &str, adopted: usize) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("vhost-plug-test")
        .tempdir()?;
    let control = dir.path().join("vhost-plug.ctl");
    let c = control.display().to_string();
    let vms: Vec<VmSpec> = CIDS
        .iter()
        .map(|&cid| VmSpec::new(dir.path(), cid))
        .collect();
    let daemon = Daemon::spawn_with_env(
        DaemonKind::VhostPlug,
        dir.path(),
        &vms,
        &["--control-socket", &c],
        &[("VHOST_PLUG_UPGRADE_FAULT", step)],
    )?;
    let mut s = Setup { daemon, vms, dir };
    let mut current = Current(None);
    let res = (|| -> Result<()> {
        let mut booted = Vec::new();
        for i in 0..CIDS.len() {
            let vm = s.boot(i)?;
            let conns = open_conns(&vm, 7000)?;
            booted.push((vm, conns));
        }
        let mark = s.daemon.log_mark();
        let ctl_path = control.clone();
        let upgrading = std::thread::spawn(move || ctl(&ctl_path, &["upgrade"]));
        s.daemon
            .wait_log(
                mark,
                &[&format!("upgrade fault point {step} reached")],
                PROMPT,
            )
            .with_context(|| format!("the old daemon did not reach {step}"))?;
        let pid = new_pid(&s.daemon.log_since(mark))?;
        current.0 = Some(pid);
        s.daemon.kill();
        // The control connection of `ctl upgrade` died with the old daemon.
        let r = upgrading
            .join()
            .map_err(|_| anyhow::anyhow!("ctl panicked"))?;
        ensure!(!matches!(r, Ok((true, _))), "ctl upgrade succeeded: {r:?}");
        let st = status_when_up(&control, PROMPT)?;
        ensure!(
            st["vms"].as_array().map(Vec::len) == Some(CIDS.len()),
            "status from the new daemon: {st}"
        );
        for (i, (vm, conns)) in booted.iter_mut().enumerate() {
            let cid = CIDS[i];
            // The VMM's own vhost-user connection is open and answered (by the new daemon).
            ensure!(
                vm.sim.read_guest_cid()? == cid,
                "VM {cid}: wrong guest CID over the VMM's socket"
            );
            if i < adopted {
                both_ways(conns, &format!("VM {cid} adopted"))?;
                ensure!(
                    vm.guest.events().is_empty(),
                    "VM {cid} adopted: guest events {:?}",
                    vm.guest.events()
                );
            } else {
                ensure!(
                    vm.guest.wait_events(0, PROMPT),
                    "VM {cid} taken over: no TRANSPORT_RESET"
                );
                ensure!(
                    vm.guest.events() == vec![EVENT_TRANSPORT_RESET],
                    "VM {cid} taken over: guest events {:?}",
                    vm.guest.events()
                );
                // The host ends of the old connections died with the old daemon.
                let mut b = [0u8; 1];
                ensure!(
                    conns.g2h.1.read(&mut b)? == 0,
                    "VM {cid}: the host end of an old connection is alive"
                );
                let mut fresh = open_conns(vm, 7100)?;
                both_ways(&mut fresh, &format!("VM {cid} taken over"))?;
            }
            vm.guest.health()?;
        }
        let log = s.daemon.log_since(mark);
        let taken = log.matches("took over a VM").count();
        ensure!(
            taken == CIDS.len() - adopted,
            "{taken} VMs taken over, expected {}",
            CIDS.len() - adopted
        );
        if let Some(l) = log.lines().find(|l| l.contains("every VM pre-handed")) {
            eprintln!("[upgrade_crash] {step}: {l}");
        }
        Ok(())
    })();
    res.with_context(|| format!("daemon log:\n{}", s.daemon.stderr()))
}
