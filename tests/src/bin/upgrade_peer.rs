//! Stands in for a new daemon of a live upgrade (tests/tests/upgrade.rs): says hello on the
//! inherited channel with hand-over record version 999, prints the old daemon's answer and
//! exits. The old daemon must refuse it and keep serving.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;

fn main() {
    let Some(fd) = std::env::var("VHOST_PLUG_UPGRADE_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        eprintln!("upgrade_peer: no VHOST_PLUG_UPGRADE_FD");
        std::process::exit(2);
    };
    // SAFETY: the old daemon passed this fd for exactly this; nothing else owns it.
    let mut s = unsafe { UnixStream::from_raw_fd(fd) };
    let json = format!(
        r#"{{"msg":"hello","record_version":999,"version":"0.0.0","pid":{}}}"#,
        std::process::id()
    );
    // The channel's framing: a 16-byte prefix (header length, fd count, blob length), then
    // the header bytes (SOCK_SEQPACKET: one message each).
    let mut prefix = Vec::new();
    prefix.extend_from_slice(&(json.len() as u32).to_le_bytes());
    prefix.extend_from_slice(&0u32.to_le_bytes());
    prefix.extend_from_slice(&0u64.to_le_bytes());
    if s.write_all(&prefix)
        .and_then(|_| s.write_all(json.as_bytes()))
        .is_err()
    {
        std::process::exit(2);
    }
    let mut buf = vec![0u8; 4096];
    let mut answer = Vec::new();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    eprintln!("upgrade_peer: answer {}", String::from_utf8_lossy(&answer));
    std::process::exit(3);
}
