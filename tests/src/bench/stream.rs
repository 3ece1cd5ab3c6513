//! Stream throughput over one connection, checksum verified, and the in-process reference
//! limit (a unix socketpair plus one memcpy into a large buffer).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use super::rig::cpu_secs;
use super::threads::{busiest_delta, named_threads, this_thread_cpu, SATURATED_PCT};
use super::{Dir, Rig};
use crate::data::{Digest, Digester, Pattern};
use crate::host::{accept_timeout, host_connect, host_listen, HOST_TIMEOUT};
use crate::packet::HOST_CID;
use crate::SockType;

/// Bytes of pattern the reference's sender cycles through (plus one write's worth of slack).
const PATTERN_LEN: usize = 4 << 20;
/// Name of the simulated guest driver's interrupt thread.
pub(super) const GUEST_WORKER: &str = "guest-vsock";
/// "Guest memory" of the reference: the reader's copies land here, cycling.
const REFERENCE_REGION: usize = 64 << 20;

/// One timed transfer.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub bytes: u64,
    pub secs: f64,
    /// CPU seconds the daemon used during the transfer (0 for the reference).
    pub daemon_cpu: f64,
    /// CPU seconds this process (simulated guest and host programs) used.
    pub self_cpu: f64,
    /// Interrupts (used-buffer notifications) the guest driver took.
    pub interrupts: u64,
    /// Kicks (available-buffer notifications) the guest driver sent.
    pub kicks: u64,
    /// CPU seconds of the busiest harness thread (sender, receiver or the guest driver's
    /// interrupt thread).
    pub busiest_cpu: f64,
}

impl Transfer {
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / f64::from(1u32 << 20) / self.secs.max(1e-9)
    }

    /// Daemon CPU milliseconds per GiB moved.
    pub fn daemon_ms_per_gib(&self) -> f64 {
        self.daemon_cpu * 1e3 / (self.bytes as f64 / f64::from(1u32 << 30))
    }

    /// Guest interrupts plus kicks per MiB moved.
    pub fn notifications_per_mib(&self) -> f64 {
        (self.interrupts + self.kicks) as f64 / (self.bytes as f64 / f64::from(1u32 << 20))
    }

    /// Daemon CPU use as a percentage of one core.
    pub fn daemon_pct(&self) -> f64 {
        self.daemon_cpu / self.secs.max(1e-9) * 100.0
    }

    /// This process's CPU use as a percentage of one core.
    pub fn self_pct(&self) -> f64 {
        self.self_cpu / self.secs.max(1e-9) * 100.0
    }

    /// The busiest harness thread's CPU use as a percentage of one core.
    pub fn busiest_pct(&self) -> f64 {
        self.busiest_cpu / self.secs.max(1e-9) * 100.0
    }

    /// Whether a harness thread was busy for nearly the whole transfer, so the harness, not
    /// the daemon, may have set the pace.
    pub fn harness_saturated(&self) -> bool {
        self.busiest_pct() >= SATURATED_PCT
    }
}

/// Writes `total` bytes as repetitions of one prebuilt buffer of `write` bytes through
/// `send` (the last write may be shorter). The sender digests the buffer once and combines
/// CRCs, so producing the data costs nothing per byte. Returns the digest and the sending
/// thread's CPU seconds.
pub(super) fn send_all(
    mut send: impl FnMut(&[u8]) -> std::io::Result<()>,
    seed: u64,
    total: u64,
    write: usize,
) -> std::io::Result<(Digest, f64)> {
    let buf = Pattern::bytes(seed, write.max(1));
    let mut whole = Digester::default();
    whole.update(&buf);
    let cpu0 = this_thread_cpu();
    let mut d = Digester::default();
    let mut left = total;
    while left >= buf.len() as u64 {
        send(&buf)?;
        d.append(&whole);
        left -= buf.len() as u64;
    }
    if left > 0 {
        let tail = &buf[..left as usize];
        send(tail)?;
        d.update(tail);
    }
    Ok((d.finish(), this_thread_cpu() - cpu0))
}

/// Reads exactly `total` bytes (reads of at most `read` bytes); fails on early end of stream.
/// Returns the digest and the reading thread's CPU seconds.
pub(super) fn recv_all(
    mut r: impl Read,
    total: u64,
    read: usize,
) -> std::io::Result<(Digest, f64)> {
    let cpu0 = this_thread_cpu();
    let mut buf = vec![0u8; read.max(1)];
    let mut d = Digester::default();
    let mut got = 0u64;
    while got < total {
        let want = (buf.len() as u64).min(total - got) as usize;
        let n = match r.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("end of stream after {got} of {total} bytes"),
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        d.update(&buf[..n]);
        got += n as u64;
    }
    Ok((d.finish(), this_thread_cpu() - cpu0))
}

pub(super) fn join<T>(h: thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    h.join()
        .map_err(|_| anyhow!("sender thread panicked"))
        .and_then(|r| r)
}

pub(super) fn verify(sent: Digest, got: Digest, what: &str) -> Result<()> {
    if sent != got {
        bail!("{what}: data corrupted: sent {sent:?}, received {got:?}");
    }
    Ok(())
}

/// Moves `total` bytes over a new connection in direction `dir`, writes of `write` bytes
/// (the receiver reads with the same size). Connection setup is not timed.
pub fn transfer(rig: &mut Rig, dir: Dir, total: u64, write: usize) -> Result<Transfer> {
    let port = rig.port();
    let vm = &rig.vm;
    let seed = u64::from(port);
    let st0 = vm.guest.stats();
    let (secs, sent, got, workers) = match dir {
        Dir::HostToGuest => {
            let l = vm.guest.listen(port, SockType::Stream)?;
            let (host, _) = host_connect(&vm.spec.uds_path, port)?;
            let gs = l
                .accept(HOST_TIMEOUT)
                .context("guest accept of the host's CONNECT")?;
            timed(
                || rig.cpu_secs(),
                || {
                    thread::scope(|sc| {
                        let tx = sc.spawn(|| -> Result<(Digest, f64)> {
                            let mut w = &host;
                            Ok(send_all(|b| w.write_all(b), seed, total, write)?)
                        });
                        let got = recv_all(&gs, total, write).context("guest receive");
                        (join(tx).context("host send"), got)
                    })
                },
            )?
        }
        Dir::GuestToHost => {
            let l = host_listen(&vm.spec.uds_path, port)?;
            let gs = vm
                .guest
                .connect(HOST_CID, port, SockType::Stream)
                .map_err(|e| anyhow!("guest connect to host port {port}: {e}"))?;
            let host = accept_timeout(&l, HOST_TIMEOUT)?;
            timed(
                || rig.cpu_secs(),
                || {
                    thread::scope(|sc| {
                        let gs = &gs;
                        let tx = sc.spawn(move || -> Result<(Digest, f64)> {
                            Ok(send_all(|b| gs.send_prebuilt(b, seed), seed, total, write)?)
                        });
                        let got = recv_all(&host, total, write).context("host receive");
                        (join(tx).context("guest send"), got)
                    })
                },
            )?
        }
    };
    let (daemon_cpu, self_cpu, worker_cpu) = workers;
    let st1 = rig.vm.guest.stats();
    verify(sent.0, got.0, dir.label())?;
    rig.check()?;
    Ok(Transfer {
        bytes: total,
        secs,
        daemon_cpu,
        self_cpu,
        interrupts: st1.interrupts - st0.interrupts,
        kicks: st1.kicks - st0.kicks,
        busiest_cpu: sent.1.max(got.1).max(worker_cpu),
    })
}

/// Sender and receiver results: (digest, thread CPU seconds).
type Ends = (Result<(Digest, f64)>, Result<(Digest, f64)>);
/// A timed run: seconds, sender and receiver (digest, thread CPU seconds), and CPU seconds of
/// (the daemon, this process, the busiest guest interrupt thread).
type Timed = (f64, (Digest, f64), (Digest, f64), (f64, f64, f64));

/// Runs `f` timed; returns the seconds, both ends' results, and (daemon CPU seconds, this
/// process's CPU seconds, the busiest guest interrupt thread's CPU seconds) over the run.
fn timed(daemon_cpu: impl Fn() -> Result<f64>, f: impl FnOnce() -> Ends) -> Result<Timed> {
    let daemon0 = daemon_cpu()?;
    let self0 = cpu_secs(std::process::id())?;
    let w0 = named_threads(GUEST_WORKER)?;
    let t0 = Instant::now();
    let (sent, got) = f();
    let secs = t0.elapsed().as_secs_f64();
    let w1 = named_threads(GUEST_WORKER)?;
    let self1 = cpu_secs(std::process::id())?;
    let daemon1 = daemon_cpu()?;
    let cpu = (daemon1 - daemon0, self1 - self0, busiest_delta(&w0, &w1));
    Ok((secs, sent?, got?, cpu))
}

/// The reference limit: `total` bytes through a unix socketpair in writes of `write` bytes; the
/// reader reads up to `write` bytes at a time and copies them once into a 64 MiB region
/// (cache-line aligned destinations). No checksum: this is the bare data path.
pub fn reference(total: u64, write: usize) -> Result<Transfer> {
    let (a, b) = UnixStream::pair().context("socketpair")?;
    a.set_write_timeout(Some(HOST_TIMEOUT))?;
    b.set_read_timeout(Some(HOST_TIMEOUT))?;
    let mut region = vec![0u8; REFERENCE_REGION];
    // Touch the region first so page faults are not timed.
    region.iter_mut().step_by(4096).for_each(|x| *x = 1);
    let src = Pattern::bytes(7, PATTERN_LEN + write);
    let t0 = Instant::now();
    let got = thread::scope(|sc| {
        let tx = sc.spawn(|| -> Result<()> {
            let mut w = &a;
            let mut left = total;
            let mut off = 0usize;
            while left > 0 {
                let n = (write as u64).min(left) as usize;
                w.write_all(&src[off..off + n])?;
                off = (off + n) % PATTERN_LEN;
                left -= n as u64;
            }
            Ok(())
        });
        let rx = (|| -> Result<u64> {
            let mut r = &b;
            let mut tmp = vec![0u8; write];
            let mut got = 0u64;
            let mut dst = 0usize;
            while got < total {
                let n = match r.read(&mut tmp) {
                    Ok(0) => bail!("reference: early end of stream"),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                };
                if dst + n > region.len() {
                    dst = 0;
                }
                region[dst..dst + n].copy_from_slice(&tmp[..n]);
                dst = (dst + n).next_multiple_of(64);
                got += n as u64;
            }
            Ok(got)
        })();
        join(tx).and(rx)
    })?;
    let secs = t0.elapsed().as_secs_f64();
    std::hint::black_box(&region);
    Ok(Transfer {
        bytes: got,
        secs,
        daemon_cpu: 0.0,
        self_cpu: 0.0,
        interrupts: 0,
        kicks: 0,
        busiest_cpu: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_cycles_and_digests_match() {
        let mut sink = Vec::new();
        let total = (PATTERN_LEN as u64) * 2 + 100;
        let (sent, _) = send_all(|b| sink.write_all(b), 3, total, 65536).unwrap();
        assert_eq!(sink.len() as u64, total);
        let (got, _) = recv_all(&sink[..], sink.len() as u64, 1000).unwrap();
        assert_eq!(sent, got);
        assert!(recv_all(&sink[..10], 11, 4).is_err());
    }

    #[test]
    fn reference_moves_all_bytes() {
        let t = reference(8 << 20, 65536).unwrap();
        assert_eq!(t.bytes, 8 << 20);
    }
}
