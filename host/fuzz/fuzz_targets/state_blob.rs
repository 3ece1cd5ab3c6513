//! The state-blob frame a `SET_DEVICE_STATE_FD` LOAD reads first (`blob::unwrap`), before any
//! serializer plugin sees a byte.
//!
//! The first input byte picks the mode: odd = the rest is a serializer payload that gets a
//! valid frame (so the unwrap path past the checksum is reached), even = the rest is the whole
//! blob as read from the pipe.
//!
//! Checked: no panic; a frame is accepted exactly when it is what `wrap` makes of the name and
//! payload it yields (magic, format, name length, payload length and checksum all bind), and
//! every refusal renders. What the serializer then does with an accepted payload is checked by
//! `host/tests/state_corpus.rs`, which replays this target's corpus through the whole LOAD path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_plug_parse::blob::{self, BlobError};

/// The name the daemon's default serializer frames its payloads with.
const SERIALIZER: &str = "serializer-postcard";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        let framed = blob::wrap(SERIALIZER, rest).expect("frame a payload");
        let (name, payload) = blob::unwrap(&framed).expect("unwrap what wrap made");
        assert_eq!((name, payload), (SERIALIZER, rest));
        // Any single flipped byte of the frame or payload is refused.
        if let Some(last) = framed.len().checked_sub(1) {
            let at = usize::from(rest.first().copied().unwrap_or(0)) % (last + 1);
            let mut bad = framed.clone();
            bad[at] ^= 0x01;
            if let Ok((n, p)) = blob::unwrap(&bad) {
                // Only the name's bytes can change and stay a valid frame.
                assert!(at >= 11 && at < 11 + SERIALIZER.len(), "flip at {at} accepted");
                assert_ne!(n, SERIALIZER);
                assert_eq!(p, rest);
            }
        }
        return;
    }
    match blob::unwrap(rest) {
        Ok((name, payload)) => {
            let again = blob::wrap(name, payload).expect("rewrap an accepted frame");
            assert_eq!(again, rest, "an accepted frame is exactly what wrap makes");
        }
        Err(e @ (BlobError::Magic
        | BlobError::Format(_)
        | BlobError::Truncated
        | BlobError::Length { .. }
        | BlobError::Checksum
        | BlobError::Name)) => {
            let _ = e.to_string();
        }
    }
});
