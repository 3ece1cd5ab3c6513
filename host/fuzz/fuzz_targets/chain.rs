//! Descriptor chains, as the tx/rx/event queues collect them.
//!
//! Guest memory has three regions (two adjacent, one after a hole) holding a split virtqueue.
//! The input gives the queue size, the avail head, the direction, the byte cap, the descriptor
//! table and bytes for the data area (payloads, indirect tables). The chain is popped with
//! virtio-queue, as the device does, and collected by `ChainBuf::new`.
//!
//! Checked: no panic; the outcome (error kind, length) equals a reference walk of the same
//! descriptors; every segment lies inside guest memory, at the host address of the guest
//! address its descriptor names; segment lengths add up to the chain length, which is at most
//! the cap; at most `MAX_SEGMENTS` segments; the header, `copy_out` and `write_at` agree with
//! guest memory.
#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vhost_plug_parse::mem::GuestMem;
use vhost_plug_parse::vsock::chain::{ChainBuf, ChainError, MAX_SEGMENTS};
use vhost_plug_parse::vsock::header::{Header, HDR_LEN};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// (guest address, size): regions 0 and 1 touch, region 2 comes after a hole.
const REGIONS: [(u64, usize); 3] = [(0, 0x2_0000), (0x2_0000, 0x1_0000), (0x4_0000, 0x1_0000)];
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x8000;
const USED_RING: u64 = 0xa000;
/// Input bytes past the descriptors are copied here (to the end of region 0).
const DATA: u64 = 0x1_0000;
/// Largest queue size tried: a looping chain of 2048 descriptors can pass the segment cap.
const MAX_QUEUE: u16 = 2048;
/// The tx queue's cap (`HDR_LEN + MAX_PKT_PAYLOAD`); the input's cap is taken modulo this + 1.
const MAX_CAP: usize = HDR_LEN + vhost_plug_parse::vsock::MAX_PKT_PAYLOAD;

/// Bytes of the descriptor table and data area the previous input wrote (zeroed before the next).
static LAST_DESCS: AtomicUsize = AtomicUsize::new(0);
static LAST_DATA: AtomicUsize = AtomicUsize::new(0);

fn memory() -> &'static GuestMem {
    static MEM: OnceLock<GuestMem> = OnceLock::new();
    MEM.get_or_init(|| {
        let ranges: Vec<_> = REGIONS.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
        GuestMemoryMmap::from_ranges(&ranges).expect("map fuzz guest memory")
    })
}

/// Zeroes `[addr, addr + len)` (inputs must not see what earlier inputs left in memory).
fn zero(mem: &GuestMem, addr: u64, len: usize) {
    static ZEROS: [u8; 0x1_0000] = [0; 0x1_0000];
    mem.write_slice(&ZEROS[..len], GuestAddress(addr))
        .expect("zero guest memory");
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The input, decoded.
struct Case<'a> {
    write: bool,
    queue_size: u16,
    head: u16,
    cap: usize,
    /// Offset and length of a sub-range to read back and write (taken modulo the chain).
    probe: (usize, usize),
    descs: &'a [u8],
    data: &'a [u8],
}

impl<'a> Case<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        let (fixed, rest) = data.split_first_chunk::<12>()?;
        let n_descs = usize::from(fixed[11]).min(rest.len() / 16);
        let (descs, data) = rest.split_at(n_descs * 16);
        Some(Case {
            write: fixed[0] & 1 != 0,
            queue_size: 1 << ((fixed[0] >> 1) % 12),
            head: le16(fixed, 1),
            cap: u32::from_le_bytes([fixed[3], fixed[4], fixed[5], fixed[6]]) as usize
                % (MAX_CAP + 1),
            probe: (usize::from(le16(fixed, 7)), usize::from(le16(fixed, 9))),
            descs,
            data,
        })
    }

    /// Lays the queue out in guest memory (region 0 must be zero).
    fn install(&self, mem: &GuestMem) {
        mem.write_slice(self.descs, GuestAddress(DESC_TABLE))
            .expect("descriptor table");
        let room = REGIONS[0].1 - DATA as usize;
        let data = &self.data[..self.data.len().min(room)];
        mem.write_slice(data, GuestAddress(DATA))
            .expect("data area");
        LAST_DESCS.store(self.descs.len(), Ordering::Relaxed);
        LAST_DATA.store(data.len(), Ordering::Relaxed);
        // avail ring: flags 0, idx 1, ring[0] = head.
        mem.write_obj(1u16, GuestAddress(AVAIL_RING + 2))
            .expect("avail idx");
        mem.write_obj(self.head, GuestAddress(AVAIL_RING + 4))
            .expect("avail ring");
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(MAX_QUEUE).expect("queue");
        q.try_set_size(self.queue_size).expect("power of two");
        q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
            .expect("aligned");
        q.try_set_avail_ring_address(GuestAddress(AVAIL_RING))
            .expect("aligned");
        q.try_set_used_ring_address(GuestAddress(USED_RING))
            .expect("aligned");
        q.set_ready(true);
        q
    }
}

/// What `ChainBuf::new` must do with `descs`, walked independently: the chain length and its
/// segments as (guest address, length).
fn reference(
    descs: &[Descriptor],
    write: bool,
    cap: usize,
) -> Result<(usize, Vec<(u64, usize)>), ChainError> {
    let mut segs = Vec::new();
    let mut len = 0;
    for (i, d) in descs.iter().enumerate() {
        if d.is_write_only() != write {
            return Err(ChainError::WrongDirection(i));
        }
        let take = (d.len() as usize).min(cap - len);
        // A descriptor cut by the cap must still lie in guest memory as a whole.
        if take < d.len() as usize && !covered(d.addr().0, d.len() as usize) {
            return Err(ChainError::BadAddress {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        if take == 0 {
            continue;
        }
        let (mut addr, mut left) = (d.addr().0, take);
        while left > 0 {
            let Some(&(start, size)) = REGIONS
                .iter()
                .find(|&&(s, n)| addr >= s && addr - s < n as u64)
            else {
                return Err(ChainError::BadAddress {
                    addr: d.addr().0,
                    len: d.len(),
                });
            };
            let n = left.min((start + size as u64 - addr) as usize);
            if segs.len() == MAX_SEGMENTS {
                return Err(ChainError::TooManySegments);
            }
            segs.push((addr, n));
            addr += n as u64;
            left -= n;
        }
        len += take;
        if len == cap {
            return Ok((len, segs));
        }
    }
    // virtio-queue ends a looping or out-of-range chain silently: the last descriptor it
    // yields still has NEXT set.
    match descs.last() {
        None => Err(ChainError::NoDescriptor),
        Some(d) if d.has_next() => Err(ChainError::CutShort(descs.len())),
        Some(_) => Ok((len, segs)),
    }
}

/// Whether `[addr, addr + len)` lies inside guest memory (regions may touch).
fn covered(mut addr: u64, mut len: usize) -> bool {
    while len > 0 {
        let Some(&(start, size)) = REGIONS
            .iter()
            .find(|&&(s, n)| addr >= s && addr - s < n as u64)
        else {
            return false;
        };
        let n = len.min((start + size as u64 - addr) as usize);
        addr += n as u64;
        len -= n;
    }
    true
}

/// Guest bytes of `segs`, concatenated.
fn guest_bytes(mem: &GuestMem, segs: &[(u64, usize)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(addr, n) in segs {
        let start = out.len();
        out.resize(start + n, 0);
        mem.read_slice(&mut out[start..], GuestAddress(addr))
            .expect("reference segment is in memory");
    }
    out
}

fn host_range(mem: &GuestMem, addr: u64, n: usize) -> (usize, usize) {
    let p = GuestMemoryBackend::get_host_address(mem, GuestAddress(addr))
        .expect("reference segment is in memory") as usize;
    (p, p + n)
}

/// True if no two segments share a guest byte (then writes read back unchanged).
fn disjoint(segs: &[(u64, usize)]) -> bool {
    let mut s = segs.to_vec();
    s.sort_unstable();
    s.windows(2).all(|w| w[0].0 + w[0].1 as u64 <= w[1].0)
}

fn check(mem: &GuestMem, case: &Case<'_>, buf: &ChainBuf<'_>, segs: &[(u64, usize)]) {
    let len = buf.len();
    assert!(
        len <= case.cap,
        "chain of {len} bytes over its cap {}",
        case.cap
    );
    assert!(segs.len() <= MAX_SEGMENTS);

    // Segments: in guest memory, where the descriptors say, lengths adding up.
    let mut iov = Vec::new();
    buf.iovecs(0, len, &mut iov);
    assert_eq!(iov.len(), segs.len(), "segment count");
    let regions: Vec<_> = REGIONS
        .iter()
        .map(|&(a, n)| host_range(mem, a, n))
        .collect();
    for (v, &(addr, n)) in iov.iter().zip(segs) {
        let (base, end) = (v.iov_base as usize, v.iov_base as usize + v.iov_len);
        assert_eq!(
            (base, end),
            host_range(mem, addr, n),
            "segment at {addr:#x}"
        );
        assert!(
            regions.iter().any(|&(s, e)| s <= base && end <= e),
            "segment outside guest memory"
        );
    }
    assert_eq!(iov.iter().map(|v| v.iov_len).sum::<usize>(), len);

    // Reads.
    let expect = guest_bytes(mem, segs);
    let mut all = Vec::new();
    buf.copy_out(0, len, &mut all);
    assert_eq!(all, expect, "copy_out of the whole chain");
    match buf.read_header() {
        Ok(h) => {
            assert!(len >= HDR_LEN);
            assert_eq!(
                h,
                Header::from_le_bytes(&expect[..HDR_LEN].try_into().expect("44"))
            );
        }
        Err(e) => assert_eq!(e, ChainError::TooShortForHeader(len)),
    }
    let off = case.probe.0 % (len + 1);
    let end = (off + case.probe.1).min(len);
    let mut part = Vec::new();
    buf.copy_out(off, case.probe.1, &mut part);
    assert_eq!(part, &expect[off..end], "copy_out({off}, {})", case.probe.1);
    buf.iovecs(off, case.probe.1, &mut iov);
    assert_eq!(iov.iter().map(|v| v.iov_len).sum::<usize>(), end - off);
    buf.mark_dirty(off, case.probe.1);

    // Writes (device-writable chains only, as the device does).
    if case.write {
        let pattern: Vec<u8> = (0..case.probe.1.min(512)).map(|i| i as u8 ^ 0x5a).collect();
        let n = buf.write_at(off, &pattern);
        assert_eq!(n, pattern.len().min(len - off));
        if disjoint(segs) {
            let mut back = Vec::new();
            buf.copy_out(off, n, &mut back);
            assert_eq!(back, &pattern[..n], "write_at then copy_out");
        }
        // Undo the write: zero the guest bytes behind [off, off + n).
        let mut at = 0;
        for &(addr, len) in segs {
            let (s, e) = (off.max(at), (off + n).min(at + len));
            if s < e {
                zero(mem, addr + (s - at) as u64, e - s);
            }
            at += len;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(case) = Case::parse(data) else {
        return;
    };
    let mem = memory();
    zero(mem, DESC_TABLE, LAST_DESCS.load(Ordering::Relaxed));
    zero(mem, AVAIL_RING, 6);
    zero(mem, DATA, LAST_DATA.load(Ordering::Relaxed));
    case.install(mem);

    // The same chain twice: once for the reference walk, once for ChainBuf.
    let mut q = case.queue();
    let descs: Vec<Descriptor> = match q.pop_descriptor_chain(mem) {
        Some(chain) => chain.collect(),
        None => return,
    };
    let mut q = case.queue();
    let Some(chain) = q.pop_descriptor_chain(mem) else {
        panic!("the chain popped once must pop again");
    };
    let want = reference(&descs, case.write, case.cap);
    match ChainBuf::new(mem, chain, case.write, case.cap) {
        Ok(buf) => {
            let (len, segs) = want.expect("ChainBuf accepted a chain the reference refuses");
            assert_eq!(buf.len(), len, "chain length");
            check(mem, &case, &buf, &segs);
        }
        Err(e) => assert_eq!(Err(e), want.map(|_| ()), "ChainBuf refused"),
    }
});
