//! serializer-json: human-readable device state (pretty JSON; byte strings in hex).
//!
//! `{"format": "vhost-plug/device-state", "schema": 1, "state": {...}}`. Decoding refuses another
//! format tag and an unknown (newer) schema.

#[path = "../../serializer-postcard/src/model.rs"]
mod model;

use serde::{Deserialize, Serialize};
use vhost_plug_sdk_serializer::*;

const FORMAT: &str = "vhost-plug/device-state";

#[derive(Serialize)]
struct Envelope<'a> {
    format: &'a str,
    schema: u32,
    state: model::StateV1,
}

#[derive(Deserialize)]
struct Header {
    format: String,
    schema: u32,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    state: model::StateV1,
}

struct Json;

impl SerializerPlugin for Json {
    fn encode(s: DeviceState) -> Result<Vec<u8>, String> {
        let env = Envelope {
            format: FORMAT,
            schema: model::SCHEMA,
            state: model::from_wit(s),
        };
        serde_json::to_vec_pretty(&env).map_err(|e| e.to_string())
    }

    fn decode(b: Vec<u8>) -> Result<DeviceState, String> {
        let h: Header = serde_json::from_slice(&b).map_err(|e| format!("serializer-json: {e}"))?;
        if h.format != FORMAT {
            return Err(format!(
                "serializer-json: format `{}` is not `{FORMAT}`",
                h.format
            ));
        }
        if h.schema != model::SCHEMA {
            return Err(format!(
                "serializer-json: state schema {} is not supported (this plugin reads schema {})",
                h.schema,
                model::SCHEMA
            ));
        }
        let env: EnvelopeIn =
            serde_json::from_slice(&b).map_err(|e| format!("serializer-json: {e}"))?;
        model::to_wit(env.state)
    }
}

vhost_plug_sdk_serializer::export_serializer!(Json);
