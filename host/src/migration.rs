//! Device-state transfer (`SET_DEVICE_STATE_FD` / `CHECK_DEVICE_STATE`).
//!
//! SAVE takes a snapshot of the stopped device and the VM's plugin states at once, then a
//! thread encodes it with the serializer plugin, frames it (see [`crate::blob`]) and
//! writes it to the frontend's pipe. LOAD reads the whole blob on a thread, checks the frame,
//! decodes it inside the sandbox, checks the record against this device, and only then
//! applies it, so a failed load changes nothing. `CHECK_DEVICE_STATE` joins the thread and
//! reports its outcome.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use thiserror::Error;
use tracing::{info, warn};

use crate::blob;
use crate::gate::Gate;
use crate::plugin::types::{DeviceState, NamedPluginState};
use crate::plugin::Serializer;

/// Largest state blob accepted on LOAD.
pub const MAX_BLOB: usize = 16 << 20;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("state pipe: {0}")]
    Io(#[from] std::io::Error),
    #[error("device state larger than {MAX_BLOB} bytes")]
    TooLarge,
    #[error(transparent)]
    Frame(#[from] blob::BlobError),
    #[error("state was written by serializer `{found}`, this daemon uses `{ours}`")]
    Serializer { found: String, ours: String },
    #[error(transparent)]
    Plugin(#[from] crate::plugin::PluginError),
    #[error("state is for guest CID {found}, this VM has CID {ours}")]
    Cid { found: u64, ours: u64 },
    #[error("state has features {0:#x} this device does not offer")]
    Features(u64),
    #[error("no transfer was started")]
    NoTransfer,
    #[error("the transfer thread panicked")]
    Panicked,
    #[error("{0}")]
    Lock(&'static str),
    #[error(transparent)]
    Handover(#[from] crate::handover::HandoverError),
    #[error("state carries {found} connections, this VM allows {max}")]
    Connections { found: usize, max: usize },
}

/// What the device contributes to a saved state and checks on load.
pub struct DeviceFacts {
    pub guest_cid: u64,
    pub offered_features: u64,
    pub max_connections: usize,
}

/// The socket side of a same-host handover SAVE.
pub struct Outgoing {
    /// Control socket of the daemon taking over.
    pub control: std::path::PathBuf,
    pub fds: Vec<OwnedFd>,
}

/// The plugin side of state transfer for one VM.
pub struct StatePlugins {
    pub gate: Arc<Mutex<Gate>>,
    pub serializer: Arc<Mutex<Serializer>>,
}

impl StatePlugins {
    pub fn export(&self) -> Result<Vec<NamedPluginState>, StateError> {
        let mut g = self.gate.lock().map_err(|_| StateError::Lock("gate"))?;
        Ok(g.export_state()?)
    }

    /// Imports plugin states; on failure the previous states are put back.
    pub fn import(&self, states: &[NamedPluginState]) -> Result<(), StateError> {
        let mut g = self.gate.lock().map_err(|_| StateError::Lock("gate"))?;
        let before = g.export_state()?;
        if let Err(e) = g.import_state(states) {
            if let Err(e2) = g.import_state(&before) {
                warn!(error = %e2, "restoring plugin states after a failed load");
            }
            return Err(e.into());
        }
        Ok(())
    }
}

/// A running or finished transfer.
#[derive(Default)]
pub struct Transfer {
    thread: Option<JoinHandle<Result<(), StateError>>>,
}

impl Transfer {
    /// Starts writing `state` (plus the plugin states) to `pipe`; for a handover, the sockets
    /// go to the new daemon first, tagged with the blob's digest.
    pub fn save(
        &mut self,
        mut state: DeviceState,
        plugins: &StatePlugins,
        mut pipe: File,
        handover: Option<Outgoing>,
    ) -> Result<(), StateError> {
        self.finish_previous();
        state.plugins = plugins.export()?;
        let serializer = plugins.serializer.clone();
        self.thread = Some(std::thread::spawn(move || {
            let framed = encode(&serializer, &state)?;
            if let Some(out) = handover {
                let digest = crate::handover::digest(&framed);
                crate::handover::send(&out.control, state.guest_cid, &digest, &out.fds)?;
                info!(
                    cid = state.guest_cid,
                    sockets = out.fds.len(),
                    to = ?out.control,
                    "handover sockets sent"
                );
            }
            pipe.write_all(&framed)?;
            info!(
                cid = state.guest_cid,
                bytes = framed.len(),
                "device state saved"
            );
            Ok(())
        }));
        Ok(())
    }

    /// Starts reading a state from `pipe`; `apply` runs with the checked record and, for a
    /// same-host handover, the sockets handed over for exactly this blob.
    pub fn load(
        &mut self,
        pipe: File,
        facts: DeviceFacts,
        plugins: &StatePlugins,
        slots: Arc<crate::handover::Slots>,
        apply: impl FnOnce(&DeviceState, Option<Vec<OwnedFd>>) + Send + 'static,
    ) {
        self.finish_previous();
        let plugins = StatePlugins {
            gate: plugins.gate.clone(),
            serializer: plugins.serializer.clone(),
        };
        self.thread = Some(std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.take(MAX_BLOB as u64 + 1).read_to_end(&mut bytes)?;
            let state = {
                let mut s = plugins
                    .serializer
                    .lock()
                    .map_err(|_| StateError::Lock("serializer"))?;
                decode_checked(&bytes, &mut s, &facts)?
            };
            let fds = handed_over(&state, &bytes, &slots)?;
            plugins.import(&state.plugins)?;
            apply(&state, fds);
            info!(
                cid = state.guest_cid,
                bytes = bytes.len(),
                "device state loaded"
            );
            Ok(())
        }));
    }

    /// Waits for the transfer and returns its outcome.
    pub fn check(&mut self) -> Result<(), StateError> {
        let t = self.thread.take().ok_or(StateError::NoTransfer)?;
        t.join().map_err(|_| StateError::Panicked)?
    }

    fn finish_previous(&mut self) {
        if let Some(t) = self.thread.take() {
            if let Ok(Err(e)) = t.join() {
                warn!(error = %e, "previous state transfer failed unchecked");
            }
        }
    }
}

/// Encodes and frames a state with the VM's serializer plugin.
pub fn encode(serializer: &Mutex<Serializer>, state: &DeviceState) -> Result<Vec<u8>, StateError> {
    let mut s = serializer
        .lock()
        .map_err(|_| StateError::Lock("serializer"))?;
    let payload = s.encode(state)?;
    Ok(blob::wrap(s.name(), &payload)?)
}

/// Everything LOAD does to a received blob before it touches the device: size limit, frame
/// ([`blob::unwrap`]), serializer name, sandboxed decode with its structural checks, and the
/// checks against this device. Public so the fuzz targets (`host/fuzz`) run this exact path.
pub fn decode_checked(
    bytes: &[u8],
    serializer: &mut Serializer,
    facts: &DeviceFacts,
) -> Result<DeviceState, StateError> {
    if bytes.len() > MAX_BLOB {
        return Err(StateError::TooLarge);
    }
    let (name, payload) = blob::unwrap(bytes)?;
    if name != serializer.name() {
        return Err(StateError::Serializer {
            found: name.to_string(),
            ours: serializer.name().to_string(),
        });
    }
    let state = serializer.decode(payload)?;
    check(&state, facts)?;
    Ok(state)
}

/// The sockets handed over for this blob, checked against its connection table. A blob with
/// connections but no sockets is refused; one without connections is a migration.
fn handed_over(
    s: &DeviceState,
    blob: &[u8],
    slots: &crate::handover::Slots,
) -> Result<Option<Vec<OwnedFd>>, StateError> {
    use crate::handover::HandoverError;
    let Some(fds) = slots.take_incoming(&crate::handover::digest(blob)) else {
        if s.connections.is_empty() {
            return Ok(None);
        }
        return Err(HandoverError::NoSockets {
            conns: s.connections.len(),
        }
        .into());
    };
    if let Some(index) = s
        .connections
        .iter()
        .filter_map(|c| c.fd_index)
        .find(|i| *i as usize >= fds.len())
    {
        return Err(HandoverError::MissingSocket {
            index,
            got: fds.len(),
        }
        .into());
    }
    Ok(Some(fds))
}

/// Checks a decoded record against this device before anything is applied.
fn check(s: &DeviceState, facts: &DeviceFacts) -> Result<(), StateError> {
    if s.connections.len() > facts.max_connections {
        return Err(StateError::Connections {
            found: s.connections.len(),
            max: facts.max_connections,
        });
    }
    if s.guest_cid != facts.guest_cid {
        return Err(StateError::Cid {
            found: s.guest_cid,
            ours: facts.guest_cid,
        });
    }
    let extra = s.acked_features & !facts.offered_features;
    if extra != 0 {
        return Err(StateError::Features(extra));
    }
    Ok(())
}
