//! CPU time of the benchmark's own threads, to tell when the harness rather than the daemon
//! limits a figure: one thread of the simulated guest or host program busy for (nearly) the
//! whole transfer means the daemon was waiting on it.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

/// Share of the wall time above which a harness thread counts as saturating its core.
pub const SATURATED_PCT: f64 = 90.0;

/// CPU seconds the calling thread has used (CLOCK_THREAD_CPUTIME_ID).
pub fn this_thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU seconds used so far by each live thread of this process named `name`, by thread id
/// (/proc/self/task/*/schedstat, nanoseconds on the CPU).
pub fn named_threads(name: &str) -> Result<HashMap<u32, f64>> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir("/proc/self/task").context("reading /proc/self/task")? {
        let e = e?;
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // A thread may exit between the listing and the reads: skip it.
        let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) else {
            continue;
        };
        if comm.trim_end() != name {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("schedstat")) else {
            continue;
        };
        out.insert(tid, parse_schedstat(&stat)?);
    }
    Ok(out)
}

/// The largest CPU use among threads present in both samples, as seconds.
pub fn busiest_delta(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> f64 {
    after
        .iter()
        .filter_map(|(tid, a)| before.get(tid).map(|b| a - b))
        .fold(0.0, f64::max)
}

fn parse_schedstat(s: &str) -> Result<f64> {
    let Some(ns) = s
        .split_whitespace()
        .next()
        .and_then(|w| w.parse::<u64>().ok())
    else {
        bail!("bad schedstat line {s:?}");
    };
    Ok(ns as f64 * 1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_and_thread_clock() {
        assert_eq!(parse_schedstat("2500000000 10 3\n").unwrap(), 2.5);
        assert!(parse_schedstat("").is_err());
        let t0 = this_thread_cpu();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        assert!(this_thread_cpu() > t0, "{x}");
        let before = HashMap::from([(1, 1.0), (2, 5.0)]);
        let after = HashMap::from([(1, 1.5), (2, 5.25), (3, 9.0)]);
        assert_eq!(busiest_delta(&before, &after), 0.5);
    }
}
