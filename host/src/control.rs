//! The control socket: one JSON request per line, one JSON answer per line.
//!
//! The socket is created with mode 0600 and every client's uid is checked with SO_PEERCRED:
//! only root and the daemon's own user may talk to it. Requests are small and bounded; each
//! client is served on its own short-lived thread.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tracing::{info, warn};

use crate::gate::PluginSet;
use crate::handover;
use crate::migration::{self, StatePlugins};
use crate::plugin::types::{DeviceState, EventQueueOwner, EventQueueState};
use crate::plugin::PluginSpec;
use crate::stats::TransferDir;
use crate::vm::VmHandle;

pub use crate::ctlproto::Request;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    vms: Arc<Vec<VmHandle>>,
    plugins: Arc<PluginSet>,
}

impl ControlServer {
    pub fn bind(path: &Path, vms: Vec<VmHandle>, plugins: Arc<PluginSet>) -> std::io::Result<Self> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // Created 0600 from the start: no window in which others could connect.
        // SAFETY: umask only changes this process's file creation mask; restored below.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = listener?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            vms: Arc::new(vms),
            plugins,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients forever.
    pub fn run(self) {
        info!(path = ?self.path, "control socket ready");
        for conn in self.listener.incoming() {
            let Ok(conn) = conn else { continue };
            if !peer_allowed(&conn) {
                warn!("control socket: refused a client of another user");
                continue;
            }
            let vms = self.vms.clone();
            let plugins = self.plugins.clone();
            let _ = std::thread::Builder::new()
                .name("control".into())
                .spawn(move || serve(conn, &vms, &plugins));
        }
    }
}

/// Only root and our own uid.
fn peer_allowed(s: &UnixStream) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for getsockopt to write a ucred.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    r == 0 && (cred.uid == 0 || cred.uid == me)
}

fn serve(conn: UnixStream, vms: &[VmHandle], plugins: &PluginSet) {
    let _ = conn.set_read_timeout(Some(CLIENT_TIMEOUT));
    let mut line = String::new();
    let Ok(reader) = conn.try_clone() else { return };
    let mut reader = BufReader::new(reader.take(MAX_REQUEST));
    let answer = match reader.read_line(&mut line) {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(Request::HandoverFds { vm, digest, count }) => {
                handover_fds(&conn, vms, vm, &digest, count)
            }
            Ok(req) => handle(req, vms, plugins),
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        },
        Err(e) => json!({"ok": false, "error": format!("reading request: {e}")}),
    };
    let mut conn = conn;
    let _ = writeln!(conn, "{answer}");
    if crate::upgrade::completed() {
        // Every VM and socket belongs to the new daemon now.
        let _ = conn.flush();
        std::process::exit(0);
    }
}

/// Takes the sockets of a handover for VM `vm` and parks them until the LOAD of the blob with
/// `digest`.
fn handover_fds(conn: &UnixStream, vms: &[VmHandle], vm: u64, digest: &str, count: usize) -> Value {
    let Some(v) = vms.iter().find(|v| v.cid == vm) else {
        return json!({"ok": false, "error": format!("no VM with CID {vm}")});
    };
    let Some(digest) = handover::parse_hex(digest) else {
        return json!({"ok": false, "error": "digest is not 64 hex digits"});
    };
    if count > v.max_connections {
        let e = handover::HandoverError::TooMany {
            count,
            max: v.max_connections,
        };
        return json!({"ok": false, "error": e.to_string()});
    }
    let mut w = conn;
    if writeln!(w, "{}", json!({"ok": true})).is_err() {
        return json!({"ok": false});
    }
    match handover::receive(conn, count) {
        Ok(fds) => {
            info!(vm, sockets = fds.len(), "handover sockets received");
            v.handover.put_incoming(handover::Incoming { digest, fds });
            json!({"ok": true, "received": count})
        }
        Err(e) => {
            warn!(vm, error = %e, "handover sockets");
            json!({"ok": false, "error": e.to_string()})
        }
    }
}

pub fn handle(req: Request, vms: &[VmHandle], plugins: &PluginSet) -> Value {
    match req {
        Request::Status => {
            let list: Vec<Value> = vms
                .iter()
                .map(|v| {
                    let names: Vec<String> =
                        v.gate.lock().map(|g| g.plugin_names()).unwrap_or_default();
                    json!({
                        "cid": v.cid,
                        "frontend": v.stats.frontend.load(Ordering::Relaxed),
                        "connections": v.stats.connections.load(Ordering::Relaxed),
                        "plugins": names,
                    })
                })
                .collect();
            json!({"ok": true, "version": env!("CARGO_PKG_VERSION"), "vms": list})
        }
        Request::Plugins => {
            let list: Vec<Value> = vms
                .iter()
                .flat_map(|v| {
                    let stats = v.gate.lock().map(|g| g.plugin_stats()).unwrap_or_default();
                    stats.into_iter().map(move |(name, s)| {
                        json!({
                            "vm": v.cid,
                            "plugin": name,
                            "calls": s.calls,
                            "denials": s.denials,
                            "failures": s.failures,
                            "quarantined": s.quarantined,
                            "mean_call_ns": s.total_call_ns.checked_div(s.calls).unwrap_or(0),
                            "max_call_ns": s.max_call_ns,
                        })
                    })
                })
                .collect();
            json!({"ok": true, "plugins": list})
        }
        Request::Swap { spec, replace, vm } => swap(&spec, replace, vm, vms, plugins),
        Request::Handover { to, vm } => {
            let armed: Vec<u64> = vms
                .iter()
                .filter(|v| vm.is_none_or(|c| c == v.cid))
                .map(|v| {
                    v.handover.arm(to.clone());
                    v.cid
                })
                .collect();
            if armed.is_empty() {
                return json!({"ok": false, "error": "no such VM"});
            }
            info!(?armed, to = ?to, "next SAVE is a same-host handover");
            json!({"ok": true, "armed": armed})
        }
        Request::Save { file, vm } => match pick_vm(vms, vm) {
            Ok(v) => {
                let r = save_file(v, &file);
                v.stats.counters.transfer(TransferDir::Save, r.is_ok());
                match r {
                    Ok(bytes) => json!({"ok": true, "vm": v.cid, "file": file, "bytes": bytes}),
                    Err(e) => json!({"ok": false, "error": e}),
                }
            }
            Err(e) => json!({"ok": false, "error": e}),
        },
        Request::Load { file, vm } => match pick_vm(vms, vm) {
            Ok(v) => {
                let r = load_file(v, &file);
                v.stats.counters.transfer(TransferDir::Load, r.is_ok());
                match r {
                    Ok(names) => json!({"ok": true, "vm": v.cid, "plugins": names}),
                    Err(e) => json!({"ok": false, "error": e}),
                }
            }
            Err(e) => json!({"ok": false, "error": e}),
        },
        Request::HandoverFds { .. } => {
            json!({"ok": false, "error": "handover-fds needs the socket it arrives on"})
        }
        Request::Conns { vm } => conns(vm, vms),
        Request::Upgrade { binary } => match crate::upgrade::run_old(binary, vms) {
            Ok(r) => json!({"ok": true, "pid": r.pid, "vms": r.vms, "pause_us": r.pause_us,
                            "total_ms": r.total_ms}),
            Err(e) => {
                warn!(error = %e, "live upgrade failed; this daemon keeps serving");
                json!({"ok": false, "error": e.to_string()})
            }
        },
    }
}

/// Every selected VM's connection table, read on its worker thread (see [`crate::connlist`]).
fn conns(vm: Option<u64>, vms: &[VmHandle]) -> Value {
    let mut list = Vec::new();
    let mut truncated = Vec::new();
    let mut seen = false;
    for v in vms.iter().filter(|v| vm.is_none_or(|c| c == v.cid)) {
        seen = true;
        // No frontend, no worker to ask and no connections.
        if !v.stats.frontend.load(Ordering::Relaxed) {
            continue;
        }
        match v.stats.conns.request(crate::connlist::SNAPSHOT_TIMEOUT) {
            Ok(s) => {
                if s.total > s.rows.len() {
                    truncated.push(json!({"vm": v.cid, "total": s.total, "listed": s.rows.len()}));
                }
                list.extend(s.rows);
            }
            Err(e) => return json!({"ok": false, "error": format!("VM {}: {e}", v.cid)}),
        }
    }
    if !seen {
        return json!({"ok": false, "error": "no such VM"});
    }
    json!({"ok": true, "connections": list, "truncated": truncated})
}

/// The VM a request names, or the only one.
fn pick_vm(vms: &[VmHandle], vm: Option<u64>) -> Result<&VmHandle, String> {
    match vm {
        Some(cid) => vms
            .iter()
            .find(|v| v.cid == cid)
            .ok_or_else(|| format!("no VM with CID {cid}")),
        None if vms.len() == 1 => Ok(&vms[0]),
        None => Err("this daemon serves several VMs: name one with --vm".into()),
    }
}

fn state_plugins(v: &VmHandle) -> StatePlugins {
    StatePlugins {
        gate: v.gate.clone(),
        serializer: v.serializer.clone(),
    }
}

/// A migration-style state of the VM, written 0600 and renamed into place.
fn save_file(v: &VmHandle, file: &Path) -> Result<usize, String> {
    let r = Ordering::Relaxed;
    let state = DeviceState {
        guest_cid: v.cid,
        acked_features: v.stats.facts.acked_features.load(r),
        event_queue: EventQueueState {
            owner: if v.stats.facts.event_queue_owned.load(r) {
                EventQueueOwner::Backend
            } else {
                EventQueueOwner::Frontend
            },
            driver_live: v.stats.facts.driver_live.load(r),
        },
        plugins: state_plugins(v).export().map_err(|e| e.to_string())?,
        connections: Vec::new(),
    };
    let blob = migration::encode(&v.serializer, &state).map_err(|e| e.to_string())?;
    crate::sys::write_private_file(file, &blob)
        .map_err(|e| format!("writing {}: {e}", file.display()))?;
    info!(vm = v.cid, file = ?file, bytes = blob.len(), "state saved to file");
    Ok(blob.len())
}

/// Decodes and checks a state file, then imports its plugin states (all or nothing).
fn load_file(v: &VmHandle, file: &Path) -> Result<Vec<String>, String> {
    let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut bytes = Vec::new();
    f.take(migration::MAX_BLOB as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let facts = migration::DeviceFacts {
        guest_cid: v.cid,
        offered_features: crate::backend::OFFERED_FEATURES,
        max_connections: v.max_connections,
    };
    let state = {
        let mut s = v
            .serializer
            .lock()
            .map_err(|_| format!("{}: serializer lock poisoned", file.display()))?;
        migration::decode_checked(&bytes, &mut s, &facts)
            .map_err(|e| format!("{}: {e}", file.display()))?
    };
    if !state.connections.is_empty() {
        return Err(format!(
            "{}: a handover state (with connections) is loaded by a VMM, not by ctl load",
            file.display()
        ));
    }
    state_plugins(v)
        .import(&state.plugins)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    info!(vm = v.cid, file = ?file, "plugin states loaded from file");
    Ok(state.plugins.into_iter().map(|p| p.name).collect())
}

/// Pauses each VM's connection dispatch (its gate lock), exports the old plugin's state,
/// instantiates the new one, imports the state and resumes. Rings keep running.
fn swap(
    spec: &str,
    replace: Option<String>,
    vm: Option<u64>,
    vms: &[VmHandle],
    plugins: &PluginSet,
) -> Value {
    let spec: PluginSpec = match spec.parse() {
        Ok(s) => s,
        Err(e) => return json!({"ok": false, "error": e.to_string()}),
    };
    let new = match plugins.runtime().load(&spec) {
        Ok(p) => p,
        Err(e) => return json!({"ok": false, "error": e.to_string()}),
    };
    let old_name = replace.unwrap_or_else(|| spec.name());
    let mut done = Vec::new();
    for v in vms.iter().filter(|v| vm.is_none_or(|c| c == v.cid)) {
        let t0 = Instant::now();
        let r = match v.gate.lock() {
            Ok(mut g) => g.chain_mut().replace(&old_name, new.clone()),
            Err(_) => return json!({"ok": false, "error": "gate lock poisoned"}),
        };
        let pause_us = t0.elapsed().as_micros() as u64;
        v.stats.counters.swap(r.is_ok());
        match r {
            Ok(()) => {
                info!(vm = v.cid, old = %old_name, new = new.name(), pause_us, "plugin swapped");
                done.push(json!({"vm": v.cid, "pause_us": pause_us}));
            }
            Err(e) => {
                return json!({"ok": false, "error": format!("VM {}: {e}", v.cid), "swapped": done})
            }
        }
    }
    if done.is_empty() {
        return json!({"ok": false, "error": "no such VM"});
    }
    json!({"ok": true, "swapped": done})
}

/// Client side: sends one request and returns the answer.
pub fn request(socket: &Path, req: &Request) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    writeln!(s, "{line}")?;
    let mut answer = String::new();
    BufReader::new(s.take(16 << 20)).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}
