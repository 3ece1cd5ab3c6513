//! The vhost-user face of a VM's device: features, config space and event dispatch for
//! `vhost-user-backend`'s worker thread.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::Device;
use crate::mem::{Bitmap, GuestMemAtomic};
use crate::vsock::header::F_SEQPACKET;

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;
pub const NUM_QUEUES: usize = 3;
/// Event id of the device's host-socket epoll in the worker's event loop.
pub const HOST_EVENT: u16 = NUM_QUEUES as u16 + 1;

pub struct VsockBackend {
    dev: Mutex<Device>,
    guest_cid: u64,
    queue_size: usize,
    exit: (EventConsumer, EventNotifier),
}

impl VsockBackend {
    pub fn new(dev: Device, queue_size: usize) -> io::Result<Self> {
        let guest_cid = dev.guest_cid();
        Ok(VsockBackend {
            dev: Mutex::new(dev),
            guest_cid,
            queue_size,
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
        })
    }

    /// The device, even if a previous holder panicked (its state is still consistent enough
    /// to tear down, and a poisoned lock must not take the daemon down).
    pub fn device(&self) -> MutexGuard<'_, Device> {
        self.dev.lock().unwrap_or_else(|p| p.into_inner())
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
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << F_SEQPACKET)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.device()
            .set_seqpacket(features & (1 << F_SEQPACKET) != 0);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        info!(cid = self.guest_cid, "device reset");
        self.device().drop_all();
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config_space();
        let (off, size) = (offset as usize, size as usize);
        match off.checked_add(size) {
            Some(end) if end <= cfg.len() => cfg[off..end].to_vec(),
            _ => {
                warn!(offset, size, "config read outside the 8-byte config space");
                Vec::new()
            }
        }
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> io::Result<()> {
        self.device().set_memory(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Taking the lock waits for any packet being processed on the worker; afterwards the
        // ring is not ready, so nothing touches it again until it is restarted.
        let _dev = self.device();
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
        let mut dev = self.device();
        match device_event {
            RX_QUEUE | EVENT_QUEUE => {}
            TX_QUEUE => dev.process_tx(tx),
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

/// A backend shared with vhost-user-backend's threads.
pub type SharedBackend = Arc<VsockBackend>;
