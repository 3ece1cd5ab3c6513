//! Dirty-page logging for live migration (`VHOST_F_LOG_ALL`, `LOG_SHMFD`): once the VMM sets a
//! log base, every guest page the daemon writes is marked in the VMM's log.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test dirty_log -- --nocapture`.

use std::io::Write;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_plug_tests::harness::Setup;
use vhost_plug_tests::host::host_connect;
use vhost_plug_tests::sim::LOG_PAGE;
use vhost_plug_tests::{DaemonKind, DriverConfig, QueueSet, SimConfig, SockType};

const PROMPT: Duration = Duration::from_secs(10);

#[test]
fn every_page_the_daemon_writes_is_in_the_dirty_log() -> Result<()> {
    let s = Setup::new(DaemonKind::VhostPlug, &[3])?;
    run(&s).with_context(|| format!("daemon stderr:\n{}", s.daemon.stderr()))
}

fn run(s: &Setup) -> Result<()> {
    let mut vm = s.boot_with(
        0,
        SimConfig {
            queues: QueueSet::All,
            extra_protocol_features: VhostUserProtocolFeatures::LOG_SHMFD,
            ..SimConfig::default()
        },
        DriverConfig::default(),
    )?;
    ensure!(
        vm.sim
            .acked_protocol_features()
            .contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "the daemon does not offer LOG_SHMFD"
    );
    ensure!(
        vm.sim.offered_features() & (1 << 26) != 0,
        "the daemon does not offer VHOST_F_LOG_ALL"
    );
    let gl = vm.guest.listen(7000, SockType::Stream)?;
    let (mut h, _) = host_connect(&vm.spec.uds_path, 7000)?;
    let g = gl.accept(PROMPT)?;

    let log = vm.sim.start_dirty_log()?;
    log.clear()?;
    // Let the driver settle, then compare guest memory across a 1 MiB host -> guest transfer
    // with the log: a page that changed and is not marked would be lost by a migration.
    std::thread::sleep(Duration::from_millis(100));
    vm.guest.pause_interrupts()?;
    let before = vm.sim.snapshot_memory()?;
    vm.guest.resume_interrupts();
    log.clear()?;
    let data = vec![0x5au8; 1 << 20];
    let mut got = vec![0u8; data.len()];
    std::thread::scope(|sc| -> Result<()> {
        let w = sc.spawn(|| h.write_all(&data));
        std::io::Read::read_exact(&mut &g, &mut got).context("guest read")?;
        w.join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))?
            .context("host write")
    })?;
    ensure!(got == data, "bytes changed on the way");
    vm.guest.pause_interrupts()?;
    let bases = vm.sim.stop_vrings()?;
    let after = vm.sim.snapshot_memory()?;
    let dirty = log.dirty_pages()?;
    let changed: Vec<usize> = before
        .chunks(LOG_PAGE)
        .zip(after.chunks(LOG_PAGE))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    // The driver changes pages too (avail rings, its tx buffers); the daemon's writes are the
    // rx buffers, now holding the payload, and the used rings. None of those may be unlogged.
    let run = [0x5au8; 64];
    let missing: Vec<String> = changed
        .iter()
        .filter(|p| !dirty.contains(p))
        .filter(|p| {
            let page = &after[*p * LOG_PAGE..(*p + 1) * LOG_PAGE];
            page.windows(run.len()).any(|w| w == run)
                || vm
                    .sim
                    .describe_addr((*p * LOG_PAGE) as u64)
                    .contains("used ring")
        })
        .map(|p| vm.sim.describe_addr((*p * LOG_PAGE) as u64))
        .collect();
    eprintln!(
        "[dirty-log] {} pages changed, {} marked dirty, unmarked (driver-only) {}",
        changed.len(),
        dirty.len(),
        changed.iter().filter(|p| !dirty.contains(p)).count()
    );
    ensure!(
        !dirty.is_empty(),
        "nothing was logged during a 1 MiB transfer"
    );
    ensure!(
        missing.is_empty(),
        "pages the daemon changed but did not log: {missing:?}"
    );
    vm.sim.resume_vrings(&bases)?;
    vm.guest.resume_interrupts();
    vm.guest.health()?;
    Ok(())
}
