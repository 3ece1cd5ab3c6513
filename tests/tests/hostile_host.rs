//! Hostile programs on the host side of vhost-plug's hybrid vsock sockets: a peer that never
//! reads, garbage and overlong CONNECT lines, and thousands of connections that never finish
//! their handshake. The daemon must stay bounded, say what it did in its log, and keep
//! serving everyone else.
//!
//! Run with output: `cargo test --release -p vhost-plug-tests --test hostile_host -- --nocapture`

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use vhost_plug_tests::checks::{
    guest_echo, host_echo, raise_fd_limit, resources, serves, wait_fds,
};
use vhost_plug_tests::data::{digest, recv_digest, Pattern};
use vhost_plug_tests::harness::Setup;
use vhost_plug_tests::host::{
    accept_timeout, host_listen, seqpacket_path, SeqpacketConn, HOST_TIMEOUT,
};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::{DaemonKind, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(5);

fn setup() -> Result<Setup> {
    Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3), VmSpec::new(d, 4)],
        &[],
    )
}

/// Reads until end of stream or reset within `t`; true if the daemon closed the socket.
fn closed_by_daemon(s: &mut UnixStream, t: Duration) -> Result<bool> {
    s.set_read_timeout(Some(t))?;
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false)
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The guest streams to a host peer that does not read: the device buffers at most its
/// `buf_alloc`, the guest's credit runs out and its sends stall; the daemon does not grow,
/// other connections of the same VM and other VMs keep flowing; once the peer reads, every
/// byte arrives in order.
#[test]
fn host_peer_that_never_reads() -> Result<()> {
    const TOTAL: usize = 8 << 20;
    let s = setup()?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let l = host_listen(&a.spec.uds_path, 2000)?;
    let mut g = a
        .guest
        .connect(HOST_CID, 2000, SockType::Stream)
        .map_err(|e| anyhow!("{e}"))?;
    let host = accept_timeout(&l, HOST_TIMEOUT)?;
    let (rss0, _) = resources(&s.daemon, "before the stalled stream")?;
    let data = Pattern::bytes(2000, TOTAL);
    g.set_timeout(Duration::from_secs(2));
    let mut off = 0usize;
    let stalled = loop {
        let end = (off + 64 * 1024).min(TOTAL);
        match g.send(&data[off..end]) {
            Ok(()) => off = end,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break true,
            Err(e) => return Err(e).context("guest send"),
        }
        if off == TOTAL {
            break false;
        }
    };
    let sent = g.byte_counts().0 as usize;
    let credit = g.credit_info().context("socket gone")?;
    eprintln!(
        "[stall] guest stalled after {sent} of {TOTAL} bytes; peer credit: buf_alloc {} fwd_cnt \
         {} tx_cnt {}",
        credit.peer_buf_alloc, credit.peer_fwd_cnt, credit.tx_cnt
    );
    ensure!(stalled, "all {TOTAL} bytes went to a peer that never reads");
    ensure!(
        credit.tx_cnt.wrapping_sub(credit.peer_fwd_cnt) == credit.peer_buf_alloc,
        "the guest stalled without using its whole credit: {credit:?}"
    );
    // While it stalls, the same VM and the other VM serve.
    serves(&a, 2100, "a stalled stream on the same VM")?;
    serves(&b, 2110, "a stalled stream on another VM")?;
    let (rss1, _) = resources(&s.daemon, "while the stream is stalled")?;
    ensure!(
        rss1 < rss0 + 16 * 1024,
        "daemon grew by {} KiB while a peer did not read",
        rss1 - rss0
    );
    // The peer reads now; the guest sends the rest; every byte arrives once, in order.
    let reader = std::thread::spawn(move || recv_digest(&host, u64::MAX, 64 * 1024));
    g.set_timeout(HOST_TIMEOUT);
    let resume = sent;
    for chunk in data[resume..].chunks(64 * 1024) {
        g.send(chunk)?;
    }
    g.shutdown(false, true)?;
    let got = reader.join().map_err(|_| anyhow!("reader panicked"))??;
    ensure!(
        got == digest(&data),
        "host got {got:?}, guest sent {:?}",
        digest(&data)
    );
    eprintln!(
        "[stall] after the peer started reading: {} bytes arrived, crc {:08x}; VmRSS {rss0} -> \
         {rss1} KiB",
        got.bytes, got.crc
    );
    a.guest.health()?;
    Ok(())
}

#[test]
fn garbage_and_overlong_connect_lines() -> Result<()> {
    let mut s = setup()?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let cases: [(&str, Vec<u8>, &str); 6] = [
        (
            "plain garbage",
            b"HELLO THERE\n".to_vec(),
            "bad CONNECT line",
        ),
        (
            "port not a number",
            b"CONNECT abc\n".to_vec(),
            "bad CONNECT line",
        ),
        (
            "port beyond u32",
            b"CONNECT 99999999999\n".to_vec(),
            "bad CONNECT line",
        ),
        (
            "binary",
            [0xff, 0x00, 0xfe, b'\n'].to_vec(),
            "bad CONNECT line",
        ),
        (
            "overlong line",
            [b"CONNECT ".as_slice(), &[b'1'; 200]].concat(),
            "overlong CONNECT line",
        ),
        (
            "line of 10 KiB without newline",
            vec![b'x'; 10 * 1024],
            "overlong CONNECT line",
        ),
    ];
    for (what, bytes, log) in cases {
        let mark = s.daemon.log_mark();
        let mut c = UnixStream::connect(&a.spec.uds_path)?;
        // The daemon may close before taking everything; that is the point.
        let _ = c.write_all(&bytes);
        ensure!(
            closed_by_daemon(&mut c, PROMPT)?,
            "{what}: connection left open"
        );
        let line = s
            .daemon
            .wait_log(mark, &[log], PROMPT)
            .with_context(|| format!("{what}: no log line {log:?}"))?;
        eprintln!("[connect-line] {what}: {}", line.trim());
    }
    // The SEQPACKET path: one garbage message.
    let mark = s.daemon.log_mark();
    let c = SeqpacketConn::connect(&seqpacket_path(&a.spec.uds_path))?;
    c.send(b"GET / HTTP/1.0")?;
    let mut buf = [0u8; 64];
    let (n, _) = c.recv(&mut buf, PROMPT)?;
    ensure!(n == 0, "SEQPACKET garbage got an answer");
    s.daemon
        .wait_log(mark, &["bad CONNECT line"], PROMPT)
        .context("SEQPACKET garbage: no log line")?;
    serves(&a, 2200, "garbage CONNECT lines")?;
    serves(&b, 2210, "garbage CONNECT lines")?;
    ensure!(s.daemon.is_running(), "daemon exited");
    Ok(())
}

/// True if a non-blocking read shows the daemon already closed the socket.
fn closed_now(c: &mut UnixStream) -> Result<bool> {
    c.set_nonblocking(true)?;
    let r = match c.read(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    c.set_nonblocking(false)?;
    Ok(r)
}

/// Waits for every socket in `pending` to be closed by the daemon; returns how many were.
fn count_closed(pending: &mut [UnixStream], t: Duration) -> Result<usize> {
    let mut closed = 0;
    for c in pending {
        if closed_by_daemon(c, t)? {
            closed += 1;
        }
    }
    Ok(closed)
}

/// Thousands of host connections that never finish their CONNECT line: some send nothing,
/// some half a line. The daemon holds at most its handshake limit and closes the rest at
/// once, drops the held ones after its handshake timeout, comes back to its fd count, stays
/// within its memory bound, and serves everyone else meanwhile.
#[test]
fn thousands_of_pending_host_connects() -> Result<()> {
    const SILENT: usize = 1500;
    const HALF_LINE: usize = 500;
    const HANDSHAKE_LIMIT: usize = 1024;
    raise_fd_limit(4096)?;
    let mut s = setup()?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let (rss0, fds0) = resources(&s.daemon, "before the pending connects")?;
    let mark = s.daemon.log_mark();
    let t0 = Instant::now();
    let mut pending = Vec::with_capacity(SILENT + HALF_LINE);
    for i in 0..SILENT + HALF_LINE {
        let mut c =
            UnixStream::connect(&a.spec.uds_path).with_context(|| format!("host connect {i}"))?;
        if i >= SILENT {
            // The daemon may already have closed it (over the limit).
            let _ = c.write_all(b"CONNECT 70");
        }
        pending.push(c);
    }
    let line = s
        .daemon
        .wait_log(mark, &["too many host connections"], PROMPT)
        .context("no log line for connections over the handshake limit")?;
    eprintln!("[pending] {}", line.trim());
    let (rss1, fds1) = resources(&s.daemon, "with the connects pending")?;
    // The other VM serves both ways; this VM's guest still reaches the host, while a new host
    // connect to it is turned away until handshake slots free up.
    serves(&b, 2300, "pending host connects to another VM")?;
    guest_echo(&a, 2310, 2310)?;
    let mut late = UnixStream::connect(&a.spec.uds_path)?;
    let _ = late.write_all(b"CONNECT 2311\n");
    ensure!(
        closed_by_daemon(&mut late, PROMPT)?,
        "a host connect beyond the handshake limit was kept"
    );
    let mut closed_at_once = 0usize;
    for c in &mut pending {
        if closed_now(c)? {
            closed_at_once += 1;
        }
    }
    // The rest is closed within the handshake timeout (10 s) plus the timer period.
    let closed = count_closed(&mut pending, Duration::from_secs(15))?;
    let elapsed = t0.elapsed();
    let line = s
        .daemon
        .wait_log(mark, &["handshake timed out", "AwaitConnectLine"], PROMPT)
        .context("no log line for expired handshakes")?;
    eprintln!("[pending] {}", line.trim());
    drop(pending);
    let fds2 = wait_fds(&s.daemon, fds0, Duration::from_secs(5))?;
    let (rss2, _) = resources(&s.daemon, "after the pending connects expired")?;
    let total = SILENT + HALF_LINE;
    eprintln!(
        "[pending] {total} connects ({SILENT} silent, {HALF_LINE} half lines): \
         {closed_at_once} closed at once, all {closed} closed by the daemon within \
         {elapsed:.1?}; fds {fds0} -> {fds1} -> {fds2}; VmRSS {rss0} -> {rss1} -> {rss2} KiB"
    );
    ensure!(
        closed == total,
        "only {closed} of {total} pending connections were closed by the daemon"
    );
    ensure!(
        closed_at_once == total - HANDSHAKE_LIMIT,
        "{closed_at_once} closed at once; the handshake limit is {HANDSHAKE_LIMIT}"
    );
    // A few fds of slack: a connection being accepted or closed at the moment of reading.
    ensure!(
        fds1 <= fds0 + HANDSHAKE_LIMIT + 8,
        "daemon held {fds1} fds (limit {HANDSHAKE_LIMIT} handshakes)"
    );
    ensure!(fds2 <= fds0, "fds did not come back: {fds0} -> {fds2}");
    ensure!(
        rss2 < rss0 + 32 * 1024,
        "daemon grew by {} KiB",
        rss2 - rss0
    );
    // New host connects are served again, and the guest still works.
    host_echo(&a, 2320, 2320)?;
    guest_echo(&a, 2330, 2330)?;
    ensure!(s.daemon.is_running(), "daemon exited");
    Ok(())
}

/// Host connects to a guest port whose driver never answers (its interrupts are parked):
/// each is dropped after the handshake timeout with an RST to the guest, the host sees the
/// end, the other VM serves meanwhile, and the guest works again once it wakes up.
#[test]
fn host_connects_the_guest_never_answers() -> Result<()> {
    const UNANSWERED: usize = 300;
    let mut s = setup()?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let (_, fds0) = resources(&s.daemon, "before the unanswered connects")?;
    let _gl = a.guest.listen(7000, SockType::Stream)?;
    a.guest.pause_interrupts()?;
    let mark = s.daemon.log_mark();
    let t0 = Instant::now();
    let mut pending = Vec::with_capacity(UNANSWERED);
    for _ in 0..UNANSWERED {
        let mut c = UnixStream::connect(&a.spec.uds_path)?;
        c.write_all(b"CONNECT 7000\n")?;
        pending.push(c);
    }
    let (_, fds1) = resources(&s.daemon, "with the connects unanswered")?;
    serves(&b, 2400, "unanswered host connects to another VM")?;
    let closed = count_closed(&mut pending, Duration::from_secs(15))?;
    let elapsed = t0.elapsed();
    let line = s
        .daemon
        .wait_log(mark, &["handshake timed out", "Requesting"], PROMPT)
        .context("no log line for the unanswered requests")?;
    eprintln!("[unanswered] {}", line.trim());
    a.guest.resume_interrupts();
    drop(pending);
    let fds2 = wait_fds(&s.daemon, fds0, Duration::from_secs(5))?;
    eprintln!(
        "[unanswered] {UNANSWERED} CONNECTs the guest never answered: {closed} closed by the \
         daemon within {elapsed:.1?}; fds {fds0} -> {fds1} -> {fds2}"
    );
    ensure!(closed == UNANSWERED, "only {closed} of {UNANSWERED} closed");
    ensure!(fds2 <= fds0, "fds did not come back: {fds0} -> {fds2}");
    serves(&a, 2410, "unanswered host connects")?;
    ensure!(s.daemon.is_running(), "daemon exited");
    Ok(())
}

/// Runs a client of the control socket as uid 65534 in a forked child (no allocation after
/// fork): 0 answered, 3 connect refused, 4 closed without an answer, 2 setuid failed.
fn control_client_as_nobody(path: &std::path::Path) -> Result<i32> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    ensure!(
        bytes.len() < addr.sun_path.len(),
        "control socket path too long"
    );
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let req = b"{\"cmd\":\"status\"}\n";
    // SAFETY: the child only makes raw system calls on memory prepared before the fork and
    // ends with _exit, so it neither allocates nor runs destructors of the parent's state.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        // SAFETY: see above; every pointer refers to this stack frame or `req`.
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(2);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if fd < 0 || libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                libc::_exit(3);
            }
            libc::write(fd, req.as_ptr().cast(), req.len());
            let mut b = [0u8; 64];
            let n = libc::read(fd, b.as_mut_ptr().cast(), b.len());
            libc::_exit(if n > 0 { 0 } else { 4 });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(std::io::Error::last_os_error()).context("waitpid");
    }
    ensure!(libc::WIFEXITED(status), "client child died: {status:#x}");
    Ok(libc::WEXITSTATUS(status))
}

/// Another local user cannot use the control socket: the file is 0600, and even when its
/// mode is opened up, SO_PEERCRED turns the client away with a log line. The second user is
/// played by a forked child that drops to uid 65534, which needs root; without root only the
/// file mode and the owner's own access are checked (and the run says so).
#[test]
fn control_socket_refuses_other_users() -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("ctl.sock");
    let sock_s = sock.display().to_string();
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3)],
        &["--control-socket", &sock_s],
    )?;
    let meta = std::fs::metadata(&sock)?;
    ensure!(
        meta.mode() & 0o777 == 0o600,
        "mode {:o}",
        meta.mode() & 0o777
    );
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(meta.uid() == euid, "socket owned by {}", meta.uid());
    let mut own = UnixStream::connect(&sock)?;
    own.write_all(b"{\"cmd\":\"status\"}\n")?;
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&own), &mut answer)?;
    ensure!(answer.contains("\"ok\":true"), "owner's status: {answer}");
    if euid != 0 {
        eprintln!("[peercred] not root: the cross-user connect needs root to play uid 65534");
        return Ok(());
    }
    // Root can traverse the temp dir; uid 65534 must be able to as well.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let code = control_client_as_nobody(&sock)?;
    eprintln!("[peercred] uid 65534 on the 0600 socket: child exit {code}");
    ensure!(
        code == 3,
        "uid 65534 connected to a 0600 socket (child exit {code})"
    );
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))?;
    let mark = s.daemon.log_mark();
    let code = control_client_as_nobody(&sock)?;
    eprintln!("[peercred] uid 65534 on the socket opened to 0666: child exit {code}");
    ensure!(code == 4, "uid 65534 got an answer (child exit {code})");
    let line = s
        .daemon
        .wait_log(mark, &["refused a client of another user"], PROMPT)
        .context("no log line for the refused client")?;
    eprintln!("[peercred] {}", line.trim());
    Ok(())
}
