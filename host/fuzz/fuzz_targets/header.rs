//! The 44-byte virtio-vsock packet header: parsing any bytes never panics, every field comes
//! from its spec offset (little-endian), and parse/serialize round-trip exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_plug_parse::vsock::header::{Header, SockType, HDR_LEN};

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |acc, &x| (acc << 8) | u64::from(x))
}

fuzz_target!(|data: &[u8]| {
    let Some(raw) = data.first_chunk::<HDR_LEN>() else {
        return;
    };
    let h = Header::from_le_bytes(raw);
    // Field offsets of virtio spec 5.10.6, read independently of the parser.
    assert_eq!(h.src_cid, le(&raw[0..8]));
    assert_eq!(h.dst_cid, le(&raw[8..16]));
    assert_eq!(u64::from(h.src_port), le(&raw[16..20]));
    assert_eq!(u64::from(h.dst_port), le(&raw[20..24]));
    assert_eq!(u64::from(h.len), le(&raw[24..28]));
    assert_eq!(u64::from(h.type_), le(&raw[28..30]));
    assert_eq!(u64::from(h.op), le(&raw[30..32]));
    assert_eq!(u64::from(h.flags), le(&raw[32..36]));
    assert_eq!(u64::from(h.buf_alloc), le(&raw[36..40]));
    assert_eq!(u64::from(h.fwd_cnt), le(&raw[40..44]));
    assert_eq!(&h.to_le_bytes(), raw);
    if let Some(kind) = SockType::from_wire(h.type_) {
        assert_eq!(kind.wire(), h.type_);
    }
});
