//! Aggregate guest -> host throughput: several connections of one VM, or one connection on
//! each of several VMs, moving data at the same time through one daemon. Every connection's
//! bytes are checksum verified; the figure is the total over the wall time of the slowest.

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Instant;

use anyhow::{anyhow, Result};

use super::opts::{bytes_for, Opts, MAIN_WRITE};
use super::report::Row;
use super::results::{harness_limited, log, Results};
use super::rig::cpu_secs;
use super::stream::{join, recv_all, send_all, verify, Transfer, GUEST_WORKER};
use super::threads::{busiest_delta, named_threads};
use super::Rig;
use crate::data::Digest;
use crate::driver::GuestSocket;
use crate::harness::TestVm;
use crate::host::{accept_timeout, host_listen, HOST_TIMEOUT};
use crate::packet::HOST_CID;
use crate::{DaemonKind, SockType};

/// One open guest -> host connection of the run.
struct Flow {
    guest: GuestSocket,
    host: UnixStream,
    seed: u64,
}

/// Moves `total` bytes guest -> host, split evenly over `conns` connections on each of the
/// rig's first `vms` VMs, all at once, in writes of `write` bytes. Connection setup is not
/// timed.
pub fn guest_to_host(
    rig: &mut Rig,
    vms: usize,
    conns: usize,
    total: u64,
    write: usize,
) -> Result<Transfer> {
    let all: Vec<&TestVm> = std::iter::once(&rig.vm).chain(&rig.more).collect();
    if vms == 0 || conns == 0 || vms > all.len() {
        return Err(anyhow!(
            "aggregate run needs 1..={} VMs and at least one connection",
            all.len()
        ));
    }
    let n = (vms * conns) as u64;
    let each = (total / n).max(1);
    let mut flows = Vec::new();
    for vm in &all[..vms] {
        for _ in 0..conns {
            let port = rig.port();
            let l = host_listen(&vm.spec.uds_path, port)?;
            let guest = vm
                .guest
                .connect(HOST_CID, port, SockType::Stream)
                .map_err(|e| anyhow!("guest {} connect to port {port}: {e}", vm.spec.guest_cid))?;
            let host = accept_timeout(&l, HOST_TIMEOUT)?;
            flows.push(Flow {
                guest,
                host,
                seed: u64::from(port),
            });
        }
    }
    let stats0: Vec<_> = all[..vms].iter().map(|v| v.guest.stats()).collect();
    let daemon0 = rig.cpu_secs()?;
    let self0 = cpu_secs(std::process::id())?;
    let w0 = named_threads(GUEST_WORKER)?;
    let t0 = Instant::now();
    let ends: Vec<_> = thread::scope(|sc| {
        let handles: Vec<_> = flows
            .iter()
            .map(|f| {
                let tx = sc.spawn(move || -> Result<(Digest, f64)> {
                    Ok(send_all(
                        |b| f.guest.send_prebuilt(b, f.seed),
                        f.seed,
                        each,
                        write,
                    )?)
                });
                let rx = sc.spawn(move || -> Result<(Digest, f64)> {
                    Ok(recv_all(&f.host, each, write)?)
                });
                (tx, rx)
            })
            .collect();
        handles
            .into_iter()
            .map(|(tx, rx)| (join(tx), join(rx)))
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let w1 = named_threads(GUEST_WORKER)?;
    let self_cpu = cpu_secs(std::process::id())? - self0;
    let daemon_cpu = rig.cpu_secs()? - daemon0;
    let mut busiest = busiest_delta(&w0, &w1);
    for (i, (sent, got)) in ends.into_iter().enumerate() {
        let (sent, got) = (sent?, got?);
        verify(sent.0, got.0, &format!("aggregate flow {i}"))?;
        busiest = busiest.max(sent.1).max(got.1);
    }
    let (mut interrupts, mut kicks) = (0, 0);
    for (vm, s0) in all[..vms].iter().zip(stats0) {
        let s1 = vm.guest.stats();
        interrupts += s1.interrupts - s0.interrupts;
        kicks += s1.kicks - s0.kicks;
    }
    drop(flows);
    rig.check()?;
    Ok(Transfer {
        bytes: each * n,
        secs,
        daemon_cpu,
        self_cpu,
        interrupts,
        kicks,
        busiest_cpu: busiest,
    })
}

/// Aggregate guest->host scenarios: label, VMs, connections per VM.
pub const AGGREGATES: [(&str, usize, usize); 4] = [
    ("1 connection", 1, 1),
    ("4 connections", 1, 4),
    ("16 connections", 1, 16),
    ("4 VMs, 1 connection each", 4, 1),
];

/// Aggregate guest->host throughput on a 4-VM rig per daemon, repetitions interleaved.
pub fn aggregates(o: &Opts, t0: Instant, res: &mut Results) -> Result<()> {
    let mut rigs = Vec::new();
    for &k in &o.kinds {
        rigs.push(Rig::with_vms(k, &[], o.tx_buffer_size, 4)?);
    }
    for rep in 0..o.reps {
        for (label, vms, conns) in AGGREGATES {
            for rig in rigs.iter_mut() {
                let who = rig.kind().name();
                let key = format!("agg-{vms}-{conns}");
                if res.error(&key, who).is_some() {
                    continue;
                }
                let total = bytes_for(o, MAIN_WRITE);
                match guest_to_host(rig, vms, conns, total, MAIN_WRITE) {
                    Ok(t) => {
                        log(
                            t0,
                            format!(
                                "rep {rep} {who} guest->host {label}: {:.0} MiB/s; daemon {:.0}% \
                                 of a core, {:.0} ms CPU/GiB; busiest harness thread {:.0}%",
                                t.mib_s(),
                                t.daemon_pct(),
                                t.daemon_ms_per_gib(),
                                t.busiest_pct()
                            ),
                        );
                        res.push(&key, who, t.mib_s());
                        res.push(&format!("cpu-{key}"), who, t.daemon_ms_per_gib());
                        res.push(&format!("bpct-{key}"), who, t.busiest_pct());
                    }
                    Err(e) => res.fail(t0, &key, who, &e),
                }
            }
        }
    }
    Ok(())
}

/// Rows of the aggregate scenarios.
pub fn aggregate_rows(res: &Results) -> Vec<Row> {
    let (plug, peer) = (DaemonKind::VhostPlug.name(), DaemonKind::Peer.name());
    let mut rows = Vec::new();
    for (label, vms, conns) in AGGREGATES {
        let key = format!("agg-{vms}-{conns}");
        let mut row = Row::new(
            format!("aggregate guest->host, {label}, 64 KiB writes"),
            "MiB/s",
        )
        .values(res.median(&key, plug), res.median(&key, peer));
        if let Some(why) = harness_limited(res, &key) {
            row = row.withhold(why);
        }
        rows.push(row);
        let cpu = format!("cpu-{key}");
        rows.push(
            Row::new(
                format!("daemon CPU per GiB, aggregate guest->host, {label}"),
                "ms",
            )
            .values(res.median(&cpu, plug), res.median(&cpu, peer)),
        );
    }
    rows
}
