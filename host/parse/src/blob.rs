//! The framing around a serializer's output in a state transfer (`SET_DEVICE_STATE_FD`):
//!
//! ```text
//! magic "VHPLUGST" | format u16 LE (=1) | name-len u8 | serializer name | payload-len u64 LE |
//! crc32 (IEEE) of payload u32 LE | payload (the serializer plugin's bytes, with its own schema)
//! ```
//!
//! The name tells the destination which serializer plugin must decode the payload; the length
//! and checksum catch truncated or corrupted transfers before any plugin sees the bytes.

pub const MAGIC: &[u8; 8] = b"VHPLUGST";
pub const FORMAT: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("not a vhost-plug device state (bad magic)")]
    Magic,
    #[error("device state format {0} is not supported (this daemon reads format {FORMAT})")]
    Format(u16),
    #[error("device state truncated")]
    Truncated,
    #[error("device state payload is {got} bytes, header says {want}")]
    Length { got: u64, want: u64 },
    #[error("device state checksum mismatch")]
    Checksum,
    #[error("serializer name must be 1-255 bytes of UTF-8")]
    Name,
}

/// CRC-32 (IEEE 802.3, reflected, as zlib).
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// Frame `payload` produced by serializer `name`.
pub fn wrap(name: &str, payload: &[u8]) -> Result<Vec<u8>, BlobError> {
    if name.is_empty() || name.len() > 255 {
        return Err(BlobError::Name);
    }
    let mut out = Vec::with_capacity(8 + 2 + 1 + name.len() + 12 + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Check the frame; returns the serializer name and the payload.
pub fn unwrap(blob: &[u8]) -> Result<(&str, &[u8]), BlobError> {
    let take = |at: &mut usize, n: usize| -> Result<&[u8], BlobError> {
        let s = blob
            .get(*at..at.checked_add(n).ok_or(BlobError::Truncated)?)
            .ok_or(BlobError::Truncated)?;
        *at += n;
        Ok(s)
    };
    let mut at = 0;
    if take(&mut at, 8).map_err(|_| BlobError::Magic)? != MAGIC {
        return Err(BlobError::Magic);
    }
    let format = u16::from_le_bytes(take(&mut at, 2)?.try_into().unwrap_or_default());
    if format != FORMAT {
        return Err(BlobError::Format(format));
    }
    let n = take(&mut at, 1)?[0] as usize;
    let name = std::str::from_utf8(take(&mut at, n)?).map_err(|_| BlobError::Name)?;
    if name.is_empty() {
        return Err(BlobError::Name);
    }
    let len = u64::from_le_bytes(take(&mut at, 8)?.try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(take(&mut at, 4)?.try_into().unwrap_or_default());
    let payload = &blob[at..];
    if payload.len() as u64 != len {
        return Err(BlobError::Length {
            got: payload.len() as u64,
            want: len,
        });
    }
    if crc32(payload) != crc {
        return Err(BlobError::Checksum);
    }
    Ok((name, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_reference() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn wrap_unwrap() {
        let b = wrap("serializer-postcard", b"payload").unwrap();
        assert_eq!(
            unwrap(&b).unwrap(),
            ("serializer-postcard", &b"payload"[..])
        );
        assert_eq!(
            unwrap(&b[..b.len() - 1]),
            Err(BlobError::Length { got: 6, want: 7 })
        );
        let mut c = b.clone();
        *c.last_mut().unwrap() ^= 1;
        assert_eq!(unwrap(&c), Err(BlobError::Checksum));
        let mut f = b.clone();
        f[8] = 9;
        assert_eq!(unwrap(&f), Err(BlobError::Format(9)));
        assert_eq!(unwrap(b"VHPLUG"), Err(BlobError::Magic));
        assert_eq!(unwrap(&b[..12]), Err(BlobError::Truncated));
        assert_eq!(wrap("", b""), Err(BlobError::Name));
    }
}
