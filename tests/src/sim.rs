//! The simulated VMM: connects to a backend's vhost-user socket with the vhost crate's
//! `Frontend`, negotiates features, shares memfd guest memory and sets up the vrings, the way
//! QEMU's vhost-user-vsock device does.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
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
    /// Program and enable the vrings in `connect`. When false, `connect` stops after
    /// features and memory table (ring memory is allocated but the backend has not seen it),
    /// the state of a destination VMM before `SET_DEVICE_STATE_FD(LOAD)`; start them later
    /// with [`SimVmm::start_vrings`].
    pub start_vrings: bool,
    /// Seal the guest memory memfd against resizing (QEMU's default); false gives the backend
    /// memory its owner could still shrink.
    pub seal_memory: bool,
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
            start_vrings: true,
            seal_memory: true,
        }
    }
}

/// Per-queue plumbing handed to the guest driver.
/// Page size of the vhost-user dirty log.
pub const LOG_PAGE: usize = 4096;
/// `VHOST_F_LOG_ALL`.
const LOG_ALL: u64 = 1 << 26;

/// The frontend's dirty log (see [`SimVmm::start_dirty_log`]).
pub struct DirtyLog {
    file: File,
    pages: usize,
}

impl DirtyLog {
    /// Guest page numbers whose bit is set.
    pub fn dirty_pages(&self) -> Result<Vec<usize>> {
        let mut bits = Vec::new();
        (&self.file)
            .read_to_end(&mut bits)
            .context("reading the dirty log")?;
        use std::io::Seek;
        (&self.file).rewind().context("rewinding the dirty log")?;
        Ok((0..self.pages)
            .filter(|p| bits.get(p / 8).is_some_and(|b| b & (1 << (p % 8)) != 0))
            .collect())
    }

    /// Clears every bit (as a VMM does after copying the dirty pages).
    pub fn clear(&self) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let len = self.file.metadata().context("dirty log size")?.len() as usize;
        self.file
            .write_all_at(&vec![0u8; len], 0)
            .context("clearing the dirty log")
    }
}

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
    /// Connects, negotiates, shares memory, reads the config and sets up the vrings
    /// (unless `config.start_vrings` is false).
    pub fn connect(socket_path: &Path, config: SimConfig) -> Result<SimVmm> {
        let mem = if config.seal_memory {
            GuestMem::new(config.mem_size)?
        } else {
            GuestMem::new_unsealed(config.mem_size)?
        };
        let mut sim = Self::negotiate(socket_path, config, mem)?;
        sim.alloc_queues()?;
        if sim.config.start_vrings {
            sim.start_vrings()?;
        }
        Ok(sim)
    }

    /// The destination VMM of a simulated migration: connects to `socket_path` (another
    /// backend), negotiates with `config`, and sends the memory table of *this* VMM's guest
    /// memory (the same pages: the guest driver keeps running on them) and the same ring
    /// addresses and eventfds. The vrings are not started: load the state, then
    /// [`SimVmm::restart_vring`] each ring with the base the source reported.
    pub fn migration_target(&self, socket_path: &Path, config: SimConfig) -> Result<SimVmm> {
        let config = SimConfig {
            start_vrings: false,
            ..config
        };
        let mut sim = Self::negotiate(socket_path, config, self.mem.share()?)?;
        for (idx, q) in self.queues.iter().enumerate() {
            let active = idx != EVENT_QUEUE || sim.config.queues == QueueSet::All;
            sim.queues.push(QueueHandle {
                addrs: q.addrs,
                kick: q.kick.try_clone().context("dup kick eventfd")?,
                call: q.call.try_clone().context("dup call eventfd")?,
                active,
            });
        }
        Ok(sim)
    }

    /// Connects, negotiates features and sends the memory table; no vrings yet.
    fn negotiate(socket_path: &Path, config: SimConfig, mem: GuestMem) -> Result<SimVmm> {
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
            mem,
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

    /// Allocates ring memory and eventfds for every queue (nothing is sent to the backend).
    fn alloc_queues(&mut self) -> Result<()> {
        let size = self.config.queue_size;
        for idx in 0..NUM_QUEUES {
            let addrs = RingAddrs::alloc(&mut self.mem, size)?;
            let active = idx != EVENT_QUEUE || self.config.queues == QueueSet::All;
            self.queues.push(QueueHandle {
                addrs,
                kick: EventFd::new(EFD_NONBLOCK).context("kick eventfd")?,
                call: EventFd::new(EFD_NONBLOCK).context("call eventfd")?,
                active,
            });
        }
        Ok(())
    }

    /// Programs every active vring with base 0 and enables it (what `connect` does unless
    /// `SimConfig::start_vrings` is false).
    pub fn start_vrings(&mut self) -> Result<()> {
        for idx in 0..self.queues.len() {
            if self.queues[idx].active {
                self.program_vring(idx, &self.queues[idx], 0)?;
            }
        }
        for idx in 0..self.queues.len() {
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

    /// Suspends the device: `GET_VRING_BASE` on every active vring, rx, tx, event in that
    /// order. Returns each queue's base (`None` for a queue the backend was not given).
    pub fn stop_vrings(&mut self) -> Result<VringBases> {
        let mut bases = Vec::with_capacity(self.queues.len());
        for idx in 0..self.queues.len() {
            if !self.queues[idx].active {
                bases.push(None);
                continue;
            }
            let b = self
                .get_vring_base(idx)
                .with_context(|| format!("stopping vring {idx}"))?;
            let b = u16::try_from(b)
                .map_err(|_| anyhow!("GET_VRING_BASE({idx}) returned {b}, beyond u16"))?;
            bases.push(Some(b));
        }
        Ok(VringBases(bases))
    }

    /// Resumes the device: [`SimVmm::restart_vring`] on every queue `bases` names.
    pub fn resume_vrings(&mut self, bases: &VringBases) -> Result<()> {
        for (idx, b) in bases.0.iter().enumerate() {
            if let Some(b) = b {
                self.restart_vring(idx, *b)
                    .with_context(|| format!("restarting vring {idx} at base {b}"))?;
            }
        }
        Ok(())
    }

    /// Reads (and so clears) vring `idx`'s call eventfd: true if the backend signalled it
    /// since the last read. Only meaningful while the guest driver's interrupt thread is
    /// paused ([`crate::Guest::pause_interrupts`]), since it reads the same eventfd.
    pub fn take_call(&self, idx: usize) -> Result<bool> {
        let q = self.queues.get(idx).context("no such queue")?;
        take_eventfd(&q.call).with_context(|| format!("reading call eventfd {idx}"))
    }

    /// Reads (and so clears) vring `idx`'s kick eventfd: true if the driver had kicked and
    /// the backend had not consumed the kick.
    pub fn take_kick(&self, idx: usize) -> Result<bool> {
        let q = self.queues.get(idx).context("no such queue")?;
        take_eventfd(&q.kick).with_context(|| format!("reading kick eventfd {idx}"))
    }

    /// `used->idx` of vring `idx`, read from guest memory.
    pub fn used_idx(&self, idx: usize) -> Result<u16> {
        let q = self.queues.get(idx).context("no such queue")?;
        let v: u16 = self
            .memory()
            .read_obj(GuestAddress(q.addrs.used.0 + 2))
            .context("reading used idx")?;
        Ok(u16::from_le(v))
    }

    /// `avail->idx` of vring `idx`, read from guest memory.
    pub fn avail_idx(&self, idx: usize) -> Result<u16> {
        let q = self.queues.get(idx).context("no such queue")?;
        let v: u16 = self
            .memory()
            .read_obj(GuestAddress(q.addrs.avail.0 + 2))
            .context("reading avail idx")?;
        Ok(u16::from_le(v))
    }

    /// Starts dirty-page logging as a VMM does for live migration: a shared log of one bit
    /// per 4 KiB page of guest memory (`SET_LOG_BASE` with `LOG_SHMFD`), then the features
    /// again with `VHOST_F_LOG_ALL`. The VMM must have acked `LOG_SHMFD`.
    pub fn start_dirty_log(&mut self) -> Result<DirtyLog> {
        let pages = self.config.mem_size.div_ceil(LOG_PAGE);
        let size = pages.div_ceil(8).div_ceil(4096) * 4096;
        let name = std::ffi::CString::new("vhost-plug-dirty-log").context("memfd name")?;
        // SAFETY: `name` is a valid C string and MFD_CLOEXEC a valid flag; the result is
        // checked before use.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create for the log");
        }
        // SAFETY: memfd_create just returned this fd; nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size as u64).context("sizing the dirty log")?;
        let features = self.acked_features | LOG_ALL;
        let fe = self.frontend()?;
        vu(fe.set_features(features), "SET_FEATURES(LOG_ALL)")?;
        vu(
            fe.set_log_base(
                0,
                Some(vhost::VhostUserDirtyLogRegion {
                    mmap_size: size as u64,
                    mmap_offset: 0,
                    mmap_handle: file.as_raw_fd(),
                }),
            ),
            "SET_LOG_BASE",
        )?;
        Ok(DirtyLog { file, pages })
    }

    /// A copy of all guest memory.
    pub fn snapshot_memory(&self) -> Result<Vec<u8>> {
        self.mem.snapshot()
    }

    /// Names the part of guest memory at `offset` (which ring of which queue, or "buffers").
    pub fn describe_addr(&self, offset: u64) -> String {
        let names = ["rx", "tx", "event"];
        for (idx, q) in self.queues.iter().enumerate() {
            let n = u64::from(q.addrs.size);
            let name = names.get(idx).copied().unwrap_or("queue");
            for (part, base, len) in [
                ("descriptor table", q.addrs.desc.0, 16 * n),
                ("avail ring", q.addrs.avail.0, 6 + 2 * n),
                ("used ring", q.addrs.used.0, 6 + 8 * n),
            ] {
                if (base..base + len).contains(&offset) {
                    return format!("{name} {part} +{:#x}", offset - base);
                }
            }
        }
        format!("buffer memory at {offset:#x}")
    }

    /// `SET_DEVICE_STATE_FD(SAVE, STOPPED)` on a pipe, read to EOF, then
    /// `CHECK_DEVICE_STATE`. The vrings must be stopped. Every wait is bounded by `timeout`.
    pub fn save_state(&self, timeout: Duration) -> Result<Vec<u8>> {
        let fe = self.frontend()?.clone();
        let (r, w) = pipe().context("pipe for SAVE")?;
        let deadline = Instant::now() + timeout;
        // Read on a thread from the start: a backend that writes before replying must not
        // deadlock on a full pipe.
        let reader = std::thread::spawn(move || read_to_eof(r, deadline));
        let own = vu(
            fe.set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                w,
            ),
            "SET_DEVICE_STATE_FD(SAVE)",
        );
        let blob = match own {
            Ok(None) => reader
                .join()
                .map_err(|_| anyhow!("state reader panicked"))?
                .context("reading the saved state")?,
            Ok(Some(f)) => {
                // The backend sent its own fd: read that one. The first reader ends when the
                // backend closes our pipe's write end, or at the deadline; it is not waited for.
                drop(reader);
                read_to_eof(OwnedFd::from(f), deadline)
                    .context("reading the saved state from the backend's fd")?
            }
            Err(e) => {
                let _ = reader.join();
                return Err(e);
            }
        };
        vu(fe.check_device_state(), "CHECK_DEVICE_STATE after SAVE")?;
        Ok(blob)
    }

    /// `SET_DEVICE_STATE_FD(LOAD, STOPPED)` on a pipe, writes `blob` and closes, then
    /// `CHECK_DEVICE_STATE`. Errors only if the exchange itself fails; what the backend
    /// thinks of the blob is in [`LoadReport::check`].
    pub fn load_state(&self, blob: &[u8], timeout: Duration) -> Result<LoadReport> {
        let fe = self.frontend()?.clone();
        let (r, w) = pipe().context("pipe for LOAD")?;
        let deadline = Instant::now() + timeout;
        let own = vu(
            fe.set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                r,
            ),
            "SET_DEVICE_STATE_FD(LOAD)",
        )?;
        let sink: OwnedFd = match own {
            None => w,
            Some(f) => {
                drop(w);
                OwnedFd::from(f)
            }
        };
        let (written, write_error) = write_all_bounded(sink, blob, deadline);
        let check = fe
            .check_device_state()
            .map_err(|e| format!("CHECK_DEVICE_STATE: {e}"));
        Ok(LoadReport {
            written,
            write_error,
            check,
        })
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

/// Each queue's `GET_VRING_BASE` answer, by queue index (`None`: queue not given to the
/// backend).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VringBases(pub Vec<Option<u16>>);

impl VringBases {
    pub fn get(&self, idx: usize) -> Option<u16> {
        self.0.get(idx).copied().flatten()
    }
}

/// What happened in a LOAD.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// Bytes written before the backend closed its end (all of them normally).
    pub written: usize,
    /// Why writing stopped early (EPIPE when the backend stopped reading), if it did.
    pub write_error: Option<String>,
    /// `CHECK_DEVICE_STATE`: Ok if the backend accepted the state.
    pub check: std::result::Result<(), String>,
}

impl LoadReport {
    pub fn accepted(&self) -> bool {
        self.check.is_ok()
    }
}

fn take_eventfd(fd: &EventFd) -> Result<bool> {
    match fd.read() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A pipe (read end, write end), close-on-exec.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn poll_fd(fd: RawFd, events: libc::c_short, deadline: Instant) -> std::io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `p` is a valid pollfd for the duration of the call and nfds is 1.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(n > 0);
    }
}

/// Reads `fd` until EOF, failing if that takes past `deadline`.
fn read_to_eof(fd: OwnedFd, deadline: Instant) -> Result<Vec<u8>> {
    let raw = fd.as_raw_fd();
    let mut f = File::from(fd);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !poll_fd(raw, libc::POLLIN, deadline)? {
            bail!(
                "no EOF on the state pipe by the deadline ({} bytes read): the backend did not                  close its end",
                out.len()
            );
        }
        match f.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the state pipe"),
        }
    }
}

/// Writes `data` to `fd` and closes it; stops at the first error (EPIPE when the reader went
/// away) or at `deadline`. Returns bytes written and the error, if any.
fn write_all_bounded(fd: OwnedFd, data: &[u8], deadline: Instant) -> (usize, Option<String>) {
    let raw = fd.as_raw_fd();
    // Non-blocking, so that a write never waits past the deadline for pipe space.
    // SAFETY: fcntl on an fd we own, with valid commands and flags.
    unsafe {
        let fl = libc::fcntl(raw, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
    let mut f = File::from(fd);
    let mut off = 0;
    while off < data.len() {
        match poll_fd(raw, libc::POLLOUT, deadline) {
            Ok(true) => {}
            Ok(false) => {
                return (
                    off,
                    Some(format!(
                        "state pipe not writable by the deadline after {off} of {} bytes: the                          backend stopped reading without closing",
                        data.len()
                    )),
                )
            }
            Err(e) => return (off, Some(format!("poll: {e}"))),
        }
        let end = data.len().min(off + 64 * 1024);
        match f.write(&data[off..end]) {
            Ok(n) => off += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return (off, Some(e.to_string())),
        }
    }
    (off, None)
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
