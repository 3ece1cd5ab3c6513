//! The PROXY protocol v2 header written at the start of a proxied route's connection, so one
//! listener can serve the guests of every VM and still tell them apart. A leaf module.
//!
//! PROXY v2 has no vsock address family. An `AF_UNSPEC` header would leave the length of the
//! address block undefined, and parsers disagree on where TLVs then start (the `ppp` crate
//! takes every byte after the fixed part as addresses). So the header says `AF_UNIX`, whose
//! address block has a fixed size (2 x 108 bytes), puts readable vsock names there, and carries
//! the exact addresses in an application TLV (the spec reserves 0xE0-0xEF for applications).
//! Exactly 262 bytes, every multi-byte number big-endian:
//!
//! ```text
//! offset len  value
//!   0     12  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A   signature
//!  12      1  21                                    version 2, command PROXY
//!  13      1  31                                    AF_UNIX, STREAM (also for SEQPACKET)
//!  14      2  00 F6                                 246 bytes follow
//!  16    108  "vsock:<guest cid>:<guest port>"      source address, NUL-padded
//! 124    108  "vsock:2:<host port>"                 destination address, NUL-padded
//! 232      1  E0                                    TLV PP2_TYPE_VSOCK (application range)
//! 233      2  00 10                                   16 bytes:
//! 235      4  guest CID                               source CID
//! 239      4  2                                       destination CID (the host)
//! 243      4  guest port                              source port
//! 247      4  host port                               destination port (the route's port)
//! 251      1  05                                    TLV PP2_TYPE_UNIQUE_ID
//! 252      2  00 08                                   8 bytes:
//! 254      8  connection id                           the id plugins see in conn-request
//! ```
//!
//! The vsock fields follow the order of the spec's address blocks (source address,
//! destination address, source port, destination port). CIDs and ports are 32-bit, as in
//! `struct sockaddr_vm`.

/// Header signature (the spec's `\r\n\r\n\0\r\nQUIT\n`).
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Application TLV type carrying the vsock addresses.
pub const TLV_VSOCK: u8 = 0xE0;
/// PP2_TYPE_UNIQUE_ID.
pub const TLV_UNIQUE_ID: u8 = 0x05;
/// Length of the whole header.
pub const HEADER_LEN: usize = 262;
/// Size of one AF_UNIX address in the address block.
const UNIX_ADDR: usize = 108;
/// Start of the TLVs.
const TLVS: usize = 16 + 2 * UNIX_ADDR;

/// The vsock side of a guest connection that goes to a proxied route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsockAddrs {
    pub src_cid: u32,
    pub src_port: u32,
    pub dst_cid: u32,
    pub dst_port: u32,
    /// The connection's id (as in the policy request).
    pub id: u64,
}

/// The header for one connection.
pub fn header_v2(a: &VsockAddrs) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..12].copy_from_slice(&SIGNATURE);
    h[12] = 0x21;
    h[13] = 0x31;
    h[14..16].copy_from_slice(&((HEADER_LEN - 16) as u16).to_be_bytes());
    unix_name(&mut h[16..16 + UNIX_ADDR], a.src_cid, a.src_port);
    unix_name(&mut h[16 + UNIX_ADDR..TLVS], a.dst_cid, a.dst_port);
    let t = &mut h[TLVS..];
    t[0] = TLV_VSOCK;
    t[1..3].copy_from_slice(&16u16.to_be_bytes());
    t[3..7].copy_from_slice(&a.src_cid.to_be_bytes());
    t[7..11].copy_from_slice(&a.dst_cid.to_be_bytes());
    t[11..15].copy_from_slice(&a.src_port.to_be_bytes());
    t[15..19].copy_from_slice(&a.dst_port.to_be_bytes());
    t[19] = TLV_UNIQUE_ID;
    t[20..22].copy_from_slice(&8u16.to_be_bytes());
    t[22..30].copy_from_slice(&a.id.to_be_bytes());
    h
}

/// `vsock:<cid>:<port>` into a zeroed address slot (at most 27 bytes: always fits).
fn unix_name(slot: &mut [u8], cid: u32, port: u32) {
    use std::io::Write;
    let mut w = &mut slot[..];
    let _ = write!(w, "vsock:{cid}:{port}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented layout, byte for byte (the tests crate parses it with an independent
    /// PROXY v2 parser).
    #[test]
    fn layout() {
        let h = header_v2(&VsockAddrs {
            src_cid: 3,
            src_port: 0x0102_0304,
            dst_cid: 2,
            dst_port: 1234,
            id: 0x1122_3344_5566_7788,
        });
        let mut want = vec![
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // sig
            0x21, 0x31, 0x00, 0xF6, // v2 PROXY, AF_UNIX STREAM, 246 bytes
        ];
        for name in ["vsock:3:16909060", "vsock:2:1234"] {
            let mut slot = [0u8; 108];
            slot[..name.len()].copy_from_slice(name.as_bytes());
            want.extend_from_slice(&slot);
        }
        want.extend_from_slice(&[
            0xE0, 0x00, 0x10, // vsock TLV, 16 bytes
            0, 0, 0, 3, 0, 0, 0, 2, 1, 2, 3, 4, 0, 0, 0x04, 0xD2, // cids, ports
            0x05, 0x00, 0x08, // unique id, 8 bytes
            0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,
        ]);
        assert_eq!(h.len(), want.len());
        assert_eq!(&h[..], &want[..]);
        // The longest names still fit their slots.
        let max = header_v2(&VsockAddrs {
            src_cid: u32::MAX,
            src_port: u32::MAX,
            dst_cid: u32::MAX,
            dst_port: u32::MAX,
            id: u64::MAX,
        });
        assert!(max[16..124].starts_with(b"vsock:4294967295:4294967295\0"));
    }
}
