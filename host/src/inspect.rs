//! `vhost-plug state inspect FILE`: a saved device state as JSON.
//!
//! The frame ([`crate::blob`]) is checked first (magic, format, length, checksum),
//! then the payload is decoded inside the sandbox by the serializer the frame names (a
//! built-in one, or the component given with `--serializer`), exactly as a LOAD would.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use thiserror::Error;

use crate::blob::{self, BlobError};
use crate::migration::MAX_BLOB;
use crate::plugin::types::{
    ConnState, Connection, DeviceState, EventQueueOwner, ShutdownFlags, SocketType,
};
use crate::plugin::{
    builtin, PluginError, PluginKind, PluginRuntime, PluginSource, PluginSpec, RuntimeConfig,
    Serializer,
};

#[derive(Debug, Error)]
pub enum InspectError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: larger than {MAX_BLOB} bytes, the most a daemon loads", .0.display())]
    TooLarge(PathBuf),
    #[error("{}: {source}", path.display())]
    Frame {
        path: PathBuf,
        #[source]
        source: BlobError,
    },
    #[error(
        "the state was written by serializer `{0}`, which is not built in; \
         give its component with --serializer PATH"
    )]
    UnknownSerializer(String),
    #[error("decoding with serializer `{serializer}`: {source}")]
    Decode {
        serializer: String,
        #[source]
        source: PluginError,
    },
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// Reads and decodes `file`; `serializer` overrides the one the frame names.
pub fn inspect_file(file: &Path, serializer: Option<&Path>) -> Result<Value, InspectError> {
    let read = |source| InspectError::Read {
        path: file.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(file).map_err(read)?.len();
    if len > MAX_BLOB as u64 {
        return Err(InspectError::TooLarge(file.to_path_buf()));
    }
    let bytes = std::fs::read(file).map_err(read)?;
    let (name, payload) = blob::unwrap(&bytes).map_err(|source| InspectError::Frame {
        path: file.to_path_buf(),
        source,
    })?;
    let source = match serializer {
        Some(p) => PluginSource::Path(p.to_path_buf()),
        None if builtin::get(name).is_some() && name.starts_with("serializer-") => {
            PluginSource::Builtin(name.to_string())
        }
        None => return Err(InspectError::UnknownSerializer(name.to_string())),
    };
    let rt = PluginRuntime::new(RuntimeConfig {
        pooling: None,
        ..RuntimeConfig::default()
    })?;
    let plugin = rt.load(&PluginSpec {
        kind: PluginKind::Serializer,
        source,
        name: Some(name.to_string()),
        config: String::new(),
    })?;
    let mut s = Serializer::new(&rt, "inspect", &plugin)?;
    let state = s.decode(payload).map_err(|source| InspectError::Decode {
        serializer: name.to_string(),
        source,
    })?;
    Ok(json!({
        "serializer": name,
        "format": blob::FORMAT,
        "payload_bytes": payload.len(),
        "state": state_json(&state),
    }))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn flags(f: ShutdownFlags) -> Vec<&'static str> {
    let mut out = Vec::new();
    if f.contains(ShutdownFlags::NO_MORE_RECEIVE) {
        out.push("no-more-receive");
    }
    if f.contains(ShutdownFlags::NO_MORE_SEND) {
        out.push("no-more-send");
    }
    out
}

fn conn_json(c: &Connection) -> Value {
    json!({
        "local_cid": c.local_cid,
        "local_port": c.local_port,
        "peer_port": c.peer_port,
        "kind": match c.kind {
            SocketType::Stream => "stream",
            SocketType::Seqpacket => "seqpacket",
        },
        "state": match c.state {
            ConnState::Connecting => "connecting",
            ConnState::Established => "established",
            ConnState::Closing => "closing",
        },
        "credit": {
            "rx_cnt": c.credit.rx_cnt,
            "fwd_cnt": c.credit.fwd_cnt,
            "last_fwd_sent": c.credit.last_fwd_sent,
            "tx_cnt": c.credit.tx_cnt,
            "peer_buf_alloc": c.credit.peer_buf_alloc,
            "peer_fwd_cnt": c.credit.peer_fwd_cnt,
        },
        "peer_shutdown": flags(c.peer_shutdown),
        "local_shutdown": flags(c.local_shutdown),
        "pending_to_guest_hex": hex(&c.pending_to_guest),
        "pending_to_host_hex": hex(&c.pending_to_host),
        "fd_index": c.fd_index,
    })
}

/// The decoded record as JSON (plugin states and buffered bytes in hex).
pub fn state_json(s: &DeviceState) -> Value {
    json!({
        "guest_cid": s.guest_cid,
        "acked_features": format!("{:#x}", s.acked_features),
        "event_queue": {
            "owner": match s.event_queue.owner {
                EventQueueOwner::Frontend => "frontend",
                EventQueueOwner::Backend => "backend",
            },
            "driver_live": s.event_queue.driver_live,
        },
        "plugins": s.plugins.iter().map(|p| json!({
            "name": p.name,
            "schema": p.state.schema,
            "data_hex": hex(&p.state.data),
        })).collect::<Vec<_>>(),
        "connections": s.connections.iter().map(conn_json).collect::<Vec<_>>(),
    })
}
