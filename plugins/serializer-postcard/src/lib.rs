//! serializer-postcard (default): compact binary device state.
//!
//! Layout: magic `VPPC`, schema u16 LE (currently 1), then the postcard encoding of the schema's
//! record (see model.rs). Decoding refuses an unknown magic, an unknown (newer) schema and
//! trailing bytes.

mod model;

use vhost_plug_sdk_serializer::*;

const MAGIC: &[u8; 4] = b"VPPC";

struct Postcard;

impl SerializerPlugin for Postcard {
    fn encode(s: DeviceState) -> Result<Vec<u8>, String> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(model::SCHEMA as u16).to_le_bytes());
        let body = postcard::to_allocvec(&model::from_wit(s)).map_err(|e| e.to_string())?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    fn decode(b: Vec<u8>) -> Result<DeviceState, String> {
        if b.len() < 6 || &b[..4] != MAGIC {
            return Err("serializer-postcard: not a postcard device state (bad magic)".into());
        }
        let schema = u16::from_le_bytes([b[4], b[5]]) as u32;
        if schema != model::SCHEMA {
            return Err(format!(
                "serializer-postcard: state schema {schema} is not supported (this plugin reads schema {})",
                model::SCHEMA
            ));
        }
        let (state, rest): (model::StateV1, &[u8]) =
            postcard::take_from_bytes(&b[6..]).map_err(|e| format!("serializer-postcard: {e}"))?;
        if !rest.is_empty() {
            return Err(format!(
                "serializer-postcard: {} trailing bytes",
                rest.len()
            ));
        }
        model::to_wit(state)
    }
}

vhost_plug_sdk_serializer::export_serializer!(Postcard);
