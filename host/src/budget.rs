//! The daemon-wide cap on guest bytes buffered in the daemon (`--max-buffered`).
//!
//! A guest may send as many bytes as the window (`buf_alloc`) we advertised allows, and when
//! the host end does not read, the daemon holds them. Every connection's window is therefore
//! reserved here before the guest learns it and given back when the connection goes: the sum
//! of all windows, and so of all bytes the daemon may have to hold for guests, stays within
//! the cap. Past it, new connections get smaller windows (down to [`MIN_WINDOW`], which is
//! granted even when nothing is left, so a connection is never stuck without credit), and a
//! window below what its connection asked for grows back whenever that connection sends the
//! guest a packet while the budget has room again. Windows never shrink under a guest, so no
//! guest ever sees its credit taken back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The default cap and the smallest window are part of the configuration's checks.
pub use crate::config::{DEFAULT_MAX_BUFFERED, MIN_WINDOW};

/// Reserved bytes against a cap, shared by every VM of the daemon.
#[derive(Debug)]
pub struct Budget {
    cap: usize,
    reserved: AtomicUsize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(DEFAULT_MAX_BUFFERED)
    }
}

impl Budget {
    pub fn new(cap: usize) -> Self {
        Budget {
            cap,
            reserved: AtomicUsize::new(0),
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Bytes reserved by all windows now.
    pub fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    /// Reserves a window of up to `want` bytes: what is left under the cap, but at least
    /// `floor` (granted even past the cap). Returns the window.
    pub fn reserve(&self, want: u32, floor: u32) -> u32 {
        let floor = floor.min(want);
        let mut cur = self.reserved.load(Ordering::Relaxed);
        loop {
            let left = self.cap.saturating_sub(cur);
            let grant = (want as usize).min(left).max(floor as usize);
            match self.reserved.compare_exchange_weak(
                cur,
                cur + grant,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                // `grant` is at most `want`, a u32.
                Ok(_) => return grant as u32,
                Err(now) => cur = now,
            }
        }
    }

    /// Grows a window of `have` bytes toward `want` by what the cap allows; returns the new
    /// window (at least `have`).
    pub fn grow(&self, have: u32, want: u32) -> u32 {
        if have >= want {
            return have;
        }
        have + self.reserve(want - have, 0)
    }

    /// Gives back a window of `n` bytes.
    pub fn release(&self, n: u32) {
        let n = n as usize;
        let mut cur = self.reserved.load(Ordering::Relaxed);
        loop {
            match self.reserved.compare_exchange_weak(
                cur,
                cur.saturating_sub(n),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }
}

/// One connection's window: bytes reserved from a [`Budget`], given back on drop.
#[derive(Debug, Default)]
pub struct Window {
    budget: Option<Arc<Budget>>,
    size: u32,
    want: u32,
}

impl Window {
    /// Reserves a window of up to `want` bytes (at least [`MIN_WINDOW`]).
    pub fn reserve(budget: &Arc<Budget>, want: u32) -> Self {
        Window {
            budget: Some(budget.clone()),
            size: budget.reserve(want, MIN_WINDOW),
            want,
        }
    }

    /// Reserves all of `want`, past the cap if need be: for a connection whose guest already
    /// knows this window (adopted in a handover), which must not shrink under it.
    pub fn reserve_all(budget: &Arc<Budget>, want: u32) -> Self {
        Window {
            budget: Some(budget.clone()),
            size: budget.reserve(want, want),
            want,
        }
    }

    /// The `buf_alloc` to advertise.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Grows toward the asked-for size if the budget has room; true if it grew.
    pub fn grow(&mut self) -> bool {
        let Some(b) = &self.budget else { return false };
        let before = self.size;
        self.size = b.grow(self.size, self.want);
        self.size != before
    }

    /// Whether the window is below what its connection asked for.
    pub fn is_short(&self) -> bool {
        self.size < self.want
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.release(self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_shrink_past_the_cap_and_grow_back() {
        let b = Budget::new(600);
        assert_eq!(b.reserve(256, 16), 256);
        assert_eq!(b.reserve(256, 16), 256);
        assert_eq!(b.reserve(256, 16), 88, "what is left");
        assert_eq!(b.reserve(256, 16), 16, "the floor, past the cap");
        assert_eq!(b.reserved(), 616);
        assert_eq!(b.grow(16, 256), 16, "nothing left to grow into");
        b.release(256);
        assert_eq!(b.grow(16, 256), 256);
        assert_eq!(b.reserved(), 600);
        assert_eq!(b.grow(256, 256), 256);
        assert_eq!(b.reserve(8, 16), 8, "the floor never exceeds the ask");
    }

    #[test]
    fn a_window_gives_its_bytes_back_when_dropped() {
        let b = Arc::new(Budget::new(100 << 10));
        let w1 = Window::reserve(&b, 64 << 10);
        let mut w2 = Window::reserve(&b, 64 << 10);
        assert_eq!((w1.size(), w2.size()), (64 << 10, 36 << 10));
        assert!(w2.is_short());
        assert!(!w2.grow());
        drop(w1);
        assert_eq!(b.reserved(), 36 << 10);
        assert!(w2.grow());
        assert_eq!(w2.size(), 64 << 10);
        let w3 = Window::reserve_all(&b, 64 << 10);
        assert_eq!(w3.size(), 64 << 10, "past the cap");
        drop((w2, w3));
        assert_eq!(b.reserved(), 0);
    }
}
