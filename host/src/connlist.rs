//! `vhost-plug ctl conns`: a bounded snapshot of a VM's connection table.
//!
//! The table belongs to the VM's worker thread and is never locked, so it is read on that
//! thread, only when someone asks: the control thread bumps the wanted generation, writes the
//! device's eventfd (one more source in the device's host-socket epoll, so the worker wakes as
//! for a host socket) and waits, bounded, on a condvar until the worker has copied at most
//! [`MAX_ROWS`] rows here and published a generation at least as new. Nothing runs on the data
//! path unless a snapshot was asked for; the mutex below is only taken by the asker and by the
//! worker while it publishes.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Most connections listed per VM.
pub const MAX_ROWS: usize = 4096;
/// How long the control thread waits for a worker's snapshot.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

/// One connection as `ctl conns` shows it, from the guest's side: `local_port` is the
/// guest's port, `peer_cid`/`peer_port` the other end (CID 2 for host programs, or a sibling
/// VM's CID).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnRow {
    pub vm: u64,
    pub local_port: u32,
    pub peer_cid: u64,
    pub peer_port: u32,
    /// `stream` or `seqpacket`.
    pub kind: String,
    /// Who opened it: `guest`, `host` or `sibling`.
    pub direction: String,
    pub state: String,
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
    /// The guest's receive buffer (`buf_alloc`) and how much of it it has consumed
    /// (`fwd_cnt`), as last advertised.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes we may still send to the guest.
    pub peer_credit: u32,
    /// Guest bytes we hold because the host socket did not take them yet.
    pub tx_buffered: usize,
}

/// A VM's connections at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// False when no VMM is connected (then there are no connections).
    pub frontend: bool,
    /// At most [`MAX_ROWS`].
    pub rows: Vec<ConnRow>,
    /// Connections in the table, listed or not.
    pub total: usize,
}

#[derive(Debug, Error)]
pub enum ConnListError {
    #[error("the VM's device did not answer within {0:?}")]
    Timeout(Duration),
    #[error("waking the VM's device: {0}")]
    Wake(std::io::Error),
}

#[derive(Default)]
struct Inner {
    /// The current device's eventfd; `None` between frontend sessions.
    waker: Option<Arc<EventFd>>,
    wanted: u64,
    published: u64,
    last: Snapshot,
}

/// The meeting point of askers and a VM's worker. Lives in [`crate::stats::VmStats`].
#[derive(Default)]
pub struct ConnTable {
    inner: Mutex<Inner>,
    ready: Condvar,
}

impl ConnTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device of a new frontend session registers its eventfd; `None` when it goes.
    pub fn set_waker(&self, waker: Option<Arc<EventFd>>) {
        let mut g = self.lock();
        g.waker = waker;
        if g.waker.is_none() {
            g.last = Snapshot::default();
        }
    }

    /// Whether a snapshot is wanted that was not published yet (worker side).
    pub fn wanted(&self) -> bool {
        let g = self.lock();
        g.wanted > g.published
    }

    /// Publishes the worker's rows (already bounded) and wakes the askers.
    pub fn publish(&self, rows: Vec<ConnRow>, total: usize) {
        let mut g = self.lock();
        g.published = g.wanted;
        g.last = Snapshot {
            frontend: true,
            rows,
            total,
        };
        drop(g);
        self.ready.notify_all();
    }

    /// Asks the worker for a fresh snapshot and waits for it at most `timeout`.
    pub fn request(&self, timeout: Duration) -> Result<Snapshot, ConnListError> {
        let mut g = self.lock();
        let Some(waker) = g.waker.clone() else {
            return Ok(Snapshot::default());
        };
        g.wanted += 1;
        let target = g.wanted;
        waker.write(1).map_err(ConnListError::Wake)?;
        let deadline = Instant::now() + timeout;
        while g.published < target {
            // The session ended meanwhile: nothing to list.
            if g.waker.is_none() {
                return Ok(Snapshot::default());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ConnListError::Timeout(timeout));
            }
            g = self
                .ready
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(g.last.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_frontend_means_no_connections() {
        let t = ConnTable::default();
        let s = t.request(Duration::from_millis(10)).expect("answer");
        assert_eq!(s, Snapshot::default());
    }

    #[test]
    fn asker_waits_for_the_worker() {
        let t = Arc::new(ConnTable::default());
        let fd = Arc::new(EventFd::new(0).expect("eventfd"));
        t.set_waker(Some(fd.clone()));
        assert!(
            t.request(Duration::from_millis(20)).is_err(),
            "nobody answers"
        );
        // The late answer to that request.
        let _ = fd.read();
        t.publish(Vec::new(), 0);
        assert!(!t.wanted());
        let worker = {
            let t = t.clone();
            std::thread::spawn(move || {
                // Wait for the asker's wake-up, as the device's epoll would.
                while !t.wanted() {
                    std::thread::yield_now();
                }
                let _ = fd.read();
                let row = ConnRow {
                    vm: 3,
                    local_port: 1,
                    peer_cid: 2,
                    peer_port: 1024,
                    kind: "stream".into(),
                    direction: "guest".into(),
                    state: "established".into(),
                    bytes_from_guest: 5,
                    bytes_to_guest: 6,
                    peer_buf_alloc: 7,
                    peer_fwd_cnt: 8,
                    peer_credit: 9,
                    tx_buffered: 10,
                };
                t.publish(vec![row], 1);
            })
        };
        let s = t.request(Duration::from_secs(10)).expect("snapshot");
        worker.join().expect("worker");
        assert!(s.frontend);
        assert_eq!((s.rows.len(), s.total, s.rows[0].peer_port), (1, 1, 1024));
        t.set_waker(None);
        assert_eq!(
            t.request(Duration::ZERO).expect("answer"),
            Snapshot::default()
        );
    }
}
