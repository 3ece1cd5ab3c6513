//! The hybrid-vsock handshake line a host program sends on the VM's unix socket.

/// Longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 64;

/// Parses `CONNECT <port>` (the trailing `\n` already removed; a `\r` before it is accepted).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let mut parts = s.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("CONNECT"), Some(port), None) => port.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::parse_connect_line;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect_line(b"CONNECT 1234\r"), Some(1234));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect_line(b"CONNECT"), None);
        assert_eq!(parse_connect_line(b"CONNECT  1"), None);
        assert_eq!(parse_connect_line(b"connect 1"), None);
        assert_eq!(parse_connect_line(b"CONNECT 1 2"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(&[0xff, 0xfe]), None);
    }
}
