//! Device-state transfer (`SET_DEVICE_STATE_FD` / `CHECK_DEVICE_STATE`), issue 5: migration to
//! another daemon with TRANSPORT_RESET by event-queue ownership, snapshots taken before the
//! driver was live, refusal of bad blobs without side effects, repeated save/load without
//! leaks, a 1,000-connection state, and plugin state across plugin versions.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test migration -- --nocapture`.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use vhost_plug_tests::driver::EndReason;
use vhost_plug_tests::harness::{Setup, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_connect, host_listen, HOST_TIMEOUT};
use vhost_plug_tests::packet::{EVENT_TRANSPORT_RESET, HOST_CID};
use vhost_plug_tests::sim::read_cid;
use vhost_plug_tests::state::{
    frame, json_plugin_states, parse_frame, snapshot, state_cfg, suspend_and_save, StateReader,
    FORMAT,
};
use vhost_plug_tests::{
    DaemonKind, DriverConfig, Guest, GuestSocket, QueueSet, SimConfig, SimVmm, SockType, VmSpec,
};

/// Bound for things a correct daemon does at once.
const PROMPT: Duration = Duration::from_secs(10);
/// Bound on one state transfer.
const XFER: Duration = Duration::from_secs(10);
/// How long to watch for an event that must not come, after the rings demonstrably ran.
const NO_EVENT_GRACE: Duration = Duration::from_millis(300);
/// Largest blob the daemon accepts (contract: 16 MiB).
const MAX_BLOB: usize = 16 << 20;

// ----- fixtures ------------------------------------------------------------------------

/// A VMM connected with features and memory table only, as a destination before LOAD.
fn fresh_cfg(queues: QueueSet) -> SimConfig {
    SimConfig {
        start_vrings: false,
        ..state_cfg(queues)
    }
}

fn daemon(cid: u64, args: &[&str]) -> Result<Setup> {
    Setup::with(
        DaemonKind::VhostPlug,
        |dir| vec![VmSpec::new(dir, cid)],
        args,
    )
}

/// Whether the daemon process is alive (not exited, not a zombie).
fn alive(s: &Setup) -> bool {
    let Some(pid) = s.daemon.pid() else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| {
            st.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn with_stderr<T>(r: Result<T>, s: &Setup) -> Result<T> {
    r.with_context(|| format!("daemon stderr:\n{}", s.daemon.stderr()))
}

fn connect_err(e: vhost_plug_tests::ConnectError) -> anyhow::Error {
    anyhow!("guest connect: {e}")
}

/// A guest -> host connection through `spec`'s daemon, with one byte each way.
fn guest_to_host(
    guest: &Guest,
    uds: &std::path::Path,
    port: u32,
) -> Result<(GuestSocket, std::os::unix::net::UnixStream)> {
    let l = host_listen(uds, port)?;
    let gs = guest
        .connect(HOST_CID, port, SockType::Stream)
        .map_err(connect_err)?;
    let mut h = accept_timeout(&l, HOST_TIMEOUT)?;
    std::fs::remove_file(vhost_plug_tests::host::port_path(uds, port)).ok();
    gs.send(b"g")?;
    let mut b = [0u8; 1];
    h.read_exact(&mut b)?;
    h.write_all(b"h")?;
    (&gs).read_exact(&mut b)?;
    ensure!(&b == b"h", "guest read {b:?}");
    Ok((gs, h))
}

/// A host -> guest connection, with one byte each way.
fn host_to_guest(
    guest: &Guest,
    uds: &std::path::Path,
    port: u32,
) -> Result<(GuestSocket, std::os::unix::net::UnixStream)> {
    let gl = guest.listen(port, SockType::Stream)?;
    let (mut h, _) = host_connect(uds, port)?;
    let gs = gl.accept(PROMPT)?;
    h.write_all(b"h")?;
    let mut b = [0u8; 1];
    (&gs).read_exact(&mut b)?;
    gs.send(b"g")?;
    h.read_exact(&mut b)?;
    ensure!(&b == b"g", "host read {b:?}");
    Ok((gs, h))
}

/// Both directions work through `uds` (fresh ports each call).
fn connections_work(guest: &Guest, uds: &std::path::Path, port: u32) -> Result<()> {
    guest_to_host(guest, uds, port).context("new guest -> host connection")?;
    host_to_guest(guest, uds, port + 1).context("new host -> guest connection")?;
    Ok(())
}

/// A host peer sees its connection end: EOF (or a reset) within the bound, not a hang.
fn expect_host_eof(h: &mut std::os::unix::net::UnixStream, what: &str) -> Result<()> {
    h.set_read_timeout(Some(PROMPT))?;
    let mut b = [0u8; 64];
    loop {
        match h.read(&mut b) {
            Ok(0) => return Ok(()),
            // Bytes sent before the end may still be queued.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                bail!("{what}: connection reset instead of a clean EOF")
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                bail!("{what}: no EOF within {PROMPT:?} (silent hang)")
            }
            Err(e) => return Err(e).with_context(|| format!("{what}: reading")),
        }
    }
}

/// Boots a VMM and driver on a VMM that has just loaded a state (rings not started).
fn start_after_load(mut sim: SimVmm, spec: VmSpec) -> Result<TestVm> {
    sim.start_vrings()?;
    let guest = Guest::start(&mut sim, DriverConfig::default())?;
    Ok(TestVm { guest, sim, spec })
}

/// Like [`start_after_load`] for a state taken while the driver was live with a
/// backend-owned event queue: waits for the TRANSPORT_RESET (connections opened before it
/// would be reset by it).
fn start_after_live_load(sim: SimVmm, spec: VmSpec) -> Result<TestVm> {
    let vm = start_after_load(sim, spec)?;
    ensure!(
        vm.guest.wait_events(0, PROMPT),
        "no TRANSPORT_RESET within {PROMPT:?} after loading a live state (backend-owned event \
         queue)"
    );
    Ok(vm)
}

fn expect_loaded(r: &vhost_plug_tests::sim::LoadReport, what: &str) -> Result<()> {
    if let Err(e) = &r.check {
        bail!(
            "{what}: LOAD refused ({e}; wrote {} bytes{})",
            r.written,
            r.write_error
                .as_ref()
                .map(|w| format!(", write error: {w}"))
                .unwrap_or_default()
        );
    }
    if let Some(w) = &r.write_error {
        bail!("{what}: LOAD accepted but the blob was not fully written: {w}");
    }
    Ok(())
}

/// Replaces the number after `"key":` in a JSON payload.
fn json_set_number(payload: &[u8], key: &str, value: u64) -> Result<Vec<u8>> {
    let text = std::str::from_utf8(payload).context("payload is not JSON text")?;
    let pat = format!("\"{key}\":");
    let at = text
        .find(&pat)
        .with_context(|| format!("no {pat} in the JSON state"))?
        + pat.len();
    let rest = &text[at..];
    let start = at + (rest.len() - rest.trim_start().len());
    let digits = text[start..]
        .find(|c: char| !c.is_ascii_digit())
        .context("number runs to the end")?;
    ensure!(digits > 0, "{key} is not a number in the JSON state");
    Ok(format!("{}{value}{}", &text[..start], &text[start + digits..]).into_bytes())
}

/// The boolean after `"key":` in a JSON payload.
fn json_get_bool(payload: &[u8], key: &str) -> Result<bool> {
    let text = std::str::from_utf8(payload).context("payload is not JSON text")?;
    let pat = format!("\"{key}\":");
    let at = text
        .find(&pat)
        .with_context(|| format!("no {pat} in the JSON state"))?
        + pat.len();
    let rest = text[at..].trim_start();
    if rest.starts_with("true") {
        Ok(true)
    } else if rest.starts_with("false") {
        Ok(false)
    } else {
        bail!("{key} is not a boolean in the JSON state")
    }
}

/// The event-queue part of a serializer-json blob: (owned by backend, driver live).
fn json_event_queue(blob: &[u8]) -> Result<(bool, bool)> {
    let f = parse_frame(blob)?;
    Ok((
        json_get_bool(&f.payload, "event_queue_owned_by_backend")?,
        json_get_bool(&f.payload, "driver_live")?,
    ))
}

fn json_get_number(payload: &[u8], key: &str) -> Result<u64> {
    let text = std::str::from_utf8(payload).context("payload is not JSON text")?;
    let pat = format!("\"{key}\":");
    let at = text
        .find(&pat)
        .with_context(|| format!("no {pat} in the JSON state"))?
        + pat.len();
    let rest = text[at..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Ok(rest[..end].parse()?)
}

// ----- 2. migration to another daemon ------------------------------------------------------

/// The source runs a guest with connections both ways; it is suspended and saved; the
/// destination VMM (same guest memory, same rings) loads the state into a second daemon and
/// resumes at the source's bases; the source VMM goes away.
fn migrate(queues: QueueSet) -> Result<()> {
    let src = daemon(3, &[])?;
    let dst = daemon(3, &[])?;
    let mut vm = src.boot_with(0, state_cfg(queues), DriverConfig::default())?;
    let src_uds = vm.spec.uds_path.clone();
    let dst_uds = dst.vms[0].uds_path.clone();
    let dst_socket = dst.vms[0].socket.clone();

    let res = (|| -> Result<()> {
        let (gs1, mut h1) = guest_to_host(&vm.guest, &src_uds, 6000)?;
        let (gs2, mut h2) = host_to_guest(&vm.guest, &src_uds, 6001)?;

        // The guest's vCPUs stop with the device; they resume on the destination.
        vm.guest.pause_interrupts()?;
        let t0 = Instant::now();
        let (bases, blob) = suspend_and_save(&mut vm, XFER)?;
        let save_time = t0.elapsed();
        let target = vm.sim.migration_target(&dst_socket, state_cfg(queues))?;
        let t1 = Instant::now();
        let report = target.load_state(&blob, XFER)?;
        let load_time = t1.elapsed();
        expect_loaded(&report, "destination")?;
        let mut fe = target.frontend_handle()?;
        vm.guest.set_cid_source(Box::new(move || read_cid(&mut fe)));
        let mut target = target;
        target
            .resume_vrings(&bases)
            .context("resuming on the destination")?;
        vm.guest.resume_interrupts();
        eprintln!(
            "[migration] {queues:?}: blob {} bytes, save {save_time:?}, load {load_time:?}, \
             bases {:?}",
            blob.len(),
            bases.0
        );

        // The source VMM quits: host peers of the old connections see them close.
        vm.sim.disconnect();
        expect_host_eof(&mut h1, "host peer of the guest -> host connection")?;
        expect_host_eof(&mut h2, "host peer of the host -> guest connection")?;

        match queues {
            QueueSet::All => {
                ensure!(
                    vm.guest.wait_events(0, PROMPT),
                    "no TRANSPORT_RESET on the destination within {PROMPT:?} (backend owns the \
                     event queue, driver was live)"
                );
                for (gs, name) in [(&gs1, "guest -> host"), (&gs2, "host -> guest")] {
                    ensure!(
                        gs.wait_closed(PROMPT),
                        "old {name} connection still open after TRANSPORT_RESET"
                    );
                    ensure!(
                        gs.end_reason() == Some(EndReason::TransportReset),
                        "old {name} connection ended by {:?}, not the reset",
                        gs.end_reason()
                    );
                }
            }
            QueueSet::RxTx => {
                // The VMM keeps the event queue (and would send the reset itself).
                ensure!(
                    !vm.guest.has_event_queue(),
                    "driver unexpectedly has an event queue"
                );
            }
        }
        drop((gs1, gs2));
        connections_work(&vm.guest, &dst_uds, 6100).context("on the destination")?;
        std::thread::sleep(NO_EVENT_GRACE);
        let want: Vec<u32> = match queues {
            QueueSet::All => vec![EVENT_TRANSPORT_RESET],
            QueueSet::RxTx => vec![],
        };
        ensure!(
            vm.guest.events() == want,
            "events seen by the guest: {:?}, want {want:?}",
            vm.guest.events()
        );
        ensure!(
            vm.guest.guest_cid() == 3,
            "guest CID after migration: {}",
            vm.guest.guest_cid()
        );
        vm.guest.health()?;
        target.disconnect();
        Ok(())
    })();
    res.with_context(|| {
        format!(
            "source daemon stderr:\n{}\ndestination daemon stderr:\n{}",
            src.daemon.stderr(),
            dst.daemon.stderr()
        )
    })
}

#[test]
fn migration_with_backend_event_queue_sends_one_transport_reset() -> Result<()> {
    migrate(QueueSet::All)
}

#[test]
fn migration_with_vmm_event_queue_sends_no_reset() -> Result<()> {
    migrate(QueueSet::RxTx)
}

// ----- 3. snapshot before the driver was live -------------------------------------------

/// Loads `blob` into a fresh frontend of `dst`, starts the rings and a driver, and checks
/// that no event arrives once the rings demonstrably run.
fn restore_expect_no_reset(dst: &Setup, blob: &[u8]) -> Result<()> {
    let sim = SimVmm::connect(&dst.vms[0].socket, fresh_cfg(QueueSet::All))?;
    expect_loaded(&sim.load_state(blob, XFER)?, "destination")?;
    let vm = start_after_load(sim, dst.vms[0].clone())?;
    connections_work(&vm.guest, &dst.vms[0].uds_path, 6200)?;
    std::thread::sleep(NO_EVENT_GRACE);
    ensure!(
        vm.guest.events().is_empty(),
        "spurious events {:?} after restoring a snapshot taken before the driver was live",
        vm.guest.events()
    );
    vm.guest.health()?;
    vm.shutdown();
    Ok(())
}

/// The saved event-queue state says the driver was not live.
fn expect_not_live(blob: &[u8]) -> Result<()> {
    let (owned, live) = json_event_queue(blob)?;
    ensure!(
        !live,
        "the saved state says driver_live=true (event queue owned by backend: {owned}) for a \
         driver that never posted a buffer"
    );
    Ok(())
}

#[test]
fn snapshot_with_rings_never_started_restores_without_reset() -> Result<()> {
    let src = daemon(3, JSON_ARGS)?;
    let dst = daemon(3, JSON_ARGS)?;
    let res = (|| -> Result<()> {
        let sim = SimVmm::connect(&src.vms[0].socket, fresh_cfg(QueueSet::All))?;
        let blob = sim
            .save_state(XFER)
            .context("SAVE before any vring started")?;
        drop(sim);
        expect_not_live(&blob)?;
        restore_expect_no_reset(&dst, &blob)
    })();
    with_stderr(with_stderr(res, &src), &dst)
}

#[test]
fn snapshot_with_no_rx_buffers_ever_posted_restores_without_reset() -> Result<()> {
    let src = daemon(3, JSON_ARGS)?;
    let dst = daemon(3, JSON_ARGS)?;
    let res = (|| -> Result<()> {
        // Rings set up and enabled, but no driver ever posted a buffer.
        let mut sim = SimVmm::connect(&src.vms[0].socket, state_cfg(QueueSet::All))?;
        let bases = sim.stop_vrings()?;
        ensure!(
            bases.0.iter().flatten().all(|b| *b == 0),
            "bases {:?} with no buffer ever posted",
            bases.0
        );
        let blob = sim.save_state(XFER).context("SAVE")?;
        drop(sim);
        expect_not_live(&blob)?;
        restore_expect_no_reset(&dst, &blob)
    })();
    with_stderr(with_stderr(res, &src), &dst)
}

// ----- sections 4-7 live in blobs.rs and plugin_state.rs ---------------------------

/// The JSON serializer makes fields editable (the checksum is recomputed after an edit).
const JSON_ARGS: &[&str] = &[
    "--plugin",
    "policy=builtin:allow-group",
    "--plugin",
    "serializer=builtin:serializer-json",
];

mod blobs;
mod plugin_state;
