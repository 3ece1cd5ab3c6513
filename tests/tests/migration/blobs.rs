//! Bad blobs, repeated save/load, and a 1,000-connection state.

use super::*;

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
