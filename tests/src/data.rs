//! Deterministic payloads and checksums for end-to-end integrity checks.

use std::io::{self, Read, Write};

/// xorshift64* byte stream: cheap, deterministic, not compressible by accident.
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern {
            state: seed ^ 0x9e37_79b9_7f4a_7c15 | 1,
        }
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let v = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&v[..n]);
        }
    }

    /// `len` bytes of the stream.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        Pattern::new(seed).fill(&mut v);
        v
    }
}

/// Byte count and CRC-32 of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    pub bytes: u64,
    pub crc: u32,
}

/// Running digest.
#[derive(Default)]
pub struct Digester {
    bytes: u64,
    h: crc32fast::Hasher,
}

impl Digester {
    pub fn update(&mut self, b: &[u8]) {
        self.bytes += b.len() as u64;
        self.h.update(b);
    }

    /// Continues the digest as if the bytes `other` digested came next (CRC combination: no
    /// pass over the bytes), so a sender repeating one prebuilt buffer digests it once.
    pub fn append(&mut self, other: &Digester) {
        self.bytes += other.bytes;
        self.h.combine(&other.h);
    }

    pub fn finish(self) -> Digest {
        Digest {
            bytes: self.bytes,
            crc: self.h.finalize(),
        }
    }
}

pub fn digest(b: &[u8]) -> Digest {
    let mut d = Digester::default();
    d.update(b);
    d.finish()
}

/// Writes `total` pattern bytes in writes of `chunk`; returns what was sent.
pub fn send_pattern<W: Write>(mut w: W, seed: u64, total: u64, chunk: usize) -> io::Result<Digest> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; chunk.max(1)];
    let mut d = Digester::default();
    let mut left = total;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        d.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(d.finish())
}

/// Reads until end of stream (or `limit` bytes, whichever first); returns what arrived.
/// Writes the pattern `seed` in 16 KiB chunks until `stop` is set; returns what it sent.
pub fn send_until<W: Write>(
    mut w: W,
    seed: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> io::Result<Digest> {
    let mut p = Pattern::new(seed);
    let mut d = Digester::default();
    let mut buf = vec![0u8; 16 * 1024];
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        p.fill(&mut buf);
        w.write_all(&buf)?;
        d.update(&buf);
    }
    Ok(d.finish())
}

pub fn recv_digest<R: Read>(mut r: R, limit: u64, chunk: usize) -> io::Result<Digest> {
    let mut buf = vec![0u8; chunk.max(1)];
    let mut d = Digester::default();
    while d.bytes < limit {
        let want = (buf.len() as u64).min(limit - d.bytes) as usize;
        let n = match r.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        d.update(&buf[..n]);
    }
    Ok(d.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_seeded() {
        let a = Pattern::bytes(1, 100);
        assert_eq!(a, Pattern::bytes(1, 100));
        assert_ne!(a, Pattern::bytes(2, 100));
        // Chunking does not change the stream when chunks are multiples of 8.
        let mut p = Pattern::new(1);
        let mut b = vec![0u8; 100];
        p.fill(&mut b[..48]);
        p.fill(&mut b[48..]);
        assert_eq!(a, b);
    }

    #[test]
    fn send_and_recv_digests_match() {
        let mut sink = Vec::new();
        let sent = send_pattern(&mut sink, 7, 10_000, 4096).unwrap();
        let got = recv_digest(&sink[..], u64::MAX, 1000).unwrap();
        assert_eq!(sent, got);
        assert_eq!(got.bytes, 10_000);
        assert_eq!(digest(&sink), got);
    }

    #[test]
    fn appended_digest_equals_digest_of_the_concatenation() {
        let (a, b) = (Pattern::bytes(1, 1000), Pattern::bytes(2, 333));
        let mut d = Digester::default();
        d.update(&a);
        let mut db = Digester::default();
        db.update(&b);
        d.append(&db);
        d.append(&db);
        assert_eq!(d.finish(), digest(&[&a[..], &b[..], &b[..]].concat()));
    }
}
