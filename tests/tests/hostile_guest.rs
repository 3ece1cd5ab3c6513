//! A hostile guest driver (and a hostile VMM at the vhost-user level) against vhost-plug.
//!
//! Every case sends something a correct driver never would, then checks that the daemon
//! logged a clear line about it, answered with RST where the virtio-vsock protocol calls for
//! one, and that afterwards the same VM and a second VM still serve a checksummed echo in
//! both directions. Floods print the daemon's VmRSS before and after.
//!
//! Run with output: `cargo test --release -p vhost-plug-tests --test hostile_guest -- --nocapture`

use std::io::Read;
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use vhost_plug_tests::checks::{resources, scratch, serves};
use vhost_plug_tests::harness::{Setup, TestVm};
use vhost_plug_tests::host::{accept_timeout, host_listen, wait_readable, HOST_TIMEOUT};
use vhost_plug_tests::packet::*;
use vhost_plug_tests::ring::{RawDesc, RawNext};
use vhost_plug_tests::vhost_raw::{self, Region, Reply};
use vhost_plug_tests::{DaemonKind, DriverConfig, SimConfig, SockType, TxLayout, VmSpec};

/// Bound for things the daemon does at once (RST, a log line).
const PROMPT: Duration = Duration::from_secs(5);

fn setup(extra: &[&str]) -> Result<Setup> {
    Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3), VmSpec::new(d, 4)],
        extra,
    )
}

/// Waits for a daemon log line containing all of `needles` written after `mark`.
fn expect_log(s: &Setup, mark: u64, needles: &[&str]) -> Result<String> {
    let line = s.daemon.wait_log(mark, needles, PROMPT).with_context(|| {
        format!(
            "no daemon log line with {needles:?}; daemon log since the case:\n{}",
            tail(&s.daemon.log_since(mark), 4000)
        )
    })?;
    eprintln!("[log] {}", line.trim());
    Ok(line)
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Waits for an RST from the device to guest port `port`.
fn expect_rst(vm: &TestVm, since: u64, port: u32) -> Result<()> {
    vm.guest
        .wait_packet(since, PROMPT, |p| p.op == OP_RST && p.dst_port == port)
        .map(|_| ())
        .with_context(|| format!("no RST to guest port {port} within {PROMPT:?}"))
}

/// The same VM and the other one still serve; the daemon still runs.
fn both_serve(s: &mut Setup, a: &TestVm, b: &TestVm, port: u32, what: &str) -> Result<()> {
    serves(a, port, what)?;
    serves(b, port + 10, what)?;
    ensure!(s.daemon.is_running(), "daemon exited after {what}");
    Ok(())
}

/// A header from `vm`'s CID with `op`, to be modified.
fn hdr(vm: &TestVm, op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
    let mut h = vm.guest.request_header(src_port, HOST_CID, dst_port);
    h.op = op;
    h
}

fn raw(vm: &TestVm, h: &PacketHeader, payload: &[u8]) -> Result<()> {
    vm.guest.send_raw(h, payload, TxLayout::Split)
}

fn guest_mem_size(vm: &TestVm) -> u64 {
    vm.sim.config().mem_size as u64
}

// ----- descriptors ---------------------------------------------------------------------------

#[test]
fn descriptors_outside_guest_memory() -> Result<()> {
    let mut s = setup(&[])?;
    let mut a = s.boot(0)?;
    let b = s.boot(1)?;
    let end = guest_mem_size(&a);
    let bytes = hdr(&a, OP_REQUEST, 5000, 1000).to_bytes();
    let h = scratch(&mut a, &bytes)?;
    let cases: [(&str, Vec<RawDesc>); 3] = [
        (
            "header beyond memory",
            vec![RawDesc::read(end + 4096, 44, None)],
        ),
        (
            "header straddling the end",
            vec![RawDesc::read(end - 20, 44, None)],
        ),
        (
            "payload beyond memory",
            vec![
                RawDesc::read(h, 44, Some(RawNext::Chain(1))),
                RawDesc::read(u64::MAX - 100, 64, None),
            ],
        ),
    ];
    for (what, chain) in cases {
        let mark = s.daemon.log_mark();
        a.guest.send_raw_chain(&chain)?;
        expect_log(
            &s,
            mark,
            &["bad tx descriptor chain", "outside guest memory"],
        )
        .context(what)?;
    }
    both_serve(&mut s, &a, &b, 6000, "descriptors outside guest memory")
}

#[test]
fn looping_and_unterminated_chains() -> Result<()> {
    let mut s = setup(&[])?;
    let mut a = s.boot(0)?;
    let b = s.boot(1)?;
    let _l = host_listen(&a.spec.uds_path, 1001)?;
    let bytes = hdr(&a, OP_REQUEST, 5001, 1001).to_bytes();
    let h = scratch(&mut a, &bytes)?;
    let p = scratch(&mut a, &[0u8; 64])?;
    let cases: [(&str, Vec<RawDesc>); 3] = [
        (
            "descriptor pointing at itself",
            vec![RawDesc::read(h, 44, Some(RawNext::Chain(0)))],
        ),
        (
            "two descriptors pointing at each other",
            vec![
                RawDesc::read(h, 44, Some(RawNext::Chain(1))),
                RawDesc::read(p, 64, Some(RawNext::Chain(0))),
            ],
        ),
        (
            "next index beyond the queue",
            vec![RawDesc::read(h, 44, Some(RawNext::Index(40_000)))],
        ),
    ];
    for (what, chain) in cases {
        let mark = s.daemon.log_mark();
        a.guest.send_raw_chain(&chain)?;
        expect_log(&s, mark, &["bad tx descriptor chain", "cut short"]).context(what)?;
    }
    both_serve(&mut s, &a, &b, 6000, "looping chains")
}

#[test]
fn overlong_chain_is_cut_and_answered_with_rst() -> Result<()> {
    let mut s = setup(&[])?;
    let mut a = s.boot(0)?;
    let b = s.boot(1)?;
    let l = host_listen(&a.spec.uds_path, 1002)?;
    // A REQUEST claiming 100 000 payload bytes over three descriptors: more than the largest
    // packet (64 KiB), so the chain is read only that far and the length does not fit.
    let mut h = hdr(&a, OP_REQUEST, 5002, 1002);
    h.len = 100_000;
    let ha = scratch(&mut a, &h.to_bytes())?;
    let pa = scratch(&mut a, &vec![7u8; 50_000])?;
    let seq = a.guest.log_seq();
    let mark = s.daemon.log_mark();
    a.guest.send_raw_chain(&[
        RawDesc::read(ha, 44, Some(RawNext::Chain(1))),
        RawDesc::read(pa, 50_000, Some(RawNext::Chain(2))),
        RawDesc::read(pa, 50_000, None),
    ])?;
    expect_log(&s, mark, &["payload length beyond the descriptor chain"])?;
    expect_rst(&a, seq, 5002)?;
    ensure!(
        !wait_readable(l.as_raw_fd(), Duration::from_millis(200))?,
        "the overlong REQUEST reached the host listener"
    );
    both_serve(&mut s, &a, &b, 6000, "an overlong chain")
}

#[test]
fn zero_and_huge_lengths() -> Result<()> {
    let mut s = setup(&[])?;
    let mut a = s.boot(0)?;
    let b = s.boot(1)?;
    let _l = host_listen(&a.spec.uds_path, 1003)?;
    let bytes = hdr(&a, OP_REQUEST, 5003, 1003).to_bytes();
    let h = scratch(&mut a, &bytes)?;

    let mark = s.daemon.log_mark();
    a.guest.send_raw_chain(&[RawDesc::read(h, 0, None)])?;
    expect_log(
        &s,
        mark,
        &["malformed tx packet", "shorter than a packet header"],
    )
    .context("zero-length descriptor")?;

    let mark = s.daemon.log_mark();
    a.guest
        .send_raw_chain(&[RawDesc::read(h, u32::MAX, None)])?;
    expect_log(
        &s,
        mark,
        &["bad tx descriptor chain", "outside guest memory"],
    )
    .context("descriptor of 4 GiB")?;

    // Header `len` of 4 GiB - 1 on a header-only chain.
    let mut big = hdr(&a, OP_RW, 5004, 1003);
    big.len = u32::MAX;
    let seq = a.guest.log_seq();
    let mark = s.daemon.log_mark();
    raw(&a, &big, &[])?;
    expect_log(&s, mark, &["payload length beyond the descriptor chain"])
        .context("header len u32::MAX")?;
    expect_rst(&a, seq, 5004)?;
    both_serve(&mut s, &a, &b, 6000, "zero and huge lengths")
}

#[test]
fn header_split_across_descriptors_is_accepted() -> Result<()> {
    let mut s = setup(&[])?;
    let mut a = s.boot(0)?;
    let b = s.boot(1)?;
    let l = host_listen(&a.spec.uds_path, 1004)?;
    let bytes = hdr(&a, OP_REQUEST, 5005, 1004).to_bytes();
    // The header in three pieces (10 + 20 + 14 bytes), at unrelated addresses.
    let p0 = scratch(&mut a, &bytes[..10])?;
    let p1 = scratch(&mut a, &bytes[10..30])?;
    let p2 = scratch(&mut a, &bytes[30..])?;
    let seq = a.guest.log_seq();
    let mark = s.daemon.log_mark();
    a.guest.send_raw_chain(&[
        RawDesc::read(p0, 10, Some(RawNext::Chain(1))),
        RawDesc::read(p1, 20, Some(RawNext::Chain(2))),
        RawDesc::read(p2, 14, None),
    ])?;
    // The daemon parsed it: it connected to the host listener and answered RESPONSE.
    let mut host = accept_timeout(&l, PROMPT).context("split-header REQUEST not forwarded")?;
    a.guest
        .wait_packet(seq, PROMPT, |p| p.op == OP_RESPONSE && p.dst_port == 5005)
        .context("no RESPONSE to the split-header REQUEST")?;
    // The driver has no such socket, so it resets it; the host sees the end.
    host.set_read_timeout(Some(PROMPT))?;
    let mut one = [0u8; 1];
    ensure!(
        matches!(host.read(&mut one), Ok(0) | Err(_)),
        "host end still open"
    );
    let log = s.daemon.log_since(mark);
    ensure!(
        !log.contains("malformed") && !log.contains("bad tx descriptor"),
        "a valid split header was reported: {log}"
    );
    both_serve(&mut s, &a, &b, 6000, "a split header")
}

// ----- header fields ---------------------------------------------------------------------------

#[test]
fn unknown_type_and_operation() -> Result<()> {
    let mut s = setup(&[])?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let l = host_listen(&a.spec.uds_path, 1005)?;

    let mut t = hdr(&a, OP_REQUEST, 5006, 1005);
    t.type_ = 9;
    let seq = a.guest.log_seq();
    let mark = s.daemon.log_mark();
    raw(&a, &t, &[])?;
    expect_log(&s, mark, &["rejecting guest packet", "unknown socket type"])?;
    expect_rst(&a, seq, 5006)?;

    let seq = a.guest.log_seq();
    let mark = s.daemon.log_mark();
    raw(&a, &hdr(&a, 42, 5007, 1005), &[])?;
    expect_log(&s, mark, &["rejecting guest packet", "no such connection"])?;
    expect_rst(&a, seq, 5007)?;

    // An unknown operation on an open connection resets that connection.
    let g = a
        .guest
        .connect(HOST_CID, 1005, SockType::Stream)
        .map_err(|e| anyhow!("{e}"))?;
    let mut host = accept_timeout(&l, HOST_TIMEOUT)?;
    let seq = a.guest.log_seq();
    let mark = s.daemon.log_mark();
    raw(&a, &hdr(&a, 42, g.local_port(), 1005), &[])?;
    expect_log(&s, mark, &["guest protocol violation", "unknown operation"])?;
    expect_rst(&a, seq, g.local_port())?;
    ensure!(g.wait_closed(PROMPT), "connection not closed by the RST");
    host.set_read_timeout(Some(PROMPT))?;
    let mut one = [0u8; 1];
    ensure!(
        matches!(host.read(&mut one), Ok(0) | Err(_)),
        "host end not closed"
    );
    drop(g);
    both_serve(&mut s, &a, &b, 6000, "unknown type and operation")
}

#[test]
fn spoofed_source_cid() -> Result<()> {
    let mut s = setup(&[])?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let l = host_listen(&a.spec.uds_path, 1006)?;
    // A CID nobody has, then the other VM's.
    for (cid, port) in [(99u64, 5008u32), (4, 5009)] {
        let mut h = hdr(&a, OP_REQUEST, port, 1006);
        h.src_cid = cid;
        let seq = a.guest.log_seq();
        let mark = s.daemon.log_mark();
        raw(&a, &h, &[])?;
        expect_log(&s, mark, &["rejecting guest packet", "spoofed source CID"])?;
        expect_rst(&a, seq, port)?;
        ensure!(
            !wait_readable(l.as_raw_fd(), Duration::from_millis(200))?,
            "a REQUEST with src_cid {cid} reached the host"
        );
    }
    both_serve(&mut s, &a, &b, 6000, "spoofed source CIDs")
}

#[test]
fn destination_outside_the_group() -> Result<()> {
    let mut s = Setup::with(
        DaemonKind::VhostPlug,
        |d| {
            vec![
                VmSpec::new(d, 3).groups(&["a"]),
                VmSpec::new(d, 4).groups(&["a"]),
                VmSpec::new(d, 5).groups(&["b"]),
            ]
        },
        &[],
    )?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let c = s.boot(2)?;
    let _lc = c.guest.listen(1007, SockType::Stream)?;
    let seq_c = c.guest.log_seq();
    for (dst, port) in [(5u64, 5010u32), (77, 5011)] {
        let mut h = hdr(&a, OP_REQUEST, port, 1007);
        h.dst_cid = dst;
        let seq = a.guest.log_seq();
        let mark = s.daemon.log_mark();
        raw(&a, &h, &[])?;
        expect_log(
            &s,
            mark,
            &["rejecting guest packet", &format!("dst_cid={dst}")],
        )?;
        expect_rst(&a, seq, port)?;
    }
    ensure!(
        c.guest
            .wait_packet(seq_c, Duration::from_millis(200), |p| p.src_cid == 3)
            .is_none(),
        "cid 5 (group b) received a packet from cid 3 (group a)"
    );
    both_serve(&mut s, &a, &b, 6000, "destinations outside the group")
}

#[test]
fn data_before_request() -> Result<()> {
    let mut s = setup(&[])?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let l = host_listen(&a.spec.uds_path, 1008)?;
    let mut h = hdr(&a, OP_RW, 5012, 1008);
    h.len = 5;
    let seq = a.guest.log_seq();
    let mark = s.daemon.log_mark();
    raw(&a, &h, b"hello")?;
    expect_log(&s, mark, &["rejecting guest packet", "no such connection"])?;
    expect_rst(&a, seq, 5012)?;
    ensure!(
        !wait_readable(l.as_raw_fd(), Duration::from_millis(200))?,
        "RW without a connection reached the host"
    );
    both_serve(&mut s, &a, &b, 6000, "data before REQUEST")
}

// ----- credit ------------------------------------------------------------------------------------

/// The guest ignores the device's `buf_alloc` and keeps sending to a host peer that does not
/// read: the device buffers at most `buf_alloc`, then resets the connection.
#[test]
fn guest_sending_beyond_its_credit_is_reset() -> Result<()> {
    let mut s = setup(&[])?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let l = host_listen(&a.spec.uds_path, 1009)?;
    let g = a
        .guest
        .connect(HOST_CID, 1009, SockType::Stream)
        .map_err(|e| anyhow!("{e}"))?;
    let _host = accept_timeout(&l, HOST_TIMEOUT)?; // never read
    let (rss0, _) = resources(&s.daemon, "before the credit overrun")?;
    let seq = a.guest.log_seq();
    let mark = s.daemon.log_mark();
    let chunk = vec![0x5a; 60_000];
    let mut sent = 0u64;
    for _ in 0..200 {
        let mut h = hdr(&a, OP_RW, g.local_port(), 1009);
        h.len = chunk.len() as u32;
        raw(&a, &h, &chunk)?;
        sent += chunk.len() as u64;
        if a.guest
            .wait_packet(seq, Duration::ZERO, |p| p.op == OP_RST)
            .is_some()
        {
            break;
        }
    }
    expect_log(&s, mark, &["guest protocol violation", "beyond its credit"])?;
    expect_rst(&a, seq, g.local_port())?;
    let (rss1, _) = resources(&s.daemon, "after the credit overrun")?;
    eprintln!(
        "[credit] guest pushed {sent} bytes past a 64 KiB window; VmRSS {rss0} -> {rss1} KiB"
    );
    ensure!(
        rss1 < rss0 + 32 * 1024,
        "daemon grew by {} KiB",
        rss1 - rss0
    );
    drop(g);
    both_serve(&mut s, &a, &b, 6000, "a credit overrun")
}

/// The guest lies about its own receive buffer: `fwd_cnt` moving backwards or past what it
/// was sent, and a 4 GiB `buf_alloc`. The device logs the inconsistency, never buffers host
/// data for the guest, and the connection recovers when the honest driver speaks again.
#[test]
fn guest_credit_lies() -> Result<()> {
    let mut s = setup(&[])?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let l = host_listen(&a.spec.uds_path, 1010)?;
    let g = a
        .guest
        .connect(HOST_CID, 1010, SockType::Stream)
        .map_err(|e| anyhow!("{e}"))?;
    let mut host = accept_timeout(&l, HOST_TIMEOUT)?;
    use std::io::Write;
    host.write_all(&[1u8; 1000])?;
    let mut got = vec![0u8; 1000];
    (&g).read_exact(&mut got)?;
    // The driver's next packet tells the device fwd_cnt = 1000.
    g.send(b"x")?;
    host.read_exact(&mut [0u8; 1])?;

    for (what, fwd_cnt) in [("backwards", 10u32), ("past what was sent", 1_000_000)] {
        let mut h = hdr(&a, OP_CREDIT_UPDATE, g.local_port(), 1010);
        h.fwd_cnt = fwd_cnt;
        let mark = s.daemon.log_mark();
        raw(&a, &h, &[])?;
        expect_log(&s, mark, &["fwd_cnt", "inconsistent"]).context(what)?;
    }
    // A 4 GiB receive buffer: the device still only fills the rx buffers the driver posts.
    let (rss0, _) = resources(&s.daemon, "before the buf_alloc lie")?;
    let mut h = hdr(&a, OP_CREDIT_UPDATE, g.local_port(), 1010);
    h.buf_alloc = u32::MAX;
    h.fwd_cnt = 1000;
    raw(&a, &h, &[])?;
    // The honest driver corrects the record with its next packet; data flows again.
    g.send(b"y")?;
    host.read_exact(&mut [0u8; 1])?;
    host.write_all(b"after")?;
    let mut five = [0u8; 5];
    (&g).read_exact(&mut five)?;
    ensure!(&five == b"after", "got {five:?}");
    let (rss1, _) = resources(&s.daemon, "after the buf_alloc lie")?;
    ensure!(
        rss1 < rss0 + 32 * 1024,
        "daemon grew by {} KiB",
        rss1 - rss0
    );
    drop((g, host));
    both_serve(&mut s, &a, &b, 6000, "credit lies")
}

// ----- floods ------------------------------------------------------------------------------------

#[test]
fn request_flood_hits_max_connections() -> Result<()> {
    const MAX: usize = 32;
    const FLOOD: u32 = 5000;
    let mut s = setup(&["--max-connections", "32"])?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let l = host_listen(&a.spec.uds_path, 1011)?;
    let mut held = Vec::new();
    for _ in 0..MAX {
        let g = a
            .guest
            .connect(HOST_CID, 1011, SockType::Stream)
            .map_err(|e| anyhow!("{e}"))?;
        held.push((g, accept_timeout(&l, HOST_TIMEOUT)?));
    }
    let mark = s.daemon.log_mark();
    match a
        .guest
        .connect_timeout(HOST_CID, 1011, SockType::Stream, PROMPT)
    {
        Err(vhost_plug_tests::ConnectError::Refused) => {}
        Ok(_) => bail!("connect {} beyond the limit was accepted", MAX + 1),
        Err(e) => bail!("connect {} beyond the limit: {e}", MAX + 1),
    }
    expect_log(
        &s,
        mark,
        &["rejecting guest packet", "connection limit reached"],
    )?;

    let (rss0, fds0) = resources(&s.daemon, "before the REQUEST flood")?;
    let seq = a.guest.log_seq();
    let flood_mark = s.daemon.log_mark();
    let flood_start = std::time::Instant::now();
    for i in 0..FLOOD {
        raw(&a, &hdr(&a, OP_REQUEST, 20_000 + i, 1011), &[])?;
    }
    // Every REQUEST is answered with RST, whatever the pace.
    let last = 20_000 + FLOOD - 1;
    a.guest
        .wait_packet(seq, Duration::from_secs(30), |p| {
            p.op == OP_RST && p.dst_port == last
        })
        .context("the last flooded REQUEST got no RST")?;
    let rsts = a
        .guest
        .packets_since(seq)
        .iter()
        .filter(|p| p.dir == vhost_plug_tests::driver::Direction::FromDevice && p.hdr.op == OP_RST)
        .count();
    let (rss1, fds1) = resources(&s.daemon, "after the REQUEST flood")?;
    eprintln!(
        "[flood] {FLOOD} REQUESTs over a limit of {MAX}: {rsts} RSTs; VmRSS {rss0} -> {rss1} KiB, \
         fds {fds0} -> {fds1}"
    );
    ensure!(
        rsts >= FLOOD as usize,
        "only {rsts} RSTs for {FLOOD} REQUESTs"
    );
    // The log is rate-limited (host/src/device/loglimit.rs: a burst of 100 lines, then 10 a
    // second): every REQUEST was answered, far fewer were logged.
    let secs = flood_start.elapsed().as_secs() + 1;
    let logged = s
        .daemon
        .log_since(flood_mark)
        .matches("rejecting guest packet")
        .count() as u64;
    eprintln!("[flood] {logged} of {FLOOD} rejections logged over about {secs} s");
    ensure!(
        logged <= 100 + 10 * secs,
        "{logged} rejection lines in {secs} s"
    );
    // Once tokens come back, the next line says how many were left out.
    let mark = s.daemon.log_mark();
    std::thread::sleep(Duration::from_millis(300));
    raw(&a, &hdr(&a, OP_REQUEST, 19_999, 1011), &[])?;
    expect_log(&s, mark, &["left out log lines", "suppressed="])?;
    ensure!(fds1 <= fds0, "fds grew from {fds0} to {fds1}");
    ensure!(
        rss1 < rss0 + 32 * 1024,
        "daemon grew by {} KiB",
        rss1 - rss0
    );
    // The held connections still work; once closed, new ones are admitted.
    for (g, h) in &mut held {
        g.send(b"k")?;
        h.read_exact(&mut [0u8; 1])?;
    }
    for (g, _) in held {
        g.close()?;
    }
    // A close completes when the device's RST arrives; then the slots are free again.
    let deadline = std::time::Instant::now() + PROMPT;
    while a.guest.socket_count() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        a.guest.socket_count() == 0,
        "{} held connections did not close",
        a.guest.socket_count()
    );
    both_serve(&mut s, &a, &b, 6000, "a REQUEST flood")
}

#[test]
fn avail_head_beyond_the_queue() -> Result<()> {
    let mut s = setup(&[])?;
    let a = s.boot(0)?;
    let b = s.boot(1)?;
    let mark = s.daemon.log_mark();
    a.guest.send_raw_head(600)?;
    expect_log(&s, mark, &["bad tx descriptor chain", "no descriptor"])?;
    both_serve(&mut s, &a, &b, 6000, "a head index beyond the queue")
}

// ----- hostile VMM: vhost-user requests -------------------------------------------------------

/// Sends `code` with `body` and `fds` on `vm`'s vhost-user connection; the daemon must refuse
/// it (NACK or closing the connection), log the end of that frontend session, and serve a
/// new frontend for the same VM.
fn refused_request(
    s: &mut Setup,
    other: &TestVm,
    what: &str,
    code: u32,
    body: &[u8],
    fds: &[i32],
) -> Result<()> {
    let vm = s.boot(0)?;
    let fe = vm.sim.frontend()?.as_raw_fd();
    let mark = s.daemon.log_mark();
    let reply = vhost_raw::request(fe, code, body, fds).context(what.to_string())?;
    eprintln!("[vmm] {what}: {reply:?}");
    ensure!(reply != Reply::Ack(0), "{what}: accepted");
    expect_log(s, mark, &["frontend session ended"]).context(what.to_string())?;
    vm.shutdown();
    let again = TestVm::boot(
        s.vms[0].clone(),
        SimConfig::default(),
        DriverConfig::default(),
    )
    .with_context(|| {
        format!(
            "new frontend after {what}; daemon log:\n{}",
            tail(&s.daemon.log_since(mark), 4000)
        )
    })?;
    serves(&again, 6100, what)?;
    serves(other, 6110, what)?;
    again.shutdown();
    Ok(())
}

#[test]
fn bad_queue_indices() -> Result<()> {
    let mut s = setup(&[])?;
    let other = s.boot(1)?;
    let cases: [(&str, u32, Vec<u8>); 5] = [
        (
            "SET_VRING_NUM for queue 7",
            vhost_raw::SET_VRING_NUM,
            vhost_raw::vring_state_body(7, 256),
        ),
        (
            "SET_VRING_NUM of 0 entries",
            vhost_raw::SET_VRING_NUM,
            vhost_raw::vring_state_body(0, 0),
        ),
        (
            "SET_VRING_NUM of 65535 entries",
            vhost_raw::SET_VRING_NUM,
            vhost_raw::vring_state_body(1, 65535),
        ),
        (
            "SET_VRING_ENABLE for queue 9",
            vhost_raw::SET_VRING_ENABLE,
            vhost_raw::vring_state_body(9, 1),
        ),
        (
            "SET_VRING_ADDR outside the memory table",
            vhost_raw::SET_VRING_ADDR,
            vhost_raw::vring_addr_body(1, 0x10, 0x20, 0x30),
        ),
    ];
    for (what, code, body) in cases {
        refused_request(&mut s, &other, what, code, &body, &[])?;
    }
    Ok(())
}

#[test]
fn bad_memory_tables() -> Result<()> {
    let mut s = setup(&[])?;
    let other = s.boot(1)?;
    let mem = vhost_plug_tests::mem::GuestMem::new(8 << 20)?;
    let memfd = mem.file().as_raw_fd();
    let region = |gpa: u64, size: u64, uaddr: u64| Region {
        guest_phys_addr: gpa,
        memory_size: size,
        user_addr: uaddr,
        mmap_offset: 0,
    };
    let overlapping = vhost_raw::mem_table_body(&[
        region(0, 8 << 20, 0x1000_0000),
        region(4 << 20, 4 << 20, 0x2000_0000),
    ]);
    refused_request(
        &mut s,
        &other,
        "overlapping regions",
        vhost_raw::SET_MEM_TABLE,
        &overlapping,
        &[memfd, memfd],
    )?;
    let zero = vhost_raw::mem_table_body(&[region(0, 0, 0x1000_0000)]);
    refused_request(
        &mut s,
        &other,
        "a zero-size region",
        vhost_raw::SET_MEM_TABLE,
        &zero,
        &[memfd],
    )?;
    let (r, _w) = std::io::pipe()?;
    let unmappable = vhost_raw::mem_table_body(&[region(0, 8 << 20, 0x1000_0000)]);
    refused_request(
        &mut s,
        &other,
        "a region whose fd cannot be mapped",
        vhost_raw::SET_MEM_TABLE,
        &unmappable,
        &[r.as_raw_fd()],
    )?;
    let beyond = vhost_raw::mem_table_body(&[Region {
        mmap_offset: 1 << 40,
        ..region(0, 8 << 20, 0x1000_0000)
    }]);
    refused_request(
        &mut s,
        &other,
        "a region beyond the end of its file",
        vhost_raw::SET_MEM_TABLE,
        &beyond,
        &[memfd],
    )?;
    Ok(())
}
