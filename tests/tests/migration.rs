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

// ----- 4. bad blobs -------------------------------------------------------------------

/// The JSON serializer makes fields editable (the checksum is recomputed after an edit).
const JSON_ARGS: &[&str] = &[
    "--plugin",
    "policy=builtin:allow-group",
    "--plugin",
    "serializer=builtin:serializer-json",
];

/// A good blob from a live driver of VM 3 (backend-owned event queue, connections open).
fn live_blob(s: &Setup) -> Result<Vec<u8>> {
    let mut vm = s.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
    let uds = vm.spec.uds_path.clone();
    let _c1 = guest_to_host(&vm.guest, &uds, 7000)?;
    let _c2 = host_to_guest(&vm.guest, &uds, 7001)?;
    let (_, blob) = suspend_and_save(&mut vm, XFER)?;
    vm.shutdown();
    Ok(blob)
}

fn bad_blobs(good: &[u8], offered_features: u64) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let f = parse_frame(good)?;
    ensure!(
        f.payload.first() == Some(&b'{'),
        "serializer-json payload does not start with '{{'"
    );
    let mut v: Vec<(&'static str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("header only", good[..f.len_at + 12].to_vec()),
        ("truncated to half", good[..good.len() / 2].to_vec()),
        ("truncated by one byte", good[..good.len() - 1].to_vec()),
    ];
    let mut flip = good.to_vec();
    let mid = f.len_at + 12 + f.payload.len() / 2;
    flip[mid] ^= 0x01;
    v.push(("payload byte flipped", flip));
    let mut magic = good.to_vec();
    magic[0] ^= 0x20;
    v.push(("wrong magic", magic));
    let mut ver = good.to_vec();
    ver[8..10].copy_from_slice(&(FORMAT + 1).to_le_bytes());
    v.push(("future format version", ver));
    let mut huge = good.to_vec();
    huge[f.len_at..f.len_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    v.push(("length field claims 1 TiB", huge));
    let mut big = f.payload.clone();
    big.resize(MAX_BLOB + 1024, b' ');
    v.push((
        "oversized (> 16 MiB, consistent header)",
        frame(&f.name, &big),
    ));
    v.push((
        "other serializer's name",
        frame("serializer-postcard", &f.payload),
    ));
    let mut garbage = f.payload.clone();
    garbage[0] = b'[';
    v.push((
        "undecodable payload, valid checksum",
        frame(&f.name, &garbage),
    ));
    let schema = json_get_number(&f.payload, "schema")?;
    v.push((
        "future serializer schema",
        frame(&f.name, &json_set_number(&f.payload, "schema", schema + 1)?),
    ));
    v.push((
        "wrong guest CID",
        frame(&f.name, &json_set_number(&f.payload, "guest_cid", 4)?),
    ));
    let acked = json_get_number(&f.payload, "acked_features")?;
    let unoffered = (0..64)
        .rev()
        .map(|b| 1u64 << b)
        .find(|b| offered_features & b == 0)
        .context("daemon offers every feature bit")?;
    v.push((
        "feature the daemon does not offer",
        frame(
            &f.name,
            &json_set_number(&f.payload, "acked_features", acked | unoffered)?,
        ),
    ));
    Ok(v)
}

#[test]
fn bad_blobs_are_refused_without_side_effects() -> Result<()> {
    let s = daemon(3, JSON_ARGS)?;
    let res = (|| -> Result<()> {
        let good = live_blob(&s)?;
        let offered = {
            let sim = SimVmm::connect(&s.vms[0].socket, fresh_cfg(QueueSet::All))?;
            sim.offered_features()
        };
        let cases = bad_blobs(&good, offered)?;
        let mut failures = Vec::new();
        for (name, blob) in &cases {
            let r = (|| -> Result<()> {
                let sim = SimVmm::connect(&s.vms[0].socket, fresh_cfg(QueueSet::All))?;
                let report = sim.load_state(blob, XFER)?;
                eprintln!(
                    "[bad-blob] {name:<42} {} bytes: {} (wrote {}{})",
                    blob.len(),
                    match &report.check {
                        Ok(()) => "ACCEPTED".to_string(),
                        Err(e) => format!("refused: {e}"),
                    },
                    report.written,
                    report
                        .write_error
                        .as_ref()
                        .map(|e| format!(", {e}"))
                        .unwrap_or_default()
                );
                ensure!(report.check.is_err(), "CHECK_DEVICE_STATE reported success");
                // Still usable, and nothing half-loaded: a fresh device sends no reset.
                let vm = start_after_load(sim, s.vms[0].clone())?;
                connections_work(&vm.guest, &s.vms[0].uds_path, 7100)?;
                std::thread::sleep(NO_EVENT_GRACE);
                ensure!(
                    vm.guest.events().is_empty(),
                    "events {:?} after a refused load (state half-applied?)",
                    vm.guest.events()
                );
                vm.guest.health()?;
                vm.shutdown();
                Ok(())
            })();
            if let Err(e) = r {
                failures.push(format!("{name}: {e:#}"));
            }
            if !alive(&s) {
                bail!("daemon died on blob `{name}`; failures so far: {failures:#?}");
            }
        }

        // A refused load then a good one on the same frontend: the good one applies.
        let sim = SimVmm::connect(&s.vms[0].socket, fresh_cfg(QueueSet::All))?;
        let r = sim.load_state(&good[..good.len() / 2], XFER)?;
        if r.check.is_ok() {
            failures.push("truncated blob before the good one: accepted".into());
        }
        match expect_loaded(&sim.load_state(&good, XFER)?, "good blob after a bad one") {
            Ok(()) => {
                let vm = start_after_load(sim, s.vms[0].clone())?;
                if !vm.guest.wait_events(0, PROMPT) {
                    failures.push(
                        "good blob (driver live, backend event queue): no TRANSPORT_RESET".into(),
                    );
                }
                connections_work(&vm.guest, &s.vms[0].uds_path, 7200)?;
                vm.guest.health()?;
                vm.shutdown();
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
        ensure!(
            failures.is_empty(),
            "{} of {} cases failed:\n{}",
            failures.len(),
            cases.len() + 1,
            failures.join("\n")
        );
        Ok(())
    })();
    with_stderr(res, &s)
}

/// A blob from a daemon serving another CID (a real blob, not an edited one).
#[test]
fn blob_of_another_cid_is_refused() -> Result<()> {
    let other = daemon(4, &[])?;
    let s = daemon(3, &[])?;
    let res = (|| -> Result<()> {
        let blob = live_blob(&other)?;
        let sim = SimVmm::connect(&s.vms[0].socket, fresh_cfg(QueueSet::All))?;
        let r = sim.load_state(&blob, XFER)?;
        ensure!(r.check.is_err(), "state of CID 4 loaded into CID 3");
        ensure!(alive(&s), "daemon died");
        let vm = start_after_load(sim, s.vms[0].clone())?;
        connections_work(&vm.guest, &s.vms[0].uds_path, 7300)?;
        vm.shutdown();
        Ok(())
    })();
    with_stderr(with_stderr(res, &other), &s)
}

// ----- 5. repeated save/load --------------------------------------------------------------

#[test]
fn hundred_save_load_cycles_leak_nothing() -> Result<()> {
    const CYCLES: usize = 100;
    /// Generous: a leaked plugin instance or blob per cycle would exceed it many times over.
    const RSS_SLACK_KIB: u64 = 24 * 1024;
    /// Lazily opened descriptors (a log file, an epoll set) may appear once.
    const FD_SLACK: usize = 2;
    let s = daemon(3, &[])?;
    let res = (|| -> Result<()> {
        let mut vm = s.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
        let uds = vm.spec.uds_path.clone();
        let _c1 = guest_to_host(&vm.guest, &uds, 8000)?;
        let _c2 = host_to_guest(&vm.guest, &uds, 8001)?;
        vm.guest.pause_interrupts()?;
        let bases = vm.sim.stop_vrings()?;
        let cycle = |i: usize| -> Result<usize> {
            let blob = vm
                .sim
                .save_state(XFER)
                .with_context(|| format!("SAVE {i}"))?;
            expect_loaded(&vm.sim.load_state(&blob, XFER)?, &format!("LOAD {i}"))?;
            Ok(blob.len())
        };
        for i in 0..3 {
            cycle(i)?;
        }
        let (fd0, rss0) = (s.daemon.open_fds()?, s.daemon.rss_kib()?);
        let t0 = Instant::now();
        let mut size = 0;
        for i in 0..CYCLES {
            size = cycle(i)?;
        }
        let elapsed = t0.elapsed();
        let (fd1, rss1) = (s.daemon.open_fds()?, s.daemon.rss_kib()?);
        eprintln!(
            "[migration] {CYCLES} save/load cycles ({size}-byte blob) in {elapsed:?}: fds \
             {fd0} -> {fd1}, VmRSS {rss0} -> {rss1} KiB"
        );
        ensure!(
            fd1 <= fd0 + FD_SLACK,
            "fd leak: {fd0} open before {CYCLES} cycles, {fd1} after"
        );
        ensure!(
            rss1 <= rss0 + RSS_SLACK_KIB,
            "memory leak: VmRSS {rss0} KiB before {CYCLES} cycles, {rss1} KiB after"
        );
        // The device still works, and a hundred loads reset at most once (whether a load into
        // the device's own stopped rings resets at all is `load_into_own_stopped_device_...`).
        vm.sim.resume_vrings(&bases)?;
        vm.guest.resume_interrupts();
        vm.guest.wait_events(0, NO_EVENT_GRACE);
        connections_work(&vm.guest, &uds, 8100)?;
        std::thread::sleep(NO_EVENT_GRACE);
        ensure!(
            vm.guest.events().len() <= 1,
            "events after {CYCLES} loads: {:?}, want at most one reset",
            vm.guest.events()
        );
        vm.guest.health()?;
        Ok(())
    })();
    with_stderr(res, &s)
}

/// The contract read literally: after any LOAD of a live state with a backend-owned event
/// queue, one TRANSPORT_RESET once the rings run, also when the LOAD went into the same
/// device's stopped rings (a snapshot restore in place).
#[test]
fn load_into_own_stopped_device_resets_once() -> Result<()> {
    let s = daemon(3, JSON_ARGS)?;
    let res = (|| -> Result<()> {
        let mut vm = s.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
        let uds = vm.spec.uds_path.clone();
        let (gs, mut h) = guest_to_host(&vm.guest, &uds, 8200)?;
        vm.guest.pause_interrupts()?;
        let bases = vm.sim.stop_vrings()?;
        // Two rounds: a SAVE right after a LOAD (rings not run since) must still describe a
        // live driver.
        for round in 0..2 {
            let blob = vm.sim.save_state(XFER)?;
            let eq = json_event_queue(&blob)?;
            ensure!(
                eq == (true, true),
                "SAVE {round}: event queue state (owned by backend, driver live) = {eq:?}, want \
                 (true, true)"
            );
            expect_loaded(
                &vm.sim.load_state(&blob, XFER)?,
                &format!("LOAD {round} in place"),
            )?;
        }
        vm.sim.resume_vrings(&bases)?;
        vm.guest.resume_interrupts();
        ensure!(
            vm.guest.wait_events(0, PROMPT),
            "no TRANSPORT_RESET after loading a live state into the stopped device"
        );
        ensure!(
            gs.wait_closed(PROMPT),
            "connection from before the load survived the reset"
        );
        expect_host_eof(&mut h, "host peer of a connection from before the load")?;
        connections_work(&vm.guest, &uds, 8300)?;
        std::thread::sleep(NO_EVENT_GRACE);
        ensure!(
            vm.guest.events() == vec![EVENT_TRANSPORT_RESET],
            "events: {:?}, want one reset",
            vm.guest.events()
        );
        vm.guest.health()
    })();
    with_stderr(res, &s)
}

// ----- 6. 1,000 connections ----------------------------------------------------------------

fn raise_fd_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid resource and a pointer to a live struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

#[test]
fn thousand_connections_save_and_load_into_fresh_daemon() -> Result<()> {
    const N: u32 = 1000;
    raise_fd_limit();
    let src = daemon(3, &[])?;
    let dst = daemon(3, &[])?;
    let res = (|| -> Result<()> {
        let mut vm = src.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
        let uds = vm.spec.uds_path.clone();
        let l = host_listen(&uds, 9000)?;
        let mut conns = Vec::with_capacity(N as usize);
        for i in 0..N {
            let gs = vm
                .guest
                .connect(HOST_CID, 9000, SockType::Stream)
                .map_err(|e| anyhow!("connection {i}: {e}"))?;
            let h = accept_timeout(&l, HOST_TIMEOUT).with_context(|| format!("accept {i}"))?;
            conns.push((gs, h));
        }
        vm.guest.pause_interrupts()?;
        let bases = vm.sim.stop_vrings()?;
        let t0 = Instant::now();
        let blob = vm.sim.save_state(XFER)?;
        let save = t0.elapsed();
        let sim = SimVmm::connect(&dst.vms[0].socket, fresh_cfg(QueueSet::All))?;
        let t1 = Instant::now();
        let report = sim.load_state(&blob, XFER)?;
        let load = t1.elapsed();
        expect_loaded(&report, "fresh daemon")?;
        eprintln!(
            "[migration] {N} open connections: blob {} bytes, save {:.2} ms, load {:.2} ms, \
             save+load {:.2} ms (bases {:?})",
            blob.len(),
            save.as_secs_f64() * 1e3,
            load.as_secs_f64() * 1e3,
            (save + load).as_secs_f64() * 1e3,
            bases.0
        );
        // The source VMM leaves: every host peer sees its connection close.
        vm.sim.disconnect();
        for (i, (_, h)) in conns.iter_mut().enumerate() {
            expect_host_eof(h, &format!("host peer {i}"))?;
        }
        drop(sim);
        Ok(())
    })();
    with_stderr(with_stderr(res, &src), &dst)
}

// ----- 7. plugin state across plugin versions ------------------------------------------

/// Both versions under one plugin name, so that the state record's entry matches.
const ALLOWLIST_V1: &[&str] = &[
    "--plugin",
    "policy=builtin:port-allowlist-v1,name=allowlist,config=allow=2:*",
    "--plugin",
    "serializer=builtin:serializer-json",
];
const ALLOWLIST_V2: &[&str] = &[
    "--plugin",
    "policy=builtin:port-allowlist,name=allowlist,config=allow=2:*",
    "--plugin",
    "serializer=builtin:serializer-json",
];

/// (schema, hits of rule `2:*`) of the `allowlist` plugin state in a serializer-json blob.
/// Both versions start their data with the schema-1 body: (rule key, hits) pairs.
fn allowlist_hits(blob: &[u8]) -> Result<(u32, u64)> {
    let states = json_plugin_states(blob)?;
    let st = states
        .iter()
        .find(|p| p.name == "allowlist")
        .with_context(|| format!("no allowlist state among {states:?}"))?;
    let mut r = StateReader::new(&st.data);
    for _ in 0..r.u32()? {
        let key = r.bytes()?;
        let hits = r.u64()?;
        if key == b"2:*" {
            return Ok((st.schema, hits));
        }
    }
    bail!("no rule `2:*` in the allowlist state")
}

/// A blob from a daemon with `args` whose VM made `n` allowed connections; also returns the
/// blob taken before any connection.
fn plugin_blobs(s: &Setup, n: u32) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut vm = s.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
    let uds = vm.spec.uds_path.clone();
    let before = snapshot(&mut vm, XFER)?;
    for i in 0..n {
        guest_to_host(&vm.guest, &uds, 9500 + i)?;
    }
    let after = snapshot(&mut vm, XFER)?;
    vm.shutdown();
    Ok((before, after))
}

#[test]
fn plugin_state_v1_loads_into_v2() -> Result<()> {
    let src = daemon(3, ALLOWLIST_V1)?;
    let dst = daemon(3, ALLOWLIST_V2)?;
    let res = (|| -> Result<()> {
        let (blob0, blob5) = plugin_blobs(&src, 5)?;
        ensure!(
            blob0 != blob5,
            "the blob after 5 allowed connections equals the one before: the v1 hit counters \
             are not in the state"
        );
        ensure!(
            allowlist_hits(&blob5)? == (1, 5),
            "v1 state after 5 connections: {:?}",
            allowlist_hits(&blob5)?
        );
        let sim = SimVmm::connect(&dst.vms[0].socket, fresh_cfg(QueueSet::All))?;
        expect_loaded(&sim.load_state(&blob5, XFER)?, "v1 state into v2")?;
        ensure!(alive(&dst), "v2 daemon died");
        let mut vm = start_after_live_load(sim, dst.vms[0].clone())?;
        // `allow=2:*` admits guest -> host connections only.
        guest_to_host(&vm.guest, &dst.vms[0].uds_path, 9600)
            .context("guest -> host after the load")?;
        // v2 carried the 5 hits over and counted one more.
        let v2 = allowlist_hits(&snapshot(&mut vm, XFER)?)?;
        ensure!(
            v2 == (2, 6),
            "v2 state after the load and one connection: {v2:?}"
        );
        vm.shutdown();
        Ok(())
    })();
    with_stderr(with_stderr(res, &src), &dst)
}

#[test]
fn plugin_state_v2_into_v1_is_refused() -> Result<()> {
    let src = daemon(3, ALLOWLIST_V2)?;
    let dst = daemon(3, ALLOWLIST_V1)?;
    let res = (|| -> Result<()> {
        let (_, blob) = plugin_blobs(&src, 3)?;
        let sim = SimVmm::connect(&dst.vms[0].socket, fresh_cfg(QueueSet::All))?;
        let r = sim.load_state(&blob, XFER)?;
        ensure!(
            r.check.is_err(),
            "v2 plugin state (schema 2) loaded into a daemon running port-allowlist v1"
        );
        ensure!(alive(&dst), "v1 daemon died");
        let log = dst.daemon.stderr();
        ensure!(
            log.contains("schema"),
            "the v1 daemon's log does not say why the load failed (no mention of the schema)"
        );
        // The refused load changed nothing: the v1 device works and its policy still allows.
        let vm = start_after_load(sim, dst.vms[0].clone())?;
        // `allow=2:*` admits guest -> host connections only.
        guest_to_host(&vm.guest, &dst.vms[0].uds_path, 9700)
            .context("guest -> host after the refused load")?;
        vm.shutdown();
        Ok(())
    })();
    with_stderr(with_stderr(res, &src), &dst)
}
