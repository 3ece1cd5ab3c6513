//! 1-byte request/response latency over one connection: one side sends a byte, the other
//! echoes it, the sender times the round trip.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use super::stats::Percentiles;
use super::{Dir, Rig};
use crate::harness::{echo_guest, echo_stream};
use crate::host::{accept_timeout, host_connect, host_listen, HOST_TIMEOUT};
use crate::packet::HOST_CID;
use crate::SockType;

/// Round trips before timing starts.
const WARMUP: usize = 500;

/// One round trip: write one byte, read it back; returns microseconds.
fn ping(mut s: impl Read + Write, b: u8) -> Result<f64> {
    let t = Instant::now();
    s.write_all(&[b]).context("sending the request byte")?;
    let mut back = [0u8; 1];
    s.read_exact(&mut back).context("reading the echo")?;
    let us = t.elapsed().as_secs_f64() * 1e6;
    if back[0] != b {
        bail!("echo returned {:#04x}, sent {b:#04x}", back[0]);
    }
    Ok(us)
}

fn pings(mut s: impl Read + Write, n: usize) -> Result<Vec<f64>> {
    let mut us = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let t = ping(&mut s, (i % 251) as u8).with_context(|| format!("round trip {i}"))?;
        if i >= WARMUP {
            us.push(t);
        }
    }
    Ok(us)
}

/// `n` timed round trips initiated from the `dir` source side: host->guest means the host
/// sends and the guest echoes.
pub fn round_trips(rig: &mut Rig, dir: Dir, n: usize) -> Result<Percentiles> {
    let port = rig.port();
    let vm = &rig.vm;
    let us = match dir {
        Dir::HostToGuest => {
            let l = vm.guest.listen(port, SockType::Stream)?;
            let (host, _) = host_connect(&vm.spec.uds_path, port)?;
            let gs = l.accept(HOST_TIMEOUT).context("guest accept")?;
            thread::scope(|sc| {
                let echo = sc.spawn(|| echo_guest(&gs));
                let us = pings(&host, n);
                // End of stream lets the echoer finish.
                let _ = host.shutdown(Shutdown::Write);
                let echoed = echo
                    .join()
                    .map_err(|_| anyhow!("guest echo thread panicked"))?;
                let us = us?;
                echoed.context("guest echo")?;
                Ok::<_, anyhow::Error>(us)
            })?
        }
        Dir::GuestToHost => {
            let l = host_listen(&vm.spec.uds_path, port)?;
            let gs = vm
                .guest
                .connect(HOST_CID, port, SockType::Stream)
                .map_err(|e| anyhow!("guest connect to host port {port}: {e}"))?;
            let host = accept_timeout(&l, HOST_TIMEOUT)?;
            thread::scope(|sc| {
                let echo = sc.spawn(move || echo_stream(host));
                let us = pings(&gs, n);
                // A full close: vhost-device-vsock ignores a SHUTDOWN with only SEND set.
                let _ = gs.close();
                let echoed = echo
                    .join()
                    .map_err(|_| anyhow!("host echo thread panicked"))?;
                let us = us?;
                echoed.context("host echo")?;
                Ok::<_, anyhow::Error>(us)
            })?
        }
    };
    rig.check()?;
    Percentiles::of(us).context("no latency samples")
}
