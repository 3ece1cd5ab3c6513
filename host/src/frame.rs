//! Framing of SEQPACKET connections between sibling VMs.
//!
//! Two sibling VMs are joined by a unix socketpair and each side runs the host-socket data
//! path. A unix SOCK_SEQPACKET keeps message bounds but has no MSG_EOR, and a zero-length
//! send on it is a message, so it can neither carry `VIRTIO_VSOCK_SEQ_EOR` nor be probed for
//! the peer's SHUT_RD. A sibling SEQPACKET connection therefore runs over a SOCK_STREAM
//! socketpair carrying frames, one per guest packet:
//!
//! ```text
//! +----------------+-------+--------------------+
//! | len: u32 (LE)  | flags | len payload bytes  |
//! +----------------+-------+--------------------+
//! ```
//!
//! `flags` holds the packet's `VIRTIO_VSOCK_SEQ_EOM` (bit 0) and `VIRTIO_VSOCK_SEQ_EOR`
//! (bit 1) exactly as the sending guest set them. The receiving side hands the payload to its
//! guest in as many packets as its rx buffers and credit need, with the flags on the packet
//! that carries the frame's last byte. So a message keeps its bounds and its EOR bit however
//! the two guests cut it into packets, no side buffers a whole message, and shutdown (SHUT_WR,
//! SHUT_RD) stays the socketpair's own, in order behind the frames.

use crate::vsock::header::{SEQ_EOM, SEQ_EOR};

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 5;

/// The flag bits a frame carries.
pub const FLAGS: u32 = SEQ_EOM | SEQ_EOR;

/// A frame header: payload length and EOM/EOR flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub flags: u32,
}

/// Why a frame header from the socketpair was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max} a packet may carry")]
    TooLong { len: u32, max: u32 },
    #[error("frame flags {0:#x} name bits other than EOM and EOR")]
    Flags(u8),
}

impl FrameHeader {
    /// The header of a frame for a guest packet with `len` payload bytes and header `flags`
    /// (bits other than EOM and EOR are not carried).
    pub fn new(len: u32, flags: u32) -> Self {
        FrameHeader {
            len,
            flags: flags & FLAGS,
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let l = self.len.to_le_bytes();
        [l[0], l[1], l[2], l[3], self.flags as u8]
    }

    /// Parses a header; `max_len` bounds the payload (one packet's worth, since frames are
    /// written per guest packet).
    pub fn parse(b: &[u8; HEADER_LEN], max_len: u32) -> Result<Self, FrameError> {
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if len > max_len {
            return Err(FrameError::TooLong { len, max: max_len });
        }
        if u32::from(b[4]) & !FLAGS != 0 {
            return Err(FrameError::Flags(b[4]));
        }
        Ok(FrameHeader {
            len,
            flags: u32::from(b[4]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let h = FrameHeader::new(70_000, SEQ_EOM | SEQ_EOR | 0x100);
        assert_eq!(h.flags, SEQ_EOM | SEQ_EOR, "only EOM and EOR travel");
        let b = h.to_bytes();
        assert_eq!(FrameHeader::parse(&b, 70_000), Ok(h));
        assert_eq!(
            FrameHeader::parse(&b, 65_536),
            Err(FrameError::TooLong {
                len: 70_000,
                max: 65_536
            })
        );
        assert_eq!(
            FrameHeader::parse(&[0, 0, 0, 0, 4], 10),
            Err(FrameError::Flags(4))
        );
        assert_eq!(
            FrameHeader::parse(&[0; 5], 0),
            Ok(FrameHeader { len: 0, flags: 0 })
        );
    }
}
