//! Daemon memory per idle connection: open many guest->host connections, keep both ends open
//! and idle, and compare the daemon's VmRSS with its value before.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use super::Rig;
use crate::host::{accept_timeout, host_listen, HOST_TIMEOUT};
use crate::packet::HOST_CID;
use crate::SockType;

/// Pause before sampling, so the daemon has finished processing the last connections.
const SETTLE: Duration = Duration::from_millis(500);

/// RSS at one connection count.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub conns: usize,
    pub rss_kib: u64,
}

/// What one daemon did.
#[derive(Clone, Debug)]
pub struct RssRun {
    pub base_kib: u64,
    pub points: Vec<Point>,
    /// Why the run stopped before the largest count, if it did.
    pub failure: Option<String>,
}

impl RssRun {
    /// KiB per connection at the highest count sampled: (count, KiB per connection).
    pub fn last(&self) -> Option<(usize, f64)> {
        let p = self.points.last()?;
        Some((p.conns, self.kib_per_conn(p.conns)?))
    }

    /// KiB per connection at `conns`, if that count was reached.
    pub fn kib_per_conn(&self, conns: usize) -> Option<f64> {
        let p = self.points.iter().find(|p| p.conns == conns)?;
        Some((p.rss_kib as f64 - self.base_kib as f64) / conns as f64)
    }
}

/// Opens connections up to each count of `steps` (ascending) and samples the RSS there. A
/// failure to connect is recorded, not returned: the figures up to it still count.
pub fn idle_connections(rig: &mut Rig, steps: &[usize]) -> Result<RssRun> {
    let port = rig.port();
    let l = host_listen(&rig.vm.spec.uds_path, port)?;
    // One connection first so one-time allocations of the connection path are in the base.
    {
        let gs = rig
            .vm
            .guest
            .connect(HOST_CID, port, SockType::Stream)
            .map_err(|e| anyhow!("warm-up connect: {e}"))?;
        let h = accept_timeout(&l, HOST_TIMEOUT)?;
        drop(gs);
        drop(h);
        std::thread::sleep(SETTLE);
    }
    let base_kib = rig.rss_kib()?;
    let mut held = Vec::new();
    let mut points = Vec::new();
    let mut failure = None;
    'steps: for &target in steps {
        while held.len() < target {
            let i = held.len();
            let r = rig
                .vm
                .guest
                .connect(HOST_CID, port, SockType::Stream)
                .map_err(|e| anyhow!("connection {i}: guest connect: {e}"))
                .and_then(|gs| {
                    let h = accept_timeout(&l, HOST_TIMEOUT)
                        .with_context(|| format!("connection {i}: host accept"))?;
                    Ok((gs, h))
                });
            match r {
                Ok(pair) => held.push(pair),
                Err(e) => {
                    failure = Some(format!("{e:#}"));
                    // What the daemon holds at the point of failure is still a figure.
                    if !held.is_empty() && rig.setup.daemon.is_running() {
                        std::thread::sleep(SETTLE);
                        if let Ok(rss_kib) = rig.rss_kib() {
                            points.push(Point {
                                conns: held.len(),
                                rss_kib,
                            });
                        }
                    }
                    break 'steps;
                }
            }
        }
        std::thread::sleep(SETTLE);
        match rig.rss_kib() {
            Ok(rss_kib) => points.push(Point {
                conns: target,
                rss_kib,
            }),
            Err(e) => {
                failure = Some(format!("sampling RSS at {target} connections: {e:#}"));
                break;
            }
        }
    }
    if failure.is_none() {
        if let Err(e) = rig.check() {
            failure = Some(format!("{e:#}"));
        }
    }
    Ok(RssRun {
        base_kib,
        points,
        failure,
    })
}
