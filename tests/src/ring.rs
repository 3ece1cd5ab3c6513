//! Driver side of a split virtqueue (virtio 1.x, 2.7): descriptor free list, available ring
//! publication with kick suppression, used ring consumption and `VIRTIO_RING_F_EVENT_IDX`.
//!
//! Layout of a queue of size N, each part at its own 4 KiB-aligned guest address:
//! descriptor table `16*N`; available ring `flags u16, idx u16, ring[N] u16, used_event u16`;
//! used ring `flags u16, idx u16, ring[N] {id u32, len u32}, avail_event u16`.

use std::sync::atomic::{fence, Ordering};

use anyhow::{bail, Context, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::mem::GuestMem;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;
const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// Guest addresses of one queue's three parts.
#[derive(Clone, Copy, Debug)]
pub struct RingAddrs {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
}

impl RingAddrs {
    /// Allocates zeroed ring memory for a queue of `size` entries (a power of two).
    pub fn alloc(mem: &mut GuestMem, size: u16) -> Result<Self> {
        if size == 0 || !size.is_power_of_two() {
            bail!("queue size {size} is not a non-zero power of two");
        }
        let n = u64::from(size);
        Ok(RingAddrs {
            size,
            desc: mem.alloc(16 * n, 4096)?,
            avail: mem.alloc(6 + 2 * n, 4096)?,
            used: mem.alloc(6 + 8 * n, 4096)?,
        })
    }
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (rx, event) or device-readable (tx).
    pub write: bool,
}

/// Where a raw descriptor's `next` field points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawNext {
    /// The descriptor at this position of the same raw chain (loops are allowed).
    Chain(usize),
    /// This descriptor index, as is (may lie beyond the queue).
    Index(u16),
}

/// A descriptor written exactly as given, for hostile-guest tests: any address, length,
/// flags and `next`, valid or not.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    /// `VRING_DESC_F_*` bits, written as given.
    pub flags: u16,
    pub next: RawNext,
}

impl RawDesc {
    /// A device-readable descriptor; `next` set means `VRING_DESC_F_NEXT` is set too.
    pub fn read(addr: u64, len: u32, next: Option<RawNext>) -> Self {
        RawDesc {
            addr,
            len,
            flags: if next.is_some() { VRING_DESC_F_NEXT } else { 0 },
            next: next.unwrap_or(RawNext::Index(0)),
        }
    }
}

/// A used-ring entry returned to the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

/// The driver's view of one split queue.
pub struct SplitRing {
    mem: GuestMemoryMmap,
    addrs: RingAddrs,
    event_idx: bool,
    /// Free descriptor indices (a stack, bounded by the queue size).
    free: Vec<u16>,
    /// For each in-flight head: the descriptors of its chain.
    chains: Vec<Option<Vec<u16>>>,
    /// Shadow of `avail->idx`.
    avail_idx: u16,
    /// `avail->idx` at the last kick decision (Linux's `avail_idx_shadow - num_added`).
    kicked_idx: u16,
    /// Next used entry to consume.
    last_used: u16,
}

impl SplitRing {
    /// Takes over ring memory that is zeroed (or that the device has not seen yet).
    pub fn new(mem: GuestMemoryMmap, addrs: RingAddrs, event_idx: bool) -> Self {
        let n = usize::from(addrs.size);
        SplitRing {
            mem,
            addrs,
            event_idx,
            free: (0..addrs.size).rev().collect(),
            chains: vec![None; n],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
        }
    }

    pub fn size(&self) -> u16 {
        self.addrs.size
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Number of chains the device holds (made available, not yet returned as used).
    pub fn in_flight(&self) -> usize {
        self.chains.iter().filter(|c| c.is_some()).count()
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    fn off(base: GuestAddress, o: u64) -> GuestAddress {
        GuestAddress(base.0 + o)
    }

    /// Writes a chain into the descriptor table and publishes it on the available ring.
    /// Returns the head index. Fails (without side effects) if not enough descriptors are free.
    pub fn add(&mut self, descs: &[Desc]) -> Result<u16> {
        if descs.is_empty() {
            bail!("empty descriptor chain");
        }
        if descs.len() > self.free.len() {
            bail!(
                "queue full: chain of {} needs more than {} free descriptors",
                descs.len(),
                self.free.len()
            );
        }
        let split = self.free.len() - descs.len();
        let ids: Vec<u16> = self.free.split_off(split);
        for (i, d) in descs.iter().enumerate() {
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            let base = Self::off(self.addrs.desc, 16 * u64::from(ids[i]));
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.0.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            if let Err(e) = self.mem.write_slice(&raw, base) {
                self.free.extend_from_slice(&ids);
                return Err(e).context("writing descriptor");
            }
        }
        let head = ids[0];
        self.publish(head)?;
        self.chains[usize::from(head)] = Some(ids);
        Ok(head)
    }

    /// Writes `descs` into free descriptor slots exactly as given (flags and `next` included,
    /// see [`RawNext`]) and publishes the first as a chain head. The slots return to the free
    /// list when the device uses the head, whatever the chain looked like.
    pub fn add_raw(&mut self, descs: &[RawDesc]) -> Result<u16> {
        if descs.is_empty() || descs.len() > self.free.len() {
            bail!(
                "raw chain of {} descriptors, {} free",
                descs.len(),
                self.free.len()
            );
        }
        let split = self.free.len() - descs.len();
        let ids: Vec<u16> = self.free.split_off(split);
        for (i, d) in descs.iter().enumerate() {
            let next = match d.next {
                RawNext::Chain(j) => match ids.get(j) {
                    Some(id) => *id,
                    None => {
                        self.free.extend_from_slice(&ids);
                        bail!("raw descriptor {i} points at chain position {j}, beyond the chain");
                    }
                },
                RawNext::Index(n) => n,
            };
            let base = Self::off(self.addrs.desc, 16 * u64::from(ids[i]));
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            if let Err(e) = self.mem.write_slice(&raw, base) {
                self.free.extend_from_slice(&ids);
                return Err(e).context("writing raw descriptor");
            }
        }
        let head = ids[0];
        self.publish(head)?;
        self.chains[usize::from(head)] = Some(ids);
        Ok(head)
    }

    /// Puts `head` on the available ring as is, without writing or owning any descriptor
    /// (a head beyond the queue size is the point of calling this).
    pub fn publish_raw_head(&mut self, head: u16) -> Result<()> {
        self.publish(head)
    }

    fn publish(&mut self, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx % self.addrs.size);
        self.mem
            .write_obj(head.to_le(), Self::off(self.addrs.avail, 4 + 2 * slot))
            .context("writing avail ring entry")?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Descriptor and ring entry must be visible before the index moves.
        fence(Ordering::Release);
        self.mem
            .store(
                self.avail_idx.to_le(),
                Self::off(self.addrs.avail, 2),
                Ordering::Release,
            )
            .context("writing avail idx")
    }

    /// Whether the device wants a notification for what was published since the last call
    /// (and records that a decision was taken).
    pub fn kick_needed(&mut self) -> Result<bool> {
        // The index store must be ordered before reading the device's suppression state.
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = self.kicked_idx;
        self.kicked_idx = new;
        if new == old {
            return Ok(false);
        }
        if self.event_idx {
            let ev_addr = Self::off(self.addrs.used, 4 + 8 * u64::from(self.addrs.size));
            let event: u16 = u16::from_le(
                self.mem
                    .load(ev_addr, Ordering::Acquire)
                    .context("reading avail_event")?,
            );
            Ok(vring_need_event(event, new, old))
        } else {
            let flags: u16 = u16::from_le(
                self.mem
                    .load(self.addrs.used, Ordering::Acquire)
                    .context("reading used flags")?,
            );
            Ok(flags & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    fn used_idx(&self) -> Result<u16> {
        Ok(u16::from_le(
            self.mem
                .load(Self::off(self.addrs.used, 2), Ordering::Acquire)
                .context("reading used idx")?,
        ))
    }

    /// Consumes one used entry, returning its chain's descriptors to the free list.
    /// An entry naming a descriptor that is not an in-flight head is a device bug: error.
    pub fn pop_used(&mut self) -> Result<Option<Used>> {
        let used_idx = self.used_idx()?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending > self.addrs.size {
            bail!(
                "device moved used idx to {used_idx} with last_used {}: more entries than the \
                 queue size {}",
                self.last_used,
                self.addrs.size
            );
        }
        fence(Ordering::Acquire);
        let slot = u64::from(self.last_used % self.addrs.size);
        let base = Self::off(self.addrs.used, 4 + 8 * slot);
        let id: u32 = u32::from_le(self.mem.read_obj(base).context("reading used id")?);
        let len: u32 = u32::from_le(
            self.mem
                .read_obj(Self::off(base, 4))
                .context("reading used len")?,
        );
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|h| *h < self.addrs.size)
            .with_context(|| format!("device returned used id {id} beyond queue size"))?;
        let chain = self.chains[usize::from(head)]
            .take()
            .with_context(|| format!("device returned used id {head} that is not in flight"))?;
        self.free.extend_from_slice(&chain);
        Ok(Some(Used { head, len }))
    }

    /// Re-arms notifications after the used ring was drained: returns true if more used
    /// entries arrived meanwhile (the caller must drain again), false if it may sleep.
    pub fn enable_notifications(&mut self) -> Result<bool> {
        if self.event_idx {
            let ev_addr = Self::off(self.addrs.avail, 4 + 2 * u64::from(self.addrs.size));
            self.mem
                .store(self.last_used.to_le(), ev_addr, Ordering::Release)
                .context("writing used_event")?;
        }
        // The used_event store must be ordered before re-reading used idx.
        fence(Ordering::SeqCst);
        Ok(self.used_idx()? != self.last_used)
    }
}

/// `vring_need_event` from the virtio spec: true if `event` lies in `[old, new)`.
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(event_idx: bool) -> (GuestMem, RingAddrs, SplitRing) {
        let mut m = GuestMem::new(1 << 20).unwrap();
        let a = RingAddrs::alloc(&mut m, 8).unwrap();
        let r = SplitRing::new(m.memory().clone(), a, event_idx);
        (m, a, r)
    }

    /// Plays the device: returns `head` as used with `len`.
    fn device_use(m: &GuestMem, a: &RingAddrs, idx: u16, head: u16, len: u32) {
        let slot = u64::from(idx % a.size);
        let base = GuestAddress(a.used.0 + 4 + 8 * slot);
        m.memory().write_obj(u32::from(head), base).unwrap();
        m.memory().write_obj(len, GuestAddress(base.0 + 4)).unwrap();
        m.memory()
            .write_obj(idx.wrapping_add(1), GuestAddress(a.used.0 + 2))
            .unwrap();
    }

    #[test]
    fn need_event_matches_spec() {
        assert!(vring_need_event(0, 1, 0));
        assert!(!vring_need_event(1, 1, 0));
        assert!(vring_need_event(5, 10, 3));
        assert!(!vring_need_event(10, 10, 3));
        assert!(vring_need_event(65535, 2, 65534));
    }

    #[test]
    fn add_use_free_cycle() {
        let (m, a, mut r) = ring(false);
        let d = Desc {
            addr: GuestAddress(0x8000),
            len: 44,
            write: false,
        };
        let h = r.add(&[d, d]).unwrap();
        assert_eq!(r.num_free(), 6);
        assert!(r.kick_needed().unwrap());
        assert!(!r.kick_needed().unwrap());
        // Chain: head points at the second descriptor with NEXT set.
        let flags: u16 = m
            .memory()
            .read_obj(GuestAddress(a.desc.0 + 16 * u64::from(h) + 12))
            .unwrap();
        assert_eq!(flags, VRING_DESC_F_NEXT);
        let avail_idx: u16 = m.memory().read_obj(GuestAddress(a.avail.0 + 2)).unwrap();
        assert_eq!(avail_idx, 1);
        assert_eq!(r.pop_used().unwrap(), None);
        device_use(&m, &a, 0, h, 10);
        assert_eq!(r.pop_used().unwrap(), Some(Used { head: h, len: 10 }));
        assert_eq!(r.num_free(), 8);
        // A second completion of the same head is a device bug.
        device_use(&m, &a, 1, h, 10);
        assert!(r.pop_used().is_err());
    }

    #[test]
    fn raw_chains_are_written_as_given_and_freed_on_use() {
        let (m, a, mut r) = ring(false);
        let d = |next| RawDesc::read(0x8000, 44, Some(next));
        // A two-descriptor loop, and a next index beyond the queue.
        let h = r
            .add_raw(&[d(RawNext::Chain(1)), d(RawNext::Chain(0))])
            .unwrap();
        let h2 = r.add_raw(&[d(RawNext::Index(999))]).unwrap();
        let desc = |i: u16, off: u64| -> u16 {
            m.memory()
                .read_obj(GuestAddress(a.desc.0 + 16 * u64::from(i) + off))
                .unwrap()
        };
        let second = desc(h, 14);
        assert_eq!(desc(second, 14), h, "loop closes on the head");
        assert_eq!(desc(h, 12), VRING_DESC_F_NEXT);
        assert_eq!(desc(h2, 14), 999);
        assert!(r.add_raw(&[d(RawNext::Chain(5))]).is_err());
        assert_eq!(r.num_free(), 5);
        device_use(&m, &a, 0, h, 0);
        assert_eq!(r.pop_used().unwrap(), Some(Used { head: h, len: 0 }));
        assert_eq!(r.num_free(), 7);
        // A bare head with no descriptor behind it moves avail idx only.
        r.publish_raw_head(600).unwrap();
        assert_eq!(r.avail_idx(), 3);
    }

    #[test]
    fn full_queue_is_refused() {
        let (_m, _a, mut r) = ring(false);
        let d = Desc {
            addr: GuestAddress(0x8000),
            len: 1,
            write: true,
        };
        for _ in 0..8 {
            r.add(&[d]).unwrap();
        }
        assert!(r.add(&[d]).is_err());
        assert_eq!(r.in_flight(), 8);
    }

    #[test]
    fn event_idx_kick_and_used_event() {
        let (m, a, mut r) = ring(true);
        let d = Desc {
            addr: GuestAddress(0x8000),
            len: 1,
            write: true,
        };
        let avail_event = GuestAddress(a.used.0 + 4 + 8 * 8);
        r.add(&[d]).unwrap();
        // avail_event 0: device wants a kick once idx passes 0.
        assert!(r.kick_needed().unwrap());
        m.memory().write_obj(5u16, avail_event).unwrap();
        r.add(&[d]).unwrap();
        assert!(!r.kick_needed().unwrap());
        for _ in 0..4 {
            r.add(&[d]).unwrap();
        }
        // idx went 2 -> 6 and crossed 5.
        assert!(r.kick_needed().unwrap());
        assert!(!r.enable_notifications().unwrap());
        device_use(&m, &a, 0, 0, 1);
        assert!(r.enable_notifications().unwrap());
        let used_event: u16 = m
            .memory()
            .read_obj(GuestAddress(a.avail.0 + 4 + 2 * 8))
            .unwrap();
        assert_eq!(used_event, 0);
        r.pop_used().unwrap().unwrap();
        assert!(!r.enable_notifications().unwrap());
    }
}
