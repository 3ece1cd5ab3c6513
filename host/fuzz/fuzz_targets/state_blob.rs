//! The device-state LOAD path (`SET_DEVICE_STATE_FD`): unframing, the embedded default
//! serializer plugin's decode (in its sandbox) and the checks `migration` applies before a
//! record is used, all through `migration::decode_checked`, the function LOAD itself calls.
//!
//! The first input byte picks the mode: odd = the rest is a serializer payload that gets a
//! valid frame (so the fuzzer reaches the decoder past the checksum), even = the rest is the
//! whole blob as read from the pipe.
//!
//! Checked: no panic; the serializer never fails (trap, deadline, memory limit) on any input,
//! it refuses bad bytes with an error; an accepted record is for this device (CID, features)
//! and survives encode -> decode unchanged.
#![no_main]

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vhost_plug::migration::{decode_checked, DeviceFacts, StateError};
use vhost_plug::plugin::{
    blob, PluginError, PluginKind, PluginRuntime, PluginSpec, RuntimeConfig, Serializer,
};

const GUEST_CID: u64 = 3;
/// A small connection limit, so the fuzzer reaches the host's table-size check.
const MAX_CONNECTIONS: usize = 8;
/// What the backend offers (backend.rs `features()`): VERSION_1 (32), NOTIFY_ON_EMPTY (24),
/// RING_EVENT_IDX (29), VHOST_USER_F_PROTOCOL_FEATURES (30) and vsock's SEQPACKET (0).
const OFFERED: u64 = 1 << 32 | 1 << 24 | 1 << 29 | 1 << 30 | 1;

/// One serializer instance for the whole run (instantiating per input would dominate).
fn serializer() -> &'static Mutex<Serializer> {
    static SER: OnceLock<Mutex<Serializer>> = OnceLock::new();
    SER.get_or_init(|| {
        let rt = PluginRuntime::new(RuntimeConfig {
            // A shared machine must not turn scheduling delays into findings; a decode that
            // really takes a second is one.
            call_deadline: Duration::from_secs(1),
            pooling: None,
            ..RuntimeConfig::default()
        })
        .expect("plugin runtime");
        let spec = PluginSpec::defaults()
            .into_iter()
            .find(|s| s.kind == PluginKind::Serializer)
            .expect("a default serializer");
        let plugin = rt.load(&spec).expect("load the default serializer");
        Mutex::new(Serializer::new(&rt, "fuzz", &plugin).expect("instantiate the serializer"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut ser = serializer().lock().unwrap_or_else(|p| p.into_inner());
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
    match decode_checked(input, &mut ser, &facts) {
        Ok(state) => {
            assert_eq!(state.guest_cid, GUEST_CID);
            assert_eq!(state.acked_features & !OFFERED, 0);
            assert!(state.connections.len() <= MAX_CONNECTIONS);
            let again = ser.encode(&state).expect("encode an accepted record");
            let back = ser.decode(&again).expect("decode what was just encoded");
            assert_eq!(back, state, "round trip");
        }
        Err(StateError::Plugin(
            e @ (PluginError::Call { .. } | PluginError::Quarantined { .. }),
        )) => {
            panic!("the serializer failed instead of refusing the input: {e}")
        }
        Err(e) => {
            // Every refusal renders (it is logged and reported to the frontend).
            let _ = e.to_string();
        }
    }
});
