//! Two real Linux guests in one sibling group of one daemon, on each of Debian's guest
//! kernels (6.1 from `linux-image-amd64`, 6.12 from `linux-image-6.12-amd64`): socket-level
//! conformance between the two guests through the daemon's sibling path (issue 12).
//!
//! One boot of the pair per kernel runs every case of `vsockpair`
//! (`tests/guest/vsockpair_cases.c`); guest A accepts, guest B connects:
//! - `unbound`, `bound_only`: connect to a port with no socket, and to one bound but not
//!   listening: ECONNRESET at once (not the 2 s connect timeout);
//! - `seq_eor`: B sends 7 one-byte SEQPACKET messages, only the 4th with MSG_EOR; A gets 7
//!   messages of 1 byte, MSG_EOR on the 4th only, then EOF;
//! - `seq_split`: SEQPACKET messages of up to 60000 bytes (several rx buffers each) keep their
//!   bounds, bytes and MSG_EOR;
//! - `shut_rd`: A shuts down reading and sends a byte; once B has it, B's send fails EPIPE;
//! - `send_close`: 500 rounds of B sending 1 byte and closing; at A's EPOLLRDHUP a send
//!   already fails EPIPE, then A reads the byte, then EOF;
//! - `peek`: MSG_PEEK of part and all of the queue, then the same bytes read;
//! - `rcvlowat`: A's window shrunk to 128 KiB, B sends 128 KiB + 1; after A reads 64 KiB and
//!   raises SO_RCVLOWAT, the last byte must come: on 6.12 by the credit update that setting
//!   SO_RCVLOWAT sends; 6.1 sends none then (no `virtio_transport_notify_set_rcvlowat`, with
//!   any backend), so there a blocking read must return exactly 64 KiB + 1, the last byte
//!   following the credit update of the read;
//! - `zc_stream`: a 192 KiB MSG_ZEROCOPY send whose completion is not
//!   SO_EE_CODE_ZEROCOPY_COPIED (kernels with MSG_ZEROCOPY on vsock, 6.7 and later);
//! - `zc_seqpacket`: one 192 KiB SEQPACKET message is sent (no EMSGSIZE) and arrives whole;
//! - `multiconn`: 100 connections open at once, a byte each way.
//!
//! Every case of both guests is reported (a table on stderr) before the test fails. Needs
//! what `tests/guest_qemu.rs` needs plus the 6.12 kernel (`tests/run.sh` installs both). Run
//! alone: `cargo test --release -p vhost-plug-tests --test guest_pair -- --nocapture`.

use std::time::Instant;

use vhost_plug_tests::qemu::{guest_lock, GuestKernel};
use vhost_plug_tests::qemu_pair::{GuestPair, SideReport};
use vhost_plug_tests::DaemonKind;

/// Keep in sync with CASES in tests/guest/vsockpair_cases.c.
const PAIR_CASES: &[&str] = &[
    "unbound",
    "bound_only",
    "seq_eor",
    "seq_split",
    "shut_rd",
    "send_close",
    "peek",
    "rcvlowat",
    "zc_stream",
    "zc_seqpacket",
    "multiconn",
];
const CID_A: u64 = 3;
const CID_B: u64 = 4;

/// The per-case table, and the names of the cases that did not pass on both sides.
fn verdicts(reports: &[SideReport; 2]) -> (String, Vec<String>) {
    let mut table = String::new();
    let mut failed = Vec::new();
    for name in PAIR_CASES {
        let sides = reports.each_ref().map(|r| r.case(name));
        let pass = sides.iter().all(|s| s.is_some_and(|r| r.pass));
        if !pass {
            failed.push(name.to_string());
        }
        table.push_str(&format!(
            "  {:<13} {}\n",
            name,
            if pass { "pass" } else { "FAIL" }
        ));
        for (side, r) in ["A", "B"].iter().zip(sides) {
            let line = match r {
                None => "(not reported)".to_string(),
                Some(r) if r.pass && r.detail.is_empty() => continue,
                Some(r) => format!("{} {}", if r.pass { "pass" } else { "fail" }, r.detail),
            };
            table.push_str(&format!("      {side}: {line}\n"));
        }
    }
    for (side, r) in ["A", "B"].iter().zip(reports) {
        for (name, _) in &r.cases {
            if !PAIR_CASES.contains(&name.as_str()) {
                failed.push(format!("{name} (unknown case from guest {side})"));
            }
        }
    }
    (table, failed)
}

fn run_pair(kernel: GuestKernel, name: &str) {
    let _guard = guest_lock();
    let started = Instant::now();
    let mut pair = match GuestPair::start(
        DaemonKind::VhostPlug,
        kernel,
        name,
        [CID_A, CID_B],
        "pair",
        &[],
    ) {
        Ok(p) => p,
        Err(e) => panic!("[guest_pair] {name}: setup failed: {e:#}"),
    };
    let reports = pair.boot().and_then(|()| pair.reports());
    pair.keep_logs();
    let reports = match reports {
        Ok(r) => r,
        Err(e) => {
            let diag = pair.diagnostics();
            pair.kill_qemus();
            panic!("[guest_pair] {name}: {e:#}\n{diag}");
        }
    };
    let (table, failed) = verdicts(&reports);
    eprintln!(
        "[guest_pair] {name}: kernel {} / {}, {:.1} s\n{table}",
        reports[0].kernel,
        reports[1].kernel,
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = pair.finish() {
        let diag = pair.diagnostics();
        pair.kill_qemus();
        panic!("[guest_pair] {name}: the guests did not power off: {e:#}\n{diag}");
    }
    assert!(
        pair.daemon.is_running(),
        "[guest_pair] {name}: the daemon exited\n{}",
        pair.diagnostics()
    );
    if kernel == GuestKernel::Debian612 {
        for r in &reports {
            assert!(
                r.kernel.starts_with("6.12."),
                "[guest_pair] {name}: booted kernel {}, want 6.12",
                r.kernel
            );
        }
    }
    assert!(
        failed.is_empty(),
        "[guest_pair] {name}: {} of {} cases failed: {} (table above)\n{}",
        failed.len(),
        PAIR_CASES.len(),
        failed.join(", "),
        pair.diagnostics()
    );
}

#[test]
fn sibling_pair_default_kernel() {
    run_pair(GuestKernel::Default, "sibling_pair_default_kernel");
}

#[test]
fn sibling_pair_kernel_6_12() {
    run_pair(GuestKernel::Debian612, "sibling_pair_kernel_6_12");
}
