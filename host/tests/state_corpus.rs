//! The device-state LOAD path past the frame: every input of the `state_blob` fuzz corpus
//! (host/fuzz/corpus/state_blob), and single-byte corruptions of each, go through
//! `migration::decode_checked` (frame check, the default serializer's decode inside its
//! sandbox, the host's checks), the function a `SET_DEVICE_STATE_FD` LOAD itself calls.
//!
//! The fuzz target covers the frame without wasmtime; this covers what the sandboxed decoder
//! and the checks make of what passes the frame. Inputs use the fuzz target's encoding: the
//! first byte odd = the rest is a serializer payload given a valid frame, even = the rest is
//! the whole blob as read from the pipe.
//!
//! Checked: the serializer never fails (trap, deadline, memory limit) on any input, it refuses
//! bad bytes with an error; an accepted record is for this device (CID, features, connection
//! count) and survives encode -> decode unchanged; at least one seed is accepted.

use std::path::Path;
use std::time::Duration;

use vhost_plug::blob;
use vhost_plug::migration::{decode_checked, DeviceFacts, StateError};
use vhost_plug::plugin::{
    PluginError, PluginKind, PluginRuntime, PluginSpec, RuntimeConfig, Serializer,
};

const GUEST_CID: u64 = 3;
/// A small connection limit, so the host's table-size check is reached.
const MAX_CONNECTIONS: usize = 8;
/// What the backend offers: VERSION_1 (32), NOTIFY_ON_EMPTY (24), RING_EVENT_IDX (29),
/// VHOST_USER_F_PROTOCOL_FEATURES (30) and vsock's SEQPACKET (0).
const OFFERED: u64 = 1 << 32 | 1 << 24 | 1 << 29 | 1 << 30 | 1;

fn serializer() -> Serializer {
    let rt = PluginRuntime::new(RuntimeConfig {
        // A loaded machine must not turn scheduling delays into failures.
        call_deadline: Duration::from_secs(5),
        pooling: None,
        ..RuntimeConfig::default()
    })
    .expect("plugin runtime");
    let spec = PluginSpec::defaults()
        .into_iter()
        .find(|s| s.kind == PluginKind::Serializer)
        .expect("a default serializer");
    let plugin = rt.load(&spec).expect("load the default serializer");
    Serializer::new(&rt, "state-corpus", &plugin).expect("instantiate the serializer")
}

/// Runs one input; true when the record was accepted.
fn run(ser: &mut Serializer, data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let framed;
    let input = if mode & 1 == 1 {
        framed = blob::wrap(ser.name(), rest).expect("frame a payload");
        &framed[..]
    } else {
        rest
    };
    let facts = DeviceFacts {
        guest_cid: GUEST_CID,
        offered_features: OFFERED,
        max_connections: MAX_CONNECTIONS,
    };
    match decode_checked(input, ser, &facts) {
        Ok(state) => {
            assert_eq!(state.guest_cid, GUEST_CID);
            assert_eq!(state.acked_features & !OFFERED, 0);
            assert!(state.connections.len() <= MAX_CONNECTIONS);
            let again = ser.encode(&state).expect("encode an accepted record");
            let back = ser.decode(&again).expect("decode what was just encoded");
            assert_eq!(back, state, "round trip");
            true
        }
        Err(StateError::Plugin(
            e @ (PluginError::Call { .. } | PluginError::Quarantined { .. }),
        )) => {
            panic!("the serializer failed instead of refusing the input: {e}")
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

#[test]
fn corpus_through_the_whole_load_path() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/state_blob");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .expect("read the state_blob corpus")
        .map(|e| e.expect("corpus entry").path())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    let mut ser = serializer();
    let mut accepted = 0;
    let mut inputs = 0;
    for seed in &seeds {
        let data = std::fs::read(seed).expect("read seed");
        inputs += 1;
        accepted += usize::from(run(&mut ser, &data));
        // Every byte of the payload (past the mode byte), flipped one at a time, a stride
        // apart so big seeds stay quick, plus truncations.
        let stride = (data.len() / 64).max(1);
        for at in (1..data.len()).step_by(stride) {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = data.clone();
                bad[at] ^= mask;
                inputs += 1;
                run(&mut ser, &bad);
            }
            inputs += 1;
            run(&mut ser, &data[..at]);
        }
    }
    assert!(accepted > 0, "no seed of {} was accepted", seeds.len());
    assert!(inputs > seeds.len());
}
