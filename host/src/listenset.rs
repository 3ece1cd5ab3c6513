//! The listening sockets a live upgrade hands over in its `listeners` step: every VM's (a
//! variable number each: vhost-user, then stream and seqpacket or the `forward-listen`
//! AF_VSOCK ones) and the metrics endpoint's. The daemon offers the endpoint's socket once it
//! is bound, so the endpoint is never closed or bound again across an upgrade (scrapers are
//! never refused, and a port the kernel chose for `:0` stays the same).

use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard, OnceLock};

use tracing::warn;

static METRICS: OnceLock<OwnedFd> = OnceLock::new();
/// `true` once an upgrade handed the metrics listening socket over: this daemon accepts no
/// more scrapers (they wait in the backlog for the new one; none is accepted here and then
/// cut off by this process's exit).
static PAUSED: Mutex<bool> = Mutex::new(false);

/// The metrics endpoint's gate: it accepts and serves a scraper only while holding it and
/// finding `false`, so once an upgrade has set it, no scraper is being served here.
pub fn metrics_gate() -> MutexGuard<'static, bool> {
    PAUSED.lock().unwrap_or_else(|p| p.into_inner())
}

/// The upgrade failed: this daemon's endpoint accepts scrapers again.
pub fn resume_metrics() {
    *metrics_gate() = false;
}

/// Offers the metrics endpoint's listening socket (a duplicate) to every later upgrade.
pub fn offer_metrics(fd: OwnedFd) {
    let _ = METRICS.set(fd);
}

/// Old daemon: appends a duplicate of the metrics endpoint's listening socket to `fds`, if
/// the daemon has one, and stops accepting on it ([`metrics_gate`]); whether it did.
pub fn append_metrics(fds: &mut Vec<OwnedFd>) -> bool {
    match METRICS.get().map(OwnedFd::try_clone) {
        Some(Ok(fd)) => {
            fds.push(fd);
            *metrics_gate() = true;
            true
        }
        Some(Err(e)) => {
            warn!(error = %e, "metrics listener not passed; the new daemon binds it again");
            false
        }
        None => false,
    }
}

/// Listening sockets handed over by the old daemon.
pub struct Inherited {
    /// Per VM in configuration order: vhost-user first, then the backend's.
    pub vms: Vec<Vec<OwnedFd>>,
    /// The metrics endpoint's, if the old daemon had one.
    pub metrics: Option<OwnedFd>,
}

/// New daemon: splits the received `fds` into `vms` VMs' sockets (`counts` each; none given,
/// as from an older daemon: 3 each, the hybrid ones) and the metrics endpoint's (if
/// `metrics`); `None` if they do not add up.
pub fn split(
    fds: Vec<OwnedFd>,
    counts: Option<Vec<usize>>,
    metrics: Option<bool>,
    vms: usize,
) -> Option<Inherited> {
    let counts = counts.unwrap_or_else(|| vec![3; vms]);
    let metrics = metrics.unwrap_or(false);
    let want = counts.iter().sum::<usize>() + usize::from(metrics);
    if counts.len() != vms || fds.len() != want {
        return None;
    }
    let mut it = fds.into_iter();
    let vms = counts
        .iter()
        .map(|&n| it.by_ref().take(n).collect())
        .collect();
    Some(Inherited {
        vms,
        metrics: if metrics { it.next() } else { None },
    })
}
