//! Command line of the `bench` binary (tests/src/bin/bench.rs): scenario groups, sizes,
//! repetitions and the daemons' window.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::Dir;
use crate::DaemonKind;

pub const KINDS: [DaemonKind; 2] = [DaemonKind::VhostPlug, DaemonKind::Peer];
pub const MAIN_WRITE: usize = 64 << 10;
pub const SIZES: [usize; 4] = [4 << 10, 16 << 10, 64 << 10, 256 << 10];

/// What to run, how often and how much.
pub struct Opts {
    pub out: PathBuf,
    pub reps: usize,
    pub scale: f64,
    pub rtts: usize,
    pub conns: usize,
    pub rss_steps: Vec<usize>,
    /// Scenario groups to run: tput, latency, setup, reference, plugins, rss.
    pub only: Vec<String>,
    pub kinds: Vec<DaemonKind>,
    /// `tx-buffer-size` of every VM (both daemons); `None` keeps their defaults (vhost-plug
    /// 256 KiB, vhost-device-vsock 64 KiB).
    pub tx_buffer_size: Option<u32>,
    /// QEMU section: guest boots per daemon (interleaved between the daemons), MiB per
    /// transfer, timed round trips and connections per boot.
    pub qemu_rounds: usize,
    pub qemu_mib: u64,
    pub qemu_rtts: usize,
    pub qemu_conns: usize,
    /// Write sizes and directions of the throughput sweep (`--sizes`, `--dirs`).
    pub sizes: Vec<usize>,
    pub dirs: Vec<Dir>,
}

pub const GROUPS: [&str; 10] = [
    "tput",
    "aggregate",
    "latency",
    "setup",
    "reference",
    "plugins",
    "rss",
    "density",
    "qemu",
    "upgrade",
];

impl Opts {
    pub fn runs(&self, group: &str) -> bool {
        self.only.iter().any(|g| g == group)
    }
}

pub fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        out: PathBuf::from("target/bench"),
        reps: 5,
        scale: 1.0,
        rtts: 20_000,
        conns: 1000,
        rss_steps: vec![1000, 10_000],
        only: GROUPS.iter().map(|g| g.to_string()).collect(),
        kinds: KINDS.to_vec(),
        tx_buffer_size: None,
        qemu_rounds: 3,
        qemu_mib: 128,
        qemu_rtts: 2000,
        qemu_conns: 200,
        sizes: SIZES.to_vec(),
        dirs: Dir::BOTH.to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--out" => o.out = PathBuf::from(val()?),
            "--reps" => o.reps = val()?.parse().context("--reps")?,
            "--scale" => o.scale = val()?.parse().context("--scale")?,
            "--rtts" => o.rtts = val()?.parse().context("--rtts")?,
            "--conns" => o.conns = val()?.parse().context("--conns")?,
            "--rss" => {
                o.rss_steps = val()?
                    .split(',')
                    .map(|s| s.parse::<usize>().context("--rss"))
                    .collect::<Result<_>>()?
            }
            "--only" => {
                o.only = val()?.split(',').map(str::to_string).collect();
                if let Some(g) = o.only.iter().find(|g| !GROUPS.contains(&g.as_str())) {
                    bail!("--only: unknown group {g} (groups: {})", GROUPS.join(","));
                }
            }
            "--qemu-rounds" => o.qemu_rounds = val()?.parse().context("--qemu-rounds")?,
            "--qemu-mib" => o.qemu_mib = val()?.parse().context("--qemu-mib")?,
            "--qemu-rtts" => o.qemu_rtts = val()?.parse().context("--qemu-rtts")?,
            "--qemu-conns" => o.qemu_conns = val()?.parse().context("--qemu-conns")?,
            "--sizes" => {
                o.sizes = val()?
                    .split(',')
                    .map(|s| s.parse::<usize>().context("--sizes"))
                    .collect::<Result<_>>()?;
                if o.sizes.contains(&0) {
                    bail!("--sizes: write sizes must be positive");
                }
            }
            "--dirs" => {
                o.dirs = val()?
                    .split(',')
                    .map(|s| match s {
                        "h2g" => Ok(Dir::HostToGuest),
                        "g2h" => Ok(Dir::GuestToHost),
                        other => bail!("--dirs: expected h2g or g2h, got {other}"),
                    })
                    .collect::<Result<_>>()?
            }
            "--tx-buffer-size" => {
                o.tx_buffer_size = Some(val()?.parse().context("--tx-buffer-size")?)
            }
            "--daemons" => {
                o.kinds = match val()?.as_str() {
                    "both" => KINDS.to_vec(),
                    "plug" => vec![DaemonKind::VhostPlug],
                    "peer" => vec![DaemonKind::Peer],
                    other => bail!("--daemons: expected both, plug or peer, got {other}"),
                }
            }
            "--quick" => {
                o.reps = 1;
                o.scale = 0.125;
                o.rtts = 2000;
                o.conns = 200;
                o.rss_steps = vec![1000];
                o.qemu_rounds = 1;
                o.qemu_mib = 16;
                o.qemu_rtts = 300;
                o.qemu_conns = 50;
            }
            "-h" | "--help" => {
                println!(
                    "bench [--out DIR] [--reps N] [--scale F] [--rtts N] [--conns N] \
                     [--rss N,N..] [--quick] [--only GROUP,..] [--daemons both|plug|peer] \
                     [--tx-buffer-size BYTES] [--sizes B,B..] [--dirs h2g,g2h] [--qemu-rounds N] \
                     [--qemu-mib N] [--qemu-rtts N] [--qemu-conns N]\n\
                     groups: {}",
                    GROUPS.join(",")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if o.reps == 0 || o.rtts == 0 || o.conns == 0 || o.scale.is_nan() || o.scale <= 0.0 {
        bail!("--reps, --rtts, --conns and --scale must be positive");
    }
    if o.qemu_rounds == 0 || o.qemu_mib == 0 || o.qemu_rtts == 0 || o.qemu_conns == 0 {
        bail!("--qemu-rounds, --qemu-mib, --qemu-rtts and --qemu-conns must be positive");
    }
    o.rss_steps.sort_unstable();
    Ok(o)
}

/// Bytes moved per transfer of `write`-byte writes (512 MiB for 64 KiB writes, else 256 MiB,
/// times `--scale`).
pub fn bytes_for(o: &Opts, write: usize) -> u64 {
    let base: f64 = if write == MAIN_WRITE {
        512.0 * 1048576.0
    } else {
        256.0 * 1048576.0
    };
    let b = (base * o.scale) as u64;
    b.max(write as u64)
}
