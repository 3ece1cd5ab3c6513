//! Counts the system calls and context switches of processes over a stretch of work, to say
//! where a round trip goes without timing it (under TCG every syscall and wakeup is costly,
//! and times move with the machine's load; counts do not). System calls come from a
//! histogram trigger on `raw_syscalls:sys_enter` (tracefs, `CONFIG_HIST_TRIGGERS`), keyed by
//! thread and syscall number; context switches from `/proc/<pid>/task/*/status`. Needs root
//! and tracefs mounted at `/sys/kernel/tracing` (the forward guest's init mounts it).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

const TRACING: &str = "/sys/kernel/tracing";
const TRIGGER: &str = "hist:keys=common_pid,id:vals=hitcount:size=4096";

/// Per process: system calls by name, and context switches.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub syscalls: BTreeMap<&'static str, u64>,
    /// Voluntary (the thread blocked: each one is a later wakeup) and involuntary.
    pub voluntary: u64,
    pub involuntary: u64,
    /// CPU time of the process's threads (schedstat).
    pub cpu_ns: u64,
}

impl Counts {
    pub fn total_syscalls(&self) -> u64 {
        self.syscalls.values().sum()
    }
}

/// An armed syscall histogram plus the context-switch counts at its start.
pub struct Recorder {
    pids: Vec<u32>,
    csw: Vec<(u64, u64, u64)>,
    extra: Vec<(&'static str, &'static str)>,
}

/// Guest-wide histograms besides the syscalls, when the kernel has the event: vsock packets
/// the transport received (the loopback carries every one of them), by operation; wakeups,
/// by the woken task's name.
const EXTRA: [(&str, &str); 2] = [
    (
        "vsock/virtio_transport_recv_pkt",
        "hist:keys=op:vals=hitcount",
    ),
    ("sched/sched_wakeup", "hist:keys=comm:vals=hitcount"),
];

/// Guest-wide counts of a [`Recorder`]: (event, key) -> count.
pub type Extra = BTreeMap<(String, String), u64>;

fn trigger_path() -> std::path::PathBuf {
    Path::new(TRACING).join("events/raw_syscalls/sys_enter/trigger")
}

/// Whether the kernel can count here (tracefs mounted, histogram triggers built in).
pub fn available() -> bool {
    trigger_path().exists()
}

/// Sum of (voluntary, involuntary) context switches and CPU nanoseconds over the threads
/// of `pid`.
fn ctxt_switches(pid: u32) -> Result<(u64, u64, u64)> {
    let mut sum = (0, 0, 0);
    for t in fs::read_dir(format!("/proc/{pid}/task"))? {
        let t = t?.path();
        if let Ok(s) = fs::read_to_string(t.join("schedstat")) {
            sum.2 += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
        let Ok(s) = fs::read_to_string(t.join("status")) else {
            continue; // the thread ended
        };
        for line in s.lines() {
            let num = |p: &str| {
                line.strip_prefix(p)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let Some(v) = num("voluntary_ctxt_switches:") {
                sum.0 += v;
            } else if let Some(v) = num("nonvoluntary_ctxt_switches:") {
                sum.1 += v;
            }
        }
    }
    Ok(sum)
}

impl Recorder {
    /// Starts counting for the processes `pids` (all their threads).
    pub fn start(pids: &[u32]) -> Result<Recorder> {
        let csw = pids
            .iter()
            .map(|p| ctxt_switches(*p))
            .collect::<Result<Vec<_>>>()?;
        let extra: Vec<_> = EXTRA
            .into_iter()
            .filter(|(ev, t)| {
                fs::write(
                    Path::new(TRACING).join("events").join(ev).join("trigger"),
                    t,
                )
                .is_ok()
            })
            .collect();
        fs::write(trigger_path(), TRIGGER).context("arming the syscall histogram")?;
        Ok(Recorder {
            pids: pids.to_vec(),
            csw,
            extra,
        })
    }

    /// Stops counting; one [`Counts`] per process, in the order given to `start`.
    pub fn stop(self) -> Result<(Vec<Counts>, Extra)> {
        let mut extra = Extra::new();
        for (ev, t) in &self.extra {
            let dir = Path::new(TRACING).join("events").join(ev);
            let hist = fs::read_to_string(dir.join("hist")).unwrap_or_default();
            let _ = fs::write(dir.join("trigger"), format!("!{t}"));
            for line in hist.lines().filter(|l| l.starts_with('{')) {
                let Some((key, n)) = line.split_once('}') else {
                    continue;
                };
                let key = key.trim_start_matches('{').trim();
                let key = key.split_once(':').map_or(key, |(_, v)| v.trim());
                let n = n
                    .trim()
                    .trim_start_matches("hitcount:")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                *extra.entry((ev.to_string(), key.to_string())).or_default() += n;
            }
        }
        Ok((self.stop_syscalls()?, extra))
    }

    fn stop_syscalls(&self) -> Result<Vec<Counts>> {
        let hist =
            fs::read_to_string(Path::new(TRACING).join("events/raw_syscalls/sys_enter/hist"));
        fs::write(trigger_path(), format!("!{TRIGGER}")).context("removing the histogram")?;
        let hist = hist.context("reading the syscall histogram")?;
        let mut out = vec![Counts::default(); self.pids.len()];
        // Which process each thread seen belongs to.
        let owner = |tid: u32| {
            self.pids
                .iter()
                .position(|p| Path::new(&format!("/proc/{p}/task/{tid}")).exists())
        };
        for line in hist.lines().filter(|l| l.starts_with('{')) {
            let field = |name: &str| -> Option<u64> {
                let at = line.find(name)? + name.len();
                line[at..]
                    .trim_start()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            };
            let (Some(tid), Some(id), Some(n)) =
                (field("common_pid:"), field(", id:"), field("hitcount:"))
            else {
                continue;
            };
            if let Some(i) = owner(tid as u32) {
                *out[i].syscalls.entry(name(id as i64)).or_default() += n;
            }
        }
        for (i, p) in self.pids.iter().enumerate() {
            let now = ctxt_switches(*p)?;
            out[i].voluntary = now.0.saturating_sub(self.csw[i].0);
            out[i].involuntary = now.1.saturating_sub(self.csw[i].1);
            out[i].cpu_ns = now.2.saturating_sub(self.csw[i].2);
        }
        Ok(out)
    }
}

/// The name of a syscall number of this architecture (the ones a data path makes).
fn name(id: i64) -> &'static str {
    const NAMES: &[(i64, &str)] = &[
        (libc::SYS_read, "read"),
        (libc::SYS_write, "write"),
        (libc::SYS_readv, "readv"),
        (libc::SYS_writev, "writev"),
        (libc::SYS_sendmsg, "sendmsg"),
        (libc::SYS_recvmsg, "recvmsg"),
        (libc::SYS_sendto, "sendto"),
        (libc::SYS_recvfrom, "recvfrom"),
        (libc::SYS_epoll_wait, "epoll_wait"),
        (libc::SYS_epoll_pwait, "epoll_pwait"),
        (libc::SYS_epoll_ctl, "epoll_ctl"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_futex, "futex"),
        (libc::SYS_poll, "poll"),
        (libc::SYS_ppoll, "ppoll"),
        (libc::SYS_clock_gettime, "clock_gettime"),
        (libc::SYS_sched_yield, "sched_yield"),
        (libc::SYS_getsockopt, "getsockopt"),
        (libc::SYS_fcntl, "fcntl"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == id)
        .map(|(_, s)| *s)
        .unwrap_or("other")
}

/// `name:count/rounds,...` of the calls that happen at least once per 10 rounds, most
/// frequent first (one `@@` value, no spaces).
pub fn per_round(c: &Counts, rounds: u64) -> String {
    let mut v: Vec<_> = c.syscalls.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .filter(|(_, n)| **n * 10 >= rounds)
        .map(|(k, n)| format!("{k}:{:.2}", **n as f64 / rounds as f64))
        .collect::<Vec<_>>()
        .join(",")
}
