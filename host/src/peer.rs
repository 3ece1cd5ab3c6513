//! Who is at the host end of a unix-socket connection: the kernel's answer when the daemon
//! accepts it. A leaf module (std and libc only): the device reads it at accept, the gate puts
//! it into the policy request.
//!
//! The cgroup is the race-prone part: SO_PEERCRED gives a pid, and by the time the daemon
//! reads `/proc/<pid>/cgroup` that process may have exited and another taken its pid. So the
//! daemon holds a pidfd of the peer (SO_PEERPIDFD, Linux 6.5, which the kernel takes at
//! `connect()`; else `pidfd_open` on the SO_PEERCRED pid, Linux 5.3), reads the file, and
//! then checks through the pidfd that the process is still running: a running process still
//! owns its pid, so the file read was its own. A process that exited gets no cgroup.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Longest cgroup path reported; a longer one is left out.
pub const MAX_CGROUP: usize = 4096;
/// Longest security label reported; a longer one is left out.
pub const MAX_LABEL: usize = 255;
/// `/proc/<pid>/cgroup` is read up to this many bytes (one line per v1 hierarchy plus the v2
/// line).
const MAX_CGROUP_FILE: usize = 16 * 1024;
/// `SO_PEERPIDFD` (Linux 6.5; not in every libc crate version).
const SO_PEERPIDFD: libc::c_int = 77;

/// The identity of a host program connected to a VM's unix socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Process id in the daemon's pid namespace (0: not visible there).
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// cgroup v2 path (`/system.slice/x.service`), when it could be read race-free.
    pub cgroup: Option<String>,
    /// SO_PEERSEC label (SELinux context, AppArmor profile), when a security module gives one.
    pub security_label: Option<String>,
}

impl PeerIdentity {
    /// Reads the identity of the peer of the connected unix socket `fd`. `None` when the
    /// kernel gives no credentials (not a unix socket).
    pub fn of_socket(fd: RawFd) -> Option<Self> {
        let cred = peer_cred(fd)?;
        let pid = u32::try_from(cred.pid).unwrap_or(0);
        let cgroup = if pid == 0 {
            None
        } else {
            peer_pidfd(fd, cred.pid).and_then(|pidfd| cgroup_of(pid, &pidfd))
        };
        Some(PeerIdentity {
            pid,
            uid: cred.uid,
            gid: cred.gid,
            cgroup,
            security_label: peer_label(fd),
        })
    }
}

fn peer_cred(fd: RawFd) -> Option<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a valid, writable ucred and `len` holds its size; the kernel writes at
    // most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && len as usize == std::mem::size_of::<libc::ucred>()).then_some(cred)
}

/// A pidfd of the peer: the one the kernel took at `connect()` if it offers it, else one
/// opened now for `pid`.
fn peer_pidfd(fd: RawFd, pid: libc::pid_t) -> Option<OwnedFd> {
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `pidfd` is a writable int and `len` its size; on success the kernel stores a
    // new file descriptor there, which we then own.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut pidfd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 && pidfd >= 0 {
        // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
        return Some(unsafe { OwnedFd::from_raw_fd(pidfd) });
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return None;
    }
    // SAFETY: a new descriptor the kernel returned; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable once it has).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, timeout 0 (no wait).
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r != 0
}

/// The cgroup v2 path of `pid`, read while `pidfd` pins which process that is.
fn cgroup_of(pid: u32, pidfd: &OwnedFd) -> Option<String> {
    if exited(pidfd) {
        return None;
    }
    let file = std::fs::File::open(format!("/proc/{pid}/cgroup")).ok()?;
    let mut text = String::new();
    file.take(MAX_CGROUP_FILE as u64)
        .read_to_string(&mut text)
        .ok()?;
    let path = parse_cgroup_v2(&text)?;
    if exited(pidfd) {
        return None;
    }
    Some(path.to_string())
}

/// The path of the unified (v2) hierarchy line `0::/path` of a `/proc/<pid>/cgroup` text.
fn parse_cgroup_v2(text: &str) -> Option<&str> {
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    (path.starts_with('/') && path.len() <= MAX_CGROUP).then_some(path)
}

fn peer_label(fd: RawFd) -> Option<String> {
    let mut buf = [0u8; MAX_LABEL + 1];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is writable for `len` bytes; the kernel writes at most that many (and
    // fails with ERANGE for a longer label).
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERSEC,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    let got = &buf[..(len as usize).min(buf.len())];
    let got = got.split(|&b| b == 0).next().unwrap_or_default();
    if got.is_empty() || got.len() > MAX_LABEL {
        return None;
    }
    String::from_utf8(got.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn cgroup_lines() {
        assert_eq!(
            parse_cgroup_v2("0::/system.slice/a.service\n"),
            Some("/system.slice/a.service")
        );
        assert_eq!(
            parse_cgroup_v2("12:pids:/x\n1:name=systemd:/y\n0::/user.slice\n"),
            Some("/user.slice")
        );
        assert_eq!(parse_cgroup_v2("12:pids:/x\n"), None);
        assert_eq!(parse_cgroup_v2("0::relative\n"), None);
        let long = format!("0::/{}\n", "a".repeat(MAX_CGROUP));
        assert_eq!(parse_cgroup_v2(&long), None);
    }

    /// Both ends of a socketpair are this process: the identity must be ours, and the cgroup
    /// the one /proc/self/cgroup names.
    #[test]
    fn own_identity() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let id = PeerIdentity::of_socket(a.as_raw_fd()).expect("credentials");
        assert_eq!(id.pid, std::process::id());
        // SAFETY: no preconditions.
        assert_eq!(id.uid, unsafe { libc::geteuid() });
        // SAFETY: no preconditions.
        assert_eq!(id.gid, unsafe { libc::getegid() });
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("read cgroup");
        assert_eq!(id.cgroup.as_deref(), parse_cgroup_v2(&own));
    }

    #[test]
    fn not_a_unix_socket() {
        let f = std::fs::File::open("/proc/self/stat").expect("open");
        assert_eq!(PeerIdentity::of_socket(f.as_raw_fd()), None);
    }

    /// A pidfd of a process that has exited makes the cgroup unknown.
    #[test]
    fn exited_process_has_no_cgroup() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        let pidfd = peer_pidfd(-1, pid as libc::pid_t).expect("pidfd_open");
        child.wait().expect("wait");
        assert!(exited(&pidfd));
        assert_eq!(cgroup_of(pid, &pidfd), None);
    }
}
