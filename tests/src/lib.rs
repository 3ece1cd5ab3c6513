//! Integration-test harness for vhost-plug: a simulated VMM with a guest virtio-vsock driver,
//! host-side hybrid-vsock helpers, and daemon management. The same scenarios run against
//! vhost-plug and against the reference daemon vhost-device-vsock.
//!
//! Typical use (see `tests/conformance.rs`):
//!
//! ```text
//! let setup = Setup::new(DaemonKind::Peer, &[3])?;      // temp dir + daemon serving CID 3
//! let vm = setup.boot(0)?;                               // SimVmm + running Guest driver
//! let l = host_listen(&vm.spec.uds_path, 1234)?;         // <uds>_1234
//! let s = vm.guest.connect(2, 1234, SockType::Stream)?;  // guest -> host
//! let mut h = accept_timeout(&l, HOST_TIMEOUT)?;
//! s.send(b"hi")?;                                        // credit-aware, bounded
//! vm.guest.health()?;                                    // no device protocol violations
//! ```
//!
//! Modules: [`daemon`] (spawn/kill, binary lookup), [`sim`] (vhost-user frontend, memfd
//! memory, vrings), [`driver`] (guest driver and socket API), [`ring`] (split virtqueue,
//! driver side), [`host`] (CONNECT handshake, `<uds>_<port>` listeners, SEQPACKET),
//! [`harness`] (fixtures, scenario outcome codes), [`data`] (payload patterns, checksums),
//! [`frontends`] (profiles replaying QEMU, crosvm and Cloud Hypervisor message for message),
//! [`qemu`] (a real Linux guest under QEMU in front of a daemon), [`qemu_pair`] (two guests
//! of one sibling group), [`qemu_console`] (their serial consoles), [`bench`] (the benchmark),
//! [`state`] (saved device states), [`checks`] (echo, fd and RSS checks) and [`vhost_raw`]
//! (hand-built vhost-user requests for hostile-VMM tests).

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bench;
pub mod checks;
pub mod daemon;
pub mod data;
pub mod driver;
pub mod forward;
pub mod forward_route;
pub mod frontends;
pub mod harness;
pub mod host;
pub mod mem;
pub mod packet;
pub mod proxy_header;
pub mod qemu;
pub mod qemu_console;
pub mod qemu_forward;
pub mod qemu_pair;
pub mod ring;
pub mod sim;
pub mod state;
pub mod syscount;
pub mod upgrade;
pub mod vhost_raw;
pub mod vsockhost;

pub use daemon::{Daemon, DaemonKind, VmSpec};
pub use driver::{
    ConnectError, DriverConfig, Guest, GuestListener, GuestSocket, RxLayout, SockType, TxLayout,
};
pub use host::{host_connect, host_connect_with, host_listen, host_seqpacket_connect};
pub use sim::{QueueSet, SimConfig, SimVmm};
