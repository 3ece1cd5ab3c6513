//! Stream throughput over one connection, checksum verified, and the in-process reference
//! limit (a unix socketpair plus one memcpy into a large buffer).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use super::rig::cpu_secs;
use super::{Dir, Rig};
use crate::data::{Digest, Digester, Pattern};
use crate::host::{accept_timeout, host_connect, host_listen, HOST_TIMEOUT};
use crate::packet::HOST_CID;
use crate::SockType;

/// Bytes of pattern the sender cycles through (plus one write's worth of slack).
const PATTERN_LEN: usize = 4 << 20;
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
}

/// Cycles through a precomputed pattern so producing the data costs (almost) nothing.
struct Source {
    buf: Vec<u8>,
    off: usize,
    digest: Digester,
}

impl Source {
    fn new(seed: u64, write: usize) -> Self {
        Source {
            buf: Pattern::bytes(seed, PATTERN_LEN + write),
            off: 0,
            digest: Digester::default(),
        }
    }

    /// The next `n` bytes (n <= the write size given to `new`).
    fn next(&mut self, n: usize) -> &[u8] {
        let start = self.off;
        self.off = (self.off + n) % PATTERN_LEN;
        let s = &self.buf[start..start + n];
        self.digest.update(s);
        s
    }
}

/// Writes `total` bytes in writes of `write` bytes through `w`.
fn send_all(mut w: impl Write, seed: u64, total: u64, write: usize) -> std::io::Result<Digest> {
    let mut src = Source::new(seed, write);
    let mut left = total;
    while left > 0 {
        let n = (write as u64).min(left) as usize;
        w.write_all(src.next(n))?;
        left -= n as u64;
    }
    Ok(src.digest.finish())
}

/// Reads exactly `total` bytes (reads of at most `read` bytes); fails on early end of stream.
fn recv_all(mut r: impl Read, total: u64, read: usize) -> std::io::Result<Digest> {
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
    Ok(d.finish())
}

fn join<T>(h: thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    h.join()
        .map_err(|_| anyhow!("sender thread panicked"))
        .and_then(|r| r)
}

fn verify(sent: Digest, got: Digest, what: &str) -> Result<()> {
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
    let cpu0 = (rig.cpu_secs()?, cpu_secs(std::process::id())?);
    let st0 = vm.guest.stats();
    let (secs, sent, got) = match dir {
        Dir::HostToGuest => {
            let l = vm.guest.listen(port, SockType::Stream)?;
            let (host, _) = host_connect(&vm.spec.uds_path, port)?;
            let gs = l
                .accept(HOST_TIMEOUT)
                .context("guest accept of the host's CONNECT")?;
            let t0 = Instant::now();
            let (sent, got) = thread::scope(|sc| {
                let tx =
                    sc.spawn(|| -> Result<Digest> { Ok(send_all(&host, seed, total, write)?) });
                let got = recv_all(&gs, total, write).context("guest receive");
                (join(tx).context("host send"), got)
            });
            (t0.elapsed().as_secs_f64(), sent?, got?)
        }
        Dir::GuestToHost => {
            let l = host_listen(&vm.spec.uds_path, port)?;
            let gs = vm
                .guest
                .connect(HOST_CID, port, SockType::Stream)
                .map_err(|e| anyhow!("guest connect to host port {port}: {e}"))?;
            let host = accept_timeout(&l, HOST_TIMEOUT)?;
            let t0 = Instant::now();
            let (sent, got) = thread::scope(|sc| {
                let tx = sc.spawn(|| -> Result<Digest> { Ok(send_all(&gs, seed, total, write)?) });
                let got = recv_all(&host, total, write).context("host receive");
                (join(tx).context("guest send"), got)
            });
            (t0.elapsed().as_secs_f64(), sent?, got?)
        }
    };
    let cpu1 = (rig.cpu_secs()?, cpu_secs(std::process::id())?);
    let st1 = rig.vm.guest.stats();
    verify(sent, got, dir.label())?;
    rig.check()?;
    Ok(Transfer {
        bytes: total,
        secs,
        daemon_cpu: cpu1.0 - cpu0.0,
        self_cpu: cpu1.1 - cpu0.1,
        interrupts: st1.interrupts - st0.interrupts,
        kicks: st1.kicks - st0.kicks,
    })
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_cycles_and_digests_match() {
        let mut sink = Vec::new();
        let sent = send_all(&mut sink, 3, (PATTERN_LEN as u64) * 2 + 100, 65536).unwrap();
        let got = recv_all(&sink[..], sink.len() as u64, 1000).unwrap();
        assert_eq!(sent, got);
        assert!(recv_all(&sink[..10], 11, 4).is_err());
    }

    #[test]
    fn reference_moves_all_bytes() {
        let t = reference(8 << 20, 65536).unwrap();
        assert_eq!(t.bytes, 8 << 20);
    }
}
