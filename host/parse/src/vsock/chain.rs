//! Descriptor chains as lists of guest-memory segments.
//!
//! A chain is walked once into a small list of [`Slice`]s, every address checked against the
//! memory map. The header may be split across descriptors and the payload may span any number
//! of them, as the virtio spec allows; the payload is then moved with readv/writev straight
//! between those segments and a socket.

use std::ops::Deref;

use smallvec::SmallVec;
use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap as _;
use vm_memory::{GuestAddress, GuestMemory, Permissions, VolatileSlice};

use super::header::{Header, HDR_LEN};
use crate::mem::{GuestMem, Slice};

/// Most segments a chain may have (Linux's UIO_MAXIOV).
pub const MAX_SEGMENTS: usize = 1024;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {0} has the wrong direction")]
    WrongDirection(usize),
    #[error("descriptor at {addr:#x} len {len} is outside guest memory")]
    BadAddress { addr: u64, len: u32 },
    #[error("chain has more than {MAX_SEGMENTS} segments")]
    TooManySegments,
    #[error("chain of {0} bytes is shorter than a packet header")]
    TooShortForHeader(usize),
    #[error("no descriptor: the head index is beyond the queue or unreadable")]
    NoDescriptor,
    #[error(
        "chain cut short after {0} descriptors: it loops, is longer than the queue, or names \
         a descriptor beyond it"
    )]
    CutShort(usize),
    #[error("payload length {len} exceeds the {avail} bytes the chain holds")]
    PayloadOutsideChain { len: u32, avail: usize },
}

/// Segments kept inside a [`ChainBuf`] before it allocates: a Linux guest's packet is one or
/// two descriptors, each one segment unless it crosses a memory region, so walking a chain
/// costs no allocation.
const INLINE_SEGMENTS: usize = 4;

type Segments<'a> = SmallVec<[Slice<'a>; INLINE_SEGMENTS]>;

/// The guest-memory segments of one descriptor chain, in order.
pub struct ChainBuf<'a> {
    segs: Segments<'a>,
    len: usize,
}

impl<'a> ChainBuf<'a> {
    /// Collects a chain whose descriptors are all device-readable (`write == false`) or all
    /// device-writable (`write == true`), taking at most `max_len` bytes of it.
    pub fn new<M>(
        mem: &'a GuestMem,
        chain: DescriptorChain<M>,
        write: bool,
        max_len: usize,
    ) -> Result<Self, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let access = if write {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let mut segs = Segments::new();
        let mut len = 0usize;
        // (descriptors seen, whether the last one had NEXT set): virtio-queue ends the walk
        // silently on a loop or a bad next index, which shows as a NEXT flag left unfollowed.
        let mut walked = (0usize, false);
        for (i, desc) in chain.enumerate() {
            walked = (i + 1, desc.has_next());
            if desc.is_write_only() != write {
                return Err(ChainError::WrongDirection(i));
            }
            let bad = ChainError::BadAddress {
                addr: desc.addr().0,
                len: desc.len(),
            };
            let take = (desc.len() as usize).min(max_len - len);
            // The part beyond `take` is never touched, but a descriptor must still lie
            // inside guest memory as a whole.
            if take < desc.len() as usize
                && !mem.check_range(GuestAddress(desc.addr().0), desc.len() as usize, access)
            {
                return Err(bad);
            }
            if take == 0 {
                continue;
            }
            let iter = mem
                .get_slices(GuestAddress(desc.addr().0), take, access)
                .map_err(|_| bad.clone())?;
            for s in iter {
                let s = s.map_err(|_| bad.clone())?;
                if segs.len() == MAX_SEGMENTS {
                    return Err(ChainError::TooManySegments);
                }
                segs.push(s);
            }
            len += take;
            if len == max_len {
                return Ok(Self { segs, len });
            }
        }
        match walked {
            (0, _) => Err(ChainError::NoDescriptor),
            (n, true) => Err(ChainError::CutShort(n)),
            _ => Ok(Self { segs, len }),
        }
    }

    /// Total bytes in the chain.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest-memory segments of the chain: an upper bound on the iovecs any byte range of it
    /// takes.
    pub fn segment_count(&self) -> usize {
        self.segs.len()
    }

    /// Reads the packet header from the start of the chain, wherever it is split.
    pub fn read_header(&self) -> Result<Header, ChainError> {
        if self.len < HDR_LEN {
            return Err(ChainError::TooShortForHeader(self.len));
        }
        let mut raw = [0u8; HDR_LEN];
        let mut done = 0;
        for s in &self.segs {
            let n = s.copy_to(&mut raw[done..]);
            done += n;
            if done == HDR_LEN {
                break;
            }
        }
        Ok(Header::from_le_bytes(&raw))
    }

    /// Calls `f(segment, start, n)` for each piece of the byte range `[offset, offset + len)`,
    /// in order. Returns how many bytes of the range the chain holds.
    fn walk(
        &self,
        mut offset: usize,
        len: usize,
        mut f: impl FnMut(&Slice<'a>, usize, usize),
    ) -> usize {
        let mut left = len;
        for s in &self.segs {
            if left == 0 {
                break;
            }
            if offset >= s.len() {
                offset -= s.len();
                continue;
            }
            let n = (s.len() - offset).min(left);
            f(s, offset, n);
            left -= n;
            offset = 0;
        }
        len - left
    }

    /// Writes `bytes` at `offset`, across segment boundaries. Returns the bytes written.
    pub fn write_at(&self, offset: usize, bytes: &[u8]) -> usize {
        let mut done = 0;
        self.walk(offset, bytes.len(), |s, off, n| {
            if let Ok(sub) = s.subslice(off, n) {
                sub.copy_from(&bytes[done..done + n]);
            }
            done += n;
        })
    }

    /// Appends `len` bytes from `offset` to `out` (the slow path, when a socket is full),
    /// copying straight into `out`'s spare capacity rather than zero-filling it first.
    pub fn copy_out(&self, offset: usize, len: usize, out: &mut Vec<u8>) {
        out.reserve(len);
        self.walk(offset, len, |s, off, n| {
            let start = out.len();
            let Ok(sub) = s.subslice(off, n) else {
                out.resize(start + n, 0);
                return;
            };
            // `walk` hands out at most `len` bytes in all, reserved above.
            out.reserve(n);
            // SAFETY: the `n` bytes after `out.len()` are allocated (reserved above) and
            // nothing else refers to them while the slice lives; this function is their only
            // user until `set_len`.
            let dst = unsafe { VolatileSlice::new(out.as_mut_ptr().add(start), n) };
            sub.copy_to_volatile_slice(dst);
            // SAFETY: `copy_to_volatile_slice` wrote all `n` bytes (both slices are `n` long),
            // so `start + n` bytes are initialised, within the capacity.
            unsafe { out.set_len(start + n) };
        });
    }

    /// Builds the iovecs for `len` bytes starting at `offset`, for the kernel to write into
    /// (recvmsg). The iovecs point into guest memory and stay valid while `self` (and the
    /// memory guard it borrows) lives.
    pub fn iovecs(&self, offset: usize, len: usize, out: &mut Vec<libc::iovec>) {
        out.clear();
        self.walk(offset, len, |s, off, n| {
            let base = s.ptr_guard_mut().as_ptr();
            out.push(libc::iovec {
                // SAFETY: `off < s.len()`, so the pointer stays inside the segment.
                iov_base: unsafe { base.add(off) }.cast(),
                iov_len: n,
            });
        });
    }

    /// Builds the iovecs for `len` bytes starting at `offset`, for the kernel to read from
    /// (sendmsg): taken through a read guard, so the guest pages are not marked dirty.
    pub fn send_iovecs(&self, offset: usize, len: usize, out: &mut Vec<libc::iovec>) {
        out.clear();
        self.extend_send_iovecs(offset, len, out);
    }

    /// Like [`ChainBuf::send_iovecs`], but appends to `out`, so the payloads of several
    /// chains can go out in one `sendmsg`.
    pub fn extend_send_iovecs(&self, offset: usize, len: usize, out: &mut Vec<libc::iovec>) {
        self.walk(offset, len, |s, off, n| {
            let base = s.ptr_guard().as_ptr();
            out.push(libc::iovec {
                // SAFETY: `off < s.len()`, so the pointer stays inside the segment. The
                // kernel only reads through it (iovec has no const variant).
                iov_base: unsafe { base.add(off) }.cast_mut().cast(),
                iov_len: n,
            });
        });
    }

    /// Marks `len` bytes from `offset` dirty after they were written behind vm-memory's back
    /// (by recvmsg).
    pub fn mark_dirty(&self, offset: usize, len: usize) {
        self.walk(offset, len, |s, off, n| s.bitmap().mark_dirty(off, n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsock::header::{OP_RW, TYPE_STREAM};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const MEM: u64 = 0x10_0000;

    fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory")
    }

    /// Builds one chain from (addr, len, writable) triples and returns its ChainBuf.
    fn with_chain<R>(
        m: &GuestMem,
        descs: &[(u64, u32, bool)],
        write: bool,
        f: impl FnOnce(Result<ChainBuf<'_>, ChainError>) -> R,
    ) -> R {
        let vq = MockSplitQueue::new(m, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, (i + 1) as u16))
            })
            .collect();
        vq.build_desc_chain(&raw).expect("chain");
        let mut q = vq.create_queue::<virtio_queue::Queue>().expect("queue");
        let chain = q.iter(m).expect("iter").next().expect("one chain");
        f(ChainBuf::new(m, chain, write, 1 << 20))
    }

    fn header(len: u32) -> [u8; HDR_LEN] {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 5000,
            dst_port: 80,
            len,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 1 << 16,
            fwd_cnt: 0,
        }
        .to_le_bytes()
    }

    #[test]
    fn header_split_across_three_descriptors() {
        let m = mem();
        let h = header(5);
        m.write_slice(&h[..10], GuestAddress(0x8000)).expect("w");
        m.write_slice(&h[10..30], GuestAddress(0x9000)).expect("w");
        m.write_slice(&h[30..], GuestAddress(0xa000)).expect("w");
        m.write_slice(b"hello", GuestAddress(0xa000 + 14))
            .expect("w");
        with_chain(
            &m,
            &[
                (0x8000, 10, false),
                (0x9000, 20, false),
                (0xa000, 19, false),
            ],
            false,
            |b| {
                let b = b.expect("valid chain");
                assert_eq!(b.len(), 49);
                let hdr = b.read_header().expect("header");
                assert_eq!((hdr.src_cid, hdr.dst_port, hdr.len), (3, 80, 5));
                let mut out = Vec::new();
                b.copy_out(HDR_LEN, 5, &mut out);
                assert_eq!(out, b"hello");
            },
        );
    }

    #[test]
    fn payload_iovecs_span_descriptors() {
        let m = mem();
        with_chain(
            &m,
            &[(0x8000, 44, false), (0x9000, 3, false), (0xa000, 4, false)],
            false,
            |b| {
                let b = b.expect("valid chain");
                let mut iov = Vec::new();
                b.iovecs(HDR_LEN + 1, 5, &mut iov);
                assert_eq!(
                    iov.iter().map(|v| v.iov_len).collect::<Vec<_>>(),
                    vec![2, 3]
                );
            },
        );
    }

    #[test]
    fn appended_iovecs() {
        let m = mem();
        with_chain(
            &m,
            &[(0x8000, 44, false), (0x9000, 3, false), (0xa000, 4, false)],
            false,
            |b| {
                let b = b.expect("valid chain");
                assert_eq!(b.segment_count(), 3);
                let mut iov = Vec::new();
                b.send_iovecs(HDR_LEN, 3, &mut iov);
                b.extend_send_iovecs(HDR_LEN + 3, 4, &mut iov);
                assert_eq!(
                    iov.iter().map(|v| v.iov_len).collect::<Vec<_>>(),
                    vec![3, 4]
                );
            },
        );
    }

    #[test]
    fn descriptor_outside_memory_is_rejected() {
        let m = mem();
        with_chain(&m, &[(MEM - 8, 64, false)], false, |b| {
            assert!(matches!(b, Err(ChainError::BadAddress { .. })));
        });
    }

    #[test]
    fn wrong_direction_is_rejected() {
        let m = mem();
        with_chain(&m, &[(0x8000, 44, false), (0x9000, 8, true)], false, |b| {
            assert!(matches!(b, Err(ChainError::WrongDirection(1))));
        });
        with_chain(&m, &[(0x8000, 64, false)], true, |b| {
            assert!(matches!(b, Err(ChainError::WrongDirection(0))));
        });
    }

    #[test]
    fn looping_chain_is_cut_short() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        // One descriptor whose next is itself.
        let raw = [RawDescriptor::from(SplitDescriptor::new(
            0x8000,
            44,
            VRING_DESC_F_NEXT as u16,
            0,
        ))];
        // add_desc_chains keeps `next` as given (build_desc_chain would rewrite it).
        vq.add_desc_chains(&raw, 0).expect("chain");
        let mut q = vq.create_queue::<virtio_queue::Queue>().expect("queue");
        let chain = q.iter(&m).expect("iter").next().expect("one chain");
        assert!(matches!(
            ChainBuf::new(&m, chain, false, 1 << 20),
            Err(ChainError::CutShort(16))
        ));
    }

    #[test]
    fn descriptor_longer_than_memory_is_rejected_even_when_truncated() {
        let m = mem();
        with_chain(&m, &[(0x8000, u32::MAX, false)], false, |b| {
            assert!(matches!(b, Err(ChainError::BadAddress { .. })));
        });
    }

    #[test]
    fn short_chain_has_no_header() {
        let m = mem();
        with_chain(&m, &[(0x8000, 20, false)], false, |b| {
            let b = b.expect("valid chain");
            assert_eq!(b.read_header(), Err(ChainError::TooShortForHeader(20)));
        });
    }

    #[test]
    fn writes_cross_segments_and_stop_at_the_end() {
        let m = mem();
        with_chain(&m, &[(0x8000, 30, true), (0x9000, 30, true)], true, |b| {
            let b = b.expect("valid chain");
            let h = header(0);
            assert_eq!(b.write_at(0, &h), HDR_LEN);
            assert_eq!(b.write_at(58, b"xyz"), 2);
        });
        let mut back = [0u8; HDR_LEN];
        m.read_slice(&mut back[..30], GuestAddress(0x8000))
            .expect("r");
        m.read_slice(&mut back[30..], GuestAddress(0x9000))
            .expect("r");
        assert_eq!(back, header(0));
    }
}
