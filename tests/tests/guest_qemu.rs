//! Real-guest end-to-end tests: QEMU (TCG) boots a Debian kernel with an initramfs built by
//! `tests/guest/build.sh` (busybox, socat, the virtio-vsock modules and the `vsockt` helper)
//! and talks to vhost-plug through a `vhost-user-vsock-pci` device.
//!
//! The guest's `/init` (`tests/guest/init`) runs the scenarios named on the kernel command
//! line (`vpt=a,b,c`) in order and reports on the serial console with `@@` marker lines; the
//! host side of each scenario here waits for `@@ READY <s>` before connecting to a guest
//! listener and for `@@ OK <s> key=value...` (or `@@ FAIL <s> reason`) at the end.
//!
//! Three tests, one guest boot at a time (a lock; QEMU under TCG wants both cores):
//! - `guest_scenarios`: streams of 64 MiB both ways, echo, bytes after the CONNECT line,
//!   half-close, RST, 100 concurrent connections each way, SEQPACKET boundaries;
//! - `guest_policy_denies_port`: `--plugin policy=builtin:port-allowlist`, seen from the guest;
//! - `daemon_survives_killed_qemu`: SIGKILL QEMU with connections open, boot a fresh QEMU on
//!   the same socket.
//!
//! The rig (guest image, QEMU, console markers) is `vhost_plug_tests::qemu`, shared with the
//! benchmark. Needs qemu-system-x86, linux-image-amd64, busybox-static and socat
//! (`tests/run.sh` installs them) and the release daemon. Run alone:
//! `cargo test --release -p vhost-plug-tests --test guest_qemu -- --nocapture`.
//! Every failure prints the tail of the serial log, QEMU's stderr and the daemon's stderr;
//! serial logs are also kept in `target/guest/logs/`.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use vhost_plug_tests::data::Pattern;
use vhost_plug_tests::host::{
    accept_timeout, host_listen, port_path, wait_readable, SeqpacketListener,
};
use vhost_plug_tests::qemu::{
    connect_retry, guest_lock, read_to_eof, sha256_hex, QemuRig as Rig, STEP,
};
use vhost_plug_tests::DaemonKind;

const GUEST_CID: u64 = 3;
/// Bytes of each 64 MiB stream.
const BIG: usize = 64 << 20;
/// Bound for a 64 MiB transfer plus checksumming under TCG.
const BIG_STEP: Duration = Duration::from_secs(120);
/// How long a killed VM's host connections may stay open.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Number of connections open at once in the concurrency scenarios.
const CONCURRENT: usize = 100;
/// SEQPACKET message sizes; keep in sync with SEND_SIZES / RECV_SIZES in vsockt.c.
const SEQ_GUEST_SEND: &[usize] = &[1, 2, 100, 1000, 4096, 4097, 20000, 65536, 3];
const SEQ_HOST_SEND: &[usize] = &[5, 3000, 1, 65000, 7];

/// Byte `j` of SEQPACKET message `k` (vsockt.c's `pat`).
fn pat(k: usize, j: usize) -> u8 {
    (k.wrapping_mul(31)
        .wrapping_add(j.wrapping_mul(7))
        .wrapping_add(1)) as u8
}

/// Runs `body` on a fresh rig under the guest lock; a failure panics with the diagnostics.
fn run(name: &'static str, extra_args: &[&str], body: impl FnOnce(&mut Rig) -> Result<()>) {
    let _guard = guest_lock();
    let started = Instant::now();
    let mut rig = match Rig::new(DaemonKind::VhostPlug, name, GUEST_CID, extra_args) {
        Ok(r) => r,
        Err(e) => panic!("[guest_qemu] {name}: setup failed: {e:#}"),
    };
    let result = body(&mut rig);
    rig.keep_log();
    if let Err(e) = result {
        let diag = rig.diagnostics();
        rig.kill_qemu();
        panic!("[guest_qemu] {name} failed: {e:#}\n{diag}");
    }
    if !rig.daemon.is_running() {
        panic!(
            "[guest_qemu] {name}: the daemon exited\n{}",
            rig.diagnostics()
        );
    }
    eprintln!(
        "[guest_qemu] {name}: ok in {:.1} s ({} boot(s))",
        started.elapsed().as_secs_f64(),
        rig.boots
    );
}

// ----- host-side helpers ----------------------------------------------------------------

/// True if `stream` ends (EOF or an error such as ECONNRESET) within `timeout`, reading and
/// discarding whatever is still queued.
fn ends_within(s: &mut UnixStream, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        s.set_read_timeout(Some(left.min(Duration::from_millis(500))))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Ok(true),
        }
    }
}

// ----- scenarios, host side -------------------------------------------------------------

/// h2g then g2h: 64 MiB to the guest (guest reports its sha256), the same bytes back.
fn streams_64m(rig: &mut Rig, l_g2h: &UnixListener) -> Result<()> {
    let payload = Pattern::bytes(0x6432_6821, BIG);
    thread::scope(|sc| -> Result<()> {
        let hasher = sc.spawn(|| sha256_hex(&payload));
        rig.expect("READY", "h2g", STEP)?;
        let t = Instant::now();
        let mut s = connect_retry(rig.uds(), 5001, b"")?;
        s.set_write_timeout(Some(BIG_STEP))?;
        s.write_all(&payload).context("h2g: writing 64 MiB")?;
        // Close right away: queued bytes must still all reach the guest.
        drop(s);
        let ok = rig.expect("OK", "h2g", BIG_STEP)?;
        let want = hasher.join().expect("hasher thread")?;
        let bytes = ok.value("bytes")?;
        let got = ok.value("sha256")?;
        ensure!(
            bytes == BIG.to_string() && got == want,
            "h2g: guest got {bytes} bytes with sha256 {got}, sent {BIG} with sha256 {want}"
        );
        eprintln!(
            "[guest_qemu] h2g 64 MiB: {:.1} s incl. guest sha256",
            t.elapsed().as_secs_f64()
        );
        Ok(())
    })?;

    rig.expect("BEGIN", "g2h", STEP)?;
    let t = Instant::now();
    let mut s = accept_timeout(l_g2h, STEP).context("g2h: guest did not connect to port 5002")?;
    let got = read_to_eof(&mut s, BIG_STEP).context("g2h: reading")?;
    ensure!(
        got.len() == BIG,
        "g2h: received {} bytes, want {BIG}",
        got.len()
    );
    if let Some(i) = got.iter().zip(&payload).position(|(a, b)| a != b) {
        bail!("g2h: byte {i} differs from what the guest stored");
    }
    rig.expect("OK", "g2h", STEP)?;
    eprintln!(
        "[guest_qemu] g2h 64 MiB: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// 4 MiB through the guest's socat PIPE, written and read at once.
fn echo(rig: &mut Rig) -> Result<()> {
    rig.expect("READY", "echo", STEP)?;
    let data = Pattern::bytes(0xec40, 4 << 20);
    let mut s = connect_retry(rig.uds(), 5003, b"")?;
    let mut w = s.try_clone()?;
    let got = thread::scope(|sc| -> Result<Vec<u8>> {
        let writer = sc.spawn(|| -> Result<()> {
            w.set_write_timeout(Some(STEP))?;
            w.write_all(&data)?;
            w.shutdown(Shutdown::Write)?;
            Ok(())
        });
        let got = read_to_eof(&mut s, STEP);
        writer
            .join()
            .expect("writer thread")
            .context("echo: writing")?;
        got
    })?;
    ensure!(
        got == data,
        "echo: got {} bytes back, sent {}{}",
        got.len(),
        data.len(),
        match got.iter().zip(&data).position(|(a, b)| a != b) {
            Some(i) => format!(", first difference at byte {i}"),
            None => String::new(),
        }
    );
    rig.expect("OK", "echo", STEP)?;
    Ok(())
}

/// `CONNECT 5004\nHELLO` in one write.
fn early(rig: &mut Rig) -> Result<()> {
    rig.expect("READY", "early", STEP)?;
    let s = connect_retry(rig.uds(), 5004, b"HELLO")?;
    s.shutdown(Shutdown::Write)?;
    let ok = rig.expect("OK", "early", STEP)?;
    drop(s);
    let (bytes, got) = (ok.value("bytes")?, ok.value("got")?);
    ensure!(
        bytes == "5" && got == "HELLO",
        "early: guest read {bytes} bytes {got:?}, want the 5 bytes HELLO sent with the CONNECT line"
    );
    Ok(())
}

/// shutdown(SHUT_WR) from the host: the guest's sha256sum sees EOF and answers.
fn half_close(rig: &mut Rig) -> Result<()> {
    rig.expect("READY", "half", STEP)?;
    let data = Pattern::bytes(0x4a1f, 1 << 20);
    let want = format!("{}  -\n", sha256_hex(&data)?);
    let mut s = connect_retry(rig.uds(), 5005, b"")?;
    s.set_write_timeout(Some(STEP))?;
    s.write_all(&data)?;
    s.shutdown(Shutdown::Write)?;
    let got = read_to_eof(&mut s, STEP).context("half: reading the guest's answer")?;
    ensure!(
        got == want.as_bytes(),
        "half: after SHUT_WR the guest answered {:?}, want {want:?}",
        String::from_utf8_lossy(&got)
    );
    rig.expect("OK", "half", STEP)?;
    Ok(())
}

/// Guest connect to port 5006 (no listener): reset, at once.
fn rst(rig: &mut Rig) -> Result<()> {
    ensure!(
        !port_path(rig.uds(), 5006).exists(),
        "something listens on port 5006"
    );
    let ok = rig.expect("OK", "rst", STEP)?;
    let errno = ok.value("errno")?;
    let ms: u64 = ok.value("ms")?.parse().context("rst: ms")?;
    ensure!(
        errno == "ECONNRESET",
        "rst: the guest's connect failed with {errno}, want ECONNRESET"
    );
    let socat_ms: u64 = ok.value("socat_ms")?.parse().context("rst: socat_ms")?;
    // The guest kernel's connect timeout is 2 s: a reset must come well before.
    ensure!(ms < 1000, "rst: the reset took {ms} ms");
    ensure!(
        socat_ms < 2000,
        "rst: socat took {socat_ms} ms to fail (process start included)"
    );
    eprintln!("[guest_qemu] rst: connect refused in {ms} ms (socat exited after {socat_ms} ms)");
    Ok(())
}

/// 100 guest connections to host port 5007, all accepted before any is answered.
fn conc_g2h(rig: &mut Rig, l: &UnixListener) -> Result<()> {
    rig.expect("BEGIN", "conc_g2h", STEP)?;
    let deadline = Instant::now() + STEP * 2;
    let mut conns = Vec::with_capacity(CONCURRENT);
    for i in 0..CONCURRENT {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = accept_timeout(l, left).with_context(|| format!("conc_g2h: accepting #{i}"))?;
        conns.push(s);
    }
    let mut seen = BTreeSet::new();
    for s in &mut conns {
        let msg = read_to_eof(s, STEP).context("conc_g2h: reading a request")?;
        let msg = String::from_utf8_lossy(&msg).into_owned();
        let i: usize = msg
            .strip_prefix("conn ")
            .and_then(|r| r.strip_suffix('\n'))
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("conc_g2h: bad request {msg:?}"))?;
        ensure!(seen.insert(i), "conc_g2h: request {i} twice");
        s.set_write_timeout(Some(STEP))?;
        s.write_all(format!("ack {i}\n").as_bytes())?;
    }
    drop(conns);
    let ok = rig.expect("OK", "conc_g2h", STEP)?;
    ensure!(
        ok.value("connections")? == CONCURRENT.to_string(),
        "conc_g2h: guest reports {}",
        ok.rest
    );
    Ok(())
}

/// 100 host connections to the guest's echo server on port 5008, all open at once.
fn conc_h2g(rig: &mut Rig) -> Result<()> {
    rig.expect("READY", "conc_h2g", STEP)?;
    let mut conns = Vec::with_capacity(CONCURRENT);
    for i in 0..CONCURRENT {
        let s = connect_retry(rig.uds(), 5008, b"").with_context(|| format!("conc_h2g: #{i}"))?;
        conns.push(s);
    }
    let msgs: Vec<Vec<u8>> = (0..CONCURRENT)
        .map(|i| {
            let mut m = format!("ping {i} ").into_bytes();
            m.extend(Pattern::bytes(i as u64, 1000));
            m
        })
        .collect();
    for (s, m) in conns.iter_mut().zip(&msgs) {
        s.write_all(m)?;
    }
    for (i, (s, m)) in conns.iter_mut().zip(&msgs).enumerate() {
        let mut back = vec![0u8; m.len()];
        s.set_read_timeout(Some(STEP))?;
        s.read_exact(&mut back)
            .with_context(|| format!("conc_h2g: reading echo #{i}"))?;
        ensure!(&back == m, "conc_h2g: echo #{i} differs");
    }
    drop(conns);
    let ok = rig.expect("OK", "conc_h2g", STEP)?;
    ensure!(
        ok.value("accepted")? == CONCURRENT.to_string()
            && ok.value("maxopen")? == CONCURRENT.to_string(),
        "conc_h2g: guest reports {}",
        ok.rest
    );
    Ok(())
}

/// SEQPACKET from the guest to host port 5009: every message arrives whole and alone, both
/// ways.
fn seqpacket(rig: &mut Rig, l: &SeqpacketListener) -> Result<()> {
    rig.expect("BEGIN", "seqpacket", STEP)?;
    let c = l
        .accept(STEP)
        .context("seqpacket: guest did not connect to port 5009")?;
    let mut buf = vec![0u8; 1 << 17];
    for (k, &size) in SEQ_GUEST_SEND.iter().enumerate() {
        let (n, trunc) = c
            .recv(&mut buf, STEP)
            .with_context(|| format!("seqpacket: message {k}"))?;
        ensure!(
            n == size && !trunc,
            "seqpacket: message {k} has {n} bytes (truncated: {trunc}), the guest sent {size}"
        );
        if let Some(j) = (0..n).find(|&j| buf[j] != pat(k, j)) {
            bail!("seqpacket: message {k} byte {j} differs");
        }
    }
    for (k, &size) in SEQ_HOST_SEND.iter().enumerate() {
        let m: Vec<u8> = (0..size).map(|j| pat(100 + k, j)).collect();
        c.send(&m)
            .with_context(|| format!("seqpacket: sending {k}"))?;
    }
    // The guest expects EOF after the last message.
    c.shutdown(Shutdown::Write)?;
    let ok = rig.expect("OK", "seqpacket", STEP)?;
    drop(c);
    eprintln!("[guest_qemu] seqpacket: {}", ok.rest);
    Ok(())
}

/// Answers one request on `l`: reads to EOF, checks it, replies, closes.
fn serve_once(l: &UnixListener, want: &[u8], reply: &[u8]) -> Result<()> {
    let mut s = accept_timeout(l, STEP)?;
    let got = read_to_eof(&mut s, STEP)?;
    ensure!(
        got == want,
        "got {:?}, want {:?}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(want)
    );
    s.write_all(reply)?;
    Ok(())
}

// ----- tests ----------------------------------------------------------------------------

#[test]
fn guest_scenarios() {
    run("guest_scenarios", &[], |rig| {
        let l_g2h = host_listen(rig.uds(), 5002)?;
        let l_conc = host_listen(rig.uds(), 5007)?;
        let l_seq = SeqpacketListener::for_port(rig.uds(), 5009)?;
        let t = Instant::now();
        rig.boot(&[
            "h2g",
            "g2h",
            "echo",
            "early",
            "half",
            "rst",
            "conc_g2h",
            "conc_h2g",
            "seqpacket",
        ])?;
        eprintln!("[guest_qemu] boot: {:.1} s", t.elapsed().as_secs_f64());
        streams_64m(rig, &l_g2h)?;
        echo(rig)?;
        early(rig)?;
        half_close(rig)?;
        rst(rig)?;
        conc_g2h(rig, &l_conc)?;
        conc_h2g(rig)?;
        seqpacket(rig, &l_seq)?;
        rig.finish()?;
        eprintln!(
            "[guest_qemu] guest run (boot to poweroff): {:.1} s",
            t.elapsed().as_secs_f64()
        );
        Ok(())
    });
}

#[test]
fn guest_policy_denies_port() {
    const POLICY: &str = "policy=builtin:port-allowlist,config=allow=2:5011";
    run("guest_policy_denies_port", &["--plugin", POLICY], |rig| {
        let l_denied = host_listen(rig.uds(), 5010)?;
        let l_allowed = host_listen(rig.uds(), 5011)?;
        rig.boot(&["policy"])?;
        thread::scope(|sc| -> Result<()> {
            let server = sc.spawn(|| serve_once(&l_allowed, b"allowed\n", b"welcome\n"));
            let ok = rig.expect("OK", "policy", STEP).with_context(|| {
                format!(
                    "daemon started with `--plugin {POLICY}`: the guest's connect to port \
                     5010 must be refused (RST), to port 5011 allowed"
                )
            })?;
            server
                .join()
                .expect("server thread")
                .context("policy: allowed port 5011")?;
            ensure!(
                ok.value("reply")? == "welcome",
                "policy: guest got {}",
                ok.rest
            );
            Ok(())
        })?;
        ensure!(
            !wait_readable(l_denied.as_raw_fd(), Duration::ZERO)?,
            "policy: the denied connection to port 5010 reached the host listener"
        );
        rig.finish()
    });
}

#[test]
fn daemon_survives_killed_qemu() {
    run("daemon_survives_killed_qemu", &[], |rig| {
        let l_stream = host_listen(rig.uds(), 5012)?;
        let l_ping = host_listen(rig.uds(), 5014)?;

        // Boot 1: a guest -> host stream in full flow and a host -> guest echo connection.
        rig.boot(&["hold"])?;
        rig.expect("READY", "hold", STEP)?;
        let mut g2h = accept_timeout(&l_stream, STEP).context("hold: guest stream")?;
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        g2h.set_read_timeout(Some(STEP))?;
        while got < 1 << 20 {
            let n = g2h
                .read(&mut buf)
                .context("hold: reading the guest stream")?;
            ensure!(n > 0, "hold: guest stream ended early");
            got += n;
        }
        let mut h2g = connect_retry(rig.uds(), 5013, b"")?;
        h2g.write_all(b"ping\n")?;
        let mut back = [0u8; 5];
        h2g.set_read_timeout(Some(STEP))?;
        h2g.read_exact(&mut back).context("hold: echo")?;
        ensure!(&back == b"ping\n", "hold: echo got {back:?}");

        rig.kill_qemu();
        rig.keep_log();
        ensure!(
            ends_within(&mut g2h, CLOSE_TIMEOUT)?,
            "after SIGKILL of QEMU the guest -> host connection stayed open for {CLOSE_TIMEOUT:?}"
        );
        ensure!(
            ends_within(&mut h2g, CLOSE_TIMEOUT)?,
            "after SIGKILL of QEMU the host -> guest connection stayed open for {CLOSE_TIMEOUT:?}"
        );
        ensure!(
            rig.daemon.is_running(),
            "the daemon exited after QEMU was killed"
        );

        // Boot 2 on the same socket.
        rig.boot(&["echo", "early", "rst", "ping"])
            .context("second QEMU on the same socket")?;
        echo(rig)?;
        early(rig)?;
        rst(rig)?;
        thread::scope(|sc| -> Result<()> {
            let server = sc.spawn(|| serve_once(&l_ping, b"ping\n", b"pong\n"));
            let ok = rig.expect("OK", "ping", STEP)?;
            server.join().expect("server thread").context("ping")?;
            ensure!(ok.value("reply")? == "pong", "ping: guest got {}", ok.rest);
            Ok(())
        })?;
        rig.finish()
    });
}
