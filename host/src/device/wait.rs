//! Host connects that wait for the guest (`connect-wait`, [`crate::connwait`]).
//!
//! A guest RST to such a connect's REQUEST does not close the host socket: the connection
//! goes to [`State::Waiting`] (its key stays reserved, so the same ports are asked again and
//! a handover records it) and a one-shot timer asks the guest again after the backoff. The
//! host program gets `OK` once the guest accepts, or its socket closed at the deadline,
//! exactly what a refusal gives it without the option. The connection holds a handshake
//! slot from its CONNECT line until accepted, so waiting connections count against
//! [`super::MAX_HANDSHAKES`] and the VM's connection limit; a host that closes while waiting
//! is removed at once.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{Device, MAX_HANDSHAKES};
use crate::conn::{pending, AcceptReply, State};

/// When a waiting connection (table slot and generation) is due; earliest first.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Due(Reverse<(Instant, usize, u32)>);

impl Device {
    /// The guest refused connection `idx` with RST. Returns true when the connection waits to
    /// ask again; false when it is to be removed (no `connect-wait`, deadline passed, not a
    /// host connect, or the host went away).
    pub(super) fn guest_refused(&mut self, idx: usize) -> bool {
        let now = Instant::now();
        let c = &mut self.conns[idx];
        if c.state != State::Requesting(AcceptReply::HybridOk) || c.host_hup {
            return false;
        }
        let Some(at) = c.wait.as_mut().and_then(|w| w.refused(now)) else {
            return false;
        };
        c.set_state(State::Waiting);
        c.pending = 0;
        debug!(retry_in = ?at.saturating_duration_since(now), "guest refused; waiting");
        self.schedule_retry(idx, at);
        true
    }

    /// Asks the guest about waiting connection `idx` again at `at`.
    pub(super) fn schedule_retry(&mut self, idx: usize, at: Instant) {
        let gen = self.conns[idx].gen;
        // Entries of connections that closed while waiting stay until due; drop them before
        // they could outnumber the live ones (at most one per handshake slot).
        if self.retries.len() >= 2 * MAX_HANDSHAKES {
            let conns = &self.conns;
            self.retries.retain(|Due(Reverse((_, i, g)))| {
                conns
                    .get(*i)
                    .is_some_and(|c| c.gen == *g && c.state == State::Waiting)
            });
        }
        self.retries.push(Due(Reverse((at, idx, gen))));
        self.rearm_retry(Instant::now());
    }

    /// The retry timer fired: ask the guest again for every due connection, close those whose
    /// deadline passed.
    pub(super) fn retry_due(&mut self) {
        if let Some(t) = &mut self.retry_timer {
            let _ = t.wait();
        }
        let now = Instant::now();
        while let Some(Due(Reverse((at, idx, gen)))) = self.retries.peek() {
            if *at > now {
                break;
            }
            let (idx, gen) = (*idx, *gen);
            self.retries.pop();
            let Some(c) = self.conns.get_mut(idx) else {
                continue;
            };
            if c.gen != gen || c.state != State::Waiting {
                continue;
            }
            let span = c.span.clone();
            let _entered = span.enter();
            if c.wait.as_ref().is_none_or(|w| w.expired(now)) {
                debug!("guest did not accept before the connect-wait deadline; closing");
                self.remove(idx);
                continue;
            }
            c.set_state(State::Requesting(AcceptReply::HybridOk));
            c.pending = pending::REQUEST;
            self.arm_timer();
            self.wake_rx(idx);
        }
        self.rearm_retry(now);
    }

    /// Sets the one-shot retry timer to the earliest entry (or leaves it off).
    fn rearm_retry(&mut self, now: Instant) {
        let Some(t) = &mut self.retry_timer else {
            return;
        };
        let Some(Due(Reverse((at, ..)))) = self.retries.peek() else {
            let _ = t.clear();
            return;
        };
        // A zero duration would disarm the timer: fire in a microsecond instead.
        let wait = at
            .saturating_duration_since(now)
            .max(Duration::from_micros(1));
        if let Err(e) = t.reset(wait, None) {
            warn!(error = %e, "cannot arm the connect-wait timer");
        }
    }
}
