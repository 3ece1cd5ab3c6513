//! [`ProfileVmm`]: a vhost-user frontend that sends a backend exactly what one VMM sends, in
//! that VMM's order, with its flags: device creation, the guest's feature ack and config reads,
//! activation (DRIVER_OK), suspend, `DEVICE_STATE` save and restore, dirty logging, exit.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::dirty_log::CloudHypervisorLog;
use super::xfer::{channel, read_to_eof, write_and_close};
use super::{ConfigRead, NeedReply, Profile, StateChannel, Vmm, F_LOG_ALL, F_PROTOCOL_FEATURES};
use crate::driver::{DriverConfig, Guest, GuestParts, QueueParts};
use crate::mem::GuestMem;
use crate::packet::VIRTIO_VSOCK_F_SEQPACKET;
use crate::ring::RingAddrs;
use crate::sim::{EVENT_QUEUE, RX_QUEUE, TX_QUEUE, VIRTIO_RING_F_EVENT_IDX};

/// Bound on every vhost-user reply and on connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The request kinds whose `NEED_REPLY` flag differs between VMMs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Req {
    MemTable,
    Enable,
    /// `SET_FEATURES` or `SET_VRING_ADDR` while dirty logging is on.
    WhileLogging,
    Other,
}

/// One vring: its memory, the driver's kick, the interrupt, and QEMU's masked notifier.
struct Ring {
    addrs: RingAddrs,
    kick: EventFd,
    call: EventFd,
    /// The eventfd QEMU gives a vring before the guest's interrupt is wired up
    /// (`vhost_virtqueue_init`); nobody listens on it.
    masked_call: EventFd,
}

impl Ring {
    fn alloc(mem: &mut GuestMem, size: u16) -> Result<Ring> {
        Ok(Ring {
            addrs: RingAddrs::alloc(mem, size)?,
            kick: EventFd::new(EFD_NONBLOCK).context("kick eventfd")?,
            call: EventFd::new(EFD_NONBLOCK).context("call eventfd")?,
            masked_call: EventFd::new(EFD_NONBLOCK).context("masked call eventfd")?,
        })
    }

    fn dup(&self) -> Result<Ring> {
        Ok(Ring {
            addrs: self.addrs,
            kick: self.kick.try_clone().context("dup kick eventfd")?,
            call: self.call.try_clone().context("dup call eventfd")?,
            masked_call: self.masked_call.try_clone().context("dup eventfd")?,
        })
    }
}

/// A VMM driving one backend the way [`Profile`] says.
pub struct ProfileVmm {
    pub profile: Profile,
    socket: PathBuf,
    fe: Option<Frontend>,
    mem: GuestMem,
    rings: Vec<Ring>,
    offered: u64,
    acked_protocol: VhostUserProtocolFeatures,
    guest_features: u64,
    cid: u64,
    logging: bool,
    log: Option<CloudHypervisorLog>,
}

fn vu<T>(r: vhost::Result<T>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow!("vhost-user {what}: {e}"))
}

fn connect(socket: &Path) -> Result<UnixStream> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let s = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) {
                    return Err(e).with_context(|| format!("connecting to {}", socket.display()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", socket.display())),
        }
    };
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    Ok(s)
}

/// Guest memory for a profile: room for rings of its size and a Linux-like driver's buffers.
fn mem_size(profile: &Profile) -> usize {
    if profile.ring_size > 1024 {
        256 << 20
    } else {
        64 << 20
    }
}

impl ProfileVmm {
    /// Creates the device as the VMM does at startup and lets the guest probe it (feature ack,
    /// config reads). The rings are allocated but not yet given to the backend.
    pub fn connect(profile: Profile, socket: &Path) -> Result<ProfileVmm> {
        let mut mem = GuestMem::new(mem_size(&profile))?;
        let rings = (0..3)
            .map(|_| Ring::alloc(&mut mem, profile.ring_size))
            .collect::<Result<Vec<_>>>()?;
        let mut vmm = ProfileVmm::bare(profile, socket, mem, rings)?;
        vmm.create_device()?;
        vmm.probe()?;
        Ok(vmm)
    }

    fn bare(profile: Profile, socket: &Path, mem: GuestMem, rings: Vec<Ring>) -> Result<Self> {
        let fe = Frontend::from_stream(connect(socket)?, profile.backend_queues as u64);
        Ok(ProfileVmm {
            profile,
            socket: socket.to_path_buf(),
            fe: Some(fe),
            mem,
            rings,
            offered: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            guest_features: 0,
            cid: 0,
            logging: false,
            log: None,
        })
    }

    fn fe(&mut self) -> Result<&mut Frontend> {
        self.fe.as_mut().context("the VMM is disconnected")
    }

    /// Sets the header flags this VMM puts on `req`.
    fn flags_for(&mut self, req: Req) -> Result<()> {
        let reply_ack = self
            .acked_protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK);
        let need = reply_ack
            && match self.profile.need_reply {
                NeedReply::Never => false,
                NeedReply::Every => true,
                NeedReply::MemTable => matches!(req, Req::MemTable | Req::WhileLogging),
                NeedReply::MemTableAndEnable => {
                    matches!(req, Req::MemTable | Req::Enable | Req::WhileLogging)
                }
            };
        let flags = if need {
            VhostUserHeaderFlag::NEED_REPLY
        } else {
            VhostUserHeaderFlag::empty()
        };
        self.fe()?.set_hdr_flags(flags);
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        self.flags_for(Req::Other)?;
        let f = vu(self.fe()?.get_features(), "GET_FEATURES")?;
        self.offered = f;
        Ok(f)
    }

    fn negotiate_protocol(&mut self, get_first: bool) -> Result<()> {
        let acked = if get_first {
            self.flags_for(Req::Other)?;
            let offered = vu(self.fe()?.get_protocol_features(), "GET_PROTOCOL_FEATURES")?;
            offered & self.profile.protocol
        } else {
            self.acked_protocol
        };
        self.flags_for(Req::Other)?;
        vu(
            self.fe()?.set_protocol_features(acked),
            "SET_PROTOCOL_FEATURES",
        )?;
        self.acked_protocol = acked;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<()> {
        if self.acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
            self.flags_for(Req::Other)?;
            let n = vu(self.fe()?.get_queue_num(), "GET_QUEUE_NUM")?;
            ensure!(
                n as usize >= self.profile.backend_queues,
                "backend has {n} queues, the VMM needs {}",
                self.profile.backend_queues
            );
        }
        Ok(())
    }

    /// The messages of device creation.
    fn create_device(&mut self) -> Result<()> {
        match self.profile.vmm {
            // vhost_dev_init: vhost_user_backend_init (GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
            // GET_QUEUE_NUM), SET_OWNER, GET_FEATURES, then vhost_virtqueue_init gives each
            // vring the masked notifier; vuv_device_realize then caches the config.
            Vmm::Qemu7_2 | Vmm::QemuMaster => {
                self.get_features()?;
                self.negotiate_protocol(true)?;
                self.get_queue_num()?;
                self.flags_for(Req::Other)?;
                vu(self.fe()?.set_owner(), "SET_OWNER")?;
                self.get_features()?;
                for idx in 0..self.profile.backend_queues {
                    self.flags_for(Req::Other)?;
                    let fe = self.fe.as_ref().context("disconnected")?;
                    vu(
                        fe.set_vring_call(idx, &self.rings[idx].masked_call),
                        "SET_VRING_CALL",
                    )?;
                }
                self.cid = self.read_config_u64()?;
            }
            // VhostUserFrontend::new / negotiate_features_vhost_user: SET_OWNER, GET_FEATURES,
            // GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM.
            Vmm::Crosvm | Vmm::CloudHypervisor52 | Vmm::CloudHypervisor53 => {
                self.flags_for(Req::Other)?;
                vu(self.fe()?.set_owner(), "SET_OWNER")?;
                self.get_features()?;
                self.negotiate_protocol(true)?;
                self.get_queue_num()?;
            }
        }
        Ok(())
    }

    /// The guest driver probes: acks features (crosvm sends `SET_FEATURES` at once; QEMU and
    /// Cloud Hypervisor wait for activation) and reads `guest_cid`.
    fn probe(&mut self) -> Result<()> {
        self.guest_features = self.profile.guest_features(self.offered);
        if self.profile.vmm == Vmm::Crosvm {
            self.set_features(false)?;
        }
        if self.profile.config_read != ConfigRead::CachedAtRealize {
            self.cid = self.read_config_u64()?;
        }
        Ok(())
    }

    /// `guest_cid` as this VMM reads it for the guest.
    fn read_config_u64(&mut self) -> Result<u64> {
        let cfg = self.profile.config_read;
        self.flags_for(Req::Other)?;
        read_cid(self.fe()?, cfg)
    }

    /// `SET_FEATURES` with the guest's features and `VHOST_USER_F_PROTOCOL_FEATURES` (and
    /// `VHOST_F_LOG_ALL` while logging).
    fn set_features(&mut self, log_all: bool) -> Result<()> {
        let mut f = self.guest_features | (1 << F_PROTOCOL_FEATURES);
        if log_all {
            f |= 1 << F_LOG_ALL;
        }
        self.flags_for(if log_all {
            Req::WhileLogging
        } else {
            Req::Other
        })?;
        vu(self.fe()?.set_features(f), "SET_FEATURES")
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
        self.flags_for(Req::MemTable)?;
        vu(self.fe()?.set_mem_table(&regions), "SET_MEM_TABLE").map(|_| ())
    }

    fn host_addr(&self, gpa: GuestAddress) -> Result<u64> {
        let p = self
            .mem
            .memory()
            .get_host_address(gpa)
            .map_err(|e| anyhow!("guest address {gpa:?}: {e}"))?;
        Ok(p as u64)
    }

    fn set_vring_addr(&mut self, idx: usize, log: bool) -> Result<()> {
        let a = self.rings[idx].addrs;
        let cfg = VringConfigData {
            queue_max_size: a.size,
            queue_size: a.size,
            flags: if log {
                VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
            } else {
                0
            },
            desc_table_addr: self.host_addr(a.desc)?,
            used_ring_addr: self.host_addr(a.used)?,
            avail_ring_addr: self.host_addr(a.avail)?,
            // Cloud Hypervisor passes the used ring's guest address (`used_guest_addr`).
            log_addr: log.then_some(a.used.0),
        };
        self.flags_for(if self.logging {
            Req::WhileLogging
        } else {
            Req::Other
        })?;
        vu(self.fe()?.set_vring_addr(idx, &cfg), "SET_VRING_ADDR")
    }

    fn simple(&mut self, idx: usize, what: &'static str, base: u16) -> Result<()> {
        self.flags_for(Req::Other)?;
        let fe = self.fe.as_ref().context("the VMM is disconnected")?;
        let ring = &self.rings[idx];
        let r = match what {
            "SET_VRING_NUM" => fe.set_vring_num(idx, ring.addrs.size),
            "SET_VRING_BASE" => fe.set_vring_base(idx, base),
            "SET_VRING_CALL" => fe.set_vring_call(idx, &ring.call),
            "SET_VRING_KICK" => fe.set_vring_kick(idx, &ring.kick),
            _ => bail!("unknown request {what}"),
        };
        vu(r, what)
    }

    fn enable(&mut self, idx: usize, on: bool) -> Result<()> {
        self.flags_for(Req::Enable)?;
        vu(self.fe()?.set_vring_enable(idx, on), "SET_VRING_ENABLE")
    }

    /// Activation when the guest sets DRIVER_OK (or a restored device wakes), rings starting
    /// at `bases` (zeros for a fresh guest).
    pub fn activate(&mut self, bases: &[u16]) -> Result<()> {
        let n = self.profile.backend_queues;
        ensure!(bases.len() == n, "{} bases for {n} rings", bases.len());
        match self.profile.vmm {
            // vhost_dev_start: SET_FEATURES, SET_MEM_TABLE, per ring (vhost_virtqueue_start)
            // NUM, BASE, ADDR, KICK; SET_VRING_ENABLE on each; then vhost_vsock_common_start
            // unmasks each ring: SET_VRING_CALL with the guest's interrupt.
            Vmm::Qemu7_2 | Vmm::QemuMaster => {
                self.set_features(false)?;
                self.set_mem_table()?;
                for (idx, base) in bases.iter().enumerate() {
                    self.simple(idx, "SET_VRING_NUM", 0)?;
                    self.simple(idx, "SET_VRING_BASE", *base)?;
                    self.set_vring_addr(idx, false)?;
                    self.simple(idx, "SET_VRING_KICK", 0)?;
                }
                for idx in 0..n {
                    self.enable(idx, true)?;
                }
                for idx in 0..n {
                    self.simple(idx, "SET_VRING_CALL", 0)?;
                }
            }
            // activate: SET_MEM_TABLE, then activate_vring per queue: NUM, ADDR, BASE, CALL,
            // KICK, ENABLE (SET_FEATURES went out when the guest acked features).
            Vmm::Crosvm => {
                self.set_mem_table()?;
                for (idx, base) in bases.iter().enumerate() {
                    self.simple(idx, "SET_VRING_NUM", 0)?;
                    self.set_vring_addr(idx, false)?;
                    self.simple(idx, "SET_VRING_BASE", *base)?;
                    self.simple(idx, "SET_VRING_CALL", 0)?;
                    self.simple(idx, "SET_VRING_KICK", 0)?;
                    self.enable(idx, true)?;
                }
            }
            // setup_vhost_user: SET_FEATURES, SET_MEM_TABLE, every SET_VRING_NUM first, then per
            // ring ADDR, BASE, CALL, KICK, then SET_VRING_ENABLE on each.
            Vmm::CloudHypervisor52 | Vmm::CloudHypervisor53 => {
                self.set_features(false)?;
                self.set_mem_table()?;
                for idx in 0..n {
                    self.simple(idx, "SET_VRING_NUM", 0)?;
                }
                for (idx, base) in bases.iter().enumerate() {
                    self.set_vring_addr(idx, false)?;
                    self.simple(idx, "SET_VRING_BASE", *base)?;
                    self.simple(idx, "SET_VRING_CALL", 0)?;
                    self.simple(idx, "SET_VRING_KICK", 0)?;
                }
                for idx in 0..n {
                    self.enable(idx, true)?;
                }
            }
        }
        Ok(())
    }

    fn get_vring_base(&mut self, idx: usize) -> Result<u16> {
        self.flags_for(Req::Other)?;
        let b = vu(self.fe()?.get_vring_base(idx), "GET_VRING_BASE")?;
        u16::try_from(b).map_err(|_| anyhow!("GET_VRING_BASE({idx}) = {b}, beyond u16"))
    }

    /// Stops the rings as the VMM does before a snapshot or on exit; returns the bases.
    pub fn suspend(&mut self) -> Result<Vec<u16>> {
        let n = self.profile.backend_queues;
        let mut bases = Vec::with_capacity(n);
        match self.profile.vmm {
            // crosvm virtio_sleep -> deactivate_vring: ENABLE(false), GET_VRING_BASE per ring.
            Vmm::Crosvm => {
                for idx in 0..n {
                    self.enable(idx, false)?;
                    bases.push(self.get_vring_base(idx)?);
                }
            }
            // QEMU vhost_dev_stop, Cloud Hypervisor pause + state(): every ENABLE(false), then
            // every GET_VRING_BASE.
            _ => {
                for idx in 0..n {
                    self.enable(idx, false)?;
                }
                for idx in 0..n {
                    bases.push(self.get_vring_base(idx)?);
                }
            }
        }
        Ok(bases)
    }

    /// `SET_DEVICE_STATE_FD(SAVE)` over this VMM's channel, read to EOF, `CHECK_DEVICE_STATE`.
    pub fn save(&mut self) -> Result<Vec<u8>> {
        let kind = self.profile.state;
        let ch = channel(kind, true)?;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        self.flags_for(Req::Other)?;
        let theirs = self.fe()?.set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            ch.theirs,
        );
        let own = vu(theirs, "SET_DEVICE_STATE_FD(SAVE)")?;
        let src = match own {
            Some(f) => OwnedFd::from(f),
            None => ch.ours,
        };
        let blob = read_to_eof(src, deadline)?;
        self.flags_for(Req::Other)?;
        vu(self.fe()?.check_device_state(), "CHECK_DEVICE_STATE")?;
        Ok(blob)
    }

    fn load(&mut self, blob: &[u8]) -> Result<()> {
        let ch = channel(self.profile.state, false)?;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        self.flags_for(Req::Other)?;
        let own = vu(
            self.fe()?.set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                ch.theirs,
            ),
            "SET_DEVICE_STATE_FD(LOAD)",
        )?;
        let sink = match own {
            Some(f) => OwnedFd::from(f),
            None => ch.ours,
        };
        write_and_close(sink, blob, deadline)?;
        self.flags_for(Req::Other)?;
        vu(self.fe()?.check_device_state(), "CHECK_DEVICE_STATE")
    }

    /// The destination VMM of a snapshot restore or a migration: a new connection to `socket`
    /// on the same guest memory and rings, through the VMM's restore sequence: the state is
    /// loaded, then the rings start at `bases`. The guest driver keeps running on the memory.
    pub fn restore_into(&self, socket: &Path, blob: &[u8], bases: &[u16]) -> Result<ProfileVmm> {
        ensure!(
            self.profile.state != StateChannel::Unsupported,
            "{} does not save device state",
            self.profile.name
        );
        let rings = self.rings.iter().map(Ring::dup).collect::<Result<_>>()?;
        let mut dst = ProfileVmm::bare(self.profile.clone(), socket, self.mem.share()?, rings)?;
        dst.guest_features = self.guest_features;
        dst.cid = self.cid;
        match self.profile.vmm {
            // A new crosvm: VhostUserFrontend::new, then virtio_restore (SET_FEATURES with the
            // restored guest features, LOAD), then virtio_wake activates with the saved bases.
            Vmm::Crosvm => {
                dst.create_device()?;
                dst.set_features(false)?;
                dst.load(blob)?;
                dst.activate(bases)?;
            }
            // GenericVhostUser::new with a state: set_protocol_features_vhost_user (SET_OWNER,
            // GET_FEATURES, SET_PROTOCOL_FEATURES with the saved ones, no GET), restore_state
            // (LOAD); activation with the saved vring_bases; then resume enables the rings again.
            Vmm::CloudHypervisor52 | Vmm::CloudHypervisor53 => {
                dst.acked_protocol = self.acked_protocol;
                dst.flags_for(Req::Other)?;
                vu(dst.fe()?.set_owner(), "SET_OWNER")?;
                dst.get_features()?;
                dst.negotiate_protocol(false)?;
                dst.load(blob)?;
                dst.activate(bases)?;
                for idx in 0..dst.profile.backend_queues {
                    dst.enable(idx, true)?;
                }
            }
            Vmm::Qemu7_2 | Vmm::QemuMaster => bail!("QEMU marks vhost-user-vsock unmigratable"),
        }
        Ok(dst)
    }

    /// Cloud Hypervisor's `start_dirty_log`: a log (`SET_LOG_BASE`), `SET_FEATURES` with
    /// `LOG_ALL`, and every ring's address again with `VHOST_VRING_F_LOG`.
    pub fn start_dirty_log(&mut self) -> Result<()> {
        ensure!(
            self.profile.dirty_log,
            "{} does no dirty logging",
            self.profile.name
        );
        self.new_log()?;
        self.logging = true;
        self.set_features(true)?;
        for idx in 0..self.profile.backend_queues {
            self.set_vring_addr(idx, true)?;
        }
        Ok(())
    }

    fn new_log(&mut self) -> Result<Option<CloudHypervisorLog>> {
        let last = self.mem.memory().last_addr().0;
        let log = CloudHypervisorLog::create(last)?;
        let region = VhostUserDirtyLogRegion {
            mmap_size: log.len,
            mmap_offset: 0,
            mmap_handle: log.file.as_raw_fd(),
        };
        self.flags_for(Req::Other)?;
        vu(self.fe()?.set_log_base(0, Some(region)), "SET_LOG_BASE")?;
        Ok(self.log.replace(log))
    }

    /// Cloud Hypervisor's `dirty_log`: a new log goes to the backend, the old one is returned.
    pub fn take_dirty_log(&mut self) -> Result<CloudHypervisorLog> {
        ensure!(self.logging, "dirty logging is not on");
        self.new_log()?.context("no previous dirty log to return")
    }

    /// Cloud Hypervisor's `stop_dirty_log`: rings without the log flag, features without
    /// `LOG_ALL`.
    pub fn stop_dirty_log(&mut self) -> Result<()> {
        for idx in 0..self.profile.backend_queues {
            self.set_vring_addr(idx, false)?;
        }
        self.logging = false;
        self.set_features(false)?;
        self.log = None;
        Ok(())
    }

    /// What the driver needs: rings, features, CID, and how to re-read the CID after a
    /// TRANSPORT_RESET (through this VMM's config path).
    pub fn guest_parts(&self) -> Result<GuestParts> {
        let part = |idx: usize| -> Result<QueueParts> {
            let r = &self.rings[idx];
            Ok(QueueParts {
                addrs: r.addrs,
                kick: r.kick.try_clone().context("dup kick eventfd")?,
                call: r.call.try_clone().context("dup call eventfd")?,
            })
        };
        Ok(GuestParts {
            rx: part(RX_QUEUE)?,
            tx: part(TX_QUEUE)?,
            evt: if self.profile.backend_queues > EVENT_QUEUE {
                Some(part(EVENT_QUEUE)?)
            } else {
                None
            },
            event_idx: self.guest_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            seqpacket: self.guest_features & (1 << VIRTIO_VSOCK_F_SEQPACKET) != 0,
            cid: self.cid,
            cid_source: Some(self.cid_source()?),
        })
    }

    /// A closure reading `guest_cid` the way this VMM serves a guest's config read.
    pub fn cid_source(&self) -> Result<crate::driver::CidSource> {
        let cfg = self.profile.config_read;
        if cfg == ConfigRead::CachedAtRealize {
            let cid = self.cid;
            return Ok(Box::new(move || Ok(cid)));
        }
        let mut fe = self.fe.clone().context("the VMM is disconnected")?;
        Ok(Box::new(move || read_cid(&mut fe, cfg)))
    }

    /// The VMM process goes away: QEMU stops the device first (unrealize: ENABLE(false) and
    /// GET_VRING_BASE on each ring), the others just close the socket.
    pub fn quit(&mut self, rings_started: bool) -> Result<()> {
        if self.profile.vmm.is_qemu() && rings_started {
            self.suspend()?;
        }
        self.disconnect();
        Ok(())
    }

    /// Closes the connection at once (as a crash does).
    pub fn disconnect(&mut self) {
        if let Some(fe) = self.fe.take() {
            // SAFETY: the fd belongs to the frontend's socket, alive while `fe` is; shutdown()
            // does not close it, so clones held elsewhere stay memory safe and see EOF.
            unsafe {
                libc::shutdown(fe.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
    }

    pub fn guest_mem_mut(&mut self) -> &mut GuestMem {
        &mut self.mem
    }

    pub fn memory(&self) -> &vm_memory::GuestMemoryMmap {
        self.mem.memory()
    }

    pub fn guest_cid(&self) -> u64 {
        self.cid
    }

    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// The features the guest acked (what `SET_FEATURES` carries besides the vhost bits).
    pub fn guest_features(&self) -> u64 {
        self.guest_features
    }

    pub fn acked_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.acked_protocol
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The frontend, for requests outside the profile (e.g. extra config reads).
    pub fn frontend(&mut self) -> Result<&mut Frontend> {
        self.fe()
    }
}

impl Drop for ProfileVmm {
    fn drop(&mut self) {
        self.disconnect();
    }
}

/// Reads `guest_cid` through `fe` as a VMM with config path `cfg` does.
fn read_cid(fe: &mut Frontend, cfg: ConfigRead) -> Result<u64> {
    let get = |fe: &mut Frontend, off: u32, len: u32, flags| -> Result<Vec<u8>> {
        let (_, data) = vu(
            fe.get_config(off, len, flags, &vec![0u8; len as usize]),
            "GET_CONFIG",
        )?;
        ensure!(
            data.len() == len as usize,
            "GET_CONFIG({off}, {len}) returned {} bytes",
            data.len()
        );
        Ok(data)
    };
    let mut cid = [0u8; 8];
    match cfg {
        ConfigRead::CachedAtRealize => {
            cid.copy_from_slice(&get(fe, 0, 8, VhostUserConfigFlags::empty())?);
        }
        ConfigRead::PassThrough { writable_flag } => {
            let flags = if writable_flag {
                VhostUserConfigFlags::WRITABLE
            } else {
                VhostUserConfigFlags::empty()
            };
            cid[..4].copy_from_slice(&get(fe, 0, 4, flags)?);
            cid[4..].copy_from_slice(&get(fe, 4, 4, flags)?);
        }
    }
    Ok(u64::from_le_bytes(cid))
}

/// A VM under a profile: the VMM and a running guest driver.
pub struct ProfileVm {
    // Field order is drop order: the driver stops before the VMM disconnects.
    pub guest: Guest,
    pub vmm: ProfileVmm,
}

impl ProfileVm {
    /// Starts the VMM, lets the guest probe, activates with fresh rings, starts the driver.
    pub fn boot(profile: Profile, socket: &Path) -> Result<ProfileVm> {
        let mut vmm = ProfileVmm::connect(profile, socket)?;
        let zeros = vec![0u16; vmm.profile.backend_queues];
        vmm.activate(&zeros)?;
        let parts = vmm.guest_parts()?;
        let guest = Guest::start_with(vmm.guest_mem_mut(), parts, DriverConfig::default())?;
        Ok(ProfileVm { guest, vmm })
    }

    /// The VMM exits; the guest goes with it.
    pub fn quit(mut self) -> Result<()> {
        self.guest.stop();
        self.vmm.quit(true)
    }
}
