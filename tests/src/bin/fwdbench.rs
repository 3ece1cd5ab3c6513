//! The forward path (`forward-cid=1`) of vhost-plug against vhost-device-vsock's, in one QEMU
//! guest with `vsock_loopback` (both daemons, the simulated VMM and the AF_VSOCK end run
//! inside it, one daemon after the other; [`vhost_plug_tests::forward::bench`]): guest ->
//! AF_VSOCK and back throughput, 1-byte round trip. One run; the table gives ratios
//! (vhost-plug / vhost-device-vsock; for the round trip, lower is better).
//!
//! `cargo build --release --workspace --all-targets && target/release/fwdbench [6.1|6.12]`
//! (TCG timings: compare the ratio, not the absolute numbers).

use anyhow::{bail, Context, Result};
use vhost_plug_tests::qemu::GuestKernel;
use vhost_plug_tests::qemu_forward::{build_image, run};

fn main() -> Result<()> {
    let kernel = match std::env::args().nth(1).as_deref() {
        None | Some("6.12") => GuestKernel::Debian612,
        Some("6.1") => GuestKernel::Default,
        Some(other) => bail!("usage: fwdbench [6.1|6.12], not {other}"),
    };
    let (vmlinuz, initrd) = build_image(None, kernel)?;
    let markers = run(&vmlinuz, &initrd, "bench")?;
    let result = |who: &str| -> Result<[f64; 3]> {
        let m = markers
            .iter()
            .find(|m| m.scenario == format!("bench-{who}"))
            .with_context(|| format!("no result for {who}"))?;
        if m.kind != "OK" {
            bail!("{who}: {} {}", m.kind, m.rest);
        }
        let v = |k: &str| -> Result<f64> { Ok(m.value(k)?.parse()?) };
        Ok([v("g2h_mbs")?, v("h2g_mbs")?, v("rtt_us")?])
    };
    let ours = result("vhost-plug")?;
    let peer = result("vhost-device-vsock")?;
    println!("forward path (forward-cid=1, vsock_loopback), {kernel:?} guest under TCG, one run");
    println!("| metric | vhost-plug | vhost-device-vsock | ratio |");
    println!("| --- | --- | --- | --- |");
    for (i, name) in [
        "guest -> host MB/s",
        "host -> guest MB/s",
        "1-byte round trip us",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2} |",
            ours[i],
            peer[i],
            ours[i] / peer[i]
        );
    }
    // Counted round trips (absent when the guest kernel cannot count).
    let counts = |who: &str| {
        markers
            .iter()
            .find(|m| m.scenario == format!("bench-{who}"))
            .map(|m| m.values())
            .filter(|v| v.contains_key("d_sys"))
    };
    if let (Some(o), Some(p)) = (counts("vhost-plug"), counts("vhost-device-vsock")) {
        println!();
        println!("per 1-byte round trip (counted, not timed)");
        println!("| count | vhost-plug | vhost-device-vsock |");
        println!("| --- | --- | --- |");
        for (k, name) in [
            ("d_sys", "daemon syscalls"),
            ("d_vcsw", "daemon voluntary context switches (wakeups)"),
            ("d_icsw", "daemon involuntary context switches"),
            ("d_cpu_us", "daemon CPU us"),
            ("h_sys", "harness + host program syscalls"),
            (
                "h_vcsw",
                "harness + host program voluntary context switches",
            ),
            ("h_cpu_us", "harness + host program CPU us"),
            ("d_calls", "daemon syscalls by name"),
            ("h_calls", "harness syscalls by name"),
            ("vsock_ops", "vsock packets on the loopback by op"),
            ("wakeups", "guest-wide wakeups by task"),
        ] {
            let v = |m: &std::collections::BTreeMap<String, String>| {
                m.get(k).cloned().unwrap_or_default()
            };
            println!("| {name} | {} | {} |", v(&o), v(&p));
        }
    }
    Ok(())
}
