//! The 44-byte virtio-vsock packet header and its constants (virtio spec 5.10.6).

/// Size of the packet header in bytes.
pub const HDR_LEN: usize = 44;

/// CID of the host.
pub const HOST_CID: u64 = 2;

/// Socket types.
pub const TYPE_STREAM: u16 = 1;
pub const TYPE_SEQPACKET: u16 = 2;

/// Operations.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// SEQPACKET RW flags: end of message / end of record.
pub const SEQ_EOM: u32 = 1;
pub const SEQ_EOR: u32 = 2;

/// Feature bit: SEQPACKET sockets.
pub const F_SEQPACKET: u64 = 1;

/// Event queue event id: transport reset.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Socket type of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SockType {
    Stream,
    Seqpacket,
}

impl SockType {
    pub fn from_wire(t: u16) -> Option<Self> {
        match t {
            TYPE_STREAM => Some(Self::Stream),
            TYPE_SEQPACKET => Some(Self::Seqpacket),
            _ => None,
        }
    }

    pub fn wire(self) -> u16 {
        match self {
            Self::Stream => TYPE_STREAM,
            Self::Seqpacket => TYPE_SEQPACKET,
        }
    }
}

/// A packet header in host byte order. On the wire it is 44 little-endian bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Wire bytes of this header.
    pub fn to_le_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses wire bytes.
    pub fn from_le_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_wire_bytes() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1025,
            dst_port: 80,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 12,
        };
        let b = h.to_le_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[28..30], &TYPE_STREAM.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::from_le_bytes(&b), h);
    }
}
