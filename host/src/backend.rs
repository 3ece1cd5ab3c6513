//! The vhost-user face of a VM's device: features, config space and event dispatch for
//! `vhost-user-backend`'s worker thread.

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, info, warn};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::Device;
use crate::handover::Slots;
use crate::mem::{Bitmap, GuestMem, GuestMemAtomic};
use crate::migration::{DeviceFacts, Outgoing, StatePlugins, Transfer};
use crate::stats::{TransferDir, VmStats};
use crate::vsock::header::F_SEQPACKET;

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;
pub const NUM_QUEUES: usize = 3;
/// Virtio features the device offers.
pub const OFFERED_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << F_SEQPACKET)
    | VhostUserVirtioFeatures::LOG_ALL.bits()
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// Event id of the device's host-socket epoll in the worker's event loop.
pub const HOST_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Event id of [`VsockBackend::exit_fd`] in the worker's event loop.
pub const EXIT_EVENT: u16 = HOST_EVENT + 1;

pub struct VsockBackend {
    dev: Arc<Mutex<Device>>,
    state: StatePlugins,
    handover: Arc<Slots>,
    max_connections: usize,
    transfer: Mutex<Transfer>,
    /// Direction of the transfer `CHECK_DEVICE_STATE` will report on (for the metrics).
    transfer_dir: Mutex<Option<TransferDir>>,
    stats: Option<Arc<VmStats>>,
    guest_cid: u64,
    queue_size: usize,
    /// Stops the vring worker (see [`VsockBackend::exit_fd`]).
    exit: EventFd,
    /// The guest memory snapshot [`check_regions`] last passed (see `memory_checked`).
    checked: Mutex<Option<Arc<GuestMem>>>,
}

impl VsockBackend {
    pub fn new(
        dev: Device,
        queue_size: usize,
        state: StatePlugins,
        handover: Arc<Slots>,
    ) -> io::Result<Self> {
        let guest_cid = dev.guest_cid();
        let max_connections = dev.max_connections();
        let stats = dev.stats();
        Ok(VsockBackend {
            dev: Arc::new(Mutex::new(dev)),
            state,
            handover,
            max_connections,
            transfer: Mutex::new(Transfer::default()),
            transfer_dir: Mutex::new(None),
            stats,
            guest_cid,
            queue_size,
            exit: EventFd::new(EFD_NONBLOCK)?,
            checked: Mutex::new(None),
        })
    }

    /// The device, even if a previous holder panicked (its state is still consistent enough
    /// to tear down, and a poisoned lock must not take the daemon down).
    pub fn device(&self) -> MutexGuard<'_, Device> {
        self.dev.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count_transfer(&self, dir: TransferDir, ok: bool) {
        if let Some(s) = &self.stats {
            s.counters.transfer(dir, ok);
        }
    }

    /// Register this with every vring worker as [`EXIT_EVENT`]; [`VsockBackend::stop_workers`]
    /// then ends them. This replaces `exit_event`, whose consumer fd vhost-user-backend 0.24
    /// registers with `into_raw_fd` and never closes: one fd leaked per frontend session.
    pub fn exit_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.exit)
    }

    /// vhost-user-backend puts a new memory table in place before `update_memory` can refuse
    /// it, so a vring event may arrive in between: the device touches guest memory only while
    /// the current snapshot is one that [`check_regions`] passed.
    fn memory_checked(&self, dev: &Device) -> bool {
        let Some(atomic) = dev.memory() else {
            return true;
        };
        let snap = atomic.memory();
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if checked
            .as_ref()
            .is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), &*snap))
        {
            return true;
        }
        if check_regions(&snap).is_err() {
            return false;
        }
        *checked = Some(snap.into_inner());
        true
    }

    /// Ends the vring workers (the eventfd stays readable, so every worker sees it).
    pub fn stop_workers(&self) {
        if let Err(e) = self.exit.write(1) {
            warn!(cid = self.guest_cid, error = %e, "cannot signal the vring workers to exit");
        }
    }

    /// The 8-byte config space: `guest_cid` little endian.
    fn config_space(&self) -> [u8; 8] {
        self.guest_cid.to_le_bytes()
    }
}

impl VhostUserBackend for VsockBackend {
    type Bitmap = Bitmap;
    type Vring = VringRwLock<GuestMemAtomic>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn acked_features(&self, features: u64) {
        self.device().set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::DEVICE_STATE
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "only the STOPPED phase is supported",
            ));
        }
        let mut transfer = self.transfer.lock().unwrap_or_else(|p| p.into_inner());
        let mut dir = self.transfer_dir.lock().unwrap_or_else(|p| p.into_inner());
        match direction {
            VhostTransferStateDirection::SAVE => {
                let (snap, out) = match self.handover.take_target() {
                    Some(control) => {
                        let (snap, fds) = self.device().handover_snapshot();
                        (snap, Some(Outgoing { control, fds }))
                    }
                    None => (self.device().snapshot(), None),
                };
                *dir = None;
                if let Err(e) = transfer.save(snap, &self.state, file, out) {
                    self.count_transfer(TransferDir::Save, false);
                    return Err(io::Error::other(e));
                }
                *dir = Some(TransferDir::Save);
            }
            VhostTransferStateDirection::LOAD => {
                let facts = DeviceFacts {
                    guest_cid: self.guest_cid,
                    offered_features: self.features(),
                    max_connections: self.max_connections,
                };
                let dev = self.dev.clone();
                let slots = self.handover.clone();
                transfer.load(file, facts, &self.state, slots, move |st, fds| {
                    dev.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .restore(st, fds)
                });
                *dir = Some(TransferDir::Load);
            }
        }
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        let mut transfer = self.transfer.lock().unwrap_or_else(|p| p.into_inner());
        let r = transfer.check();
        if let Some(dir) = self
            .transfer_dir
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            self.count_transfer(dir, r.is_ok());
        }
        r.map_err(|e| {
            warn!(cid = self.guest_cid, error = %e, "device state transfer failed");
            io::Error::other(e)
        })
    }

    fn reset_device(&self) {
        info!(cid = self.guest_cid, "device reset");
        self.device().drop_all();
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config_space();
        if u64::from(offset) + u64::from(size) > cfg.len() as u64 {
            // A guest can cause these at will: not worth more than a debug line.
            debug!(
                offset,
                size, "config read reaches past the 8-byte config space"
            );
        }
        config_read(&cfg, offset, size)
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> io::Result<()> {
        check_regions(&mem.memory())?;
        let unsealed = shrinkable_regions(&mem.memory());
        if unsealed > 0 {
            info!(
                cid = self.guest_cid,
                regions = unsealed,
                "guest memory is not sealed against shrinking: if the VMM truncates it, the \
                 daemon dies of SIGBUS (a sealed memfd prevents that, e.g. QEMU's \
                 memory-backend-memfd with its default seal=on)"
            );
        }
        self.device().set_memory(mem);
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Taking the lock waits for any packet being processed on the worker; afterwards the
        // ring is not ready, so nothing touches it again until it is restarted.
        let _dev = self.device();
        if let Some(s) = &self.stats {
            s.counters.ring_stop(queue_index);
        }
        debug!(cid = self.guest_cid, queue_index, "vring stopped");
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock<GuestMemAtomic>],
        _thread_id: usize,
    ) -> io::Result<()> {
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE as usize), vrings.get(TX_QUEUE as usize))
        else {
            return Ok(());
        };
        // An error is the only other way out of vhost-user-backend's worker loop.
        if device_event == EXIT_EVENT {
            return Err(io::Error::other("frontend session over"));
        }
        let mut dev = self.device();
        if !self.memory_checked(&dev) {
            return Ok(());
        }
        let evq = vrings.get(usize::from(EVENT_QUEUE));
        dev.note_rings(rx, evq);
        if let Some(evq) = evq {
            dev.transport_reset(evq);
        }
        match device_event {
            RX_QUEUE | EVENT_QUEUE => dev.reattach(),
            TX_QUEUE => {
                dev.reattach();
                dev.process_tx(tx)
            }
            HOST_EVENT => dev.handle_host_events(),
            other => warn!(event = other, "unknown device event"),
        }
        // Answers to the guest's packets and host data both go out through rx; a tx queue
        // that stalled on RST replies resumes once they are out.
        while dev.process_rx(rx) {
            dev.process_tx(tx);
        }
        Ok(())
    }
}

/// Refuses a memory table whose regions reach past the end of their regular file (or memfd):
/// touching such a mapping raises SIGBUS, which would take down every VM of the daemon.
/// A frontend that shrinks the file later can still do that; this catches the table itself.
fn check_regions(mem: &GuestMem) -> io::Result<()> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else { continue };
        let meta = fo.file().metadata()?;
        if !meta.is_file() {
            continue;
        }
        let end = fo.start().checked_add(r.len());
        if end.is_none_or(|e| e > meta.len()) {
            warn!(
                gpa = r.start_addr().0,
                size = r.len(),
                offset = fo.start(),
                file_size = meta.len(),
                "memory region extends beyond the end of its file"
            );
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "memory region at {:#x} ({} bytes at file offset {}) extends beyond its \
                     {}-byte file",
                    r.start_addr().0,
                    r.len(),
                    fo.start(),
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}

/// How many regions are backed by a file that its owner may still shrink: a regular file, or
/// a memfd without `F_SEAL_SHRINK`.
fn shrinkable_regions(mem: &GuestMem) -> usize {
    use std::os::fd::AsRawFd;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .filter_map(|r| r.file_offset())
        .filter(|fo| {
            // SAFETY: F_GET_SEALS on a file descriptor we hold; no memory is passed.
            let seals = unsafe { libc::fcntl(fo.file().as_raw_fd(), libc::F_GET_SEALS) };
            seals < 0 || seals & libc::F_SEAL_SHRINK == 0
        })
        .count()
}

/// Largest config read a frontend can make: the vhost crate refuses requests that end past
/// `VHOST_USER_CONFIG_SIZE` (4 KiB) before they reach the backend; this bound holds anyway.
const MAX_CONFIG_READ: usize = 4096;

/// A config-space read of `size` bytes at `offset`: the bytes of `cfg` it covers, zeros for the
/// rest, and always exactly `size` bytes (up to [`MAX_CONFIG_READ`]). Frontends pass guest reads
/// of the device-config window through as they come, and vhost-user-backend turns an answer of
/// any other length into an empty reply: Cloud Hypervisor's generic vhost-user device panics on
/// that (`read_config` in `generic_vhost_user.rs`) and crosvm logs an error and leaves the guest's
/// buffer as it was. A register the device does not have reads as zero, as on hardware.
fn config_read(cfg: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let size = (size as usize).min(MAX_CONFIG_READ);
    let mut out = vec![0u8; size];
    if let Some(src) = cfg.get(offset as usize..) {
        let n = src.len().min(size);
        out[..n].copy_from_slice(&src[..n]);
    }
    out
}

/// A backend shared with vhost-user-backend's threads.
pub type SharedBackend = Arc<VsockBackend>;

#[cfg(test)]
mod tests {
    use super::config_read;

    const CFG: [u8; 8] = [3, 0, 0, 0, 0, 0, 0, 0x80];

    #[test]
    fn config_reads_inside_the_space_return_its_bytes() {
        assert_eq!(config_read(&CFG, 0, 8), CFG.to_vec());
        assert_eq!(config_read(&CFG, 0, 4), vec![3, 0, 0, 0]);
        assert_eq!(config_read(&CFG, 4, 4), vec![0, 0, 0, 0x80]);
    }

    #[test]
    fn config_reads_past_the_space_are_zero_filled_to_the_requested_size() {
        // Straddling the end: the covered bytes, then zeros.
        assert_eq!(config_read(&CFG, 6, 4), vec![0, 0x80, 0, 0]);
        // Entirely outside, including offsets near u32::MAX.
        assert_eq!(config_read(&CFG, 8, 4), vec![0; 4]);
        assert_eq!(config_read(&CFG, 0x100, 0x10), vec![0; 0x10]);
        assert_eq!(config_read(&CFG, u32::MAX, 4), vec![0; 4]);
        // A whole 256-byte window (QEMU's VHOST_USER_MAX_CONFIG_SIZE).
        let all = config_read(&CFG, 0, 256);
        assert_eq!(all.len(), 256);
        assert_eq!(&all[..8], &CFG);
        assert!(all[8..].iter().all(|b| *b == 0));
    }

    #[test]
    fn config_reads_are_bounded() {
        assert_eq!(config_read(&CFG, 0, u32::MAX).len(), 4096);
    }
}
