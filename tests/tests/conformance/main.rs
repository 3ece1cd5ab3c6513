//! Conformance scenarios, each run against vhost-plug (must pass) and against the reference
//! daemon vhost-device-vsock 0.3.0 (must match the documented expected-difference table, so
//! that a change in either daemon's behaviour is noticed).
//!
//! Run with output: `cargo test -p vhost-plug-tests --release --test conformance -- --nocapture`
//! (each test prints one `[conformance]` summary line).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::thread::{self, ScopedJoinHandle};
use std::time::{Duration, Instant};

use vhost_plug_tests::data::{digest, recv_digest, send_pattern, Pattern};
use vhost_plug_tests::harness::{
    echo_guest, echo_stream, ensure, exchange, fail, Code, Outcome, Setup, TestVm,
};
use vhost_plug_tests::host::{
    accept_timeout, host_connect, host_connect_with, host_listen, host_seqpacket_connect,
    wait_readable, SeqpacketListener, HOST_TIMEOUT,
};
use vhost_plug_tests::packet::{HOST_CID, OP_REQUEST, OP_RST};
use vhost_plug_tests::{
    ConnectError, DaemonKind, DriverConfig, QueueSet, RxLayout, SimConfig, SockType, TxLayout,
    VmSpec,
};

/// Bound for things a correct daemon does at once (RST, EOF, delivery of queued bytes).
const PROMPT: Duration = Duration::from_secs(5);

// ----- expected differences -------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Pass,
    /// Fails with this failure code.
    Fails(&'static str),
}

/// How vhost-device-vsock 0.3.0 behaves in each scenario, with the reason from its source.
const PEER_EXPECTED: &[(&str, Expect, &str)] = &[
    ("guest_to_host_echo", Expect::Pass, ""),
    ("host_to_guest_echo", Expect::Pass, ""),
    (
        "connect_ok_port",
        Expect::Fails("ok-port-mismatch"),
        "the OK line carries the guest's port (peer_port), not the host-side port it \
         allocated (the guest sees host ports 0, 1, ...)",
    ),
    (
        "bytes_after_connect",
        Expect::Fails("bytes-after-connect-lost"),
        "read_local_stream_port() parses the CONNECT line through a BufReader that is then \
         dropped: bytes that arrived with the line are discarded",
    ),
    (
        "half_close_host_write",
        Expect::Fails("guest-send-after-host-shutwr-failed"),
        "EOF on the host socket is sent as SHUTDOWN(RCV|SEND), so the guest may no longer send",
    ),
    (
        "half_close_guest_write",
        Expect::Fails("no-eof-after-guest-shutdown"),
        "a guest SHUTDOWN with only one flag is ignored; the host socket is never shut down",
    ),
    (
        "connect_refused",
        Expect::Fails("no-rst"),
        "enq_rst() only logs: a failed connect to <uds>_<port> is never answered",
    ),
    ("sustained_64mib", Expect::Pass, ""),
    ("big_transfer", Expect::Pass, ""),
    ("thousand_connections", Expect::Pass, ""),
    (
        "seqpacket_guest_to_host",
        Expect::Fails("seqpacket-not-negotiated"),
        "VIRTIO_VSOCK_F_SEQPACKET is not offered",
    ),
    (
        "seqpacket_host_to_guest",
        Expect::Fails("seqpacket-not-negotiated"),
        "VIRTIO_VSOCK_F_SEQPACKET is not offered",
    ),
    (
        "spoofed_src_cid",
        Expect::Fails("spoof-src-no-rst"),
        "packets with a foreign src_cid are dropped silently (no RST)",
    ),
    (
        "spoofed_dst_cid",
        Expect::Fails("spoof-dst-no-rst"),
        "packets to a CID outside the group are dropped silently (no RST)",
    ),
    (
        "siblings_same_group",
        Expect::Fails("sibling-large-packets"),
        "packets are forwarded to the sibling as they are: a 64 KiB packet is copied into a \
         4 KiB rx buffer with its header len unchanged",
    ),
    (
        "siblings_cross_group",
        Expect::Fails("cross-group-no-rst"),
        "a connect to a guest of another group is dropped silently, so it times out",
    ),
    ("vmm_disconnect_reconnect", Expect::Pass, ""),
    ("driver_variants", Expect::Pass, ""),
];

fn peer_expected(name: &str) -> Expect {
    PEER_EXPECTED
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, e, _)| *e)
        .unwrap_or_else(|| panic!("scenario {name} is missing from PEER_EXPECTED"))
}

fn run(kind: DaemonKind, name: &str, scenario: fn(DaemonKind) -> Outcome) {
    let t0 = Instant::now();
    let outcome = scenario(kind);
    let secs = t0.elapsed().as_secs_f64();
    let observed = match &outcome {
        Ok(()) => "pass",
        Err(f) => f.code,
    };
    let line = |verdict: &str| {
        eprintln!(
            "[conformance] {:<18} {:<26} {:<40} {:>6.1}s  {verdict}",
            kind.name(),
            name,
            observed,
            secs
        )
    };
    if let Err(f) = &outcome {
        let d = f.detail.lines().next().unwrap_or("");
        eprintln!("              {name}: {}", &d[..d.len().min(400)]);
    }
    match kind {
        DaemonKind::VhostPlug => match outcome {
            Ok(()) => line("ok"),
            Err(f) => {
                line("FAIL");
                panic!("{name} failed against vhost-plug: {f}");
            }
        },
        DaemonKind::Peer => {
            let exp = peer_expected(name);
            let matches = match (&exp, &outcome) {
                (Expect::Pass, Ok(())) => true,
                (Expect::Fails(code), Err(f)) => f.code == *code,
                _ => false,
            };
            if matches {
                line("as expected");
            } else {
                line("DRIFT");
                panic!(
                    "{name} against {}: expected {exp:?}, observed {outcome:?}. If the \
                     difference is intended, update PEER_EXPECTED.",
                    kind.name()
                );
            }
        }
    }
}

// ----- helpers ----------------------------------------------------------------------------

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Runs `body` with a daemon; on failure appends the daemon's stderr; checks it is alive.
fn with_setup(mut setup: Setup, body: impl FnOnce(&mut Setup) -> Outcome) -> Outcome {
    let r = body(&mut setup).and_then(|()| {
        let running = setup.daemon.is_running();
        ensure(running, "daemon-exited", || "the daemon exited".into())
    });
    r.map_err(|mut f| {
        f.detail.push_str("\n--- daemon stderr (tail) ---\n");
        f.detail.push_str(tail(&setup.daemon.stderr(), 6000));
        f
    })
}

fn join<T>(h: ScopedJoinHandle<'_, anyhow::Result<T>>) -> anyhow::Result<T> {
    h.join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked")))
}

/// The driver saw no device misbehaviour. Blank rx buffers are a documented bug of the
/// reference daemon (its rx path pops connection keys of removed connections and still
/// returns the buffer), tolerated for it only.
fn healthy(kind: DaemonKind, guest: &vhost_plug_tests::Guest) -> Outcome {
    match kind {
        DaemonKind::VhostPlug => guest.health().code("driver-health"),
        DaemonKind::Peer => guest.health_tolerating_blank_rx().code("driver-health"),
    }
}

/// Reads from a host stream expecting end of stream (0 or a reset) within `t`.
fn host_expect_eof(s: &mut UnixStream, t: Duration) -> anyhow::Result<()> {
    s.set_read_timeout(Some(t))?;
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => Ok(()),
        Ok(n) => anyhow::bail!("expected end of stream, read {n} bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(e.into()),
    }
}

// ----- scenarios ----------------------------------------------------------------------------

mod addressing;
mod stream;

use addressing::*;
use stream::*;

// ----- tests ------------------------------------------------------------------------------

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod peer {
            $(
                #[test]
                fn $name() {
                    super::run(vhost_plug_tests::DaemonKind::Peer, stringify!($name), super::$name);
                }
            )*
        }
        mod vhost_plug {
            $(
                #[test]
                fn $name() {
                    super::run(vhost_plug_tests::DaemonKind::VhostPlug, stringify!($name), super::$name);
                }
            )*
        }
        /// Every scenario has an entry in the expected-difference table and vice versa.
        #[test]
        fn expected_table_is_complete() {
            let names = [$(stringify!($name)),*];
            for n in names {
                peer_expected(n);
            }
            for (n, _, _) in PEER_EXPECTED {
                assert!(names.contains(n), "PEER_EXPECTED names unknown scenario {n}");
            }
            for (n, e, why) in PEER_EXPECTED {
                eprintln!("[expected] vhost-device-vsock {n:<26} {e:?} {why}");
                if let Expect::Fails(_) = e {
                    assert!(!why.is_empty(), "{n}: document why the peer differs");
                }
            }
        }
    };
}

scenarios!(
    guest_to_host_echo,
    host_to_guest_echo,
    connect_ok_port,
    bytes_after_connect,
    half_close_host_write,
    half_close_guest_write,
    connect_refused,
    sustained_64mib,
    big_transfer,
    thousand_connections,
    seqpacket_guest_to_host,
    seqpacket_host_to_guest,
    spoofed_src_cid,
    spoofed_dst_cid,
    siblings_same_group,
    siblings_cross_group,
    vmm_disconnect_reconnect,
    driver_variants,
);
