//! Side-by-side benchmark of vhost-plug and vhost-device-vsock, driven by the simulated VMM
//! (design.md section 6). The binary `bench` (tests/src/bin/bench.rs) runs every scenario for
//! both daemons in one process and prints one markdown table of absolute figures and ratios.
//!
//! Modules: [`rig`] (a daemon plus a booted simulated VM, RSS sampling), [`stream`]
//! (throughput, checksum verified, and the socketpair reference), [`latency`] (1-byte
//! request/response), [`setup`] (connection setup rate), [`rss`] (memory per idle connection),
//! [`density`] (many idle VMs, cold start, many VMs attached at once), [`stats`] (medians,
//! percentiles), [`report`] (table and CSV output), [`qemu`] (the same
//! kinds of figures through a real Linux guest under QEMU/TCG), [`aggregate`] (guest -> host
//! over 1, 4 or 16 connections or 4 VMs at once), [`threads`] (the harness's own threads' CPU,
//! to tell when it sets the pace), [`upgrade`] (live upgrade under 1,000 connections,
//! vhost-plug only), [`opts`] (the binary's command line) and [`results`] (every measured
//! value).
//!
//! Nothing here asserts on timing: a scenario fails only when data is lost or corrupted, or a
//! bounded wait expires.

pub mod aggregate;
pub mod density;
pub mod latency;
pub mod opts;
pub mod qemu;
pub mod report;
pub mod results;
pub mod rig;
pub mod rss;
pub mod setup;
pub mod stats;
pub mod stream;
pub mod threads;
pub mod upgrade;

pub use rig::Rig;

/// Direction of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    HostToGuest,
    GuestToHost,
}

impl Dir {
    pub const BOTH: [Dir; 2] = [Dir::HostToGuest, Dir::GuestToHost];

    pub fn label(self) -> &'static str {
        match self {
            Dir::HostToGuest => "host->guest",
            Dir::GuestToHost => "guest->host",
        }
    }

    /// Short form for CSV files.
    pub fn tag(self) -> &'static str {
        match self {
            Dir::HostToGuest => "h2g",
            Dir::GuestToHost => "g2h",
        }
    }
}
