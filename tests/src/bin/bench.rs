//! Side-by-side benchmark: vhost-plug vs vhost-device-vsock 0.3.0, both driven by the same
//! simulated VMM and guest driver, in one run. Prints one markdown table with absolute figures
//! and ratios (vhost-plug / peer) and writes, under `--out DIR`:
//! `table.md`, `sweep.csv` (throughput by write size, for the plot) and `raw.csv` (every
//! repetition).
//!
//! A second table comes from a real Linux guest under QEMU (TCG), group `qemu`
//! (`tests/src/bench/qemu.rs`): throughput both ways, 1-byte round trips and connection setup.
//!
//! Usage: `bench [--out DIR] [--reps N] [--scale F] [--rtts N] [--conns N] [--rss N,N..]
//! [--quick] [--only tput,aggregate,latency,setup,reference,plugins,rss,density,qemu,upgrade]
//! [--daemons both|plug|peer] [--tx-buffer-size BYTES] [--sizes B,B..] [--dirs h2g,g2h]
//! [--qemu-rounds N] [--qemu-mib N] [--qemu-rtts N] [--qemu-conns N]`.
//! See scripts/bench.sh, which builds, installs the peer and plots.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};

use vhost_plug_tests::bench::aggregate::{aggregate_rows, aggregates};
use vhost_plug_tests::bench::opts::{
    bytes_for, parse_args, Opts, GROUPS, KINDS, MAIN_WRITE, SIZES,
};
use vhost_plug_tests::bench::qemu::GuestBench;
use vhost_plug_tests::bench::report::{markdown, Row, Target};
use vhost_plug_tests::bench::results::{harness_limited, log, Results};
use vhost_plug_tests::bench::rss::idle_connections;
use vhost_plug_tests::bench::threads::SATURATED_PCT;
use vhost_plug_tests::bench::{density, latency, setup, stream, upgrade, Dir, Rig};
use vhost_plug_tests::DaemonKind;

/// Policy chains for the plugin scenario: label and daemon arguments. Any `--plugin` replaces
/// the built-in defaults, so "0 plugins" names only the default serializer.
const PLUGIN_CHAINS: &[(&str, &[&str])] = &[
    (
        "0 policy plugins",
        &["--plugin", "serializer=builtin:serializer-postcard"],
    ),
    (
        "1 policy plugin (allow-group)",
        &["--plugin", "policy=builtin:allow-group"],
    ),
    (
        "3 policy plugins (allow-group, port-allowlist, audit)",
        &[
            "--plugin",
            "policy=builtin:allow-group",
            "--plugin",
            "policy=builtin:port-allowlist,config=allow=2:*,3:*",
            "--plugin",
            "policy=builtin:audit",
        ],
    ),
];

fn tput_key(dir: Dir, write: usize) -> String {
    format!("tput-{}-{}", dir.tag(), write)
}

fn setup_key(dir: Dir) -> String {
    format!("setup-{}", dir.tag())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let o = parse_args()?;
    // Same log level for both daemons: per-connection info lines would otherwise be timed.
    for var in ["RUST_LOG", "VHOST_PLUG_LOG"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, "warn");
        }
    }
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let t0 = Instant::now();
    let mut res = Results::default();

    if o.runs("tput") || o.runs("latency") || o.runs("setup") {
        data_path(&o, t0, &mut res)?;
    }
    if o.runs("aggregate") {
        aggregates(&o, t0, &mut res)?;
    }
    if o.runs("reference") {
        reference(&o, t0, &mut res);
    }
    if o.runs("plugins") && o.kinds.contains(&DaemonKind::VhostPlug) {
        plugins(&o, t0, &mut res);
    }
    if o.runs("rss") {
        rss(&o, t0, &mut res);
    }
    let density_table = o.runs("density").then(|| density(&o, t0));
    let upgrade_table = (o.runs("upgrade") && o.kinds.contains(&DaemonKind::VhostPlug))
        .then(|| upgrade::section(&o.out, o.conns, o.reps, &|m| log(t0, m)));
    if o.runs("qemu") {
        qemu(&o, t0, &mut res);
    }

    // The simulated-guest table, unless only the QEMU and density sections ran.
    let mut table = if GROUPS
        .iter()
        .any(|g| !["qemu", "density", "upgrade"].contains(g) && o.runs(g))
    {
        markdown(&rows(&o, &res))
    } else {
        String::new()
    };
    if let Some(d) = density_table {
        let _ = write!(
            table,
            "\n### Density and cold start (idle VMs; then VMs attached and moving data)\n\n{d}"
        );
    }
    table.push_str(&upgrade_table.unwrap_or_default());
    if o.runs("qemu") {
        let _ = write!(
            table,
            "\n### Real Linux guest under QEMU (TCG: the guest CPU is emulated, so absolute \
             figures are far below a KVM guest's; compare the ratios)\n\n{}",
            markdown(&qemu_rows(&o, &res))
        );
    }
    let mut notes = String::new();
    for ((key, who), e) in &res.errors {
        let _ = writeln!(notes, "- {key} on {who} failed: {e}");
    }
    for (who, r) in &res.rss {
        if let Some(f) = &r.failure {
            let _ = writeln!(
                notes,
                "- RSS on {who} stopped after {} connections: {f}",
                r.points.last().map_or(0, |p| p.conns)
            );
        }
    }
    match &res.policy_enforced {
        Some(Ok(true)) => notes.push_str(
            "- policy plugins are in force: a port-allowlist denial refused the connection\n",
        ),
        Some(Ok(false)) => notes.push_str(
            "- policy plugins are NOT in force: a connection the port-allowlist denies was \
             accepted (the plugin chain rows measure the daemon without policy checks)\n",
        ),
        Some(Err(e)) => {
            let _ = writeln!(notes, "- policy enforcement check failed: {e}");
        }
        None => {}
    }
    let out = format!("{table}\n{notes}");
    println!("{out}");
    std::fs::write(o.out.join("table.md"), &out).context("writing table.md")?;
    write_csvs(&o, &res)?;
    log(t0, format!("done; results in {}", o.out.display()));
    Ok(())
}

/// Throughput sweep, latency and setup rate on one rig per daemon, repetitions interleaved
/// between the daemons so slow drift in machine load affects both alike.
fn data_path(o: &Opts, t0: Instant, res: &mut Results) -> Result<()> {
    let mut rigs = Vec::new();
    for &k in &o.kinds {
        rigs.push(Rig::new(k, &[], o.tx_buffer_size)?);
    }
    for rep in (0..o.reps).filter(|_| o.runs("tput")) {
        for &write in &o.sizes {
            for &dir in &o.dirs {
                for rig in rigs.iter_mut() {
                    let who = rig.kind().name();
                    let key = tput_key(dir, write);
                    if res.error(&key, who).is_some() {
                        continue;
                    }
                    match stream::transfer(rig, dir, bytes_for(o, write), write) {
                        Ok(t) => {
                            log(
                                t0,
                                format!(
                                    "rep {rep} {who} {} {} KiB writes: {:.0} MiB/s; daemon \
                                     {:.0}% of a core, {:.0} ms CPU/GiB; bench process {:.0}%, \
                                     busiest harness thread {:.0}%",
                                    dir.label(),
                                    write >> 10,
                                    t.mib_s(),
                                    t.daemon_pct(),
                                    t.daemon_ms_per_gib(),
                                    t.self_pct(),
                                    t.busiest_pct()
                                ),
                            );
                            res.push(&key, who, t.mib_s());
                            res.push(&format!("cpu-{key}"), who, t.daemon_ms_per_gib());
                            res.push(&format!("dpct-{key}"), who, t.daemon_pct());
                            res.push(&format!("spct-{key}"), who, t.self_pct());
                            res.push(&format!("bpct-{key}"), who, t.busiest_pct());
                            res.push(&format!("notif-{key}"), who, t.notifications_per_mib());
                        }
                        Err(e) => res.fail(t0, &key, who, &e),
                    }
                }
            }
        }
    }
    for dir in Dir::BOTH.into_iter().filter(|_| o.runs("latency")) {
        for rig in rigs.iter_mut() {
            let who = rig.kind().name();
            let key = format!("lat-{}", dir.tag());
            match latency::round_trips(rig, dir, o.rtts) {
                Ok(p) => {
                    log(
                        t0,
                        format!(
                            "{who} {} 1-byte round trip: p50 {:.1} us, p99 {:.1} us",
                            dir.label(),
                            p.p50,
                            p.p99
                        ),
                    );
                    res.latency.insert((key, who.to_string()), p);
                }
                Err(e) => res.fail(t0, &key, who, &e),
            }
        }
    }
    for rep in (0..o.reps).filter(|_| o.runs("setup")) {
        for dir in Dir::BOTH {
            for rig in rigs.iter_mut() {
                let who = rig.kind().name();
                let key = setup_key(dir);
                if res.error(&key, who).is_some() {
                    continue;
                }
                match setup::rate(rig, dir, o.conns) {
                    Ok(r) => {
                        log(
                            t0,
                            format!("rep {rep} {who} {} setup: {r:.0} conn/s", dir.label()),
                        );
                        res.push(&key, who, r);
                    }
                    Err(e) => res.fail(t0, &key, who, &e),
                }
            }
        }
    }
    Ok(())
}

const REFERENCE: &str = "socketpair+memcpy";

fn reference(o: &Opts, t0: Instant, res: &mut Results) {
    for _ in 0..o.reps {
        for write in SIZES {
            let key = format!("ref-{write}");
            match stream::reference(bytes_for(o, write), write) {
                Ok(t) => {
                    log(
                        t0,
                        format!(
                            "reference {} KiB writes: {:.0} MiB/s",
                            write >> 10,
                            t.mib_s()
                        ),
                    );
                    res.push(&key, REFERENCE, t.mib_s());
                }
                Err(e) => res.fail(t0, &key, REFERENCE, &e),
            }
        }
    }
}

fn plugins(o: &Opts, t0: Instant, res: &mut Results) {
    let who = DaemonKind::VhostPlug.name();
    for (i, (label, args)) in PLUGIN_CHAINS.iter().enumerate() {
        let mut rig = match Rig::new(DaemonKind::VhostPlug, args, o.tx_buffer_size) {
            Ok(r) => r,
            Err(e) => {
                for dir in Dir::BOTH {
                    res.fail(t0, &format!("plugins{i}-{}", dir.tag()), who, &e);
                }
                continue;
            }
        };
        for rep in 0..o.reps {
            for dir in Dir::BOTH {
                let key = format!("plugins{i}-{}", dir.tag());
                if res.error(&key, who).is_some() {
                    continue;
                }
                match setup::rate(&mut rig, dir, o.conns) {
                    Ok(r) => {
                        log(
                            t0,
                            format!("rep {rep} {label} {} setup: {r:.0} conn/s", dir.label()),
                        );
                        res.push(&key, who, r);
                    }
                    Err(e) => res.fail(t0, &key, who, &e),
                }
            }
        }
    }
    let (allowed, denied) = (7001, 7002);
    let spec = format!("policy=builtin:port-allowlist,config=allow=2:{allowed}");
    res.policy_enforced = Some(
        Rig::new(DaemonKind::VhostPlug, &["--plugin", &spec], None)
            .and_then(|mut rig| setup::policy_enforced(&mut rig, allowed, denied))
            .map_err(|e| format!("{e:#}")),
    );
    log(t0, format!("policy enforced: {:?}", res.policy_enforced));
}

fn rss(o: &Opts, t0: Instant, res: &mut Results) {
    for &k in &o.kinds {
        let extra: &[&str] = match k {
            DaemonKind::VhostPlug => &["--max-connections", "16384"],
            DaemonKind::Peer => &[],
        };
        let run = Rig::new(k, extra, o.tx_buffer_size)
            .and_then(|mut rig| idle_connections(&mut rig, &o.rss_steps));
        match run {
            Ok(r) => {
                log(t0, format!("{} RSS: {r:?}", k.name()));
                res.rss.insert(k.name().to_string(), r);
            }
            Err(e) => res.fail(t0, "rss", k.name(), &e),
        }
    }
}

/// The density section (`tests/src/bench/density.rs`); also writes `density.csv`.
fn density(o: &Opts, t0: Instant) -> String {
    // Sockets go where BENCH_SOCKET_DIR says (scripts/bench.sh: a tmpfs, like the /run of a
    // host), else under --out.
    let base = std::env::var_os("BENCH_SOCKET_DIR").map_or_else(|| o.out.clone(), PathBuf::from);
    let work = base.join(format!("vhost-plug-density-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&work) {
        return format!("density: creating {}: {e}\n", work.display());
    }
    let mut runs = match density::idle(&o.kinds, o.reps, &work, &|m| log(t0, m)) {
        Ok(r) => r,
        Err(e) => return format!("density failed: {e:#}\n"),
    };
    let bytes = ((16u64 << 20) as f64 * o.scale) as u64;
    for (k, run) in runs.iter_mut() {
        let r = density::busy(*k, 100, bytes.max(1 << 20), &work);
        match &r {
            Ok(b) => log(t0, format!("{} {b:?}", k.name())),
            Err(e) => log(t0, format!("{} attached VMs failed: {e:#}", k.name())),
        }
        run.busy = Some(r.map_err(|e| format!("{e:#}")));
    }
    if let Err(e) = std::fs::write(o.out.join("density.csv"), density::csv(&runs)) {
        log(t0, format!("writing density.csv: {e}"));
    }
    let _ = std::fs::remove_dir_all(&work);
    density::markdown(&runs)
}

/// The QEMU section: per round, one guest boot per daemon running every scenario, so
/// machine-load drift hits both daemons alike.
fn qemu(o: &Opts, t0: Instant, res: &mut Results) {
    let bytes = o.qemu_mib << 20;
    for round in 0..o.qemu_rounds {
        for &k in &o.kinds {
            let who = k.name();
            if res.error("qemu-boot", who).is_some() {
                continue;
            }
            let label = format!("bench-{who}-{round}");
            let mut g = match GuestBench::boot(k, &label) {
                Ok(g) => g,
                Err(e) => {
                    res.fail(t0, "qemu-boot", who, &e);
                    continue;
                }
            };
            log(t0, format!("qemu round {round}: guest up on {who}"));
            let mut failed = false;
            for dir in Dir::BOTH {
                let key = format!("qemu-tput-{}", dir.tag());
                match g.transfer(dir, bytes) {
                    Ok(t) => {
                        log(
                            t0,
                            format!(
                                "qemu round {round} {who} {}: {:.1} MiB/s; daemon {:.0} ms \
                                 CPU/GiB; QEMU {:.0}% of a core",
                                dir.label(),
                                t.mib_s(),
                                t.daemon_ms_per_gib(),
                                t.qemu_cpu / t.secs.max(1e-9) * 100.0
                            ),
                        );
                        res.push(&key, who, t.mib_s());
                        res.push(&format!("cpu-{key}"), who, t.daemon_ms_per_gib());
                    }
                    Err(e) => {
                        res.fail(t0, &key, who, &e.context(g.diagnostics()));
                        failed = true;
                    }
                }
            }
            for dir in Dir::BOTH {
                if failed {
                    break;
                }
                let key = format!("qemu-lat-{}", dir.tag());
                match g.round_trips(dir, o.qemu_rtts) {
                    Ok(p) => {
                        log(
                            t0,
                            format!(
                                "qemu round {round} {who} {} 1-byte round trip: p50 {:.0} us, \
                                 p99 {:.0} us",
                                dir.label(),
                                p.p50,
                                p.p99
                            ),
                        );
                        res.push(&format!("{key}-p50"), who, p.p50);
                        res.push(&format!("{key}-p99"), who, p.p99);
                    }
                    Err(e) => {
                        res.fail(t0, &key, who, &e.context(g.diagnostics()));
                        failed = true;
                    }
                }
            }
            for dir in Dir::BOTH {
                if failed {
                    break;
                }
                let key = format!("qemu-setup-{}", dir.tag());
                match g.setup_rate(dir, o.qemu_conns) {
                    Ok(r) => {
                        log(
                            t0,
                            format!(
                                "qemu round {round} {who} {} setup: {r:.0} conn/s",
                                dir.label()
                            ),
                        );
                        res.push(&key, who, r);
                    }
                    Err(e) => {
                        res.fail(t0, &key, who, &e.context(g.diagnostics()));
                        failed = true;
                    }
                }
            }
            if !failed {
                if let Err(e) = g.finish() {
                    res.fail(t0, "qemu-finish", who, &e);
                }
            }
        }
    }
}

fn qemu_rows(o: &Opts, res: &Results) -> Vec<Row> {
    let plug = DaemonKind::VhostPlug.name();
    let peer = DaemonKind::Peer.name();
    let failed = |key: &str| -> String {
        KINDS
            .iter()
            .filter(|k| {
                res.error(key, k.name()).is_some() || res.error("qemu-boot", k.name()).is_some()
            })
            .map(|k| format!("failed on {}", k.name()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rounds = o.qemu_rounds;
    let mut rows = Vec::new();
    for dir in Dir::BOTH {
        let key = format!("qemu-tput-{}", dir.tag());
        rows.push(
            Row::new(
                format!(
                    "QEMU guest: throughput {}, 64 KiB writes, {} MiB, median of {rounds}",
                    dir.label(),
                    o.qemu_mib
                ),
                "MiB/s",
            )
            .values(res.median(&key, plug), res.median(&key, peer))
            .target(Target::at_least(1.5))
            .note(failed(&key)),
        );
    }
    for dir in Dir::BOTH {
        let key = format!("cpu-qemu-tput-{}", dir.tag());
        rows.push(
            Row::new(
                format!("QEMU guest: daemon CPU per GiB {}", dir.label()),
                "ms",
            )
            .values(res.median(&key, plug), res.median(&key, peer)),
        );
    }
    for dir in Dir::BOTH {
        let key = format!("qemu-lat-{}", dir.tag());
        for (p, target) in [("p50", Target::at_most(1.0)), ("p99", None)] {
            let k = format!("{key}-{p}");
            rows.push(
                Row::new(
                    format!(
                        "QEMU guest: 1-byte round trip {} sends, {p} of {}, median of {rounds}",
                        dir.label(),
                        o.qemu_rtts
                    ),
                    "us",
                )
                .values(res.median(&k, plug), res.median(&k, peer))
                .target(target)
                .note(failed(&key)),
            );
        }
    }
    for dir in Dir::BOTH {
        let key = format!("qemu-setup-{}", dir.tag());
        rows.push(
            Row::new(
                format!(
                    "QEMU guest: connection setup {} ({} sequential), median of {rounds}",
                    dir.label(),
                    o.qemu_conns
                ),
                "conn/s",
            )
            .values(res.median(&key, plug), res.median(&key, peer))
            .note(failed(&key)),
        );
    }
    rows
}

fn rows(o: &Opts, res: &Results) -> Vec<Row> {
    let plug = DaemonKind::VhostPlug.name();
    let peer = DaemonKind::Peer.name();
    let mut rows = Vec::new();
    let err_note = |key: &str| -> String {
        KINDS
            .iter()
            .filter(|k| res.error(key, k.name()).is_some())
            .map(|k| format!("failed on {}", k.name()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for dir in Dir::BOTH {
        let key = tput_key(dir, MAIN_WRITE);
        rows.push(
            Row::new(
                format!(
                    "throughput {}, 64 KiB writes, {} MiB",
                    dir.label(),
                    bytes_for(o, MAIN_WRITE) >> 20
                ),
                "MiB/s",
            )
            .values(res.median(&key, plug), res.median(&key, peer))
            .target(Target::at_least(1.5))
            .note(err_note(&key)),
        );
        if let Some(why) = harness_limited(res, &key) {
            let row = rows.pop().map(|r| r.withhold(why));
            rows.extend(row);
        }
    }
    for dir in Dir::BOTH {
        rows.push(
            Row::new(
                format!("throughput {} vs reference, 64 KiB writes", dir.label()),
                "MiB/s",
            )
            .values(
                res.median(&tput_key(dir, MAIN_WRITE), plug),
                res.median(&format!("ref-{MAIN_WRITE}"), REFERENCE),
            )
            .against(REFERENCE)
            .target(Target::at_least(0.5)),
        );
    }
    for dir in Dir::BOTH {
        let key = tput_key(dir, MAIN_WRITE);
        let cpu = format!("cpu-{key}");
        rows.push(
            Row::new(
                format!("daemon CPU per GiB {}, 64 KiB writes", dir.label()),
                "ms",
            )
            .values(res.median(&cpu, plug), res.median(&cpu, peer)),
        );
        let dpct = format!("dpct-{key}");
        rows.push(
            Row::new(
                format!("daemon CPU use {}, 64 KiB writes", dir.label()),
                "% of a core",
            )
            .values(res.median(&dpct, plug), res.median(&dpct, peer)),
        );
        let notif = format!("notif-{key}");
        rows.push(
            Row::new(
                format!(
                    "guest interrupts + kicks per MiB {}, 64 KiB writes",
                    dir.label()
                ),
                "count",
            )
            .values(res.median(&notif, plug), res.median(&notif, peer)),
        );
        let spct = format!("spct-{key}");
        rows.push(
            Row::new(
                format!(
                    "simulated guest + host programs CPU use {}, 64 KiB writes",
                    dir.label()
                ),
                "% of a core",
            )
            .values(res.median(&spct, plug), res.median(&spct, peer)),
        );
        let bpct = format!("bpct-{key}");
        rows.push(
            Row::new(
                format!(
                    "busiest harness thread CPU use {}, 64 KiB writes (>= {SATURATED_PCT:.0}%: \
                     the harness sets the pace)",
                    dir.label()
                ),
                "% of a core",
            )
            .values(res.median(&bpct, plug), res.median(&bpct, peer)),
        );
    }
    for write in SIZES.iter().copied().filter(|w| *w != MAIN_WRITE) {
        for dir in Dir::BOTH {
            let key = tput_key(dir, write);
            rows.push(
                Row::new(
                    format!("throughput {}, {} KiB writes", dir.label(), write >> 10),
                    "MiB/s",
                )
                .values(res.median(&key, plug), res.median(&key, peer))
                .note(err_note(&key)),
            );
        }
    }
    for dir in Dir::BOTH {
        let key = format!("lat-{}", dir.tag());
        let get = |who: &str| res.latency.get(&(key.clone(), who.to_string())).copied();
        let (a, b) = (get(plug), get(peer));
        let n = o.rtts;
        rows.push(
            Row::new(
                format!("1-byte round trip {} sends, p50 of {n}", dir.label()),
                "us",
            )
            .values(a.map(|p| p.p50), b.map(|p| p.p50))
            .target(Target::at_most(1.0))
            .note(err_note(&key)),
        );
        rows.push(
            Row::new(
                format!("1-byte round trip {} sends, p99 of {n}", dir.label()),
                "us",
            )
            .values(a.map(|p| p.p99), b.map(|p| p.p99)),
        );
    }
    for dir in Dir::BOTH {
        let key = setup_key(dir);
        rows.push(
            Row::new(
                format!(
                    "connection setup {} (connect+accept+close, {} sequential)",
                    dir.label(),
                    o.conns
                ),
                "conn/s",
            )
            .values(res.median(&key, plug), res.median(&key, peer))
            .note(err_note(&key)),
        );
    }
    for (i, (label, _)) in PLUGIN_CHAINS.iter().enumerate() {
        for dir in Dir::BOTH {
            let key = format!("plugins{i}-{}", dir.tag());
            let mut row = Row::new(
                format!(
                    "setup {}, vhost-plug with {label} vs peer (no plugins)",
                    dir.label()
                ),
                "conn/s",
            )
            .values(res.median(&key, plug), res.median(&setup_key(dir), peer));
            if i == 1 {
                row = row.target(Target::at_least(1.0));
            }
            if res.error(&key, plug).is_some() {
                row = row.note("failed");
            }
            rows.push(row);
        }
    }
    for &n in &o.rss_steps {
        let get = |who: &str| res.rss.get(who).and_then(|r| r.kib_per_conn(n));
        let mut row = Row::new(
            format!("daemon RSS per idle guest->host connection at {n}"),
            "KiB",
        )
        .values(get(plug), get(peer))
        .target(Target::at_most(1.0));
        let missing: Vec<&str> = KINDS
            .iter()
            .map(|k| k.name())
            .filter(|w| get(w).is_none())
            .collect();
        if !missing.is_empty() {
            row = row.note(format!("not reached by {}", missing.join(", ")));
        }
        rows.push(row);
        // A daemon that gave up before `n`: its figure where it stopped.
        for k in KINDS {
            let Some(r) = res.rss.get(k.name()) else {
                continue;
            };
            let Some((at, kib)) = r.last() else { continue };
            if r.failure.is_some() && at < n && !o.rss_steps.contains(&at) {
                let row = Row::new(
                    format!(
                        "daemon RSS per idle connection where {} stopped ({at} connections)",
                        k.name()
                    ),
                    "KiB",
                );
                rows.push(match k {
                    DaemonKind::VhostPlug => row.values(Some(kib), None),
                    DaemonKind::Peer => row.values(None, Some(kib)),
                });
            }
        }
    }
    if o.runs("aggregate") {
        rows.extend(aggregate_rows(res));
    }
    rows
}

fn write_csvs(o: &Opts, res: &Results) -> Result<()> {
    let mut sweep = String::from("daemon,direction,write_bytes,mib_s\n");
    for write in SIZES {
        for dir in Dir::BOTH {
            for k in KINDS {
                if let Some(v) = res.median(&tput_key(dir, write), k.name()) {
                    let _ = writeln!(sweep, "{},{},{write},{v:.1}", k.name(), dir.tag());
                }
            }
            if let Some(v) = res.median(&format!("ref-{write}"), REFERENCE) {
                let _ = writeln!(sweep, "{REFERENCE},{},{write},{v:.1}", dir.tag());
            }
        }
    }
    std::fs::write(o.out.join("sweep.csv"), sweep).context("writing sweep.csv")?;
    let mut raw = String::from("scenario,daemon,rep,value\n");
    for ((key, who), vs) in &res.values {
        for (i, v) in vs.iter().enumerate() {
            let _ = writeln!(raw, "{key},{who},{i},{v:.3}");
        }
    }
    for ((key, who), p) in &res.latency {
        let _ = writeln!(raw, "{key}-p50-us,{who},0,{:.3}", p.p50);
        let _ = writeln!(raw, "{key}-p99-us,{who},0,{:.3}", p.p99);
    }
    for (who, r) in &res.rss {
        let _ = writeln!(raw, "rss-base-kib,{who},0,{}", r.base_kib);
        for p in &r.points {
            let _ = writeln!(raw, "rss-{}-kib,{who},0,{}", p.conns, p.rss_kib);
        }
    }
    std::fs::write(o.out.join("raw.csv"), raw).context("writing raw.csv")?;
    Ok(())
}
