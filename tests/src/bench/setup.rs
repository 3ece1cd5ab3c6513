//! Connection setup rate: sequential connect + accept + close, one connection at a time.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use super::{Dir, Rig};
use crate::host::{accept_timeout, host_connect, host_listen, HOST_TIMEOUT};
use crate::packet::HOST_CID;
use crate::{ConnectError, SockType};

/// How long to let closed connections drain between runs (not timed).
const DRAIN: Duration = Duration::from_secs(5);

/// Connections per second over `n` sequential connections in direction `dir`.
///
/// guest->host: the guest connects to a host listener (`<uds>_<port>`), the host accepts,
/// the guest closes, the host closes. host->guest: the host sends `CONNECT <port>` and reads
/// `OK`, the guest listener accepts, the guest closes, the host closes. Teardown goes on in
/// the background; the run ends when the last connection was accepted and closed.
pub fn rate(rig: &mut Rig, dir: Dir, n: usize) -> Result<f64> {
    let port = rig.port();
    let vm = &rig.vm;
    let secs = match dir {
        Dir::GuestToHost => {
            let l = host_listen(&vm.spec.uds_path, port)?;
            let t0 = Instant::now();
            for i in 0..n {
                let gs = vm
                    .guest
                    .connect(HOST_CID, port, SockType::Stream)
                    .map_err(|e| anyhow!("connection {i}: guest connect: {e}"))?;
                let h = accept_timeout(&l, HOST_TIMEOUT)
                    .with_context(|| format!("connection {i}: host accept"))?;
                gs.close()
                    .with_context(|| format!("connection {i}: guest close"))?;
                drop(h);
            }
            t0.elapsed().as_secs_f64()
        }
        Dir::HostToGuest => {
            let l = vm.guest.listen(port, SockType::Stream)?;
            let t0 = Instant::now();
            for i in 0..n {
                let (h, _) = host_connect(&vm.spec.uds_path, port)
                    .with_context(|| format!("connection {i}: host CONNECT"))?;
                let gs = l
                    .accept(HOST_TIMEOUT)
                    .with_context(|| format!("connection {i}: guest accept"))?;
                gs.close()
                    .with_context(|| format!("connection {i}: guest close"))?;
                drop(h);
            }
            t0.elapsed().as_secs_f64()
        }
    };
    drain(rig);
    rig.check()?;
    Ok(n as f64 / secs.max(1e-9))
}

/// Waits (bounded) until the guest driver has no sockets left.
fn drain(rig: &Rig) {
    let deadline = Instant::now() + DRAIN;
    while rig.vm.guest.socket_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the daemon's policy chain is in force: a guest connect to a host port outside
/// the allowlist must be refused while one inside it succeeds. `rig` must run with
/// `--plugin policy=builtin:port-allowlist,config=allow=2:<allowed>`.
pub fn policy_enforced(rig: &mut Rig, allowed: u32, denied: u32) -> Result<bool> {
    let vm = &rig.vm;
    let la = host_listen(&vm.spec.uds_path, allowed)?;
    let _ld = host_listen(&vm.spec.uds_path, denied)?;
    let ok = vm
        .guest
        .connect(HOST_CID, allowed, SockType::Stream)
        .map_err(|e| anyhow!("connect to the allowed port {allowed}: {e}"))?;
    let h = accept_timeout(&la, HOST_TIMEOUT)?;
    drop(ok);
    drop(h);
    let refused =
        match vm
            .guest
            .connect_timeout(HOST_CID, denied, SockType::Stream, Duration::from_secs(3))
        {
            Err(ConnectError::Refused) => true,
            Ok(_) => false,
            Err(e) => return Err(anyhow!("connect to the denied port {denied}: {e}")),
        };
    rig.check()?;
    Ok(refused)
}
