//! The simulated VMM: connects to a backend's vhost-user socket with the vhost crate's
//! `Frontend`, negotiates features, shares memfd guest memory and sets up the vrings, the way
//! QEMU's vhost-user-vsock device does.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::mem::{GuestMem, DEFAULT_MEM_SIZE};
use crate::packet::VIRTIO_VSOCK_F_SEQPACKET;
use crate::ring::RingAddrs;

pub const VIRTIO_F_VERSION_1: u64 = 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 29;

/// Queue indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
const NUM_QUEUES: usize = 3;

/// Which vrings the VMM hands to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueSet {
    /// rx, tx and event (crosvm style: the backend owns the event queue).
    All,
    /// rx and tx only (QEMU style: the VMM keeps the event queue).
    RxTx,
}

/// Knobs of the simulated VMM.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Guest memory size in bytes.
    pub mem_size: usize,
    /// Entries per vring (power of two).
    pub queue_size: u16,
    pub queues: QueueSet,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if the backend offers it.
    pub event_idx: bool,
    /// Negotiate `VIRTIO_VSOCK_F_SEQPACKET` if the backend offers it.
    pub seqpacket: bool,
    /// Negotiate `REPLY_ACK` if offered (then every request asks for an ack).
    pub reply_ack: bool,
    /// Further protocol features to ack if offered (e.g. `DEVICE_STATE`).
    pub extra_protocol_features: VhostUserProtocolFeatures,
    /// How long to retry connecting to the vhost-user socket.
    pub connect_timeout: Duration,
    /// Bound on each vhost-user request's reply (a backend that never answers fails the
    /// request instead of hanging the test).
    pub request_timeout: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            mem_size: DEFAULT_MEM_SIZE,
            queue_size: 256,
            queues: QueueSet::All,
            event_idx: true,
            seqpacket: true,
            reply_ack: true,
            extra_protocol_features: VhostUserProtocolFeatures::empty(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Per-queue plumbing handed to the guest driver.
pub struct QueueHandle {
    pub addrs: RingAddrs,
    /// The driver writes this to notify the backend.
    pub kick: EventFd,
    /// The backend writes this to interrupt the driver.
    pub call: EventFd,
    /// Whether the backend was given this queue.
    pub active: bool,
}

/// A connected simulated VMM.
pub struct SimVmm {
    socket_path: PathBuf,
    frontend: Option<Frontend>,
    mem: GuestMem,
    queues: Vec<QueueHandle>,
    offered_features: u64,
    acked_features: u64,
    offered_protocol: VhostUserProtocolFeatures,
    acked_protocol: VhostUserProtocolFeatures,
    guest_cid: u64,
    config: SimConfig,
}

fn connect_retry(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("connecting to vhost-user socket {}", path.display()))
            }
        }
    }
}

fn vu<T>(r: vhost::Result<T>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow!("vhost-user {what}: {e}"))
}

impl SimVmm {
    /// Connects, negotiates, shares memory, reads the config and sets up the vrings.
    pub fn connect(socket_path: &Path, config: SimConfig) -> Result<SimVmm> {
        let stream = connect_retry(socket_path, config.connect_timeout)?;
        stream
            .set_read_timeout(Some(config.request_timeout))
            .context("setting vhost-user reply timeout")?;
        stream
            .set_write_timeout(Some(config.request_timeout))
            .context("setting vhost-user send timeout")?;
        let mut fe = Frontend::from_stream(stream, NUM_QUEUES as u64);
        vu(fe.set_owner(), "SET_OWNER")?;
        let offered = vu(fe.get_features(), "GET_FEATURES")?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        for (bit, name) in [
            (1u64 << VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"),
            (protocol_bit, "VHOST_USER_F_PROTOCOL_FEATURES"),
        ] {
            if offered & bit == 0 {
                bail!("backend does not offer {name} (features {offered:#x})");
            }
        }
        let mut want = (1u64 << VIRTIO_F_VERSION_1) | protocol_bit;
        if config.event_idx {
            want |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if config.seqpacket {
            want |= 1 << VIRTIO_VSOCK_F_SEQPACKET;
        }
        let acked = offered & want;

        let offered_protocol = vu(fe.get_protocol_features(), "GET_PROTOCOL_FEATURES")?;
        if !offered_protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            bail!("backend does not offer the CONFIG protocol feature");
        }
        let mut want_protocol = VhostUserProtocolFeatures::CONFIG | config.extra_protocol_features;
        if config.reply_ack {
            want_protocol |= VhostUserProtocolFeatures::REPLY_ACK;
        }
        let acked_protocol = offered_protocol & want_protocol;
        vu(
            fe.set_protocol_features(acked_protocol),
            "SET_PROTOCOL_FEATURES",
        )?;
        if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }

        let mut sim = SimVmm {
            socket_path: socket_path.to_path_buf(),
            frontend: Some(fe),
            mem: GuestMem::new(config.mem_size)?,
            queues: Vec::new(),
            offered_features: offered,
            acked_features: acked,
            offered_protocol,
            acked_protocol,
            guest_cid: 0,
            config,
        };
        sim.guest_cid = sim.read_guest_cid()?;
        let fe = sim.frontend()?;
        vu(fe.set_features(acked), "SET_FEATURES")?;
        sim.set_mem_table()?;
        sim.setup_vrings()?;
        Ok(sim)
    }

    fn set_mem_table(&mut self) -> Result<()> {
        let regions = self
            .mem
            .memory()
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|e| anyhow!("describing guest region at {:?}: {e}", r.start_addr()))
            })
            .collect::<Result<Vec<_>>>()?;
        vu(self.frontend()?.set_mem_table(&regions), "SET_MEM_TABLE")?;
        Ok(())
    }

    fn setup_vrings(&mut self) -> Result<()> {
        let size = self.config.queue_size;
        for idx in 0..NUM_QUEUES {
            let addrs = RingAddrs::alloc(&mut self.mem, size)?;
            let active = idx != EVENT_QUEUE || self.config.queues == QueueSet::All;
            let handle = QueueHandle {
                addrs,
                kick: EventFd::new(EFD_NONBLOCK).context("kick eventfd")?,
                call: EventFd::new(EFD_NONBLOCK).context("call eventfd")?,
                active,
            };
            if active {
                self.program_vring(idx, &handle, 0)?;
            }
            self.queues.push(handle);
        }
        for idx in 0..NUM_QUEUES {
            if self.queues[idx].active {
                self.set_vring_enable(idx, true)?;
            }
        }
        Ok(())
    }

    fn program_vring(&self, idx: usize, q: &QueueHandle, base: u16) -> Result<()> {
        let fe = self.frontend()?;
        vu(fe.set_vring_num(idx, q.addrs.size), "SET_VRING_NUM")?;
        // vhost-user passes ring addresses in the frontend's address space (like QEMU's
        // host virtual addresses); the backend translates them through the memory table.
        let cfg = VringConfigData {
            queue_max_size: q.addrs.size,
            queue_size: q.addrs.size,
            flags: 0,
            desc_table_addr: self.vmm_addr(q.addrs.desc)?,
            used_ring_addr: self.vmm_addr(q.addrs.used)?,
            avail_ring_addr: self.vmm_addr(q.addrs.avail)?,
            log_addr: None,
        };
        vu(fe.set_vring_addr(idx, &cfg), "SET_VRING_ADDR")?;
        vu(fe.set_vring_base(idx, base), "SET_VRING_BASE")?;
        vu(fe.set_vring_call(idx, &q.call), "SET_VRING_CALL")?;
        vu(fe.set_vring_kick(idx, &q.kick), "SET_VRING_KICK")?;
        Ok(())
    }

    /// The VMM-side (user virtual) address of guest address `gpa`.
    pub fn vmm_addr(&self, gpa: GuestAddress) -> Result<u64> {
        let p = self
            .mem
            .memory()
            .get_host_address(gpa)
            .map_err(|e| anyhow!("guest address {gpa:?}: {e}"))?;
        Ok(p as u64)
    }

    /// Re-programs vring `idx` (num, addresses, base, call, kick), e.g. after `get_vring_base`.
    pub fn restart_vring(&mut self, idx: usize, base: u16) -> Result<()> {
        let q = self.queues.get(idx).context("no such queue")?;
        self.program_vring(idx, q, base)?;
        self.set_vring_enable(idx, true)
    }

    /// `SET_VRING_ENABLE`.
    pub fn set_vring_enable(&mut self, idx: usize, enable: bool) -> Result<()> {
        let fe = self.frontend_mut()?;
        vu(fe.set_vring_enable(idx, enable), "SET_VRING_ENABLE")
    }

    /// `GET_VRING_BASE`: stops the ring and returns the backend's next avail index.
    pub fn get_vring_base(&mut self, idx: usize) -> Result<u32> {
        vu(self.frontend()?.get_vring_base(idx), "GET_VRING_BASE")
    }

    /// Reads `guest_cid` from the device config space (offset 0, 8 bytes).
    pub fn read_guest_cid(&mut self) -> Result<u64> {
        read_cid(self.frontend_mut()?)
    }

    /// The vhost-user frontend, for requests this type does not wrap
    /// (`SET_DEVICE_STATE_FD`, `CHECK_DEVICE_STATE`, ...).
    pub fn frontend(&self) -> Result<&Frontend> {
        self.frontend
            .as_ref()
            .context("simulated VMM is disconnected")
    }

    /// Mutable access to the frontend (some requests take `&mut self`).
    pub fn frontend_mut(&mut self) -> Result<&mut Frontend> {
        self.frontend
            .as_mut()
            .context("simulated VMM is disconnected")
    }

    /// A clone of the frontend (it is a shared handle to the same connection).
    pub fn frontend_handle(&self) -> Result<Frontend> {
        self.frontend().cloned()
    }

    /// Closes the vhost-user connection, as a VMM that exits or crashes does. The guest memory
    /// stays mapped (the driver keeps its own reference).
    pub fn disconnect(&mut self) {
        if let Some(fe) = self.frontend.take() {
            // SAFETY: the fd belongs to the frontend's socket, which is alive while `fe` is;
            // shutdown() does not close it, so other clones of the frontend stay memory safe and
            // merely see a broken connection.
            unsafe {
                libc::shutdown(fe.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
    }

    pub fn is_connected(&self) -> bool {
        self.frontend.is_some()
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        self.mem.memory()
    }

    /// Guest memory and its allocator (the driver places its buffers here).
    pub fn guest_mem_mut(&mut self) -> &mut GuestMem {
        &mut self.mem
    }

    pub fn queue(&self, idx: usize) -> Option<&QueueHandle> {
        self.queues.get(idx)
    }

    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn has_feature(&self, bit: u64) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    pub fn offered_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.offered_protocol
    }

    pub fn acked_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.acked_protocol
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }
}

impl Drop for SimVmm {
    fn drop(&mut self) {
        self.disconnect();
    }
}

/// Reads `guest_cid` through a frontend.
pub fn read_cid(fe: &mut Frontend) -> Result<u64> {
    let (_, payload) = vu(
        fe.get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8]),
        "GET_CONFIG",
    )?;
    let bytes: [u8; 8] = payload
        .as_slice()
        .try_into()
        .map_err(|_| anyhow!("GET_CONFIG returned {} bytes, want 8", payload.len()))?;
    Ok(u64::from_le_bytes(bytes))
}
