//! A rate limit for the log lines a guest can cause: every bad packet is answered, but a guest
//! sending thousands of them must not fill the host's log. A token bucket, small enough to
//! write here rather than pull in a rate-limiting crate with its own clock and threads.

use std::time::{Duration, Instant};

/// Lines logged at once before the limit applies.
const BURST: u32 = 100;
/// Lines per second after that.
const PER_SECOND: u32 = 10;

#[derive(Debug)]
pub(super) struct LogLimit {
    tokens: u32,
    refilled: Instant,
    suppressed: u64,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit {
            tokens: BURST,
            refilled: Instant::now(),
            suppressed: 0,
        }
    }
}

/// What to do with one more line.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Log it; `suppressed` lines were dropped since the last one logged.
    Log {
        suppressed: u64,
    },
    Drop,
}

impl LogLimit {
    pub(super) fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = elapsed.as_millis() * u128::from(PER_SECOND) / 1000;
        if earned > 0 {
            self.tokens = (u128::from(self.tokens) + earned).min(u128::from(BURST)) as u32;
            // Keep the remainder of a partly earned token.
            let used = Duration::from_millis((earned * 1000 / u128::from(PER_SECOND)) as u64);
            self.refilled += used;
        }
        if self.tokens == 0 {
            self.suppressed += 1;
            return Verdict::Drop;
        }
        self.tokens -= 1;
        Verdict::Log {
            suppressed: std::mem::take(&mut self.suppressed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate_then_count_of_the_dropped() {
        let t0 = Instant::now();
        let mut l = LogLimit {
            refilled: t0,
            ..LogLimit::default()
        };
        for _ in 0..BURST {
            assert_eq!(l.check(t0), Verdict::Log { suppressed: 0 });
        }
        for _ in 0..500 {
            assert_eq!(l.check(t0), Verdict::Drop);
        }
        // One token comes back every 100 ms; the line that uses it reports the drops.
        assert_eq!(l.check(t0 + Duration::from_millis(50)), Verdict::Drop);
        assert_eq!(
            l.check(t0 + Duration::from_millis(100)),
            Verdict::Log { suppressed: 501 }
        );
        assert_eq!(l.check(t0 + Duration::from_millis(150)), Verdict::Drop);
        assert_eq!(
            l.check(t0 + Duration::from_millis(200)),
            Verdict::Log { suppressed: 1 }
        );
        // A quiet hour refills the burst, no more.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..BURST {
            assert!(matches!(l.check(later), Verdict::Log { .. }));
        }
        assert_eq!(l.check(later), Verdict::Drop);
    }
}
