//! The driver's interrupt thread: sleeps in poll(2) on the call eventfds and services a ring
//! only when its call eventfd fired, so a device that forgets to notify is caught (no polling
//! of ring memory as a fallback).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::Shared;

/// Longest sleep without looking at timers.
const MAX_SLEEP: Duration = Duration::from_millis(200);

pub(crate) struct WorkerFds {
    pub call_rx: EventFd,
    pub call_tx: EventFd,
    pub call_evt: Option<EventFd>,
    pub stop: EventFd,
    /// Written to get the thread out of poll (to park it).
    pub wake: EventFd,
}

/// Reads an eventfd (non-blocking); true if it had been signalled.
fn drain(fd: &EventFd) -> bool {
    fd.read().is_ok()
}

/// Parks while a pause is requested; false if the driver was stopped meanwhile.
fn park_while_paused(shared: &Shared) -> bool {
    let mut core = shared.lock();
    if !core.pause_requested {
        return !core.stopped;
    }
    core.parked = true;
    shared.cv.notify_all();
    while core.pause_requested && !core.stopped {
        core = shared.cv.wait(core).unwrap_or_else(|e| e.into_inner());
    }
    core.parked = false;
    !core.stopped
}

pub(crate) fn run(shared: Arc<Shared>, fds: WorkerFds) {
    let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(4);
    let mut push = |fd: RawFd| {
        pfds.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
    };
    push(fds.stop.as_raw_fd());
    push(fds.call_rx.as_raw_fd());
    push(fds.call_tx.as_raw_fd());
    let evt_slot = fds.call_evt.as_ref().map(|e| {
        push(e.as_raw_fd());
        3
    });
    push(fds.wake.as_raw_fd());
    let wake_slot = if evt_slot.is_some() { 4 } else { 3 };
    loop {
        if !park_while_paused(&shared) {
            return;
        }
        let timeout = shared.lock().poll_timeout(MAX_SLEEP);
        for p in pfds.iter_mut() {
            p.revents = 0;
        }
        let ms = timeout.as_millis().clamp(1, MAX_SLEEP.as_millis()) as libc::c_int;
        // SAFETY: `pfds` is a live, initialised array of `pfds.len()` pollfd structs whose fds
        // stay open for the whole loop (owned by `fds`).
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            shared.lock().fail(format!("poll: {err}"));
            shared.cv.notify_all();
            return;
        }
        if pfds[0].revents != 0 {
            return;
        }
        let tx = pfds[2].revents != 0 && drain(&fds.call_tx);
        let rx = pfds[1].revents != 0 && drain(&fds.call_rx);
        let evt = match (&fds.call_evt, evt_slot) {
            (Some(e), Some(i)) => pfds[i].revents != 0 && drain(e),
            _ => false,
        };
        if pfds[wake_slot].revents != 0 {
            drain(&fds.wake);
        }
        {
            let mut core = shared.lock();
            if core.stopped {
                return;
            }
            if tx || rx || evt {
                core.count_interrupt();
            }
            if tx {
                core.service_tx();
            }
            if rx {
                core.service_rx();
            }
            if evt {
                core.service_evt();
            }
        }
        shared.cv.notify_all();
    }
}
