//! Suspend and resume (design.md section 3): `GET_VRING_BASE` on every ring stops the device
//! with descriptors in flight; while stopped the daemon writes no guest memory and signals no
//! call eventfd, host data and host connects wait; the driver may add buffers meanwhile;
//! resuming picks everything up, every byte delivered exactly once.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test suspend -- --nocapture`.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_plug_tests::data::{recv_digest, Digest, Digester, Pattern};
use vhost_plug_tests::harness::{Setup, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_connect, host_listen, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::sim::{EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use vhost_plug_tests::{DaemonKind, DriverConfig, QueueSet, SimConfig, SimVmm, SockType};

/// Bound for things a correct daemon does at once.
const PROMPT: Duration = Duration::from_secs(10);
/// How long the device is watched for activity while stopped.
const QUIET: Duration = Duration::from_millis(200);

fn state_cfg(queues: QueueSet) -> SimConfig {
    SimConfig {
        queues,
        extra_protocol_features: VhostUserProtocolFeatures::DEVICE_STATE,
        ..SimConfig::default()
    }
}

fn active_queues(sim: &SimVmm) -> Vec<usize> {
    [RX_QUEUE, TX_QUEUE, EVENT_QUEUE]
        .into_iter()
        .filter(|i| sim.queue(*i).is_some_and(|q| q.active))
        .collect()
}

/// Writes `total` pattern bytes, counting progress in `written`; half-closes at the end.
fn host_writer(
    mut s: std::os::unix::net::UnixStream,
    seed: u64,
    total: u64,
    written: &AtomicU64,
) -> Result<Digest> {
    // The writer may wait out a whole suspension in one write.
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut d = Digester::default();
    let mut left = total;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        p.fill(&mut buf[..n]);
        s.write_all(&buf[..n])
            .with_context(|| format!("host write after {} bytes", total - left))?;
        d.update(&buf[..n]);
        left -= n as u64;
        written.fetch_add(n as u64, Ordering::Relaxed);
    }
    s.shutdown(Shutdown::Write)?;
    Ok(d.finish())
}

/// Waits until `cond` holds, polling; false at the deadline.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// With the driver frozen, watches the stopped device for `QUIET`: no call eventfd may fire
/// and guest memory must stay byte for byte the same.
fn expect_quiescent(vm: &TestVm, what: &str) -> Result<()> {
    let active = active_queues(&vm.sim);
    let before = vm.sim.snapshot_memory()?;
    std::thread::sleep(QUIET);
    let mut errors = Vec::new();
    for idx in &active {
        if vm.sim.take_call(*idx)? {
            errors.push(format!("call eventfd of vring {idx} signalled"));
        }
    }
    let after = vm.sim.snapshot_memory()?;
    let changed: Vec<usize> = before
        .iter()
        .zip(after.iter())
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    if let Some(first) = changed.first() {
        errors.push(format!(
            "{} bytes of guest memory changed, first at {first:#x} ({}), last at {:#x} ({})",
            changed.len(),
            vm.sim.describe_addr(*first as u64),
            changed[changed.len() - 1],
            vm.sim.describe_addr(changed[changed.len() - 1] as u64),
        ));
    }
    if !errors.is_empty() {
        bail!(
            "{what}: the device was not quiescent while stopped: {}",
            errors.join("; ")
        );
    }
    Ok(())
}

/// The suspend scenario of issue 5: host data streams into the guest; the rings are stopped
/// with rx descriptors in flight; while stopped the device stays silent although the host
/// keeps writing and a host program connects; the driver re-posts buffers (and kicks) while
/// stopped; after resume every byte arrives exactly once and the waiting connect completes.
fn suspend_mid_stream(queues: QueueSet) -> Result<()> {
    const TOTAL: u64 = 24 << 20;
    const SEED: u64 = 0x5_05e;
    let s = Setup::new(DaemonKind::VhostPlug, &[3])?;
    // A window far larger than the rx ring holds: at the stop the device is short of
    // buffers, not of credit, so once the driver re-posts buffers it could write at once.
    let drv = DriverConfig {
        buf_alloc: 16 << 20,
        ..DriverConfig::default()
    };
    let mut vm = s.boot_with(0, state_cfg(queues), drv)?;
    let uds = vm.spec.uds_path.clone();
    let gl = vm.guest.listen(5000, SockType::Stream)?;
    let gl2 = vm.guest.listen(5001, SockType::Stream)?;
    let (h, _) = host_connect(&uds, 5000)?;
    let gs = gl.accept(PROMPT)?;
    let written = AtomicU64::new(0);
    let late_connect_started = AtomicBool::new(false);

    let outcome = std::thread::scope(|sc| -> Result<()> {
        let writer = sc.spawn(|| host_writer(h, SEED, TOTAL, &written));
        let reader = sc.spawn(|| recv_digest(&gs, TOTAL + 1, 64 * 1024));

        // Stop mid-stream, with the device holding rx buffers.
        ensure!(
            wait_until(PROMPT, || Ok(vm.guest.stats().rx_bytes >= 1 << 20))?,
            "less than 1 MiB reached the guest within {PROMPT:?}"
        );
        vm.guest.pause_interrupts()?;
        // Let the device fill buffers the (paused) driver has not consumed yet, so that
        // completed-but-unseen and in-flight descriptors both exist at the stop.
        let seen = vm.guest.ring_state(RX_QUEUE).context("rx ring")?.last_used;
        ensure!(
            wait_until(PROMPT, || Ok(vm.sim.used_idx(RX_QUEUE)? != seen))?,
            "the device used no rx buffer within {PROMPT:?} while data was pending"
        );
        let t_stop = Instant::now();
        let bases = vm.sim.stop_vrings().context("suspending")?;
        let stop_time = t_stop.elapsed();
        let used_at_stop = vm.sim.used_idx(RX_QUEUE)?;
        ensure!(
            bases.get(RX_QUEUE) == Some(used_at_stop),
            "rx: GET_VRING_BASE returned {:?} but used idx is {used_at_stop}: in-flight rx \
             descriptors were not published before the reply",
            bases.get(RX_QUEUE)
        );
        ensure!(
            bases.get(TX_QUEUE) == Some(vm.sim.used_idx(TX_QUEUE)?),
            "tx: GET_VRING_BASE returned {:?} but used idx is {}: in-flight tx descriptors \
             were not published before the reply",
            bases.get(TX_QUEUE),
            vm.sim.used_idx(TX_QUEUE)?
        );

        // Window 1: the host keeps writing and a host program connects; nothing may reach
        // guest memory or the call eventfds.
        let late = sc.spawn(|| {
            late_connect_started.store(true, Ordering::SeqCst);
            host_connect(&uds, 5001)
        });
        {
            let _frozen = vm.guest.freeze();
            // Signals sent before the GET_VRING_BASE replies are allowed; clear them.
            for idx in active_queues(&vm.sim) {
                vm.sim.take_call(idx)?;
            }
            let w0 = written.load(Ordering::Relaxed);
            expect_quiescent(&vm, "window 1 (host writing, host connecting)")?;
            eprintln!(
                "[suspend] {queues:?}: stop took {stop_time:?}; host wrote {} KiB during window 1",
                (written.load(Ordering::Relaxed) - w0) / 1024
            );
        }
        ensure!(
            late_connect_started.load(Ordering::SeqCst),
            "late connect thread did not start"
        );

        // The driver consumes what was published at the stop and re-posts those rx buffers
        // (kicking as the ring asks) while the device is stopped.
        let rx_before = vm.guest.ring_state(RX_QUEUE).context("rx ring")?;
        vm.guest.service_all();
        vm.guest.health()?;
        let rx_after = vm.guest.ring_state(RX_QUEUE).context("rx ring")?;
        ensure!(
            rx_after.avail_idx != rx_before.avail_idx,
            "the driver had no rx buffer to re-post while stopped ({rx_before:?})"
        );

        // Window 2: the device ignores the new buffers and kicks while stopped, with credit
        // to spare and host data waiting.
        {
            let _frozen = vm.guest.freeze();
            let w0 = written.load(Ordering::Relaxed);
            expect_quiescent(&vm, "window 2 (driver added buffers and kicked)")?;
            eprintln!(
                "[suspend] {queues:?}: host wrote {} KiB during window 2",
                (written.load(Ordering::Relaxed) - w0) / 1024
            );
        }

        // No kick is left pending: the device must look at the rings on resume by itself.
        let mut pending_kicks = Vec::new();
        for idx in active_queues(&vm.sim) {
            if vm.sim.take_kick(idx)? {
                pending_kicks.push(idx);
            }
        }
        vm.sim.resume_vrings(&bases).context("resuming")?;
        vm.guest.resume_interrupts();
        eprintln!(
            "[suspend] {queues:?}: bases {:?}, rx avail {} -> {} while stopped, kicks cleared on \
             {pending_kicks:?}",
            bases.0, rx_before.avail_idx, rx_after.avail_idx
        );

        let sent = writer
            .join()
            .map_err(|_| anyhow!("writer panicked"))?
            .context("host writer")?;
        let got = reader
            .join()
            .map_err(|_| anyhow!("reader panicked"))?
            .context("guest reader")?;
        ensure!(
            got == sent,
            "guest received {got:?}, host sent {sent:?} (bytes lost or duplicated across the \
             suspension)"
        );
        ensure!(sent.bytes == TOTAL, "host sent {} of {TOTAL}", sent.bytes);
        let (mut h2, _) = late
            .join()
            .map_err(|_| anyhow!("late connect panicked"))?
            .context("host connect issued while stopped")?;
        let gs2 = gl2.accept(PROMPT)?;
        h2.write_all(b"late")?;
        let mut b = [0u8; 4];
        (&gs2).read_exact(&mut b)?;
        ensure!(&b == b"late", "late connection carried {b:?}");
        Ok(())
    });
    let health = vm.guest.health();
    outcome.with_context(|| format!("daemon stderr:\n{}", s.daemon.stderr()))?;
    health
}

#[test]
fn suspend_mid_stream_is_quiescent_and_resume_delivers_exactly_once() -> Result<()> {
    suspend_mid_stream(QueueSet::All)
}

#[test]
fn suspend_mid_stream_qemu_style_queues() -> Result<()> {
    suspend_mid_stream(QueueSet::RxTx)
}

/// Many short suspensions while data flows both ways: each stop finishes what is in flight,
/// each resume continues; an echo through the host comes back unchanged.
#[test]
fn repeated_suspend_resume_during_bidirectional_stream() -> Result<()> {
    const TOTAL: usize = 32 << 20;
    const CYCLES: usize = 20;
    let s = Setup::new(DaemonKind::VhostPlug, &[3])?;
    let mut vm = s.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
    let l = host_listen(&vm.spec.uds_path, 5100)?;
    let gs = vm
        .guest
        .connect(HOST_CID, 5100, SockType::Stream)
        .map_err(|e| anyhow!("{e}"))?;
    let h = accept_timeout(&l, HOST_TIMEOUT)?;
    h.set_read_timeout(Some(Duration::from_secs(60)))?;
    h.set_write_timeout(Some(Duration::from_secs(60)))?;
    let data = Pattern::bytes(77, TOTAL);
    let done = AtomicBool::new(false);
    let res = std::thread::scope(|sc| -> Result<()> {
        let echo = sc.spawn(|| vhost_plug_tests::harness::echo_stream(h));
        let xfer = sc.spawn(|| {
            let r = vhost_plug_tests::harness::exchange(&gs, &data);
            done.store(true, Ordering::SeqCst);
            r
        });
        let mut cycles = 0;
        while cycles < CYCLES && !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
            let bases = vm.sim.stop_vrings().context("suspending")?;
            std::thread::sleep(Duration::from_millis(2));
            vm.sim.resume_vrings(&bases).context("resuming")?;
            cycles += 1;
        }
        let back = xfer
            .join()
            .map_err(|_| anyhow!("exchange panicked"))?
            .context("echo exchange")?;
        ensure!(
            back == data,
            "echoed bytes differ after {cycles} suspensions"
        );
        gs.shutdown(false, true)?;
        let echoed = echo
            .join()
            .map_err(|_| anyhow!("echo panicked"))?
            .context("host echo")?;
        ensure!(echoed == TOTAL as u64, "host echoed {echoed} of {TOTAL}");
        eprintln!("[suspend] {cycles} suspend/resume cycles during an {TOTAL}-byte echo");
        Ok(())
    });
    res.with_context(|| format!("daemon stderr:\n{}", s.daemon.stderr()))?;
    vm.guest.health()
}

/// Guest -> host with backpressure: the host program stops reading, so the daemon holds
/// guest data it cannot deliver and the tx ring backs up; the device is suspended in that
/// state. Every tx chain is finished by the reply, the device stays silent, and after resume
/// the host receives every byte exactly once.
#[test]
fn suspend_with_guest_to_host_backpressure() -> Result<()> {
    const TOTAL: u64 = 8 << 20;
    const SEED: u64 = 0xbac4;
    let s = Setup::new(DaemonKind::VhostPlug, &[3])?;
    let mut vm = s.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
    let l = host_listen(&vm.spec.uds_path, 5200)?;
    let mut gs = vm
        .guest
        .connect(HOST_CID, 5200, SockType::Stream)
        .map_err(|e| anyhow!("{e}"))?;
    gs.set_timeout(Duration::from_secs(60));
    let mut h = accept_timeout(&l, HOST_TIMEOUT)?;
    h.set_read_timeout(Some(Duration::from_secs(60)))?;
    let res = std::thread::scope(|sc| -> Result<()> {
        let sender = sc.spawn(|| -> Result<Digest> {
            let d = vhost_plug_tests::data::send_pattern(&gs, SEED, TOTAL, 64 * 1024)?;
            gs.shutdown(false, true)?;
            Ok(d)
        });
        // Read the first MiB, then stop reading until the guest is held back.
        let mut first = vec![0u8; 1 << 20];
        h.read_exact(&mut first)?;
        let mut last = vm.guest.stats().tx_bytes;
        ensure!(
            wait_until(PROMPT, || {
                std::thread::sleep(Duration::from_millis(20));
                let now = vm.guest.stats().tx_bytes;
                let stalled = now == last;
                last = now;
                Ok(stalled)
            })?,
            "the guest never stalled although the host stopped reading"
        );
        vm.guest.pause_interrupts()?;
        let bases = vm.sim.stop_vrings().context("suspending")?;
        for idx in [RX_QUEUE, TX_QUEUE] {
            let used = vm.sim.used_idx(idx)?;
            ensure!(
                bases.get(idx) == Some(used),
                "vring {idx}: GET_VRING_BASE returned {:?} but used idx is {used}: chains in \
                 flight at the reply",
                bases.get(idx)
            );
        }
        {
            let _frozen = vm.guest.freeze();
            for idx in active_queues(&vm.sim) {
                vm.sim.take_call(idx)?;
            }
            expect_quiescent(&vm, "stopped with guest data held back")?;
        }
        vm.guest.service_all();
        {
            let _frozen = vm.guest.freeze();
            expect_quiescent(&vm, "stopped, driver serviced its rings")?;
        }
        let tx = vm.guest.ring_state(TX_QUEUE).context("tx ring")?;
        eprintln!(
            "[suspend] backpressure: stopped after {} guest bytes sent; bases {:?}; tx ring \
             {tx:?}",
            vm.guest.stats().tx_bytes,
            bases.0
        );
        vm.sim.resume_vrings(&bases).context("resuming")?;
        vm.guest.resume_interrupts();
        let mut d = Digester::default();
        d.update(&first);
        let rest = recv_digest(&mut h, u64::MAX, 64 * 1024)?;
        let sent = sender
            .join()
            .map_err(|_| anyhow!("sender panicked"))?
            .context("guest sender")?;
        let head = d.finish();
        ensure!(
            head.bytes + rest.bytes == sent.bytes,
            "host received {} bytes, guest sent {}",
            head.bytes + rest.bytes,
            sent.bytes
        );
        // Recompute the whole digest from the pattern for the byte-exact comparison.
        let mut all = Pattern::bytes(SEED, TOTAL as usize);
        let expect_rest = vhost_plug_tests::data::digest(&all.split_off(first.len()));
        ensure!(
            all == first && rest == expect_rest,
            "bytes changed across the suspension (lost, duplicated or reordered)"
        );
        Ok(())
    });
    res.with_context(|| format!("daemon stderr:\n{}", s.daemon.stderr()))?;
    vm.guest.health()
}
