//! The clock of a host `CONNECT` that waits for the guest (`connect-wait`): when to ask the
//! guest again after it refused, and when to give up.
//!
//! A guest that is still booting refuses connections to a port nobody listens on yet with
//! RST. With `connect-wait` set, the device asks again after a backoff that starts at
//! [`FIRST_BACKOFF`] and doubles up to [`MAX_BACKOFF`], until the deadline; the host program
//! gets `OK` once the guest accepts, or its socket closed at the deadline.

use std::time::{Duration, Instant};

/// Wait after the first refusal.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// Longest wait between two requests.
pub const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// One waiting connection's deadline and current backoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectWait {
    until: Instant,
    backoff: Duration,
}

impl ConnectWait {
    /// A wait of `wait` starting at `now`.
    pub fn new(now: Instant, wait: Duration) -> Self {
        ConnectWait {
            until: now + wait,
            backoff: FIRST_BACKOFF,
        }
    }

    /// The guest refused at `now`: when to ask again (never later than the deadline, where
    /// [`ConnectWait::expired`] says to give up), or `None` when the deadline has passed.
    pub fn refused(&mut self, now: Instant) -> Option<Instant> {
        if now >= self.until {
            return None;
        }
        let at = (now + self.backoff).min(self.until);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Some(at)
    }

    /// Whether the deadline has passed at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_stops_at_the_deadline() {
        let t0 = Instant::now();
        let mut w = ConnectWait::new(t0, Duration::from_secs(2));
        let gaps: Vec<_> = (0..8)
            .map(|_| w.refused(t0).map(|at| at - t0))
            .collect::<Option<_>>()
            .expect("before the deadline");
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            gaps,
            [
                ms(10),
                ms(20),
                ms(40),
                ms(80),
                ms(160),
                ms(320),
                ms(500),
                ms(500)
            ]
        );
        // Near the deadline the retry is at the deadline, then it is over.
        let late = t0 + Duration::from_millis(1900);
        assert_eq!(w.refused(late), Some(t0 + Duration::from_secs(2)));
        assert!(!w.expired(late));
        let end = t0 + Duration::from_secs(2);
        assert!(w.expired(end));
        assert_eq!(w.refused(end), None);
    }
}
