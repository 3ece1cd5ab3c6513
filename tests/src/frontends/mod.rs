//! Frontend profiles: the simulated VMM replaying, message for message, what one real VMM sends
//! to a vhost-user vsock backend, read from that VMM's source. [`Profile`] holds what differs
//! between VMMs as data; [`ProfileVmm`] runs it (negotiation, config reads, activation, sleep,
//! snapshot and restore through `DEVICE_STATE`, dirty logging) against a backend socket.
//!
//! Sources and the versions followed (each profile constructor names its files):
//! - QEMU `hw/virtio/vhost-user-vsock.c`, `vhost-vsock-common.c`, `vhost.c`, `vhost-user.c`:
//!   tag `v7.2.0`, and master at `019fbfa4bcd2d3a835c241295e22ab2b5b56129b` (vhost-user.c) /
//!   `06b40d250ecfa1633209c2e431a7a38acfd03a98` (vhost-user-vsock.c, vhost-vsock-common.c).
//!   QEMU's `vhost-user-base.c` (the generic `vhost-user-device`) is not user-creatable
//!   (`user_creatable = false` in `vhost-user-device.c`), so it gets no profile.
//! - crosvm `devices/src/virtio/vhost_user_frontend/mod.rs` at
//!   `10297b9acde0463bfcad4c5c93e342866975058e`, `devices/src/virtio/virtio_device.rs`
//!   (`base_features`), `Queue::MAX_SIZE` (32768).
//! - Cloud Hypervisor `virtio-devices/src/vhost_user/{generic_vhost_user.rs, vu_common_ctrl.rs,
//!   mod.rs}` at tags `v52.0` (`1314ac883c641f1045bbb06dec0de045a3894baa`) and `v53.0`
//!   (`9ed824d6d08df3e96f7d5f50795d9449ac99f431`); both drive the backend through the vhost
//!   crate's `Frontend`, which is what [`ProfileVmm`] uses too.

mod dirty_log;
pub mod tap;
mod vmm;
mod xfer;

pub use self::dirty_log::CloudHypervisorLog;
pub use self::vmm::{ProfileVm, ProfileVmm};

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::packet::VIRTIO_VSOCK_F_SEQPACKET;
use crate::sim::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// `VIRTIO_F_NOTIFY_ON_EMPTY`.
const F_NOTIFY_ON_EMPTY: u64 = 24;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
const F_INDIRECT_DESC: u64 = 28;
/// `VHOST_F_LOG_ALL`.
pub const F_LOG_ALL: u64 = 26;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const F_PROTOCOL_FEATURES: u64 = 30;
/// `VIRTIO_F_IN_ORDER`.
const F_IN_ORDER: u64 = 35;
/// `VIRTIO_F_ORDER_PLATFORM`.
const F_ORDER_PLATFORM: u64 = 36;
/// `VIRTIO_F_NOTIFICATION_DATA`.
const F_NOTIFICATION_DATA: u64 = 38;
/// `VIRTIO_F_RING_RESET`.
const F_RING_RESET: u64 = 40;

/// crosvm's `VIRTIO_DEVICE_TYPE_SPECIFIC_FEATURES_MASK` (bits 0-23 and 50-63).
const CROSVM_DEVICE_SPECIFIC: u64 = 0xfffc_0000_00ff_ffff;

const fn bit(b: u64) -> u64 {
    1 << b
}

/// The VMMs with a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    Qemu7_2,
    QemuMaster,
    Crosvm,
    CloudHypervisor52,
    CloudHypervisor53,
}

impl Vmm {
    pub const ALL: [Vmm; 5] = [
        Vmm::Qemu7_2,
        Vmm::QemuMaster,
        Vmm::Crosvm,
        Vmm::CloudHypervisor52,
        Vmm::CloudHypervisor53,
    ];

    pub fn profile(self) -> Profile {
        match self {
            Vmm::Qemu7_2 => Profile::qemu_7_2(),
            Vmm::QemuMaster => Profile::qemu_master(),
            Vmm::Crosvm => Profile::crosvm(),
            Vmm::CloudHypervisor52 => Profile::cloud_hypervisor(Vmm::CloudHypervisor52),
            Vmm::CloudHypervisor53 => Profile::cloud_hypervisor(Vmm::CloudHypervisor53),
        }
    }

    pub fn is_qemu(self) -> bool {
        matches!(self, Vmm::Qemu7_2 | Vmm::QemuMaster)
    }

    pub fn is_cloud_hypervisor(self) -> bool {
        matches!(self, Vmm::CloudHypervisor52 | Vmm::CloudHypervisor53)
    }
}

/// Which requests carry `NEED_REPLY` (only when `REPLY_ACK` was negotiated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeedReply {
    /// Never (crosvm negotiates REPLY_ACK only for backend-to-frontend requests).
    Never,
    /// `SET_MEM_TABLE`, and `SET_FEATURES` / `SET_VRING_ADDR` while logging (QEMU 7.2).
    MemTable,
    /// As `MemTable`, plus `SET_VRING_ENABLE` (QEMU since commit d7dc0682f5cb, 8.2).
    MemTableAndEnable,
    /// Every request after `SET_PROTOCOL_FEATURES` (Cloud Hypervisor:
    /// `set_hdr_flags(NEED_REPLY)` in `negotiate_features_vhost_user`).
    Every,
}

/// How the VMM reads the device config space for the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigRead {
    /// One 8-byte `GET_CONFIG` at device creation, cached (QEMU's `vuv_device_realize`).
    CachedAtRealize,
    /// Every guest access passes through: Linux reads the 64-bit `guest_cid` as two 32-bit
    /// accesses (`vp_get`), so two 4-byte `GET_CONFIG`s with these flags.
    PassThrough { writable_flag: bool },
}

/// How a device state crosses to the backend on `SET_DEVICE_STATE_FD`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateChannel {
    /// The VMM never saves the backend's state (QEMU marks vhost-user-vsock unmigratable).
    Unsupported,
    /// A pipe (crosvm's `new_pipe_pair`).
    Pipe,
    /// A unix socket pair (Cloud Hypervisor's `save_backend_state`).
    SocketPair,
}

/// What one VMM does, as data.
#[derive(Clone, Debug)]
pub struct Profile {
    pub vmm: Vmm,
    pub name: &'static str,
    /// Source files and the version followed.
    pub source: &'static str,
    /// The command line that attaches the daemon's socket (`SOCKET` stands for the path).
    pub command_line: &'static str,
    /// Vrings handed to the backend: 2 (rx, tx: the VMM keeps the event queue) or 3.
    pub backend_queues: usize,
    /// Entries per ring as a Linux guest sets them up (it takes the device's maximum).
    pub ring_size: u16,
    /// Virtio feature bits the VMM lets the guest see (ANDed with the backend's offer).
    pub guest_visible: u64,
    /// Protocol features the VMM acks (ANDed with the backend's offer).
    pub protocol: VhostUserProtocolFeatures,
    pub need_reply: NeedReply,
    pub config_read: ConfigRead,
    pub state: StateChannel,
    /// Migrates with `LOG_SHMFD` + `LOG_ALL` dirty logging.
    pub dirty_log: bool,
}

/// What a Linux guest acks of what it is offered: the transport and vsock features it knows.
pub const LINUX_GUEST_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(F_INDIRECT_DESC)
    | bit(F_RING_RESET)
    | bit(VIRTIO_VSOCK_F_SEQPACKET);

impl Profile {
    /// QEMU 7.2's `vhost-user-vsock-pci`: QEMU keeps the event queue (`nvqs = 2`), rings of
    /// `VHOST_VSOCK_QUEUE_SIZE` 128, SEQPACKET passed through when the backend offers it
    /// (`seqpacket=auto` in `vhost-vsock-common.c`), every protocol feature QEMU knows (7.2
    /// predates `DEVICE_STATE`), `NEED_REPLY` on `SET_MEM_TABLE` only, `SET_VRING_ENABLE`
    /// without waiting. The device is `unmigratable`.
    pub fn qemu_7_2() -> Profile {
        Profile {
            vmm: Vmm::Qemu7_2,
            name: "QEMU 7.2 vhost-user-vsock-pci",
            source: "qemu v7.2.0: hw/virtio/vhost-user-vsock.c, vhost-vsock-common.c, vhost.c, \
                     vhost-user.c",
            command_line: "-chardev socket,id=vsock0,path=SOCKET \
                           -device vhost-user-vsock-pci,chardev=vsock0",
            backend_queues: 2,
            ring_size: 128,
            guest_visible: bit(VIRTIO_F_VERSION_1)
                | bit(F_INDIRECT_DESC)
                | bit(VIRTIO_RING_F_EVENT_IDX)
                | bit(F_NOTIFY_ON_EMPTY)
                | bit(VIRTIO_VSOCK_F_SEQPACKET),
            protocol: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG,
            need_reply: NeedReply::MemTable,
            config_read: ConfigRead::CachedAtRealize,
            state: StateChannel::Unsupported,
            dirty_log: false,
        }
    }

    /// QEMU master's `vhost-user-vsock-pci`: as 7.2, plus `VIRTIO_F_IN_ORDER`,
    /// `NOTIFICATION_DATA` and `RING_RESET` in the masks, `DEVICE_STATE` acked (QEMU acks every
    /// protocol feature it knows), and `SET_VRING_ENABLE` sent with `NEED_REPLY`
    /// (`vhost_user_set_vring_enable` passes `wait_for_reply=true`). Still `unmigratable`.
    pub fn qemu_master() -> Profile {
        Profile {
            vmm: Vmm::QemuMaster,
            name: "QEMU master vhost-user-vsock-pci",
            source: "qemu 019fbfa4bcd2 hw/virtio/vhost-user.c; 06b40d250eca \
                     hw/virtio/vhost-user-vsock.c, vhost-vsock-common.c",
            command_line: "-chardev socket,id=vsock0,path=SOCKET \
                           -device vhost-user-vsock-pci,chardev=vsock0",
            guest_visible: bit(VIRTIO_F_VERSION_1)
                | bit(F_INDIRECT_DESC)
                | bit(VIRTIO_RING_F_EVENT_IDX)
                | bit(F_NOTIFY_ON_EMPTY)
                | bit(F_IN_ORDER)
                | bit(F_NOTIFICATION_DATA)
                | bit(F_RING_RESET)
                | bit(VIRTIO_VSOCK_F_SEQPACKET),
            protocol: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::DEVICE_STATE,
            need_reply: NeedReply::MemTableAndEnable,
            ..Profile::qemu_7_2()
        }
    }

    /// crosvm's `VhostUserFrontend` (`--vhost-user vsock,socket=...`): all three queues to
    /// the backend at `Queue::MAX_SIZE` 32768 entries (the guest takes the maximum), features
    /// masked to the device-specific bits (0-23, 50-63) plus `base_features` (VERSION_1, EVENT_IDX), protocol
    /// features CONFIG|MQ|BACKEND_REQ|DEVICE_STATE|SHMEM_MAP|REPLY_ACK, never `NEED_REPLY`,
    /// `GET_CONFIG` with the `WRITABLE` flag on every guest read, guest memory a sealed memfd,
    /// snapshot and restore through `DEVICE_STATE` over a pipe.
    pub fn crosvm() -> Profile {
        Profile {
            vmm: Vmm::Crosvm,
            name: "crosvm",
            source: "crosvm 10297b9acde0 devices/src/virtio/vhost_user_frontend/mod.rs",
            command_line: "crosvm run --vhost-user vsock,socket=SOCKET",
            backend_queues: 3,
            ring_size: 32768,
            guest_visible: CROSVM_DEVICE_SPECIFIC
                | bit(VIRTIO_F_VERSION_1)
                | bit(VIRTIO_RING_F_EVENT_IDX),
            protocol: VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::BACKEND_REQ
                | VhostUserProtocolFeatures::DEVICE_STATE
                | VhostUserProtocolFeatures::SHMEM
                | VhostUserProtocolFeatures::REPLY_ACK,
            need_reply: NeedReply::Never,
            config_read: ConfigRead::PassThrough {
                writable_flag: true,
            },
            state: StateChannel::Pipe,
            dirty_log: false,
        }
    }

    /// Cloud Hypervisor's `--generic-vhost-user`: the rings the command line lists (three of
    /// 256 in the README), `DEFAULT_VIRTIO_FEATURES` only (no device-specific bit: the guest
    /// never sees SEQPACKET), `NEED_REPLY` on every request, every guest config access passed
    /// through (and a failed one is a panic), `DEVICE_STATE` over a socket pair for snapshot
    /// and migration, `LOG_SHMFD` + `LOG_ALL` dirty logging with a sealed memfd of
    /// `last_addr / 32 KiB + 1` bytes and `SET_VRING_ADDR` with `VHOST_VRING_F_LOG`.
    /// v52 and v53 send the same messages; only the command line differs (`virtio_id=` in v52,
    /// `device_type=` from v53, which keeps `virtio_id` as a deprecated alias).
    pub fn cloud_hypervisor(vmm: Vmm) -> Profile {
        let (name, source, command_line) = match vmm {
            Vmm::CloudHypervisor52 => (
                "Cloud Hypervisor v52",
                "cloud-hypervisor v52.0 (1314ac883c64) virtio-devices/src/vhost_user/\
                 {generic_vhost_user.rs, vu_common_ctrl.rs, mod.rs}",
                "--generic-vhost-user \
                 \"socket=SOCKET,virtio_id=vsock,queue_sizes=[256,256,256]\"",
            ),
            _ => (
                "Cloud Hypervisor v53",
                "cloud-hypervisor v53.0 (9ed824d6d08d) virtio-devices/src/vhost_user/\
                 {generic_vhost_user.rs, vu_common_ctrl.rs, mod.rs}",
                "--generic-vhost-user \
                 \"socket=SOCKET,device_type=vsock,queue_sizes=[256,256,256]\"",
            ),
        };
        Profile {
            vmm,
            name,
            source,
            command_line,
            backend_queues: 3,
            ring_size: 256,
            guest_visible: bit(F_INDIRECT_DESC)
                | bit(VIRTIO_RING_F_EVENT_IDX)
                | bit(VIRTIO_F_VERSION_1)
                | bit(F_IN_ORDER)
                | bit(F_ORDER_PLATFORM)
                | bit(F_NOTIFICATION_DATA),
            protocol: VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::DEVICE_STATE
                | VhostUserProtocolFeatures::BACKEND_REQ,
            need_reply: NeedReply::Every,
            config_read: ConfigRead::PassThrough {
                writable_flag: false,
            },
            state: StateChannel::SocketPair,
            dirty_log: true,
        }
    }

    /// Whether a guest under this VMM gets SEQPACKET from a backend that offers it.
    pub fn passes_seqpacket(&self) -> bool {
        self.guest_visible & bit(VIRTIO_VSOCK_F_SEQPACKET) != 0
    }

    /// What the guest acks of `offered` (the backend's features).
    pub fn guest_features(&self, offered: u64) -> u64 {
        offered & self.guest_visible & LINUX_GUEST_FEATURES
    }
}
