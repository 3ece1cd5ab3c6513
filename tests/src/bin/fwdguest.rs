//! Runs inside the QEMU guest of `tests/tests/guest_forward.rs` (and of the forward-path
//! benchmark): `fwdguest test` runs [`vhost_plug_tests::forward::CASES`] against vhost-plug
//! with `forward-cid=1`; `fwdguest bench` measures vhost-plug's and vhost-device-vsock's
//! forward paths one after the other. Every result is an `@@` line on stdout (the serial
//! console): `@@ OK <case> ...`, `@@ FAIL <case> <reason>`, then `@@ DONE`.

use vhost_plug_tests::forward::{
    bench, forwarding_daemon, restart, run_case, upgrade, CASES, LISTEN,
};
use vhost_plug_tests::DaemonKind;

fn report(case: &str, r: anyhow::Result<String>) {
    match r {
        Ok(v) => println!("@@ OK {case} {v}"),
        Err(e) => println!("@@ FAIL {case} {}", format!("{e:#}").replace('\n', " | ")),
    }
}

fn test() {
    let setup = match forwarding_daemon(DaemonKind::VhostPlug, &LISTEN) {
        Ok(s) => s,
        Err(e) => return report("setup", Err(e)),
    };
    let vm = match setup.boot(0) {
        Ok(vm) => vm,
        Err(e) => return report("setup", Err(e)),
    };
    println!("@@ OK setup");
    let mut running = Some((setup, vm));
    for case in CASES {
        println!("@@ BEGIN {case}");
        if case == "upgrade" {
            report(case, upgrade());
            continue;
        }
        let Some((setup, vm)) = running.take() else {
            report(case, Err(anyhow::anyhow!("no daemon left to run it on")));
            continue;
        };
        if case == "restart" {
            report(case, restart(setup, vm));
            continue;
        }
        let r = run_case(case, &setup, &vm).map_err(|e| {
            let log = setup.daemon.stderr();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            anyhow::anyhow!("{e:#} || daemon log, newest first: {}", tail.join(" / "))
        });
        report(case, r);
        running = Some((setup, vm));
    }
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("test") => test(),
        Some("bench") => {
            for kind in [DaemonKind::VhostPlug, DaemonKind::Peer] {
                report(&format!("bench-{}", kind.name()), bench(kind));
            }
        }
        other => println!("@@ FAIL usage unknown mode {other:?} (test | bench)"),
    }
    println!("@@ DONE");
}
