//! Every major VMM as a frontend (issue 14): each profile of `vhost_plug_tests::frontends`
//! replays one VMM's messages against the daemon with its default settings, and a simulated
//! Linux driver runs on top: data both ways with checksums, SEQPACKET where the VMM lets it
//! through (and its absence where not), the VMM exiting and a new one connecting, save ->
//! restore into a second daemon, Cloud Hypervisor's dirty-logged migration. Also: config reads
//! outside the config space, what crosvm's 32768-entry rings cost the daemon, and a host
//! program written for Firecracker's vsock working unchanged.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test frontends -- --nocapture`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost_plug_tests::checks::{guest_echo_on, host_echo_on};
use vhost_plug_tests::data::Pattern;
use vhost_plug_tests::frontends::{ProfileVm, ProfileVmm, Vmm};
use vhost_plug_tests::harness::Setup;
use vhost_plug_tests::host::{
    accept_timeout, host_connect, host_listen, host_seqpacket_connect, SeqpacketListener,
    HOST_TIMEOUT,
};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::{DaemonKind, Guest, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(10);
const CID: u64 = 3;

fn daemon(args: &[&str]) -> Result<Setup> {
    Setup::with(
        DaemonKind::VhostPlug,
        |dir| vec![VmSpec::new(dir, CID)],
        args,
    )
}

fn with_stderr<T>(r: Result<T>, s: &Setup) -> Result<T> {
    r.with_context(|| format!("daemon stderr:\n{}", s.daemon.stderr()))
}

fn boot(vmm: Vmm, s: &Setup) -> Result<ProfileVm> {
    let vm = ProfileVm::boot(vmm.profile(), &s.vms[0].socket)
        .with_context(|| format!("booting under {}", vmm.profile().name))?;
    ensure!(
        vm.vmm.guest_cid() == CID,
        "guest CID read through the VMM's config path: {}",
        vm.vmm.guest_cid()
    );
    Ok(vm)
}

/// Checksummed echoes both ways (300 KiB each: many rx buffers and credit windows).
fn data_both_ways(guest: &Guest, spec: &VmSpec, port: u32) -> Result<()> {
    guest_echo_on(guest, spec, port, u64::from(port)).context("guest -> host echo")?;
    host_echo_on(guest, spec, port + 1, u64::from(port) + 1).context("host -> guest echo")?;
    Ok(())
}

// ----- per profile: data, SEQPACKET, reconnect -------------------------------------------

fn data(vmm: Vmm) -> Result<()> {
    let s = daemon(&[])?;
    with_stderr(
        (|| {
            let vm = boot(vmm, &s)?;
            let want = vmm.profile().guest_features(vm.vmm.offered_features());
            ensure!(
                vm.vmm.guest_features() == want,
                "guest features {:#x}, want {want:#x}",
                vm.vmm.guest_features()
            );
            data_both_ways(&vm.guest, &s.vms[0], 5000)?;
            vm.guest.health()?;
            vm.quit()
        })(),
        &s,
    )
}

const SEQ_SIZES: [usize; 4] = [1, 4096, 4097, 60_000];

fn seqpacket(vmm: Vmm) -> Result<()> {
    let s = daemon(&[])?;
    let spec = s.vms[0].clone();
    with_stderr(
        (|| {
            let vm = boot(vmm, &s)?;
            if !vmm.profile().passes_seqpacket() {
                ensure!(
                    !vm.guest.seqpacket_enabled(),
                    "the guest got SEQPACKET through a VMM that masks it"
                );
                // A host SEQPACKET connect has no guest transport to reach: refused, not hung.
                let r = host_seqpacket_connect(&spec.uds_path, 1500);
                ensure!(
                    r.is_err(),
                    "host SEQPACKET connect succeeded without SEQPACKET negotiated"
                );
                data_both_ways(&vm.guest, &spec, 5100)?;
                return vm.quit();
            }
            ensure!(vm.guest.seqpacket_enabled(), "SEQPACKET not negotiated");
            let mut buf = vec![0u8; 128 * 1024];
            // Guest -> host.
            let hl = SeqpacketListener::for_port(&spec.uds_path, 1400)?;
            let gs = vm
                .guest
                .connect(HOST_CID, 1400, SockType::Seqpacket)
                .map_err(|e| anyhow!("guest SEQPACKET connect: {e}"))?;
            let host = hl.accept(PROMPT)?;
            for (i, size) in SEQ_SIZES.into_iter().enumerate() {
                let m = Pattern::bytes(i as u64, size);
                gs.send_msg(&m, true)?;
                let (n, trunc) = host.recv(&mut buf, PROMPT)?;
                ensure!(
                    n == size && !trunc && buf[..n] == m[..],
                    "message {i}: {size} bytes sent, host got {n}"
                );
                host.send(&m)?;
                let r = gs.recv_msg(&mut buf)?.context("guest got EOF")?;
                ensure!(
                    r.len == size && buf[..size] == m[..],
                    "reply {i}: {size} bytes sent, guest got {r:?}"
                );
            }
            // Host -> guest.
            let gl = vm.guest.listen(1401, SockType::Seqpacket)?;
            let (host, _) = host_seqpacket_connect(&spec.uds_path, 1401)?;
            let gs = gl.accept(PROMPT)?;
            let m = Pattern::bytes(99, 30_000);
            host.send(&m)?;
            let r = gs.recv_msg(&mut buf)?.context("guest got EOF")?;
            ensure!(r.len == m.len() && buf[..m.len()] == m[..], "got {r:?}");
            vm.guest.health()?;
            vm.quit()
        })(),
        &s,
    )
}

/// The VMM exits with connections open: host peers see them end; a new VMM of the same kind
/// connects to the same socket and everything works again.
fn reconnect(vmm: Vmm) -> Result<()> {
    let s = daemon(&[])?;
    let spec = s.vms[0].clone();
    with_stderr(
        (|| {
            let vm = boot(vmm, &s)?;
            let l = host_listen(&spec.uds_path, 6000)?;
            let _g = vm
                .guest
                .connect(HOST_CID, 6000, SockType::Stream)
                .map_err(|e| anyhow!("connect: {e}"))?;
            let mut h = accept_timeout(&l, HOST_TIMEOUT)?;
            vm.quit()?;
            h.set_read_timeout(Some(PROMPT))?;
            let mut b = [0u8; 16];
            match h.read(&mut b) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => bail!("host peer after the VMM exited: {other:?}, want EOF"),
            }
            let vm = boot(vmm, &s).context("second VMM")?;
            data_both_ways(&vm.guest, &spec, 6100)?;
            vm.guest.health()?;
            vm.quit()
        })(),
        &s,
    )
}

// ----- save -> restore into a second daemon --------------------------------------------------

/// The guest runs with connections both ways and data in flight on the source; the VMM
/// suspends and saves; its restore sequence loads the state into a second daemon on the same
/// guest memory and rings, at the saved bases. Nothing is lost: the destination continues each
/// ring where the source stopped (the driver sees no ring fault), the backend-owned event
/// queue delivers one TRANSPORT_RESET (the old connections end by it, host peers see EOF), the
/// CID re-read through the VMM is the same, and new connections move checksummed data both
/// ways.
fn save_restore(vmm: Vmm) -> Result<()> {
    let src = daemon(&[])?;
    let dst = daemon(&[])?;
    let res = (|| -> Result<()> {
        let mut vm = boot(vmm, &src)?;
        data_both_ways(&vm.guest, &src.vms[0], 7000)?;
        let l = host_listen(&src.vms[0].uds_path, 7100)?;
        let gs = vm
            .guest
            .connect(HOST_CID, 7100, SockType::Stream)
            .map_err(|e| anyhow!("connect: {e}"))?;
        let mut h = accept_timeout(&l, HOST_TIMEOUT)?;
        h.write_all(&Pattern::bytes(1, 100_000))?;
        let mut got = vec![0u8; 100_000];
        (&gs).read_exact(&mut got)?;
        ensure!(
            got == Pattern::bytes(1, 100_000),
            "data before the save differs"
        );

        vm.guest.pause_interrupts()?;
        let bases = vm.vmm.suspend()?;
        let blob = vm.vmm.save()?;
        let mut target = vm
            .vmm
            .restore_into(&dst.vms[0].socket, &blob, &bases)
            .context("restore sequence on the second daemon")?;
        vm.guest.set_cid_source(target.cid_source()?);
        vm.guest.resume_interrupts();
        eprintln!(
            "[frontends] {}: state {} bytes, bases {bases:?}",
            vmm.profile().name,
            blob.len()
        );
        vm.vmm.disconnect();
        h.set_read_timeout(Some(PROMPT))?;
        let mut b = [0u8; 16];
        ensure!(
            matches!(h.read(&mut b), Ok(0)),
            "host peer of the source connection did not see EOF"
        );
        ensure!(
            vm.guest.wait_events(0, PROMPT),
            "no TRANSPORT_RESET after the restore"
        );
        ensure!(gs.wait_closed(PROMPT), "old connection still open");
        ensure!(vm.guest.guest_cid() == CID, "CID {}", vm.guest.guest_cid());
        data_both_ways(&vm.guest, &dst.vms[0], 7200).context("on the second daemon")?;
        vm.guest.health()?;
        vm.guest.stop();
        target.quit(true)
    })();
    with_stderr(with_stderr(res, &src), &dst)
}

// ----- Cloud Hypervisor: dirty-logged live migration ---------------------------------------

/// Cloud Hypervisor's migration: dirty logging on (log base, LOG_ALL, logged ring addresses),
/// host -> guest traffic, the log read (a new one swapped in), pause, save, the final log,
/// restore into a second daemon. Every page the daemon wrote during the round (the payload in
/// rx buffers and the used rings) is marked; the guest then works on the destination.
fn migrate_with_dirty_log(vmm: Vmm) -> Result<()> {
    let src = daemon(&[])?;
    let dst = daemon(&[])?;
    let res = (|| -> Result<()> {
        let mut vm = boot(vmm, &src)?;
        let gl = vm.guest.listen(8000, SockType::Stream)?;
        let (mut h, _) = host_connect(&src.vms[0].uds_path, 8000)?;
        let g = gl.accept(PROMPT)?;
        vm.vmm.start_dirty_log()?;
        // Settle, then take the first log so the next one covers exactly the transfer.
        std::thread::sleep(Duration::from_millis(100));
        vm.guest.pause_interrupts()?;
        let before = snapshot(&vm)?;
        vm.vmm.take_dirty_log()?;
        vm.guest.resume_interrupts();
        let data = vec![0x5au8; 1 << 20];
        let mut got = vec![0u8; data.len()];
        std::thread::scope(|sc| -> Result<()> {
            let w = sc.spawn(|| h.write_all(&data));
            (&g).read_exact(&mut got).context("guest read")?;
            w.join()
                .map_err(|_| anyhow!("writer panicked"))?
                .context("host write")
        })?;
        ensure!(got == data, "bytes changed on the way");
        vm.guest.pause_interrupts()?;
        let bases = vm.vmm.suspend()?;
        let after = snapshot(&vm)?;
        let log = vm.vmm.take_dirty_log()?;
        let dirty = log.dirty_pages()?;
        let run = [0x5au8; 64];
        let missing: Vec<usize> = before
            .chunks(4096)
            .zip(after.chunks(4096))
            .enumerate()
            .filter(|(_, (a, b))| a != b && b.windows(64).any(|w| w == run))
            .map(|(p, _)| p)
            .filter(|p| !dirty.contains(&(*p as u64)))
            .collect();
        eprintln!(
            "[frontends] {}: {} pages marked dirty during a 1 MiB transfer",
            vmm.profile().name,
            dirty.len()
        );
        ensure!(!dirty.is_empty(), "nothing logged during a 1 MiB transfer");
        ensure!(
            missing.is_empty(),
            "pages holding payload the daemon wrote but did not log: {missing:?}"
        );
        let blob = vm.vmm.save()?;
        vm.vmm.take_dirty_log()?;
        let mut target = vm.vmm.restore_into(&dst.vms[0].socket, &blob, &bases)?;
        vm.guest.set_cid_source(target.cid_source()?);
        vm.guest.resume_interrupts();
        vm.vmm.disconnect();
        ensure!(
            vm.guest.wait_events(0, PROMPT),
            "no TRANSPORT_RESET after the migration"
        );
        data_both_ways(&vm.guest, &dst.vms[0], 8100).context("on the destination")?;
        vm.guest.health()?;
        vm.guest.stop();
        target.quit(true)
    })();
    with_stderr(with_stderr(res, &src), &dst)
}

fn snapshot(vm: &ProfileVm) -> Result<Vec<u8>> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
    let mem = vm.vmm.memory();
    let len = mem.last_addr().0 as usize + 1;
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(0))
        .context("reading guest memory")?;
    Ok(v)
}

macro_rules! profile_tests {
    ($($m:ident => $vmm:expr;)*) => {$(
        mod $m {
            use super::*;
            #[test]
            fn data_both_ways_with_checksums() -> Result<()> {
                data($vmm)
            }
            #[test]
            fn seqpacket_as_the_vmm_allows() -> Result<()> {
                seqpacket($vmm)
            }
            #[test]
            fn vmm_exit_and_a_new_vmm() -> Result<()> {
                reconnect($vmm)
            }
        }
    )*};
}

profile_tests! {
    qemu_7_2 => Vmm::Qemu7_2;
    qemu_master => Vmm::QemuMaster;
    crosvm => Vmm::Crosvm;
    cloud_hypervisor_52 => Vmm::CloudHypervisor52;
    cloud_hypervisor_53 => Vmm::CloudHypervisor53;
}

#[test]
fn crosvm_save_restore_into_a_second_daemon() -> Result<()> {
    save_restore(Vmm::Crosvm)
}

#[test]
fn cloud_hypervisor_52_snapshot_restore_into_a_second_daemon() -> Result<()> {
    save_restore(Vmm::CloudHypervisor52)
}

#[test]
fn cloud_hypervisor_53_snapshot_restore_into_a_second_daemon() -> Result<()> {
    save_restore(Vmm::CloudHypervisor53)
}

#[test]
fn cloud_hypervisor_52_migration_with_dirty_log() -> Result<()> {
    migrate_with_dirty_log(Vmm::CloudHypervisor52)
}

#[test]
fn cloud_hypervisor_53_migration_with_dirty_log() -> Result<()> {
    migrate_with_dirty_log(Vmm::CloudHypervisor53)
}

// ----- ring size ---------------------------------------------------------------------------

/// `--queue-size` keeps its drop-in meaning, the largest ring accepted: with 1024, crosvm's
/// 32768-entry rings are refused (and the daemon serves the next VMM), Cloud Hypervisor's 256
/// work.
#[test]
fn queue_size_option_is_the_largest_ring_accepted() -> Result<()> {
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |dir| {
            let mut spec = VmSpec::new(dir, CID);
            spec.queue_size = Some(1024);
            vec![spec]
        },
        &[],
    )?;
    let spec = s.vms[0].clone();
    let res = (|| -> Result<()> {
        let mark = s.daemon.log_mark();
        // crosvm waits for no reply, so its boot may look fine; the daemon refuses the rings
        // and ends that session.
        drop(ProfileVm::boot(Vmm::Crosvm.profile(), &spec.socket));
        ensure!(
            s.daemon
                .wait_log(
                    mark,
                    &["requested queue size 32768 out of range (1-1024)"],
                    PROMPT
                )
                .is_some(),
            "32768-entry rings not refused with queue-size=1024"
        );
        let vm = ProfileVm::boot(Vmm::CloudHypervisor53.profile(), &spec.socket)?;
        data_both_ways(&vm.guest, &spec, 9000)?;
        vm.quit()
    })();
    with_stderr(res, &s)
}

/// `Anonymous` memory of a process (`/proc/PID/smaps_rollup`), in KiB: what it allocated itself,
/// not the guest memory it maps.
fn anon_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no Anonymous line in {path}"))
}

/// What a VM with crosvm's 32768-entry rings costs the daemon, next to one with 256-entry
/// rings: the same traffic through each, then the daemon's own (anonymous) memory and its RSS.
/// The daemon keeps nothing per ring entry, so the difference stays well under the size of the
/// rings themselves (2.4 MiB for three 32768-entry split rings).
#[test]
fn crosvm_ring_size_costs_the_daemon_no_memory_per_entry() -> Result<()> {
    let mut readings = Vec::new();
    for vmm in [Vmm::CloudHypervisor53, Vmm::Crosvm] {
        let s = daemon(&[])?;
        let r = (|| -> Result<(u64, u64)> {
            let vm = boot(vmm, &s)?;
            for i in 0..4 {
                data_both_ways(&vm.guest, &s.vms[0], 9100 + 2 * i)?;
            }
            std::thread::sleep(Duration::from_millis(200));
            let pid = s.daemon.pid().context("daemon gone")?;
            let anon = anon_kib(pid)?;
            let rss = s.daemon.rss_kib()?;
            vm.quit()?;
            Ok((anon, rss))
        })();
        let (anon, rss) = with_stderr(r, &s)?;
        eprintln!(
            "[frontends] {} rings of {}: daemon Anonymous {anon} KiB, VmRSS {rss} KiB",
            vmm.profile().backend_queues,
            vmm.profile().ring_size
        );
        readings.push(anon);
    }
    let extra = readings[1].saturating_sub(readings[0]);
    ensure!(
        extra < 2 * 1024,
        "32768-entry rings cost the daemon {extra} KiB more anonymous memory than 256-entry ones"
    );
    Ok(())
}

// ----- config space ---------------------------------------------------------------------

/// Guest reads of the device-config window beyond `guest_cid` reach the daemon under crosvm
/// and Cloud Hypervisor. Every read answers exactly the requested size (CID bytes where it
/// overlaps the 8-byte space, zeros past it), so Cloud Hypervisor does not panic and crosvm
/// fills the guest's buffer; the session keeps working.
#[test]
fn config_reads_outside_the_config_space_answer_the_requested_size() -> Result<()> {
    let s = daemon(&[])?;
    with_stderr(
        (|| {
            for vmm in [Vmm::CloudHypervisor53, Vmm::Crosvm] {
                let mut vm = boot(vmm, &s)?;
                let flags = if vmm == Vmm::Crosvm {
                    VhostUserConfigFlags::WRITABLE
                } else {
                    VhostUserConfigFlags::empty()
                };
                let cid = CID.to_le_bytes();
                for (off, len) in [(8u32, 4u32), (6, 4), (0, 256), (0x100, 4), (0xff0, 16)] {
                    let mut want = vec![0u8; len as usize];
                    for (i, b) in want.iter_mut().enumerate() {
                        if let Some(c) = cid.get(off as usize + i) {
                            *b = *c;
                        }
                    }
                    let (_, got) = vm
                        .vmm
                        .frontend()?
                        .get_config(off, len, flags, &vec![0u8; len as usize])
                        .map_err(|e| {
                            anyhow!("{}: GET_CONFIG({off}, {len}): {e}", vmm.profile().name)
                        })?;
                    ensure!(
                        got == want,
                        "GET_CONFIG({off}, {len}) = {got:?}, want {want:?}"
                    );
                }
                data_both_ways(&vm.guest, &s.vms[0], 9300)?;
                vm.quit()?;
            }
            Ok(())
        })(),
        &s,
    )
}

// ----- Firecracker's host protocol ----------------------------------------------------------

/// A host program written for Firecracker's vsock (docs/vsock.md), with nothing from this
/// test suite: host-initiated, connect to `uds_path`, send `CONNECT <port>\n`, read
/// `OK <assigned_hostside_port>\n`; guest-initiated, listen on `<uds_path>_<port>`.
mod firecracker_host_program {
    use super::*;

    pub fn connect(uds_path: &Path, port: u32) -> std::io::Result<(BufReader<UnixStream>, u32)> {
        let mut s = UnixStream::connect(uds_path)?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let port = line
            .strip_prefix("OK ")
            .and_then(|p| p.strip_suffix('\n'))
            .and_then(|p| p.parse::<u32>().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an OK line: {line:?}")))?;
        Ok((r, port))
    }

    pub fn listen(uds_path: &Path, port: u32) -> std::io::Result<UnixListener> {
        let mut p = uds_path.as_os_str().to_owned();
        p.push(format!("_{port}"));
        UnixListener::bind(p)
    }
}

#[test]
fn a_host_program_written_for_firecracker_works_unchanged() -> Result<()> {
    let s = daemon(&[])?;
    let uds = s.vms[0].uds_path.clone();
    with_stderr(
        (|| {
            let vm = boot(Vmm::CloudHypervisor53, &s)?;
            // Host -> guest port 52, as in Firecracker's example.
            let gl = vm.guest.listen(52, SockType::Stream)?;
            let (mut r, assigned) = firecracker_host_program::connect(&uds, 52)?;
            let g = gl.accept(PROMPT)?;
            ensure!(
                g.peer_port() == assigned,
                "OK {assigned}, but the guest sees host port {}",
                g.peer_port()
            );
            r.get_mut().write_all(b"ping\n")?;
            let mut b = [0u8; 5];
            (&g).read_exact(&mut b)?;
            ensure!(&b == b"ping\n", "guest read {b:?}");
            g.send(b"pong\n")?;
            let mut line = String::new();
            r.read_line(&mut line)?;
            ensure!(line == "pong\n", "host read {line:?}");
            // Nobody listening on the guest port: the host connection is terminated, no OK.
            let mut c = UnixStream::connect(&uds)?;
            c.write_all(b"CONNECT 53\n")?;
            c.set_read_timeout(Some(PROMPT))?;
            let mut rest = Vec::new();
            let n = c.read_to_end(&mut rest);
            ensure!(
                matches!(n, Ok(0)) || n.is_err(),
                "connect to an unbound guest port answered {:?}",
                String::from_utf8_lossy(&rest)
            );
            // Guest -> host port 52: the host listens on <uds_path>_52.
            let l = firecracker_host_program::listen(&uds, 52)?;
            let gs = vm
                .guest
                .connect(HOST_CID, 52, SockType::Stream)
                .map_err(|e| anyhow!("guest connect: {e}"))?;
            l.set_nonblocking(false)?;
            let mut h = accept_timeout(&l, HOST_TIMEOUT)?;
            gs.send(b"hello from the guest")?;
            let mut b = [0u8; 20];
            h.read_exact(&mut b)?;
            ensure!(&b == b"hello from the guest", "host read {b:?}");
            vm.guest.health()?;
            vm.quit()
        })(),
        &s,
    )
}

/// A `ProfileVmm` that never activates keeps the daemon waiting without harm, and the CID
/// read through each VMM's config path is right before any ring exists.
#[test]
fn every_profile_reads_the_cid_before_activation() -> Result<()> {
    let s = daemon(&[])?;
    with_stderr(
        (|| {
            for vmm in Vmm::ALL {
                let v = ProfileVmm::connect(vmm.profile(), &s.vms[0].socket)?;
                ensure!(
                    v.guest_cid() == CID,
                    "{}: CID {}",
                    vmm.profile().name,
                    v.guest_cid()
                );
                drop(v);
            }
            Ok(())
        })(),
        &s,
    )
}

// ----- the messages on the wire ---------------------------------------------------------

/// vhost-user request codes, by name.
fn request_name(code: u32) -> &'static str {
    match code {
        1 => "GET_FEATURES",
        2 => "SET_FEATURES",
        3 => "SET_OWNER",
        5 => "SET_MEM_TABLE",
        6 => "SET_LOG_BASE",
        8 => "SET_VRING_NUM",
        9 => "SET_VRING_ADDR",
        10 => "SET_VRING_BASE",
        11 => "GET_VRING_BASE",
        12 => "SET_VRING_KICK",
        13 => "SET_VRING_CALL",
        15 => "GET_PROTOCOL_FEATURES",
        16 => "SET_PROTOCOL_FEATURES",
        17 => "GET_QUEUE_NUM",
        18 => "SET_VRING_ENABLE",
        24 => "GET_CONFIG",
        42 => "SET_DEVICE_STATE_FD",
        43 => "CHECK_DEVICE_STATE",
        _ => "OTHER",
    }
}

/// What each VMM sends from startup through a booted guest to its exit, written out from its
/// source (the files the profile cites); `*` marks requests that carry `NEED_REPLY`.
fn expected_wire(vmm: Vmm) -> Vec<String> {
    let mut v: Vec<&str> = Vec::new();
    let rep = |v: &mut Vec<&str>, n: usize, items: &[&'static str]| {
        for _ in 0..n {
            v.extend_from_slice(items);
        }
    };
    match vmm {
        Vmm::Qemu7_2 | Vmm::QemuMaster => {
            let en = if vmm == Vmm::QemuMaster {
                "SET_VRING_ENABLE*"
            } else {
                "SET_VRING_ENABLE"
            };
            // vhost_dev_init + vuv_device_realize.
            v.extend([
                "GET_FEATURES",
                "GET_PROTOCOL_FEATURES",
                "SET_PROTOCOL_FEATURES",
                "GET_QUEUE_NUM",
                "SET_OWNER",
                "GET_FEATURES",
                "SET_VRING_CALL",
                "SET_VRING_CALL",
                "GET_CONFIG",
                // vhost_dev_start.
                "SET_FEATURES",
                "SET_MEM_TABLE*",
            ]);
            rep(
                &mut v,
                2,
                &[
                    "SET_VRING_NUM",
                    "SET_VRING_BASE",
                    "SET_VRING_ADDR",
                    "SET_VRING_KICK",
                ],
            );
            rep(&mut v, 2, &[en]);
            // vhost_vsock_common_start unmasks.
            rep(&mut v, 2, &["SET_VRING_CALL"]);
            // Exit: vhost_dev_stop.
            rep(&mut v, 2, &[en]);
            rep(&mut v, 2, &["GET_VRING_BASE"]);
        }
        Vmm::Crosvm => {
            v.extend([
                "SET_OWNER",
                "GET_FEATURES",
                "GET_PROTOCOL_FEATURES",
                "SET_PROTOCOL_FEATURES",
                "GET_QUEUE_NUM",
                // ack_features, then the guest's two 4-byte reads of guest_cid.
                "SET_FEATURES",
                "GET_CONFIG",
                "GET_CONFIG",
                // activate.
                "SET_MEM_TABLE",
            ]);
            rep(
                &mut v,
                3,
                &[
                    "SET_VRING_NUM",
                    "SET_VRING_ADDR",
                    "SET_VRING_BASE",
                    "SET_VRING_CALL",
                    "SET_VRING_KICK",
                    "SET_VRING_ENABLE",
                ],
            );
        }
        Vmm::CloudHypervisor52 | Vmm::CloudHypervisor53 => {
            v.extend([
                "SET_OWNER",
                "GET_FEATURES",
                "GET_PROTOCOL_FEATURES",
                "SET_PROTOCOL_FEATURES",
                "GET_QUEUE_NUM*",
                "GET_CONFIG*",
                "GET_CONFIG*",
                "SET_FEATURES*",
                "SET_MEM_TABLE*",
            ]);
            rep(&mut v, 3, &["SET_VRING_NUM*"]);
            rep(
                &mut v,
                3,
                &[
                    "SET_VRING_ADDR*",
                    "SET_VRING_BASE*",
                    "SET_VRING_CALL*",
                    "SET_VRING_KICK*",
                ],
            );
            rep(&mut v, 3, &["SET_VRING_ENABLE*"]);
        }
    }
    v.into_iter().map(String::from).collect()
}

#[test]
fn every_profile_sends_its_vmms_messages_in_order_with_its_flags() -> Result<()> {
    use vhost_plug_tests::frontends::tap::{Tap, NEED_REPLY};
    let s = daemon(&[])?;
    with_stderr(
        (|| {
            for vmm in Vmm::ALL {
                let tap_path = s.path().join(format!("tap-{vmm:?}.sock"));
                let tap = Tap::start(&tap_path, &s.vms[0].socket)?;
                let vm = ProfileVm::boot(vmm.profile(), tap.path())?;
                vm.quit()?;
                let got: Vec<String> = tap
                    .finish()
                    .iter()
                    .map(|m| {
                        let star = if m.flags & NEED_REPLY != 0 { "*" } else { "" };
                        format!("{}{star}", request_name(m.request))
                    })
                    .collect();
                let want = expected_wire(vmm);
                ensure!(
                    got == want,
                    "{}: on the wire\n{got:?}\nwant\n{want:?}",
                    vmm.profile().name
                );
            }
            Ok(())
        })(),
        &s,
    )
}
