//! The daemon-wide cap on held guest bytes (`--max-buffered`): 10,000 connections whose host
//! ends never read, each filled with every byte of credit the daemon gave, and the daemon's
//! RSS stays within the cap plus the connections' own cost.
//!
//! Prints `[buffer-cap]` lines with the measured numbers. `VHOST_PLUG_CAP_BYTES` overrides
//! the cap (64 MiB) to measure other settings, e.g. one too large to matter.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vhost_plug_tests::harness::Setup;
use vhost_plug_tests::host::{accept_timeout, host_listen};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::sim::TX_QUEUE;
use vhost_plug_tests::{DaemonKind, SockType, VmSpec};

const CONNECTIONS: usize = 10_000;
/// The smallest window the daemon grants (`vhost_plug::budget::MIN_WINDOW`).
const MIN_WINDOW: u64 = 4096;

fn raise_fd_limit() -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    ensure!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0);
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads one rlimit.
    ensure!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0);
    ensure!(
        lim.rlim_cur as usize > CONNECTIONS + 1000,
        "need more than {} open files, have {}",
        CONNECTIONS + 1000,
        lim.rlim_cur
    );
    Ok(())
}

#[test]
fn ten_thousand_stalled_windows_stay_within_the_cap() -> Result<()> {
    raise_fd_limit()?;
    let cap: u64 = match std::env::var("VHOST_PLUG_CAP_BYTES") {
        Ok(v) => v.parse().context("VHOST_PLUG_CAP_BYTES")?,
        Err(_) => 64 << 20,
    };
    let cap_arg = cap.to_string();
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3)],
        &["--max-buffered", &cap_arg],
    )?;
    let vm = s.boot(0)?;
    let l = host_listen(&vm.spec.uds_path, 9000)?;
    let base = s.daemon.rss_kib()?;

    let mut guests = Vec::with_capacity(CONNECTIONS);
    let mut hosts = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        guests.push(vm.guest.connect(HOST_CID, 9000, SockType::Stream)?);
        hosts.push(accept_timeout(&l, Duration::from_secs(5))?);
    }
    let idle = s.daemon.rss_kib()?;

    // Every connection sends all the credit it was given; nobody reads.
    let chunk = vhost_plug_tests::data::Pattern::bytes(1, 256 << 10);
    let mut sent = Vec::with_capacity(CONNECTIONS);
    let mut windows: u64 = 0;
    for g in &guests {
        let c = g.credit_info().context("credit")?;
        let credit = c.peer_buf_alloc - c.tx_cnt.wrapping_sub(c.peer_fwd_cnt);
        g.send(&chunk[..credit as usize])?;
        sent.push(credit as usize);
        windows += u64::from(c.peer_buf_alloc);
    }
    // Until the device has taken every packet off the tx ring.
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.sim.used_idx(TX_QUEUE)? != vm.sim.avail_idx(TX_QUEUE)? {
        ensure!(
            Instant::now() < deadline,
            "the device stopped taking packets"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let stalled = s.daemon.rss_kib()?;
    let full = guests
        .iter()
        .filter(|g| {
            g.credit_info()
                .is_some_and(|c| c.peer_buf_alloc >= 256 << 10)
        })
        .count();
    let bound_kib = (cap + CONNECTIONS as u64 * MIN_WINDOW) / 1024;
    eprintln!(
        "[buffer-cap] cap {} MiB, {CONNECTIONS} connections: RSS {base} KiB at start, {idle} KiB \
         idle (+{} B per connection), {stalled} KiB stalled (+{} KiB held); windows granted {} \
         MiB in all, {full} of them the full 256 KiB; bound on held bytes {bound_kib} KiB",
        cap >> 20,
        (idle - base) * 1024 / CONNECTIONS as u64,
        stalled - idle,
        windows >> 20,
    );
    ensure!(
        windows <= cap + CONNECTIONS as u64 * MIN_WINDOW,
        "windows granted ({windows} B) exceed the cap plus one minimum window per connection"
    );
    ensure!(
        stalled - idle <= bound_kib,
        "held {} KiB, more than the cap allows ({bound_kib} KiB)",
        stalled - idle
    );

    // Nothing was lost: the first and the last connection deliver every byte once read.
    for i in [0, CONNECTIONS - 1] {
        let mut got = vec![0u8; sent[i]];
        hosts[i].set_read_timeout(Some(Duration::from_secs(5)))?;
        hosts[i].read_exact(&mut got)?;
        ensure!(
            got[..] == chunk[..sent[i]],
            "connection {i} delivered other bytes"
        );
    }
    drop(guests);
    vm.guest.health()
}
