//! The benchmark with a real Linux guest: QEMU (TCG) boots the test guest
//! ([`crate::qemu`]) against the daemon, and the guest runs `vsockt bench-server`
//! (`tests/guest/vsockt.c`), which the host drives over vsock:
//!
//! - throughput host->guest: the host announces `bytes` to the sink port and writes them (the
//!   bench pattern) in 64 KiB writes; the guest checks every byte and replies with the count
//!   and the first bad offset. Timed from CONNECT to the reply. (No half-close: with
//!   vhost-device-vsock 0.3.0 the reply after the host's SHUT_WR did not arrive.)
//! - throughput guest->host: the host asks the source port for `bytes`; the guest writes them
//!   in 64 KiB writes and closes; the host checks every byte. Timed from CONNECT to EOF.
//! - 1-byte round trips: host->guest sends are timed by the host against the echo port;
//!   guest->host sends are timed by the guest against a host echo listener (control command
//!   `ping`).
//! - connection setup: host->guest is CONNECT, the guest accepts and closes, the host reads
//!   EOF and closes; guest->host is the guest's `connect` command against a host listener
//!   that accepts and closes.
//!
//! TCG emulates the guest's CPU, so the guest side is slow and the absolute figures are far
//! below those of a KVM guest; the ratios between the daemons are what this section is for.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::stats::Percentiles;
use super::Dir;
use crate::daemon::DaemonKind;
use crate::host::{accept_timeout, host_listen, wait_readable};
use crate::qemu::{connect_retry, read_to_eof, QemuRig, STEP};

/// Guest CID of the benchmark guest.
const CID: u64 = 3;
/// Guest ports: control, sink, source, echo, accept-and-close (vsockt bench-server BASE).
const BASE: u32 = 6000;
const SINK: u32 = BASE + 1;
const SOURCE: u32 = BASE + 2;
const ECHO: u32 = BASE + 3;
const ACCEPT: u32 = BASE + 4;
/// Host listeners for the guest's round trips and connects.
const HOST_ECHO: u32 = 6100;
const HOST_ACCEPT: u32 = 6101;
/// Period of the bench pattern; keep in sync with BENCH_PERIOD in vsockt.c.
const PERIOD: usize = 1_048_573;
/// Write size of both ends.
const CHUNK: usize = 64 << 10;
/// Round trips before timing starts.
const WARMUP: usize = 100;
/// Bound for one transfer under TCG.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(180);

/// The bench pattern plus one chunk of slack, so any chunk starting below [`PERIOD`] is one
/// slice. Byte `i` of a stream is `pattern[i % PERIOD]`.
pub fn pattern() -> Vec<u8> {
    (0..PERIOD + CHUNK)
        .map(|j| {
            let i = (j % PERIOD) as u64;
            (i.wrapping_mul(7)
                .wrapping_add((i >> 11).wrapping_mul(13))
                .wrapping_add(1)) as u8
        })
        .collect()
}

/// One timed transfer through the real guest.
#[derive(Clone, Copy, Debug)]
pub struct GuestTransfer {
    pub bytes: u64,
    pub secs: f64,
    /// CPU seconds the daemon used during the transfer.
    pub daemon_cpu: f64,
    /// CPU seconds QEMU used during the transfer.
    pub qemu_cpu: f64,
}

impl GuestTransfer {
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / f64::from(1u32 << 20) / self.secs.max(1e-9)
    }

    /// Daemon CPU milliseconds per GiB moved.
    pub fn daemon_ms_per_gib(&self) -> f64 {
        self.daemon_cpu * 1e3 / (self.bytes as f64 / f64::from(1u32 << 30))
    }
}

/// A daemon plus a booted guest running the bench server, with the host listeners the
/// guest-initiated scenarios need.
pub struct GuestBench {
    rig: QemuRig,
    pattern: Vec<u8>,
    host_echo: UnixListener,
    host_accept: UnixListener,
}

impl GuestBench {
    /// Starts `kind` and boots a guest running the bench server.
    pub fn boot(kind: DaemonKind, label: &str) -> Result<GuestBench> {
        let mut rig = QemuRig::new(kind, label, CID, &[])?;
        let host_echo = host_listen(rig.uds(), HOST_ECHO)?;
        let host_accept = host_listen(rig.uds(), HOST_ACCEPT)?;
        let booted = rig
            .boot(&["benchsrv"])
            .and_then(|_| rig.expect("READY", "benchsrv", STEP));
        if let Err(e) = booted {
            bail!("{e:#}\n{}", rig.diagnostics());
        }
        Ok(GuestBench {
            rig,
            pattern: pattern(),
            host_echo,
            host_accept,
        })
    }

    pub fn kind(&self) -> DaemonKind {
        self.rig.daemon.kind()
    }

    /// Serial tail, QEMU and daemon stderr, for failure messages.
    pub fn diagnostics(&self) -> String {
        self.rig.diagnostics()
    }

    fn cpu(&self) -> Result<(f64, f64)> {
        let pid = self.rig.daemon.pid().context("daemon has no pid")?;
        let daemon = super::rig::cpu_secs(pid)?;
        let qemu = match &self.rig.qemu {
            Some(q) => q.cpu_secs()?,
            None => 0.0,
        };
        Ok((daemon, qemu))
    }

    fn check(&mut self) -> Result<()> {
        ensure!(
            self.rig.daemon.is_running(),
            "{} exited",
            self.kind().name()
        );
        if let Some(st) = self.rig.qemu.as_mut().and_then(|q| q.exited()) {
            bail!("QEMU exited ({st})");
        }
        Ok(())
    }

    /// Moves `bytes` in direction `dir`, every byte checked.
    pub fn transfer(&mut self, dir: Dir, bytes: u64) -> Result<GuestTransfer> {
        let (d0, q0) = self.cpu()?;
        let t0 = Instant::now();
        match dir {
            Dir::HostToGuest => self.send_to_guest(bytes)?,
            Dir::GuestToHost => self.receive_from_guest(bytes)?,
        }
        let secs = t0.elapsed().as_secs_f64();
        let (d1, q1) = self.cpu()?;
        self.check()?;
        Ok(GuestTransfer {
            bytes,
            secs,
            daemon_cpu: d1 - d0,
            qemu_cpu: q1 - q0,
        })
    }

    fn send_to_guest(&mut self, bytes: u64) -> Result<()> {
        let mut s = connect_retry(self.rig.uds(), SINK, b"")?;
        s.set_write_timeout(Some(TRANSFER_TIMEOUT))?;
        s.write_all(format!("{bytes}\n").as_bytes())?;
        let (mut left, mut off) = (bytes, 0usize);
        while left > 0 {
            let k = (left as usize).min(CHUNK);
            s.write_all(&self.pattern[off..off + k])
                .with_context(|| format!("writing at byte {}", bytes - left))?;
            left -= k as u64;
            off = (off + k) % PERIOD;
        }
        let reply = read_to_eof(&mut s, TRANSFER_TIMEOUT).context("reading the guest's reply")?;
        let reply = String::from_utf8_lossy(&reply);
        let want = format!("bytes={bytes} bad=-1\n");
        ensure!(
            reply == want,
            "the guest's sink answered {reply:?}, want {want:?}"
        );
        Ok(())
    }

    fn receive_from_guest(&mut self, bytes: u64) -> Result<()> {
        let mut s = connect_retry(self.rig.uds(), SOURCE, b"")?;
        s.write_all(format!("{bytes}\n").as_bytes())?;
        s.set_read_timeout(Some(TRANSFER_TIMEOUT))?;
        let mut buf = vec![0u8; CHUNK];
        let (mut got, mut off) = (0u64, 0usize);
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context(format!("reading after {got} bytes")),
            };
            if buf[..n] != self.pattern[off..off + n] {
                let j = (0..n)
                    .find(|&j| buf[j] != self.pattern[off + j])
                    .unwrap_or(0);
                bail!(
                    "byte {} from the guest differs from the pattern",
                    got + j as u64
                );
            }
            got += n as u64;
            off = (off + n) % PERIOD;
        }
        ensure!(got == bytes, "received {got} bytes, want {bytes}");
        Ok(())
    }

    /// `n` timed 1-byte round trips; `dir` is the side that sends and times.
    pub fn round_trips(&mut self, dir: Dir, n: usize) -> Result<Percentiles> {
        match dir {
            Dir::HostToGuest => {
                let s = connect_retry(self.rig.uds(), ECHO, b"")?;
                s.set_read_timeout(Some(STEP))?;
                let mut us = Vec::with_capacity(n);
                let mut back = [0u8; 1];
                for i in 0..WARMUP + n {
                    let b = (i % 251) as u8;
                    let t = Instant::now();
                    (&s).write_all(&[b]).context("sending the request byte")?;
                    (&s).read_exact(&mut back)
                        .with_context(|| format!("round trip {i}"))?;
                    ensure!(
                        back[0] == b,
                        "echo returned {:#04x}, sent {b:#04x}",
                        back[0]
                    );
                    if i >= WARMUP {
                        us.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
                s.shutdown(Shutdown::Write)?;
                Percentiles::of(us).context("no samples")
            }
            Dir::GuestToHost => {
                let line = thread::scope(|sc| -> Result<String> {
                    let server = sc.spawn(|| echo_one(&self.host_echo));
                    let r = self.control(&format!("ping {HOST_ECHO} {n} {WARMUP}"));
                    let served = server.join().map_err(|_| anyhow::anyhow!("echo thread"))?;
                    let line = r?;
                    served.context("host echo")?;
                    Ok(line)
                })?;
                let v = values(&line);
                let get = |k: &str| -> Result<f64> {
                    v.iter()
                        .find(|(key, _)| key == k)
                        .and_then(|(_, x)| x.parse().ok())
                        .with_context(|| format!("guest ping answered {line:?}"))
                };
                Ok(Percentiles {
                    p50: get("p50_us")?,
                    p99: get("p99_us")?,
                    samples: n,
                })
            }
        }
    }

    /// Connections per second over `n` sequential connections in direction `dir`.
    pub fn setup_rate(&mut self, dir: Dir, n: usize) -> Result<f64> {
        match dir {
            Dir::HostToGuest => {
                let t0 = Instant::now();
                for i in 0..n {
                    let mut s = connect_retry(self.rig.uds(), ACCEPT, b"")
                        .with_context(|| format!("connection {i}"))?;
                    read_to_eof(&mut s, STEP)
                        .with_context(|| format!("connection {i}: waiting for the close"))?;
                }
                Ok(n as f64 / t0.elapsed().as_secs_f64().max(1e-9))
            }
            Dir::GuestToHost => {
                let done = AtomicBool::new(false);
                let line = thread::scope(|sc| -> Result<String> {
                    let server = sc.spawn(|| accept_close(&self.host_accept, &done));
                    let r = self.control(&format!("connect {HOST_ACCEPT} {n}"));
                    done.store(true, Ordering::Relaxed);
                    let accepted = server
                        .join()
                        .map_err(|_| anyhow::anyhow!("accept thread"))?;
                    let line = r?;
                    let accepted = accepted?;
                    ensure!(accepted == n, "host accepted {accepted} of {n} connections");
                    Ok(line)
                })?;
                let secs: f64 = values(&line)
                    .into_iter()
                    .find(|(k, _)| k == "secs")
                    .and_then(|(_, v)| v.parse().ok())
                    .with_context(|| format!("guest connect answered {line:?}"))?;
                Ok(n as f64 / secs.max(1e-9))
            }
        }
    }

    /// Sends one control command and returns the guest's reply line.
    fn control(&self, cmd: &str) -> Result<String> {
        // Written after the CONNECT handshake: vhost-device-vsock 0.3.0 drops bytes that
        // arrive together with the CONNECT line.
        let mut s = connect_retry(self.rig.uds(), BASE, b"")?;
        s.write_all(format!("{cmd}\n").as_bytes())?;
        let reply = read_to_eof(&mut s, TRANSFER_TIMEOUT)
            .with_context(|| format!("guest reply to {cmd:?}"))?;
        let reply = String::from_utf8_lossy(&reply).trim_end().to_string();
        ensure!(
            !reply.starts_with("error="),
            "guest answered {cmd:?} with {reply}"
        );
        Ok(reply)
    }

    /// Stops the bench server and waits for the guest's poweroff.
    pub fn finish(mut self) -> Result<()> {
        let bye = self.control("quit")?;
        ensure!(bye == "bye", "guest answered quit with {bye:?}");
        self.rig.expect("OK", "benchsrv", STEP)?;
        self.rig.finish()?;
        self.rig.keep_log();
        Ok(())
    }
}

/// `key=value` words of a reply line.
fn values(line: &str) -> Vec<(String, String)> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Accepts one connection and echoes it until EOF.
fn echo_one(l: &UnixListener) -> Result<()> {
    let mut s: UnixStream = accept_timeout(l, STEP)?;
    s.set_read_timeout(Some(STEP))?;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => s.write_all(&buf[..n])?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("echo read"),
        }
    }
}

/// Accepts and closes connections until `done` is set and none is waiting; returns how
/// many it accepted.
fn accept_close(l: &UnixListener, done: &AtomicBool) -> Result<usize> {
    use std::os::fd::AsRawFd;
    let mut n = 0;
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    loop {
        if wait_readable(l.as_raw_fd(), Duration::from_millis(100))? {
            let s = accept_timeout(l, STEP)?;
            drop(s);
            n += 1;
        } else if done.load(Ordering::Relaxed) {
            return Ok(n);
        }
        ensure!(
            Instant::now() < deadline,
            "accepting for {TRANSFER_TIMEOUT:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_matches_vsockt() {
        let p = pattern();
        assert_eq!(p.len(), PERIOD + CHUNK);
        // vsockt.c: (unsigned char)(i * 7 + (i >> 11) * 13 + 1), i = j % PERIOD.
        assert_eq!(&p[..3], &[1, 8, 15]);
        assert_eq!(p[2048], (2048u64 * 7 + 13 + 1) as u8);
        assert_eq!(p[PERIOD], p[0]);
        assert_eq!(p[PERIOD + 5], p[5]);
    }
}
