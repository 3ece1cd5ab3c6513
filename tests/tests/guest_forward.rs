//! The vsock forwarding backend (`forward-cid`, `forward-listen`) in a real Linux guest: this
//! machine's kernel has no vsock loopback, so QEMU (TCG) boots Debian's kernel with
//! `vsock_loopback`, and inside it vhost-plug runs with `forward-cid=1,forward-listen=6001+6002`
//! in front of the simulated VMM and guest driver; the "host programs" are AF_VSOCK sockets
//! of that guest. The cases ([`vhost_plug_tests::forward`]): checksummed streams both ways,
//! half-close and reset both ways, SEQPACKET bounds, RST when nothing listens,
//! `forward-listen` ports, 100 concurrent connections, a bridge plugin's `host-vsock` route
//! from a VM on the unix backend (allowed and refused, [`vhost_plug_tests::forward_route`]),
//! a daemon restart. Both Debian kernels:
//! 6.1 (AF_VSOCK SEQPACKET cannot peek there) and 6.12.
//!
//! Run: `cargo test --release -p vhost-plug-tests --test guest_forward -- --nocapture`.

use anyhow::{bail, Result};
use vhost_plug_tests::forward::CASES;
use vhost_plug_tests::qemu::{guest_lock, GuestKernel};
use vhost_plug_tests::qemu_forward::{build_image, run};

fn forward_cases_pass_on(kernel: GuestKernel) -> Result<()> {
    let _guest = guest_lock();
    let (vmlinuz, initrd) = build_image(Some(env!("CARGO_BIN_EXE_fwdguest").as_ref()), kernel)?;
    let markers = run(&vmlinuz, &initrd, "test")?;
    let mut failures = Vec::new();
    for m in &markers {
        eprintln!(
            "[guest_forward {kernel:?}] @@ {} {} {}",
            m.kind, m.scenario, m.rest
        );
        if m.kind == "FAIL" || m.kind == "FATAL" {
            failures.push(format!("{} {}: {}", m.kind, m.scenario, m.rest));
        }
    }
    for case in std::iter::once("setup").chain(CASES) {
        if !markers.iter().any(|m| m.kind == "OK" && m.scenario == case) {
            failures.push(format!("no OK for {case}"));
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}

#[test]
fn forwarding_works_in_a_debian_6_1_guest() -> Result<()> {
    forward_cases_pass_on(GuestKernel::Default)
}

#[test]
fn forwarding_works_in_a_debian_6_12_guest() -> Result<()> {
    forward_cases_pass_on(GuestKernel::Debian612)
}
