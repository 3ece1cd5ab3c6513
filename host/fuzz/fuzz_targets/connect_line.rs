//! The host-side `CONNECT <port>` line (newline already removed): never panics, and accepts
//! exactly `CONNECT `, an optional `+`, 1+ ASCII digits with a value that fits a u32, and an
//! optional trailing `\r` (a reference parser written independently below).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_plug_parse::connect::parse_connect_line;

fn reference(line: &[u8]) -> Option<u32> {
    let rest = line.strip_prefix(b"CONNECT ")?;
    let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
    let digits = rest.strip_prefix(b"+").unwrap_or(rest);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u32, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u32::from(d - b'0'))
    })
}

fuzz_target!(|data: &[u8]| {
    assert_eq!(parse_connect_line(data), reference(data), "{data:?}");
});
