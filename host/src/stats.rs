//! Live counters and facts of one VM, written by its device, gate and vhost-user thread and
//! read by the control socket and the metrics endpoint.
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::conn::Initiator;
use crate::plugin::PluginCounters;

/// Live counters of a VM, kept up to date by its device.
#[derive(Default)]
pub struct VmStats {
    pub frontend: AtomicBool,
    pub connections: AtomicUsize,
    /// What the metrics endpoint exports.
    pub counters: VmCounters,
    /// Where `ctl conns` gets the device's connection table.
    pub conns: crate::connlist::ConnTable,
    /// What a SAVE would record about the device right now (for `ctl save`).
    pub facts: DeviceFactsLive,
}

/// Device facts of a saved state, published by the device when they change.
#[derive(Default)]
pub struct DeviceFactsLive {
    pub acked_features: AtomicU64,
    pub event_queue_owned: AtomicBool,
    pub driver_live: AtomicBool,
}

/// Policy-chain verdicts, as counted by [`VmCounters::verdicts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow = 0,
    Deny = 1,
    Redirect = 2,
}

/// Outcomes of one policy-chain decision, as counted by [`VmCounters::decisions`]. Unlike
/// [`Verdict`], a deny is split into the plugins' own answer and a plugin failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allow = 0,
    Deny = 1,
    Redirect = 2,
    /// A plugin failed (trap, deadline, bad answer, quarantine): refused, fail closed.
    Failure = 3,
}

/// State-transfer directions, as counted by [`VmCounters::transfers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferDir {
    Save = 0,
    Load = 1,
}

/// Counters of one VM that outlive its frontend sessions (they belong to [`VmStats`]).
///
/// Each is written by one thread (the VM's worker, its vhost-user thread or the control
/// thread) with `Relaxed` adds; readers only need eventually consistent values.
#[derive(Debug, Default)]
pub struct VmCounters {
    /// Connections entered in the table, by initiator ([`Initiator`] as index).
    pub opened: [AtomicU64; 3],
    /// Payload bytes the guest sent (to host programs or siblings).
    pub bytes_from_guest: AtomicU64,
    /// Payload bytes placed in the guest's rx buffers.
    pub bytes_to_guest: AtomicU64,
    /// Connections over a host AF_VSOCK socket (forwarding backend, `host-vsock` route), by
    /// initiator (0 = guest, 1 = host program through `forward-listen`).
    pub afvsock_opened: [AtomicU64; 2],
    /// Payload bytes of those connections once closed (0 = from the guest, 1 = to it).
    /// Added when a connection goes, so the data path pays nothing for them.
    pub afvsock_bytes: [AtomicU64; 2],
    /// Policy-chain decisions ([`Verdict`] as index).
    pub verdicts: [AtomicU64; 3],
    /// Policy-chain decisions by initiator (0 = guest, 1 = host program) and [`Outcome`].
    pub decisions: [[AtomicU64; 4]; 2],
    /// `GET_VRING_BASE` requests, by queue (rx, tx, event).
    pub ring_stops: [AtomicU64; 3],
    /// Device-state transfers: `[direction][0 = ok, 1 = failed]`.
    pub transfers: [[AtomicU64; 2]; 2],
    /// Control-socket plugin swaps: `[0 = ok, 1 = failed]`.
    pub swaps: [AtomicU64; 2],
    /// The VM's serializer instance, set once when the VM is created (it is never replaced).
    pub serializer: OnceLock<(String, Arc<PluginCounters>)>,
}

impl VmCounters {
    pub fn opened(&self, who: Initiator) {
        self.opened[who as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an AF_VSOCK connection the guest (`from_guest`) or a host program opened.
    pub fn afvsock_opened(&self, from_guest: bool) {
        self.afvsock_opened[usize::from(!from_guest)].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds the payload totals of a closed AF_VSOCK connection.
    pub fn afvsock_closed(&self, from_guest: u64, to_guest: u64) {
        self.afvsock_bytes[0].fetch_add(from_guest, Ordering::Relaxed);
        self.afvsock_bytes[1].fetch_add(to_guest, Ordering::Relaxed);
    }

    pub fn verdict(&self, v: Verdict) {
        self.verdicts[v as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a decision on a connection the guest (`from_guest`) or a host program opened.
    pub fn decision(&self, from_guest: bool, o: Outcome) {
        self.decisions[usize::from(!from_guest)][o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn ring_stop(&self, queue: u32) {
        if let Some(c) = self.ring_stops.get(queue as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn transfer(&self, dir: TransferDir, ok: bool) {
        self.transfers[dir as usize][usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn swap(&self, ok: bool) {
        self.swaps[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }
}
